"""FMDConv (Zhang et al., KBS 317, 2025): the layer's math, parameter counts, temperatures, and parity with the
authors' code (tianyu00824/FMDConv); section, equation and table numbers are the paper's.

The reference forward here is Algorithm 1 written out per sample from the layer's own parameters with plain
``F.conv2d`` -- it uses none of dynzoo's execution code.
"""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

import dynzoo
from dynzoo.layers import FMDConv2d, set_default_strategy
from dynzoo.models import MODEL_INFO
from conftest import official_fixture

torch.set_num_threads(1)

FMD_MODELS = ['fmdconv_resnet18', 'fmdconv_resnet34', 'fmdconv_resnet50', 'fmdconv_resnet101',
              'fmdconv_mobilenetv2_050', 'fmdconv_mobilenetv2_075', 'fmdconv_mobilenetv2_100']


# --- helpers ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def _randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and BN statistic away from init so each attention is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in layer.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() > 1 else 0.3))
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))
    return layer


def _attentions(layer: FMDConv2d, x: torch.Tensor):
    """Eq. 5-6 step by step from the layer's submodules: (alpha_in (B,C_in), alpha_out (B,C_out), alpha_k (B,K))."""
    b = x.shape[0]
    s = x.mean((2, 3), keepdim=True)
    a_in = x.new_ones(b, layer.in_channels)
    a_out = x.new_ones(b, layer.out_channels)
    att = layer.attention
    if att is not None:
        a = F.relu(att.bn(att.fc(s)))
        if att.channel_fc is not None:
            a_in = torch.sigmoid(att.channel_fc(a).flatten(1) / att.temperature)
        if att.filter_fc is not None:
            a_out = torch.sigmoid(att.filter_fc(a).flatten(1) / att.temperature)
    if layer.attention2 is not None:
        k2 = layer.attention2
        a_k = torch.softmax(k2.fc2(F.relu(k2.fc1(s))).flatten(1) / k2.temperature, dim=1)
    else:
        a_k = x.new_ones(b, layer.num_kernels)
    return a_in, a_out, a_k


