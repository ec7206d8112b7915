"""``dynzoo.reparameterize``: exact inference form of every registered model, and its behaviour at the edges.

Every model gets random BatchNorm statistics and affine parameters first (a fresh ResNet has zero-gamma last BNs
and unit statistics, which would hide a wrong fold), then eval outputs before and after are compared at
``max|diff| <= 1e-4 * max(1, max|logits|)`` (fp32), for ``dynzoo.reparameterize`` and for timm's own
``timm.utils.reparameterize_model``.
"""
import copy
import io
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

import timm
import timm.utils

import dynzoo
from dynzoo.models import MODEL_INFO
from dynzoo.models._hosts import DynamicMobileNetV2, DynamicResNet
from dynzoo.models._reparam import MARKER, fold_conv_bn_, is_reparameterized, reparameterize

MODELS = dynzoo.list_dynzoo_models()
SMALL = 64
RTOL = 1e-4


# name fragments of each family's smallest variant, most preferred first
_SMALL_HINTS = ('mobilenetv2_050', 'xxs', 'cspdarknet_n', 'resnet18', 't1', 'xs')


def one_per_family():
    """The (likely) smallest registered model of every family."""
    def rank(name):
        return next((i for i, h in enumerate(_SMALL_HINTS) if h in name), len(_SMALL_HINTS)), name
    best = {}
    for name in MODELS:
        family = MODEL_INFO[name]['family']
        if family not in best or rank(name) < rank(best[family]):
            best[family] = name
    return sorted(best.values())


def input_size(model, target=SMALL):
    """``(C, H, W)``: ``target`` square, or the model's minimum / fixed size when it has one."""
    cfg = model.pretrained_cfg
    if cfg.get('fixed_input_size'):
        return tuple(cfg['input_size'])
    c = cfg['input_size'][0]
    lo = cfg.get('min_input_size') or (c, target, target)
    return (c, max(lo[1], target), max(lo[2], target))


@torch.no_grad()
def randomize_norms(model, seed=0, size=None):
    """Randomize every BatchNorm's affine parameters, then calibrate its running statistics on a random batch.

    Statistics measured on data keep the activations well scaled through deep residual stacks (arbitrary random
    statistics blow a ResNet-50 up, and fp32 rounding with it), and they are far from the init values (0, 1),
    so the folds are really exercised.
    """
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # affine parameters first, so that the calibration below sees the network as it will run
    for m in norms:
        n = m.num_features
        if size is None and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if m.weight is not None:
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    # residual branches end in a small gain, as timm's zero_init_last intends: deep hosts stay well conditioned
    for block in model.modules():
        if hasattr(block, 'zero_init_last'):
            before = {id(m): m.weight.clone() for m in norms if m.weight is not None}
            block.zero_init_last()
            for m in norms:
                if m.weight is not None and id(m) in before and not torch.equal(before[id(m)], m.weight):
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.1 + 0.05)
    if size is not None:
        momenta = [m.momentum for m in norms]
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        was_training = model.training
        model.train()
        model(torch.randn((4,) + tuple(size), generator=g))
        model.train(was_training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            if m.running_var is not None:  # dead channels (var ~ 0) would amplify rounding ~300x per layer
                m.running_var.clamp_(min=0.05)
    return model


def build(name, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name)
    return randomize_norms(model, seed, input_size(model)).eval()


@lru_cache(maxsize=1)
def _cached(name):
    return build(name)


def fresh(name):
    return copy.deepcopy(_cached(name))


def close(a, b):
    return float((a - b).abs().max()), RTOL * max(1.0, float(a.abs().max()))


def _count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def fp32_noise(model, x):
    """``max|fp32 - fp64|`` of ``model`` on ``x``: the rounding floor no fp32 comparison can beat.

    For well-conditioned models it is far below ``1e-4 * max|logits|``; where a model amplifies rounding (the
    DynamicConv ResNets with these random weights: logits ~750, fp32 floor ~1e-5..6e-4 relative, varying by input)
    an fp32 comparison cannot tell a wrong fold from rounding, so the fp32 tolerance becomes ``50 x`` this floor
    (a wrong fold is off by O(1)) and exactness is asserted in float64 (``1e-8``) instead.
    """
    return float((model(x).double() - copy.deepcopy(model).double()(x.double())).abs().max())


@pytest.mark.parametrize('name', MODELS)
def test_reparameterize_is_exact(name):
    model = fresh(name)
    x = torch.randn((2,) + input_size(model))
    with torch.no_grad():
        ref = model(x)
        fused = dynzoo.reparameterize(model)
        out = fused(x)
        timm_fused = timm.utils.reparameterize_model(model)
        timm_out = timm_fused(x)
        # exactness in float64, independent of how much the model amplifies fp32 rounding
        model64 = copy.deepcopy(model).double()
        ref64 = model64(x.double())
        out64 = dynzoo.reparameterize(model64)(x.double())
    diff64 = float((ref64 - out64).abs().max())
    assert diff64 <= 1e-8 * max(1.0, float(ref64.abs().max())), f'{name}: float64 reparameterize differs by {diff64:.3g}'
    noise = float((ref.double() - ref64).abs().max())
    diff, tol = close(ref, out)
    tol = max(tol, 50 * noise)
    assert diff <= tol, f'{name}: dynzoo.reparameterize changed the output by {diff:.3g} (tolerance {tol:.3g})'
    diff = float((ref - timm_out).abs().max())
    assert diff <= tol, f'{name}: timm reparameterize_model changed the output by {diff:.3g} (tolerance {tol:.3g})'
    assert is_reparameterized(fused) and not is_reparameterized(model)
    assert _count_bn(fused) <= _count_bn(timm_fused) <= _count_bn(model)
    if isinstance(model, (DynamicResNet, DynamicMobileNetV2)):  # the hosts fold every BatchNorm they hold
        assert _count_bn(fused) == 0, f'{name}: {_count_bn(fused)} BatchNorms left after reparameterize'
    print(f'{name}: max|diff| fp32 {float((ref - out).abs().max()):.2e} (fp32 floor {noise:.2e}, '
          f'max|logits| {float(ref.abs().max()):.3g}), fp64 {diff64:.2e}, BatchNorms {_count_bn(model)} -> '
          f'{_count_bn(fused)} (timm path {_count_bn(timm_fused)})')


@pytest.mark.parametrize('name', one_per_family())
def test_timm_path_twice_is_a_no_op(name):
    model = fresh(name)
    x = torch.randn((2,) + input_size(model))
    with torch.no_grad():
        once = timm.utils.reparameterize_model(model)
        y1 = once(x)
        y2 = timm.utils.reparameterize_model(once)(x)
    diff, tol = close(y1, y2)
    assert diff <= tol, f'{name}: a second reparameterize_model changed the output by {diff:.3g}'


def test_static_conv_bn_fold_is_exact():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(6)), 3)[0].eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = bn(conv(x))
        fold_conv_bn_(conv, bn)
        assert torch.allclose(conv(x), ref, atol=1e-5)


