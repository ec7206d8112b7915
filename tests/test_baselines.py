"""The dynamic-conv baselines (ODConv, DynamicConv, CondConv): layer math against per-sample references written
from the papers' equations, gradients, mixed precision, temperatures, BN folding, parameter counts against the
authors' code / printed tables, and the conversion of the ODConv authors' checkpoints."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.layers.dynamic import STRATEGIES
from dynzoo.layers.odconv import DynamicConv2d, ODConv2d, RoutedCondConv2d

torch.set_num_threads(1)

# (in, out, kernel, stride, padding, dilation, groups)
GEOMETRIES = [
    (8, 12, 3, 1, 1, 1, 1),
    (8, 12, 3, 2, 2, 2, 4),
    (6, 6, 3, 2, 1, 1, 6),      # depthwise
    (8, 16, 1, 1, 0, 1, 1),     # pointwise
]
LAYERS = {
    'odconv4': lambda *g: ODConv2d(*g, num_kernels=4),
    'odconv1': lambda *g: ODConv2d(*g, num_kernels=1),
    'dyconv': lambda *g: DynamicConv2d(*g, bias=True, num_kernels=4),
    'condconv': lambda *g: RoutedCondConv2d(*g, bias=True, num_kernels=3),
}


def _randomize(layer, scale=0.3):
    """Move every parameter and buffer away from init so every branch matters (zero biases, BN stats)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * scale)
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return layer