def reference_forward(layer: FMDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 per sample: ``y_n = a_out * conv(a_in * x_n, sum_i a_k,i W_i, sum_i a_k,i b_i)``."""
    a_in, a_out, a_k = _attentions(layer, x)
    outs = []
    for n in range(x.shape[0]):
        w = sum(a_k[n, i] * layer.weight[i] for i in range(layer.num_kernels))
        b = None if layer.bias is None else sum(a_k[n, i] * layer.bias[i] for i in range(layer.num_kernels))
        y = F.conv2d(x[n:n + 1] * a_in[n].view(1, -1, 1, 1), w, b, layer.stride, layer.padding, layer.dilation,
                     layer.groups)
        outs.append(y * a_out[n].view(1, -1, 1, 1))
    return torch.cat(outs)


def eq5_forward(layer: FMDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 5 in weight space: ``W_n = sum_i a_k,i (a_out (x) a_in) . W_i``, bias ``a_out * b_n``."""
    a_in, a_out, a_k = _attentions(layer, x)
    c_out, c_in_g = layer.out_channels, layer.in_channels // layer.groups
    group_of_out = torch.arange(c_out) // (c_out // layer.groups)
    in_index = group_of_out[:, None] * c_in_g + torch.arange(c_in_g)[None, :]  # (C_out, C_in/g)
    outs = []
    for n in range(x.shape[0]):
        scale = a_out[n][:, None] * a_in[n][in_index]  # (C_out, C_in/g)
        w = sum(a_k[n, i] * layer.weight[i] for i in range(layer.num_kernels)) * scale[:, :, None, None]
        b = None if layer.bias is None else a_out[n] * (a_k[n] @ layer.bias)
        outs.append(F.conv2d(x[n:n + 1], w, b, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def closed_form_layer_params(c_in: int, c_out: int, k: int, groups: int, num_kernels: int,
                      kernel_taps: int = None) -> int:
    """The layer's parameter count in closed form, from Sec. 3.3 and the authors' ``FMDConv2d`` (reduction 1/16,
    min 16, kernel ratio 1/4, H = K when C_in == 3)."""
    taps = k * k if kernel_taps is None else kernel_taps
    a = max(int(c_in * 0.0625), 16)
    h = num_kernels if c_in == 3 else int(c_in * 0.25) + 1
    depthwise = c_in == groups == c_out
    return (num_kernels * c_out * (c_in // groups) * taps + num_kernels * c_out
            + (c_in * a + 2 * a) + (a * c_in + c_in) + (0 if depthwise else a * c_out + c_out)
            + (c_in * h + h * num_kernels + num_kernels))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- §1.4: the layer's forward -------------------------------------------------------------------------------------

GEOMETRIES = {
    # name: (C_in, C_out, kernel, stride, padding, dilation, groups)
    'plain3x3': (8, 16, 3, 1, 1, 1, 1),
    'stride2': (8, 16, 3, 2, 1, 1, 1),
    'dilation2': (8, 8, 3, 1, 2, 2, 1),
    'groups4': (8, 16, 3, 1, 1, 1, 4),
    'depthwise': (8, 8, 3, 1, 1, 1, 8),
    'depthwise_s2_d2': (8, 8, 3, 2, 2, 2, 8),
    'pointwise': (8, 12, 1, 1, 0, 1, 1),
    'rect_kernel': (8, 12, (3, 1), (2, 1), (1, 0), 1, 1),
}


@pytest.mark.parametrize('geometry', list(GEOMETRIES))
@pytest.mark.parametrize('strategy', ['grouped', 'dense', 'loop', 'auto'])
def test_forward_matches_per_sample_reference(geometry, strategy):
    c_in, c_out, k, s, p, d, g = GEOMETRIES[geometry]
    layer = FMDConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, num_kernels=3,
                      kernel_temperature=2.5, gate_temperature=1.5, strategy=strategy, dtype=torch.float64)
    _randomize(layer, seed=hash(geometry) % 1000).eval()
    assert (layer.attention.filter_fc is None) == (g == c_in == c_out)  # ODConv rule: no alpha_out for depthwise
    x = torch.randn(3, c_in, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        ref = reference_forward(layer, x)
        static = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, dtype=torch.float64)
        assert y.shape == static(x).shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, eq5_forward(layer, x), rtol=1e-10, atol=1e-10)
        # per-sample: sample n of a batch equals sample n alone
        torch.testing.assert_close(layer(x[1:2]), y[1:2], rtol=1e-10, atol=1e-10)


def test_forward_train_mode_uses_batch_statistics():
    layer = _randomize(FMDConv2d(8, 16, 3, padding=1, dtype=torch.float64)).train()
    x = torch.randn(4, 8, 7, 7, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y, reference_forward(layer, x), rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())  # every parameter is used (DDP-safe)


def test_toggle_dynamic_conv():
    """Input and output attention off: DynamicConv (Chen et al.) -- kernel attention only."""
    layer = FMDConv2d(8, 16, 3, padding=1, num_kernels=4, use_input_attn=False, use_output_attn=False,
                      dtype=torch.float64)
    _randomize(layer).eval()
    assert layer.attention is None and layer.attention2 is not None
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    k2 = layer.attention2
    a_k = torch.softmax(k2.fc2(F.relu(k2.fc1(x.mean((2, 3), keepdim=True)))).flatten(1), dim=1)
    expected = torch.cat([
        F.conv2d(x[n:n + 1], torch.einsum('k,koihw->oihw', a_k[n], layer.weight), a_k[n] @ layer.bias, 1, 1)
        for n in range(3)])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert n_params(layer) == 4 * 16 * 8 * 9 + 4 * 16 + (8 * 3 + 3 * 4 + 4)  # bank + bias + fc1/fc2 (H = 8/4+1)


@pytest.mark.parametrize('geometry', ['plain3x3', 'stride2', 'groups4', 'depthwise', 'rect_kernel'])
def test_toggle_static_conv(geometry):
    """K = 1 and every attention off: exactly ``nn.Conv2d`` with weight[0], bias[0]."""
    c_in, c_out, k, s, p, d, g = GEOMETRIES[geometry]
    layer = FMDConv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, num_kernels=1,
                      use_input_attn=False, use_output_attn=False, use_kernel_attn=False, dtype=torch.float64)
    _randomize(layer)
    assert layer.attention is None and layer.attention2 is None
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[0])
        conv.bias.copy_(layer.bias[0])
    x = torch.randn(2, c_in, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    assert n_params(layer) == n_params(conv)


@pytest.mark.parametrize('use_input, use_output', [(True, False), (False, True)])
def test_toggle_single_gate(use_input, use_output):
    layer = FMDConv2d(8, 16, 3, padding=1, use_input_attn=use_input, use_output_attn=use_output,
                      dtype=torch.float64)
    _randomize(layer).eval()
    assert (layer.attention.channel_fc is not None) == use_input
    assert (layer.attention.filter_fc is not None) == use_output
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-10, atol=1e-10)


