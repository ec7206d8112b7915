"""The dynamic-conv core's execution strategies and dispatcher (``dynzoo/layers/dynamic.py``).

* every strategy computes the same function (forward and gradients) as the per-sample loop reference, across
  geometries and every optional input of :func:`dynamic_conv2d`;
* the ``'tiled'`` strategy really tiles (tiny tile budgets) and never builds more than one tile of kernels, and folds
  the channel attentions into the kernels where those are the smaller tensors;
* the dispatcher :func:`select_strategy` and the tile planner :func:`tile_plan` are tested as functions (no timing).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import dynzoo.layers.dynamic as core
from dynzoo.layers import FMDConv2d
from dynzoo.layers.dynamic import (
    STRATEGIES, DENSE_TRAIN_RATIO, dynamic_conv2d, get_default_strategy, select_strategy, set_default_strategy,
    tile_plan,
)

EXACT = [s for s in STRATEGIES if s not in ('auto', 'loop')] + ['auto']

# (in, out, k, stride, padding, dilation, groups)
GEOMETRIES = {
    '3x3': (8, 12, 3, 1, 1, 1, 1),
    'stride2': (8, 12, 3, 2, 1, 1, 1),
    'dilation2': (8, 8, 3, 1, 2, 2, 1),
    'groups2': (8, 12, 3, 1, 1, 1, 2),
    'depthwise': (8, 8, 3, 1, 1, 1, 8),
    'pointwise': (8, 12, 1, 1, 0, 1, 1),
    'pointwise_s2': (8, 12, 1, 2, 0, 1, 1),
    '5x5_rect_pad': (6, 6, 5, 1, 2, 1, 1),
}

# which optional inputs are present
OPTIONS = {
    'plain': {},
    'bias': dict(bias=True),
    'scales': dict(in_scale=True, out_scale=True),
    'spatial': dict(spatial=True, bias=True),
    'static': dict(static=True, bias=True),
    'post_bias': dict(post_bias=True, out_scale=True),
    'everything': dict(bias=True, in_scale=True, out_scale=True, spatial=True, static=True, post_bias=True),
}


def _inputs(geometry, options, batch=3, num_k=4, size=9, dtype=torch.float32, seed=0, requires_grad=False):
    c_in, c_out, k, s, p, d, g = geometry
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, positive=False):
        t = torch.rand(*shape, generator=gen, dtype=dtype) if positive else \
            torch.randn(*shape, generator=gen, dtype=dtype)
        return t.requires_grad_(requires_grad)

    kernel_taps = k * k
    return dict(
        x=rnd(batch, c_in, size, size),
        weight=rnd(num_k, c_out, c_in // g, k, k),
        bias=rnd(num_k, c_out) if options.get('bias') else None,
        kernel_attn=torch.softmax(torch.randn(batch, num_k, generator=gen, dtype=dtype), 1).requires_grad_(
            requires_grad) if num_k > 1 or options.get('attn_k1') else None,
        in_scale=rnd(batch, c_in, positive=True) if options.get('in_scale') else None,
        out_scale=rnd(batch, c_out, positive=True) if options.get('out_scale') else None,
        spatial_attn=rnd(batch, kernel_taps, positive=True) if options.get('spatial') else None,
        stride=(s, s), padding=(p, p), dilation=(d, d), groups=g,
        static_weight=rnd(c_out, c_in // g, k, k) if options.get('static') else None,
        static_bias=rnd(c_out) if options.get('static') else None,
        post_bias=rnd(c_out) if options.get('post_bias') else None,
    )


def _run(inp, strategy):
    return dynamic_conv2d(
        inp['x'], inp['weight'], inp['bias'], inp['kernel_attn'], inp['in_scale'], inp['out_scale'],
        inp['spatial_attn'], inp['stride'], inp['padding'], inp['dilation'], inp['groups'], strategy,
        static_weight=inp['static_weight'], static_bias=inp['static_bias'], post_bias=inp['post_bias'])


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tile budgets of 96 bytes: every geometry here is split into several row tiles and sample chunks (for one
    thread, several threads, and training alike)."""
    monkeypatch.setattr(core, 'TILE_BYTES', 96)
    monkeypatch.setattr(core, 'TRAIN_TILE_BYTES', 96)
    monkeypatch.setattr(core, 'THREAD_TILE_BYTES', 96 // max(1, torch.get_num_threads()))


def _check_all_strategies(geometry, options):
    inp = _inputs(GEOMETRIES[geometry], OPTIONS[options])
    with torch.no_grad():
        ref = _run(inp, 'loop')
        scale = ref.abs().max().item()
        for strategy in EXACT:
            out = _run(inp, strategy)
            assert out.shape == ref.shape, strategy
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f'{strategy}: {m}')


