"""What timm's training flags need from a model: channels-last memory format on the 5-D kernel banks, and
temperatures that anneal themselves from the model's own training forward passes (``temperature_schedule=``)."""
import copy

import pytest
import torch
import timm

import dynzoo
from dynzoo.layers.dynamic import DynamicConv2dBase
from dynzoo.layers.temperature import TEMPERATURE_SCHEDULES, fmdconv_temperature, linear_temperature

# one model per family (the ResNet / MobileNetV2 hosts, DMF, SGDM, AttNet and the ATConv transformers)
ONE_PER_FAMILY = (
    'fmdconv_resnet18', 'a2d2c_mobilenetv2_050', 'a2d2c_plus_resnet18', 'odconv_mobilenetv2_050', 'dyconv_resnet18',
    'condconv_resnet18', 'dmf_xxs', 'sgdm_cspdarknet_n', 'sgdm_resnet18', 'attnet_xxs', 'atconv_pvt_tiny',
)


@pytest.mark.parametrize('name', ONE_PER_FAMILY)
def test_channels_last(name):
    """``model.to(memory_format=torch.channels_last)`` (timm's ``--channels-last``) works and changes no output."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    banks = [m.weight for m in model.modules() if isinstance(m, DynamicConv2dBase)]
    assert all(w.dim() == 5 and w.is_contiguous() for w in banks)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and it trains in that format
    model.train()
    model(x.to(memory_format=torch.channels_last)).sum().backward()
    assert all(w.grad is not None and w.grad.shape == w.shape for w in banks)


def test_channels_last_keeps_dtype_and_other_conversions():
    model = timm.create_model('odconv_resnet18_1x', num_classes=3)
    model = model.to(dtype=torch.float64, memory_format=torch.channels_last)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.layer1[0].conv1.weight.dim() == 5
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def _train_steps(model, steps, x):
    for _ in range(steps):
        model(x).sum().backward()


@pytest.mark.parametrize('name,schedule', [
    ('fmdconv_resnet18', 'fmdconv'), ('odconv_resnet18_1x', 'linear'), ('dyconv_resnet18', 'linear'),
    ('a2d2c_resnet18', 'linear'), ('dmf_xxs', 'dmf'),
])
def test_paper_schedule_anneals_itself(name, schedule):
    """Each training forward sets the family's paper schedule for its step, then counts it."""
    model = timm.create_model(name, num_classes=3, temperature_schedule='paper', temperature_steps_per_epoch=2)
    assert model.temperature_annealing.schedule == schedule
    x = torch.randn(2, 3, 32, 32)
    roles = TEMPERATURE_SCHEDULES[schedule]
    for step in range(5):
        _train_steps(model, 1, x)
        temps = dynzoo.get_temperatures(model).values()
        for role, fn in roles.items():
            values = [t for r, t in temps if r == role]
            assert values and values == pytest.approx([fn(step, 2)] * len(values)), (role, step, values)
    assert int(model.temperature_annealing.num_steps) == 5


def test_schedule_values_are_the_papers():
    """FMDConv 40 -> 1 by 3 per epoch; DynamicConv / ODConv / A2D2C 30 -> 1 over 10 epochs; DMF counted from 1."""
    assert [fmdconv_temperature(s, 10) for s in (0, 9, 10, 129, 130, 1000)] == [40, 40, 37, 4, 1, 1]
    assert linear_temperature(0, 10) == 30.0 and linear_temperature(100, 10) == 1.0
    assert linear_temperature(50, 10) == pytest.approx(15.5)
    assert TEMPERATURE_SCHEDULES['dmf']['kernel'](0, 10) == pytest.approx(linear_temperature(1, 10))


