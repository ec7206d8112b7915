"""Upcycling (dynzoo.models._upcycle): every host-based model starts as an exact copy of its static timm source.

Step 0 equals the static network (eval, float32 and float64, random static weights and BN statistics) for every
upcycled name; the experts differ; every head gets gradients; a checkpoint of another host is refused; on digits,
fine-tuning from the upcycled start beats the random init (a loose, tiny-budget form of docs/upcycling.md's run).
"""
import pytest
import torch
import torch.nn as nn
import timm

from dynzoo.layers.dynamic import DynamicConv2dBase
from dynzoo.models._builder import MODEL_INFO
from dynzoo.models._upcycle import static_source, upcycle_model, upcycle_state_dict

UPCYCLED = sorted(name for name in MODEL_INFO if static_source(name))
# one small model per family (DynamicConv and CondConv exist on ResNets only), SGDM's inserted modules
FAMILY_SAMPLES = ('fmdconv_mobilenetv2_050', 'odconv_mobilenetv2_050', 'odconv_mobilenetv2_050_1x',
                  'a2d2c_mobilenetv2_050', 'a2d2c_plus_mobilenetv2_050', 'dyconv_resnet18', 'condconv_resnet18',
                  'sgdm_resnet18')
HOST_FAMILIES = ('fmdconv', 'odconv', 'dyconv', 'condconv', 'a2d2c')
STEP0_RTOL = 1e-5
BANK = ('weight', 'bias', 'static_weight')


# ResNet-34/50/101 hosts take 15-60 s each here (banks of 60-190 M values, upcycled in two dtypes): slow; the
# quick set keeps every ResNet-18 and MobileNetV2 name (every family) and one Bottleneck network
QUICK_BOTTLENECK = 'odconv_resnet50_1x'


def _by_model(names, slow_hosts=()):
    return [pytest.param(n, marks=[pytest.mark.xdist_group(f'model-{n}')] + (
        [pytest.mark.slow] if static_source(n) in slow_hosts and n != QUICK_BOTTLENECK else [])) for n in names]


def _random_static(name: str, seed: int = 0) -> nn.Module:
    """timm's ``name`` (10 classes) with random kernels and non-trivial BN weights, biases and statistics."""
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point() or value.dim() != 1:
                continue
            if key.endswith(('running_var', 'weight')):
                value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
            else:  # running_mean, bias
                value.copy_(torch.randn(value.shape, generator=gen) * 0.2)
    return model.eval()


def _dynamic_convs(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicConv2dBase)]


def test_static_source():
    assert static_source('fmdconv_resnet50') == 'resnet50'
    assert static_source('odconv_mobilenetv2_050_1x') == 'mobilenetv2_050'
    assert static_source('odconv_resnet101_2x.in1k') == 'resnet101'
    assert static_source('a2d2c_plus_mobilenetv2_075') == 'mobilenetv2_075'
    for name in ('attnet_t1', 'dmf_xxs', 'atconv_swin_tiny_224', 'sgdm_cspdarknet_n'):
        assert static_source(name) is None
    # the drop-in families are all on the hosts; SGDM only on its ResNet; the others on networks of their own
    for name, info in MODEL_INFO.items():
        hosted = info['family'] in HOST_FAMILIES or name == 'sgdm_resnet18'
        assert (static_source(name) is not None) == hosted, name
    assert all(timm.is_model(static_source(n)) for n in UPCYCLED)


@pytest.mark.parametrize('name', _by_model(UPCYCLED, slow_hosts=('resnet34', 'resnet50', 'resnet101')))
def test_step0_equals_static(name):
    static = _random_static(static_source(name))
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    for dtype in (torch.float32, torch.float64):
        static.to(dtype)
        model.to(dtype)
        upcycle_model(model, static.state_dict(), seed=0)
        with torch.no_grad():
            expected, got = static(x.to(dtype)), model(x.to(dtype))
        err = float((got - expected).abs().max() / expected.abs().max())
        assert err <= STEP0_RTOL, f'{name} {dtype}: step-0 relative error {err:.2e}'
    convs = _dynamic_convs(model)
    assert convs
    for conv_name, conv in convs:  # the experts differ (a bank of one has nothing to differ from)
        for k in range(1, conv.num_kernels):
            assert not torch.equal(conv.weight[k], conv.weight[0]), f'{name}.{conv_name}: experts 0 and {k} equal'


