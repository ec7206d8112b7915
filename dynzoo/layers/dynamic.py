"""The dynamic-kernel core shared by every dynamic convolution of the zoo.

A dynamic convolution holds a bank of ``K`` kernels ``W_k`` (``(K, C_out, C_in/g, kh, kw)``) and an optional
per-kernel bias ``b_k`` (``(K, C_out)``). Per sample ``n`` its attention heads produce (any subset of)

* ``kernel_attn``  ``(B, K)``       -- mixing weights ``alpha_k`` of the kernel bank (softmax, sigmoid, ...),
* ``in_scale``     ``(B, C_in)``    -- input-channel attention, applied to the input (ODConv's trick),
* ``out_scale``    ``(B, C_out)``   -- output-channel (filter) attention, applied to the output,
* ``spatial_attn`` ``(B, kh*kw)``   -- kernel-tap attention (ODConv's spatial head), applied to the kernel,

and the layer computes, for each sample,

    y_n = out_scale_n * conv(in_scale_n * x_n,  W_static + sum_k alpha_nk (spatial_n * W_k),
                             b_static + sum_k alpha_nk b_k) + post_bias

(``W_static``/``b_static`` carry an input-agnostic kernel such as Dynamic Mobile-Former's; ``post_bias`` holds the
shift of a BatchNorm folded into the layer, see :meth:`DynamicConv2dBase.fuse_bn`).

Execution strategies, all exact (they agree to float rounding, tested):

* ``'grouped'``  aggregate one kernel per sample, fold the batch into the conv groups and run one ``conv2d``
  for the whole batch (FMDConv's Algorithm 1, ODConv, DynamicConv);
* ``'dense'``    run the ``K`` experts as one dense conv with ``K*C_out`` outputs and mix the outputs with
  ``alpha`` (no per-sample kernel is built; ``K`` times the FLOPs but dense-conv speed). Not available with a
  spatial attention, which mixes taps inside the kernel;
* ``'loop'``     one ``conv2d`` per sample with that sample's aggregated kernel: the reference, for tests;
* ``'auto'``     the dispatcher :func:`select_strategy` picks by shape, batch and grad mode.

Families (FMDConv, ODConv, DynamicConv, CondConv, A2D2C, DMF) differ only in their heads: a subclass of
:class:`DynamicConv2dBase` implements :meth:`DynamicConv2dBase.forward_attention`.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import to_2tuple

__all__ = [
    'STRATEGIES', 'aggregate_kernels', 'per_sample_conv2d', 'dynamic_conv2d', 'select_strategy',
    'DynamicConv2dBase', 'set_default_strategy', 'get_default_strategy',
]

STRATEGIES = ('auto', 'grouped', 'dense', 'loop')
_DEFAULT_STRATEGY = ['auto']


def set_default_strategy(strategy: str) -> None:
    """Override the strategy that layers built with ``strategy='auto'`` use (``'auto'`` restores dispatch)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown execution strategy {strategy!r}; expected one of {STRATEGIES}.")
    _DEFAULT_STRATEGY[0] = strategy


def get_default_strategy() -> str:
    return _DEFAULT_STRATEGY[0]


def _check_attn(t: Optional[torch.Tensor], name: str, batch: int, size: int) -> None:
    if t is not None and (t.dim() != 2 or t.shape[0] != batch or t.shape[1] != size):
        raise ValueError(f'{name} must have shape ({batch}, {size}), got {tuple(t.shape)}')


