"""SGDM / RDConv (Xing, Cui, Qi): operator math, fusion identities, parameter counts, reparameterization, detection
features. Small shapes throughout; every expected integer is written out, every compared one computed here."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.utils import reparameterize_model

from dynzoo.layers.sgdm import (
    SGDM, GuidedDynamicConv2d, RDConv2d, StaticStripConv, StripSpatialAttention, razor_split, sgdm_num_params,
    static_guide, strip_to_square,
)

MODELS = ['sgdm_cspdarknet_n', 'sgdm_cspdarknet_s', 'sgdm_resnet18']


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine params (the folds must use all four)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return module


def _calibrate_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine params and running statistics from one training batch, so every branch (including the
    small-magnitude guided dynamic conv) contributes O(1) activations in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    with torch.no_grad():
        model.train()(torch.randn(6, 3, 64, 64, generator=g))
    return model.eval()


def _reference_rdconv(rd: RDConv2d, x: torch.Tensor, guide) -> torch.Tensor:
    """RDConv written out per sample from its parameters (eval mode): razor, guided mixture, BN, strip attention."""
    c_i = rd.num_intrinsic
    x_int, x_rest = x[:, :c_i], x[:, c_i:]
    dyn = rd.dynamic
    alpha = torch.sigmoid(F.linear(x_int.mean((2, 3)), dyn.routing.fc.weight, dyn.routing.fc.bias))
    outs = []
    for n in range(x.shape[0]):
        kernel = (alpha[n].reshape(-1, 1, 1, 1, 1) * dyn.weight).sum(0)
        if guide is not None:
            kernel = kernel * guide
        outs.append(F.conv2d(x_int[n:n + 1], kernel, None, 1, dyn.padding, dyn.dilation))
    y = F.batch_norm(torch.cat(outs), rd.bn.running_mean, rd.bn.running_var, rd.bn.weight, rd.bn.bias, False, 0.0,
                     rd.bn.eps)
    sp = rd.spatial
    a_h = torch.sigmoid(F.conv2d(x_int.mean(2, keepdim=True), sp.conv_h.weight, sp.conv_h.bias,
                                 padding=sp.conv_h.padding, groups=c_i))
    a_w = torch.sigmoid(F.conv2d(x_int.mean(3, keepdim=True), sp.conv_w.weight, sp.conv_w.bias,
                                 padding=sp.conv_w.padding, groups=c_i))
    return torch.cat([y * a_h * a_w, x_rest], 1)


# ---------------------------------------------------------------------------------------------------------------
# parameter counts (the closed form sgdm_num_params; the paper's Tables 2, 3, 5 deltas)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels,expected', [(64, 7_284), (128, 28_388), (256, 112_068), (512, 445_316)])
def test_sgdm_params_equal_closed_form(channels, expected):
    module = SGDM(channels, device='meta')
    assert _num_params(module) == expected == sgdm_num_params(channels)


def test_sgdm_param_breakdown_c256():
    """The closed form's breakdown for C=256: static 36,992 x 2, experts 36,864, routing 132, BN 64, spatial 1,024."""
    m = SGDM(256, device='meta')
    assert _num_params(m.conv_h) == _num_params(m.conv_w) == 36_992
    assert m.rdconv.dynamic.weight.numel() == 36_864
    assert _num_params(m.rdconv.dynamic.routing) == 132
    assert _num_params(m.rdconv.bn) == 64
    assert _num_params(m.rdconv.spatial) == 1_024


@pytest.mark.parametrize('name,expected,baseline,increment', [
    ('sgdm_cspdarknet_n', 2_867_028, 2_719_288, 147_740),
    ('sgdm_cspdarknet_s', 6_947_508, 6_361_736, 585_772),
    ('sgdm_resnet18', 12_275_284, 11_689_512, 585_772),
])
def test_model_params_exact(name, expected, baseline, increment):
    model = timm.create_model(name, device='meta')
    if name == 'sgdm_resnet18':
        host = timm.create_model('resnet18', device='meta')
    else:
        host = timm.create_model(name, sgdm_levels=(), device='meta')
    assert _num_params(model) == expected
    assert _num_params(host) == baseline
    assert _num_params(model) - _num_params(host) == increment


