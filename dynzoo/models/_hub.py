"""Checkpoints: the weights index, hub downloads checked by sha256, local files, authors' containers.

``weights_index.json`` (shipped inside the package; ``$DYNZOO_WEIGHTS_INDEX`` names another one in its place)
lists every checkpoint that exists and nothing else; the user's own index, ``$XDG_CACHE_HOME/dynzoo/
weights_index.json`` (:func:`user_index_path`; written by ``dynzoo weights add``, ``dynzoo convert`` and
``dynzoo publish``), is layered over it, its entries winning per ``(model, tag)``. Each entry has ``model``,
``tag`` and ``status``:

* ``"published"`` -- a ``model.safetensors`` on the Hugging Face hub (``hf_hub_id``, ``filename``, ``sha256``,
  ``size``) or, in the user's index only, a local ``file``: loadable with ``pretrained=True``, sha256-checked;
* ``"not_mirrored"`` -- an authors' release that exists upstream (``source.url``) but has no safetensors copy on
  the hub yet: ``pretrained=True`` refuses and says how to load the downloaded file instead.

A model released without weights carries timm's ``.untrained`` tag, which no entry may publish.

Local files load with ``pretrained_cfg_overlay=dict(file=PATH)``, a published folder with timm's
``timm.create_model('local-dir:FOLDER', pretrained=True)`` too. Only regular files are opened, and the format is
read from the file's first bytes, whatever its suffix: safetensors through safetensors, ``torch.save``'s zip or
pickle format only through ``torch.load(weights_only=True)``, which unpickles tensors and plain containers and,
of everything else, only :data:`SAFE_GLOBALS` (the ``argparse.Namespace`` in which timm's ``CheckpointSaver`` keeps
a run's ``args``): the ``model_best.pth.tar`` / ``checkpoint-*.pth.tar`` / ``last.pth.tar`` that timm's
``train.py`` and ``dynzoo train`` write load as they are. A checkpoint may carry its own pretrained cfg
(:func:`checkpoint_cfg`: the ``config.json`` of a published folder, the ``args`` of a training run), which the
builder applies instead of the tag's ImageNet defaults. :func:`check_state_dict` refuses, before anything is
loaded, a state dict whose keys, shapes or dtypes do not fit the model, that holds NaN/Inf, or whose temperatures
are not finite and positive. Every failure raises :class:`CheckpointError` (or its
subclass :class:`PretrainedUnavailableError`) naming the model, the file or key and what to do.

A hub file that no index lists (the static timm checkpoint an upcycled tag starts from, a repository named with
timm's ``hf-hub:`` prefix) is checked by :func:`download_pinned` against the sha256 the hub announced for it (an
LFS file's ``X-Linked-Etag``, which names its blob in the Hugging Face cache), and that digest is pinned on first
download in ``$XDG_CACHE_HOME/dynzoo/hub_pins.json``: every later load, offline too, must match it.
"""
import argparse
import hashlib
import json
import logging
import os
import pickle
import re
import stat
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'PretrainedUnavailableError', 'index_path', 'load_index', 'find_entry', 'entries_for',
    'is_published', 'sha256_file', 'checkpoint_format', 'load_checkpoint_file', 'load_checkpoint',
    'unwrap_checkpoint', 'strip_prefix', 'checkpoint_cfg', 'check_state_dict', 'INDEX_ENV', 'UNTRAINED_TAG',
    'weights_path', 'SAFE_GLOBALS', 'CARRIED_FIELDS', 'CONFIG_NAME', 'WEIGHTS_NAME', 'cache_dir',
    'user_index_path', 'pins_path', 'index_layers', 'entries_in_force', 'write_json', 'download_pinned',
    'entry_name',
]

_logger = logging.getLogger(__name__)

