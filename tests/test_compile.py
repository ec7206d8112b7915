"""``torch.compile(dynamic=True)``: no graph per batch size of the dynamic convs' own (``dynzoo/layers/per_sample.py``).

While Dynamo traces, a call that needs no gradient runs the eager forms inside one opaque op, and one that needs
gradients runs batch-agnostic forms (``'gemm'``, depthwise ``'shift'``) instead of folding the batch into the conv
groups or tiling by it, so a dynamic conv adds no batch specialization of its own: it
compiles no more graphs than a static ``nn.Conv2d`` does for the same batch sequence (torch itself keeps a separate
graph for batch 1, its 0/1 specialization, and on CPU guards oneDNN's conv backend choice on the batch size, at 16),
and one graph for batches 3 and 5. Counted with a counting backend (no inductor) on single layers of every family
(batches 3 and 5 in CI; 1, 3, 5, 32, whole small models and an inductor correctness check are ``slow``).
"""
from typing import Callable, List, Sequence

import pytest
import torch
import torch.nn as nn

from dynzoo.layers import (
    A2D2CConv2d, ATConv2d, DynamicConv2d, DynamicResidualConv2d, FMDConv2d, ODConv2d, RoutedCondConv2d, SGDM,
)
from dynzoo.layers.atconv_tokens import ATConvTokens

SIZE = 8
TOKEN_DIM = 6


class _WithToken(nn.Module):
    """A DMF dynamic residual conv fed a per-sample token (its ``cond``) derived from the input."""

    def __init__(self, conv: nn.Module, channels: int):
        super().__init__()
        self.conv = conv
        self.to_token = nn.Linear(channels, TOKEN_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.to_token(x.mean((2, 3))))


