"""A2D2C / A2D2C+: the layer's math (both modes against an explicit reference), sampling semantics, gradients,
mixed precision, temperature, BN folding, the registered networks and their parameter counts (Tables 3-6, 10, 11)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import dynzoo
from dynzoo.layers.a2d2c import A2D2CConv2d
from dynzoo.layers.temperature import linear_temperature
from dynzoo.layers.dynamic import STRATEGIES

torch.set_num_threads(1)

# (in, out, kernel, stride, padding, dilation, groups, bias)
GEOMETRIES = [
    (8, 12, 3, 1, 1, 1, 1, False),
    (8, 12, 3, 2, 1, 2, 4, True),        # groups, stride 2, dilation 2, bias
    (6, 6, 3, 2, 2, 1, 6, True),         # depthwise
    (5, 7, (3, 1), (2, 1), (0, 1), 1, 1, True),  # asymmetric kernel / stride / padding
    (4, 8, 1, 1, 0, 1, 1, False),        # pointwise
]


def _pair(geometry, dtype=torch.float64, num_kernels=3, num_points=7):
    cin, cout, k, s, p, d, g, bias = geometry
    fused = A2D2CConv2d(cin, cout, k, s, p, d, g, bias, num_kernels=num_kernels, num_points=num_points,
                        mode='fused').to(dtype)
    with torch.no_grad():
        fused.router.weight.normal_()
        fused.router.bias.normal_()
        if fused.bias is not None:
            fused.bias.normal_()
    summed = A2D2CConv2d(cin, cout, k, s, p, d, g, bias, num_kernels=num_kernels, num_points=num_points,
                         mode='sum').to(dtype)
    summed.load_state_dict(fused.state_dict())
    return fused, summed


def _reference(layer, x, positions):
    """Eq. 2-8 written out: every response map F_i, its mean at the sampled positions, router, softmax, mix."""
    k = layer.num_kernels
    responses = torch.stack([
        F.conv2d(x, layer.weight[i], None if layer.bias is None else layer.bias[i],
                 layer.stride, layer.padding, layer.dilation, layer.groups) for i in range(k)], 1)
    flat = responses.flatten(3)
    if positions.dim() == 2:
        desc = torch.stack([flat[:, i][..., positions[i]].mean(-1) for i in range(k)], 1)
    else:
        desc = torch.stack([
            torch.stack([flat[b, i][..., positions[b, i]].mean(-1) for i in range(k)]) for b in range(x.shape[0])])
    logits = desc @ layer.router.weight[0] + layer.router.bias
    pi = torch.softmax(logits / layer.router.temperature, 1)
    return torch.einsum('bk,bkohw->bohw', pi, responses), pi


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('num_points', [7, 100])  # sparse (gathered) and dense (weighted-map) descriptor paths
def test_modes_equal_reference(geometry, per_sample, num_points):
    torch.manual_seed(0)
    fused, summed = _pair(geometry, num_points=num_points)
    x = torch.randn(3, geometry[0], 9, 10, dtype=torch.float64)
    ho, wo = fused.output_size(x)
    shape = (3, 3, num_points) if per_sample else (3, num_points)
    positions = torch.randint(0, ho * wo, shape)
    ref, _ = _reference(fused, x, positions)
    y_fused = fused(x, positions)
    y_sum = summed(x, positions)
    assert y_fused.shape == ref.shape == (3, geometry[1], ho, wo)
    fused.eval()
    summed.eval()  # the all-positions mean (separable sums in fused mode, GAP of F_i in sum mode)
    everywhere = torch.arange(ho * wo).repeat(3, 1)
    ref_mean, _ = _reference(fused, x, everywhere)
    torch.testing.assert_close(fused(x), ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(summed(x), ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_fused, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_sum, ref, rtol=1e-10, atol=1e-10)


def test_modes_same_gradients():
    torch.manual_seed(1)
    fused, summed = _pair(GEOMETRIES[1])
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    positions = torch.randint(0, 16, (3, 7))  # 4x4 output
    g = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    (fused(x, positions) * g).sum().backward()
    (summed(x, positions) * g).sum().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), summed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize('mode', ['fused', 'sum'])
def test_batched_equals_per_sample_kernel_loop(mode):
    """Each sample's output is a plain conv with that sample's aggregated kernel sum_i pi_i W_i (+ sum_i pi_i b_i)."""
    torch.manual_seed(2)
    fused, summed = _pair(GEOMETRIES[1])
    layer = fused if mode == 'fused' else summed
    x = torch.randn(4, 8, 9, 9, dtype=torch.float64)
    positions = torch.randint(0, 16, (3, 7))  # 4x4 output
    _, pi = _reference(layer, x, positions)
    y = layer(x, positions)
    for strategy in STRATEGIES:  # the fused mode's aggregated conv runs through every core strategy alike
        layer.strategy = strategy
        torch.testing.assert_close(layer(x, positions), y, rtol=1e-10, atol=1e-10, msg=strategy)
    for n in range(4):
        w_n = torch.einsum('k,koihw->oihw', pi[n], layer.weight)
        b_n = pi[n] @ layer.bias
        y_n = F.conv2d(x[n:n + 1], w_n, b_n, layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(y[n:n + 1], y_n, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('eval_sampling', ['mean', 'fixed'])
@pytest.mark.parametrize('mode', ['fused', 'sum'])
def test_eval_deterministic_and_batch_independent(eval_sampling, mode):
    torch.manual_seed(3)
    layer = A2D2CConv2d(8, 8, 3, padding=1, num_points=10, mode=mode, eval_sampling=eval_sampling).eval()
    x = torch.randn(5, 8, 7, 7)
    y = layer(x)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    for n in range(5):
        torch.testing.assert_close(layer(x[n:n + 1]), y[n:n + 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x.flip(0)), y.flip(0), rtol=1e-5, atol=1e-6)


def test_eval_mean_is_expectation_of_sampling():
    """'mean' routes from the average of every output position: GAP of each response map (Eq. 3-4's expectation)."""
    torch.manual_seed(4)
    fused, _ = _pair(GEOMETRIES[0])
    fused.eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    everywhere = torch.arange(36).repeat(3, 1)  # every position once per kernel
    torch.testing.assert_close(fused(x), fused(x, everywhere), rtol=1e-10, atol=1e-10)


def test_training_sampling_is_random_and_seeded():
    layer = A2D2CConv2d(8, 8, 3, padding=1, num_points=4)
    with torch.no_grad():
        layer.router.weight.normal_(std=10.0)
    x = torch.randn(2, 8, 8, 8)
    torch.manual_seed(5)
    a = layer(x)
    b = layer(x)
    torch.manual_seed(5)
    c = layer(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    layer.eval()
    layer.eval_sampling = 'random'  # paper-literal evaluation stays stochastic
    assert not torch.allclose(layer(x), layer(x))


def test_fixed_sampling_positions_in_range():
    layer = A2D2CConv2d(4, 4, 3, stride=2, padding=1, num_points=100, eval_sampling='fixed').eval()
    positions = layer.sample_positions(1, (7, 7), torch.device('cpu'))
    torch.testing.assert_close(layer.sample_positions(1, (7, 7), torch.device('cpu')), positions)
    w = layer.sampling_weights(positions, 49, torch.float32)
    assert w.shape == (4, 49)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    assert (w > 0).sum() > 4 * 30  # spread over the map, not a few points


@pytest.mark.parametrize('mode', ['fused', 'sum'])
def test_gradcheck(mode):
    torch.manual_seed(6)
    layer = A2D2CConv2d(3, 4, 3, stride=2, padding=1, groups=1, bias=True, num_kernels=2, num_points=3,
                        mode=mode).double()
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 9, (2, 3))
    params = (layer.weight, layer.bias, layer.router.weight, layer.router.bias)

    def fn(inp, weight, bias, router_w, router_b):
        return torch.func.functional_call(
            layer, {'weight': weight, 'bias': bias, 'router.weight': router_w, 'router.bias': router_b},
            (inp, positions))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-5)


