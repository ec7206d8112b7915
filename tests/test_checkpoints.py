"""Checkpoints round-trip: every file that timm's ``train.py`` and ``dynzoo train`` write loads everywhere.

The files are written by timm's own ``CheckpointSaver`` (with a ``ModelEmaV3``), as both scripts do, on a small
10-class model at 32 px: ``checkpoint-0.pth.tar``, ``model_best.pth.tar`` and ``last.pth.tar``, each a torch pickle
of ``{'epoch', 'arch', 'state_dict', 'state_dict_ema', 'optimizer', 'version', 'args', 'metric', 'saver'}`` whose
``args`` is the run's ``argparse.Namespace``. They load with ``torch.load(weights_only=True)`` through
``pretrained_cfg_overlay=dict(file=...)``, timm's ``load_checkpoint`` / ``checkpoint_path`` (``--initial-checkpoint``
of timm's ``train.py``), ``dynzoo train --initial-checkpoint``, ``dynzoo export --checkpoint`` and ``dynzoo
convert``, and bring their class count and preprocessing with them.
"""
import argparse
import logging
import pathlib

import pytest
import torch
import timm
from safetensors.torch import save_file
from timm.utils import CheckpointSaver, ModelEmaV3

from dynzoo.models import _hub as hub

torch.set_num_threads(1)  # 2 shared CPU cores

NAME = 'odconv_mobilenetv2_050_1x'  # small, and tagged .in1k: its tag cfg is ImageNet's 224 px
FILES = ('checkpoint-0.pth.tar', 'model_best.pth.tar', 'last.pth.tar')


def _dynzoo_args():
    """The options ``dynzoo train`` saves: its own parser's Namespace."""
    from dynzoo.tools.train import parse_args
    args = parse_args(['--model', NAME, '--num-classes', '10', '--input-size', '32', '--crop-pct', '1.0',
                       '--interpolation', 'bicubic'])
    args.device, args.world_size, args.rank, args.distributed = 'cpu', 1, 0, False  # set by init_devices
    return args


def _timm_args():
    """The options timm's ``train.py`` saves (its names; it sets ``num_classes`` from the model when unset)."""
    return argparse.Namespace(
        model=NAME, num_classes=10, img_size=32, input_size=None, in_chans=None, mean=None, std=None,
        interpolation='', crop_pct=None, model_kwargs={}, device='cpu', distributed=False, world_size=1, rank=0,
        prefetcher=True, grad_accum_steps=1)


EXPECTED_CFG = {  # what each run's options say of the preprocessing
    'dynzoo': dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, interpolation='bicubic'),
    'timm': dict(num_classes=10, input_size=(3, 32, 32)),
}


def _states_equal(model: torch.nn.Module, reference: dict) -> bool:
    sd = model.state_dict()
    return set(sd) == set(reference) and all(torch.equal(sd[k], v) for k, v in reference.items())


@pytest.fixture(scope='module', params=['dynzoo', 'timm'])
def run(request, tmp_path_factory):
    """A training run's output folder written by timm's CheckpointSaver, and the weights it holds."""
    out = tmp_path_factory.mktemp(f'train_{request.param}')
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.5)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    ema.update(model)  # the EMA weights now differ from the model's
    args = _dynzoo_args() if request.param == 'dynzoo' else _timm_args()
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema, checkpoint_dir=str(out),
                            recovery_dir=str(out), max_history=2)
    saver.save_checkpoint(0, metric=50.0)
    assert {p.name for p in out.iterdir()} >= set(FILES)
    return dict(kind=request.param, dir=out, state=model.state_dict(), ema=ema.module.state_dict())


@pytest.mark.parametrize('filename', FILES)
def test_overlay_loads_training_files(run, filename):
    """``pretrained_cfg_overlay=dict(file=...)``: the model weights (``use_ema=True``: the EMA's), the run's
    class count and preprocessing instead of the ``.in1k`` tag's; the overlay's own keys still win."""
    path = str(run['dir'] / filename)
    assert timm.get_pretrained_cfg(NAME).input_size == (3, 224, 224)
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert _states_equal(model, run['state']) and model.num_classes == 10
    for key, value in EXPECTED_CFG[run['kind']].items():
        assert model.pretrained_cfg[key] == value, key
    ema = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=path), use_ema=True)
    assert _states_equal(ema, run['ema'])
    own = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=path, input_size=(3, 48, 48)))
    assert own.pretrained_cfg['input_size'] == (3, 48, 48)


def test_timm_load_checkpoint(run):
    """timm's own loaders: ``create_model(checkpoint_path=...)`` (``train.py --initial-checkpoint``; timm's
    ``load_checkpoint`` takes the EMA weights where there are some), ``load_checkpoint(use_ema=False)`` and
    ``resume_checkpoint``."""
    from timm.models import load_checkpoint, resume_checkpoint
    path = str(run['dir'] / 'last.pth.tar')
    assert _states_equal(timm.create_model(NAME, num_classes=10, checkpoint_path=path), run['ema'])
    model = timm.create_model(NAME, num_classes=10)
    load_checkpoint(model, path, use_ema=False)
    assert _states_equal(model, run['state'])
    load_checkpoint(model, path)
    assert _states_equal(model, run['ema'])
    assert resume_checkpoint(model, path, log_info=False) == 1 and _states_equal(model, run['state'])


