"""``dynzoo train``: recipes, temperature schedules, layer decay, exact resume, and two-process DDP (gloo, CPU)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file
from timm.utils import random_seed

import dynzoo
from dynzoo.layers.temperature import TemperatureMixin
from dynzoo.tools.train import (
    RECIPE_DIR, TemperatureSchedule, apply_temperatures, create_model, create_optimizer, load_recipe, parse_args,
    train)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(RECIPE_DIR.glob('*.yaml'))

# a tiny run: FMDConv MobileNetV2 x0.5 (kernel + gate temperature heads) on 16x16 generated squares
TINY = ['--model', 'fmdconv_mobilenetv2_050', '--dataset', 'synthetic', '--synthetic-size', '24',
        '--num-classes', '4', '--input-size', '16', '--val-fraction', '0.25', '--batch-size', '4', '--workers', '0',
        '--opt', 'adamw', '--lr', '1e-3', '--weight-decay', '0.01', '--sched', 'cosine', '--sched-on-updates',
        '--epochs', '2', '--no-aug', '--hflip', '0', '--model-ema', '--model-ema-decay', '0.9', '--seed', '3',
        '--no-progress', '--threads', '1',
        '--temperature', '[{"role": "kernel", "schedule": "linear", "t0": 30, "t1": 1, "epochs": 1},'
                         ' {"role": "gate", "schedule": "fmdconv", "t0": 10, "decrement": 3}]']


@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.stem)
def test_recipe_is_valid(recipe):
    """Every shipped recipe uses only known options, names a registered model, and its temperature schedules
    reach heads the model really has (checked on a meta-device build)."""
    cfg = load_recipe(str(recipe))
    assert timm.is_model(cfg['model']), cfg['model']
    data_dir = ['--data-dir', '/data/imagenet'] if cfg['dataset'] == '' else []  # an image-folder recipe needs one
    args = parse_args(['--config', str(recipe)] + data_dir)
    assert args.recipe_sha256 and args.model == cfg['model']
    schedules = [TemperatureSchedule.from_dict(t) for t in args.temperature]
    if schedules:
        model = timm.create_model(args.model, device='meta', num_classes=args.num_classes or 1000)
        for per_step in (False, True):
            apply_temperatures(model, schedules, 0, 10, per_step=per_step)
        roles = {m.temperature_role for m in model.modules() if isinstance(m, TemperatureMixin)}
        assert all(s.role in roles or s.role is None for s in schedules)


@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.stem)
def test_recipe_names_its_data_and_uses_data_dir(recipe, capsys):
    """Every recipe names its data set; ``--data-dir`` is used by an image-folder recipe (which needs one) and
    refused by a built-in data set, never silently ignored."""
    import yaml
    raw = yaml.safe_load(recipe.read_text())
    assert 'dataset' in raw, recipe
    cfg = ['--config', str(recipe), '--data-dir', '/data/imagenet']
    if raw['dataset'] == '':
        assert parse_args(cfg).data_dir == '/data/imagenet'
        with pytest.raises(SystemExit) as e:
            parse_args(['--config', str(recipe)])
        assert e.value.code == 2 and 'give its root with --data-dir' in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as e:
            parse_args(cfg)
        assert e.value.code == 2 and "would ignore --data-dir '/data/imagenet'" in capsys.readouterr().err


def test_data_dir_without_dataset_is_an_image_folder(tmp_path):
    args = parse_args(['--model', 'fmdconv_resnet18', '--data-dir', str(tmp_path)])
    assert args.dataset == '' and args.data_dir == str(tmp_path)
    assert parse_args(['--model', 'fmdconv_resnet18']).dataset == 'sklearn/digits'


def test_recipe_without_dataset_is_refused(tmp_path):
    bad = tmp_path / 'nodata.yaml'
    bad.write_text('model: fmdconv_resnet18\nepochs: 1\n')
    with pytest.raises(ValueError, match='names no data set'):
        load_recipe(str(bad))


def test_recipe_refuses_unknown_option(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text("model: fmdconv_resnet18\ndataset: ''\nlearning_rate_typo: 0.1\n")
    with pytest.raises(ValueError, match='learning_rate_typo'):
        load_recipe(str(bad))


def test_temperature_schedules():
    fmd = TemperatureSchedule.from_dict({'role': 'kernel', 'schedule': 'fmdconv', 't0': 40, 'decrement': 3})
    assert [fmd.value(e) for e in (0, 1, 12, 13, 20)] == [40, 37, 4, 1, 1]  # FMDConv Sec. 3.3.2, per epoch
    assert fmd.value(25, steps_per_epoch=5) == fmd.value(5) == 25  # one base: the global step and steps per epoch
    lin = TemperatureSchedule.from_dict({'role': 'kernel', 'schedule': 'linear', 't0': 30, 't1': 1, 'epochs': 10})
    spe = 5
    n_total = 10 * spe
    for n in (1, 7, 25, 50):  # DMF: T = 1 + (T0 - 1)(N - n)/N at 1-based iteration n, i.e. 0-based step n - 1
        assert lin.value(n - 1, spe) == pytest.approx(1 + 29 * (n_total - n) / n_total)
    assert lin.value(15 * spe, spe) == 1.0
    with pytest.raises(ValueError, match='schedule'):
        TemperatureSchedule.from_dict({'schedule': 'cubic'})
    with pytest.raises(ValueError, match='role'):
        TemperatureSchedule.from_dict({'role': 'kernal'})


def test_temperature_schedule_refuses_model_without_role():
    model = timm.create_model('attnet_xxs', device='meta')  # ATConv has no temperature
    sched = [TemperatureSchedule.from_dict({'role': 'kernel', 'schedule': 'constant', 't0': 2})]
    with pytest.raises(ValueError, match='temperature'):
        apply_temperatures(model, sched, 0, 1, per_step=False)


def test_layer_decay_groups_follow_group_matcher():
    args = parse_args(['--model', 'fmdconv_resnet18', '--opt', 'adamw', '--lr', '1e-3', '--layer-decay', '0.7'])
    model = timm.create_model('fmdconv_resnet18', device='meta')
    opt = create_optimizer(args, model)
    scales = sorted({round(g['lr_scale'], 6) for g in opt.param_groups})
    # stem, 4 stages of 2 blocks (timm ResNet's fine group_matcher: one layer per block), head
    n_layers = 1 + 8 + 1
    assert len(scales) == n_layers and scales[-1] == 1.0
    assert scales[0] == pytest.approx(0.7 ** (n_layers - 1), rel=1e-4)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(model.parameters()))


def _state(path):
    return {k: v for k, v in load_file(str(path)).items()}


def test_resume_reproduces_uninterrupted_run(tmp_path):
    """A run interrupted after epoch 0 and continued with --resume ends exactly like the uninterrupted one
    (weights, BatchNorm statistics, EMA, temperatures): the interruption is simulated by resuming, in a fresh
    folder, from the epoch-0 checkpoint the uninterrupted run wrote."""
    full = train(parse_args(TINY + ['--output', str(tmp_path / 'full')]))
    assert [h['epoch'] for h in full.history] == [0, 1]
    (tmp_path / 'cut').mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-0.pth.tar', tmp_path / 'cut' / 'last.pth.tar')
    resumed = train(parse_args(TINY + ['--output', str(tmp_path / 'cut'), '--resume', 'auto']))
    assert [h['epoch'] for h in resumed.history] == [1]
    for a, b in ((full.model, resumed.model), (full.model_ema, resumed.model_ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, f'resumed run differs in {bad[:5]}'
    temps = dynzoo.get_temperatures(resumed.model)
    assert {round(t, 6) for role, t in temps.values() if role == 'kernel'} == {1.0}  # linear 30 -> 1 done
    assert {round(t, 6) for role, t in temps.values() if role == 'gate'} == {7.0}  # fmdconv schedule, epoch 1
    assert full.history[1]['eval'] == resumed.history[0]['eval']
    results = json.loads((tmp_path / 'cut' / 'results.json').read_text())
    assert results['weights'] == 'ema' and results['history'][-1]['epoch'] == 1


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


WORKER = '''
import sys, torch
from safetensors.torch import save_file
from dynzoo.tools.train import parse_args, train
args = parse_args(sys.argv[1:])
result = train(args)
state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
save_file(state, f"{args.output}/rank{args.rank}.safetensors")
torch.distributed.destroy_process_group()
'''


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    """torchrun, 2 processes, gloo on CPU: each rank trains on its own shard; DDP's gradient averaging and the
    per-epoch BatchNorm reduction leave both with the same weights, different from the initial ones."""
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER)
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2',
           '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), str(worker),
           *TINY, '--synthetic-size', '40', '--output', str(out), '--device', 'cpu', '--dist-backend', 'gloo']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0, s1 = _state(out / 'rank0.safetensors'), _state(out / 'rank1.safetensors')
    assert s0.keys() == s1.keys()
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, f'ranks disagree on {differ[:5]}'
    results = json.loads((out / 'results.json').read_text())
    assert results['world_size'] == 2 and len(results['history']) == 2
    random_seed(3, 0)
    init = create_model(parse_args(TINY))  # the weights both ranks started from (same seed)
    moved = [k for k, v in init.state_dict().items() if k.endswith('weight') and not torch.equal(v, s0[k])]
    assert len(moved) > 10, 'training did not change the weights'


@pytest.mark.parametrize('recipe', ['fmdconv_mobilenetv2_050_in1k', 'odconv_mobilenetv2_050_in1k'])
def test_mobilenetv2_recipe_starts_with_trainable_gradients(recipe):
    """At a recipe's first-iteration temperatures, a dynamic MobileNetV2's stem gradient stays within 5x the static
    MobileNetV2's on the same batch; at temperature 1 everywhere it is 1e3-1e9x (docs/weights.md), which is why
    training from scratch needs the schedules and why FMDConv's recipe also anneals the gates."""
    args = parse_args(['--config', recipe, '--data-dir', '/data/imagenet'])
    schedules = [TemperatureSchedule.from_dict(t) for t in args.temperature]
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def stem_grad(name, at_recipe_start):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).train()
        if at_recipe_start:
            for per_step in (False, True):
                apply_temperatures(model, schedules, 0, 100, per_step=per_step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return float(model.conv_stem.weight.grad.norm())

    static = stem_grad('mobilenetv2_050', False)
    dynamic = stem_grad(args.model, True)
    print(f"{recipe}: stem gradient {dynamic:.3g} (static {static:.3g})")
    assert dynamic < 5 * static, f'{recipe}: stem gradient {dynamic:.3g} vs static {static:.3g}'
    assert stem_grad(args.model, False) > 100 * static  # at T = 1 the same net is far outside that range