INDEX_ENV = 'DYNZOO_WEIGHTS_INDEX'
INDEX_SCHEMA = 'dynzoo-weights-index/1'
UNTRAINED_TAG = 'untrained'  # timm's tag for an architecture without weights
_PACKAGE_INDEX = Path(__file__).resolve().parents[1] / 'weights_index.json'
CONFIG_NAME = 'config.json'  # timm's hub config, beside the weights of a published folder
WEIGHTS_NAME = 'model.safetensors'  # the weights of a published folder


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, verified or matched to the model."""


class PretrainedUnavailableError(CheckpointError):
    """``pretrained=True`` for a model/tag with no published dynzoo checkpoint."""


# --- paths --------------------------------------------------------------------------------------------------------

_FILE_KINDS = (
    (stat.S_ISCHR, 'character device'), (stat.S_ISBLK, 'block device'), (stat.S_ISFIFO, 'named pipe (FIFO)'),
    (stat.S_ISSOCK, 'socket'),
)


def _path_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a regular file that can be opened (``None`` when it is one), without opening it: a
    FIFO would block the reader and a device such as ``/dev/zero`` never ends."""
    link = f' (a symlink to {os.path.realpath(path)!r})' if path.is_symlink() else ''
    try:
        st = os.stat(path)  # follows symlinks
    except FileNotFoundError:
        if link:
            return f'is a symlink to {os.readlink(path)!r}, which does not exist'
        return 'does not exist'
    except OSError as e:
        return f'cannot be examined ({e.strerror or type(e).__name__})'
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            inside = sorted(p.name for p in path.iterdir() if p.is_file())
        except OSError:
            inside = []
        holds = f'; it holds {inside[:6]}' if inside else ''
        return f'is a directory{link}, not a checkpoint file: give the path of the weights file inside it{holds}'
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), 'special file')
    return f'is a {kind}{link}, not a regular file: checkpoints are read from regular files only'


# --- the weights index ----------------------------------------------------------------------------------------------

def index_path() -> Path:
    """The base index: ``$DYNZOO_WEIGHTS_INDEX`` where set, else the packaged one."""
    return Path(os.environ.get(INDEX_ENV) or _PACKAGE_INDEX)


CACHE_ENV = 'DYNZOO_CACHE'


def cache_dir() -> Path:
    """dynzoo's folder in the user's cache: ``$DYNZOO_CACHE``, else ``$XDG_CACHE_HOME/dynzoo``, else
    ``~/.cache/dynzoo``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'dynzoo'


def user_index_path() -> Path:
    """The user's weights index, layered over :func:`index_path`'s."""
    return cache_dir() / 'weights_index.json'


def pins_path() -> Path:
    """The sha256 of every hub file :func:`download_pinned` verified, pinned on first download."""
    return cache_dir() / 'hub_pins.json'


def entry_name(entry: Mapping[str, Any]) -> str:
    return f"{entry.get('model')}.{entry.get('tag')}" if entry.get('tag') else str(entry.get('model'))


def write_json(path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys (the same bytes for the same content), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n', encoding='utf-8')
    os.replace(tmp, path)


@lru_cache(maxsize=8)
def _parse_index(data: bytes, path: str) -> Dict[str, Any]:
    try:
        index = json.loads(data.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'weights index {path} is not valid JSON ({e})') from e
    if not isinstance(index, dict) or index.get('schema') != INDEX_SCHEMA or not isinstance(index.get('entries'), list):
        raise CheckpointError(f'{path} is not a dynzoo weights index (expected schema {INDEX_SCHEMA!r})')
    return index


def _read_index(path: Path, hint: str) -> Dict[str, Any]:
    problem = _path_problem(path)
    if problem is not None:
        raise CheckpointError(f'weights index {path} {problem} ({hint})')
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f'weights index {path} cannot be read ({e.strerror or e})') from e
    return _parse_index(data, str(path))


def index_layers() -> List[Tuple[Path, Dict[str, Any]]]:
    """``(path, index)`` of the base index and, where it exists, of the user's index layered over it."""
    layers = [(index_path(), _read_index(index_path(), f'set ${INDEX_ENV} or reinstall dynzoo'))]
    user = user_index_path()
    if user.exists():
        layers.append((user, _read_index(user, 'fix it, or remove it to drop your own entries')))
    return layers


