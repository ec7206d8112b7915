"""Every fold of the zoo's inference forms, in one place: conv + BatchNorm, BatchNorm into a kernel bank, affine
map into a conv.

A BatchNorm in inference is the per-channel affine map ``BN(y) = s * y + t`` with ``s = gamma / sqrt(var + eps)``
and ``t = beta - s * mu`` (Ioffe & Szegedy 2015, Alg. 1), computed here from the running statistics whatever the
module's mode, as timm's MobileOne / FastViT / RepVGG folds are. Since the map is per output channel it folds into
whatever produced those channels:

* a static conv: ``W' = s W``, ``b' = s b + t`` (:func:`fuse_conv_bn`);
* a dynamic conv's kernel bank ``W_k`` (``(K, C_out, ...)``) and per-kernel biases ``b_k``: every kernel and bias
  scales by ``s``, and the shift ``t`` is added after the (input-dependent) mixture (:func:`fold_bn_into_bank_`),
  since ``s * conv(x, sum_k a_k W_k) = conv(x, sum_k a_k (s W_k))`` for any mixing weights ``a``;
* a LayerScale (``gamma * y``) or any per-channel affine map into the conv before it (:func:`fold_affine_into_conv_`).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = [
    'bn_scale_shift', 'fuse_conv_bn', 'fold_affine_into_conv_', 'fold_bn_into_bank_', 'norm_act_remainder',
    'is_batchnorm',
]


def is_batchnorm(module: nn.Module) -> bool:
    """``True`` for any BatchNorm with running statistics (``nn.BatchNorm2d``, timm's ``BatchNormAct2d``, ...)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def bn_scale_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``BN(y) = s * y + t`` per channel, from the running statistics (any mode, affine or not)."""
    if not is_batchnorm(bn):
        raise TypeError(f'expected a BatchNorm layer, got {type(bn).__name__}')
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f'cannot fold {type(bn).__name__} without running statistics (track_running_stats=False)')
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


@torch.no_grad()
def fold_affine_into_conv_(conv: nn.Conv2d, scale: torch.Tensor, shift: Optional[torch.Tensor] = None) -> None:
    """``s * conv(x) + t`` into ``conv`` in place: ``W <- s W``, ``b <- s b + t`` (a bias is created if ``t`` is
    given and the conv has none)."""
    if scale.numel() != conv.out_channels or (shift is not None and shift.numel() != conv.out_channels):
        raise ValueError(f'a per-channel map of {scale.numel()} channels does not fit a conv with '
                         f'{conv.out_channels} outputs')
    dtype = conv.weight.dtype
    conv.weight.mul_(scale.to(dtype).reshape(-1, *([1] * (conv.weight.dim() - 1))))
    if conv.bias is not None:
        conv.bias.mul_(scale.to(dtype))
        if shift is not None:
            conv.bias.add_(shift.to(dtype))
    elif shift is not None:
        conv.bias = nn.Parameter(shift.to(dtype).detach().clone(), requires_grad=conv.weight.requires_grad)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (same geometry, device and dtype, with a bias) computing ``bn(conv(x))`` exactly."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f'BatchNorm has {bn.num_features} features, conv has {conv.out_channels} outputs')
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight)
    if conv.bias is not None:
        fused.bias.copy_(conv.bias)
    else:
        fused.bias.zero_()
    fold_affine_into_conv_(fused, *bn_scale_shift(bn))
    return fused.train(conv.training)


@torch.no_grad()
def fold_bn_into_bank_(
        bn: nn.Module,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        static_weight: Optional[torch.Tensor] = None,
        static_bias: Optional[torch.Tensor] = None,
        post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fold ``bn`` into a kernel bank in place and return the new post-mixture shift ``(C_out,)``.

    ``weight`` ``(K, C_out, ...)`` and ``bias`` ``(K, C_out)`` are the bank, ``static_weight`` ``(C_out, ...)`` /
    ``static_bias`` ``(C_out,)`` an input-agnostic kernel added to the mixture, ``post_bias`` ``(C_out,)`` a shift
    already folded in (it is scaled too). All scale by ``s``; the returned shift is ``s * post_bias + t``.
    """
    scale, shift = bn_scale_shift(bn)
    c_out = weight.shape[1]
    if scale.numel() != c_out:
        raise ValueError(f'BatchNorm has {scale.numel()} features, kernel bank has {c_out} outputs')
    s = scale.to(weight.dtype)
    weight.mul_(s.reshape(1, -1, *([1] * (weight.dim() - 2))))
    if bias is not None:
        bias.mul_(s.reshape(1, -1))
    if static_weight is not None:
        static_weight.mul_(s.reshape(-1, *([1] * (static_weight.dim() - 1))))
    if static_bias is not None:
        static_bias.mul_(s)
    out = shift.to(weight.dtype)
    if post_bias is not None:
        out = out + post_bias.to(weight.dtype) * s
    return out.detach().clone()


def norm_act_remainder(norm: nn.Module) -> nn.Module:
    """What stays of a norm layer once its affine part is folded: a ``BatchNormAct2d``'s dropout / activation,
    else ``nn.Identity``."""
    kept = [m for m in (getattr(norm, 'drop', None), getattr(norm, 'act', None))
            if m is not None and not isinstance(m, nn.Identity)]
    if not kept:
        return nn.Identity()
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)
