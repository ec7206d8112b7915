"""Bad input ends in an error that names the problem, and nothing is half-loaded.

Checkpoints: truncated / corrupted safetensors, a sha256 mismatch on the hub path, another architecture's weights,
missing / unexpected keys, a ``.pth`` holding a pickled object. Names: unknown model, unknown tag. Tensors: wrong
rank or channel count on the FMDConv layer and on the models. Configuration: invalid layer arguments.

"Nothing half-loaded": a failed ``pretrained=True`` load raises before ``load_state_dict`` runs (a spy counts the
calls), so no model with part of a checkpoint in it ever exists.
"""
import re

import pytest
import torch
import timm
from safetensors.torch import save, save_file

import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.layers import FMDConv2d

from _hub_server import (
    hub_env, perturbed_state_dict, published_entry, run_user_loads, sha256_bytes, write_hf_cache, write_index,
)

torch.set_num_threads(1)

SMALL = 'fmdconv_mobilenetv2_050'


@pytest.fixture(scope='module')
def small_sd():
    return perturbed_state_dict(SMALL, seed=3)


@pytest.fixture
def load_spy(monkeypatch):
    """Counts ``nn.Module.load_state_dict`` calls: a refused checkpoint must never reach it."""
    calls = []
    original = torch.nn.Module.load_state_dict

    def spy(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, 'load_state_dict', spy)
    return calls