def entries_in_force() -> List[Tuple[Path, Dict[str, Any]]]:
    """``(index path, entry)`` of every entry in force: the base index's with the user's over them (one per
    ``(model, tag)``, the user's winning), each index read once per content (a rewrite is seen whatever its
    modification time)."""
    merged: Dict[Tuple[Any, Any], Tuple[Path, Dict[str, Any]]] = {}
    for path, index in index_layers():
        for e in index['entries']:
            merged[(e.get('model'), e.get('tag'))] = (path, e)
    return list(merged.values())


def load_index() -> Dict[str, Any]:
    """The weights index in force (:func:`entries_in_force`)."""
    return {'schema': INDEX_SCHEMA, 'entries': [e for _, e in entries_in_force()]}


def entries_for(model: str) -> List[Dict[str, Any]]:
    return [e for e in load_index()['entries'] if e.get('model') == model]


def find_entry(model: str, tag: Optional[str]) -> Optional[Dict[str, Any]]:
    for e in entries_for(model):
        if (e.get('tag') or '') == (tag or ''):
            return e
    return None


def _published_entry(model: str, tag: Optional[str]) -> Optional[Dict[str, Any]]:
    """The index entry that ``pretrained=True`` downloads for ``model.tag``, if any (never for ``.untrained``)."""
    e = find_entry(model, tag)
    return e if e is not None and e.get('status') == 'published' and tag != UNTRAINED_TAG else None


def is_published(model: str, tag: Optional[str]) -> bool:
    return _published_entry(model, tag) is not None


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


# --- reading a checkpoint file -------------------------------------------------------------------------------------

# first bytes of files that are mistaken for checkpoints, for the message that refuses them
_OTHER_FORMATS = (
    (b'version https://git-lfs', 'a Git LFS pointer, not the weights (run `git lfs pull`)'),
    (b'<', 'an HTML/XML page (a download that saved the server\'s answer instead of the file?)'),
    (b'{', 'a JSON text'),
    (b'\x1f\x8b', 'a gzip archive (extract the checkpoint first)'),
    (b'\x89HDF', 'an HDF5 file (Keras weights)'),
    (b'\x93NUMPY', 'a NumPy array file'),
)


# torch.save's formats: a zip archive (the default), or the legacy format, a pickle stream (protocol 2 to 5)
_PICKLE_PROTOCOLS = tuple(bytes((0x80, p)) for p in range(2, 6))

# the classes besides tensors and plain containers that a training checkpoint holds, each harmless to rebuild:
# timm's CheckpointSaver (timm's train.py, `dynzoo train`) saves the run's options as an argparse.Namespace
SAFE_GLOBALS = (argparse.Namespace,)


def checkpoint_format(path) -> str:
    """``'safetensors'`` or ``'torch'`` (``torch.save``'s zip or legacy pickle format), read from the first bytes of
    ``path``; anything else raises :class:`CheckpointError` saying what the path or file is."""
    path = Path(path)
    problem = _path_problem(path)
    if problem is not None:
        raise CheckpointError(f'checkpoint file {str(path)!r} {problem}')
    try:
        with open(path, 'rb') as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f'checkpoint file {str(path)!r} cannot be read ({e.strerror or e})') from e
    size = path.stat().st_size
    if not head:
        raise CheckpointError(f'checkpoint file {str(path)!r} is empty (0 bytes): it is truncated or corrupted, '
                              'download or copy it again')
    if head.startswith(b'PK\x03\x04') or head[:2] in _PICKLE_PROTOCOLS:
        return 'torch'
    # safetensors: an 8-byte little-endian header length, then the JSON header
    header_len = int.from_bytes(head[:8], 'little') if len(head) >= 8 else 0
    if head[8:9] == b'{':
        if 8 + header_len <= size:
            return 'safetensors'
        raise CheckpointError(
            f'{str(path)!r} is not a readable safetensors file: its header announces {header_len} bytes but the '
            f'file has {size}; it is truncated or corrupted: download it again')
    if 2 <= header_len <= size - 8:
        raise CheckpointError(
            f'{str(path)!r} is not a readable safetensors file: its first 8 bytes announce a {header_len}-byte '
            'header, which is not JSON; it is truncated or corrupted: download it again')
    what = next((desc for prefix, desc in _OTHER_FORMATS if head.lstrip().startswith(prefix)),
                f'a file starting with {head[:16]!r}')
    raise CheckpointError(
        f'{str(path)!r} could not be read as a checkpoint: it is {what}, neither safetensors nor torch.save\'s '
        'zip/pickle format')


