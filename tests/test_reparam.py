"""``dynzoo.reparameterize``: the exact inference form of every registered model, under timm's contract.

Every model gets random BatchNorm statistics and affine parameters first (a fresh ResNet has zero-gamma last BNs
and unit statistics, which would hide a wrong fold). For every model, built once: reparameterizing from eval mode
and from training mode gives the same inference form, whose eval outputs equal the training form's at
``max|diff| <= 1e-4 * max(1, max|logits|)`` (fp32) and ``1e-8`` (float64); ``dynzoo.reparameterize`` is
``timm.utils.reparameterize_model``; a second call changes nothing; the inference form's state dict loads
``strict=True`` into ``timm.create_model(name, inference_mode=True)`` with identical outputs; and no module carries
a reparameterization flag, marker buffer, load hook or instance-level ``train``.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn

import timm
import timm.utils

import dynzoo
from dynzoo.models import MODEL_INFO
from conftest import zoo_params

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


def close(a, b):
    return float((a - b).abs().max()), RTOL * max(1.0, float(a.abs().max()))


@torch.no_grad()
def fp32_noise(model, x):
    """``max|fp32 - fp64|`` of ``model`` on ``x``: the rounding floor no fp32 comparison can beat.

    For well-conditioned models it is far below ``1e-4 * max|logits|``; where a model amplifies rounding (the
    DynamicConv ResNets with these random weights: logits ~750, fp32 floor ~1e-5..6e-4 relative, varying by input)
    an fp32 comparison cannot tell a wrong fold from rounding, so the fp32 tolerance becomes ``50 x`` this floor
    (a wrong fold is off by O(1)) and exactness is asserted in float64 (``1e-8``) instead.
    """
    return float((model(x).double() - copy.deepcopy(model).double()(x.double())).abs().max())


def _same_model(a, b):
    """Same module tree (types and names) and bitwise-equal state."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# the spellings of "already folded" that the contract forbids (the sentinel is structural)
BANNED_FLAGS = ('reparameterized', 'fused', 'deployed', 'context_first', 'dw_has_identity')


def _assert_contract_clean(name, model):
    for mname, m in model.named_modules():
        where = f'{name}: {mname or "<root>"} ({type(m).__name__})'
        assert not any(f in vars(m) for f in BANNED_FLAGS), f'{where} carries a state flag'
        assert 'train' not in vars(m), f'{where} has an instance-level train()'
        assert not m._load_state_dict_pre_hooks, f'{where} has a load_state_dict pre-hook'
        assert not any(b.startswith('dynzoo') for b in m._buffers), f'{where} has a marker buffer'


@pytest.mark.parametrize('name', zoo_params(MODELS))
def test_reparameterize_contract(name):
    model = build(name)
    _assert_contract_clean(name, model)
    x = torch.randn((2,) + input_size(model))
    # each copy is dropped once compared: the largest models (condconv_resnet50: 190 M parameters) must fit beside
    # the other xdist worker
    with torch.no_grad():
        ref = model(x)
        fused = dynzoo.reparameterize(model)
        out = fused(x)
        # from training mode: the folds read the running statistics, whatever the mode
        _same_model(dynzoo.reparameterize(copy.deepcopy(model).train()).eval(), fused)
        # dynzoo's walker is timm's
        _same_model(timm.utils.reparameterize_model(model), fused)
        # a second call is a no-op (structural sentinels)
        again = dynzoo.reparameterize(fused, inplace=True)
        assert again is fused
        del again
        _same_model(dynzoo.reparameterize(copy.deepcopy(fused)), fused)
        assert torch.equal(fused(x), out)
        # exactness in float64, independent of how much the model amplifies fp32 rounding
        model = model.double()  # the training form is not needed any more
        ref64 = model(x.double())
        out64 = dynzoo.reparameterize(model, inplace=True)(x.double())
        del model
    _assert_contract_clean(name, fused)
    diff64 = float((ref64 - out64).abs().max())
    assert diff64 <= 1e-8 * max(1.0, float(ref64.abs().max())), f'{name}: float64 reparameterize is off by {diff64:.3g}'
    noise = float((ref.double() - ref64).abs().max())
    diff, tol = close(ref, out)
    tol = max(tol, 50 * noise)
    assert diff <= tol, f'{name}: reparameterize changed the output by {diff:.3g} (tolerance {tol:.3g})'
    # the inference form is what create_model(inference_mode=True) builds: its state dict loads strictly
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    deploy = timm.create_model(name, inference_mode=True).eval()
    deploy.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    del buf
    assert [type(m) for m in deploy.modules()] == [type(m) for m in fused.modules()]
    with torch.no_grad():
        assert torch.equal(deploy(x), out), f'{name}: create_model(inference_mode=True) differs after loading'
    print(f'{name}: max|diff| fp32 {diff:.2e} (fp32 floor {noise:.2e}, max|logits| {float(ref.abs().max()):.3g}), '
          f'fp64 {diff64:.2e}')


EDGE_MODEL = 'fmdconv_mobilenetv2_050' if 'fmdconv_mobilenetv2_050' in MODELS else MODELS[0]


def test_reparameterized_model_trains_and_pickles():
    """The inference form is an ordinary module: train() works (timm's contract has no guard), it pickles."""
    fused = dynzoo.reparameterize(build(EDGE_MODEL))
    assert fused.train() is fused and fused.training
    fused.eval()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    x = torch.randn((1,) + input_size(fused))
    with torch.no_grad():
        assert torch.equal(clone(x), fused(x))


def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match='nn.Module'):
        dynzoo.reparameterize(object())
