"""Checkpoints: the weights index, hub downloads checked by sha256, local files, authors' containers.

``weights_index.json`` (shipped inside the package; ``$DYNZOO_WEIGHTS_INDEX`` points elsewhere) lists every
checkpoint that exists and nothing else. Each entry has ``model``, ``tag`` and ``status``:

* ``"published"`` -- a dynzoo ``model.safetensors`` on the Hugging Face hub (``hf_hub_id``, ``filename``,
  ``sha256``, ``size``), loadable with ``pretrained=True``;
* ``"not_mirrored"`` -- an authors' release that exists upstream (``source.url``) but has no safetensors copy on
  the hub yet: ``pretrained=True`` refuses and says how to load the downloaded file instead.

Local files load with ``pretrained_cfg_overlay=dict(file=PATH)``: ``.safetensors`` through safetensors, anything
else only through ``torch.load(weights_only=True)``. Every failure raises :class:`CheckpointError` (or its
subclass :class:`PretrainedUnavailableError`) naming the model, the file and what to do.
"""
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

__all__ = [
    'CheckpointError', 'PretrainedUnavailableError', 'index_path', 'load_index', 'find_entry', 'entries_for',
    'is_published', 'sha256_file', 'load_checkpoint_file', 'load_checkpoint', 'unwrap_checkpoint',
    'strip_prefix', 'INDEX_ENV',
]

INDEX_ENV = 'DYNZOO_WEIGHTS_INDEX'
INDEX_SCHEMA = 'dynzoo-weights-index/1'
_PACKAGE_INDEX = Path(__file__).resolve().parents[1] / 'weights_index.json'


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, verified or matched to the model."""


class PretrainedUnavailableError(CheckpointError):
    """``pretrained=True`` for a model/tag with no published dynzoo checkpoint."""


def index_path() -> Path:
    return Path(os.environ.get(INDEX_ENV) or _PACKAGE_INDEX)


@lru_cache(maxsize=8)
def _load_index_cached(path: str, mtime: float) -> Dict[str, Any]:
    with open(path, 'r', encoding='utf-8') as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get('schema') != INDEX_SCHEMA or not isinstance(data.get('entries'), list):
        raise CheckpointError(f'{path} is not a dynzoo weights index (expected schema {INDEX_SCHEMA!r})')
    return data


def load_index() -> Dict[str, Any]:
    """The weights index in force (re-read when the file changes)."""
    path = index_path()
    if not path.is_file():
        raise CheckpointError(f'weights index {path} does not exist (set ${INDEX_ENV} or reinstall dynzoo)')
    return _load_index_cached(str(path), path.stat().st_mtime)


def entries_for(model: str) -> List[Dict[str, Any]]:
    return [e for e in load_index()['entries'] if e.get('model') == model]


def find_entry(model: str, tag: Optional[str]) -> Optional[Dict[str, Any]]:
    for e in entries_for(model):
        if (e.get('tag') or '') == (tag or ''):
            return e
    return None


def is_published(model: str, tag: Optional[str]) -> bool:
    e = find_entry(model, tag)
    return e is not None and e.get('status') == 'published'


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint_file(path) -> Any:
    """Read a checkpoint file: ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint file {str(path)!r} does not exist')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            checkpoint = load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types for truncation / bad headers
            raise CheckpointError(
                f'{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e}); '
                'it is truncated or corrupted: download it again') from e
    else:
        try:
            checkpoint = torch.load(str(path), map_location='cpu', weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f'{str(path)!r} could not be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). '
                'dynzoo never unpickles arbitrary objects: the file is corrupted, or holds more than tensors '
                '(re-save its state dict alone, or convert it with `dynzoo convert`)') from e
    if not isinstance(checkpoint, Mapping) or not checkpoint:  # timm would mistake {} for "no weights given"
        what = 'an empty dict' if isinstance(checkpoint, Mapping) else f'a {type(checkpoint).__name__}'
        raise CheckpointError(f'{str(path)!r} holds {what}, expected a dict of tensors (a state dict or a '
                              'training container holding one)')
    return checkpoint


