"""timm's own command-line scripts, unmodified, on one model of every family, run as users run them.

Each script runs in a subprocess through ``dynzoo timm SCRIPT ...`` (:mod:`dynzoo.tools.timm_scripts`) on the real
digits (scikit-learn's 1,797 UCI images, written as a 32 px image folder): ``train.py`` from scratch with
``--channels-last``, then ``validate.py --reparam`` on its best checkpoint reproduces the top-1 that ``train.py``
logged, then ``onnx_export.py --reparam`` and ``onnx_validate.py`` at two batch sizes reproduce it again. One model
also runs the flags users reach for (``--amp`` in bf16, ``--grad-checkpointing``, ``--model-ema``,
``--model-kwargs``, ``--initial-checkpoint``, ``--resume``), ``validate.py --torchcompile``, ``benchmark.py
--reparam`` and ``inference.py``.

The scripts are found in ``$TIMM_SCRIPTS_DIR`` (default: ``shared/clients/timm`` beside the checkout, where CI lays
them; timm's wheel does not ship them); the tests skip where they are absent.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dynzoo.models import FAMILIES, MODEL_INFO
from dynzoo.tools.timm_scripts import SCRIPTS_ENV, TIMM_SCRIPTS
from dynzoo.tools.train import write_digits_imagefolder

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = Path(os.environ.get(SCRIPTS_ENV) or REPO.parent / 'shared' / 'clients' / 'timm')
_missing = [s for s in TIMM_SCRIPTS if not (SCRIPTS_DIR / s).is_file()]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f'timm\'s scripts {_missing} not found in {SCRIPTS_DIR}: set ${SCRIPTS_ENV} to a folder '
                           'holding them (the root of a huggingface/pytorch-image-models checkout)')

# one model of each family: its smallest variant
FAMILY_MODELS = {
    'fmdconv': 'fmdconv_mobilenetv2_050',
    'a2d2c': 'a2d2c_mobilenetv2_050',
    'odconv': 'odconv_mobilenetv2_050_1x',
    'dyconv': 'dyconv_resnet18',
    'condconv': 'condconv_resnet18',
    'attnet': 'attnet_xxs',
    'dmf': 'dmf_xxs',
    'sgdm': 'sgdm_cspdarknet_n',
}
# families whose smallest model is a ResNet-18 with 45 M / 89 M parameters of kernel banks: their training run is
# `slow` and runs with DYNZOO_FULL_TRAIN=1; by default they run the scripts on a checkpoint of their initial weights
LARGE_FAMILIES = ('dyconv', 'condconv')
FLAG_MODEL = FAMILY_MODELS['fmdconv']
EPOCHS = 2
NUM_VAL = 360  # images in the digits validation split (20 % of 1,797, stratified)
STEPS_PER_EPOCH = (1797 - NUM_VAL) // 64  # train.py drops the last partial batch
ONE_IMAGE = 100.0 / NUM_VAL + 1e-3  # a folded model may flip one near-tie image

COMMON = ['--device', 'cpu', '--num-classes', '10', '--img-size', '32', '--crop-pct', '1.0', '-j', '0']
TRAIN = COMMON + ['--no-prefetcher', '-b', '64', '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05',
                  '--sched', 'cosine', '--warmup-epochs', '0', '--hflip', '0', '--scale', '0.7', '1.0',
                  '--log-interval', '100', '--seed', '0', '--checkpoint-hist', '1', '--experiment', 'run']


def test_every_family_has_a_model():
    assert set(FAMILY_MODELS) == {info['family'] for info in MODEL_INFO.values()}
    assert all(MODEL_INFO[m]['family'] == f for f, m in FAMILY_MODELS.items())


@pytest.fixture(scope='session')
def digits(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.getbasetemp() / 'digits32', size=32)


def run_timm(script: str, *args: str, cwd: Path) -> str:
    """``python -m dynzoo timm SCRIPT ARGS`` in a fresh process; its output, or a failure showing its tail."""
    env = dict(os.environ, **{SCRIPTS_ENV: str(SCRIPTS_DIR), 'OMP_NUM_THREADS': '1'})
    r = subprocess.run([sys.executable, '-m', 'dynzoo', 'timm', script, *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f'{script} {" ".join(args)} exited {r.returncode}:\n{out[-4000:]}'
    return out


def train(model: str, data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> List[Dict[str, float]]:
    """timm's ``train.py`` on the digits; the rows of its ``summary.csv``."""
    run_timm('train.py', '--data-dir', str(data), '--model', model, '--epochs', str(epochs), '--output', str(out),
             *TRAIN, *extra, cwd=out.parent)
    with open(out / 'run' / 'summary.csv', newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def validate(model: str, data: Path, checkpoint: Path, *extra: str) -> Dict[str, float]:
    """timm's ``validate.py --reparam`` on the digits validation split; its result."""
    out = run_timm('validate.py', '--data-dir', str(data), '--model', model, '--checkpoint', str(checkpoint),
                   '--reparam', '-b', '128', '--no-prefetcher', *COMMON, *extra, cwd=checkpoint.parent)
    return json.JSONDecoder().raw_decode(out, out.rindex('--result\n') + len('--result\n'))[0]


def onnx_top1(model: str, data: Path, checkpoint: Path, batch_sizes=(1, 64)) -> List[float]:
    """``onnx_export.py --reparam`` of ``checkpoint``, then ``onnx_validate.py`` at each batch size: top-1s."""
    onnx_file = checkpoint.parent / f'{model}.onnx'
    run_timm('onnx_export.py', str(onnx_file), '--model', model, '--checkpoint', str(checkpoint), '--reparam',
             '--num-classes', '10', '--img-size', '32', '-b', '2', cwd=checkpoint.parent)
    top1 = []
    for b in batch_sizes:
        out = run_timm('onnx_validate.py', str(data / 'validation'), '--onnx-input', str(onnx_file),
                       '--img-size', '32', '--crop-pct', '1.0', '-b', str(b), '-j', '0', cwd=checkpoint.parent)
        top1.append(float(re.search(r'\* Prec@1 ([0-9.]+)', out).group(1)))
    return top1


def _family_params():
    full = pytest.mark.skipif(
        not os.environ.get('DYNZOO_FULL_TRAIN'),
        reason='the 45 M / 89 M parameter ResNet-18 training chain runs with DYNZOO_FULL_TRAIN=1; by default '
               'test_scripts_on_initial_weights runs the scripts on these families')
    return [pytest.param(f, marks=(pytest.mark.slow, full)) if f in LARGE_FAMILIES else f for f in FAMILY_MODELS]


@pytest.mark.parametrize('family', _family_params())
def test_train_validate_export(family, digits, tmp_path, record_property):
    """``train.py --channels-last`` from scratch with the paper's self-annealing temperature schedule, then
    ``validate.py --reparam`` and the ONNX file of the folded model (dynamic batch), both built without the schedule,
    reproduce the best top-1 that ``train.py`` logged."""
    pytest.importorskip('onnxruntime')
    model = FAMILY_MODELS[family]
    # the family's paper temperature schedule, annealed by the model itself (none for CondConv, AttNet, SGDM)
    schedule = []
    if FAMILIES[family].get('temperature_schedule'):
        schedule = ['--model-kwargs', 'temperature_schedule=paper', f'temperature_steps_per_epoch={STEPS_PER_EPOCH}']
    history = train(model, digits, tmp_path / 'train', '--channels-last', *schedule)
    logged = max(row['eval_top1'] for row in history)
    checkpoint = tmp_path / 'train' / 'run' / 'model_best.pth.tar'
    result = validate(model, digits, checkpoint)
    onnx = onnx_top1(model, digits, checkpoint)
    record_property('digits_top1', logged)
    print(f'{family} {model}: train.py top-1 {logged:.2f}, validate.py --reparam {result["top1"]:.2f}, '
          f'onnx {onnx}')
    assert len(history) == EPOCHS and result['img_size'] == 32
    assert abs(result['top1'] - logged) <= ONE_IMAGE, (result, logged)
    assert all(abs(t - result['top1']) <= ONE_IMAGE for t in onnx), (onnx, result)


@pytest.mark.parametrize('family', LARGE_FAMILIES)
def test_scripts_on_initial_weights(family, digits, tmp_path):
    """The shortened form for the large models: ``validate.py --reparam`` and the ONNX file of the folded model on a
    checkpoint of the seeded initial weights agree (their training run is the `slow` test above)."""
    import timm
    pytest.importorskip('onnxruntime')
    model = FAMILY_MODELS[family]
    torch.manual_seed(0)
    checkpoint = tmp_path / 'initial.pth'
    torch.save(timm.create_model(model, num_classes=10).state_dict(), checkpoint)
    result = validate(model, digits, checkpoint)
    onnx = onnx_top1(model, digits, checkpoint, batch_sizes=(64,))
    assert all(abs(t - result['top1']) <= ONE_IMAGE for t in onnx), (onnx, result)


@pytest.fixture(scope='module')
def flag_run(digits, tmp_path_factory) -> Path:
    """One epoch of ``train.py`` on :data:`FLAG_MODEL`: the output folder the resume / checkpoint runs start from."""
    out = tmp_path_factory.mktemp('flag_run') / 'train'
    train(FLAG_MODEL, digits, out, epochs=1)
    return out / 'run'


@pytest.mark.parametrize('flags', [
    ('--amp', '--amp-dtype', 'bfloat16'),
    ('--grad-checkpointing',),
    ('--model-ema', '--model-ema-decay', '0.9'),
    ('--model-kwargs', 'num_kernels=2'),
], ids=lambda f: f[0].lstrip('-'))
def test_train_flag(flags, digits, tmp_path):
    """One epoch of ``train.py`` with each flag; the checkpoint it writes validates (``--use-ema`` for EMA, the
    same ``--model-kwargs``) to the top-1 it logged."""
    history = train(FLAG_MODEL, digits, tmp_path / 'train', *flags, epochs=1)
    checkpoint = tmp_path / 'train' / 'run' / 'model_best.pth.tar'
    extra = {'--model-ema': ('--use-ema',), '--model-kwargs': flags}.get(flags[0], ())
    if flags[0] == '--model-ema':
        assert 'state_dict_ema' in torch.load(checkpoint, map_location='cpu', weights_only=False)
    logged = history[-1]['eval_top1']
    result = validate(FLAG_MODEL, digits, checkpoint, *extra)
    if flags[0] != '--amp':  # train.py evaluates under bf16 autocast; validate.py here in fp32
        assert abs(result['top1'] - logged) <= ONE_IMAGE, (result, logged)


@pytest.mark.xdist_group('timm-scripts-flag-run')
def test_train_resume_continues(flag_run, digits, tmp_path):
    """``train.py --resume last.pth.tar`` continues at the next epoch."""
    history = train(FLAG_MODEL, digits, tmp_path / 'train', '--resume', str(flag_run / 'last.pth.tar'), epochs=2)
    assert [int(row['epoch']) for row in history] == [1]


@pytest.mark.xdist_group('timm-scripts-flag-run')
def test_train_initial_checkpoint(flag_run, digits, tmp_path):
    """``train.py --initial-checkpoint model_best.pth.tar`` starts from those weights (at a learning rate of
    1e-12 its parameters end where they started)."""
    best = flag_run / 'model_best.pth.tar'
    train(FLAG_MODEL, digits, tmp_path / 'train', '--initial-checkpoint', str(best), '--lr', '1e-12', epochs=1)
    start = torch.load(best, map_location='cpu', weights_only=False)['state_dict']
    end = torch.load(tmp_path / 'train' / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    params = [k for k in start if start[k].is_floating_point() and 'running_' not in k]
    assert params and all(torch.allclose(start[k], end[k], atol=1e-6) for k in params)


@pytest.mark.xdist_group('timm-scripts-flag-run')
def test_inference(flag_run, digits, tmp_path):
    """``inference.py`` on the trained checkpoint writes one prediction per validation image."""
    pytest.importorskip('pandas', reason="timm's inference.py writes its results with pandas")
    run_timm('inference.py', str(digits), '--split', 'validation', '--model', FLAG_MODEL,
             '--checkpoint', str(flag_run / 'model_best.pth.tar'), '-b', '64', '--results-dir', str(tmp_path),
             '--results-file', 'pred', '--topk', '1', '--no-console-results', *COMMON, cwd=tmp_path)
    with open(tmp_path / 'pred.csv', newline='') as f:
        assert sum(1 for _ in csv.DictReader(f)) == NUM_VAL


@pytest.mark.xdist_group('timm-scripts-flag-run')
def test_validate_torchcompile(flag_run, digits):
    """``validate.py --reparam --torchcompile`` (inductor, timm's default backend) on the trained checkpoint
    reproduces the top-1 that ``train.py`` logged for it."""
    with open(flag_run / 'summary.csv', newline='') as f:
        logged = max(float(row['eval_top1']) for row in csv.DictReader(f))
    # the whole split as one batch: one inductor build (the shape of a last, partial batch would be a second)
    result = validate(FLAG_MODEL, digits, flag_run / 'model_best.pth.tar', '--torchcompile', '-b', str(NUM_VAL))
    assert abs(result['top1'] - logged) <= ONE_IMAGE, (result, logged)


def test_benchmark_reparam(tmp_path):
    """``benchmark.py --reparam`` measures the folded model."""
    out = run_timm('benchmark.py', '--model', FLAG_MODEL, '--reparam', '--bench', 'inference', '--device', 'cpu',
                   '--img-size', '32', '-b', '4', '--num-warm-iter', '1', '--num-bench-iter', '5', cwd=tmp_path)
    assert 'infer_samples_per_sec' in out
