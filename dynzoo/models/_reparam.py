"""Whole-model reparameterization: turn any eval-mode dynzoo model into its exact inference form.

:func:`reparameterize` walks the module tree in timm's order (``timm.models.reparameterize_model``: a module
first, then its children; ``fuse()`` replaces a module, else ``reparameterize()`` / ``switch_to_deploy()`` run
in place) with two differences: the root model is visited too (the hosts fold their stem and head there), and the
result is marked and guarded (see below). Every module implements its own inference form (MobileOne / FastViT
style); this walker only orders the calls. What the modules of the zoo do:

* the ResNet / MobileNetV2 hosts (:mod:`dynzoo.models._hosts`) fold each BatchNorm that follows a conv
  into it -- a dynamic conv through its ``fuse_bn`` (BN is a per-output-channel affine map, so
  ``BN(o * conv(x, sum_k a_k W_k)) = o * conv(x, sum_k a_k s W_k) + t``), a static ``nn.Conv2d`` by the usual
  ``W' = s W``, ``b' = s (b - mu) + beta`` -- and drop the BN (a ``BatchNormAct2d`` leaves its activation);
* the ODConv trunk shared by FMDConv and ODConv (:class:`~dynzoo.layers.heads.ODConvAttention`) folds its
  ``fc -> bn`` pair here (:data:`STATIC_FOLDS`);
* each family's own modules (DMF's dynamic residual conv, SGDM's strip kernels and guide, AttNet's ATConv, ...)
  implement ``reparameterize()`` in their layer files.

The same walk is reachable through timm: ``timm.utils.reparameterize_model(model)`` visits every module below the
root, so it gives the same inference form except the root-level folds (the hosts' stem/head BatchNorms) and the
guards; both forms are exact.

Edges (each works exactly or raises an error that says what to do):

* a model in training mode is refused (the fold uses the BN running statistics): call ``model.eval()`` first;
* reparameterizing twice is a no-op (the model is marked with the persistent buffer ``dynzoo_reparameterized``);
* ``model.train()`` on a reparameterized model raises (its BatchNorms are gone, some tensors are precomputed):
  train the training form and reparameterize again; ``model.eval()`` / ``model.train(False)`` work;
* ``load_state_dict`` of a training-form checkpoint into a reparameterized model raises (the marker key is
  missing), even with ``strict=False``: load it into the training form, then reparameterize;
* a reparameterized ``state_dict`` loads exactly into ``reparameterize(create_model(name).eval())``; loading it
  into a training-form model fails timm's/torch's strict check on the marker key (and dynzoo's hub loader names
  the cause).
"""
import copy
import functools
import inspect
import warnings
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn

from timm.layers import BatchNormAct2d

from dynzoo.layers.heads import ODConvAttention

__all__ = [
    'reparameterize', 'is_reparameterized', 'fold_batchnorm', 'fold_conv_bn_', 'STATIC_FOLDS', 'MARKER',
]

MARKER = 'dynzoo_reparameterized'

# modules whose static conv -> BatchNorm pairs the walker folds (they have no reparameterize() of their own)
STATIC_FOLDS: Dict[Type[nn.Module], Tuple[Tuple[str, str], ...]] = {
    ODConvAttention: (('fc', 'bn'),),
}


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``BN(y) = scale * y + shift`` per channel (eval statistics)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError('cannot fold a BatchNorm without running statistics (track_running_stats=False)')
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the static ``conv`` before it, in place (the conv gains a bias)."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f'BatchNorm has {bn.num_features} features, conv has {conv.out_channels} outputs')
    scale, shift = _bn_affine(bn)
    scale = scale.to(conv.weight.dtype)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = shift.to(conv.weight.dtype)
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)


def _activation_after(bn: nn.Module) -> nn.Module:
    """What stays of a folded norm layer: a ``BatchNormAct2d``'s dropout/activation, else nothing."""
    kept = [m for m in (getattr(bn, 'drop', None), getattr(bn, 'act', None))
            if m is not None and not isinstance(m, nn.Identity)]
    if not kept:
        return nn.Identity()
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


