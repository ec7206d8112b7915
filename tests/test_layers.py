"""The one dynamic-layer API and every layer's inference form.

* every ``DynamicConv2dBase`` family is a head: ``forward(x, cond)`` is the base's, ``forward_attention`` returns a
  ``DynamicAttention``; the base is built with keywords only;
* timm's reparameterization contract, layer by layer (the seven dynamic convs, each followed by a BatchNorm that
  folds into it, ATConv and SGDM): the reparameterized module computes the training form's eval output (float64,
  folded from the running statistics whether the module is in training or eval mode), a second
  ``reparameterize`` changes nothing, and ``inference_mode=True`` builds exactly the reparameterized state dict;
* the temperature module: one iteration base for every schedule, validated temperatures.
"""
import math

import pytest
import torch
import torch.nn as nn

from timm.utils import reparameterize_model

from dynzoo.layers import (
    SGDM, A2D2CConv2d, ATConv2d, DynamicAttention, DynamicConv2d, DynamicConv2dBase, DynamicResidualConv2d,
    FMDConv2d, GuidedDynamicConv2d, ODConv2d, RoutedCondConv2d,
)
from dynzoo.layers.fusion import is_batchnorm, norm_act_remainder
from dynzoo.layers.temperature import (
    TemperatureMixin, fmdconv_temperature, get_temperatures, linear_temperature, set_temperature,
)

torch.set_num_threads(1)

C, HW, BATCH, TOKEN = 8, 7, 3, 5

# family -> (constructor taking the shared keywords, conditioning tensor or None)
DYNAMIC = {
    'fmdconv': (lambda **kw: FMDConv2d(C, C, 3, padding=1, **kw), None),
    'odconv': (lambda **kw: ODConv2d(C, C, 3, padding=1, **kw), None),
    'dyconv': (lambda **kw: DynamicConv2d(C, C, 3, padding=1, **kw), None),
    'condconv': (lambda **kw: RoutedCondConv2d(C, C, 3, padding=1, **kw), None),
    'a2d2c': (lambda **kw: A2D2CConv2d(C, C, 3, padding=1, num_points=5, **kw), None),
    'a2d2c_plus': (lambda **kw: A2D2CConv2d(C, C, 3, padding=1, num_points=5, mode='sum', **kw), None),
    'dmf': (lambda **kw: DynamicResidualConv2d(C, C, 3, token_dim=TOKEN, **kw), 'token'),
    'sgdm_guided': (lambda **kw: GuidedDynamicConv2d(C, C, 3, padding=1, **kw), 'guide'),
}


class ConvBn(nn.Module):
    """A block that owns ``conv -> bn``, folded the way the hosts fold it."""

    def __init__(self, make, inference_mode=False):
        super().__init__()
        self.conv = make(inference_mode=inference_mode, post_bias=inference_mode)
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(C)

    def forward(self, x, cond=None):
        return self.bn(self.conv(x, cond))

    @torch.no_grad()
    def reparameterize(self):
        if is_batchnorm(self.bn):
            self.conv.fuse_bn(self.bn)
            self.bn = norm_act_remainder(self.bn)


@torch.no_grad()
def _randomize(module: nn.Module) -> nn.Module:
    """Non-trivial weights and running statistics everywhere (zero-initialised experts, gamma = 0 ...)."""
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name.endswith('bn.weight') else 0.0))
    for m in module.modules():
        if is_batchnorm(m):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return module


def _cond(kind):
    if kind == 'token':
        return torch.randn(BATCH, TOKEN, dtype=torch.float64)
    if kind == 'guide':
        return torch.randn(C, C, 3, 3, dtype=torch.float64)
    return None


def _cases():
    for family, (make, cond) in DYNAMIC.items():
        yield family, (lambda inference_mode=False, make=make: ConvBn(make, inference_mode)), cond
    yield 'atconv', (lambda inference_mode=False: ATConv2d(C, inference_mode=inference_mode)), None
    yield 'sgdm', (lambda inference_mode=False: SGDM(4 * C, inference_mode=inference_mode)), None


CASES = {name: (build, cond) for name, build, cond in _cases()}


@pytest.mark.parametrize('family', list(DYNAMIC))
def test_every_family_is_a_head(family):
    make, cond = DYNAMIC[family]
    layer = make().double().eval()
    assert type(layer).forward is DynamicConv2dBase.forward
    x = torch.randn(BATCH, C, HW, HW, dtype=torch.float64)
    attn = layer.forward_attention(x, _cond(cond))
    assert isinstance(attn, DynamicAttention)
    assert attn.kernel is not None and attn.kernel.shape == (BATCH, layer.num_kernels)


