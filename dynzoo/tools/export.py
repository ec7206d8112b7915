"""Export dynzoo models to ONNX and TorchScript (``dynzoo export NAME --format onnx|torchscript``).

TorchScript: ``torch.jit.script`` (every dynzoo forward is scriptable, timm's contract) with ``torch.jit.trace``
as the fallback; a scripted per-sample convolution runs as in eager mode (the batch folded into the conv groups).

ONNX: an ONNX ``Conv`` takes its ``group`` count as a constant attribute, so the eager per-sample convolution
(``groups = batch * g``) cannot carry a dynamic batch axis. While a graph is traced or exported, the core
(:mod:`dynzoo.layers.per_sample`) runs every per-sample convolution as its ``'gemm'`` strategy instead: the kernel
taps gathered with strided slices of the padded input (im2col) and contracted with each sample's kernel by one
batched ``MatMul`` -- exact, same FLOPs, any batch. The exported graph is checked against PyTorch in onnxruntime at
two batch sizes (:func:`check_onnx`), or in OpenVINO (:func:`openvino_model`: OpenVINO reads the ONNX file
itself), the second CPU runtime.

A checkpoint is in the training form or in the inference (reparameterized) form; :func:`load_model` tells them
apart by their keys (:func:`is_inference_checkpoint`) and builds the matching model, the inference form with
``timm.create_model(name, inference_mode=True)``.

Exporters (``torch.onnx.export`` in torch 2.14): ``exporter='dynamo'`` (the default; ``torch.export`` +
onnxscript) and ``exporter='torchscript'`` (the older tracer; deprecated upstream but ~4x faster to run, which is
what the test suite uses). Both give graphs that agree with PyTorch to float rounding.
"""
import argparse
import os
import sys
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from dynzoo.models import _hub as hub

__all__ = [
    'export_onnx', 'export_torchscript', 'check_onnx', 'onnxruntime_session', 'openvino_model', 'runtime_runner',
    'is_inference_checkpoint', 'load_model', 'build_parser', 'main', 'EXPORTERS', 'RUNTIMES',
]

EXPORTERS = ('dynamo', 'torchscript')
RUNTIMES = ('onnxruntime', 'openvino')


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
    with torch.no_grad(), warnings.catch_warnings():
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


def openvino_model(path: str, threads: Optional[int] = None):
    """The ONNX file compiled by OpenVINO for its CPU device, in fp32 (OpenVINO's default precision hint is bf16
    on CPUs with bf16 units); ``threads``: its inference threads (default OpenVINO's choice). A dynamic batch axis
    stays dynamic. Call it with a NumPy batch: ``compiled(x)[0]``."""
    import openvino as ov
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    core = ov.Core()
    return core.compile_model(core.read_model(path), 'CPU', config)