def _reference(layer, x):
    """Per sample: build the kernel in weight space exactly as the papers write it and run one plain conv.

    ODConv Eq. 2: W_n = sum_i a_wi a_fi a_ci a_si W_i (filter attention on the output dim, channel attention on
    the input dim of the kernel); DynamicConv/CondConv Eq. 1: W_n = sum_i pi_i W_i, b_n = sum_i pi_i b_i."""
    kernel, in_scale, out_scale, spatial = layer.forward_attention(x)
    k, c_out, c_in_g, kh, kw = layer.weight.shape
    outs = []
    for n in range(x.shape[0]):
        w = layer.weight
        if spatial is not None:
            w = w * spatial[n].reshape(1, 1, 1, kh, kw)
        if in_scale is not None:  # input channel c of group g is kernel slot (g, c)
            w = w * in_scale[n].reshape(layer.groups, 1, c_in_g).repeat_interleave(
                c_out // layer.groups, 0).reshape(1, c_out, c_in_g, 1, 1)
        if out_scale is not None:
            w = w * out_scale[n].reshape(1, c_out, 1, 1, 1)
        alpha = kernel[n] if kernel is not None else torch.ones(1, dtype=x.dtype)
        w_n = torch.einsum('k,koihw->oihw', alpha.to(x.dtype), w)
        b_n = None
        if layer.bias is not None:
            b_n = alpha.to(x.dtype) @ layer.bias
            if out_scale is not None:
                b_n = b_n * out_scale[n]
        outs.append(F.conv2d(x[n:n + 1], w_n, b_n, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_batched_equals_per_sample_reference(kind, geometry):
    torch.manual_seed(0)
    layer = _randomize(LAYERS[kind](*geometry).double()).eval()
    x = torch.randn(3, geometry[0], 9, 9, dtype=torch.float64)
    ref = _reference(layer, x)
    for strategy in STRATEGIES:
        layer.strategy = strategy
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10, msg=f'{kind} {strategy}')


def test_odconv_heads_follow_authors_rules():
    keys = set(ODConv2d(16, 32, 3, num_kernels=4).state_dict())
    for head in ('fc', 'bn', 'channel_fc', 'filter_fc', 'spatial_fc', 'kernel_fc'):
        assert any(k.startswith(f'attention.{head}.') for k in keys), head
    depthwise = ODConv2d(16, 16, 3, groups=16).attention
    assert depthwise.filter_fc is None and depthwise.spatial_fc is not None
    pointwise = ODConv2d(16, 32, 1).attention
    assert pointwise.spatial_fc is None
    single = ODConv2d(16, 32, 3, num_kernels=1).attention
    assert single.kernel_fc is None
    assert ODConv2d(100, 8, 3).attention.fc.out_channels == 16      # A = max(int(100/16), 16)
    assert ODConv2d(512, 8, 3).attention.fc.out_channels == 32


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_gradcheck(kind):
    torch.manual_seed(1)
    layer = _randomize(LAYERS[kind](4, 4, 3, 2, 1, 1, 2).double()).eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-5)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())

    def fn(*ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x.detach(),))

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_autocast_no_nan(kind, dtype):
    torch.manual_seed(2)
    layer = LAYERS[kind](16, 16, 3, 1, 1, 1, 1)
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast('cpu', dtype=dtype):
        y = layer(x)
        y.float().sum().backward()
    assert torch.isfinite(y.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_model_autocast_bf16():
    model = timm.create_model('odconv_resnet18', num_classes=10).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize('kind', sorted(LAYERS))
def test_fuse_bn(kind):
    torch.manual_seed(3)
    layer = _randomize(LAYERS[kind](6, 8, 3, 1, 1, 1, 1).double()).eval()
    bn = nn.BatchNorm2d(8).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    ref = bn(layer(x))
    layer.fuse_bn(bn)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


def test_temperature_helpers():
    od = timm.create_model('odconv_resnet18')
    assert dynzoo.set_temperature(od, 12.0) == 16
    assert all(t == ('kernel', 12.0) for t in dynzoo.get_temperatures(od).values())
    od1 = timm.create_model('odconv_resnet18_1x')
    assert dynzoo.set_temperature(od1, 3.0) == 16   # no kernel head, but the sigmoid heads use T too
    dy = timm.create_model('dyconv_resnet18')
    assert dynzoo.set_temperature(dy, 30.0) == 19 == dy.num_dynamic  # 16 block convs + 3 downsample 1x1s
    assert all(v == ('kernel', 30.0) for v in dynzoo.get_temperatures(dy).values())
    with pytest.raises(ValueError):  # CondConv's sigmoid routing has no temperature
        dynzoo.set_temperature(timm.create_model('condconv_resnet18'), 2.0)
    # the temperature really divides the logits
    layer = _randomize(DynamicConv2d(8, 8, 3, padding=1).double())
    pooled = F.adaptive_avg_pool2d(torch.randn(2, 8, 5, 5, dtype=torch.float64), 1)
    p1 = layer.attention(pooled)
    layer.attention.set_temperature(4.0)
    torch.testing.assert_close(layer.attention(pooled), torch.softmax(torch.log(p1) / 4.0, 1))


def _odconv_r18_count(kernel_num, reduction=0.0625):
    """od_resnet18 counted from the rules of the authors' ODConv2d / Attention / OD_ResNet (OSVAI/ODConv)."""
    def attention(cin, cout, k):
        a = max(int(cin * reduction), 16)
        n = cin * a + 2 * a + (a * cin + cin) + (a * cout + cout) + (a * k * k + k * k)
        return n + (a * kernel_num + kernel_num if kernel_num > 1 else 0)

    total = 3 * 64 * 49 + 2 * 64 + 512 * 1000 + 1000
    inplanes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            cin = inplanes if i == 0 else planes
            total += kernel_num * planes * cin * 9 + attention(cin, planes, 3) + 2 * planes
            total += kernel_num * planes * planes * 9 + attention(planes, planes, 3) + 2 * planes
            if i == 0 and (stride != 1 or inplanes != planes):
                total += inplanes * planes + 2 * planes
        inplanes = planes
    return total


def _count(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


# Exact counts of the authors' networks (ODConv) / the configuration matching the A2D2C paper's baseline rows
# (DynamicConv, CondConv), beside the printed figure and the tolerance it is printed with.
# ODConv-4x ResNet-18: the authors' layer rules give 44,901,640 (checked independently by _odconv_r18_count below),
# the README's 44.90 M.
EXPECTED = {
    'odconv_resnet18': (44_901_640, 44.90e6, 0.005e6),
    'odconv_resnet18_1x': (11_943_944, 11.94e6, 0.005e6),
    'odconv_resnet34': (85_551_288, None, None),
    'odconv_resnet50': (90_670_888, 90.67e6, 0.005e6),
    'odconv_resnet50_1x': (28_635_112, 28.64e6, 0.005e6),
    'odconv_resnet101': (169_680_989, None, None),
    'odconv_resnet101_1x': (50_818_769, 50.82e6, 0.005e6),
    'odconv_resnet101_2x': (90_441_623, 90.44e6, 0.005e6),
    'odconv_mobilenetv2_050': (4_435_501, 4.44e6, 0.005e6),
    'odconv_mobilenetv2_050_1x': (2_425_537, 2.43e6, 0.005e6),
    'odconv_mobilenetv2_075': (7_496_013, 7.50e6, 0.005e6),
    'odconv_mobilenetv2_075_1x': (3_507_113, 3.51e6, 0.005e6),
    'odconv_mobilenetv2_100': (11_512_149, 11.51e6, 0.005e6),
    'odconv_mobilenetv2_100_1x': (4_940_185, 4.94e6, 0.005e6),
    'dyconv_resnet18': (45_475_008, 45.47e6, 0.01e6),
    'dyconv_resnet50': (100_895_176, 100.9e6, 0.05e6),
    'condconv_resnet18': (89_822_912, 89.9e6, 0.1e6),
    'condconv_resnet50': (189_856_200, 189.9e6, 0.05e6),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_param_counts(name):
    exact, printed, tol = EXPECTED[name]
    n = _count(name)
    assert n == exact
    if printed is not None:
        assert abs(n - printed) <= tol
        assert dynzoo.models.MODEL_INFO[name]['paper_params'] == pytest.approx(printed, rel=1e-3)


def test_odconv_r18_count_matches_authors_rules():
    assert _count('odconv_resnet18') == _odconv_r18_count(4)
    assert _count('odconv_resnet18_1x') == _odconv_r18_count(1)


# ---------------------------------------------------------------- the ODConv authors' checkpoints

def _authors_mbv2_prefixes(width):
    """Module paths of the authors' ``od_mobilenetv2`` (torchvision layout), in registration order."""
    names = ['features.0.0', 'features.0.1']
    idx = 1
    for t, _, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(n):
            p = f'features.{idx}.conv'
            if t == 1:
                names += [f'{p}.0.0', f'{p}.0.1', f'{p}.1', f'{p}.2']
            else:
                names += [f'{p}.0.0', f'{p}.0.1', f'{p}.1.0', f'{p}.1.1', f'{p}.2', f'{p}.3']
            idx += 1
    return names + [f'features.{idx}.0', f'features.{idx}.1', 'classifier.1']


def _leaf_prefixes(model):
    """dynzoo module paths that own state (convs, ODConvs as a whole, BNs, the classifier), in order."""
    out = []
    for name, m in model.named_modules():
        if any(name.startswith(p + '.') for p in out):
            continue
        if isinstance(m, (ODConv2d, nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            out.append(name)
    return out


def _authors_checkpoint(model, rename):
    """The container the authors' main.py saves: {'state_dict': {'module.' + key}, 'epoch', 'best_acc', ...},
    without temperature buffers (their temperature is a Python float)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith('.temperature'):
            continue
        sd['module.' + rename(k)] = v.clone()
    return {'state_dict': sd, 'epoch': 100, 'best_acc': torch.tensor(74.19), 'acc': torch.tensor(74.0)}


def _perturbed(name):
    torch.manual_seed(4)
    model = timm.create_model(name, num_classes=10)
    _randomize(model, 0.05)
    return model.eval()


@pytest.mark.parametrize('name', ['odconv_resnet18', 'odconv_mobilenetv2_050'])
def test_authors_checkpoint_converts(name, tmp_path):
    src = _perturbed(name)
    if 'mobilenetv2' in name:
        ours, theirs = _leaf_prefixes(src), _authors_mbv2_prefixes(0.5)
        assert len(ours) == len(theirs)
        table = dict(zip(ours, theirs))

        def rename(key):
            for p in sorted(table, key=len, reverse=True):
                if key.startswith(p + '.'):
                    return table[p] + key[len(p):]
            raise KeyError(key)
    else:
        def rename(key):  # the authors' ResNet keys are timm's (torchvision layout)
            return key

    ckpt = _authors_checkpoint(src, rename)
    keys = set(ckpt['state_dict'])
    for head in ('fc', 'bn', 'channel_fc', 'filter_fc', 'spatial_fc', 'kernel_fc'):
        assert any(f'.attention.{head}.' in k for k in keys), head
    path = tmp_path / 'odconv_authors.pth.tar'
    torch.save(ckpt, path)
    # built at another temperature: the converter must set the authors' inference temperature (1) itself
    loaded = timm.create_model(name, num_classes=10, temperature=5.0, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    assert all(t == ('kernel', 1.0) for t in dynzoo.get_temperatures(loaded).values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_of_wrong_width_refused(tmp_path):
    src = _perturbed('odconv_resnet18_1x')
    path = tmp_path / 'k1.pth'
    torch.save(_authors_checkpoint(src, lambda k: k), path)
    with pytest.raises(hub.CheckpointError):
        timm.create_model('odconv_resnet18', num_classes=10, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))


def test_weights_index_lists_authors_releases():
    from dynzoo.models.odconv import ODCONV_RELEASES
    for model, (kernel_num, top1, _, url) in ODCONV_RELEASES.items():
        entry = hub.find_entry(model, 'in1k')
        assert entry is not None and entry['status'] == 'not_mirrored'
        assert entry['source'] == dict(entry['source'], type='authors_release', repo='OSVAI/ODConv', url=url)
        assert {m['name']: m['value'] for m in entry['metrics'] if m['measured_by'] == 'authors'}['top1'] == top1
        assert model in timm.list_models('odconv_*')
    with pytest.raises(dynzoo.PretrainedUnavailableError, match='drive.google.com'):
        timm.create_model('odconv_resnet50.in1k', pretrained=True)


def test_bad_config():
    with pytest.raises(ValueError, match='divisible'):
        ODConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match='num_kernels'):
        DynamicConv2d(8, 8, 3, num_kernels=0)
    with pytest.raises(ValueError, match='input channels'):
        RoutedCondConv2d(8, 8, 3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(TypeError):
        timm.create_model('odconv_resnet18', not_an_argument=1)
    with pytest.raises(ValueError, match='placement'):
        timm.create_model('dyconv_resnet18', placement='all')  # not a placement name of the hosts


def test_tags():
    """timm's convention: ``in1k`` where the authors released ImageNet weights, ``untrained`` where nothing exists;
    the default tag is the one upcycled from the static source's default tag where timm has weights for it."""
    from dynzoo.models.odconv import ODCONV_RELEASES
    from dynzoo.models._builder import known_tags, upcycle_sources
    hosted = ('odconv', 'dyconv', 'condconv', 'fmdconv', 'a2d2c')
    for name in [n for n, info in dynzoo.models.MODEL_INFO.items() if info['family'] in hosted]:
        own = 'in1k' if name in ODCONV_RELEASES else 'untrained'
        sources = upcycle_sources(name)
        assert own in known_tags(name), name
        default = sources[0].partition('.')[2] if sources else own
        assert timm.models.get_pretrained_cfg(name).tag == default, name