# ---- edges, on the smallest hosted model and on one model per family -------------------------------------------

EDGE_MODEL = 'fmdconv_mobilenetv2_050' if 'fmdconv_mobilenetv2_050' in MODELS else MODELS[0]


def test_training_mode_is_refused():
    model = fresh(EDGE_MODEL).train()
    with pytest.raises(RuntimeError, match=r'model\.eval\(\)'):
        dynzoo.reparameterize(model)
    model.eval()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).train()
    with pytest.raises(RuntimeError, match='training mode'):
        dynzoo.reparameterize(model)


def test_twice_is_a_no_op():
    model = fresh(EDGE_MODEL)
    x = torch.randn((2,) + input_size(model))
    fused = dynzoo.reparameterize(model, inplace=True)
    assert fused is model
    with torch.no_grad():
        y1 = fused(x)
        again = dynzoo.reparameterize(fused, inplace=True)
        assert again is fused
        assert torch.equal(again(x), y1)
        copied = dynzoo.reparameterize(fused)  # not in place: an equal copy
        assert copied is not fused and torch.equal(copied(x), y1)


def test_training_a_reparameterized_model_is_refused():
    fused = dynzoo.reparameterize(fresh(EDGE_MODEL))
    with pytest.raises(RuntimeError, match='cannot be trained'):
        fused.train()
    assert fused.eval() is fused and not fused.training  # eval()/train(False) keep working
    assert fused.train(False) is fused


@pytest.mark.parametrize('name', one_per_family())
def test_reparameterized_state_dict_round_trip(name):
    fused = dynzoo.reparameterize(fresh(name))
    state = fused.state_dict()
    assert state[MARKER].item() is True
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    # a differently initialised model, reparameterized the same way, takes the state dict exactly
    target = dynzoo.reparameterize(build(name, seed=1))
    target.load_state_dict(loaded)
    x = torch.randn((2,) + input_size(fused))
    with torch.no_grad():
        assert torch.equal(target(x), fused(x))


@pytest.mark.parametrize('name', one_per_family())
def test_training_checkpoint_into_reparameterized_model_is_refused(name):
    training_state = fresh(name).state_dict()
    fused = dynzoo.reparameterize(fresh(name))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match='training-form checkpoint'):
            fused.load_state_dict(training_state, strict=strict)


def test_reparameterized_state_dict_into_training_model_is_refused():
    fused = dynzoo.reparameterize(fresh(EDGE_MODEL))
    with pytest.raises(RuntimeError, match=MARKER):
        fresh(EDGE_MODEL).load_state_dict(fused.state_dict())


def test_reparameterized_model_pickles_and_copies():
    fused = dynzoo.reparameterize(fresh(EDGE_MODEL))
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    x = torch.randn((1,) + input_size(fused))
    with torch.no_grad():
        assert torch.equal(clone(x), fused(x))
    for m in (clone, copy.deepcopy(fused)):
        assert is_reparameterized(m)
        with pytest.raises(RuntimeError, match='cannot be trained'):
            m.train()


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match='nn.Module'):
        reparameterize(object())
