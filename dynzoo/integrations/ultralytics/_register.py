"""Hooks that make dynzoo's SGDM an Ultralytics layer, through Ultralytics' public module attributes.

Ultralytics' ``parse_model`` resolves a YAML module name in the globals of ``ultralytics.nn.tasks`` and treats a
class it does not know as channel-preserving (``c2 = ch[f]``), passing the row's arguments unchanged. SGDM is
channel-preserving (Xing et al., §3.4), so :func:`register` only has to

* bind ``ultralytics.nn.tasks.SGDM`` to :class:`dynzoo.layers.SGDM`;
* scale an SGDM row's channel argument by the model's width like every Ultralytics layer's (the YAML gives the
  base width, e.g. ``[15, 1, SGDM, [256]]`` is ``SGDM(64)`` at scale n), by wrapping ``tasks.parse_model``;
* resolve ``<host>-sgdm.yaml`` / ``<host>-sgdm-inline.yaml`` (wrapping ``tasks.check_yaml``, which
  ``yaml_model_load`` uses) to the config :func:`sgdm_model_cfg` derives from the installed ``<host>.yaml``,
  written to :func:`cfg_cache_dir` (Ultralytics resolves model configs to files);
* fold every SGDM before Ultralytics' own ``BaseModel.fuse()`` (which only knows Ultralytics' classes).

Nothing of Ultralytics' installed files is changed; :func:`register` is idempotent.
"""
import copy
import functools
import math
import os
from pathlib import Path
from typing import Dict

import torch.nn as nn
from timm.models import reparameterize_model
from ultralytics.nn import tasks
from ultralytics.utils import USER_CONFIG_DIR, YAML
from ultralytics.utils.ops import make_divisible

from dynzoo.layers.sgdm import SGDM

from ._model_cfg import channel_argument, parse_sgdm_cfg_name, sgdm_model_cfg

__all__ = ['cfg_cache_dir', 'fuse_sgdm', 'register']

_ORIGINALS: Dict[str, object] = {}


def cfg_cache_dir() -> Path:
    """Where the derived SGDM model YAMLs are written: ``dynzoo-cfg`` in Ultralytics' settings folder
    (``YOLO_CONFIG_DIR`` when set)."""
    return Path(USER_CONFIG_DIR) / 'dynzoo-cfg'


def _write_sgdm_cfg(name: str, base: str, placement: str) -> str:
    """:func:`sgdm_model_cfg` of ``base`` written to :func:`cfg_cache_dir` as ``name``; returns the path."""
    path = cfg_cache_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f'.{path.name}.{os.getpid()}')
    YAML.save(partial, sgdm_model_cfg(base, placement))
    os.replace(partial, path)  # atomic: concurrent loaders never read a partial file
    return str(path)


def fuse_sgdm(model: nn.Module) -> int:
    """Reparameterize every :class:`~dynzoo.layers.SGDM` below ``model`` in place; returns how many.

    Each SGDM folds itself first (its guide from the raw strip kernels), then timm's walker folds its children,
    the order ``timm.utils.reparameterize_model`` uses for a whole model. Idempotent.
    """
    modules = [m for m in model.modules() if isinstance(m, SGDM)]
    for m in modules:
        m.reparameterize()
        reparameterize_model(m, inplace=True)
    return len(modules)


def _width(d: dict):
    """The model's (width multiple, max channels), chosen from the YAML's ``scales`` as ``parse_model`` does."""
    scales = d.get('scales')
    if scales:
        _, width, max_channels = scales[d.get('scale') or next(iter(scales))]
        return width, max_channels
    return d.get('width_multiple', 1.0), math.inf


def _scale_sgdm_rows(d: dict) -> dict:
    """A copy of the model dict with every SGDM row's channel argument scaled to the model's width."""
    d = copy.deepcopy(d)
    width, max_channels = _width(d)
    for row in d.get('backbone', []) + d.get('head', []):
        if row[2] == 'SGDM':
            row[3] = [make_divisible(min(channel_argument(row), max_channels) * width, 8), *row[3][1:]]
    return d


def _wrap(name: str, owner, wrapper_factory):
    if name in _ORIGINALS:
        return
    original = getattr(owner, name)
    _ORIGINALS[name] = original
    setattr(owner, name, functools.wraps(original)(wrapper_factory(original)))


def register() -> None:
    """Make ``SGDM`` and the derived ``<host>-sgdm[-inline].yaml`` names usable by Ultralytics (idempotent)."""
    tasks.SGDM = SGDM

    def parse_model(original):
        return lambda d, *args, **kwargs: original(_scale_sgdm_rows(d), *args, **kwargs)

    def check_yaml(original):
        def resolve(file, *args, **kwargs):
            derived = parse_sgdm_cfg_name(file)
            if derived is not None and not os.path.exists(str(file)):
                return _write_sgdm_cfg(Path(str(file)).name, *derived)
            return original(file, *args, **kwargs)
        return resolve

    def fuse(original):
        def fuse_with_sgdm(self, *args, **kwargs):
            fuse_sgdm(self)
            return original(self, *args, **kwargs)
        return fuse_with_sgdm

    _wrap('parse_model', tasks, parse_model)
    _wrap('check_yaml', tasks, check_yaml)
    _wrap('fuse', tasks.BaseModel, fuse)
