"""Per-sample convolution: each sample ``x[n]`` convolved with its own kernel ``weight[n]``.

The execution end of every dynamic convolution of the zoo (the kernel-bank layers of :mod:`dynzoo.layers.dynamic`
and ATConv's per-sample, per-channel depthwise kernels). Strategies, all exact:

* ``'grouped'``  fold the batch into the conv groups: one ``conv2d`` with ``groups = B * g`` (FMDConv's
  Algorithm 1; the authors' code of ODConv and FMDConv);
* ``'bmm'``      a pointwise layer (1x1, groups 1, no padding) as one batched matmul (else ``'grouped'``);
* ``'gemm'``     im2col by strided slices of the zero-padded input, contracted with every sample's kernel by one
  batched matmul: no batch-dependent conv groups, so a traced or exported graph (``torch.jit.trace``, ONNX, whose
  ``Conv`` takes its group count as a constant, ``torch.export``) keeps a dynamic batch axis. While a graph is
  traced or exported, ``'grouped'`` and ``'loop'`` run as ``'gemm'`` automatically (same math, same FLOPs);
* ``'loop'``     one ``conv2d`` per sample: the reference;
* ``'shift'``    (depthwise only) the sum of ``kh*kw`` shifted, scaled views of the padded input.

While ``torch.compile`` traces the code (Dynamo), the per-sample forms run batch-agnostic too, so that a graph
compiled with ``dynamic=True`` is not specialized to the batch size: a depthwise layer (``groups == C_in ==
C_out``) as ``'shift'`` (an elementwise chain that the compiler fuses into one kernel), any other as ``'gemm'``.
(The kernel-bank layers' calls that need no gradient do not reach these forms under ``torch.compile``: they run
the eager forms inside one opaque op, :func:`dynzoo.layers.dynamic.dynamic_conv2d`; ATConv's per-sample depthwise
conv keeps ``'shift'``, which inductor runs faster than the eager grouped conv, ``docs/performance.md``.)

An empty batch ``(0, C, H, W)`` gives the empty output ``(0, C_out, H', W')`` in every strategy (it runs as
``'gemm'``: there are no samples to fold into conv groups), as ``nn.Conv2d`` does.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    'PER_SAMPLE_STRATEGIES', 'DEPTHWISE_STRATEGIES', 'conv_output_size', 'is_exporting', 'is_compiling', 'is_pointwise',
    'conv_taps', 'per_sample_conv2d', 'per_sample_depthwise_conv2d',
]

PER_SAMPLE_STRATEGIES = ('grouped', 'bmm', 'gemm', 'loop')
DEPTHWISE_STRATEGIES = ('auto', 'grouped', 'shift', 'gemm', 'loop')


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (``nn.Conv2d``'s formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def is_exporting() -> bool:
    """True while ``torch.jit.trace``, ``torch.onnx.export`` or ``torch.export`` records a graph."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    exporting = getattr(torch.compiler, 'is_exporting', None)
    return bool(exporting()) if exporting is not None else False


def is_compiling() -> bool:
    """True while ``torch.compile`` (Dynamo) traces the code, whose graph must not depend on the batch size."""
    return torch.compiler.is_compiling()


@torch.jit.unused
def is_compiled_inference(tensors: List[Optional[torch.Tensor]]) -> bool:
    """True while ``torch.compile`` (not an export) traces a call whose result needs no gradient, outside autocast
    (whose casts an opaque op would not see); ``tensors[0]`` is the input."""
    if not is_compiling() or is_exporting() or torch.is_autocast_enabled(tensors[0].device.type):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def is_pointwise(kh: int, kw: int, padding: Tuple[int, int], groups: int) -> bool:
    return kh == 1 and kw == 1 and padding[0] == 0 and padding[1] == 0 and groups == 1


def conv_taps(
        x: torch.Tensor,
        kh: int,
        kw: int,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
) -> List[torch.Tensor]:
    """The ``kh*kw`` views ``x_pad[:, :, u*d_h::s_h, v*d_w::s_w]`` (``(B, C, H', W')``, taps in ``F.unfold``'s
    order) of the zero-padded input that a convolution's kernel taps ``(u, v)`` meet."""
    out_h = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    taps: List[torch.Tensor] = []
    for u in range(kh):
        for v in range(kw):
            r0, c0 = u * dilation[0], v * dilation[1]
            taps.append(x[:, :, r0:r0 + (out_h - 1) * stride[0] + 1:stride[0],
                          c0:c0 + (out_w - 1) * stride[1] + 1:stride[1]])
    return taps