def test_base_takes_keywords_only():
    with pytest.raises(TypeError):
        DynamicConv2dBase(C, C, 3)  # noqa
    base = DynamicConv2dBase(in_channels=C, out_channels=C, kernel_size=3, static_kernel=True, post_bias=True)
    assert base.static_weight.shape == (C, C, 3, 3) and torch.equal(base.post_bias, torch.zeros(C))


@pytest.mark.parametrize('train_mode', [False, True], ids=['from_eval', 'from_train'])
@pytest.mark.parametrize('name', list(CASES))
def test_reparameterize_exact_idempotent_and_inference_mode(name, train_mode):
    build, cond_kind = CASES[name]
    model = _randomize(build().double()).eval()
    x = torch.randn(BATCH, 4 * C if name == 'sgdm' else C, HW, HW, dtype=torch.float64)
    args = () if cond_kind is None else (_cond(cond_kind),)
    with torch.no_grad():
        ref = model(x, *args)
        # timm's walker visits every module below the root: the module under test sits below a container
        fused = reparameterize_model(nn.Sequential(model.train(train_mode)))[0].eval()
        out = fused(x, *args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not any(is_batchnorm(m) for m in fused.modules())

    state = {k: v.clone() for k, v in fused.state_dict().items()}
    reparameterize_model(nn.Sequential(fused), inplace=True)
    assert fused.state_dict().keys() == state.keys()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in state.items())

    deploy = build(inference_mode=True).double().eval()
    assert {k: v.shape for k, v in deploy.state_dict().items()} == {k: v.shape for k, v in state.items()}
    deploy.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x, *args), out, rtol=0, atol=0)


def test_sgdm_refuses_strips_folded_first():
    model = _randomize(SGDM(4 * C).double())
    model.conv_h.reparameterize()
    with pytest.raises(RuntimeError, match='folded before'):
        model.reparameterize()


def test_fuse_bn_affine_free_and_training_mode():
    torch.manual_seed(1)
    block = ConvBn(DYNAMIC['dmf'][0]).double()
    block.bn = nn.BatchNorm2d(C, affine=False).double()
    _randomize(block).train()
    x, token = torch.randn(BATCH, C, HW, HW, dtype=torch.float64), _cond('token')
    with torch.no_grad():
        ref = block.eval()(x, token)
        block.train().reparameterize()
        torch.testing.assert_close(block.eval()(x, token), ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------- temperatures

def test_schedules_share_one_iteration_base():
    spe = 7
    assert fmdconv_temperature(0, spe) == 40.0 and fmdconv_temperature(spe - 1, spe) == 40.0
    assert fmdconv_temperature(spe, spe) == 37.0 and fmdconv_temperature(13 * spe, spe) == 1.0
    assert [fmdconv_temperature(e) for e in range(3)] == [40.0, 37.0, 34.0]  # per-epoch callers pass the epoch
    assert fmdconv_temperature(2, t0=10, decrement=2) == 6.0
    assert linear_temperature(0, spe) == 30.0
    assert linear_temperature(5 * spe, spe) == pytest.approx(15.5)
    assert linear_temperature(10 * spe, spe) == 1.0 == linear_temperature(50 * spe, spe)
    assert linear_temperature(1, 1, t0=2.0, t1=1.0, epochs=2) == 1.5
    with pytest.raises(ValueError, match='steps_per_epoch'):
        linear_temperature(0, 0)


@pytest.mark.parametrize('bad', [0.0, -1.0, math.nan, math.inf])
def test_set_temperature_validates(bad):
    layer = FMDConv2d(C, C, 3)
    with pytest.raises(ValueError, match='finite and > 0'):
        set_temperature(layer, bad)
    with pytest.raises(ValueError, match='finite and > 0'):
        FMDConv2d(C, C, 3, kernel_temperature=bad)


def test_set_and_get_temperatures_by_role():
    layer = FMDConv2d(C, C, 3)
    assert set_temperature(layer, 34.0) == 1 and set_temperature(layer, 30.0, role='gate') == 1
    assert get_temperatures(layer) == {'attention': ('gate', 30.0), 'attention2': ('kernel', 34.0)}
    assert all(isinstance(m, TemperatureMixin) for m in (layer.attention, layer.attention2))
    with pytest.raises(ValueError, match='no attention head'):
        set_temperature(RoutedCondConv2d(C, C, 3), 2.0)