def aggregate_kernels(
        weight: torch.Tensor,
        kernel_attn: Optional[torch.Tensor],
        spatial_attn: Optional[torch.Tensor] = None,
        static_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample kernels ``W_n = W_static + sum_k alpha_nk (s_n * W_k)`` -> ``(B, C_out, C_in/g, kh, kw)``.

    ``weight`` is ``(K, C_out, C_in/g, kh, kw)``; ``kernel_attn`` ``(B, K)`` (``None`` requires ``K == 1``
    and means ``alpha = 1``); ``spatial_attn`` ``(B, kh*kw)`` scales the kernel taps.
    """
    num_k, c_out, c_in_g, kh, kw = weight.shape
    if kernel_attn is None:
        if num_k != 1:
            raise ValueError('kernel_attn is required when the kernel bank holds more than one kernel')
        batch = spatial_attn.shape[0] if spatial_attn is not None else 1
        agg = weight.reshape(1, -1).expand(batch, -1)
    else:
        batch = kernel_attn.shape[0]
        agg = torch.mm(kernel_attn.to(weight.dtype), weight.reshape(num_k, -1))
    agg = agg.reshape(batch, c_out * c_in_g, kh * kw)
    if spatial_attn is not None:
        agg = agg * spatial_attn.to(agg.dtype).unsqueeze(1)
    agg = agg.reshape(batch, c_out, c_in_g, kh, kw)
    if static_weight is not None:
        agg = agg + static_weight.unsqueeze(0)
    return agg


def per_sample_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        strategy: str = 'grouped',
) -> torch.Tensor:
    """Convolve each sample ``x[n]`` with its own kernel ``weight[n]`` (``(B, C_out, C_in/g, kh, kw)``).

    ``'grouped'`` folds the batch into the groups (one ``conv2d`` call); ``'loop'`` is the per-sample reference.
    """
    batch, c_in, h, w = x.shape
    c_out = weight.shape[1]
    if strategy == 'loop':
        outs: List[torch.Tensor] = []
        for n in range(batch):
            b_n: Optional[torch.Tensor] = None
            if bias is not None:
                b_n = bias[n]
            outs.append(F.conv2d(x[n:n + 1], weight[n], b_n, stride, padding, dilation, groups))
        return torch.cat(outs, 0)
    flat_bias: Optional[torch.Tensor] = None
    if bias is not None:
        flat_bias = bias.reshape(-1)
    y = F.conv2d(
        x.reshape(1, batch * c_in, h, w),
        weight.reshape((batch * c_out,) + weight.shape[2:]),
        flat_bias, stride, padding, dilation, groups * batch,
    )
    return y.reshape(batch, c_out, y.shape[-2], y.shape[-1])


def select_strategy(
        batch: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Tuple[int, int],
        groups: int,
        num_kernels: int,
        out_hw: Tuple[int, int],
        has_spatial: bool,
        training: bool,
) -> str:
    """Pick the fastest exact strategy for one layer call.

    Crossover points measured on 2 CPU threads (``docs/performance.md``, ``../shared/notes``): at batch 1 the
    aggregated kernel is a plain conv, so ``'grouped'`` always wins. For larger batches the per-sample kernels
    (``B * C_out * C_in/g * kh * kw`` values) dwarf the activations in the deep stages, where the dense-K form
    keeps dense-conv speed; it pays ``K`` times the FLOPs, so it only wins when the per-sample kernel is much
    larger than the output it produces (ratio measured: ~16 in eval, ~6 in training, for K = 4).
    """
    if has_spatial or batch == 1 or groups != 1:
        return 'grouped'
    kernel_elems = out_channels * in_channels * kernel_size[0] * kernel_size[1]
    out_elems = out_channels * out_hw[0] * out_hw[1]
    ratio = kernel_elems / max(1, out_elems)
    threshold = (6.0 if training else 16.0) * num_kernels / 4.0
    return 'dense' if ratio > threshold else 'grouped'


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def dynamic_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        kernel_attn: Optional[torch.Tensor],
        in_scale: Optional[torch.Tensor],
        out_scale: Optional[torch.Tensor],
        spatial_attn: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        strategy: str = 'auto',
        static_weight: Optional[torch.Tensor] = None,
        static_bias: Optional[torch.Tensor] = None,
        post_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact dynamic convolution of ``x`` ``(B, C_in, H, W)`` with a kernel bank; see the module docstring."""
    batch, c_in, h, w = x.shape
    num_k, c_out, c_in_g, kh, kw = weight.shape
    _check_attn(kernel_attn, 'kernel_attn', batch, num_k)
    _check_attn(in_scale, 'in_scale', batch, c_in)
    _check_attn(out_scale, 'out_scale', batch, c_out)
    _check_attn(spatial_attn, 'spatial_attn', batch, kh * kw)
    if strategy == 'auto':
        strategy = select_strategy(
            batch, c_in, c_out, (kh, kw), groups, num_k,
            (_out_size(h, kh, stride[0], padding[0], dilation[0]), _out_size(w, kw, stride[1], padding[1], dilation[1])),
            spatial_attn is not None, torch.is_grad_enabled() and weight.requires_grad,
        )
    if in_scale is not None:
        x = x * in_scale.to(x.dtype).reshape(batch, c_in, 1, 1)

    if strategy == 'dense' and spatial_attn is None:
        y = F.conv2d(x, weight.reshape((num_k * c_out,) + weight.shape[2:]), None, stride, padding, dilation, groups)
        y = y.reshape(batch, num_k, c_out, y.shape[-2], y.shape[-1])
        if kernel_attn is None:
            y = y.sum(1)
        else:
            attn = kernel_attn.to(y.dtype)
            y = torch.einsum('bk,bkchw->bchw', attn, y)
        if static_weight is not None:
            y = y + F.conv2d(x, static_weight, None, stride, padding, dilation, groups)
        agg_bias = _aggregate_bias(bias, kernel_attn, static_bias, batch)
        if agg_bias is not None:
            y = y + agg_bias.to(y.dtype).reshape(batch, c_out, 1, 1)
    else:
        if strategy not in ('grouped', 'loop', 'dense'):
            raise ValueError(f"Unknown execution strategy {strategy!r}; expected one of {STRATEGIES}.")
        if strategy == 'dense':  # spatial attention mixes kernel taps: only the aggregated forms apply
            strategy = 'grouped'
        agg_w = aggregate_kernels(weight, kernel_attn, spatial_attn, static_weight)
        if agg_w.shape[0] != batch:
            agg_w = agg_w.expand(batch, -1, -1, -1, -1)
        agg_bias = _aggregate_bias(bias, kernel_attn, static_bias, batch)
        y = per_sample_conv2d(x, agg_w.to(x.dtype), None if agg_bias is None else agg_bias.to(x.dtype),
                              stride, padding, dilation, groups, strategy)
    if out_scale is not None:
        y = y * out_scale.to(y.dtype).reshape(batch, c_out, 1, 1)
    if post_bias is not None:
        y = y + post_bias.to(y.dtype).reshape(1, c_out, 1, 1)
    return y


def _aggregate_bias(
        bias: Optional[torch.Tensor],
        kernel_attn: Optional[torch.Tensor],
        static_bias: Optional[torch.Tensor],
        batch: int,
) -> Optional[torch.Tensor]:
    out: Optional[torch.Tensor] = None
    if bias is not None:
        if kernel_attn is None:
            out = bias.sum(0, keepdim=True).expand(batch, -1)
        else:
            out = torch.mm(kernel_attn.to(bias.dtype), bias)
    if static_bias is not None:
        out = static_bias.unsqueeze(0).expand(batch, -1) if out is None else out + static_bias.unsqueeze(0)
    return out


class DynamicConv2dBase(nn.Module):
    """A kernel bank with ``nn.Conv2d`` geometry; subclasses add attention heads via :meth:`forward_attention`.

    Parameters: ``weight`` ``(K, C_out, C_in/groups, kh, kw)`` and, with ``bias=True``, ``bias`` ``(K, C_out)``.
    ``strategy`` selects the execution strategy (see the module docstring); ``'auto'`` dispatches per call.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = False,
            num_kernels: int = 4,
            strategy: str = 'auto',
            padding_mode: str = 'zeros',
            device=None,
            dtype=None,
    ):
        super().__init__()
        if padding_mode != 'zeros':
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only, got {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f'in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})')
        if num_kernels < 1:
            raise ValueError(f'num_kernels must be >= 1, got {num_kernels}')
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown execution strategy {strategy!r}; expected one of {STRATEGIES}.")
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_2tuple(kernel_size)
        self.stride = to_2tuple(stride)
        self.padding = to_2tuple(padding)
        self.dilation = to_2tuple(dilation)
        self.groups = groups
        self.num_kernels = num_kernels
        self.strategy = strategy
        self.weight = nn.Parameter(torch.empty(
            (num_kernels, out_channels, in_channels // groups) + self.kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **dd)) if bias else None
        # shift of a BatchNorm folded into this layer (see fuse_bn); None until then
        self.register_buffer('post_bias', None)
        self.reset_bank_parameters()

    def reset_bank_parameters(self) -> None:
        """ODConv/FMDConv init: each kernel ``kaiming_normal_(fan_out, relu)``, biases zero."""
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight.data[k], mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f'{type(self).__name__} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f'{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} '
                f'(input shape {tuple(x.shape)})')

    def forward_attention(self, x: torch.Tensor) -> Tuple[
            Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Return ``(kernel_attn (B,K), in_scale (B,C_in), out_scale (B,C_out), spatial_attn (B,kh*kw))``."""
        raise NotImplementedError

    def effective_strategy(self) -> str:
        return get_default_strategy() if self.strategy == 'auto' else self.strategy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        kernel_attn, in_scale, out_scale, spatial_attn = self.forward_attention(x)
        return dynamic_conv2d(
            x, self.weight, self.bias, kernel_attn, in_scale, out_scale, spatial_attn,
            self.stride, self.padding, self.dilation, self.groups, self.effective_strategy(),
            post_bias=self.post_bias,
        )

    @torch.no_grad()
    def fuse_bn(self, bn: nn.BatchNorm2d) -> None:
        """Fold a following eval-mode ``BatchNorm2d`` into the bank (exact: BN is a per-channel affine map).

        ``BN(o * (conv + b)) = o * (conv(x, s W) + s b) + (beta - s mu)`` with ``s = gamma / sqrt(var + eps)``:
        every kernel and kernel bias is scaled by ``s`` and the shift becomes ``post_bias``.
        """
        if bn.num_features != self.out_channels:
            raise ValueError(f'BatchNorm has {bn.num_features} features, layer has {self.out_channels} outputs')
        std = (bn.running_var + bn.eps).sqrt()
        scale = bn.weight / std if bn.affine else 1.0 / std
        shift = -bn.running_mean * scale
        if bn.affine:
            shift = shift + bn.bias
        self.weight.mul_(scale.reshape(1, -1, 1, 1, 1))
        if self.bias is not None:
            self.bias.mul_(scale.reshape(1, -1))
        if self.post_bias is not None:
            shift = shift + self.post_bias * scale
        self.post_bias = shift.detach().clone()

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
             f'num_kernels={self.num_kernels}')
        if self.padding != (0, 0):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.strategy != 'auto':
            s += f', strategy={self.strategy!r}'
        return s