def _gemm_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
) -> torch.Tensor:
    """The ``'gemm'`` strategy; ``weight`` ``(B or 1, C_out, C_in/g, kh, kw)``, taps in ``F.unfold``'s order."""
    batch, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3], weight.shape[4]
    out_h = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if kh * kw == 1 and stride[0] == 1 and stride[1] == 1 and out_h == h and out_w == w:
        cols = x.unsqueeze(2)  # the one tap is the whole input: no slice (an exported graph would copy it)
    else:
        taps = conv_taps(x, kh, kw, stride, padding, dilation)
        cols = taps[0].unsqueeze(2) if len(taps) == 1 else torch.stack(taps, 2)  # (B, C_in, kh*kw, H', W')
    cols = cols.reshape(batch, groups, c_in_g * kh * kw, out_h * out_w)
    kernels = weight.reshape(weight.shape[0], groups, c_out // groups, c_in_g * kh * kw)
    y = torch.matmul(kernels, cols).reshape(batch, c_out, out_h, out_w)
    if bias is not None:
        y = y + bias.reshape(-1, c_out, 1, 1)
    return y


def _shift_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
) -> torch.Tensor:
    """The ``'shift'`` form of a per-sample depthwise conv, ``weight`` ``(B or 1, C, kh, kw)``: the sum over taps
    ``(u, v)`` of the strided view :func:`conv_taps` scaled by ``weight[:, :, u, v]``."""
    kh, kw = weight.shape[2], weight.shape[3]
    y: Optional[torch.Tensor] = None
    if bias is not None:
        y = bias.reshape(-1, x.shape[1], 1, 1)
    for t, tap in enumerate(conv_taps(x, kh, kw, stride, padding, dilation)):
        tap = tap * weight[:, :, t // kw:t // kw + 1, t % kw:t % kw + 1]
        y = tap if y is None else y + tap
    assert y is not None
    return y


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
    """Convolve each sample ``x[n]`` with its own kernel ``weight[n]`` (``(B, C_out, C_in/g, kh, kw)``) and bias
    ``bias[n]`` (``(B, C_out)``); ``strategy`` one of :data:`PER_SAMPLE_STRATEGIES` (see the module docstring)."""
    batch, c_in, h, w = x.shape
    c_out = weight.shape[1]
    if not torch.jit.is_scripting():
        if (strategy == 'grouped' or strategy == 'loop') and is_exporting():
            strategy = 'gemm'
        elif strategy != 'bmm' and is_compiling():  # one graph for every batch size (module docstring)
            if groups == c_in and c_out == c_in:
                return _shift_conv2d(x, weight.squeeze(2), bias, stride, padding, dilation)
            strategy = 'gemm'
    if strategy != 'gemm' and batch == 0:  # no sample to fold into the conv groups or to loop over: the empty output
        strategy = 'gemm'
    if strategy == 'gemm':
        return _gemm_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if strategy == 'bmm' and is_pointwise(weight.shape[-2], weight.shape[-1], padding, groups):
        if stride[0] != 1 or stride[1] != 1:
            x = x[:, :, ::stride[0], ::stride[1]]
        out_h, out_w = x.shape[-2], x.shape[-1]
        cols = x.reshape(batch, c_in, out_h * out_w)
        kernels = weight.reshape(weight.shape[0], c_out, c_in).expand(batch, c_out, c_in)
        if bias is None:
            y = torch.bmm(kernels, cols)
        else:
            y = torch.baddbmm(bias.reshape(batch, c_out, 1), kernels, cols)
        return y.reshape(batch, c_out, out_h, out_w)
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


def per_sample_depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: Tuple[int, int],
        strategy: str = 'auto',
) -> torch.Tensor:
    """Stride-1 depthwise conv of each ``x[b, c]`` with its own kernel ``weight[b, c]`` (``(B, C, kh, kw)``).

    ``y[b,c,h,w] = sum_{u,v} weight[b,c,u,v] * x[b,c,h+u-p_h,w+v-p_w]`` (cross-correlation, zero padding).
    ``'grouped'``, ``'gemm'`` and ``'loop'`` are :func:`per_sample_conv2d` with ``groups = C``; ``'shift'`` sums the
    shifted, scaled views of the padded input (no dynamic groups, channels_last friendly). ``'auto'`` is
    ``'grouped'``, the fastest at every shape measured on CPU (``docs/performance.md``), ``'gemm'`` while
    exporting and ``'shift'`` while compiling.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[0] or weight.shape[1] != x.shape[1]:
        raise ValueError(f'per_sample_depthwise_conv2d expects x (B, C, H, W) and weight (B, C, kh, kw), got '
                         f'{x.shape} and {weight.shape}')
    weight = weight.to(x.dtype)
    if strategy == 'auto':
        strategy = 'grouped'
    if strategy == 'shift':
        return _shift_conv2d(x, weight, None, (1, 1), padding, (1, 1))
    if strategy != 'grouped' and strategy != 'gemm' and strategy != 'loop':
        raise ValueError(f"Unknown depthwise strategy '{strategy}'; expected one of "
                         "'auto', 'grouped', 'shift', 'gemm', 'loop'")
    return per_sample_conv2d(x, weight.unsqueeze(2), None, (1, 1), padding, (1, 1), x.shape[1], strategy)