@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
@pytest.mark.parametrize('options', list(OPTIONS), ids=list(OPTIONS))
def test_strategies_match_loop_fp32(geometry, options, tiny_tiles):
    _check_all_strategies(geometry, options)


@pytest.mark.parametrize('geometry', list(GEOMETRIES), ids=list(GEOMETRIES))
def test_strategies_match_loop_fp32_default_tiles(geometry):
    _check_all_strategies(geometry, 'everything')


@pytest.mark.parametrize('geometry', ['3x3', 'stride2', 'groups2', 'depthwise', 'pointwise_s2'])
@pytest.mark.parametrize('options', ['everything', 'scales'])
def test_strategies_match_loop_gradients_fp64(geometry, options, tiny_tiles):
    grads = {}
    for strategy in ['loop'] + EXACT:
        inp = _inputs(GEOMETRIES[geometry], OPTIONS[options], dtype=torch.float64, requires_grad=True)
        out = _run(inp, strategy)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * probe).sum().backward()
        grads[strategy] = {k: v.grad.clone() for k, v in inp.items()
                           if isinstance(v, torch.Tensor) and v.grad is not None}
    ref = grads['loop']
    assert {'x', 'weight', 'kernel_attn'} <= set(ref)
    for strategy, g in grads.items():
        assert set(g) == set(ref), strategy
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f'{strategy} d/d{name}: {m}')