def test_sppf_option_adds_its_params_and_precedes_p5_sgdm():
    base = timm.create_model('sgdm_cspdarknet_n', device='meta')
    with_sppf = timm.create_model('sgdm_cspdarknet_n', sppf=True, device='meta')
    assert _num_params(with_sppf) - _num_params(base) == 164_608
    names = [n for n, _ in with_sppf.stages[3].named_children()]
    assert names.index('sppf') < names.index('sgdm')


# ---------------------------------------------------------------------------------------------------------------
# operators: razor, psi, guide, shapes, reference formulas
# ---------------------------------------------------------------------------------------------------------------

def test_razor_split_is_a_channel_slice():
    x = torch.randn(2, 10, 3, 3)
    x_int, x_rest = razor_split(x, 4)
    assert torch.equal(x_int, x[:, :4]) and torch.equal(x_rest, x[:, 4:])
    with pytest.raises(ValueError, match='num_intrinsic'):
        razor_split(x, 0)


@pytest.mark.parametrize('strip_shape', [(2, 3, 9, 1), (2, 3, 1, 9)])
def test_psi_is_row_major_reshape(strip_shape):
    w = torch.arange(54.).reshape(strip_shape)
    sq = strip_to_square(w, 3)
    taps = w.reshape(2, 3, 9)
    for t in range(9):
        assert torch.equal(sq[:, :, t // 3, t % 3], taps[:, :, t])
    with pytest.raises(ValueError, match='k_s = k_d'):
        strip_to_square(torch.zeros(2, 3, 7, 1), 3)


def test_static_guide_uses_leading_subblock_of_both_strips():
    w_h, w_w = torch.randn(8, 8, 9, 1), torch.randn(8, 8, 1, 9)
    s = static_guide(w_h, w_w, 4, 3)
    assert s.shape == (4, 4, 3, 3)
    torch.testing.assert_close(s, w_h[:4, :4].reshape(4, 4, 3, 3) + w_w[:4, :4].reshape(4, 4, 3, 3))


@pytest.mark.parametrize('shape', [(2, 64, 13, 11), (1, 64, 5, 7), (2, 64, 1, 1), (1, 30, 6, 9)])
def test_sgdm_preserves_shape(shape):
    """Odd sizes, H/W smaller than the 15-tap spatial strips, and C not divisible by 4 (split [7, 7, 7, 9])."""
    m = SGDM(shape[1]).eval()
    with torch.no_grad():
        assert m(torch.randn(shape)).shape == shape


@pytest.mark.parametrize('kwargs,in_shape', [
    (dict(kernel_size=3, stride=2, padding=1), (2, 8, 11, 9)),
    (dict(kernel_size=3, dilation=2, padding=2), (2, 8, 10, 10)),
    (dict(kernel_size=3, groups=2, padding=1), (2, 8, 7, 7)),
    (dict(kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)), (3, 8, 9, 12)),
    (dict(kernel_size=1), (2, 8, 5, 5)),
])
def test_guided_dynamic_conv_geometry_matches_reference(kwargs, in_shape):
    """Shapes follow nn.Conv2d under stride/dilation/groups; values equal per-sample conv with (sum a D) (.) S."""
    layer = GuidedDynamicConv2d(8, 6, **kwargs).eval()
    ref = nn.Conv2d(8, 6, **kwargs)
    x = torch.randn(in_shape)
    guide = torch.randn(layer.weight.shape[1:])
    with torch.no_grad():
        y = layer(x, guide)
        assert y.shape == ref(x).shape
        alpha = layer.routing(F.adaptive_avg_pool2d(x, 1))
        for n in range(x.shape[0]):
            kernel = (alpha[n].reshape(-1, 1, 1, 1, 1) * layer.weight).sum(0) * guide
            expected = F.conv2d(x[n:n + 1], kernel, None, layer.stride, layer.padding, layer.dilation, layer.groups)
            torch.testing.assert_close(y[n:n + 1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='guide must have shape'):
        layer(x, torch.randn(3, 3))


@pytest.mark.parametrize('strategy', ['grouped', 'dense', 'loop'])
def test_guide_identity_per_expert(strategy):
    """(sum_k a_k D_k) (.) S == sum_k a_k (D_k (.) S): guided layer == unguided layer with D_k <- D_k (.) S."""
    guided = GuidedDynamicConv2d(6, 6, 3, padding=1, strategy=strategy).eval()
    folded = copy.deepcopy(guided)
    guide = torch.randn(6, 6, 3, 3)
    with torch.no_grad():
        folded.weight.mul_(guide)
    for k in range(guided.num_kernels):
        torch.testing.assert_close(folded.weight[k], guided.weight[k] * guide, rtol=0, atol=0)
    x = torch.randn(3, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(guided(x, guide), folded(x), rtol=1e-5, atol=1e-6)


def test_rdconv_equals_written_out_formula():
    rd = _randomize_bn(RDConv2d(16, spatial_kernel=5)).eval()
    x = torch.randn(3, 16, 9, 7)
    guide = torch.randn(8, 8, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(rd(x, guide), _reference_rdconv(rd, x, guide), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rd(x), _reference_rdconv(rd, x, None), rtol=1e-5, atol=1e-6)
        assert torch.equal(rd(x, guide)[:, 8:], x[:, 8:])  # Eq. 7's (1 - r) X passes through


def test_spatial_branch_is_product_of_strip_attentions():
    sp = StripSpatialAttention(4, kernel_size=5)
    x = torch.randn(2, 4, 6, 9)
    a = sp(x)
    assert a.shape == x.shape
    a_h = torch.sigmoid(sp.conv_h(x.mean(2, keepdim=True)))
    a_w = torch.sigmoid(sp.conv_w(x.mean(3, keepdim=True)))
    torch.testing.assert_close(a, a_h * a_w)
    assert ((a > 0) & (a < 1)).all()


def test_sgdm_equals_concat_of_branches():
    """Eq. 8-10: Cat(RDConv(X_rd; S), BN(conv9x1 X_h), BN(conv1x9 X_w), X_id) with S from the live strip kernels."""
    m = _randomize_bn(SGDM(32)).eval()
    x = torch.randn(2, 32, 10, 12)
    with torch.no_grad():
        y = m(x)
        x_rd, x_h, x_w, x_id = x.split([8, 8, 8, 8], 1)
        guide = m.conv_h.conv.weight[:4, :4].reshape(4, 4, 3, 3) + m.conv_w.conv.weight[:4, :4].reshape(4, 4, 3, 3)
        torch.testing.assert_close(y[:, :8], _reference_rdconv(m.rdconv, x_rd, guide), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[:, 8:16], m.conv_h.bn(F.conv2d(x_h, m.conv_h.conv.weight, padding=(4, 0))))
        torch.testing.assert_close(y[:, 16:24], m.conv_w.bn(F.conv2d(x_w, m.conv_w.conv.weight, padding=(0, 4))))
        assert torch.equal(y[:, 24:], x_id)


def test_static_strips_get_gradient_from_both_paths():
    """The guide is not detached (Eq. 10: the static kernels guide the dynamic one while both train). Loss on the RDConv slice only -> W_h gets gradient only in its leading
    c_i x c_i block (through the guide); loss on the H-strip slice only -> everywhere; together -> the sum."""
    m = SGDM(32).train()
    x = torch.randn(2, 32, 8, 8)

    def grad_of(slice_: slice) -> torch.Tensor:
        m.zero_grad()
        m(x)[:, slice_].square().mean().backward()
        return m.conv_h.conv.weight.grad.clone()

    g_rd, g_h, g_both = grad_of(slice(0, 8)), grad_of(slice(8, 16)), None
    m.zero_grad()
    y = m(x)
    (y[:, 0:8].square().mean() + y[:, 8:16].square().mean()).backward()
    g_both = m.conv_h.conv.weight.grad
    assert g_rd[:4, :4].abs().sum() > 0
    assert g_rd[4:].abs().sum() == 0 and g_rd[:, 4:].abs().sum() == 0
    assert (g_h != 0).float().mean() > 0.9
    torch.testing.assert_close(g_both, g_rd + g_h)


def test_gradcheck_float64():
    """Input and parameter gradients of SGDM (train-mode BN, guide live) on a small shape."""
    m = SGDM(8, spatial_kernel=3).double().train()  # c = 2, c_i = 1
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()
              if k in ('conv_h.conv.weight', 'conv_w.conv.weight', 'rdconv.dynamic.weight',
                       'rdconv.dynamic.routing.fc.weight', 'rdconv.spatial.conv_h.weight')}
    names = list(params)
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *tensors):
        return torch.func.functional_call(m, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize('strategy', ['grouped', 'dense', 'loop'])
def test_batch_consistency_eval(strategy):
    m = _randomize_bn(SGDM(32, strategy=strategy)).eval()
    x = torch.randn(4, 32, 7, 9)
    with torch.no_grad():
        batched = m(x)
        single = torch.cat([m(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_model_batch_consistency_eval():
    model = _calibrate_bn(timm.create_model('sgdm_cspdarknet_n', num_classes=10))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# reparameterization
# ---------------------------------------------------------------------------------------------------------------

def test_sgdm_reparameterize_module():
    m = _randomize_bn(SGDM(64)).eval()
    m.rdconv.bn.running_var.mul_(1e-3)  # the guided branch at O(1) scale: the fold is checked where it matters
    x = torch.randn(3, 64, 11, 9)
    raw = m.static_guide().detach().clone()
    experts, bn = m.rdconv.dynamic.weight.detach().clone(), copy.deepcopy(m.rdconv.bn)
    with torch.no_grad():
        before = m(x)
        reparameterize_model(nn.Sequential(m), inplace=True)  # the walker visits the SGDM, then its children
        after = m(x)
    assert (before - after).abs().max() <= 1e-5
    assert before[:, :32].abs().max() > 0.5
    assert m.guide is not None and not any(isinstance(q, nn.BatchNorm2d) for q in m.modules())
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    torch.testing.assert_close(m.guide, raw)
    torch.testing.assert_close(m.rdconv.dynamic.weight, experts * scale.reshape(1, -1, 1, 1, 1))
    state = copy.deepcopy(m.state_dict())
    reparameterize_model(nn.Sequential(m), inplace=True)  # idempotent
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(m)(x), after)


def test_reparameterize_refuses_strips_folded_alone():
    m = SGDM(32).eval()
    m.conv_h.reparameterize()
    with pytest.raises(RuntimeError, match='folded before the SGDM'):
        m.reparameterize()


def test_strip_and_rdconv_folds_standalone():
    strip = _randomize_bn(StaticStripConv(8, (9, 1))).eval()
    rd = _randomize_bn(RDConv2d(8, spatial_kernel=5)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        before_s, before_r = strip(x), rd(x)
        strip.reparameterize()
        rd.reparameterize()
        torch.testing.assert_close(strip(x), before_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rd(x), before_r, rtol=1e-5, atol=1e-6)
    assert strip.conv.bias is not None and strip.conv.kernel_size == (9, 1)


@pytest.mark.parametrize('name', MODELS)
def test_model_reparameterize_exact(name):
    """Every SGDM model, through timm's walker from training or eval mode: eval logits agree to 1e-5 (fp32,
    calibrated BNs); every BN is folded but the ResNet's root-level stem ``bn1``; every SGDM holds its guide;
    ``inference_mode=True`` builds the same structure (strict load, same outputs)."""
    model = _calibrate_bn(timm.create_model(name, num_classes=10), seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for mode in (True, False):
            fused = reparameterize_model(model.train(mode)).eval()
            assert (fused(x) - ref).abs().max() <= 1e-5
        torch.testing.assert_close(reparameterize_model(fused)(x), fused(x), rtol=0, atol=0)  # idempotent
        direct = timm.create_model(name, num_classes=10, inference_mode=True).eval()
        direct.load_state_dict(fused.state_dict(), strict=True)
        torch.testing.assert_close(direct(x), fused(x), rtol=0, atol=0)
    left = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == (['bn1'] if name == 'sgdm_resnet18' else [])
    assert all(m.guide is not None for m in fused.modules() if isinstance(m, SGDM))


def test_reparameterize_exact_in_float64():
    """The folds are identities, not approximations: in float64 the difference is at rounding level."""
    model = _calibrate_bn(timm.create_model('sgdm_cspdarknet_n', num_classes=10)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert (reparameterize_model(model)(x) - model(x)).abs().max() <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# detection features and host compatibility
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,channels', [
    ('sgdm_cspdarknet_n', [64, 128, 256]), ('sgdm_cspdarknet_s', [128, 256, 512])])
def test_cspdarknet_features_are_post_sgdm_p3_p5(name, channels):
    torch.manual_seed(1)
    model = timm.create_model(name).eval()
    torch.manual_seed(1)  # same init: the feature wrapper renames 'stages.N' to 'stages_N'
    feats = timm.create_model(name, features_only=True).eval()
    assert feats.feature_info.channels() == channels
    assert feats.feature_info.reduction() == [8, 16, 32]
    captured = []
    hooks = [model.stages[i].sgdm.register_forward_hook(lambda m, i, o: captured.append(o)) for i in (1, 2, 3)]
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        out = feats(x)
        inter = model.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)
    for h in hooks:
        h.remove()
    assert [tuple(o.shape) for o in out] == [(1, c, 96 // r, 64 // r) for c, r in zip(channels, (8, 16, 32))]
    for o, i, c in zip(out, inter, captured[-3:]):
        torch.testing.assert_close(o, i)
        torch.testing.assert_close(o, c)
    all_levels = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert all_levels.feature_info.reduction() == [2, 4, 8, 16, 32]


def test_resnet18_features_and_plain_resnet18_weights():
    model = timm.create_model('sgdm_resnet18').eval()
    feats = timm.create_model('sgdm_resnet18', features_only=True, out_indices=(2, 3, 4)).eval()
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')})
    assert feats.feature_info.channels() == [128, 256, 512]
    assert [feats.feature_info.module_name()[i] for i in range(3)] == ['sgdm2', 'sgdm3', 'sgdm4']
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for o, i in zip(feats(x), model.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True)):
            torch.testing.assert_close(o, i)
    result = model.load_state_dict(timm.create_model('resnet18').state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(('sgdm2.', 'sgdm3.', 'sgdm4.')) for k in result.missing_keys)


# ---------------------------------------------------------------------------------------------------------------
# bad input / config
# ---------------------------------------------------------------------------------------------------------------

def test_bad_inputs_and_configs_raise_clearly():
    m = SGDM(32)
    with pytest.raises(ValueError, match=r'SGDM expects \(B, 32, H, W\)'):
        m(torch.randn(1, 31, 8, 8))
    with pytest.raises(ValueError, match='SGDM expects'):
        m(torch.randn(32, 8, 8))
    with pytest.raises(ValueError, match='split_ratio'):
        SGDM(32, split_ratio=0.4)
    with pytest.raises(ValueError, match='static_kernel'):
        SGDM(32, static_kernel=7)
    with pytest.raises(ValueError, match='razor_ratio'):
        SGDM(32, razor_ratio=0.0)
    with pytest.raises(ValueError, match='no intrinsic channel'):
        SGDM(4, razor_ratio=0.5)  # c = 1, int(0.5 * 1) = 0
    with pytest.raises(ValueError, match='spatial_kernel'):
        RDConv2d(8, spatial_kernel=4)
    with pytest.raises(ValueError, match='sgdm_levels'):
        timm.create_model('sgdm_cspdarknet_n', sgdm_levels=(5,), device='meta')
    with pytest.raises(TypeError):
        timm.create_model('sgdm_resnet18', not_an_arg=1, device='meta')


def test_pretrained_refuses_no_weights_exist():
    import dynzoo
    with pytest.raises(dynzoo.PretrainedUnavailableError):
        timm.create_model('sgdm_cspdarknet_n', pretrained=True)