def test_k1_keeps_kernel_branch():
    """The kernel-attention branch exists at K = 1 (Table 9 counts it) and is the constant 1."""
    layer = _randomize(FMDConv2d(8, 16, 3, padding=1, num_kernels=1, dtype=torch.float64)).eval()
    assert layer.attention2 is not None
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer.attention2(x.mean((2, 3), keepdim=True)), torch.ones(2, 1, dtype=torch.float64))
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('strategy, groups', [('grouped', 1), ('grouped', 2), ('dense', 2)])
def test_gradcheck(strategy, groups):
    torch.manual_seed(0)
    layer = FMDConv2d(2, 4, 3, stride=1, padding=1, groups=groups, num_kernels=2, kernel_temperature=1.7,
                      strategy=strategy, dtype=torch.float64)
    _randomize(layer).train()  # BN of the trunk on batch statistics (B = 2)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-6, rtol=1e-4)


# --- parameter counts (Table 9) --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, c_in, c_out, stride, k4, k1', [
    ('layer1.0.conv1', 64, 64, 1, 152_104, 41_266),
    ('layer2.0.conv1', 64, 128, 2, 300_904, 79_282),
    ('layer4.0.conv1', 256, 512, 2, 4_754_728, 1_214_050),
    ('layer4.1.conv2', 512, 512, 1, 9_556_040, 2_476_226),
])
def test_layer_params_resnet18(name, c_in, c_out, stride, k4, k1):
    for num_kernels, expected in ((4, k4), (1, k1)):
        layer = FMDConv2d(c_in, c_out, 3, stride=stride, padding=1, num_kernels=num_kernels, device='meta')
        assert n_params(layer) == expected
        assert closed_form_layer_params(c_in, c_out, 3, 1, num_kernels) == expected
        model = timm.create_model('fmdconv_resnet18', num_kernels=num_kernels, device='meta')
        in_model = model.get_submodule(name)
        assert isinstance(in_model, FMDConv2d) and in_model.stride == (stride, stride)
        assert n_params(in_model) == expected


def test_layer_params_mobilenetv2_100():
    model = timm.create_model('fmdconv_mobilenetv2_100', device='meta')
    # torchvision's features.1 (dw 32, pw-linear 32->16) and features.2 (pw 16->96) are timm's:
    for name, expected in (('blocks.0.0.conv_dw', 2_696), ('blocks.0.0.conv_pw', 3_800),
                           ('blocks.1.0.conv_pw', 8_824)):
        layer = model.get_submodule(name)
        assert isinstance(layer, FMDConv2d)
        assert n_params(layer) == expected, name
        assert closed_form_layer_params(layer.in_channels, layer.out_channels, layer.kernel_size[0], layer.groups,
                                 layer.num_kernels) == expected


