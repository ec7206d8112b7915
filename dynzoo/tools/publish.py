"""Publish dynzoo weights: a timm-format hub folder, a model card, a weights-index entry, a push to the hub.

``dynzoo publish --train-dir output/train/fmdconv_mobilenetv2_050.digits --repo-id dynzoo/...`` writes

* ``model.safetensors`` -- the state dict (the EMA weights when the run ranked by them),
* ``config.json`` -- timm's hub config (``architecture``, ``num_classes``, ``num_features``, ``pretrained_cfg``
  with the preprocessing the weights were evaluated with, and the ``tag``), written by timm's own
  ``save_config_for_hf`` so ``timm.create_model('hf-hub:<repo>', pretrained=True)`` understands it,
* ``README.md`` -- a model card citing the paper, the source of the weights and the metrics measured with their
  evaluation protocol,
* ``index_entry.json`` -- the entry ``weights_index.json`` gets for it (schema in ``docs/weights.md``),

then pushes the folder with ``huggingface_hub.HfApi.upload_folder`` and records the entry in the user's weights
index (:func:`dynzoo.models._hub.user_index_path`; the pushed commit as ``revision``), so ``model.tag`` is a
pretrained tag at once; ``--dry-run`` pushes nothing and records the folder's local file instead; ``--index``
also adds the entry to another index (the packaged one, for a maintainer). ``dynzoo convert`` writes the same
folder for an authors' checkpoint; ``--folder`` publishes such a folder as it is. Every file of a folder is
written with the same mode (the umask's) and the same content gives the same bytes.

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
    'export_folder', 'load_training_checkpoint', 'update_index', 'remove_from_index', 'local_entry',
    'split_name', 'index_weights',
    'push_folder', 'publish_folder', 'main',
]

STATUSES = ('published', 'not_mirrored')
SOURCE_TYPES = ('trained', 'converted', 'authors_release', 'added')
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
        elif stype == 'added':  # `dynzoo weights add`: a file or hf-hub: repository the user names
            need('from', str, source, 'source.')
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
    if entry.get('pretrained_cfg') is not None:
        cfg = entry['pretrained_cfg']
        if not isinstance(cfg, dict) or set(cfg) - set(hub.CARRIED_FIELDS):
            problems.append(f'pretrained_cfg must be a mapping of {hub.CARRIED_FIELDS}, got {cfg!r}')
    if status == 'published' and entry.get('file') is not None:  # the user's index: a local file
        file = entry['file']
        if not isinstance(file, str) or not os.path.isabs(file):
            problems.append(f'file must be an absolute path, got {file!r}')
        if entry.get('hf_hub_id') is not None:
            problems.append('a published entry names a local file or a hub repository, not both')
    elif status == 'published':
        repo = need('hf_hub_id', str)
        if repo is not None and not _REPO_ID.match(repo):
            problems.append(f'hf_hub_id must look like "org/name", got {repo!r}')
        fname = need('filename', str)
        if fname is not None and not fname.endswith('.safetensors'):
            problems.append(f'filename must be a .safetensors file, got {fname!r}')
    if status == 'published':
        sha = entry.get('sha256')
        if not isinstance(sha, str) or not _SHA256.match(sha):
            problems.append(f'sha256 must be 64 lowercase hex digits, got {sha!r}')
        size = entry.get('size')
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            problems.append(f'size must be a positive int (bytes), got {size!r}')
        if stype == 'authors_release':
            problems.append('a published entry is a file of ours: source.type must be "trained", "converted" or '
                            '"added"')
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


def _read_index(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {'schema': hub.INDEX_SCHEMA, 'entries': []}


def update_index(index_path, entry: Mapping[str, Any]) -> Dict[str, Any]:
    """Read-modify-write ``index_path``: replace the entry of the same ``(model, tag)`` or append it."""
    validate_entry(entry)
    path = Path(index_path)
    index = _read_index(path)
    entries = [e for e in index['entries'] if (e.get('model'), e.get('tag')) != (entry['model'], entry['tag'])]
    entries.append(dict(entry))
    index['entries'] = entries
    validate_index(index)
    hub.write_json(path, index)
    return index


def remove_from_index(index_path, model: str, tag: str) -> Dict[str, Any]:
    """Remove the entry ``(model, tag)`` from ``index_path``; :class:`KeyError` where it lists none."""
    path = Path(index_path)
    index = _read_index(path)
    entries = [e for e in index['entries'] if (e.get('model'), e.get('tag')) != (model, tag)]
    if len(entries) == len(index['entries']):
        raise KeyError(f'{path} lists no entry {model}.{tag}')
    index['entries'] = entries
    hub.write_json(path, index)
    return index


def local_entry(entry: Mapping[str, Any], weights) -> Dict[str, Any]:
    """``entry`` published as the local file ``weights`` (the user's index) instead of a hub repository."""
    local = {k: v for k, v in entry.items() if k not in ('hf_hub_id', 'filename', 'revision')}
    local['file'] = str(Path(weights).resolve())
    validate_entry(local)
    return local


def split_name(name: str):
    """``'attnet_xxs.digits'`` -> ``('attnet_xxs', 'digits')`` for a registered model and a tag that can hold
    weights (not timm's ``.untrained``); :class:`ValueError` otherwise."""
    import timm
    import dynzoo  # noqa: F401
    model, _, tag = name.partition('.')
    if not timm.is_model(model):
        raise ValueError(f'unknown model {model!r}; `dynzoo list` shows the registered ones')
    if not tag or tag == hub.UNTRAINED_TAG:
        raise ValueError(f'{name!r}: name the weights MODEL.TAG with a tag of your own (e.g. {model}.digits); '
                         f'.{hub.UNTRAINED_TAG} is timm\'s tag for no weights')
    return model, tag


def index_weights(name: str, source: str, license_: str = '', dataset: str = '', num_classes: Optional[int] = None,
                  filename: str = WEIGHTS_NAME) -> Dict[str, Any]:
    """The weights-index entry of the user's checkpoint ``source`` for ``name`` (``MODEL.TAG``): a file, or
    ``hf-hub:ORG/REPO[@REVISION]`` (downloaded and pinned, :func:`dynzoo.models._hub.download_pinned`).

    The file is first loaded the way ``pretrained=True`` will load it (strict: keys, shapes, values), with the
    class count and preprocessing it carries (a ``config.json`` beside it) or ``num_classes``; its sha256 and size
    are recorded. The licence is ``license_``, else ``unknown``.
    """
    import timm
    import dynzoo
    model_name, tag = split_name(name)
    if source.startswith('hf-hub:'):
        repo, _, revision = source[len('hf-hub:'):].partition('@')
        path = Path(hub.download_pinned(repo, filename, revision or None, name))
        try:  # the preprocessing it was trained with, where the repository has timm's config.json
            hub.download_pinned(repo, hub.CONFIG_NAME, revision or None, name)
        except hub.CheckpointError as e:
            print(f'{repo} has no readable {hub.CONFIG_NAME} ({e}); the model\'s own cfg applies', file=sys.stderr)
        where: Dict[str, Any] = dict(hf_hub_id=repo, filename=filename, revision=path.parent.name)
    else:
        path = Path(source)
        where = dict(file=str(path.resolve()))
    checkpoint = hub.load_checkpoint_file(path)
    carried = hub.checkpoint_cfg(checkpoint, str(path), model_name)
    if num_classes is not None:
        carried['num_classes'] = num_classes
    kwargs = {'num_classes': carried['num_classes']} if 'num_classes' in carried else {}
    timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=checkpoint), **kwargs)
    entry = dict(
        model=model_name, tag=tag, status='published', **where, sha256=hub.sha256_file(path),
        size=path.stat().st_size, source={'type': 'added', 'from': source, 'dynzoo_version': dynzoo.__version__},
        dataset={'name': dataset or 'unknown'}, metrics=[], license=license_ or 'unknown',
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in carried.items()})
    validate_entry(entry)
    return entry


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
    from safetensors.torch import save
    from timm.models._hub import save_config_for_hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_NAME
    # one metadata key: safetensors writes several in no fixed order (config.json names the model and tag)
    weights.unlink(missing_ok=True)  # a new file: the umask's mode, as for the folder's other files
    weights.write_bytes(save(state, metadata={'format': 'pt'}))
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
    carried = hub.checkpoint_cfg({}, str(weights), entry['model'])
    entry = dict(entry, filename=WEIGHTS_NAME, sha256=hub.sha256_file(weights), size=weights.stat().st_size,
                 pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in carried.items()})
    entry.setdefault('status', 'published')
    validate_entry(entry)
    config = json.loads((out / 'config.json').read_text())
    (out / 'README.md').write_text(model_card(entry, config, sum(p.numel() for p in model.parameters())))
    hub.write_json(out / ENTRY_NAME, entry)
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
    if not license_:  # never the licence of the code or of the authors' weights
        license_ = 'unknown'
        print('no --license given: the weights are recorded with license "unknown"', file=sys.stderr)
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
                   endpoint: Optional[str] = None, token: Optional[str] = None, private: bool = False,
                   user_index: Optional[str] = None) -> Dict[str, Any]:
    """Push an exported folder and record it in ``user_index`` (the pushed repository and commit) and ``index``;
    ``dry_run`` checks the folder, pushes nothing and records its local file in ``user_index`` only."""
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
    name = hub.entry_name(entry)
    if dry_run:
        print(f'dry run: would upload {folder} to {entry["hf_hub_id"]}'
              + (f' and add {name} to {index}' if index else ''), flush=True)
        hub.write_json(folder / ENTRY_NAME, entry)
        if user_index:
            update_index(user_index, local_entry(entry, weights))
            print(f'recorded {name} (the local file {weights.resolve()}) in {user_index}', flush=True)
        return entry
    print(f'uploading {folder} to {entry["hf_hub_id"]} ...', flush=True)
    entry['revision'] = push_folder(folder, entry['hf_hub_id'], endpoint=endpoint, token=token, private=private)
    hub.write_json(folder / ENTRY_NAME, entry)
    for path in (p for p in (user_index, index) if p):
        update_index(path, entry)
        print(f'added {name} (revision {entry["revision"]}) to {path}', flush=True)
    return entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dynzoo publish', description='Export and push dynzoo weights to a hub.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--train-dir', help='a `dynzoo train` output folder (results.json + checkpoints)')
    src.add_argument('--folder', help='an exported folder (e.g. from `dynzoo convert`) to push as it is')
    p.add_argument('--out', help='where to write the hub folder (default: <train-dir>/hub)')
    p.add_argument('--repo-id', default='', help='hub repository (default dynzoo/<model>.<tag>)')
    p.add_argument('--license', default='', help='license of the weights you trained (default: unknown)')
    p.add_argument('--index', default=None, help='another weights index to add the entry to after the push')
    p.add_argument('--no-user-index', action='store_true',
                   help='do not record the weights in your weights index ($XDG_CACHE_HOME/dynzoo)')
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
    entry = publish_folder(folder, args.repo_id, args.dry_run, args.index, args.endpoint, args.token, args.private,
                           user_index=None if args.no_user_index else str(hub.user_index_path()))
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