def _load(path, name=SMALL, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _refused(path, match, name=SMALL, spy=None, **kwargs):
    with pytest.raises(dynzoo.CheckpointError, match=match) as ei:
        _load(path, name, **kwargs)
    if spy is not None:
        assert spy == [], f'load_state_dict ran before the checkpoint was refused: {spy}'
    return str(ei.value)


# --- unreadable files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage', ['truncated', 'header', 'empty'])
def test_damaged_safetensors(tmp_path, small_sd, load_spy, damage):
    data = save(small_sd)
    path = tmp_path / f'{damage}.safetensors'
    if damage == 'truncated':
        path.write_bytes(data[: len(data) // 2])
    elif damage == 'header':
        path.write_bytes(data[:8] + b'\xff' * 16 + data[24:])  # the JSON header is no longer JSON
    else:
        path.write_bytes(b'')
    msg = _refused(path, 'not a readable safetensors file', spy=load_spy)
    assert str(path) in msg and 'truncated or corrupted' in msg


def test_missing_file(tmp_path, load_spy):
    path = tmp_path / 'nope.safetensors'
    msg = _refused(path, 'does not exist', spy=load_spy)
    assert str(path) in msg


class _Payload:
    """Unpickling this would flip ``ran``: weights_only must refuse before any of it runs."""
    ran = False

    def __setstate__(self, state):
        type(self).ran = True


def test_pth_with_pickled_object_is_refused(tmp_path, small_sd, load_spy):
    path = tmp_path / 'container.pth'
    torch.save({'state_dict': small_sd, 'args': _Payload(), 'epoch': 1}, str(path))
    msg = _refused(path, r'torch\.load\(weights_only=True\)', spy=load_spy)
    assert 'never unpickles arbitrary objects' in msg and str(path) in msg
    assert _Payload.ran is False


def test_not_a_state_dict(tmp_path, load_spy):
    path = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), str(path))
    _refused(path, 'holds a Tensor, expected a dict of tensors', spy=load_spy)
    empty = tmp_path / 'empty.safetensors'
    save_file({}, str(empty))
    _refused(empty, 'holds an empty dict', spy=load_spy)
    path2 = tmp_path / 'junk.pth'
    path2.write_bytes(b'this is not a checkpoint')
    _refused(path2, 'could not be read', spy=load_spy)


# --- readable files that do not fit the model ----------------------------------------------------------------

def test_missing_key(tmp_path, small_sd, load_spy):
    sd = dict(small_sd)
    del sd['blocks.1.0.conv_dw.attention2.fc2.bias']
    path = tmp_path / 'missing.safetensors'
    save_file(sd, str(path))
    msg = _refused(path, 'does not match fmdconv_mobilenetv2_050', spy=load_spy)
    assert '1 missing key(s)' in msg and 'blocks.1.0.conv_dw.attention2.fc2.bias' in msg


def test_unexpected_key(tmp_path, small_sd, load_spy):
    sd = dict(small_sd, **{'blocks.1.0.conv_dw.spatial_fc.weight': torch.zeros(9, 16, 1, 1)})
    path = tmp_path / 'unexpected.safetensors'
    save_file(sd, str(path))
    msg = _refused(path, 'does not match', spy=load_spy)
    assert '1 unexpected key(s)' in msg and 'blocks.1.0.conv_dw.spatial_fc.weight' in msg


def test_other_configuration_shape_mismatch(tmp_path, load_spy):
    """Same keys, other shapes: a K=2 checkpoint into the K=4 model."""
    path = tmp_path / 'k2.safetensors'
    save_file(perturbed_state_dict(SMALL, seed=4, num_kernels=2), str(path))
    msg = _refused(path, 'shapes do not match', spy=load_spy)
    assert re.search(r'conv_\w+\.weight: checkpoint \(2, .*\) vs model \(4, ', msg), msg
    assert 'another architecture or configuration' in msg


def test_other_width_shape_mismatch(tmp_path, load_spy):
    path = tmp_path / 'w075.safetensors'
    save_file(perturbed_state_dict('fmdconv_mobilenetv2_075', seed=5), str(path))
    _refused(path, 'shapes do not match', spy=load_spy)


def test_static_timm_weights_into_dynamic_model(tmp_path, load_spy):
    """Another architecture: timm's static MobileNetV2 checkpoint has no attention heads and 4-D kernels."""
    path = tmp_path / 'static.safetensors'
    save_file(timm.create_model('mobilenetv2_050').state_dict(), str(path))
    msg = _refused(path, 'does not match', spy=load_spy)
    assert 'missing key(s)' in msg and 'attention' in msg


def test_resnet_weights_into_mobilenet(tmp_path, load_spy):
    path = tmp_path / 'r18.safetensors'
    resnet_keys = set(timm.create_model('resnet18', device='meta').state_dict())
    save_file(timm.create_model('resnet18').state_dict(), str(path))
    msg = _refused(path, 'does not match', spy=load_spy)
    n_unexpected = len(resnet_keys - set(timm.create_model(SMALL, device='meta').state_dict()))
    assert f'{n_unexpected} unexpected key(s)' in msg and "'fc.weight'" in msg


def test_sha256_mismatch_on_hub_path(tmp_path, small_sd):
    """The index's sha256 guards the hub path: a wrong digest, or a cached file whose bytes were corrupted in
    the tensor data (which safetensors itself cannot notice), is refused with both digests named."""
    data = save(small_sd)
    data_k2 = save(perturbed_state_dict(SMALL, seed=6, num_kernels=2))  # any other valid file
    corrupted = bytearray(data)
    corrupted[len(corrupted) // 2] ^= 0xFF
    corrupted = bytes(corrupted)
    good = published_entry(SMALL, 'in1k', data)
    index = write_index(tmp_path / 'index.json', [
        good,
        dict(published_entry('fmdconv_mobilenetv2_075', 'in1k', data_k2), sha256='0' * 64),
    ])
    hub_cache = tmp_path / 'hf_home' / 'hub'
    write_hf_cache(hub_cache, f'dynzoo/{SMALL}.in1k', 'model.safetensors', corrupted)
    write_hf_cache(hub_cache, 'dynzoo/fmdconv_mobilenetv2_075.in1k', 'model.safetensors', data_k2)
    res = run_user_loads([('corrupted', SMALL, {}, None), ('wrong_digest', 'fmdconv_mobilenetv2_075', {}, None)],
                         hub_env(tmp_path, index, offline=True))
    for label, expected in (('corrupted', good['sha256']), ('wrong_digest', '0' * 64)):
        r = res[label]
        assert not r['ok'] and r['is_checkpoint_error'], r
        assert 'sha256 mismatch' in r['message'] and expected in r['message'], r['message']
        assert 'download again' in r['message']
    assert sha256_bytes(corrupted) in res['corrupted']['message']  # the digest the file really has


def test_bad_weights_index(tmp_path, monkeypatch):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"entries": []}')
    monkeypatch.setenv(hub.INDEX_ENV, str(bad))
    with pytest.raises(dynzoo.CheckpointError, match='is not a dynzoo weights index'):
        timm.create_model(SMALL, pretrained=True)
    monkeypatch.setenv(hub.INDEX_ENV, str(tmp_path / 'absent.json'))
    with pytest.raises(dynzoo.CheckpointError, match='absent.json does not exist'):
        timm.create_model(SMALL, pretrained=True)


# --- names --------------------------------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(RuntimeError, match=r'Unknown model \(fmdconv_resnet19\)'):
        timm.create_model('fmdconv_resnet19')


@pytest.mark.parametrize('pretrained', [False, True])
def test_unknown_tag(pretrained):
    with pytest.raises(ValueError, match=r'Unknown pretrained tag fmdconv_mobilenetv2_050\.in22k; known tags: '
                                         r'fmdconv_mobilenetv2_050\.in1k$'):
        timm.create_model(f'{SMALL}.in22k', pretrained=pretrained)
    # the known tag is accepted (no weights published: only pretrained=True refuses, and says why)
    assert timm.create_model(f'{SMALL}.in1k').pretrained_cfg['tag'] == 'in1k'


def test_unknown_kwarg():
    with pytest.raises(TypeError, match='unexpected keyword argument'):
        timm.create_model(SMALL, not_an_arg=1)


# --- tensors ------------------------------------------------------------------------------------------------------

def test_layer_wrong_rank_and_channels():
    layer = FMDConv2d(8, 16, 3, padding=1)
    with pytest.raises(ValueError, match=r'expects a 4-D input \(B, C, H, W\), got shape \(8, 5, 5\)'):
        layer(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match=r'4-D input .* got shape \(1, 2, 8, 5, 5\)'):
        layer(torch.randn(1, 2, 8, 5, 5))
    with pytest.raises(ValueError, match=r'expects 8 input channels, got 7 \(input shape \(2, 7, 5, 5\)\)'):
        layer(torch.randn(2, 7, 5, 5))


@pytest.mark.parametrize('name', [SMALL, 'fmdconv_resnet18'])
def test_model_wrong_rank_and_channels(name):
    model = timm.create_model(name, device='meta').to_empty(device='cpu').eval()
    with pytest.raises((ValueError, RuntimeError, AssertionError), match=r'4D|4-D'):
        model(torch.randn(3, 32, 32))  # a single image without its batch dimension
    with pytest.raises((ValueError, RuntimeError), match=r'4D|4-D'):
        model(torch.randn(1, 1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='to have 3 channels, but got 4 channels'):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize('kwargs, match', [
    (dict(in_channels=6, out_channels=8, groups=4), r'must be divisible by groups \(4\)'),
    (dict(num_kernels=0), 'num_kernels must be >= 1, got 0'),
    (dict(strategy='fast'), "Unknown execution strategy 'fast'"),
    (dict(kernel_temperature=0.0), 'temperature must be > 0, got 0.0'),
    (dict(gate_temperature=-1.0), 'temperature must be > 0, got -1.0'),
    (dict(use_kernel_attn=False), 'use_kernel_attn=False requires num_kernels=1'),
])
def test_layer_bad_config(kwargs, match):
    args = dict(in_channels=8, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FMDConv2d(**args)


def test_set_temperature_bad_values():
    model = timm.create_model(SMALL, device='meta')
    with pytest.raises(ValueError, match='temperature must be > 0'):
        dynzoo.set_temperature(model, 0.0)
    with pytest.raises(ValueError, match='has no attention head with a kernel temperature'):
        dynzoo.set_temperature(torch.nn.Conv2d(3, 3, 1), 2.0)