def load_checkpoint_file(path) -> Any:
    """Read a checkpoint file (format from its bytes, see :func:`checkpoint_format`) into a dict of tensors or a
    training container; ``torch.load`` runs with ``weights_only=True`` only."""
    path = Path(path)
    if checkpoint_format(path) == 'safetensors':
        from safetensors.torch import load_file
        try:
            checkpoint = load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types for truncation / bad headers
            raise CheckpointError(
                f'{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e}); '
                'it is truncated or corrupted: download it again') from e
    else:
        try:  # from an open file: torch.load would pick its reader by the name's suffix
            with open(path, 'rb') as f, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                checkpoint = torch.load(f, map_location='cpu', weights_only=True)
        except Exception as e:
            refused = _refused_globals(path, e)
            if refused:
                raise CheckpointError(
                    f'{str(path)!r} holds Python objects that torch.load(weights_only=True) does not rebuild: '
                    f'{", ".join(refused)}. dynzoo never unpickles arbitrary objects; besides tensors and plain '
                    f'containers it allows only {", ".join(_qualname(c) for c in SAFE_GLOBALS)} (the args of timm\'s '
                    'training checkpoints). Re-save the state dict alone (torch.save(model.state_dict(), ...) or '
                    'safetensors).') from e
            raise CheckpointError(
                f'{str(path)!r} could not be read with torch.load(weights_only=True) ({type(e).__name__}: '
                f'{str(e).strip().splitlines()[0] if str(e).strip() else "no message"}): it is truncated or '
                'corrupted, copy or download it again') from e
    if not isinstance(checkpoint, Mapping) or not checkpoint:  # timm would mistake {} for "no weights given"
        what = 'an empty dict' if isinstance(checkpoint, Mapping) else f'a {type(checkpoint).__name__}'
        raise CheckpointError(f'{str(path)!r} holds {what}, expected a dict of tensors (a state dict or a '
                              'training container holding one)')
    return checkpoint