class _AsTokens(nn.Module):
    """The token-sequence ATConv on a ``(B, C, H, W)`` map, as ATConv-Swin/PVT call it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        return self.layer(x.flatten(2).transpose(1, 2), [h, w])


LAYERS = {
    'fmdconv': lambda: FMDConv2d(16, 16, 3, padding=1),
    'fmdconv_depthwise_s2': lambda: FMDConv2d(16, 16, 3, stride=2, padding=1, groups=16),
    'odconv': lambda: ODConv2d(16, 24, 3, padding=1),
    'odconv_pointwise': lambda: ODConv2d(16, 24, 1),
    'dyconv': lambda: DynamicConv2d(16, 16, 3, padding=1),
    'condconv': lambda: RoutedCondConv2d(16, 16, 3, stride=2, padding=1),
    'a2d2c': lambda: A2D2CConv2d(16, 16, 3, padding=1, num_points=4),
    'a2d2c_plus': lambda: A2D2CConv2d(16, 16, 3, padding=1, num_points=4, mode='sum'),
    'dmf': lambda: _WithToken(DynamicResidualConv2d(16, 16, 3, groups=2, token_dim=TOKEN_DIM), 16),
    'sgdm': lambda: SGDM(16),
    'atconv': lambda: ATConv2d(16),
    'atconv_tokens': lambda: _AsTokens(ATConvTokens(16)),
}


def compiled_graphs(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]) -> List[int]:
    """Graphs Dynamo has built after each call of ``torch.compile(fn, dynamic=True)`` on ``inputs`` (outputs checked
    against the eager ``fn``)."""
    graphs: List[torch.fx.GraphModule] = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, backend=counting_backend)
    counts = []
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(compiled(x), fn(x), rtol=1e-4, atol=1e-5)
            counts.append(len(graphs))
    torch._dynamo.reset()
    return counts


def _batches(batches: Sequence[int], channels: int = 16, size: int = SIZE) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, channels, size, size, generator=gen) for b in batches]


@pytest.mark.parametrize('family', list(LAYERS))
def test_layer_compiles_once_for_batch_sizes_3_and_5(family):
    torch.manual_seed(0)
    assert compiled_graphs(LAYERS[family]().eval(), _batches((3, 5))) == [1, 1]


@pytest.mark.slow
@pytest.mark.parametrize('family', list(LAYERS))
def test_layer_compiles_no_more_often_than_a_static_conv(family):
    """Batches 1, 3, 5, 32: at most the graphs of a static conv at each step (those of torch's own guards)."""
    torch.manual_seed(0)
    batches = _batches((1, 3, 5, 32))
    graphs = compiled_graphs(LAYERS[family]().eval(), batches)
    static_graphs = compiled_graphs(nn.Conv2d(16, 16, 3, padding=1).eval(), batches)
    assert graphs[2] == graphs[1] and all(d <= s for d, s in zip(graphs, static_graphs)), (graphs, static_graphs)


def test_batch_folding_would_specialize(monkeypatch):
    """The counter sees the specialization that the batch-agnostic forms remove: with the eager dispatch forced
    inside the compiled region (the batch folded into the conv groups) every batch size gets its own graph."""
    import dynzoo.layers.dynamic as dynamic
    import dynzoo.layers.per_sample as per_sample
    layer = FMDConv2d(16, 16, 3, padding=1).eval()
    inputs = _batches((3, 5))
    monkeypatch.setattr(per_sample, 'is_compiling', lambda: False)
    monkeypatch.setattr(dynamic, 'is_compiling', lambda: False)
    assert compiled_graphs(layer, inputs)[-1] == len(inputs)


def _graph_ops(layer: nn.Module, x: torch.Tensor, grad: bool) -> List[str]:
    graphs: List[torch.fx.GraphModule] = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(layer, dynamic=True, backend=counting_backend)(x)
    torch._dynamo.reset()
    return [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == 'call_function']


def test_compiled_inference_runs_the_eager_forms_as_one_op():
    """Without gradients a compiled dynamic conv is one opaque op (``dynzoo::dynamic_conv2d_inference``: the eager
    forms, no batch in the graph); with gradients it traces the batch-agnostic forms autograd can see."""
    layer = LAYERS['fmdconv']().eval()
    x = torch.randn(3, 16, SIZE, SIZE)
    assert sum('dynzoo.dynamic_conv2d_inference' in t for t in _graph_ops(layer, x, grad=False)) == 1
    traced = _graph_ops(layer, x, grad=True)
    assert not any('dynzoo.' in t for t in traced)
    assert any('method matmul' in t for t in traced)  # the 'gemm' form's batched matmul over the im2col taps


def test_compiled_training_step_matches_eager():
    """Gradients through the batch-agnostic forms equal the eager ones (training dispatch: tiled / dense)."""
    torch.manual_seed(0)
    layer = ODConv2d(16, 16, 3, padding=1).train()
    x = torch.randn(3, 16, SIZE, SIZE)
    eager_grad = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, backend='eager')
    compiled_grad = torch.autograd.grad(compiled(x).square().sum(), layer.weight)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)


SMALL_MODELS = {
    'fmdconv_mobilenetv2_050': 'mobilenetv2_050',
    'odconv_mobilenetv2_050': 'mobilenetv2_050',
    'dyconv_resnet18': 'resnet18',
    'condconv_resnet18': 'resnet18',
    'a2d2c_mobilenetv2_050': 'mobilenetv2_050',
    'a2d2c_plus_mobilenetv2_050': 'mobilenetv2_050',
    'dmf_xxs': 'mobilenetv2_050',
    'sgdm_resnet18': 'resnet18',
    'attnet_xxs': 'convnext_atto',
    'atconv_pvt_tiny': 'convnext_atto',
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(SMALL_MODELS))
def test_model_compiles_no_more_often_than_its_static_twin(name):
    import timm
    torch.manual_seed(0)
    inputs = [torch.randn(b, 3, 64, 64) for b in (1, 3, 5, 32)]
    graphs = compiled_graphs(timm.create_model(name, num_classes=10).eval(), inputs)
    static_graphs = compiled_graphs(timm.create_model(SMALL_MODELS[name], num_classes=10).eval(), inputs)
    assert graphs[2] == graphs[1] and all(d <= s for d, s in zip(graphs, static_graphs)), (graphs, static_graphs)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['fmdconv', 'fmdconv_depthwise_s2', 'atconv'])
def test_inductor_dynamic_batch_matches_eager(family):
    """Inductor's build of the batch-agnostic forms (``gemm``, ``shift``) equals eager at batches 3, 5 and 32."""
    torch.manual_seed(0)
    layer = LAYERS[family]().eval()
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for x in _batches((3, 5, 32), size=12):
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