# counts computed with the authors' layer rules (the paper reports only ResNet-18's, Table 9); None: checked below only
EXPECTED_PARAMS = {
    'fmdconv_resnet18': 45_203_400, 'fmdconv_resnet34': None, 'fmdconv_resnet50': 95_405_480,
    'fmdconv_resnet101': None, 'fmdconv_mobilenetv2_050': 5_064_384, 'fmdconv_mobilenetv2_075': 8_877_776,
    'fmdconv_mobilenetv2_100': 13_915_368,
}
STATIC_HOST = {n: n.replace('fmdconv_', '') for n in FMD_MODELS}  # timm's static network of the same layout
N_DYNAMIC = {'fmdconv_resnet18': 16, 'fmdconv_resnet34': 32, 'fmdconv_resnet50': 48, 'fmdconv_resnet101': 99,
             'fmdconv_mobilenetv2_050': 51, 'fmdconv_mobilenetv2_075': 51, 'fmdconv_mobilenetv2_100': 51}


@pytest.mark.parametrize('name', FMD_MODELS)
def test_model_params(name):
    model = timm.create_model(name, device='meta')
    total = n_params(model)
    if EXPECTED_PARAMS[name] is not None:
        assert total == EXPECTED_PARAMS[name]
    # independent of the table: timm's static network, every replaced conv swapped for the closed-form count
    layers = [m for m in model.modules() if isinstance(m, FMDConv2d)]
    assert len(layers) == N_DYNAMIC[name]
    static = timm.create_model(STATIC_HOST[name], device='meta')
    swapped = sum(closed_form_layer_params(m.in_channels, m.out_channels, m.kernel_size[0], m.groups, m.num_kernels,
                                    kernel_taps=m.kernel_size[0] * m.kernel_size[1])
                  - m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                  for m in layers)
    assert total == n_params(static) + swapped
    if name == 'fmdconv_resnet18':
        assert MODEL_INFO[name]['paper_params'] == total


TABLE9 = {1: 12.23, 2: 23.22, 4: 45.20, 6: 67.18, 8: 89.16, 16: 177.09}  # paper, millions (CIFAR-100, 1000-cls head)


@pytest.mark.parametrize('num_kernels', sorted(TABLE9))
def test_table9_closed_form(num_kernels):
    model = timm.create_model('fmdconv_resnet18', num_kernels=num_kernels, device='meta')
    total = n_params(model)
    assert total == 1_242_632 + num_kernels * 10_990_192  # static part + K x (the 16 block convs' kernels)
    assert round(total / 1e6, 2) == TABLE9[num_kernels]
    assert all(m.num_kernels == num_kernels for m in model.modules() if isinstance(m, FMDConv2d))


@pytest.mark.parametrize('num_kernels, expected', [(1, 11_771_124), (4, 44_741_700)])
def test_table9_hundred_classes(num_kernels, expected):
    model = timm.create_model('fmdconv_resnet18', num_kernels=num_kernels, num_classes=100, device='meta')
    assert n_params(model) == expected


# --- §1.5: temperatures --------------------------------------------------------------------------------------------

def test_temperature_schedule():
    temps = [dynzoo.fmdconv_temperature(e) for e in range(16)]
    assert temps == [40.0, 37.0, 34.0, 31.0, 28.0, 25.0, 22.0, 19.0, 16.0, 13.0, 10.0, 7.0, 4.0, 1.0, 1.0, 1.0]
    assert dynzoo.fmdconv_temperature(100) == 1.0
    # every Table 8 initial temperature is 1 mod 3: the schedule lands exactly on 1 at epoch (t0 - 1) / 3
    for t0 in (1, 10, 22, 31, 34, 37, 40, 43, 46, 49):
        e = (t0 - 1) // 3
        assert dynzoo.fmdconv_temperature(e, t0=t0) == 1.0
        assert e == 0 or dynzoo.fmdconv_temperature(e - 1, t0=t0) == 4.0
    assert dynzoo.fmdconv_temperature(5, t0=10, decrement=2) == 1.0
    assert dynzoo.fmdconv_temperature(2, t0=10, decrement=2) == 6.0


