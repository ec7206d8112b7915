"""Convert an authors' checkpoint into a dynzoo hub folder (safetensors + config + model card + index entry).

``dynzoo convert --model fmdconv_resnet18 --checkpoint fmd_resnet18.pth --source-repo tianyu00824/FMDConv ...``

1. reads the authors' file (or a ``model_best.pth.tar`` of timm's ``train.py`` / ``dynzoo train``) the way a user
   would load it -- ``timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(state_dict=<the file's
   container>))`` -- so the family's ``checkpoint_filter_fn`` unwraps the training container (AttNet/DMF
   ``{'model': ...}``, FMDConv ``{'state_dict': {'module.' + k: ...}}``, ODConv ``{'state_dict': ...}``), renames
   keys and sets the temperatures the authors' code runs at, the builder's strict check refuses any missing,
   unexpected or misshapen tensor (``--use-ema`` takes the EMA weights), and a training run's ``args`` bring its
   class count and preprocessing;
2. writes ``model.state_dict()`` as ``model.safetensors`` with timm's ``config.json``, a ``README.md`` model card
   and ``index_entry.json`` (sha256, size, source: repository, commit, file, URL, container; the authors'
   claimed metrics when given, marked ``measured_by: authors``) through :func:`dynzoo.tools.publish.export_folder`;
3. verifies that the safetensors file, loaded back with ``pretrained_cfg_overlay=dict(file=...)``, gives exactly
   the logits of the model converted from the authors' file;
4. records the file in the user's weights index (:func:`dynzoo.models._hub.user_index_path`), so that
   ``timm.create_model('<model>.<tag>', pretrained=True)`` loads it (sha256-checked) from then on.

The weights carry the licence of their source: ``--license``, else the one the weights index records for the
authors' release of ``model.tag``, else ``unknown`` (never the licence of dynzoo's code). Converting the same file
twice writes the same bytes. ``dynzoo publish --folder <out>`` then pushes the folder.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from dynzoo.models import _hub as hub

__all__ = ['convert_checkpoint', 'parse_metric', 'main']


def _step(i: int, n: int, text: str, quiet: bool) -> None:
    if not quiet:
        print(f'[{i}/{n}] {text}', flush=True)


def parse_metric(text: str) -> Dict[str, Any]:
    """``'top1=73.21'`` -> ``{'name': 'top1', 'value': 73.21}``."""
    name, sep, value = text.partition('=')
    try:
        if not sep or not name.strip():
            raise ValueError
        return {'name': name.strip(), 'value': float(value)}
    except ValueError:
        raise argparse.ArgumentTypeError(f'metric must look like name=value (e.g. top1=73.21), got {text!r}')


def _describe_container(obj: Any) -> str:
    if not isinstance(obj, dict):
        return type(obj).__name__
    keys = sorted(k for k in obj if isinstance(k, str))
    tensor_like = all(isinstance(v, torch.Tensor) for v in obj.values())
    if tensor_like:
        prefixed = any(k.startswith('module.') for k in keys)
        return 'bare state dict' + (' with DDP module. prefix' if prefixed else '')
    inner = [k for k in ('state_dict', 'model', 'model_ema', 'state_dict_ema') if isinstance(obj.get(k), dict)]
    prefix = any(isinstance(obj.get(k), dict) and any(str(x).startswith('module.') for x in obj[k]) for k in inner)
    return f'dict with {inner} (top-level keys {keys[:8]})' + (', DDP module. prefix' if prefix else '')


def convert_checkpoint(
        model_name: str,
        checkpoint,
        out_dir,
        tag: str = 'in1k',
        source: Optional[Dict[str, Any]] = None,
        dataset: str = 'imagenet-1k',
        metrics: Optional[List[Dict[str, Any]]] = None,
        metric_protocol: str = '',
        license_: str = '',
        repo_id: str = '',
        use_ema: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        verify: bool = True,
        quiet: bool = False,
        user_index: Optional[str] = None,
) -> Dict[str, Any]:
    """Convert ``checkpoint`` (an authors' file) for ``model_name``; returns the index entry of the result, also
    recorded (as its local file) in ``user_index`` where given."""
    import timm
    import dynzoo
    from dynzoo.models._builder import known_tags, upcycled_source
    from dynzoo.models._hub import UNTRAINED_TAG
    from dynzoo.tools.publish import export_folder, local_entry, update_index

    checkpoint = Path(checkpoint)
    if not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r}; `dynzoo list` shows the registered ones')
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint {str(checkpoint)!r} does not exist')
    source = dict(source or {})
    if not source.get('url') and source.get('repo'):
        source['url'] = f'https://github.com/{source["repo"]}'
    if not source.get('url'):
        raise ValueError('say where the authors released this checkpoint: --source-url and/or --source-repo')
    n = 3 if verify else 2
    kwargs = dict(model_kwargs or {})

    _step(1, n, f'reading {checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB) into {model_name}', quiet)
    raw = hub.load_checkpoint_file(checkpoint)
    container = _describe_container(raw)
    if use_ema:  # the EMA weights in the container's place for them, beside what it says of its run (``args``)
        raw = dict(raw, state_dict=hub.unwrap_checkpoint(raw, use_ema=True))
    # in memory, not use_ema=: timm records a model's kwargs in the config.json that the folder gets
    # the family's own cfg for the tag, not an upcycled start's preprocessing
    own_cfg = next((t for t in (tag, UNTRAINED_TAG) if t in known_tags(model_name)
                    and upcycled_source(model_name, t) is None), None)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg=own_cfg,
                              pretrained_cfg_overlay=dict(state_dict=raw), **kwargs).eval()
    del raw

    _step(2, n, f'writing {out_dir}', quiet)
    entry = {
        'model': model_name, 'tag': tag, 'status': 'published',
        'hf_hub_id': repo_id or f'dynzoo/{model_name}.{tag}',
        'source': dict(type='converted', dynzoo_version=dynzoo.__version__, container=container,
                       original_sha256=hub.sha256_file(checkpoint), ema=use_ema, **source),
        'dataset': {'name': dataset},
        'metrics': [dict(m, protocol=metric_protocol, measured_by='authors') for m in (metrics or [])],
        'license': license_ or _release_license(model_name, tag),
    }
    if metrics and not metric_protocol:
        raise ValueError('claimed metrics need their evaluation protocol (--metric-protocol)')
    entry = export_folder(model, out_dir, entry)

    if verify:
        weights = Path(out_dir) / entry['filename']
        _step(3, n, f'verifying {weights} against the authors\' checkpoint', quiet)
        reloaded = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                     **kwargs).eval()
        size = model.pretrained_cfg.get('input_size', (3, 224, 224))
        x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (model(x) - reloaded(x)).abs().max().item()
        if diff != 0.0:
            raise hub.CheckpointError(f'the converted file does not reproduce the authors\' weights: max |diff| '
                                      f'{diff:g} on a random input')
    if user_index:
        update_index(user_index, local_entry(entry, Path(out_dir) / entry['filename']))
    if not quiet:
        print(f'{model_name}.{tag}: sha256 {entry["sha256"]}, {entry["size"]:,} bytes -> {out_dir}'
              + (f'; recorded in {user_index}' if user_index else ''), flush=True)
    return entry


def _release_license(model_name: str, tag: str) -> str:
    """The licence the weights index records for the authors' release of ``model_name.tag``, else
    ``'unknown'``."""
    entry = hub.find_entry(model_name, tag)
    return (entry or {}).get('license') or 'unknown'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dynzoo convert', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help='dynzoo model name, e.g. fmdconv_resnet18')
    p.add_argument('--checkpoint', required=True, help="the authors' checkpoint file (.pth / .pth.tar / .safetensors)")
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--tag', default='in1k')
    p.add_argument('--use-ema', action='store_true', help='take the EMA weights of the container')
    p.add_argument('--source-repo', default='', help='authors\' repository, e.g. tianyu00824/FMDConv')
    p.add_argument('--source-url', default='', help='where the checkpoint is downloaded from')
    p.add_argument('--source-commit', default='', help='commit of the authors\' code the checkpoint belongs to')
    p.add_argument('--source-file', default='', help='file name / path of the release')
    p.add_argument('--dataset', default='imagenet-1k')
    p.add_argument('--metric', type=parse_metric, action='append', default=[],
                   help="the authors' claimed metric, name=value (repeatable)")
    p.add_argument('--metric-protocol', default='', help='evaluation protocol of the claimed metrics')
    p.add_argument('--license', default='', help="licence of the authors' weights (default: the index's record of "
                   'their release, else unknown)')
    p.add_argument('--no-user-index', action='store_true',
                   help='do not record the converted file in your weights index ($XDG_CACHE_HOME/dynzoo)')
    p.add_argument('--repo-id', default='', help='hub repository it will be published to')
    p.add_argument('--model-kwargs', type=json.loads, default={}, help='extra model kwargs as JSON')
    p.add_argument('--no-verify', action='store_true')
    p.add_argument('--quiet', action='store_true')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    source = {k: v for k, v in dict(repo=args.source_repo, url=args.source_url, commit=args.source_commit,
                                    file=args.source_file).items() if v}
    entry = convert_checkpoint(
        args.model, args.checkpoint, args.out, tag=args.tag, source=source, dataset=args.dataset,
        metrics=args.metric, metric_protocol=args.metric_protocol, license_=args.license, repo_id=args.repo_id,
        use_ema=args.use_ema, model_kwargs=args.model_kwargs, verify=not args.no_verify, quiet=args.quiet,
        user_index=None if args.no_user_index else str(hub.user_index_path()))
    if not args.quiet:
        print(json.dumps(entry, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