def _unavailable_message(model: str, tag: Optional[str]) -> str:
    name = f'{model}.{tag}' if tag else model
    lines = [f'No published dynzoo checkpoint exists for {name!r}, so pretrained=True cannot load weights.']
    known = entries_for(model)
    for e in known:
        etag = f"{model}.{e.get('tag')}" if e.get('tag') else model
        if e.get('status') == 'published':
            lines.append(f'  - {etag}: published on the hub as {e.get("hf_hub_id")} '
                         f'(use timm.create_model({etag!r}, pretrained=True))')
        else:
            src = e.get('source') or {}
            lines.append(f'  - {etag}: {e.get("status")} -- released by the authors at {src.get("url", "?")}; '
                         'download it and load the file as shown below')
    if not known:
        lines.append('  The weights index lists no checkpoint at all for this model (see `dynzoo weights`).')
    lines.append('To load a checkpoint file you have: timm.create_model('
                 f'{model!r}, pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/weights.safetensors"))'
                 ' (an authors\' .pth works too); for random init use pretrained=False.')
    return '\n'.join(lines)


def load_checkpoint(pretrained_cfg: Mapping[str, Any]) -> Any:
    """Resolve a model's pretrained config to the checkpoint object it names.

    Priority as in timm: an explicit ``state_dict``, then a local ``file``, then the hub entry of the weights
    index for ``(architecture, tag)``, downloaded with ``huggingface_hub`` and checked against its sha256.
    """
    if pretrained_cfg.get('state_dict') is not None:
        return pretrained_cfg['state_dict']
    if pretrained_cfg.get('file'):
        return load_checkpoint_file(pretrained_cfg['file'])
    model = pretrained_cfg.get('architecture') or '?'
    tag = pretrained_cfg.get('tag')
    entry = find_entry(model, tag)
    if entry is None or entry.get('status') != 'published':
        raise PretrainedUnavailableError(_unavailable_message(model, tag))
    from huggingface_hub import hf_hub_download
    try:
        path = hf_hub_download(
            repo_id=entry['hf_hub_id'], filename=entry.get('filename', 'model.safetensors'),
            revision=entry.get('revision'))
    except Exception as e:
        raise CheckpointError(
            f'could not fetch {entry["hf_hub_id"]}/{entry.get("filename", "model.safetensors")} for '
            f'{model}.{tag} ({type(e).__name__}: {e}). Offline? Put the file in the Hugging Face cache, or load it '
            'with pretrained_cfg_overlay=dict(file=...)') from e
    size = os.path.getsize(path)
    if entry.get('size') is not None and size != entry['size']:
        raise CheckpointError(
            f'size mismatch for {model}.{tag} ({path}): index says {entry["size"]} bytes, file has {size}. '
            'The download is truncated or the hub file changed: delete it from the cache and download again.')
    digest = sha256_file(path)
    if digest != entry.get('sha256'):
        raise CheckpointError(
            f'sha256 mismatch for {model}.{tag} ({path}): index says {entry.get("sha256")}, file has {digest}. '
            'The download is corrupted or the hub file changed: delete it from the cache and download again.')
    return load_checkpoint_file(path)


def unwrap_checkpoint(checkpoint: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Take the state dict out of a training container.

    Understands ``{'state_dict': ...}``, ``{'model': ..., 'model_ema': ...}``, ``{'state_dict_ema': ...}`` and a
    bare state dict. ``use_ema`` picks the EMA weights and raises if the container has none.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint is a {type(checkpoint).__name__}, expected a dict of tensors')
    ema_keys = [k for k in ('model_ema', 'state_dict_ema') if isinstance(checkpoint.get(k), Mapping)]
    if use_ema:
        if not ema_keys:
            raise CheckpointError('use_ema=True but the checkpoint holds no EMA weights '
                                  f'(top-level keys: {sorted(checkpoint)[:10]})')
        sd = checkpoint[ema_keys[0]]
    else:
        for key in ('state_dict', 'model'):
            if isinstance(checkpoint.get(key), Mapping):
                sd = checkpoint[key]
                break
        else:
            sd = checkpoint
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f'checkpoint entries are not tensors: {bad[:5]} (is this a training container of an '
                              'unknown layout?)')
    return dict(sd)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = 'module.') -> Dict[str, torch.Tensor]:
    """Remove a DDP/DataParallel ``module.`` (or any) prefix from every key that has it."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state_dict.items()}
