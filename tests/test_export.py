"""Deployment exports: TorchScript (script and trace), ONNX (dynamic batch, run in onnxruntime and OpenVINO),
torch.compile.

The exported model is the inference form (``dynzoo.reparameterize``) with calibrated, randomized BatchNorms
(see ``test_reparam.randomize_norms``), at small inputs. Outputs must match PyTorch to
``max|diff| <= 1e-4 * max(1, max|logits|)`` (fp32).

Budget notes: ONNX parity (onnxruntime and OpenVINO, one file at batch 1 and 3) and TorchScript run for
``EXPORT_MODELS`` -- every family and every dynzoo layer type (a slow test checks that the list covers the
registry) -- with the TorchScript-based exporter (about 4x faster to run than the dynamo exporter); the rest of the
registry is the slow-marked sweep. The dynamo exporter -- the CLI's default -- runs through the CLI on one model,
``DYNAMO_CLI_MODEL``, SGDM's YOLOv8-n backbone: of the models whose layers run the shared kernel-bank core
(:mod:`dynzoo.layers.dynamic`), the one the dynamo exporter traces fastest (a tenth of ``EDGE_MODEL``'s time).
torch.compile covers one model per family (``aot_eager`` backend: Dynamo capture + AOTAutograd, no C++ codegen,
which would take minutes per model on CPU) with ``fullgraph=True`` (no graph break anywhere in the model) plus
``torch._dynamo.explain`` of the first dynamic layer; an inductor run on one model is marked slow.
"""
import functools

import pytest
import torch
import torch.nn as nn

import dynzoo
from dynzoo.tools.export import check_onnx, export_onnx, export_torchscript, is_inference_checkpoint, main
from dynzoo.layers.dynamic import DynamicConv2dBase, aggregate_kernels
from dynzoo.layers.per_sample import per_sample_conv2d

from test_reparam import EDGE_MODEL, MODELS, RTOL, build, close, fp32_noise, input_size, one_per_family

pytest.importorskip('onnxruntime')

DYNAMO_CLI_MODEL = 'sgdm_cspdarknet_n' if 'sgdm_cspdarknet_n' in MODELS else EDGE_MODEL


@functools.lru_cache(maxsize=None)
def _deploy(name):
    """The inference form of ``name`` with randomized BatchNorms, built once per test process (the exports read it
    and never change it)."""
    return dynzoo.reparameterize(build(name), inplace=True)