def test_gradcheck_grouped_per_sample_positions():
    torch.manual_seed(7)
    layer = A2D2CConv2d(4, 4, 3, padding=2, dilation=2, groups=2, num_kernels=2, num_points=3).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 16, (2, 2, 3))
    assert torch.autograd.gradcheck(lambda inp: layer(inp, positions), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('mode', ['fused', 'sum'])
def test_autocast_no_nan(dtype, mode):
    torch.manual_seed(8)
    layer = A2D2CConv2d(16, 16, 3, padding=1, mode=mode)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast('cpu', dtype=dtype):
        y = layer(x)
        y.float().sum().backward()
    assert torch.isfinite(y.float()).all()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.router.weight.grad).all()
    ref = layer.eval()(x)
    with torch.autocast('cpu', dtype=dtype):
        low = layer(x)
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_model_autocast_bf16():
    model = timm.create_model('a2d2c_plus_resnet18', num_classes=10).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(y.float()).all()


def test_temperature_helpers_reach_every_layer():
    model = timm.create_model('a2d2c_resnet18')
    assert dynzoo.set_temperature(model, 7.5) == model.num_dynamic == 16
    temps = dynzoo.get_temperatures(model)
    assert len(temps) == 16 and all(t == ('kernel', 7.5) for t in temps.values())
    assert 'layer3.1.conv2.router' in temps
    # the temperature divides the router logits
    layer = A2D2CConv2d(4, 4, 3, padding=1, num_kernels=3, num_points=5).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    positions = torch.randint(0, 36, (3, 5))
    _, pi1 = _reference(layer, x, positions)
    layer.router.set_temperature(30.0)
    pi30 = layer.routing(x, positions)
    torch.testing.assert_close(pi30, torch.softmax(torch.log(pi1) / 30.0, 1), rtol=1e-9, atol=1e-12)


