"""The dynamic-kernel core shared by every dynamic convolution of the zoo.

A dynamic convolution holds a bank of ``K`` kernels ``W_k`` (``(K, C_out, C_in/g, kh, kw)``) and an optional
per-kernel bias ``b_k`` (``(K, C_out)``). Per sample ``n`` its attention heads produce (any subset of) the fields of
:class:`DynamicAttention`:

* ``kernel``     ``(B, K)``       -- mixing weights ``alpha_k`` of the kernel bank (softmax, sigmoid, ...),
* ``in_scale``   ``(B, C_in)``    -- input-channel attention, applied to the input (ODConv's trick),
* ``out_scale``  ``(B, C_out)``   -- output-channel (filter) attention, applied to the output,
* ``spatial``    ``(B, kh*kw)``   -- kernel-tap attention (ODConv's spatial head), applied to the kernel,

and the layer computes, for each sample,

    y_n = out_scale_n * conv(in_scale_n * x_n,  W_static + sum_k alpha_nk (spatial_n * W_k),
                             b_static + sum_k alpha_nk b_k) + post_bias

(``W_static``/``b_static`` carry an input-agnostic kernel such as Dynamic Mobile-Former's, Eq. 2; ``post_bias``
holds the shift of a BatchNorm folded into the layer, see :meth:`DynamicConv2dBase.fuse_bn`).

Execution strategies, all exact (they agree to float rounding, tested in ``tests/test_dispatch.py``):

* ``'grouped'``  aggregate one kernel per sample, fold the batch into the conv groups and run one ``conv2d``
  for the whole batch (FMDConv's Algorithm 1, ODConv, DynamicConv);
* ``'tiled'``    the same math, but the per-sample kernels are aggregated in cache-sized tiles (a block of output
  channels x a chunk of samples, :func:`tile_plan`) and each tile is consumed by its grouped conv right away. The
  full ``(B, C_out, C_in/g, kh, kw)`` tensor is never built: in deep layers it is far larger than the
  activations (300 MB at 512->512, 7x7, batch 32), and on a VM a fresh allocation of that size costs more in page
  faults than the convolution itself (``docs/performance.md``). Where a sample's kernel is smaller than its
  activations, the input- and output-channel attentions scale the tile's kernels instead of the activations
  (:func:`scale_kernels`);
* ``'dense'``    run the ``K`` experts as one dense conv with ``K*C_out`` outputs (:func:`expert_responses`) and
  mix the outputs with ``alpha`` (no per-sample kernel is built; ``K`` times the FLOPs but dense-conv speed;
  A2D2C+'s Eq. 8). Not available with a spatial attention, which mixes taps inside the kernel (falls back to
  ``'grouped'``);
* ``'bmm'``      pointwise (1x1, groups 1, no padding) layers as one batched matmul ``(B, C_out, C_in) @
  (B, C_in, H*W)`` (other geometries fall back to ``'grouped'``);
* ``'gemm'``     im2col and one batched matmul per call, no batch-dependent conv groups: the form a traced or
  exported graph runs (:mod:`dynzoo.layers.per_sample`);
* ``'loop'``     one ``conv2d`` per sample with that sample's aggregated kernel: the reference, for tests;
* ``'auto'``     the dispatcher :func:`select_strategy` picks by shape, batch and grad mode from crossover points
  measured on a 2-core CPU (``docs/performance.md``); ``strategy=`` per layer or :func:`set_default_strategy`
  overrides it.

While a graph is traced or exported (``torch.jit.trace``, ONNX, ``torch.export``) every per-sample form
(``'grouped'``, ``'tiled'``, ``'loop'``) runs as ``'gemm'``, whose graph does not depend on the batch size: a graph
traced at one batch size runs at any other. Under ``torch.compile`` a call that needs no gradient is one op opaque
to Dynamo, ``torch.ops.dynzoo.dynamic_conv2d_inference``, which runs the eager forms (the dispatcher's choice) on
whatever batch it gets; a call that needs gradients traces the batch-agnostic forms (depthwise layers as
``'shift'``, others as ``'gemm'``; :mod:`dynzoo.layers.per_sample`). Either way ``torch.compile(model,
dynamic=True)`` adds no graph per batch size. An empty batch ``(0, C_in, H, W)`` gives the
empty output ``(0, C_out, H', W')`` in every strategy (the per-sample forms run it as ``'gemm'``), as ``nn.Conv2d``
does.

Families (FMDConv, ODConv, DynamicConv, CondConv, A2D2C, DMF, SGDM) differ only in their heads: a subclass of
:class:`DynamicConv2dBase` implements :meth:`DynamicConv2dBase.forward_attention` (and, for SGDM's guide,
:meth:`DynamicConv2dBase.transform_bank`).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import to_2tuple

from .fusion import fold_bn_into_bank_
from .per_sample import (
    conv_output_size, is_compiled_inference, is_compiling, is_exporting, is_pointwise, per_sample_conv2d,
)

__all__ = [
    'STRATEGIES', 'DynamicAttention', 'DynamicConv2dBase', 'aggregate_kernels', 'scale_kernels', 'expert_responses',
    'dynamic_conv2d', 'tiled_dynamic_conv2d', 'select_strategy', 'set_default_strategy', 'get_default_strategy',
    'resolve_strategy',
    'tile_plan', 'tile_config', 'TILE_BYTES', 'TRAIN_TILE_BYTES', 'THREAD_TILE_BYTES', 'THREAD_TILE_SAMPLES',
    'DENSE_TRAIN_RATIO', 'per_sample_conv2d', 'conv_output_size', 'is_exporting',
]

STRATEGIES = ('auto', 'grouped', 'tiled', 'dense', 'bmm', 'gemm', 'loop')
_DEFAULT_STRATEGY = ['auto']
# bytes of aggregated kernel per tile of the 'tiled' strategy: the per-core L2 of the machine it was tuned on.
# Eager code reads this module attribute at call time (so it can be tuned); TorchScript uses the default.
TILE_BYTES = 2 * 1024 * 1024
# the same in training, where autograd overhead per tile favours fewer, larger tiles (measured, docs/performance.md)
TRAIN_TILE_BYTES = 8 * 1024 * 1024
# eval with several threads: tiles of this many bytes and at least this many samples per thread, so that each
# tile's grouped conv has a group per sample to spread over the threads (2 threads: 8 MiB, 8 samples; measured
# 11-25 % faster whole-network eval at batch 32 than the one-thread plan, docs/performance.md)
THREAD_TILE_BYTES = 4 * 1024 * 1024
THREAD_TILE_SAMPLES = 4
# training uses 'dense' where one output channel's kernel is this many times its output map (see select_strategy;
# the default of its ``dense_train_ratio`` argument, a literal there so that TorchScript compiles it)
DENSE_TRAIN_RATIO = 64


def set_default_strategy(strategy: str) -> None:
    """Override the strategy that layers built with ``strategy='auto'`` use (``'auto'`` restores dispatch)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown execution strategy {strategy!r}; expected one of {STRATEGIES}.")
    _DEFAULT_STRATEGY[0] = strategy


