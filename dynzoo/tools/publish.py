"""Publish dynzoo weights: a timm-format hub folder, a model card, a weights-index entry, a push to the hub.

``dynzoo publish --train-dir output/train/fmdconv_mobilenetv2_050.digits --repo-id dynzoo/...`` writes

* ``model.safetensors`` -- the state dict (the EMA weights when the run ranked by them),
* ``config.json`` -- timm's hub config (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``
  with the preprocessing the weights were evaluated with, and the ``tag``), written by timm's own
  ``save_config_for_hf`` so ``timm.create_model('hf-hub:<repo>', pretrained=True)`` understands it,
* ``README.md`` -- a model card citing the paper, the source of the weights and the metrics measured with their
  evaluation protocol,
* ``index_entry.json`` -- the entry ``weights_index.json`` gets for it (schema in ``docs/weights.md``),

then pushes the folder with ``huggingface_hub.HfApi.upload_folder`` (``--dry-run``: write only) and, with
``--index``, adds the entry (with the pushed commit as ``revision``) to a weights index. ``dynzoo convert``
writes the same folder for an authors' checkpoint; ``--folder`` publishes such a folder as it is.

:func:`validate_entry` / :func:`validate_index` check entries against the documented schema.
"""
import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from dynzoo.models import _hub as hub

__all__ = [
    'STATUSES', 'SOURCE_TYPES', 'IndexValidationError', 'validate_entry', 'validate_index', 'model_card',
    'export_folder', 'load_training_checkpoint', 'update_index', 'push_folder', 'publish_folder', 'main',
]

STATUSES = ('published', 'not_mirrored')
SOURCE_TYPES = ('trained', 'converted', 'authors_release')
MEASURED_BY = ('dynzoo', 'authors')
WEIGHTS_NAME = 'model.safetensors'
ENTRY_NAME = 'index_entry.json'
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_REPO_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


class IndexValidationError(ValueError):
    """A weights-index entry breaks the schema of ``docs/weights.md``."""


# --------------------------------------------------------------------------------------------------------------
# schema


def validate_entry(entry: Mapping[str, Any], check_model: bool = True) -> None:
    """Raise :class:`IndexValidationError` naming every problem of one index entry (schema in docs/weights.md)."""
    problems: List[str] = []

    def need(key: str, kind, where: Mapping[str, Any] = entry, prefix: str = '') -> Any:
        value = where.get(key)
        if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
            problems.append(f'{prefix}{key} must be a non-empty {getattr(kind, "__name__", kind)}, got {value!r}')
            return None
        return value

    model = need('model', str)
    need('tag', str)
    status = entry.get('status')
    if status not in STATUSES:
        problems.append(f'status must be one of {STATUSES}, got {status!r}')
    need('license', str)
    dataset = need('dataset', dict)
    if dataset is not None:
        need('name', str, dataset, 'dataset.')
    source = need('source', dict)
    stype = None
    if source is not None:
        stype = source.get('type')
        if stype not in SOURCE_TYPES:
            problems.append(f'source.type must be one of {SOURCE_TYPES}, got {stype!r}')
        elif stype == 'trained':
            need('recipe', str, source, 'source.')
            need('dynzoo_version', str, source, 'source.')
        else:  # converted / authors_release: where the authors published it
            url = need('url', str, source, 'source.')
            if url is not None and not url.startswith('https://'):
                problems.append(f'source.url must be an https URL, got {url!r}')
            need('repo', str, source, 'source.')
    metrics = entry.get('metrics')
    if not isinstance(metrics, list):
        problems.append(f'metrics must be a list (possibly empty), got {metrics!r}')
    else:
        for i, m in enumerate(metrics):
            if not isinstance(m, dict):
                problems.append(f'metrics[{i}] must be a mapping')
                continue
            need('name', str, m, f'metrics[{i}].')
            if not isinstance(m.get('value'), (int, float)) or isinstance(m.get('value'), bool):
                problems.append(f'metrics[{i}].value must be a number, got {m.get("value")!r}')
            need('protocol', str, m, f'metrics[{i}].')
            if m.get('measured_by') not in MEASURED_BY:
                problems.append(f'metrics[{i}].measured_by must be one of {MEASURED_BY}, got {m.get("measured_by")!r}')
    if status == 'published':
        repo = need('hf_hub_id', str)
        if repo is not None and not _REPO_ID.match(repo):
            problems.append(f'hf_hub_id must look like "org/name", got {repo!r}')
        fname = need('filename', str)
        if fname is not None and not fname.endswith('.safetensors'):
            problems.append(f'filename must be a .safetensors file, got {fname!r}')
        sha = entry.get('sha256')
        if not isinstance(sha, str) or not _SHA256.match(sha):
            problems.append(f'sha256 must be 64 lowercase hex digits, got {sha!r}')
        size = entry.get('size')
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            problems.append(f'size must be a positive int (bytes), got {size!r}')
        if stype == 'authors_release':
            problems.append('a published entry is a dynzoo file: source.type must be "trained" or "converted"')
    elif status == 'not_mirrored':
        if stype is not None and stype != 'authors_release':
            problems.append('a not_mirrored entry describes an authors\' release: source.type must be '
                            '"authors_release"')
        for m in (metrics if isinstance(metrics, list) else []):
            if isinstance(m, dict) and m.get('measured_by') == 'dynzoo':
                problems.append('a not_mirrored entry cannot carry metrics measured by dynzoo (it has no file)')
    if check_model and model is not None:
        import timm
        import dynzoo  # noqa: F401
        if not timm.is_model(model):
            problems.append(f'model {model!r} is not a registered timm/dynzoo model')
    if problems:
        name = f'{entry.get("model")}.{entry.get("tag")}'
        raise IndexValidationError(f'weights-index entry {name}: ' + '; '.join(problems))