def test_temperature_schedule():
    """§4.3: 30 -> 1 linearly over the first 10 epochs, per (0-based) step."""
    assert linear_temperature(0, 100) == 30.0
    assert linear_temperature(500, 100) == pytest.approx(15.5)
    assert linear_temperature(1000, 100) == 1.0
    assert linear_temperature(5000, 100) == 1.0
    with pytest.raises(ValueError):
        linear_temperature(0, 0)


@pytest.mark.parametrize('mode', ['fused', 'sum'])
@pytest.mark.parametrize('bias', [False, True])
def test_fuse_bn_keeps_routing(mode, bias):
    """The BN folds into a per-channel map after the mixture; the router still reads the raw responses."""
    torch.manual_seed(9)
    layer = A2D2CConv2d(6, 8, 3, padding=1, bias=bias, num_kernels=3, num_points=6, mode=mode).double()
    with torch.no_grad():
        layer.router.weight.normal_(std=3.0)
    bn = nn.BatchNorm2d(8).double()
    with torch.no_grad():
        bn.weight.uniform_(-2.0, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    layer.eval()
    bn.eval()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    positions = torch.randint(0, 49, (3, 6))
    ref_mean = bn(layer(x))
    ref_pos = bn(layer(x, positions))
    bank = layer.weight.clone()
    layer.fuse_bn(bn)
    assert layer.post_bias is not None and layer.post_scale is not None
    assert torch.equal(layer.weight, bank)
    torch.testing.assert_close(layer(x), ref_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x, positions), ref_pos, rtol=1e-10, atol=1e-10)


def test_fuse_bn_zero_gamma_is_exact():
    """A zero BN gamma (timm's zero_init_last) folds exactly: that channel becomes the constant BN shift."""
    torch.manual_seed(3)
    layer = A2D2CConv2d(4, 4, 3, padding=1).double().eval()
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.weight[1] = 0.0
        bn.bias.normal_()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = bn(layer(x))
    layer.fuse_bn(bn)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)
    assert torch.all(layer(x)[:, 1] == bn.bias[1])


def test_bad_inputs_and_config():
    with pytest.raises(ValueError, match='mode'):
        A2D2CConv2d(4, 4, 3, mode='naive')
    with pytest.raises(ValueError, match='eval_sampling'):
        A2D2CConv2d(4, 4, 3, eval_sampling='gap')
    with pytest.raises(ValueError, match='num_points'):
        A2D2CConv2d(4, 4, 3, num_points=0)
    with pytest.raises(ValueError, match='padding_mode'):
        A2D2CConv2d(4, 4, 3, padding_mode='reflect')
    layer = A2D2CConv2d(4, 4, 3, padding=1, num_kernels=2)
    with pytest.raises(ValueError, match='input channels'):
        layer(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match='4-D'):
        layer(torch.randn(4, 6, 6))
    with pytest.raises(ValueError, match='positions must have shape'):
        layer(torch.randn(2, 4, 6, 6), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match='must lie in'):
        layer(torch.randn(2, 4, 6, 6), torch.full((2, 5), 36, dtype=torch.long))
    with pytest.raises(ValueError, match='placement'):
        timm.create_model('a2d2c_resnet18', placement='everywhere')
    with pytest.raises(ValueError, match='placement'):
        timm.create_model('a2d2c_resnet18', placement='depthwise')  # MobileNetV2-only name
    with pytest.raises(ValueError, match='placement'):
        timm.create_model('a2d2c_mobilenetv2_050', placement='first3x3_s234')  # ResNet-only name
    with pytest.raises(TypeError):
        timm.create_model('a2d2c_resnet18', not_an_argument=1)