def test_set_temperature_reaches_every_head():
    model = timm.create_model('fmdconv_mobilenetv2_050')
    temps = dynzoo.get_temperatures(model)
    assert len(temps) == 2 * 51 and all(t == 1.0 for _, t in temps.values())  # defaults: inference-correct
    assert dynzoo.set_temperature(model, 37.0) == 51  # role 'kernel' by default: the softmax only
    temps = dynzoo.get_temperatures(model)
    assert all(t == (37.0 if role == 'kernel' else 1.0) for role, t in temps.values())
    assert dynzoo.set_temperature(model, 2.0, role='gate') == 51
    assert dynzoo.set_temperature(model, 3.0, role=None) == 102
    assert {t for _, t in dynzoo.get_temperatures(model).values()} == {3.0}
    # the temperatures are buffers: they travel with the state dict
    sd = model.state_dict()
    assert sd['blocks.1.0.conv_dw.attention2.temperature'] == 3.0
    # constructor kwargs set them at build time (and timm records them as model args)
    built = timm.create_model('fmdconv_mobilenetv2_050', kernel_temperature=40.0, gate_temperature=30.0)
    assert {(r, t) for r, t in dynzoo.get_temperatures(built).values()} == {('kernel', 40.0), ('gate', 30.0)}


def test_temperature_changes_the_kernel_attention():
    layer = _randomize(FMDConv2d(8, 8, 3, padding=1, num_kernels=4, dtype=torch.float64)).eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    pooled = x.mean((2, 3), keepdim=True)
    sharp = layer.attention2(pooled)
    y1 = layer(x)
    dynzoo.set_temperature(layer, 1e6)
    flat = layer.attention2(pooled)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.25), rtol=0, atol=1e-5)  # T -> inf: uniform
    assert (sharp - 0.25).abs().max() > 1e-2
    assert (layer(x) - y1).abs().max() > 1e-6
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-10, atol=1e-10)


# --- parity with the authors' code (fixture README) -----------------------------------------------------------------

def _authors_checkpoint(tmp_path: Path):
    """The fixture's state dict, wrapped as the authors' main.py saves it, as a .pth file."""
    sd, x, logits, meta = official_fixture('fmdconv_resnet18')
    assert len(sd) == meta['n_state_keys']
    container = {
        'epoch': 100, 'best_acc': 73.21,
        'state_dict': {'module.' + k: v for k, v in sd.items()},
        'optimizer': {'state': {}, 'param_groups': [dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                                                         params=list(range(len(sd))))]},
    }
    path = tmp_path / 'fmd_resnet18_checkpoint.pth'
    torch.save(container, str(path))
    assert isinstance(torch.load(str(path), weights_only=True), dict)
    return path, x, logits, meta


@pytest.fixture(scope='module')
def authors_model(tmp_path_factory):
    path, x, logits, meta = _authors_checkpoint(tmp_path_factory.mktemp('fmd_parity'))
    model = timm.create_model('fmdconv_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return model.eval(), x, logits, meta


def _tolerance(logits: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize('strategy', ['auto', 'grouped', 'dense'])
def test_parity_with_authors_logits(authors_model, strategy):
    model, x, logits, meta = authors_model
    assert x.shape == (2, 3, 224, 224)
    assert n_params(model) == meta['params'] == 45_203_400
    set_default_strategy(strategy)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        set_default_strategy('auto')
    diff = float((out - logits).abs().max())
    print(f'fmdconv_resnet18 parity [{strategy}]: max|diff| = {diff:.3e} (tolerance {_tolerance(logits):.3e})')
    assert diff <= _tolerance(logits)


def test_parity_temperatures_are_the_authors(authors_model):
    """The converter writes the authors' inference temperatures: kernel softmax 34 (their update method is
    misspelled and never runs), sigmoid gates 1 (end of their 30 -> 1 anneal). With the kernel softmax at the
    paper's final T = 1 instead, the logits do not match: the conversion is what makes parity."""
    model, x, logits, _ = authors_model
    temps = dynzoo.get_temperatures(model)
    assert len(temps) == 32
    assert all(t == (34.0 if role == 'kernel' else 1.0) for role, t in temps.values())
    try:
        dynzoo.set_temperature(model, 1.0)
        with torch.no_grad():
            diff = float((model(x) - logits).abs().max())
    finally:
        dynzoo.set_temperature(model, 34.0)
    assert diff > 10 * _tolerance(logits)


def test_parity_batch_consistency(authors_model):
    model, x, logits, _ = authors_model
    with torch.no_grad():
        single = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert float((single - logits).abs().max()) <= _tolerance(logits)