def validate_index(index: Mapping[str, Any], check_model: bool = True) -> None:
    """Validate a whole index: schema string, every entry, and no duplicate ``(model, tag)``."""
    if index.get('schema') != hub.INDEX_SCHEMA or not isinstance(index.get('entries'), list):
        raise IndexValidationError(f'not a dynzoo weights index (expected schema {hub.INDEX_SCHEMA!r} and a list '
                                   'of entries)')
    seen = set()
    for entry in index['entries']:
        if not isinstance(entry, Mapping):
            raise IndexValidationError(f'index entries must be mappings, got {entry!r}')
        validate_entry(entry, check_model=check_model)
        key = (entry['model'], entry['tag'])
        if key in seen:
            raise IndexValidationError(f'duplicate index entry for {key[0]}.{key[1]}')
        seen.add(key)


def update_index(index_path, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Read-modify-write ``index_path``: replace the entry of the same ``(model, tag)`` or append it."""
    validate_entry(entry)
    path = Path(index_path)
    index = json.loads(path.read_text()) if path.is_file() else {'schema': hub.INDEX_SCHEMA, 'entries': []}
    entries = [e for e in index['entries'] if (e.get('model'), e.get('tag')) != (entry['model'], entry['tag'])]
    entries.append(dict(entry))
    index['entries'] = entries
    validate_index(index)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(index, indent=2) + '\n')
    os.replace(tmp, path)
    return index


# --------------------------------------------------------------------------------------------------------------
# folder and model card


def _family_info(model_name: str) -> Dict[str, Any]:
    from dynzoo.models import FAMILIES, MODEL_INFO
    info = MODEL_INFO.get(model_name, {})
    fam = FAMILIES.get(info.get('family', ''), {})
    return {'family': info.get('family', ''), 'paper': fam.get('paper', ''), 'paper_ids': fam.get('paper_ids', '')}


def _fmt_metric(m: Mapping[str, Any]) -> str:
    return f'| {m["name"]} | {m["value"]:.2f} | {m["measured_by"]} | {m["protocol"]} |'


def model_card(entry: Mapping[str, Any], config: Mapping[str, Any], num_params: int) -> str:
    """A Hugging Face model card (README.md) for the weights of ``entry``."""
    model, tag = entry['model'], entry['tag']
    fam = _family_info(model)
    src = entry['source']
    dataset = entry['dataset']
    pcfg = config.get('pretrained_cfg', {})
    lines = [
        '---',
        'tags:', '- image-classification', '- timm', '- dynzoo', '- dynamic-convolution',
        'library_name: timm',
        f'license: {entry["license"]}',
        'datasets:', f'- {dataset["name"]}',
        '---',
        f'# Model card for {model}.{tag}',
        '',
        f'{fam["family"] or "dynzoo"} image classifier from [dynzoo](https://github.com/dynzoo/dynzoo), a '
        'timm-compatible zoo of dynamic-convolution networks.',
        '',
        '## Model details',
        f'- **Architecture:** `{model}` ({num_params:,} parameters, {config.get("num_classes")} classes)',
        f'- **Paper:** {fam["paper"] or "n/a"}' + (f' ({fam["paper_ids"]})' if fam['paper_ids'] else ''),
        f'- **Dataset:** {dataset["name"]}' + (f' -- {dataset["description"]}' if dataset.get('description') else ''),
        f'- **Input:** {tuple(pcfg.get("input_size", ()))}, mean {tuple(pcfg.get("mean", ()))}, '
        f'std {tuple(pcfg.get("std", ()))}, {pcfg.get("interpolation", "?")} resize, crop_pct {pcfg.get("crop_pct")}',
    ]
    if src['type'] == 'trained':
        lines.append(f'- **Source:** trained by dynzoo {src.get("dynzoo_version")} with recipe `{src["recipe"]}`'
                     + (f' (sha256 {src["recipe_sha256"][:12]}...)' if src.get('recipe_sha256') else '')
                     + (f', {src["epochs"]} epochs, seed {src.get("seed")}' if src.get('epochs') else '')
                     + (f', temperature schedule {json.dumps(src["temperature"])}' if src.get('temperature') else ''))
    else:
        lines.append(f'- **Source:** converted by dynzoo {src.get("dynzoo_version", "")} from the authors\' release '
                     f'{src.get("url")} (repository {src.get("repo")}'
                     + (f', commit {src["commit"]}' if src.get('commit') else '')
                     + (f', file {src["file"]}' if src.get('file') else '') + ')'
                     + (f'; container {src["container"]}' if src.get('container') else ''))
    if entry.get('sha256'):
        lines.append(f'- **Weights:** `{entry.get("filename", WEIGHTS_NAME)}`, sha256 `{entry["sha256"]}`, '
                     f'{entry.get("size", 0):,} bytes')
    lines += ['', '## Metrics', '']
    if entry['metrics']:
        lines += ['| metric | value | measured by | protocol |', '|---|---|---|---|']
        lines += [_fmt_metric(m) for m in entry['metrics']]
    else:
        lines.append('No metric has been measured for these weights.')
    repo = entry.get('hf_hub_id') or f'dynzoo/{model}.{tag}'
    from timm.models import get_arch_pretrained_cfgs
    lines += ['', '## Usage', '', '```python', 'import timm, dynzoo',
              '# the weights come through dynzoo\'s weights index (sha256-checked) once their entry is listed there',
              f"model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()"]
    if f'{model}.{tag}' in get_arch_pretrained_cfgs(model):
        lines.append(f"model = timm.create_model('{model}.{tag}', pretrained=True).eval()  # same weights")
    lines += [
        'cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**cfg)',
        '```', '', '## Citation', '',
        f'Cite the paper this architecture comes from: {fam["paper"] or model}'
        + (f' ({fam["paper_ids"]}).' if fam['paper_ids'] else '.'),
        '',
    ]
    return '\n'.join(lines)


def export_folder(
        model: torch.nn.Module,
        out_dir,
        entry: Dict[str, Any],
        data_config: Optional[Mapping[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Write ``model.safetensors``, ``config.json``, ``README.md`` and ``index_entry.json`` into ``out_dir``.

    ``entry`` holds the metadata (model, tag, source, dataset, metrics, license, hf_hub_id); the file fields
    (filename, sha256, size) are filled in here. Returns the completed entry (validated).
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_NAME
    save_file(state, str(weights), metadata={'format': 'pt', 'model': entry['model'], 'tag': entry['tag']})
    src = entry['source']
    note = (f'trained by dynzoo with recipe {src.get("recipe")} on {entry["dataset"]["name"]}'
            if src['type'] == 'trained' else f'converted by dynzoo from the authors\' release {src.get("url")}')
    pretrained_cfg = {'tag': entry['tag'], 'architecture': entry['model'], 'license': entry['license'],
                      'notes': (note,)}
    model_config: Dict[str, Any] = {'pretrained_cfg': pretrained_cfg}
    if label_names:
        model_config['label_names'] = list(label_names)
    data = None
    if data_config:
        data = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()
                if k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    save_config_for_hf(model, str(out / 'config.json'), model_config=model_config, data_config=data)
    entry = dict(entry, filename=WEIGHTS_NAME, sha256=hub.sha256_file(weights), size=weights.stat().st_size)
    entry.setdefault('status', 'published')
    validate_entry(entry)
    config = json.loads((out / 'config.json').read_text())
    (out / 'README.md').write_text(model_card(entry, config, sum(p.numel() for p in model.parameters())))
    (out / ENTRY_NAME).write_text(json.dumps(entry, indent=2) + '\n')
    return entry


def load_training_checkpoint(path, use_ema: bool) -> Dict[str, torch.Tensor]:
    """The (EMA) state dict of a ``dynzoo train`` / timm checkpoint, read with ``weights_only=True``.

    timm's checkpoints carry their ``args`` as an ``argparse.Namespace``: the only non-tensor class allowed.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
        except Exception as e:
            raise hub.CheckpointError(f'{str(path)!r} is not a readable training checkpoint ({type(e).__name__}: '
                                      f'{e})') from e
    if isinstance(ckpt, dict) and 'state_dict_ema' in ckpt and use_ema:
        return hub.strip_prefix(dict(ckpt['state_dict_ema']), 'module.')
    return hub.strip_prefix(hub.unwrap_checkpoint(ckpt, use_ema=use_ema), 'module.')


def _entry_from_training(results: Mapping[str, Any], repo_id: str, license_: str) -> Dict[str, Any]:
    best = results['best']
    protocol = results['protocol']
    metrics = [{'name': 'top1', 'value': round(best['top1'], 4), 'protocol': protocol, 'measured_by': 'dynzoo'}]
    if results.get('num_classes') is None or results['num_classes'] > 5:
        metrics.append({'name': 'top5', 'value': round(best['top5'], 4), 'protocol': protocol,
                        'measured_by': 'dynzoo'})
    recipe = results.get('recipe') or {}
    return {
        'model': results['model'], 'tag': results['tag'], 'status': 'published', 'hf_hub_id': repo_id,
        'source': {'type': 'trained', 'recipe': recipe.get('name') or recipe.get('path') or 'command line',
                   'recipe_sha256': recipe.get('sha256', ''), 'dynzoo_version': results['versions']['dynzoo'],
                   'timm_version': results['versions']['timm'], 'torch_version': results['versions']['torch'],
                   'epochs': results['epochs'], 'best_epoch': results['best_epoch'], 'seed': results['seed'],
                   'world_size': results['world_size'], 'weights': results['weights'],
                   'temperature': results.get('temperature', [])},
        'dataset': {'name': results['dataset']['name'], 'description': results['dataset']['description']},
        'metrics': metrics,
        'license': license_,
        'date': datetime.date.today().isoformat(),
    }


def folder_from_training(train_dir, out_dir, repo_id: str = '', license_: str = '') -> Dict[str, Any]:
    """Export the best weights of a ``dynzoo train`` output folder (``results.json`` + checkpoint)."""
    import timm
    import dynzoo  # noqa: F401
    train_dir = Path(train_dir)
    results_path = train_dir / 'results.json'
    if not results_path.is_file():
        raise FileNotFoundError(f'{train_dir} has no results.json: is it a `dynzoo train` output folder?')
    results = json.loads(results_path.read_text())
    model_name, tag = results['model'], results['tag']
    if not tag:
        raise ValueError('the training run has no --tag: give the weights a tag (e.g. digits) when training')
    state = load_training_checkpoint(train_dir / results['checkpoint'], use_ema=results['weights'] == 'ema')
    kwargs = dict(results.get('model_kwargs') or {})
    if results.get('num_classes') is not None:
        kwargs['num_classes'] = results['num_classes']
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    license_ = license_ or model.pretrained_cfg.get('license') or 'apache-2.0'
    entry = _entry_from_training(results, repo_id or f'dynzoo/{model_name}.{tag}', license_)
    labels = None
    if results['dataset']['name'] == 'sklearn/digits':
        labels = [str(i) for i in range(10)]
    return export_folder(model, out_dir, entry, data_config=results['data_config'], label_names=labels)


# --------------------------------------------------------------------------------------------------------------
# hub push


def push_folder(folder, repo_id: str, endpoint: Optional[str] = None, token: Optional[str] = None,
                private: bool = False, revision: Optional[str] = None, commit_message: str = '') -> str:
    """Create the repo if needed and upload the folder with ``HfApi.upload_folder``; returns the commit id."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=endpoint, token=token, library_name='dynzoo')
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision,
        commit_message=commit_message or f'dynzoo: upload {repo_id}', ignore_patterns=[ENTRY_NAME])
    commit = getattr(info, 'oid', None)
    if not commit:
        raise RuntimeError(f'upload of {folder} to {repo_id} returned no commit id ({info!r})')
    return commit


def publish_folder(folder, repo_id: str = '', dry_run: bool = False, index: Optional[str] = None,
                   endpoint: Optional[str] = None, token: Optional[str] = None, private: bool = False
                   ) -> Dict[str, Any]:
    """Push an exported folder and record it; ``dry_run`` checks the folder and prints what would happen."""
    folder = Path(folder)
    entry = json.loads((folder / ENTRY_NAME).read_text())
    if repo_id and repo_id != entry.get('hf_hub_id'):
        entry['hf_hub_id'] = repo_id
    weights = folder / entry['filename']
    digest = hub.sha256_file(weights)
    if digest != entry['sha256']:
        raise hub.CheckpointError(f'{weights} changed after export (sha256 {digest} != {entry["sha256"]})')
    for name in ('config.json', 'README.md'):
        if not (folder / name).is_file():
            raise FileNotFoundError(f'{folder} lacks {name}: export it with `dynzoo publish` or `dynzoo convert`')
    validate_entry(entry)
    if dry_run:
        print(f'dry run: would upload {folder} to {entry["hf_hub_id"]}'
              + (f' and add {entry["model"]}.{entry["tag"]} to {index}' if index else ''), flush=True)
        (folder / ENTRY_NAME).write_text(json.dumps(entry, indent=2) + '\n')
        return entry
    print(f'uploading {folder} to {entry["hf_hub_id"]} ...', flush=True)
    entry['revision'] = push_folder(folder, entry['hf_hub_id'], endpoint=endpoint, token=token, private=private)
    (folder / ENTRY_NAME).write_text(json.dumps(entry, indent=2) + '\n')
    if index:
        update_index(index, entry)
        print(f'added {entry["model"]}.{entry["tag"]} (revision {entry["revision"]}) to {index}', flush=True)
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dynzoo publish', description='Export and push dynzoo weights to a hub.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--train-dir', help='a `dynzoo train` output folder (results.json + checkpoints)')
    src.add_argument('--folder', help='an exported folder (e.g. from `dynzoo convert`) to push as it is')
    p.add_argument('--out', help='where to write the hub folder (default: <train-dir>/hub)')
    p.add_argument('--repo-id', default='', help='hub repository (default dynzoo/<model>.<tag>)')
    p.add_argument('--license', default='', help='license of the weights (default: the model cfg\'s)')
    p.add_argument('--index', default=None, help='weights index to add the entry to after the push')
    p.add_argument('--endpoint', default=None, help='hub endpoint (default: $HF_ENDPOINT or huggingface.co)')
    p.add_argument('--token', default=None)
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='write and check the folder, push nothing')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    folder = args.folder
    if args.train_dir:
        folder = args.out or str(Path(args.train_dir) / 'hub')
        entry = folder_from_training(args.train_dir, folder, args.repo_id, args.license)
        print(f'wrote {folder}: {entry["model"]}.{entry["tag"]} sha256 {entry["sha256"]} ({entry["size"]:,} '
              f'bytes), top1 {entry["metrics"][0]["value"]:.2f}', flush=True)
    entry = publish_folder(folder, args.repo_id, args.dry_run, args.index, args.endpoint, args.token, args.private)
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
