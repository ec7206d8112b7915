"""Export dynzoo models to ONNX and TorchScript (``dynzoo export NAME --format onnx|torchscript``).

TorchScript: ``torch.jit.script`` (every dynzoo forward is scriptable, timm's contract) with ``torch.jit.trace``
as the fallback; the per-sample convolution runs as in eager mode (the batch folded into the conv groups).

ONNX: an ONNX ``Conv`` takes its ``group`` count as a constant attribute, so the eager per-sample convolution
(``groups = batch * g``) cannot carry a dynamic batch axis. While exporting, :func:`onnx_friendly` therefore swaps
the core's per-sample convolution (:func:`dynzoo.layers.dynamic.per_sample_conv2d`, which every dynamic conv of
the zoo goes through) for :func:`per_sample_conv2d_gemm`: the kernel taps are gathered with strided slices of the
padded input (im2col) and contracted with each sample's aggregated kernel by one batched ``MatMul`` -- exact, same
FLOPs, any batch. Layers set to the ``'loop'`` strategy export through it too. The exported graph is checked
against PyTorch in onnxruntime at two batch sizes (:func:`check_onnx`).

Exporters (``torch.onnx.export`` in torch 2.14): ``exporter='dynamo'`` (the default; ``torch.export`` +
onnxscript) and ``exporter='torchscript'`` (the older tracer; deprecated upstream but ~4x faster to run, which is
what the test suite uses). Both give graphs that agree with PyTorch to float rounding.
"""
import argparse
import contextlib
import os
import sys
import time
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import dynzoo.layers.dynamic as dynamic_core
from dynzoo.layers.dynamic import DynamicConv2dBase

__all__ = [
    'per_sample_conv2d_gemm', 'onnx_friendly', 'export_onnx', 'export_torchscript', 'check_onnx',
    'onnxruntime_session', 'load_model', 'cli_main', 'EXPORTERS',
]

EXPORTERS = ('dynamo', 'torchscript')