@pytest.mark.parametrize('name', _by_model(FAMILY_SAMPLES))
def test_upcycled_heads_and_experts_get_gradients(name):
    model = upcycle_model(timm.create_model(name, num_classes=10), _random_static(static_source(name)).state_dict())
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.arange(2))
    loss.backward()
    for conv_name, conv in _dynamic_convs(model):
        assert conv.weight.requires_grad and float(conv.weight.grad.abs().sum()) > 0, conv_name
        heads = [(n, p) for n, p in conv.named_parameters() if n not in BANK]
        assert heads and all(p.requires_grad for _, p in heads), conv_name
        # the heads' last layers are zero, so their gradient is what starts the routing
        assert sum(float(p.grad.abs().sum()) for _, p in heads if p.grad is not None) > 0, conv_name


def test_upcycle_state_dict_is_seeded_and_leaves_the_model():
    model = timm.create_model('odconv_mobilenetv2_050', num_classes=10)
    static = _random_static('mobilenetv2_050').state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = upcycle_state_dict(model, static, seed=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(first) == set(before)
    again, other = upcycle_state_dict(model, static, seed=3), upcycle_state_dict(model, static, seed=4)
    bank = 'blocks.1.0.conv_pw.weight'
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not torch.equal(first[bank], other[bank])
    assert torch.equal(first['classifier.weight'], static['classifier.weight'])
    # no perturbation: every expert is the same share of the static kernel
    flat = upcycle_state_dict(model, static, perturbation=0.0)[bank]
    assert torch.equal(flat[1], flat[0])
    with pytest.raises(ValueError, match='perturbation'):
        upcycle_state_dict(model, static, perturbation=-1.0)


@pytest.mark.parametrize('name', _by_model(('odconv_mobilenetv2_050', 'a2d2c_mobilenetv2_050', 'sgdm_resnet18')))
def test_upcycled_model_reparameterizes(name):
    """Upcycle the training form, then fold it (dynzoo.reparameterize): still the static function."""
    import dynzoo
    static = _random_static(static_source(name)).double()
    model = upcycle_model(timm.create_model(name, num_classes=10).double(), static.state_dict())
    deployed = dynzoo.reparameterize(model.eval())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = static(x)
        assert float((deployed(x) - expected).abs().max() / expected.abs().max()) <= 1e-12


def test_upcycle_refuses_another_host():
    model = timm.create_model('fmdconv_mobilenetv2_050', num_classes=10)
    with pytest.raises(ValueError, match='blocks.0.0.conv_dw'):
        upcycle_state_dict(model, timm.create_model('mobilenetv2_100', num_classes=10).state_dict())
    static = _random_static('mobilenetv2_050').state_dict()
    with pytest.raises(ValueError, match='1 missing .*classifier.bias'):
        upcycle_state_dict(model, {k: v for k, v in static.items() if k != 'classifier.bias'})
    with pytest.raises(ValueError, match='1 unused .*extra.weight'):
        upcycle_state_dict(model, dict(static, **{'extra.weight': torch.zeros(1)}))
    # a fresh classifier of another class count: the model keeps its own
    other_head = timm.create_model('fmdconv_mobilenetv2_050', num_classes=3)
    head = ('classifier.weight', 'classifier.bias')
    with pytest.raises(ValueError, match='of another shape'):
        upcycle_state_dict(other_head, static)
    state = upcycle_state_dict(other_head, static, keep=head)
    assert all(torch.equal(state[k], other_head.state_dict()[k]) for k in head)


@pytest.mark.parametrize('name, size, static_steps, finetune_steps', [
    ('sgdm_resnet18', 16, 30, 5),
    pytest.param('odconv_resnet18_1x', 32, 60, 15, marks=pytest.mark.slow),
])
def test_digits_upcycled_start_beats_random_init(name, size, static_steps, finetune_steps):
    """(a) step-0 accuracy equals the static source's, (b) after the same few fine-tuning steps the upcycled start
    is ahead of the random init (docs/upcycling.md's run on a tiny budget, from a static ResNet-18, the cheapest
    host that learns digits in a few steps; the quick form upcycles SGDM's ResNet-18, whose dynamic part is small,
    the slow form ODConv's, whose per-sample kernels dominate the cost at this resolution)."""
    pytest.importorskip('sklearn')
    from dynzoo.tools.upcycle_digits import run
    (result,) = run([name], static_steps=static_steps, finetune_steps=finetune_steps, batch_size=32, size=size,
                    log=lambda *_: None)
    assert result.step0_max_abs_diff < 1e-4
    assert result.step0_accuracy == result.source_accuracy
    assert result.source_accuracy > 40.0  # the static source learned something: the comparison means something
    assert result.upcycled_accuracy > result.scratch_accuracy