@pytest.mark.parametrize('geometry', ['3x3', 'groups2', 'depthwise', 'pointwise_s2'])
def test_tiled_folds_channel_attentions_into_the_kernels(geometry, tiny_tiles, monkeypatch):
    """Where a sample's kernel is smaller than its input and output maps, ``'tiled'`` scales the kernels by
    ``in_scale`` / ``out_scale`` (``scale_kernels``) instead of the activations: same values and gradients as the
    loop reference, in fp64, over several row tiles and sample chunks."""
    folded = []
    real = core.scale_kernels
    monkeypatch.setattr(core, 'scale_kernels', lambda k, i, o, g: folded.append((i is not None, o is not None))
                        or real(k, i, o, g))
    out, grads = {}, {}
    for strategy in ('loop', 'tiled'):
        inp = _inputs(GEOMETRIES[geometry], OPTIONS['everything'], size=16, dtype=torch.float64, requires_grad=True)
        out[strategy] = _run(inp, strategy)
        out[strategy].square().sum().backward()
        grads[strategy] = {k: v.grad for k, v in inp.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    assert folded and all(f == (True, True) for f in folded)
    torch.testing.assert_close(out['tiled'], out['loop'], rtol=1e-9, atol=1e-9)
    assert set(grads['tiled']) == set(grads['loop'])
    for name, g in grads['loop'].items():
        torch.testing.assert_close(grads['tiled'][name], g, rtol=1e-9, atol=1e-9, msg=lambda m: f'd/d{name}: {m}')


def test_single_kernel_without_attention():
    """``K = 1`` with no kernel attention: the bank is one kernel (``alpha = 1``)."""
    inp = _inputs(GEOMETRIES['3x3'], OPTIONS['scales'], num_k=1)
    assert inp['kernel_attn'] is None
    ref = F.conv2d(inp['x'] * inp['in_scale'][:, :, None, None], inp['weight'][0], None, 1, 1)
    ref = ref * inp['out_scale'][:, :, None, None]
    for strategy in ['loop'] + EXACT:
        torch.testing.assert_close(_run(inp, strategy), ref, rtol=1e-5, atol=1e-5)


def test_batch_one_and_large_kernel_tiling(tiny_tiles):
    inp = _inputs((16, 24, 3, 1, 1, 1, 1), OPTIONS['everything'], batch=1)
    torch.testing.assert_close(_run(inp, 'tiled'), _run(inp, 'loop'), rtol=1e-5, atol=1e-5)


def _run_tiled_on_threads(inp, threads):
    """``'tiled'`` under ``torch.no_grad`` with ``threads`` intra-op threads (the tile plan depends on them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return _run(inp, 'tiled')
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize('threads', [1, 2])
def test_tiled_builds_one_tile_at_a_time(monkeypatch, threads):
    """The tiled strategy never holds more than its tile budget of aggregated kernels per call of the aggregation,
    with the one-thread plan (rows first) and the multi-thread plan (samples first)."""
    budget = 4096
    monkeypatch.setattr(core, 'TILE_BYTES', budget)
    monkeypatch.setattr(core, 'THREAD_TILE_BYTES', budget // threads)
    monkeypatch.setattr(core, 'THREAD_TILE_SAMPLES', 2)
    assert core.tile_config(False, threads) == (budget, 1 if threads == 1 else 2 * threads)
    sizes = []
    real = core.aggregate_kernels

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(core, 'aggregate_kernels', spy)
    inp = _inputs((32, 32, 3, 1, 1, 1, 1), OPTIONS['bias'], batch=8)  # one sample's kernels: 36,864 bytes
    out = _run_tiled_on_threads(inp, threads)
    assert len(sizes) > 8  # row tiles x sample chunks
    assert max(sizes) <= budget
    monkeypatch.setattr(core, 'aggregate_kernels', real)
    torch.testing.assert_close(out, _run(inp, 'loop'), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('threads', [1, 2])
def test_tiled_matches_loop_with_either_plan_at_default_budgets(threads):
    """Real budgets, a deep layer: the one-thread and the multi-thread tile plans give the loop's result."""
    inp = _inputs((64, 96, 3, 1, 1, 1, 4), OPTIONS['everything'], batch=12)
    out = _run_tiled_on_threads(inp, threads)
    with torch.no_grad():
        torch.testing.assert_close(out, _run(inp, 'loop'), rtol=1e-5, atol=1e-5)


def test_grouped_builds_all_kernels(monkeypatch):
    """Contrast with the test above: 'grouped' aggregates every sample's full kernel at once."""
    sizes = []
    real = core.aggregate_kernels
    monkeypatch.setattr(core, 'aggregate_kernels', lambda *a, **k: sizes.append(real(*a, **k).numel()) or real(*a, **k))
    inp = _inputs((32, 32, 3, 1, 1, 1, 1), OPTIONS['plain'], batch=8)
    with torch.no_grad():
        _run(inp, 'grouped')
    assert sizes == [8 * 32 * 32 * 9]


# --------------------------------------------------------------------------------------------------------------
# the dispatcher and the tile planner, as functions
# --------------------------------------------------------------------------------------------------------------

def _select(batch=32, c_in=64, c_out=64, k=3, groups=1, num_k=4, out_hw=(56, 56), spatial=False, training=False):
    return select_strategy(batch, c_in, c_out, (k, k), groups, num_k, out_hw, spatial, training)


@pytest.mark.parametrize('c, hw', [(64, 56), (128, 28), (256, 14), (512, 7)])
@pytest.mark.parametrize('batch', [1, 8, 32])
def test_dispatch_eval_is_tiled(c, hw, batch):
    # eval: tiled at every ResNet-18 stage and batch (== grouped when the kernels fit one tile)
    assert _select(batch, c, c, out_hw=(hw, hw)) == 'tiled'


@pytest.mark.parametrize('c, hw, expected', [
    (64, 56, 'tiled'), (128, 28, 'tiled'), (256, 14, 'tiled'),  # kernel row / output map: 0.18, 1.5, 11.8
    (512, 7, 'dense'),  # 512*9 / 49 = 94 >= 64
])
def test_dispatch_training_resnet18_stages(c, hw, expected):
    assert _select(32, c, c, out_hw=(hw, hw), training=True) == expected


def test_dispatch_training_crossover_is_the_documented_ratio():
    import inspect
    assert inspect.signature(select_strategy).parameters['dense_train_ratio'].default == DENSE_TRAIN_RATIO
    # kernel row elements C_in*k*k against output pixels: dense from DENSE_TRAIN_RATIO on
    hw = 4
    c_in_at = DENSE_TRAIN_RATIO * hw * hw // 9 + 1
    assert _select(8, c_in_at, 32, out_hw=(hw, hw), training=True) == 'dense'
    assert _select(8, c_in_at - 2, 32, out_hw=(hw, hw), training=True) == 'tiled'
    assert _select(8, c_in_at, 32, out_hw=(hw, hw), training=False) == 'tiled'


def test_dispatch_spatial_attention_never_dense():
    assert _select(32, 512, 512, out_hw=(7, 7), spatial=True, training=True) == 'tiled'
    assert _select(32, 512, 512, num_k=1, out_hw=(7, 7), spatial=True) == 'tiled'


def test_dispatch_single_kernel_is_dense():
    for training, batch in itertools.product([False, True], [1, 32]):
        assert _select(batch, num_k=1, training=training) == 'dense'


def test_dispatch_grouped_layers():
    assert _select(32, 64, 64, groups=64, out_hw=(56, 56)) == 'tiled'          # depthwise
    assert _select(32, 64, 64, groups=64, out_hw=(7, 7), training=True) == 'tiled'  # 9 / 49: small kernel
    assert _select(32, 1024, 1024, groups=2, out_hw=(7, 7), training=True) == 'dense'  # 512*9/49


@pytest.mark.parametrize('batch, c_out, groups, row, budget', [
    (32, 64, 1, 64 * 9, 2 << 20), (32, 512, 1, 512 * 9, 2 << 20), (1, 512, 1, 512 * 9, 2 << 20),
    (8, 96, 3, 32 * 9, 4096), (4, 64, 64, 9, 1024), (32, 2048, 1, 512, 2 << 20), (3, 7, 1, 1000, 10),
])
def test_tile_plan_invariants(batch, c_out, groups, row, budget):
    rows, samples = tile_plan(batch, c_out, groups, row, 4, budget)
    step = 1 if groups == 1 else c_out // groups
    assert 1 <= rows <= c_out and 1 <= samples <= batch
    assert rows % step == 0  # a tile never splits a conv group
    if rows > step:  # the minimum tile may exceed a tiny budget; any larger one never does
        assert rows * samples * row * 4 <= budget
    if c_out * row * 4 <= budget:  # the whole layer's kernel fits: only the batch is chunked
        assert rows == c_out and samples == min(batch, budget // (c_out * row * 4))


@pytest.mark.parametrize('batch, c_out, groups, row, budget, min_samples', [
    (32, 512, 1, 512 * 9, 8 << 20, 8), (32, 256, 1, 256 * 9, 8 << 20, 8), (32, 64, 1, 64 * 9, 8 << 20, 8),
    (3, 512, 1, 512 * 9, 8 << 20, 8), (8, 96, 3, 32 * 9, 4096, 4), (16, 64, 64, 9, 1024, 8), (2, 7, 1, 1000, 10, 8),
])
def test_tile_plan_samples_first_invariants(batch, c_out, groups, row, budget, min_samples):
    rows, samples = tile_plan(batch, c_out, groups, row, 4, budget, min_samples)
    step = 1 if groups == 1 else c_out // groups
    assert 1 <= rows <= c_out and 1 <= samples <= batch and rows % step == 0
    if rows > step:  # the minimum tile may exceed a tiny budget; any larger one never does
        assert rows * samples * row * 4 <= budget
    if budget // (min(batch, min_samples) * row * 4) >= max(8, step):  # room for 8 rows of every sample wanted:
        assert samples >= min(batch, min_samples)  # the tile is sized for the samples first
        assert rows == c_out or rows % 8 == 0
    else:  # otherwise the one-thread plan (rows first)
        assert (rows, samples) == tile_plan(batch, c_out, groups, row, 4, budget)


def test_tile_plan_multi_thread_resnet18():
    # 2 threads: 8 MiB tiles of at least 8 samples; 512->512 3x3 takes 56 rows x 8 samples, 64->64 the whole layer
    # for all 32 samples
    budget, min_samples = core.tile_config(False, threads=2)
    assert (budget, min_samples) == (2 * core.THREAD_TILE_BYTES, 2 * core.THREAD_TILE_SAMPLES) == (8 << 20, 8)
    assert tile_plan(32, 512, 1, 512 * 9, 4, budget, min_samples) == (56, 8)
    assert tile_plan(32, 64, 1, 64 * 9, 4, budget, min_samples) == (64, 32)
    assert tile_plan(1, 512, 1, 512 * 9, 4, budget, min_samples) == (448, 1)  # batch 1: 455 rows fit, 448 = 8 * 56
    assert core.tile_config(True, threads=2) == (core.TRAIN_TILE_BYTES, 1)
    assert core.tile_config(False, threads=1) == (core.TILE_BYTES, 1)


def test_tile_plan_resnet18_stage4():
    # 512->512 3x3: one output channel's kernel is 18 KiB; a 2 MiB tile holds 113 channels of one sample
    assert tile_plan(32, 512, 1, 512 * 9, 4, 2 << 20) == (113, 1)
    assert tile_plan(32, 64, 1, 64 * 9, 4, 2 << 20) == (64, 14)


# --------------------------------------------------------------------------------------------------------------
# overrides, errors, tracing and scripting
# --------------------------------------------------------------------------------------------------------------

def test_default_strategy_override_and_restore():
    torch.manual_seed(0)
    layer = FMDConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 9, 9)
    assert get_default_strategy() == 'auto'
    with torch.no_grad():
        ref = layer(x)
        try:
            for s in STRATEGIES:
                set_default_strategy(s)
                assert layer.effective_strategy() == s
                torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        finally:
            set_default_strategy('auto')
        layer.strategy = 'loop'  # a per-layer choice wins over the module default
        set_default_strategy('dense')
        try:
            assert layer.effective_strategy() == 'loop'
        finally:
            set_default_strategy('auto')


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match='strategy'):
        set_default_strategy('fastest')
    with pytest.raises(ValueError, match='strategy'):
        FMDConv2d(8, 8, 3, strategy='fastest')
    inp = _inputs(GEOMETRIES['3x3'], OPTIONS['plain'])
    with pytest.raises(ValueError, match='strategy'):
        _run(inp, 'fastest')