def per_sample_conv2d_gemm(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        dilation: Tuple[int, int],
        groups: int,
        strategy: str = 'grouped',
) -> torch.Tensor:
    """:func:`~dynzoo.layers.dynamic.per_sample_conv2d` as im2col + one batched GEMM (no batch-dependent groups).

    ``weight`` is ``(B or 1, C_out, C_in/g, kh, kw)``; the ``kh*kw`` taps are strided slices of the zero-padded
    input, stacked in ``F.unfold``'s ``(C, kh, kw)`` order and contracted per group. ``strategy`` is accepted for
    signature compatibility and ignored.
    """
    batch, c_in, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3], weight.shape[4]
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    taps: List[torch.Tensor] = []
    for u in range(kh):
        for v in range(kw):
            r0, c0 = u * dilation[0], v * dilation[1]
            taps.append(x[:, :, r0:r0 + (out_h - 1) * stride[0] + 1:stride[0],
                          c0:c0 + (out_w - 1) * stride[1] + 1:stride[1]])
    cols = taps[0].unsqueeze(2) if len(taps) == 1 else torch.stack(taps, 2)  # (B, C_in, kh*kw, H', W')
    cols = cols.reshape(batch, groups, c_in_g * kh * kw, out_h * out_w)
    kernels = weight.reshape(weight.shape[0], groups, c_out // groups, c_in_g * kh * kw)
    y = torch.matmul(kernels, cols).reshape(batch, c_out, out_h, out_w)
    if bias is not None:
        y = y + bias.reshape(-1, c_out, 1, 1)
    return y


@contextlib.contextmanager
def onnx_friendly(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, per-sample convolutions run as :func:`per_sample_conv2d_gemm` (exportable with a dynamic
    batch) and ``'loop'``-strategy layers use it too; everything is restored on exit. Exact (same math)."""
    saved_fn = dynamic_core.per_sample_conv2d
    saved_strategy = {}
    for m in model.modules():
        if isinstance(m, DynamicConv2dBase) and m.strategy == 'loop':
            saved_strategy[m] = m.strategy
            m.strategy = 'grouped'
    dynamic_core.per_sample_conv2d = per_sample_conv2d_gemm
    try:
        yield model
    finally:
        dynamic_core.per_sample_conv2d = saved_fn
        for m, s in saved_strategy.items():
            m.strategy = s


def _example_input(model: nn.Module, input_size: Sequence[int], batch_size: int) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device('cpu')
    return torch.randn((batch_size,) + tuple(input_size), dtype=dtype, device=device)


def export_onnx(
        model: nn.Module,
        path: str,
        input_size: Sequence[int] = (3, 224, 224),
        batch_size: int = 2,
        dynamic_batch: bool = True,
        opset: Optional[int] = None,
        exporter: str = 'dynamo',
) -> str:
    """Export an eval-mode model to ONNX at ``path`` (input ``input``, output ``output``; batch axis dynamic).

    ``batch_size`` is the example batch the exporter traces with (2: a batch of 1 would be specialised away).
    Returns ``path``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f'unknown exporter {exporter!r}; expected one of {EXPORTERS}')
    if model.training:
        raise RuntimeError('export_onnx needs an eval-mode model: call model.eval() first')
    if dynamic_batch and batch_size < 2:
        raise ValueError('with a dynamic batch axis, trace with batch_size >= 2 (a batch of 1 gets specialised)')
    x = _example_input(model, input_size, batch_size)
    kwargs = dict(input_names=['input'], output_names=['output'])
    if opset is not None:
        kwargs['opset_version'] = opset
    with onnx_friendly(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer / deprecation chatter; the result is checked numerically instead
        if exporter == 'dynamo':
            if dynamic_batch:
                kwargs['dynamic_shapes'] = ({0: torch.export.Dim('batch', min=1, max=4096)},)
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs)
            program.save(path)
        else:
            if dynamic_batch:
                kwargs['dynamic_axes'] = {'input': {0: 'batch'}, 'output': {0: 'batch'}}
            torch.onnx.export(model, (x,), path, dynamo=False, **kwargs)
    return path


def export_torchscript(
        model: nn.Module,
        path: Optional[str] = None,
        input_size: Sequence[int] = (3, 224, 224),
        method: str = 'script',
) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the eval-mode model (``method='trace'``: trace it; ``'auto'``: script, else trace).

    Saves to ``path`` when given and returns the ScriptModule.
    """
    if method not in ('script', 'trace', 'auto'):
        raise ValueError(f"method must be 'script', 'trace' or 'auto', got {method!r}")
    if model.training:
        raise RuntimeError('export_torchscript needs an eval-mode model: call model.eval() first')
    scripted = None
    if method in ('script', 'auto'):
        try:
            scripted = torch.jit.script(model)
        except Exception:
            if method == 'script':
                raise
    if scripted is None:
        with torch.no_grad():
            scripted = torch.jit.trace(model, _example_input(model, input_size, 2), check_trace=False)
    if path:
        scripted.save(path)
    return scripted


def onnxruntime_session(path: str, threads: Optional[int] = None):
    """A CPU onnxruntime session for ``path`` (``threads``: intra-op threads, default onnxruntime's choice)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def check_onnx(model: nn.Module, path: str, input_size: Sequence[int] = (3, 224, 224),
               batch_sizes: Sequence[int] = (1, 3), threads: Optional[int] = 1) -> float:
    """Run the ONNX file in onnxruntime at each batch size; return the max ``|onnx - torch| / max(1, max|torch|)``."""
    session = onnxruntime_session(path, threads)
    worst = 0.0
    for b in batch_sizes:
        x = _example_input(model, input_size, b).float()
        with torch.no_grad():
            ref = model(x.to(next(model.parameters()).dtype)).float()
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        if out.shape != ref.shape:
            raise RuntimeError(f'onnxruntime output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}')
        worst = max(worst, float((out - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return worst


def load_model(name: str, checkpoint: Optional[str] = None, reparameterize: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` in eval mode, with a training-form or reparameterized ``checkpoint`` file.

    A training-form checkpoint (dynzoo's or the authors', anything the family's filter converts) loads through
    timm's strict pretrained path before any reparameterization; a reparameterized one (it carries the
    ``dynzoo_reparameterized`` key) loads after it, and implies ``reparameterize``.
    """
    import timm
    from dynzoo.models import _hub as hub
    from dynzoo.models._reparam import MARKER
    from dynzoo.models._reparam import reparameterize as _reparameterize
    state = None
    if checkpoint:
        state = hub.load_checkpoint_file(checkpoint)
        if isinstance(state, dict) and MARKER in state:
            reparameterize = True
        else:
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
            state = None
    model = timm.create_model(name, **kwargs).eval()
    if reparameterize:
        model = _reparameterize(model, inplace=True)
    if state is not None:
        model.load_state_dict(state)
    return model


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``dynzoo export NAME --format onnx|torchscript [--reparameterize] [--checkpoint FILE] [--output PATH]``."""
    parser = argparse.ArgumentParser(prog='dynzoo export', description=__doc__.split('\n')[0])
    parser.add_argument('name', help='registered model name (dynzoo list)')
    parser.add_argument('--format', choices=('onnx', 'torchscript'), required=True)
    parser.add_argument('--reparameterize', action='store_true', help='export the inference form (dynzoo.reparameterize)')
    parser.add_argument('--checkpoint', default=None, help='.safetensors / .pth: training-form or reparameterized')
    parser.add_argument('--output', default=None, help='output path (default NAME[.reparam].onnx / .pt)')
    parser.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model cfg)')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--exporter', choices=EXPORTERS, default='dynamo', help='ONNX exporter (default dynamo)')
    parser.add_argument('--opset', type=int, default=None)
    parser.add_argument('--static-batch', action='store_true', help='ONNX: fixed batch (--batch-size) instead of dynamic')
    parser.add_argument('--batch-size', type=int, default=2, help='example batch used for tracing (default 2)')
    parser.add_argument('--method', choices=('script', 'trace', 'auto'), default='auto', help='TorchScript method')
    parser.add_argument('--no-check', action='store_true', help='skip the onnxruntime / TorchScript parity check')
    args = parser.parse_args(argv)

    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    try:
        model = load_model(args.name, args.checkpoint, args.reparameterize, **kwargs)
    except Exception as e:  # unknown model, bad checkpoint: one clear line, not a traceback
        print(f'dynzoo export: {type(e).__name__}: {e}', file=sys.stderr)
        return 2
    cfg_size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224)))
    input_size = (cfg_size[0], args.img_size, args.img_size) if args.img_size else cfg_size
    suffix = '.reparam' if args.reparameterize or (args.checkpoint and _is_reparam(model)) else ''
    output = args.output or f'{args.name}{suffix}.' + ('onnx' if args.format == 'onnx' else 'pt')
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    t0 = time.perf_counter()
    if args.format == 'onnx':
        export_onnx(model, output, input_size, args.batch_size, not args.static_batch, args.opset, args.exporter)
        msg = f'wrote {output} ({time.perf_counter() - t0:.1f} s, exporter={args.exporter})'
        if not args.no_check:
            sizes = (args.batch_size,) if args.static_batch else (1, 3)
            msg += f'; onnxruntime vs PyTorch max|diff|/scale = {check_onnx(model, output, input_size, sizes):.2e}'
    else:
        scripted = export_torchscript(model, output, input_size, args.method)
        msg = f'wrote {output} ({time.perf_counter() - t0:.1f} s)'
        if not args.no_check:
            x = _example_input(model, input_size, 2)
            with torch.no_grad():
                ref, out = model(x), scripted(x)
            msg += f'; TorchScript vs PyTorch max|diff| = {float((ref - out).abs().max()):.2e}'
    print(msg)
    return 0


def _is_reparam(model: nn.Module) -> bool:
    from dynzoo.models._reparam import is_reparameterized
    return is_reparameterized(model)


if __name__ == '__main__':
    sys.exit(cli_main())