def runtime_runner(path: str, runtime: str = 'onnxruntime', threads: Optional[int] = None):
    """``run(x: numpy.ndarray) -> numpy.ndarray``: the exported ONNX file in ``runtime`` (one of :data:`RUNTIMES`)."""
    if runtime == 'onnxruntime':
        session = onnxruntime_session(path, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if runtime == 'openvino':
        compiled = openvino_model(path, threads)
        return lambda x: compiled(x)[0]
    raise ValueError(f'unknown runtime {runtime!r}; expected one of {RUNTIMES}')


def check_onnx(model: nn.Module, path: str, input_size: Sequence[int] = (3, 224, 224),
               batch_sizes: Sequence[int] = (1, 3), threads: Optional[int] = 1, runtime: str = 'onnxruntime') -> float:
    """Run the ONNX file in ``runtime`` (onnxruntime or OpenVINO) at each batch size; return the max
    ``|runtime - torch| / max(1, max|torch|)``."""
    run = runtime_runner(path, runtime, threads)
    worst = 0.0
    for b in batch_sizes:
        x = _example_input(model, input_size, b).float()
        with torch.no_grad():
            ref = model(x.to(next(model.parameters()).dtype)).float()
        out = torch.from_numpy(run(x.numpy()))
        if out.shape != ref.shape:
            raise RuntimeError(f'{runtime} output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}')
        worst = max(worst, float((out - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return worst


def _state_keys(name: str, **kwargs) -> set:
    import timm
    with torch.device('meta'):
        return set(timm.create_model(name, **kwargs).state_dict())


def is_inference_checkpoint(name: str, checkpoint: Mapping[str, Any], **kwargs) -> bool:
    """``True`` when ``checkpoint`` (a state dict or a training container) holds the inference form of ``name``:
    its keys are those of ``timm.create_model(name, inference_mode=True)`` and not the training form's. Any other
    checkpoint (the training form, an authors' release the family's filter converts) is for the training form.
    ``kwargs`` are the model's (``num_classes``, ...)."""
    keys = set(hub.strip_prefix(hub.unwrap_checkpoint(checkpoint), 'module.'))
    if keys == _state_keys(name, **kwargs):
        return False
    return keys == _state_keys(name, inference_mode=True, **kwargs)


def load_model(name: str, checkpoint: Optional[str] = None, reparameterize: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` in eval mode, with a training-form or inference-form ``checkpoint`` file.

    A training-form checkpoint (dynzoo's or the authors', anything the family's filter converts) loads through
    timm's strict pretrained path into the training form, which ``reparameterize`` then folds
    (:func:`dynzoo.reparameterize`); an inference-form one (:func:`is_inference_checkpoint`) loads through the same
    path into ``timm.create_model(name, inference_mode=True)``.
    """
    import timm
    import dynzoo
    if checkpoint:
        if is_inference_checkpoint(name, hub.load_checkpoint_file(checkpoint), **kwargs):
            kwargs['inference_mode'] = True
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    model = timm.create_model(name, **kwargs).eval()
    if reparameterize and not kwargs.get('inference_mode'):
        model = dynzoo.reparameterize(model, inplace=True)
    return model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='dynzoo export', description=__doc__.split('\n')[0])
    p.add_argument('name', help='registered model name (dynzoo list)')
    p.add_argument('--format', choices=('onnx', 'torchscript'), required=True)
    p.add_argument('--reparameterize', action='store_true',
                   help='export the inference form (dynzoo.reparameterize of the training form)')
    p.add_argument('--checkpoint', default=None,
                   help='.safetensors / .pth in the training or the inference form (told apart by its keys)')
    p.add_argument('--output', default=None, help='output path (default NAME[.reparam].onnx / .pt)')
    p.add_argument('--img-size', type=int, default=None, help='input resolution (default: the model cfg)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='classes of the head (default: the checkpoint\'s own, else the model cfg\'s)')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')
    p.add_argument('--exporter', choices=EXPORTERS, default='dynamo', help='ONNX exporter (default dynamo)')
    p.add_argument('--opset', type=int, default=None)
    p.add_argument('--static-batch', action='store_true',
                   help='ONNX: fixed batch (--batch-size) instead of dynamic')
    p.add_argument('--batch-size', type=int, default=2, help='example batch used for tracing (default 2)')
    p.add_argument('--method', choices=('script', 'trace', 'auto'), default='auto', help='TorchScript method')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime / TorchScript parity check')
    p.add_argument('--check-runtime', choices=RUNTIMES, default='onnxruntime',
                   help='ONNX: the runtime the parity check runs the file in (default onnxruntime)')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dynzoo export NAME --format onnx|torchscript [--reparameterize] [--checkpoint FILE] [--output PATH]``."""
    args = build_parser().parse_args(argv)

    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.use_ema:
        kwargs['use_ema'] = True
    try:
        model = load_model(args.name, args.checkpoint, args.reparameterize, **kwargs)
    except Exception as e:  # unknown model, bad checkpoint: one clear line, not a traceback
        print(f'dynzoo export: {type(e).__name__}: {e}', file=sys.stderr)
        return 2
    cfg_size = tuple(getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224)))
    input_size = (cfg_size[0], args.img_size, args.img_size) if args.img_size else cfg_size
    inference = args.reparameterize or bool(
        args.checkpoint and is_inference_checkpoint(args.name, model.state_dict(), **kwargs))
    suffix = '.reparam' if inference else ''
    output = args.output or f'{args.name}{suffix}.' + ('onnx' if args.format == 'onnx' else 'pt')
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    t0 = time.perf_counter()
    if args.format == 'onnx':
        export_onnx(model, output, input_size, args.batch_size, not args.static_batch, args.opset, args.exporter)
        msg = f'wrote {output} ({time.perf_counter() - t0:.1f} s, exporter={args.exporter})'
        if not args.no_check:
            sizes = (args.batch_size,) if args.static_batch else (1, 3)
            worst = check_onnx(model, output, input_size, sizes, runtime=args.check_runtime)
            msg += f'; {args.check_runtime} vs PyTorch max|diff|/scale = {worst:.2e}'
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


if __name__ == '__main__':
    sys.exit(main())