def test_tracing_never_tiles(monkeypatch):
    """Under torch.jit.trace (and ONNX export) the dispatcher avoids 'tiled', whose loops depend on the batch."""
    def forbidden(*args, **kwargs):
        raise AssertionError('tiled strategy used while tracing')

    monkeypatch.setattr(core, 'tiled_dynamic_conv2d', forbidden)
    layer = FMDConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(AssertionError, match='tiled'):
        with torch.no_grad():
            layer(x)  # eager: the dispatcher does pick 'tiled'
    with torch.no_grad():
        traced = torch.jit.trace(layer, x, check_trace=False)  # the check re-runs eagerly, which may tile
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('strategy', ['auto', 'grouped', 'tiled', 'loop'])
def test_traced_layer_runs_any_batch(strategy):
    """While tracing, the per-sample forms run as 'gemm' (no batch-dependent conv groups): the graph traced at one
    batch size computes the layer at another."""
    torch.manual_seed(0)
    layer = FMDConv2d(8, 8, 3, padding=1, groups=2, strategy=strategy).eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(2, 8, 9, 9), check_trace=False)
        x = torch.randn(5, 8, 9, 9)
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('strategy', ['auto', 'tiled', 'bmm', 'gemm'])
def test_scripted_layer_matches_eager(strategy):
    torch.manual_seed(0)
    layer = FMDConv2d(8, 12, 1, strategy=strategy).eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(3, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), layer(x), rtol=1e-5, atol=1e-5)