def test_only_training_forwards_count():
    model = timm.create_model('odconv_resnet18_1x', num_classes=3, temperature_schedule='linear',
                              temperature_steps_per_epoch=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # e.g. BatchNorm calibration
    model.eval()
    model(x)
    assert int(model.temperature_annealing.num_steps) == 0
    model.train()
    _train_steps(model, 2, x)
    assert int(model.temperature_annealing.num_steps) == 2


def test_schedule_resumes_exactly_from_a_checkpoint():
    """The step count is a persistent buffer: a model loaded from a mid-schedule state dict continues it."""
    kwargs = dict(num_classes=3, temperature_schedule='paper', temperature_steps_per_epoch=1)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    straight = timm.create_model('fmdconv_resnet18', **kwargs)
    _train_steps(straight, 3, x)
    saved = copy.deepcopy(straight.state_dict())
    assert int(saved['temperature_annealing.num_steps']) == 3
    _train_steps(straight, 2, x)
    fresh = timm.create_model('fmdconv_resnet18', **kwargs)
    fresh.load_state_dict(saved)  # what timm's --resume does
    _train_steps(fresh, 2, x)
    assert dynzoo.get_temperatures(fresh) == dynzoo.get_temperatures(straight)
    assert int(fresh.temperature_annealing.num_steps) == 5


def test_without_a_schedule_nothing_changes():
    model = timm.create_model('fmdconv_resnet18', num_classes=3)
    before = dynzoo.get_temperatures(model)
    _train_steps(model, 2, torch.randn(2, 3, 32, 32))
    assert dynzoo.get_temperatures(model) == before
    assert model.temperature_annealing.schedule is None
    assert 'temperature_annealing.num_steps' not in model.state_dict()


def test_schedule_checkpoint_loads_into_a_model_without_one(tmp_path):
    """The step count is training state: a pretrained load drops it (and a new schedule starts from step 0)."""
    from safetensors.torch import save_file
    model = timm.create_model('odconv_resnet18_1x', num_classes=3, temperature_schedule='linear',
                              temperature_steps_per_epoch=1)
    _train_steps(model, 2, torch.randn(2, 3, 32, 32))
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    plain = timm.create_model('odconv_resnet18_1x', num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert plain.temperature_annealing.schedule is None
    # timm's own strict load_checkpoint (validate.py, onnx_export.py) into a model built without a schedule
    from timm.models import load_checkpoint
    unscheduled = timm.create_model('odconv_resnet18_1x', num_classes=3)
    load_checkpoint(unscheduled, str(path))
    torch.testing.assert_close(unscheduled.state_dict(), plain.state_dict())
    # and a checkpoint without a step count into a scheduled model (train.py --initial-checkpoint): step 0
    scheduled = timm.create_model('odconv_resnet18_1x', num_classes=3, temperature_schedule='linear',
                                  temperature_steps_per_epoch=1)
    scheduled.load_state_dict(unscheduled.state_dict())
    assert int(scheduled.temperature_annealing.num_steps) == 0
    again = timm.create_model('odconv_resnet18_1x', num_classes=3, pretrained=True, temperature_schedule='linear',
                              temperature_steps_per_epoch=1, pretrained_cfg_overlay=dict(file=str(path)))
    assert int(again.temperature_annealing.num_steps) == 0


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature_schedule='paper'), 'temperature_steps_per_epoch'),
    (dict(temperature_steps_per_epoch=3), 'without a temperature_schedule'),
    (dict(temperature_schedule='cosine', temperature_steps_per_epoch=3), 'unknown temperature schedule'),
    (dict(temperature_schedule='linear', temperature_steps_per_epoch=0), 'steps_per_epoch must be >= 1'),
])
def test_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('odconv_resnet18_1x', **kwargs)


@pytest.mark.parametrize('name', ['condconv_resnet18', 'attnet_xxs', 'sgdm_resnet18'])
def test_paper_schedule_where_the_paper_has_none(name):
    with pytest.raises(ValueError, match='anneals no temperature'):
        timm.create_model(name, temperature_schedule='paper', temperature_steps_per_epoch=3)
    with pytest.raises(ValueError, match='no attention head with a temperature'):
        timm.create_model(name, temperature_schedule='linear', temperature_steps_per_epoch=3)
    assert not hasattr(timm.create_model(name), 'temperature_annealing')


def test_schedule_and_features_only():
    backbone = timm.create_model('fmdconv_resnet18', features_only=True)
    assert not hasattr(backbone, 'temperature_annealing')
    with pytest.raises(ValueError, match='features_only'):
        timm.create_model('fmdconv_resnet18', features_only=True, temperature_schedule='paper',
                          temperature_steps_per_epoch=3)