@torch.no_grad()
def fold_batchnorm(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    """Fold ``parent.<bn_name>`` into ``parent.<conv_name>`` and drop it; ``True`` if folded.

    A plain ``nn.Conv2d`` folds statically; any conv with a ``fuse_bn(bn)`` method (every
    :class:`~dynzoo.layers.dynamic.DynamicConv2dBase`) folds through it. The BatchNorm is replaced by
    ``nn.Identity`` (``BatchNormAct2d``: by its activation). Nothing happens, and ``False`` is returned, when the
    norm is not a plain ``BatchNorm2d`` / ``BatchNormAct2d`` (already folded, or another norm) or the conv cannot
    take it; a conv whose ``fuse_bn`` refuses (e.g. A2D2C with a zero BN gamma) keeps its BatchNorm, with a warning.
    """
    conv = getattr(parent, conv_name, None)
    bn = getattr(parent, bn_name, None)
    if conv is None or type(bn) not in (nn.BatchNorm2d, BatchNormAct2d):
        return False
    if bn.training:
        raise RuntimeError(f'{bn_name} is in training mode: call model.eval() before folding BatchNorms')
    if type(conv) is nn.Conv2d:
        fold_conv_bn_(conv, bn)
    elif callable(getattr(conv, 'fuse_bn', None)):
        try:
            conv.fuse_bn(bn)
        except ValueError as e:
            warnings.warn(f'{type(parent).__name__}.{bn_name} left unfolded: {e}')
            return False
    else:
        return False
    setattr(parent, bn_name, _activation_after(bn))
    return True


def fold_sequential_batchnorms(seq: nn.Module) -> int:
    """Fold every ``(conv, BatchNorm)`` neighbour pair of an ``nn.Sequential`` (e.g. a ResNet downsample)."""
    if not isinstance(seq, nn.Sequential):
        return 0
    names = [n for n, _ in seq.named_children()]
    return sum(fold_batchnorm(seq, a, b) for a, b in zip(names[:-1], names[1:]))


def is_reparameterized(model: nn.Module) -> bool:
    """``True`` for a model returned by :func:`reparameterize` (it carries the ``dynzoo_reparameterized`` buffer)."""
    return MARKER in model._buffers


def _method(module: nn.Module, name: str):
    fn = getattr(module, name, None)
    return fn if inspect.ismethod(fn) else None


def _reparameterize_tree(module: nn.Module) -> nn.Module:
    """timm's walk (``fuse()`` > ``reparameterize()`` > ``switch_to_deploy()``, parent before children), root included."""
    fuse = _method(module, 'fuse')
    if fuse is not None:
        module = fuse()
    else:
        for name in ('reparameterize', 'switch_to_deploy'):
            fn = _method(module, name)
            if fn is not None:
                fn()
                break
        else:
            for conv_name, bn_name in STATIC_FOLDS.get(type(module), ()):
                fold_batchnorm(module, conv_name, bn_name)
    for name, child in list(module.named_children()):
        new = _reparameterize_tree(child)
        if new is not child:
            setattr(module, name, new)
    return module


_TRAIN_ERROR = (
    '{cls} was reparameterized for inference by dynzoo.reparameterize(): its BatchNorms are folded and '
    'input-independent tensors precomputed, so it cannot be trained. Train the training form (e.g. '
    'timm.create_model(name) + its training checkpoint) and call dynzoo.reparameterize(model.eval()) again.')


def _train_inference_only(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train`` of a reparameterized model: ``train(False)`` / ``eval()`` work, ``train(True)`` raises."""
    if mode:
        raise RuntimeError(_TRAIN_ERROR.format(cls=type(model).__name__))
    return nn.Module.train(model, False)


def _refuse_training_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                unexpected_keys, error_msgs) -> None:
    if prefix + MARKER not in state_dict:
        raise RuntimeError(
            f'{type(module).__name__} is reparameterized (inference form) but this state_dict is not (it has no '
            f'{prefix + MARKER!r} key): it is a training-form checkpoint. Load it into the training-form model '
            '(before reparameterizing), then call dynzoo.reparameterize(model.eval()).')


def _mark(model: nn.Module) -> None:
    model.register_buffer(MARKER, torch.ones((), dtype=torch.bool, device=_device_of(model)))
    model.train = functools.partial(_train_inference_only, model)
    model.register_load_state_dict_pre_hook(_refuse_training_checkpoint)


def _device_of(model: nn.Module):
    for t in model.parameters():
        return t.device
    return None


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the exact inference form of an eval-mode dynzoo (or any timm) model.

    Args:
        model: the model, in eval mode (``model.eval()``).
        inplace: convert ``model`` itself; by default a deep copy is converted (as ``timm.utils.reparameterize_model``).

    Eval outputs before and after agree to float rounding. The result is inference-only (see the module
    docstring): ``train()`` and loading training-form checkpoints raise; calling this again is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'reparameterize expects an nn.Module, got {type(model).__name__}')
    in_training = [name or '<root>' for name, m in model.named_modules() if m.training]
    if in_training:
        raise RuntimeError(
            f'reparameterize needs a model in eval mode, but {len(in_training)} module(s) are in training mode '
            f'(e.g. {in_training[0]}): call model.eval() first (the folds use the BatchNorm running statistics).')
    if is_reparameterized(model):
        return model if inplace else copy.deepcopy(model)
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        model = _reparameterize_tree(model)
    model.eval()
    _mark(model)
    return model