def _qualname(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def _refused_globals(path: Path, error: Exception) -> List[str]:
    """The classes / functions that made ``torch.load(weights_only=True)`` refuse ``path`` (empty when it failed
    for another reason, e.g. truncation): all of them for the zip format, the first one for a legacy pickle."""
    if not isinstance(error, pickle.UnpicklingError):
        return []
    allowed = {_qualname(c) for c in SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # the legacy pickle format: the refusal names the first one
        found = re.findall(r'GLOBAL (\S+) was not an allowed global', str(error))
    return [g for g in found if g not in allowed]


def _unavailable_message(model: str, tag: Optional[str]) -> str:
    name = f'{model}.{tag}' if tag else model
    lines = [f'No published dynzoo checkpoint exists for {name!r}, so pretrained=True cannot load weights.']
    if tag == UNTRAINED_TAG:
        lines[0] += f' (.{UNTRAINED_TAG} is timm\'s tag for an architecture without released weights.)'
    known = entries_for(model)
    for e in known:
        etag = f"{model}.{e.get('tag')}" if e.get('tag') else model
        if is_published(model, e.get('tag')):
            where = f'the local file {e["file"]}' if e.get('file') else f'the hub as {e.get("hf_hub_id")}'
            lines.append(f'  - {etag}: published in {where} (use timm.create_model({etag!r}, pretrained=True))')
        else:
            src = e.get('source') or {}
            lines.append(f'  - {etag}: {e.get("status")} -- released by the authors at {src.get("url", "?")}; '
                         'download it and load the file as shown below')
    from timm.models import get_arch_pretrained_cfgs
    listed = {entry_name(e) for e in known}
    starts = [(n, c) for n, c in get_arch_pretrained_cfgs(model).items() if c.has_weights and n not in listed]
    for start_name, cfg in starts:  # the upcycled starts (dynzoo.models._builder.upcycled_cfg)
        lines.append(f'  - {start_name}: {cfg.description} (use timm.create_model({start_name!r}, pretrained=True))')
    if not known and not starts:
        lines.append('  The weights index lists no checkpoint at all for this model (see `dynzoo weights`).')
    lines.append('To load a checkpoint file you have: timm.create_model('
                 f'{model!r}, pretrained=True, pretrained_cfg_overlay=dict(file="/path/to/weights.safetensors"))'
                 ' (an authors\' .pth works too); for random init use pretrained=False.')
    return '\n'.join(lines)


def load_checkpoint(pretrained_cfg: Any) -> Any:
    """Resolve a pretrained config -- a dict, timm's ``PretrainedCfg``, or a model built by timm (its
    ``pretrained_cfg``) -- to the checkpoint object it names.

    Priority as in timm: an explicit ``state_dict``, then a local ``file``, then the hub entry of the weights
    index for ``(architecture, tag)``, downloaded with ``huggingface_hub`` and checked against its sha256.
    """
    if isinstance(pretrained_cfg, nn.Module):
        model = pretrained_cfg
        pretrained_cfg = getattr(model, 'pretrained_cfg', None)
        if pretrained_cfg is None:
            raise TypeError(f'load_checkpoint: the {type(model).__name__} has no pretrained_cfg (build it with '
                            'timm.create_model, or pass a pretrained cfg dict)')
    if hasattr(pretrained_cfg, 'to_dict'):  # timm's PretrainedCfg
        pretrained_cfg = pretrained_cfg.to_dict()
    if not isinstance(pretrained_cfg, Mapping):
        raise TypeError(f'load_checkpoint expects a pretrained cfg (dict or timm PretrainedCfg) or a timm model, '
                        f'got a {type(pretrained_cfg).__name__}')
    if pretrained_cfg.get('state_dict') is not None:
        return pretrained_cfg['state_dict']
    model = pretrained_cfg.get('architecture') or '?'
    tag = pretrained_cfg.get('tag')
    name = f'{model}.{tag}' if tag else model
    entry = _published_entry(model, tag)
    file = pretrained_cfg.get('file')
    if file:
        if entry is not None and entry.get('file') and Path(file) == Path(entry['file']):  # the index's own file
            return load_checkpoint_file(_verified(entry, Path(file), name))
        return load_checkpoint_file(weights_path(file))
    repo = pretrained_cfg.get('hf_hub_id')
    if pretrained_cfg.get('source') == 'hf-hub' and repo and (entry is None or entry.get('hf_hub_id') != repo):
        # timm's ``hf-hub:ORG/REPO``: the repository the caller named, whatever the index lists for the tag
        repo, _, revision = repo.partition('@')
        return load_checkpoint_file(download_pinned(
            repo, pretrained_cfg.get('hf_hub_filename') or WEIGHTS_NAME, revision or None, name))
    if entry is None:
        raise PretrainedUnavailableError(_unavailable_message(model, tag))
    path = _fetch(entry['hf_hub_id'], entry.get('filename', WEIGHTS_NAME), entry.get('revision'), name)
    return load_checkpoint_file(_verified(entry, Path(path), name))


def _fetch(repo_id: str, filename: str, revision: Optional[str], name: str) -> str:
    """``hf_hub_download`` (its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``), failures as :class:`CheckpointError`."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision)
    except Exception as e:
        raise CheckpointError(
            f'could not fetch {repo_id}/{filename} for {name} ({type(e).__name__}: {e}). Offline? Put the file in '
            'the Hugging Face cache, or load it with pretrained_cfg_overlay=dict(file=...)') from e


def _verified(entry: Mapping[str, Any], path: Path, name: str) -> Path:
    """``path`` once its size and sha256 are the index entry's."""
    if entry.get('file'):
        problem = _path_problem(path)
        if problem is not None:
            raise CheckpointError(f'{name}: the weights index lists {str(path)!r}, which {problem}; add the file '
                                  f'again (`dynzoo weights add {name} FILE`) or remove the entry')
        fix = (f'The file changed after it was indexed: if on purpose, index it again '
               f'(`dynzoo weights add {name} FILE`).')
    else:
        fix = 'The download is corrupted or the hub file changed: delete it from the cache and download again.'
    size = os.path.getsize(path)
    if entry.get('size') is not None and size != entry['size']:
        raise CheckpointError(f'size mismatch for {name} ({path}): index says {entry["size"]} bytes, file has '
                              f'{size}. {fix}')
    digest = sha256_file(path)
    if digest != entry.get('sha256'):
        raise CheckpointError(f'sha256 mismatch for {name} ({path}): index says {entry.get("sha256")}, file has '
                              f'{digest}. {fix}')
    return path


_SHA256_HEX = re.compile(r'^[0-9a-f]{64}$')


def _announced_sha256(path: str) -> Optional[str]:
    """The sha256 the hub announced for a cached file: huggingface_hub names each blob by the file's ETag, which
    for an LFS file is its sha256 (``X-Linked-Etag``); ``None`` where the cache holds no such blob."""
    blob = Path(os.path.realpath(path))
    return blob.name if blob.parent.name == 'blobs' and _SHA256_HEX.match(blob.name) else None


def download_pinned(repo_id: str, filename: str = WEIGHTS_NAME, revision: Optional[str] = None,
                    name: str = '') -> str:
    """Fetch ``repo_id/filename`` with ``hf_hub_download`` and check it where no index gives its sha256.

    The file must have the sha256 the hub announced for it (:func:`_announced_sha256`), and the digest is pinned
    on first download in :func:`pins_path` (keyed by repository, file and revision): a later file, downloaded or
    cached, offline too, that does not match the pin is refused.
    """
    what = name or repo_id
    path = _fetch(repo_id, filename, revision, what)
    digest = sha256_file(path)
    announced = _announced_sha256(path)
    if announced is not None and digest != announced:
        raise CheckpointError(
            f'sha256 mismatch for {what} ({path}): the hub announced {announced} for {repo_id}/{filename}, the file '
            f'has {digest}. The cached copy is corrupted: delete it from the cache and download again.')
    key = f'{repo_id}/{filename}@{revision or "main"}'
    pins_file = pins_path()
    pins = json.loads(pins_file.read_text(encoding='utf-8')) if pins_file.is_file() else {}
    pin = pins.get(key)
    if pin is None:
        snapshot = Path(path).parent
        pins[key] = dict(sha256=digest, size=os.path.getsize(path),
                         commit=snapshot.name if snapshot.parent.name == 'snapshots' else None,
                         verified_against='hub sha256' if announced else 'none (first download)')
        write_json(pins_file, pins)
        _logger.info('%s: pinned %s (sha256 %s) in %s', what, key, digest, pins_file)
    elif pin.get('sha256') != digest:
        raise CheckpointError(
            f'sha256 mismatch for {what}: {repo_id}/{filename} ({path}) has sha256 {digest}, but {pin.get("sha256")} '
            f'was pinned on its first download (in {pins_file}). The hub file changed, or the cached copy was '
            f'altered: if you trust the new file, delete the entry {key!r} from {pins_file}.')
    return path


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


# --- what a checkpoint says of itself ------------------------------------------------------------------------------

# the pretrained-cfg fields a checkpoint brings with it: the preprocessing its weights were trained or evaluated
# with, its class count and its labels
CARRIED_FIELDS = ('num_classes', 'input_size', 'test_input_size', 'interpolation', 'crop_pct', 'test_crop_pct',
                  'crop_mode', 'mean', 'std', 'label_names', 'label_descriptions')


def weights_path(path) -> Path:
    """``path``, or the weights inside it where ``path`` is a published folder (``config.json`` and
    ``model.safetensors``: timm's ``local-dir:`` names the folder); any other folder is refused as one."""
    path = Path(path)
    inside = path / WEIGHTS_NAME
    return inside if path.is_dir() and (path / CONFIG_NAME).is_file() and inside.is_file() else path


def _same_architecture(named: Any, architecture: Optional[str]) -> bool:
    """``named`` (a model name a checkpoint records, perhaps with a tag) is ``architecture``, or says nothing."""
    return not named or not architecture or str(named).partition('.')[0] == architecture.partition('.')[0]


def _cfg_from_args(args: Mapping[str, Any], input_size: Sequence[int]) -> Dict[str, Any]:
    """The preprocessing options of a training run (timm's ``train.py`` / ``dynzoo train`` names) that were set,
    as pretrained-cfg fields; an option left unset followed the model's default cfg, which stays."""
    cfg: Dict[str, Any] = {}
    if isinstance(args.get('num_classes'), int):
        cfg['num_classes'] = args['num_classes']
    chans, height, width = input_size
    size = args.get('input_size') or args.get('img_size')  # timm: (C, H, W) or H; dynzoo train: H
    if isinstance(size, (list, tuple)) and len(size) == 3:
        chans, height, width = size
    elif isinstance(size, int):
        height = width = size
    chans = args.get('in_chans') or chans
    if (chans, height, width) != tuple(input_size):
        cfg['input_size'] = (int(chans), int(height), int(width))
    for key in ('interpolation', 'crop_pct', 'crop_mode', 'mean', 'std'):
        value = args.get(key)
        if value not in (None, '', [], ()):
            cfg[key] = tuple(value) if isinstance(value, list) else value
    return cfg


def _cfg_from_config_json(path: Path) -> Dict[str, Any]:
    """timm's ``config.json`` (``save_config_for_hf``): its ``pretrained_cfg`` with the top-level class count and
    labels, and the ``architecture`` it names."""
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{str(path)!r} beside the checkpoint is not a readable timm config ({e}); fix or '
                              'remove it') from e
    if not isinstance(config, dict):
        raise CheckpointError(f'{str(path)!r} beside the checkpoint is not a timm config (a JSON object)')
    cfg = dict(config.get('pretrained_cfg') or {})
    for key in ('num_classes', 'label_names', 'label_descriptions'):
        if key in config:
            cfg[key] = config[key]
    cfg['architecture'] = config.get('architecture') or cfg.get('architecture')
    return cfg


def checkpoint_cfg(
        checkpoint: Any,
        path: Optional[str] = None,
        architecture: Optional[str] = None,
        input_size: Sequence[int] = (3, 224, 224),
) -> Dict[str, Any]:
    """The pretrained-cfg fields (:data:`CARRIED_FIELDS`) that ``checkpoint``, read from ``path``, carries.

    Two sources, the later winning: the ``args`` of a training container (timm's ``CheckpointSaver`` saves them, for
    timm's ``train.py`` and ``dynzoo train``): the class count and the preprocessing options the run set, over the
    model's default cfg (whose ``input_size`` is given, for a run that set only the resolution or the channels);
    then timm's ``config.json`` beside the file (a folder written by ``dynzoo publish`` / ``dynzoo convert``). A
    source that names another architecture than ``architecture`` is ignored, and said in the log.
    """
    cfg: Dict[str, Any] = {}
    args = checkpoint.get('args') if isinstance(checkpoint, Mapping) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        if _same_architecture(args.get('model'), architecture):
            cfg.update(_cfg_from_args(args, input_size))
        else:
            _logger.info('%s: the checkpoint was trained as %r: its preprocessing options are not applied',
                         architecture, args.get('model'))
    config_path = weights_path(path).with_name(CONFIG_NAME) if path else None
    if config_path is not None and config_path.is_file():
        config = _cfg_from_config_json(config_path)
        if _same_architecture(config.get('architecture'), architecture):
            cfg.update({k: v for k, v in config.items() if k in CARRIED_FIELDS and v is not None})
        else:
            _logger.info('%s: %s describes %r: not applied', architecture, config_path, config.get('architecture'))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# --- does a state dict fit a model? --------------------------------------------------------------------------------

def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return 'floating-point'
    if dtype.is_complex:
        return 'complex'
    return 'bool' if dtype == torch.bool else 'integer'


def _non_finite(key: str, v: torch.Tensor, target: torch.dtype) -> Optional[str]:
    """``'key (2 NaN, 1 Inf)'`` when ``v`` -- converted to the model's ``target`` dtype where that is narrower,
    as ``load_state_dict`` will -- holds NaN or Inf; ``None`` when it is finite."""
    narrowed = _narrows(v.dtype, target)
    if narrowed:
        v = v.to(target)
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(v).sum())
    inf = int((~finite).sum()) - nan
    found = ', '.join(f'{n} {what}' for n, what in ((nan, 'NaN'), (inf, 'Inf')) if n)
    return f'{key} ({found} of {v.numel()} values{f" once converted to {target}" if narrowed else ""})'


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """Converting float ``src`` to float ``dst`` loses range or precision (float64 -> float32, float32 -> bfloat16)."""
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.max < a.max or b.eps > a.eps


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Tensor],
        name: str,
        may_be_missing: Collection[str] = (),
        adapted: Collection[str] = (),
) -> None:
    """Refuse ``state_dict`` unless it fits ``expected`` (the model's own state dict) in full, before any loading.

    Checked, each failure a :class:`CheckpointError` naming the keys, what the model expects and what was found:
    missing / unexpected keys (``may_be_missing`` excepted: a classifier the caller dropped), shapes (``adapted``
    excepted: a first conv that timm adapts to ``in_chans``), dtypes (an integer or bool tensor where the model
    holds a float), temperature buffers (keys ending in ``temperature``: finite and > 0, or the softmax / sigmoid
    they divide is NaN or saturated), and non-finite values in any float tensor. A float dtype conversion
    (float16 / float64 -> the model's float32, say) is exact or rounds: it is said once, in the log (a warning
    where it rounds), and values that overflow the model's dtype count as non-finite.
    """
    missing = sorted(set(expected) - set(state_dict) - set(may_be_missing))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f'checkpoint does not match {name}: {len(missing)} missing key(s) {missing[:8]}, '
            f'{len(unexpected)} unexpected key(s) {unexpected[:8]}. Is it another architecture\'s checkpoint, '
            f'or a reparameterized one (load those with timm.create_model({name!r}, inference_mode=True))?')
    keys = [k for k in expected if k in state_dict]
    mismatched = [f'{k}: expected {tuple(expected[k].shape)}, found {tuple(state_dict[k].shape)}'
                  for k in keys if k not in adapted and state_dict[k].shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(
            f'checkpoint shapes do not match {name} ({len(mismatched)} tensors): {mismatched[:5]}. '
            'It was made for another architecture or configuration.')
    wrong_kind = [f'{k}: expected a {_kind(expected[k].dtype)} tensor ({expected[k].dtype}), found '
                  f'{state_dict[k].dtype}' for k in keys if _kind(state_dict[k].dtype) != _kind(expected[k].dtype)]
    if wrong_kind:
        raise CheckpointError(
            f'checkpoint dtypes do not match {name} ({len(wrong_kind)} tensors): {wrong_kind[:5]}. '
            'Casting would silently truncate or invent values: re-save the checkpoint from the trained model.')
    bad_temperature = [f'{k}: found {state_dict[k].flatten()[:4].tolist()}' for k in keys if k.endswith('temperature')
                       and not bool((torch.isfinite(state_dict[k]) & (state_dict[k] > 0)).all())]
    if bad_temperature:
        raise CheckpointError(
            f'checkpoint for {name} has invalid temperatures ({len(bad_temperature)} buffers): {bad_temperature[:5]}; '
            'a temperature must be finite and > 0. The checkpoint is corrupted, or was saved mid-way through a '
            'broken temperature schedule.')
    non_finite = [r for r in (_non_finite(k, state_dict[k], expected[k].dtype) for k in keys
                              if state_dict[k].is_floating_point()) if r is not None]
    if non_finite:
        raise CheckpointError(
            f'checkpoint for {name} holds non-finite values (NaN/Inf) in {len(non_finite)} tensor(s): '
            f'{non_finite[:5]}. The checkpoint is corrupted or its training diverged.')
    conversions = Counter((state_dict[k].dtype, expected[k].dtype) for k in keys
                          if state_dict[k].is_floating_point() and state_dict[k].dtype != expected[k].dtype)
    if conversions:  # a warning where the conversion rounds, else for information
        level = logging.WARNING if any(_narrows(src, dst) for src, dst in conversions) else logging.INFO
        _logger.log(level, 'checkpoint for %s: converting %s to the model\'s dtype', name, ', '.join(
            f'{n} tensor(s) from {src} to {dst}' for (src, dst), n in sorted(conversions.items(), key=str)))