def test_dynzoo_train_initial_checkpoint(run):
    from dynzoo.tools.train import create_model, parse_args
    args = parse_args(['--model', NAME, '--initial-checkpoint', str(run['dir'] / 'model_best.pth.tar')])
    model = create_model(args)
    assert _states_equal(model, run['state']) and model.pretrained_cfg['input_size'] == (3, 32, 32)


def test_export_checkpoint(run, tmp_path):
    """``dynzoo export --checkpoint`` without ``--num-classes`` exports the trained 10-class head (``--use-ema``:
    the EMA weights), at the run's 32 px."""
    from dynzoo.tools.export import load_model, main
    path = str(run['dir'] / 'model_best.pth.tar')
    assert _states_equal(load_model(NAME, path), run['state'])
    out = tmp_path / 'ema.pt'
    assert main([NAME, '--format', 'torchscript', '--method', 'trace', '--checkpoint', path, '--use-ema',
                 '--output', str(out), '--no-check']) == 0
    reference = timm.create_model(NAME, num_classes=10).eval()
    reference.load_state_dict(run['ema'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the traced graph runs the per-sample convs as GEMMs: equal up to float rounding
        torch.testing.assert_close(torch.jit.load(str(out))(x), reference(x), rtol=1e-4, atol=1e-4)


def test_convert_then_published_folder_carries_cfg(run, tmp_path):
    """``dynzoo convert --use-ema`` of a training checkpoint writes a folder whose ``config.json`` then brings the
    class count and preprocessing to a plain ``pretrained_cfg_overlay=dict(file=<folder>/model.safetensors)``, and
    which timm's ``local-dir:`` loads."""
    from dynzoo.tools.convert import convert_checkpoint
    out = tmp_path / 'folder'
    entry = convert_checkpoint(NAME, run['dir'] / 'model_best.pth.tar', out, tag='digits', use_ema=True,
                               source=dict(repo='dynzoo/dynzoo', url='https://github.com/dynzoo/dynzoo'),
                               quiet=True)
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / entry['filename'])))
    local = timm.create_model(f'local-dir:{out}', pretrained=True)
    for loaded in (model, local):
        assert _states_equal(loaded, run['ema'])
        for key, value in EXPECTED_CFG[run['kind']].items():
            assert loaded.pretrained_cfg[key] == value, key


def test_ddp_prefixed_container(run, tmp_path):
    """A container saved from a DDP-wrapped model (``module.`` keys, in the weights and the EMA) loads too."""
    path = tmp_path / 'ddp.pth.tar'
    torch.save({'state_dict': {'module.' + k: v for k, v in run['state'].items()},
                'state_dict_ema': {'module.' + k: v for k, v in run['ema'].items()},
                'args': _timm_args(), 'epoch': 3}, path)
    overlay = dict(file=str(path))
    assert _states_equal(timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay), run['state'])
    ema = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay, use_ema=True)
    assert _states_equal(ema, run['ema'])


def test_other_class_count_needs_num_classes(run, tmp_path, caplog):
    """A 10-class head without a cfg saying so is refused, naming ``num_classes=10``; an explicit other
    ``num_classes`` drops it on purpose and the log says so. Options of another architecture are not applied."""
    bare = tmp_path / 'bare.safetensors'
    save_file(run['state'], str(bare))
    with pytest.raises(hub.CheckpointError, match=r'classifier .* has 10 classes, the model 1000: pass num_classes=10'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(bare)))
    assert _states_equal(timm.create_model(NAME, pretrained=True, num_classes=10,
                                           pretrained_cfg_overlay=dict(file=str(bare))), run['state'])
    caplog.set_level(logging.INFO, logger='dynzoo')
    tuned = timm.create_model(NAME, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(bare)))
    assert tuned.num_classes == 5
    assert 'the model 5: dropped on purpose (num_classes=5 was asked)' in caplog.text
    other = tmp_path / 'other_arch.pth.tar'
    torch.save({'state_dict': run['state'], 'args': argparse.Namespace(model='resnet18', num_classes=10)}, other)
    with pytest.raises(hub.CheckpointError, match='pass num_classes=10'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))


def test_objects_beyond_the_allow_list_are_named(run, tmp_path):
    """A container holding another class is refused naming it -- not called corrupted; a truncated one is."""
    path = tmp_path / 'with_path.pth.tar'
    torch.save({'state_dict': run['state'], 'args': _timm_args(), 'output': pathlib.PurePosixPath('/out')}, path)
    with pytest.raises(hub.CheckpointError, match='does not rebuild: pathlib.PurePosixPath') as info:
        hub.load_checkpoint_file(path)
    assert 'corrupted' not in str(info.value) and 'argparse.Namespace' in str(info.value)
    data = (run['dir'] / 'last.pth.tar').read_bytes()
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(hub.CheckpointError, match='truncated or corrupted'):
        hub.load_checkpoint_file(truncated)