def get_default_strategy() -> str:
    return _DEFAULT_STRATEGY[0]


def resolve_strategy(strategy: str) -> str:
    """A layer's ``strategy`` with ``'auto'`` replaced by the module default (:func:`set_default_strategy`); scripted
    code keeps ``'auto'`` (the module default is Python state) and dispatches per call."""
    if strategy != 'auto' or torch.jit.is_scripting():
        return strategy
    else:
        return get_default_strategy()


def _check_attn(t: Optional[torch.Tensor], name: str, batch: int, size: int) -> None:
    if t is not None and (t.dim() != 2 or t.shape[0] != batch or t.shape[1] != size):
        raise ValueError(f'{name} must have shape ({batch}, {size}), got {t.shape}')


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
            raise ValueError(f'kernel_attn (B, {num_k}) is required for a bank of {num_k} kernels, got None')
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


def scale_kernels(
        kernels: torch.Tensor,
        in_scale: Optional[torch.Tensor],
        out_scale: Optional[torch.Tensor],
        groups: int,
) -> torch.Tensor:
    """Per-sample kernels ``(B, C_out, C_in/g, kh, kw)`` with the input- and output-channel attentions folded in.

    ``out_scale * conv(in_scale * x, W) = conv(x, W')`` with ``W'[o, i] = out_scale[o] * W[o, i] * in_scale[c(o, i)]``,
    ``c(o, i)`` the input channel that kernel entry ``(o, i)`` of conv group ``o // (C_out/g)`` reads (ODConv's Eq. 4
    and FMDConv's Eq. 5 scale the kernel's input and output channels; which side carries them is free by linearity).
    """
    batch, c_out, c_in_g, kh, kw = kernels.shape
    if out_scale is not None:
        kernels = kernels * out_scale.to(kernels.dtype).reshape(batch, c_out, 1, 1, 1)
    if in_scale is not None:
        kernels = kernels.reshape(batch, groups, c_out // groups, c_in_g, kh * kw) * \
            in_scale.to(kernels.dtype).reshape(batch, groups, 1, c_in_g, 1)
        kernels = kernels.reshape(batch, c_out, c_in_g, kh, kw)
    return kernels


def tile_plan(
        batch: int,
        out_channels: int,
        groups: int,
        kernel_row_elems: int,
        elem_size: int = 4,
        budget: int = 2 * 1024 * 1024,
        min_samples: int = 1,
) -> Tuple[int, int]:
    """``(rows, samples)`` of one tile of the ``'tiled'`` strategy: the aggregated kernels of ``samples`` samples
    for ``rows`` output channels take at most ``budget`` bytes (at least one sample and one group's outputs).

    ``kernel_row_elems`` is ``C_in/g * kh * kw`` (one output channel's kernel); ``budget`` defaults to
    :data:`TILE_BYTES`'s default. With ``min_samples == 1`` rows come first (as many output channels as fit, then
    as many samples); with ``min_samples > 1`` the tile is sized for ``min(batch, min_samples)`` samples first and
    its rows are a multiple of 8 (the multi-thread plan, :func:`tile_config`). With ``groups > 1``, ``rows`` is a
    multiple of the outputs per group, so a tile covers whole conv groups. An empty batch (``batch == 0``) is
    planned as one sample.
    """
    per_row = max(1, kernel_row_elems * elem_size)
    step = 1 if groups == 1 else out_channels // groups  # a tile never splits a conv group
    first = max(1, min(batch, min_samples))  # the samples the tile is sized for (one for an empty batch)
    samples_first = budget // (first * per_row) // 8 * 8  # 0 when under 8 rows would fit
    if out_channels * per_row * first <= budget:
        rows = out_channels
    elif min_samples > 1 and samples_first // step * step >= 8:
        rows = samples_first // step * step
    else:  # rows first (also the fallback when the samples-first tile would be under 8 rows)
        rows = max(step, (budget // per_row) // step * step)
    samples = max(1, min(batch, budget // (rows * per_row)))
    return rows, samples


def tiled_dynamic_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        kernel_attn: Optional[torch.Tensor],
        spatial_attn: Optional[torch.Tensor],
        static_weight: Optional[torch.Tensor],
        agg_bias: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        budget: int,
        min_samples: int = 1,
        in_scale: Optional[torch.Tensor] = None,
        out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``'tiled'`` strategy: per-sample kernels built tile by tile (:func:`tile_plan`), each tile consumed by
    :func:`per_sample_conv2d` at once. Output-channel tiles are the outer loop, so a tile of the bank is read from
    memory once and reused from cache by every sample chunk. ``in_scale`` ``(B, C_in)`` and ``out_scale``
    ``(B, C_out)``, when given, are folded into each tile's kernels (:func:`scale_kernels`) and ``out_scale`` into
    its bias, instead of scaling the input and the output."""
    batch = x.shape[0]
    num_k, c_out, c_in_g, kh, kw = weight.shape
    rows, samples = tile_plan(batch, c_out, groups, c_in_g * kh * kw, x.element_size(), budget, min_samples)
    out_per_group = c_out // groups
    pointwise = is_pointwise(kh, kw, padding, groups)
    inner = 'bmm' if pointwise else 'grouped'
    row_tiles: List[torch.Tensor] = []
    for r0 in range(0, c_out, rows):
        r1 = min(c_out, r0 + rows)
        g0 = 0 if groups == 1 else r0 // out_per_group
        g1 = 1 if groups == 1 else r1 // out_per_group
        # a strided view (no copy): each expert's rows r0:r1 are contiguous, and mm takes the expert stride
        w_t = weight if rows == c_out else weight[:, r0:r1]
        sw_t: Optional[torch.Tensor] = None
        if static_weight is not None:
            sw_t = static_weight if rows == c_out else static_weight[r0:r1]
        x_t = x if (g0 == 0 and g1 == groups) else x[:, g0 * c_in_g:g1 * c_in_g]
        chunks: List[torch.Tensor] = []
        for n0 in range(0, batch, samples):
            n1 = min(batch, n0 + samples)
            ka: Optional[torch.Tensor] = None
            if kernel_attn is not None:
                ka = kernel_attn[n0:n1]
            sa: Optional[torch.Tensor] = None
            if spatial_attn is not None:
                sa = spatial_attn[n0:n1]
            agg = aggregate_kernels(w_t, ka, sa, sw_t)
            if agg.shape[0] != n1 - n0:
                agg = agg.expand(n1 - n0, -1, -1, -1, -1)
            b_t: Optional[torch.Tensor] = None
            if agg_bias is not None:
                b_t = agg_bias[n0:n1, r0:r1].to(x.dtype)
            if in_scale is not None or out_scale is not None:
                is_t: Optional[torch.Tensor] = None
                if in_scale is not None:
                    is_t = in_scale[n0:n1, g0 * c_in_g:g1 * c_in_g]
                os_t: Optional[torch.Tensor] = None
                if out_scale is not None:
                    os_t = out_scale[n0:n1, r0:r1]
                    if b_t is not None:
                        b_t = b_t * os_t.to(b_t.dtype)
                agg = scale_kernels(agg, is_t, os_t, g1 - g0)
            chunks.append(per_sample_conv2d(
                x_t[n0:n1], agg.to(x.dtype), b_t, stride, padding, dilation, g1 - g0, inner))
        row_tiles.append(chunks[0] if len(chunks) == 1 else torch.cat(chunks, 0))
    return row_tiles[0] if len(row_tiles) == 1 else torch.cat(row_tiles, 1)


@torch.compiler.assume_constant_result
def _intra_op_threads() -> int:
    """``torch.get_num_threads()``, a constant to ``torch.compile`` (Dynamo cannot trace it; a compiled graph keeps
    the tile plan of the thread count it was compiled with, which changes its speed, never its result)."""
    return torch.get_num_threads()


def tile_config(training: bool, threads: Optional[int] = None) -> Tuple[int, int]:
    """``(budget bytes, min samples)`` of the ``'tiled'`` strategy's tiles for this call (see :func:`tile_plan`).

    Training: :data:`TRAIN_TILE_BYTES`, rows first. Eval on one thread: :data:`TILE_BYTES`, rows first. Eval on
    ``n > 1`` threads (default ``torch.get_num_threads()``): ``n *`` :data:`THREAD_TILE_BYTES` and at least
    ``n *`` :data:`THREAD_TILE_SAMPLES` samples per tile. Measured on 1 and 2 threads (``docs/performance.md``);
    larger thread counts extrapolate the per-thread sizes.
    """
    if training:
        return int(TRAIN_TILE_BYTES), 1
    n = _intra_op_threads() if threads is None else int(threads)
    if n <= 1:
        return int(TILE_BYTES), 1
    return int(THREAD_TILE_BYTES) * n, int(THREAD_TILE_SAMPLES) * n


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
        dense_train_ratio: int = 64,
) -> str:
    """Pick the fastest exact strategy for one layer call (a pure function of the layer's geometry and mode).

    Rules, from the crossover points measured on a shared 2-core CPU (``docs/performance.md``, 'Dispatcher'):

    1. ``num_kernels == 1`` without spatial attention: ``'dense'`` -- the bank is a single kernel, so the dense
       form is the static conv plus a per-sample scale, with no aggregation at all.
    2. training, no spatial attention, and a per-sample kernel at least ``dense_train_ratio`` (default
       :data:`DENSE_TRAIN_RATIO`, 64) times larger
       than the output it produces (``C_in/g*kh*kw / (H'*W')``; ResNet-18 stage 4 = 94, stage 3 = 11.8):
       ``'dense'``. Its time is on a par with ``'tiled'`` there (4.0x vs 3.9x the static conv, batch 32), but
       autograd keeps ``K`` outputs (12.8 MB at 512->512, 7x7, batch 32) instead of ``B`` per-sample kernels
       (300 MB).
    3. everything else: ``'tiled'``. When all per-sample kernels fit one tile it is exactly ``'grouped'`` (one
       grouped conv); in deep layers it is 1.7-3x faster than ``'grouped'`` and 1.6-2.7x faster than
       ``'dense'`` in eval (batch 32: 256->256 14x14 1.48x vs 2.45x / 3.98x the static conv; 512->512 7x7
       2.5x vs 7.5x / 4.3x). Pointwise layers run their tiles as batched matmuls.

    ``batch`` is kept in the signature for callers and future rules: no measured crossover depended on it beyond
    what the tile plan (:func:`tile_plan`) already adapts.
    """
    if num_kernels == 1 and not has_spatial:
        return 'dense'
    if training and not has_spatial:
        kernel_row = (in_channels // groups) * kernel_size[0] * kernel_size[1]
        if kernel_row >= dense_train_ratio * max(1, out_hw[0] * out_hw[1]):
            return 'dense'
    return 'tiled'


def expert_responses(
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
) -> torch.Tensor:
    """The ``K`` expert maps ``conv(x, W_k)`` as one conv with ``K*C_out`` outputs -> ``(B, K, C_out, H', W')``.

    With groups the bank is reordered group-major, so conv group ``j`` holds the ``K`` experts' filters of group
    ``j``'s output channels and sees that group's inputs only."""
    num_k, c_out, c_in_g, kh, kw = weight.shape
    dense_w = weight.reshape(num_k, groups, c_out // groups, c_in_g, kh, kw).transpose(0, 1)
    y = F.conv2d(x, dense_w.reshape(num_k * c_out, c_in_g, kh, kw).to(x.dtype), None, stride, padding, dilation,
                 groups)
    out_h, out_w = y.shape[-2], y.shape[-1]
    y = y.reshape(x.shape[0], groups, num_k, c_out // groups, out_h, out_w).transpose(1, 2)
    return y.reshape(x.shape[0], num_k, c_out, out_h, out_w)


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
        out_hw = (conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
                  conv_output_size(w, kw, stride[1], padding[1], dilation[1]))
        strategy = select_strategy(batch, c_in, c_out, (kh, kw), groups, num_k, out_hw, spatial_attn is not None,
                                   torch.is_grad_enabled() and weight.requires_grad)
    if not torch.jit.is_scripting():
        if is_compiled_inference([x, weight, bias, kernel_attn, in_scale, out_scale, spatial_attn, static_weight,
                                   static_bias]):
            # inference under torch.compile: the eager forms, one op opaque to Dynamo (no batch in its graph)
            return torch.ops.dynzoo.dynamic_conv2d_inference(
                x, weight, bias, kernel_attn, in_scale, out_scale, spatial_attn, static_weight, static_bias, post_bias,
                [stride[0], stride[1]], [padding[0], padding[1]], [dilation[0], dilation[1]], groups, strategy)
        # tiling loops and batch-folded conv groups would bake the batch size into a traced or compiled graph
        if (strategy == 'tiled' or strategy == 'grouped') and (is_exporting() or is_compiling()):
            strategy = 'gemm'
    if strategy == 'tiled' and batch == 0:  # no sample to tile: the empty (0, C_out, H', W') output
        strategy = 'gemm'
    if strategy not in ('grouped', 'tiled', 'dense', 'bmm', 'gemm', 'loop'):
        raise ValueError(
            "Unknown execution strategy '" + strategy + "'; expected auto, grouped, tiled, dense, bmm, gemm or loop.")
    fold_in = False
    fold_out = False
    if strategy == 'tiled':  # scale the kernels instead of the activations where the kernels are smaller
        kernel_elems = c_out * c_in_g * kh * kw
        out_elems = c_out * conv_output_size(h, kh, stride[0], padding[0], dilation[0]) * \
            conv_output_size(w, kw, stride[1], padding[1], dilation[1])
        fold_in = in_scale is not None and kernel_elems <= c_in * h * w
        fold_out = out_scale is not None and kernel_elems <= out_elems
    if in_scale is not None and not fold_in:
        x = x * in_scale.to(x.dtype).reshape(batch, c_in, 1, 1)
    agg_bias = _aggregate_bias(bias, kernel_attn, static_bias, batch)

    if strategy == 'dense' and spatial_attn is None:
        y = expert_responses(x, weight, stride, padding, dilation, groups)
        out_h, out_w = y.shape[-2], y.shape[-1]
        if kernel_attn is None:
            y = y.sum(1)
        else:  # (B, 1, K) @ (B, K, C_out*H'*W'): one batched GEMV mixes the experts' outputs
            y = torch.bmm(kernel_attn.to(y.dtype).unsqueeze(1), y.reshape(batch, num_k, c_out * out_h * out_w))
            y = y.reshape(batch, c_out, out_h, out_w)
        if static_weight is not None:
            y = y + F.conv2d(x, static_weight.to(x.dtype), None, stride, padding, dilation, groups)
        if agg_bias is not None:
            y = y + agg_bias.to(y.dtype).reshape(batch, c_out, 1, 1)
    elif strategy == 'tiled':
        training = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
        budget = 8 * 1024 * 1024 if training else 2 * 1024 * 1024
        min_samples = 1
        if not torch.jit.is_scripting():
            budget, min_samples = tile_config(training)
        y = tiled_dynamic_conv2d(x, weight, kernel_attn, spatial_attn, static_weight, agg_bias, stride, padding,
                                 dilation, groups, budget, min_samples, in_scale if fold_in else None,
                                 out_scale if fold_out else None)
    else:
        if strategy == 'dense':  # spatial attention mixes kernel taps: only the aggregated forms apply
            strategy = 'grouped'
        agg_w = aggregate_kernels(weight, kernel_attn, spatial_attn, static_weight)
        if agg_w.shape[0] != batch:
            agg_w = agg_w.expand(batch, -1, -1, -1, -1)
        y = per_sample_conv2d(x, agg_w.to(x.dtype), None if agg_bias is None else agg_bias.to(x.dtype),
                              stride, padding, dilation, groups, strategy)
    if out_scale is not None and not fold_out:
        y = y * out_scale.to(y.dtype).reshape(batch, c_out, 1, 1)
    if post_bias is not None:
        y = y + post_bias.to(y.dtype).reshape(1, c_out, 1, 1)
    return y


@torch.library.custom_op('dynzoo::dynamic_conv2d_inference', mutates_args=())
def _dynamic_conv2d_inference(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        kernel_attn: Optional[torch.Tensor],
        in_scale: Optional[torch.Tensor],
        out_scale: Optional[torch.Tensor],
        spatial_attn: Optional[torch.Tensor],
        static_weight: Optional[torch.Tensor],
        static_bias: Optional[torch.Tensor],
        post_bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        groups: int,
        strategy: str,
) -> torch.Tensor:
    """:func:`dynamic_conv2d` run eagerly, as one op of a ``torch.compile`` graph (its output contiguous)."""
    return dynamic_conv2d(
        x, weight, bias, kernel_attn, in_scale, out_scale, spatial_attn, (stride[0], stride[1]),
        (padding[0], padding[1]), (dilation[0], dilation[1]), groups, strategy, static_weight, static_bias,
        post_bias).contiguous()


@_dynamic_conv2d_inference.register_fake
def _dynamic_conv2d_inference_shape(x, weight, bias, kernel_attn, in_scale, out_scale, spatial_attn, static_weight,
                                    static_bias, post_bias, stride, padding, dilation, groups, strategy):
    kh, kw = weight.shape[-2], weight.shape[-1]
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[1], out_h, out_w))


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


class DynamicAttention(NamedTuple):
    """What a dynamic conv's heads return per sample (each ``None`` when the layer has no such head)."""
    kernel: Optional[torch.Tensor]     # (B, K) mixing weights of the bank
    in_scale: Optional[torch.Tensor]   # (B, C_in) input-channel attention
    out_scale: Optional[torch.Tensor]  # (B, C_out) output-channel (filter) attention
    spatial: Optional[torch.Tensor]    # (B, kh*kw) kernel-tap attention


class DynamicConv2dBase(nn.Module):
    """A kernel bank with ``nn.Conv2d`` geometry; subclasses add attention heads via :meth:`forward_attention`.

    Parameters: ``weight`` ``(K, C_out, C_in/groups, kh, kw)``; with ``bias=True``, ``bias`` ``(K, C_out)``; with
    ``static_kernel=True``, an input-agnostic kernel ``static_weight`` ``(C_out, C_in/groups, kh, kw)`` added to the
    mixture. ``post_bias=True`` registers the zero buffer ``post_bias`` ``(C_out,)`` that a folded following
    BatchNorm's shift goes into (the inference form, see :meth:`fuse_bn`). ``strategy`` selects the execution
    strategy (see the module docstring); ``'auto'`` dispatches per call. Keyword arguments only (subclasses keep
    ``nn.Conv2d``'s positional geometry for their users).

    ``forward(x, cond=None)``: ``cond`` is one optional conditioning tensor that the family reads in
    :meth:`forward_attention` and :meth:`transform_bank` (DMF's token, SGDM's static guide, A2D2C's sampled
    positions); a single optional argument rather than ``*cond``, which TorchScript cannot compile.
    """

    def __init__(
            self,
            *,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = False,
            num_kernels: int = 4,
            static_kernel: bool = False,
            post_bias: bool = False,
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
        self.padding_mode = padding_mode
        kernel_shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = nn.Parameter(torch.empty((num_kernels,) + kernel_shape, **dd))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **dd)) if bias else None
        self.static_weight = nn.Parameter(torch.empty(kernel_shape, **dd)) if static_kernel else None
        self.register_buffer('post_bias', torch.zeros(out_channels, **dd) if post_bias else None)
        self.reset_bank_parameters()

    def reset_bank_parameters(self) -> None:
        """ODConv/FMDConv init: each kernel (and the static kernel) ``kaiming_normal_(fan_out, relu)``, biases zero."""
        for k in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight.data[k], mode='fan_out', nonlinearity='relu')
        if self.static_weight is not None:
            nn.init.kaiming_normal_(self.static_weight, mode='fan_out', nonlinearity='relu')
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    def check_input(self, x: torch.Tensor) -> None:
        if not torch.jit.is_scripting():  # the messages use Python-only features; TorchScript skips the checks
            self._check_input_eager(x)

    @torch.jit.unused
    def _check_input_eager(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(
                f'{name} expects a 4-D input (B, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f'{name} expects {self.in_channels} input channels, got {x.shape[1]} '
                f'(input shape {tuple(x.shape)})')

    def forward_attention(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> DynamicAttention:
        """The heads' outputs for input ``x`` (and the optional conditioning tensor ``cond``)."""
        raise NotImplementedError

    def transform_bank(self, weight: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The kernel bank the mixture uses (identity here; SGDM multiplies its static guide into it)."""
        return weight

    def effective_strategy(self) -> str:
        return resolve_strategy(self.strategy)

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.check_input(x)
        attn = self.forward_attention(x, cond)
        return dynamic_conv2d(
            x, self.transform_bank(self.weight, cond), self.bias, attn.kernel, attn.in_scale, attn.out_scale,
            attn.spatial, self.stride, self.padding, self.dilation, self.groups, self.effective_strategy(),
            static_weight=self.static_weight, post_bias=self.post_bias,
        )

    @torch.no_grad()
    def fuse_bn(self, bn: nn.Module) -> None:
        """Fold a following BatchNorm (``BN(y) = s y + t`` from its running statistics, any mode) into the layer.

        ``s * (out_scale * conv(x, sum_k a_k W_k + W_static, ...)) = out_scale * conv(x, sum_k a_k (s W_k) + s W_static,
        ...)``: every kernel, kernel bias and the static kernel scale by ``s``, and the shift becomes ``post_bias``
        (created here if the layer has none).
        """
        self.post_bias = fold_bn_into_bank_(bn, self.weight, self.bias, self.static_weight, None, self.post_bias)

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply``, with the 5-D kernel bank kept in the standard layout under a 4-D memory format.

        ``model.to(memory_format=torch.channels_last)`` (timm's ``--channels-last``) applies the 4-D format to every
        4-D and 5-D tensor, and torch refuses it on 5-D ones. The bank is mixed, never convolved directly, so it
        takes the device / dtype of the conversion and keeps its own layout; the aggregated kernels and the
        activations follow the input's memory format.
        """
        def convert(t: torch.Tensor) -> torch.Tensor:
            if t.dim() != 5:
                return fn(t)
            try:
                return fn(t)
            except RuntimeError as e:
                if 'channels_last' not in str(e):
                    raise
                return fn(t.flatten(0, 1)).contiguous().view(t.shape)

        return super()._apply(convert, recurse)

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
        if self.static_weight is not None:
            s += ', static_kernel=True'
        if self.strategy != 'auto':
            s += f', strategy={self.strategy!r}'
        return s

    # ---- upcycling: the layer as an exact copy of a static conv (dynzoo.models._upcycle) ----

    def zero_attention_logits_(self) -> None:
        """Zero the last layer of every attention head (each child module of a dynamic conv is a head with a
        ``zero_logits_`` method), so that each outputs a constant: uniform softmax weights and sigmoid gates of 1/2,
        whatever the input and the temperature."""
        for name, head in self.named_children():
            zero_logits = getattr(head, 'zero_logits_', None)
            if zero_logits is None:
                raise TypeError(f'{type(self).__name__}: its head {name!r} ({type(head).__name__}) has no '
                                'zero_logits_(), so the layer cannot start as an exact copy of a static conv')
            zero_logits()

    @torch.no_grad()
    def constant_gains(self, cond: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, gain, out_gain)`` (float64) of a layer whose heads output constants: the mixing weights ``(K,)``,
        the factor ``(C_out, C_in/g, kh, kw)`` by which the input, output and spatial attentions and
        :meth:`transform_bank` (given ``cond``) scale each tap of the mixed kernel (the layer's kernel is
        ``gain * sum_k alpha_k W_k``), and the output attention ``(C_out,)``, which also scales the bias. The
        heads run in eval mode on two random inputs; heads whose output depends on the input are refused."""
        extent = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size)]
        probe = torch.randn([2, self.in_channels] + extent, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64).to(self.weight)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            attn = self.forward_attention(probe)
        finally:
            for m, mode in modes:
                m.training = mode
        for field, value in zip(attn._fields, attn):
            if value is not None and not torch.equal(value[0], value[1]):
                raise ValueError(f'{type(self).__name__}: its {field} attention depends on the input; '
                                 'zero_attention_logits_() first')
        f64 = {'dtype': torch.float64, 'device': self.weight.device}
        c_out, c_in_g = self.out_channels, self.in_channels // self.groups
        alpha = torch.ones(1, **f64) if attn.kernel is None else attn.kernel[0].to(**f64)
        out_gain = torch.ones(c_out, **f64) if attn.out_scale is None else attn.out_scale[0].to(**f64)
        gain = self.transform_bank(torch.ones_like(self.weight[:1]), cond)[0].to(**f64)
        gain = gain * out_gain.reshape(-1, 1, 1, 1)
        if attn.in_scale is not None:  # input channel of W[o, j]: (o // (C_out / g)) * C_in / g + j
            in_scale = attn.in_scale[0].to(**f64).reshape(self.groups, 1, c_in_g)
            gain = gain * in_scale.expand(-1, c_out // self.groups, -1).reshape(c_out, c_in_g, 1, 1)
        if attn.spatial is not None:
            gain = gain * attn.spatial[0].to(**f64).reshape((1, 1) + self.kernel_size)
        return alpha, gain, out_gain

    @torch.no_grad()
    def upcycled_state(
            self,
            weight: torch.Tensor,
            bias: Optional[torch.Tensor] = None,
            *,
            generator: Optional[torch.Generator] = None,
            perturbation: float = 0.1,
            cond: Optional[torch.Tensor] = None,
    ) -> 'dict[str, torch.Tensor]':
        """This layer's state dict (its own keys) computing exactly the static conv ``(weight, bias)``; the layer
        itself is left unchanged.

        The heads' last layers are zero (:meth:`zero_attention_logits_`), so the mixing weights ``alpha`` and the
        attention gains are constants (:meth:`constant_gains`); each expert is ``W / (gain * sum_k alpha_k) + P_k``
        with a seeded perturbation ``P_k`` (RMS ``perturbation`` times the RMS of the first term, ``generator`` on
        the CPU) projected so that ``sum_k alpha_k P_k = 0``: the mixed kernel is ``W``, the experts differ, and
        the routing gets distinct gradients. A static bias goes into ``post_bias`` where the layer has one, else
        into the kernel biases; the static kernel term (``static_weight``) is zero; every other state of the heads
        is kept.
        """
        bank = ('weight', 'bias', 'static_weight', 'post_bias')
        own = self.state_dict()
        saved = {k: v.clone() for k, v in own.items() if k not in bank}
        try:
            self.zero_attention_logits_()
            alpha, gain, out_gain = self.constant_gains(cond)
            state = {k: v.clone() for k, v in self.state_dict().items() if k not in bank}
        finally:
            for k, v in saved.items():
                own[k].copy_(v)
        name = type(self).__name__
        if tuple(weight.shape) != tuple(gain.shape):
            raise ValueError(f'{name}: a static kernel of shape {tuple(gain.shape)} was expected, got '
                             f'{tuple(weight.shape)}')
        w = weight.to(gain)
        kept = gain != 0
        if bool((w[~kept] != 0).any()):
            raise ValueError(f'{name}: the attention zeroes kernel taps that the static kernel uses')
        base = torch.where(kept, w, torch.zeros_like(w)) / torch.where(kept, gain * alpha.sum(), torch.ones_like(w))
        dd = {'dtype': self.weight.dtype, 'device': self.weight.device}
        # the perturbation in the layer's dtype (drawn in float32, 5x faster than float64 on a CPU)
        experts = torch.randn((self.num_kernels,) + tuple(w.shape), generator=generator).to(**dd)
        experts.mul_(perturbation * float(base.square().mean().sqrt()))
        alpha_d = alpha.to(**dd)
        leak = torch.tensordot(alpha_d, experts, dims=1) / alpha_d.square().sum()  # sum_k a_k P_k / sum_k a_k^2
        base = base.to(**dd)
        for k in range(self.num_kernels):
            experts[k].sub_(leak, alpha=float(alpha[k])).add_(base)
        state['weight'] = experts
        if self.static_weight is not None:
            state['static_weight'] = torch.zeros_like(self.static_weight)
        b = torch.zeros(self.out_channels, **dd) if bias is None else bias.to(**dd)
        if self.post_bias is not None:
            state['post_bias'] = b
        if self.bias is not None:  # the kernel biases mix like the kernels and are scaled by the output attention
            per_kernel = torch.zeros_like(b) if self.post_bias is not None else b.to(gain) / (out_gain * alpha.sum())
            state['bias'] = per_kernel.to(**dd).unsqueeze(0).expand(self.num_kernels, -1).clone()
        elif bias is not None and self.post_bias is None:
            raise ValueError(f'{name}: the static conv has a bias, the layer neither kernel biases nor a post_bias')
        return state