@pytest.mark.parametrize('geometry', [
    dict(k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(k=3, stride=2, padding=1, dilation=1, groups=2),
    dict(k=3, stride=1, padding=2, dilation=2, groups=1),
    dict(k=3, stride=2, padding=1, dilation=1, groups=8),  # depthwise
    dict(k=1, stride=2, padding=0, dilation=1, groups=1),
    dict(k=5, stride=1, padding=2, dilation=1, groups=4),
])
def test_gemm_strategy_matches_loop(geometry):
    """The export-time per-sample form (im2col + one batched matmul) is the loop reference, any geometry."""
    g = geometry
    x = torch.randn(3, 8, 11, 9)
    w = torch.randn(3, 8, 8 // g['groups'], g['k'], g['k'])
    b = torch.randn(3, 8)
    args = ((g['stride'],) * 2, (g['padding'],) * 2, (g['dilation'],) * 2, g['groups'])
    ref = per_sample_conv2d(x, w, b, *args, strategy='loop')
    assert torch.allclose(per_sample_conv2d(x, w, b, *args, strategy='gemm'), ref, atol=1e-5)
    # a kernel shared by the batch (leading dim 1) broadcasts
    shared = aggregate_kernels(torch.randn(1, 8, 8 // g['groups'], g['k'], g['k']), None)
    assert torch.allclose(per_sample_conv2d(x, shared, None, *args, strategy='gemm'),
                          per_sample_conv2d(x, shared.expand(3, -1, -1, -1, -1), None, *args, strategy='loop'),
                          atol=1e-5)


# every family, and the ATConv transformer hosts: the layer types (ATConv token blocks) the families' smallest
# models do not hold; the zoo-wide sweep and the check that this list covers every layer type are slow-marked
EXPORT_MODELS = sorted(set(one_per_family()) | {'atconv_swin_tiny_224', 'atconv_pvt_tiny'})
OTHER_MODELS = [n for n in MODELS if n not in EXPORT_MODELS]


def _check_onnx(name, tmp_path, runtimes=('onnxruntime',)):
    model = _deploy(name)
    size = input_size(model)
    path = export_onnx(model, str(tmp_path / f'{name}.onnx'), size, batch_size=2, exporter='torchscript')
    x = torch.randn((3,) + size)
    with torch.no_grad():
        floor = fp32_noise(model, x) / max(1.0, float(model(x).abs().max()))
    tol = max(RTOL, 50 * floor)  # see test_reparam.fp32_noise: ill-conditioned models cannot do better in fp32
    for runtime in runtimes:  # one file, batch 1 and 3: the batch axis is dynamic
        worst = check_onnx(model, path, size, batch_sizes=(1, 3), runtime=runtime)
        print(f'{name}: {runtime} max|diff|/max(1,|logits|) {worst:.2e} (fp32 floor {floor:.2e})')
        assert worst <= tol, f'{name}: {runtime} differs from PyTorch by {worst:.3g} (relative; tolerance {tol:.3g})'


@pytest.mark.parametrize('name', EXPORT_MODELS)
def test_onnx_dynamic_batch_matches_pytorch(name, tmp_path):
    """The exported file runs at batch 1 and 3 in onnxruntime and in OpenVINO, the second CPU runtime."""
    pytest.importorskip('openvino')
    _check_onnx(name, tmp_path, runtimes=('onnxruntime', 'openvino'))


@pytest.mark.slow
@pytest.mark.parametrize('name', OTHER_MODELS)
def test_onnx_dynamic_batch_every_model(name, tmp_path):
    _check_onnx(name, tmp_path)


@pytest.mark.slow
def test_export_models_cover_every_layer_type():
    """``EXPORT_MODELS`` holds every family and every dynzoo layer type of the registry (inference form)."""
    import timm
    from dynzoo.models import MODEL_INFO

    def layer_types(name):
        with torch.device('meta'):
            model = timm.create_model(name, inference_mode=True)
        return {type(m) for m in model.modules() if type(m).__module__.startswith('dynzoo.layers')}
    covered = set().union(*(layer_types(n) for n in EXPORT_MODELS))
    missing = {t.__name__ for n in OTHER_MODELS for t in layer_types(n)} - {t.__name__ for t in covered}
    assert not missing, f'layer types no model of EXPORT_MODELS exports: {sorted(missing)}'
    assert {MODEL_INFO[n]['family'] for n in EXPORT_MODELS} == {MODEL_INFO[n]['family'] for n in MODELS}


def _check_torchscript(name):
    model = _deploy(name)
    scripted = export_torchscript(model, input_size=input_size(model), method='script')
    x = torch.randn((2,) + input_size(model))
    with torch.no_grad():
        diff, tol = close(model(x), scripted(x))
    assert diff <= max(tol, 50 * fp32_noise(model, x)), f'{name}: TorchScript differs by {diff:.3g}'


@pytest.mark.parametrize('name', EXPORT_MODELS)
def test_torchscript_matches_pytorch(name):
    _check_torchscript(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', OTHER_MODELS)
def test_torchscript_every_model(name):
    _check_torchscript(name)


@pytest.mark.parametrize('name', one_per_family())
def test_trace_at_one_batch_runs_at_another(name):
    """``torch.jit.trace`` at batch 2 gives a graph that runs any batch (the per-sample conv is traced in its
    batch-agnostic form), here batch 5, with PyTorch's outputs."""
    model = _deploy(name)
    size = input_size(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn((2,) + size), check_trace=False)
        x = torch.randn((5,) + size)
        ref, out = model(x), traced(x)
    assert out.shape == ref.shape == (5, model.num_classes)
    diff, tol = close(ref, out)
    assert diff <= max(tol, 50 * fp32_noise(model, x)), f'{name}: trace at batch 2, run at 5, differs by {diff:.3g}'


def _first_dynamic_layer(model, x):
    """The first dynamic conv (or other dynzoo layer module) the forward calls, with its call arguments."""
    candidates = [m for m in model.modules() if isinstance(m, DynamicConv2dBase)]
    if not candidates:
        candidates = [m for m in model.modules()
                      if type(m).__module__.startswith('dynzoo.layers') and not isinstance(m, nn.Sequential)]
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((mod, args, kwargs)) or None,
                                         with_kwargs=True) for m in candidates]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    assert calls, 'no dynzoo layer ran in the forward'
    return calls[0]


@pytest.mark.parametrize('name', one_per_family())
def test_torch_compile(name):
    model = _deploy(name)
    x = torch.randn((2,) + input_size(model))
    layer, args, kwargs = _first_dynamic_layer(model, x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(*args, **kwargs)
    assert explanation.graph_break_count == 0, (
        f'{name}: {type(layer).__name__} breaks the graph: {[str(b.reason) for b in explanation.break_reasons]}')
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)  # fullgraph: any graph break raises
    with torch.no_grad():
        diff, tol = close(model(x), compiled(x))
    torch._dynamo.reset()
    assert diff <= max(tol, 50 * fp32_noise(model, x)), f'{name}: torch.compile differs by {diff:.3g}'


@pytest.mark.slow
def test_torch_compile_inductor():
    model = _deploy(EDGE_MODEL)
    x = torch.randn((2,) + input_size(model))
    compiled = torch.compile(model)
    with torch.no_grad():
        diff, tol = close(model(x), compiled(x))
    torch._dynamo.reset()
    assert diff <= tol


def test_cli_export_onnx_dynamo_and_torchscript(tmp_path, capsys):
    onnx_path = tmp_path / 'm.onnx'
    assert main([DYNAMO_CLI_MODEL, '--format', 'onnx', '--reparameterize', '--img-size', '64',
                 '--output', str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert onnx_path.is_file() and 'exporter=dynamo' in out
    assert float(out.rsplit('=', 1)[1]) <= RTOL
    pt_path = tmp_path / 'm.pt'
    assert main([EDGE_MODEL, '--format', 'torchscript', '--img-size', '64', '--output', str(pt_path)]) == 0
    loaded = torch.jit.load(str(pt_path))
    x = torch.randn(1, 3, 64, 64)
    assert loaded(x).shape == (1, 1000)


def test_cli_export_with_checkpoints(tmp_path, capsys):
    from safetensors.torch import save_file
    model = build(EDGE_MODEL)
    train_ckpt = tmp_path / 'train.safetensors'
    save_file(model.state_dict(), str(train_ckpt))
    fused = dynzoo.reparameterize(model)
    deploy_ckpt = tmp_path / 'deploy.safetensors'
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(deploy_ckpt))
    assert is_inference_checkpoint(EDGE_MODEL, fused.state_dict())
    assert not is_inference_checkpoint(EDGE_MODEL, model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = fused(x)
    # a training-form checkpoint, reparameterized on the way; and a reparameterized one as it is
    for ckpt, extra in ((train_ckpt, ['--reparameterize']), (deploy_ckpt, [])):
        out_path = tmp_path / (ckpt.stem + '.pt')
        assert main([EDGE_MODEL, '--format', 'torchscript', '--checkpoint', str(ckpt), '--img-size', '64',
                         '--output', str(out_path)] + extra) == 0
        with torch.no_grad():
            diff, tol = close(ref, torch.jit.load(str(out_path))(x))
        assert diff <= tol, (ckpt.name, diff)
    capsys.readouterr()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(['no_such_model', '--format', 'onnx']) == 2
    assert 'no_such_model' in capsys.readouterr().err
    assert main([EDGE_MODEL, '--format', 'onnx', '--checkpoint', str(tmp_path / 'missing.pth')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([EDGE_MODEL, '--format', 'tflite'])


def test_export_refuses_training_mode(tmp_path):
    model = build(EDGE_MODEL).train()
    with pytest.raises(RuntimeError, match='eval'):
        export_onnx(model, str(tmp_path / 'x.onnx'), (3, 64, 64))
    with pytest.raises(RuntimeError, match='eval'):
        export_torchscript(model)


def test_unknown_runtime_is_refused():
    from dynzoo.tools.export import runtime_runner
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        runtime_runner('model.onnx', 'tflite')