def test_pretrained_unavailable():
    with pytest.raises(dynzoo.PretrainedUnavailableError):
        timm.create_model('a2d2c_resnet18.untrained', pretrained=True)


def test_weights_interchangeable_between_modes():
    """A2D2C and A2D2C+ share keys and shapes; eval outputs agree (Eq. 8: the sum of the K responses is the
    response of the summed kernel)."""
    torch.manual_seed(10)
    fused = timm.create_model('a2d2c_resnet18', num_classes=10).eval()
    plus = timm.create_model('a2d2c_plus_resnet18', num_classes=10).eval()
    plus.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plus(x), fused(x), rtol=1e-4, atol=1e-4)


def _count(name, **kwargs):
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters()), model


# computed counts (K=4, M=100, 1000 classes) and the paper's printed counts with their tolerance
EXPECTED = {
    'resnet18': (44_649_784, 44.9e6, 0.01),
    'resnet50': (87_609_560, 89.70e6, 0.025),
    'mobilenetv2_050': (3_984_099, 4.05e6, 0.15e6),
    'mobilenetv2_075': (6_634_179, None, None),   # paper 5.08 M (Table 3) fits no placement: not asserted
    'mobilenetv2_100': (10_088_635, 10.21e6, 0.15e6),
}


@pytest.mark.parametrize('arch', sorted(EXPECTED))
def test_param_counts(arch):
    exact, paper, tol = EXPECTED[arch]
    n_fused, model = _count(f'a2d2c_{arch}')
    n_plus, _ = _count(f'a2d2c_plus_{arch}')
    assert n_fused == n_plus == exact
    assert model.num_dynamic == (16 if arch == 'resnet18' else 48 if arch == 'resnet50' else 51)
    info = dynzoo.models.MODEL_INFO[f'a2d2c_{arch}']
    assert info['family'] == 'a2d2c' and info['paper_params']
    if paper is not None:
        bound = tol * paper if tol < 1 else tol
        assert abs(exact - paper) <= bound


def test_param_counts_ablations():
    assert _count('a2d2c_resnet18', placement='first_conv', num_kernels=8)[0] == 44_721_584   # Table 10: 44.78 M
    assert _count('a2d2c_resnet50', placement='first_conv', num_kernels=8)[0] == 55_867_128   # Table 10: 55.95 M
    # the Sec. 3.3 text reading: first 3x3 of each block in stages 2-4 / the depthwise 3x3 only
    assert _count('a2d2c_resnet18', placement='first3x3_s234')[0] == 25_625_902
    assert _count('a2d2c_resnet50', placement='first3x3_s234')[0] == 59_180_597
    for arch, expected in (('050', 2_069_945), ('075', 2_788_985), ('100', 3_704_697)):
        assert _count(f'a2d2c_mobilenetv2_{arch}', placement='depthwise')[0] == expected
    # Table 11: every extra kernel adds the ResNet-18 block 3x3 weights (10,985,472); paper slope 10.985 M
    k4, k8 = _count('a2d2c_resnet18')[0], _count('a2d2c_resnet18', num_kernels=8)[0]
    assert k8 - k4 == 4 * 10_985_472
    assert abs(k8 - 88.87e6) / 88.87e6 < 0.01


def test_per_layer_counts():
    _, model = _count('a2d2c_resnet18')
    expected = {'layer1.0.conv1': 147_521, 'layer2.0.conv1': 295_041, 'layer4.0.conv1': 4_719_105,
                'layer4.1.conv2': 9_437_697}
    for name, n in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, A2D2CConv2d)
        assert sum(p.numel() for p in layer.parameters()) == n
    _, mbv2 = _count('a2d2c_mobilenetv2_100')
    assert sum(p.numel() for p in mbv2.blocks[0][0].conv_dw.parameters()) == 1_185
    assert sum(p.numel() for p in mbv2.blocks[0][0].conv_pw.parameters()) == 2_065


def test_state_dict_keys():
    _, model = _count('a2d2c_resnet18')
    keys = set(model.state_dict())
    assert {'layer1.0.conv1.weight', 'layer1.0.conv1.router.weight', 'layer1.0.conv1.router.bias',
            'layer1.0.conv1.router.temperature'} <= keys
    assert model.get_submodule('layer1.0.conv1').weight.shape == (4, 64, 64, 3, 3)
