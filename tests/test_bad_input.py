"""Bad input ends in an error that names the problem, and nothing is half-loaded.

Checkpoints: truncated / corrupted safetensors, a sha256 mismatch on the hub path, another architecture's weights,
missing / unexpected keys, a ``.pth`` holding a pickled object. Paths: a directory, a device, a FIFO, a missing file
or a dangling symlink, each named as what it is; the format is read from the bytes, not the suffix. Names: unknown
model, unknown tag. Tensors: wrong rank or channel count on the FMDConv layer and on the models. Configuration:
invalid layer arguments.

The hostile-checkpoint battery runs over one small model of every family (:data:`FAMILY_MODELS`): NaN / Inf
tensors, integer or bool tensors where the model holds a float, temperatures that are 0, negative or non-finite,
wrong-shaped classifier and stem tensors -- each refused with the key, the expected and the found named -- and
timm's legitimate adaptations (another ``num_classes``, ``in_chans=1``, a float16 / float64 checkpoint), which
load and say so in the log.

"Nothing half-loaded": a failed ``pretrained=True`` load raises before ``load_state_dict`` runs (a spy counts the
calls), so no model with part of a checkpoint in it ever exists.

The layer side, over every registered model (:data:`ZOO`) and every dynamic layer: an empty batch gives the empty
output (eval and training, every execution strategy, ``forward_features`` and ``features_only``); training at batch
size 1 works (an attention head's BatchNorm on pooled vectors falls back to its running statistics; the opt-in
``single_sample_bn='error'`` raises); a graph traced at one batch size runs at another (one model per family); the
refusals of bad layer input name the input, the expected and the found.
"""
import logging
import os
import re
from functools import partial

import pytest
import torch
import timm
from safetensors.torch import save, save_file
from timm.models import adapt_input_conv

import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.models._builder import known_tags
from dynzoo.layers import (
    A2D2CConv2d, ATConv2d, DEPTHWISE_STRATEGIES, STRATEGIES, DynamicConv2d, DynamicConv2dBase, DynamicResidualConv2d,
    FMDConv2d, GuidedDynamicConv2d, ODConv2d, PooledBatchNorm2d, RoutedCondConv2d, aggregate_kernels,
    conv_output_size, per_sample_conv2d, per_sample_depthwise_conv2d,
)
from dynzoo.layers.dynamic import tile_plan
from dynzoo.layers.per_sample import PER_SAMPLE_STRATEGIES

from _hub_server import (
    hub_env, perturbed_state_dict, published_entry, run_user_loads, sha256_bytes, write_hf_cache, write_index,
)
from conftest import zoo_params

torch.set_num_threads(1)

SMALL = 'fmdconv_mobilenetv2_050'
# models with an authors' release keep their ImageNet tag: the hub path is tested on them
HUB_MODEL, HUB_MODEL2 = 'odconv_mobilenetv2_050_1x', 'odconv_mobilenetv2_075_1x'
# the smallest model of every family
FAMILY_MODELS = {
    'fmdconv': 'fmdconv_mobilenetv2_050', 'a2d2c': 'a2d2c_mobilenetv2_050',
    'a2d2c_plus': 'a2d2c_plus_mobilenetv2_050', 'odconv': 'odconv_mobilenetv2_050_1x', 'dyconv': 'dyconv_resnet18',
    'condconv': 'condconv_resnet18', 'attnet': 'attnet_xxs', 'dmf': 'dmf_xxs', 'sgdm': 'sgdm_cspdarknet_n',
}


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
    msg = _refused(path, r'is empty \(0 bytes\)' if damage == 'empty' else 'not a readable safetensors file',
                   spy=load_spy)
    assert str(path) in msg and 'truncated or corrupted' in msg


# --- paths that are not a readable file: said what they are, never opened (a FIFO would block, /dev/zero never
# ends) -----------------------------------------------------------------------------------------------------------

def _directory(tmp_path):
    (tmp_path / 'weights').mkdir()
    (tmp_path / 'weights' / 'model.safetensors').write_bytes(b'')
    return tmp_path / 'weights'


def _dev_zero_link(tmp_path):
    (tmp_path / 'zero.safetensors').symlink_to('/dev/zero')
    return tmp_path / 'zero.safetensors'


def _fifo(tmp_path):
    os.mkfifo(tmp_path / 'pipe.pth')
    return tmp_path / 'pipe.pth'


def _dangling_link(tmp_path):
    (tmp_path / 'gone.pth').symlink_to(tmp_path / 'deleted.pth')
    return tmp_path / 'gone.pth'


@pytest.mark.timeout(120)
@pytest.mark.parametrize('make, match', [
    (lambda tmp: tmp / 'nope.safetensors', 'does not exist$'),
    (_dangling_link, r"is a symlink to '.*deleted\.pth', which does not exist"),
    (_directory, r"is a directory, not a checkpoint file: give the path of the weights file inside it; it holds "
                 r"\['model\.safetensors'\]"),
    (_dev_zero_link, r"is a character device \(a symlink to '/dev/zero'\), not a regular file"),
    (_fifo, r'is a named pipe \(FIFO\), not a regular file'),
], ids=['missing', 'dangling_symlink', 'directory', 'dev_zero', 'fifo'])
def test_path_is_not_a_file(tmp_path, load_spy, make, match):
    path = make(tmp_path)
    msg = _refused(path, match, spy=load_spy)
    assert f'checkpoint file {str(path)!r}' in msg


def test_format_is_read_from_the_bytes(tmp_path, small_sd):
    """A suffix says nothing: safetensors bytes load as ``.pth``, torch.save's zip and legacy pickle formats as
    ``.safetensors`` / ``.bin`` (upper-case ``.SAFETENSORS``: the battery below)."""
    for path, fmt, write in (
            (tmp_path / 'w.pth', 'safetensors', lambda p: save_file(small_sd, str(p))),
            (tmp_path / 'w.safetensors', 'torch', lambda p: torch.save(small_sd, str(p))),
            (tmp_path / 'w.bin', 'torch', lambda p: torch.save(small_sd, str(p), _use_new_zipfile_serialization=False)),
    ):
        write(path)
        assert hub.checkpoint_format(path) == fmt
        sd = hub.load_checkpoint_file(path)
        assert set(sd) == set(small_sd) and all(torch.equal(sd[k], v) for k, v in small_sd.items()), path


@pytest.mark.parametrize('content, match', [
    (b'version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n', 'a Git LFS pointer'),
    (b'<!DOCTYPE html><html>Not Found</html>', 'an HTML/XML page'),
    (b'{"state_dict": {}}', 'a JSON text'),
], ids=['lfs_pointer', 'html', 'json'])
def test_other_format_is_named(tmp_path, load_spy, content, match):
    path = tmp_path / 'w.safetensors'
    path.write_bytes(content)
    msg = _refused(path, match, spy=load_spy)
    assert 'could not be read as a checkpoint' in msg and 'neither safetensors nor' in msg


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
    assert re.search(r'conv_\w+\.weight: expected \(4, .*\), found \(2, ', msg), msg
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


def test_sha256_mismatch_on_hub_path(tmp_path):
    """The index's sha256 guards the hub path: a wrong digest, or a cached file whose bytes were corrupted in
    the tensor data (which safetensors itself cannot notice), is refused with both digests named."""
    data = save(perturbed_state_dict(HUB_MODEL, seed=3))
    data2 = save(perturbed_state_dict(HUB_MODEL2, seed=6))
    corrupted = bytearray(data)
    corrupted[len(corrupted) // 2] ^= 0xFF
    corrupted = bytes(corrupted)
    tag, tag2 = known_tags(HUB_MODEL)[0], known_tags(HUB_MODEL2)[0]
    good = published_entry(HUB_MODEL, tag, data)
    index = write_index(tmp_path / 'index.json', [
        good,
        dict(published_entry(HUB_MODEL2, tag2, data2), sha256='0' * 64),
    ])
    hub_cache = tmp_path / 'hf_home' / 'hub'
    write_hf_cache(hub_cache, f'dynzoo/{HUB_MODEL}.{tag}', 'model.safetensors', corrupted)
    write_hf_cache(hub_cache, f'dynzoo/{HUB_MODEL2}.{tag2}', 'model.safetensors', data2)
    res = run_user_loads([('corrupted', HUB_MODEL, {}, None), ('wrong_digest', HUB_MODEL2, {}, None)],
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
    tags = known_tags(SMALL)
    with pytest.raises(ValueError, match=re.escape(f'Unknown pretrained tag {SMALL}.in22k; known tags: ') +
                       re.escape(', '.join(f'{SMALL}.{t}' for t in tags)) + '$'):
        timm.create_model(f'{SMALL}.in22k', device='meta', pretrained=pretrained)
    # a known tag is accepted (no weights published: only pretrained=True refuses, and says why)
    assert timm.create_model(f'{SMALL}.{tags[0]}', device='meta').pretrained_cfg['tag'] == tags[0]


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
    (dict(kernel_temperature=0.0), 'temperature must be finite and > 0, got 0.0'),
    (dict(gate_temperature=-1.0), 'temperature must be finite and > 0, got -1.0'),
    (dict(use_kernel_attn=False), 'use_kernel_attn=False requires num_kernels=1'),
])
def test_layer_bad_config(kwargs, match):
    args = dict(in_channels=8, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FMDConv2d(**args)


def test_set_temperature_bad_values():
    model = timm.create_model(SMALL, device='meta')
    with pytest.raises(ValueError, match='temperature must be finite and > 0'):
        dynzoo.set_temperature(model, 0.0)
    with pytest.raises(ValueError, match="has no attention head with a 'kernel' temperature"):
        dynzoo.set_temperature(torch.nn.Conv2d(3, 3, 1), 2.0)


# --- the hostile-checkpoint battery: one small model of every family ------------------------------------------------

@pytest.fixture(scope='module', params=list(FAMILY_MODELS.values()), ids=list(FAMILY_MODELS))
def family(request):
    """``(model name, a perturbed state dict of it)``: one family at a time (module scope, grouped by pytest)."""
    return request.param, perturbed_state_dict(request.param, seed=7)


def _float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1 and not k.endswith('temperature')]


def _refused_sd(name, sd, match, spy, **kwargs):
    """Load ``sd`` into ``name`` (a meta model: a refused checkpoint never needs real memory); expect a refusal."""
    with pytest.raises(dynzoo.CheckpointError, match=match) as ei:
        timm.create_model(name, pretrained=True, device='meta', pretrained_cfg_overlay=dict(state_dict=sd), **kwargs)
    assert spy == [], f'load_state_dict ran before the checkpoint was refused: {spy}'
    return str(ei.value)


def _dynzoo_records(caplog, text):
    return [r for r in caplog.records if r.name.startswith('dynzoo') and text in r.getMessage()]


def test_non_finite_tensors_refused(family, load_spy):
    name, sd = family
    keys = _float_keys(sd)
    nan_key, inf_key, overflow_key = keys[len(keys) // 2], keys[-3], keys[len(keys) // 3]
    bad = dict(sd)
    bad[nan_key] = sd[nan_key].clone().view(-1).index_fill_(0, torch.tensor([0, 1]), float('nan')).view_as(sd[nan_key])
    bad[inf_key] = sd[inf_key].clone().view(-1).index_fill_(0, torch.tensor([0]), float('-inf')).view_as(sd[inf_key])
    bad[overflow_key] = sd[overflow_key].double().view(-1).index_fill_(0, torch.tensor([0]), 1e300).view_as(
        sd[overflow_key])  # finite as float64, +Inf once the model's float32
    msg = _refused_sd(name, bad, r'holds non-finite values \(NaN/Inf\) in 3 tensor\(s\)', load_spy)
    assert f'{nan_key} (2 NaN of {sd[nan_key].numel()} values)' in msg
    assert f'{inf_key} (1 Inf of {sd[inf_key].numel()} values)' in msg
    assert f'{overflow_key} (1 Inf of {sd[overflow_key].numel()} values once converted to torch.float32)' in msg


def test_integer_and_bool_tensors_refused(family, load_spy):
    name, sd = family
    keys = _float_keys(sd)
    int_key, bool_key = keys[1], keys[-1]
    bad = dict(sd, **{int_key: sd[int_key].round().to(torch.int32), bool_key: sd[bool_key] > 0})
    msg = _refused_sd(name, bad, r'dtypes do not match .* \(2 tensors\)', load_spy)
    assert f'{int_key}: expected a floating-point tensor (torch.float32), found torch.int32' in msg
    assert f'{bool_key}: expected a floating-point tensor (torch.float32), found torch.bool' in msg


@pytest.mark.parametrize('value', [0.0, -1.0, float('nan'), float('inf')], ids=['zero', 'negative', 'nan', 'inf'])
def test_bad_temperature_refused(family, load_spy, value):
    name, sd = family
    temperatures = [k for k in sd if k.endswith('temperature')]
    if not temperatures:
        pytest.skip(f'{name} has no temperature buffer')
    key = temperatures[len(temperatures) // 2]
    bad = dict(sd, **{key: torch.full_like(sd[key], value)})
    msg = _refused_sd(name, bad, r'invalid temperatures \(1 buffers\)', load_spy)
    assert f'{key}: found [{value}' in msg and 'a temperature must be finite and > 0' in msg


def test_wrong_classifier_and_stem_refused(family, load_spy):
    """A classifier or stem of another shape is no 'adaptation': refused with key, expected and found shape."""
    name, sd = family
    cfg = timm.get_pretrained_cfg(name)
    head, stem = cfg.classifier + '.weight', cfg.first_conv + '.weight'
    rows, width = sd[head].shape
    wide = dict(sd, **{head: torch.zeros(rows, width + 1)})
    msg = _refused_sd(name, wide, 'shapes do not match', load_spy)
    assert f'{head}: expected {(rows, width)}, found {(rows, width + 1)}' in msg
    # another class count is adaptable (the head is dropped), another width is not
    msg = _refused_sd(name, wide, 'classifier does not fit', load_spy, num_classes=10)
    assert f'{head}: expected (num_classes, {width}), found {(rows, width + 1)}' in msg
    out_c, in_c, kh, kw = sd[stem].shape
    for kwargs, model_in in (({}, in_c), (dict(in_chans=1), 1)):
        bad = dict(sd, **{stem: torch.zeros(2 * out_c, in_c, kh, kw)})
        msg = _refused_sd(name, bad, 'shapes do not match', load_spy, **kwargs)
        assert f'{stem}: expected {(out_c, model_in, kh, kw)}, found {(2 * out_c, in_c, kh, kw)}' in msg


def test_adaptations_load_and_are_said(family, caplog):
    """timm's two adaptations stay, each said in the log: another num_classes drops the head, in_chans=1 sums
    the stem over its input channels (timm's adapt_input_conv); everything else loads exactly."""
    name, sd = family
    cfg = timm.get_pretrained_cfg(name)
    head, stem = cfg.classifier, cfg.first_conv + '.weight'
    caplog.set_level(logging.INFO, logger='dynzoo')
    model = timm.create_model(name, pretrained=True, num_classes=10, in_chans=1,
                              pretrained_cfg_overlay=dict(state_dict=sd))
    loaded = model.state_dict()
    assert loaded[head + '.weight'].shape == (10, sd[head + '.weight'].shape[1])
    assert torch.equal(loaded[stem], adapt_input_conv(1, sd[stem]))
    for k, v in sd.items():
        if k != stem and not k.startswith(head + '.'):
            assert torch.equal(loaded[k], v), k
    assert len(_dynzoo_records(caplog, f'classifier {head} has 1000 classes, the model 10: dropped')) == 1
    assert len(_dynzoo_records(caplog, f'adapting the checkpoint\'s first conv {stem} from 3 to 1')) == 1


def test_float_dtypes_convert_with_one_message(family, tmp_path, caplog):
    """A float16 checkpoint with one float64 tensor, saved with an upper-case ``.SAFETENSORS`` suffix (the format
    is read from the bytes), loads converted to float32, and one warning says so (float64 -> float32 rounds)."""
    name, sd = family
    wide_key = _float_keys(sd)[0]
    mixed = {k: (v.double() if k == wide_key else v.half()) if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'W.SAFETENSORS'
    save_file(mixed, str(path))
    caplog.set_level(logging.INFO, logger='dynzoo')
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in mixed.items())
    records = _dynzoo_records(caplog, 'converting')
    assert len(records) == 1 and records[0].levelno == logging.WARNING, [r.getMessage() for r in records]
    n_half = sum(1 for k, v in sd.items() if v.is_floating_point()) - 1
    assert f'{n_half} tensor(s) from torch.float16 to torch.float32' in records[0].getMessage()
    assert '1 tensor(s) from torch.float64 to torch.float32' in records[0].getMessage()


# --- the layer side: empty batches, training at batch size 1, traced graphs ------------------------------------------

ZOO = dynzoo.list_dynzoo_models()
ZOO_INPUT = 64  # every model runs at 64 x 64 here (cheap), a fixed-size one at its own size
# the families whose heads hold a BatchNorm on pooled vectors (a PooledBatchNorm2d), each with its pass-through option
POOLED_BN_MODELS = ['fmdconv_mobilenetv2_050', 'odconv_mobilenetv2_050_1x', 'dmf_xxs']
# one model of every family, and the token hosts of ATConv (their own forward path)
TRACE_MODELS = dict(FAMILY_MODELS, atconv_pvt='atconv_pvt_tiny', atconv_swin='atconv_swin_tiny_224')
# the dynamic layer of every family: factory(in, out, kernel, stride, padding, groups=, strategy=), and its
# conditioning tensor for a batch (None: none)
LAYERS = {
    'fmdconv': (FMDConv2d, None),
    'odconv': (ODConv2d, None),
    'dyconv': (DynamicConv2d, None),
    'condconv': (RoutedCondConv2d, None),
    'a2d2c': (partial(A2D2CConv2d, num_points=5), None),
    'a2d2c_plus': (partial(A2D2CConv2d, num_points=5, mode='sum'), None),
    'sgdm': (GuidedDynamicConv2d, None),
    'dmf': (partial(DynamicResidualConv2d, token_dim=4), lambda batch: torch.randn(batch, 4)),
}
# (in, out, kernel, stride, padding, groups): a grouped 3x3, a pointwise (the 'bmm' form), a strided depthwise
GEOMETRIES = {'3x3_g2': (8, 12, 3, 1, 1, 2), 'pointwise': (8, 12, 1, 1, 0, 1), 'depthwise_s2': (8, 8, 3, 2, 1, 8)}


def _zoo_input_size(model):
    cfg = model.pretrained_cfg
    if cfg.get('fixed_input_size'):
        return tuple(cfg['input_size'])
    low = cfg.get('min_input_size') or (cfg['input_size'][0], 1, 1)
    return (cfg['input_size'][0],) + tuple(max(s, ZOO_INPUT) for s in low[1:])


@pytest.fixture(scope='module', params=zoo_params(ZOO))
def built(request):
    """``(name, model)`` of every registered model, built once (pytest groups the tests of one model)."""
    torch.manual_seed(0)
    return request.param, timm.create_model(request.param, num_classes=10)


def _strategy_plans():
    """Every core strategy and every depthwise strategy at least once: ``[(core, depthwise), ...]``."""
    n = max(len(STRATEGIES), len(DEPTHWISE_STRATEGIES))
    return [(STRATEGIES[i % len(STRATEGIES)], DEPTHWISE_STRATEGIES[i % len(DEPTHWISE_STRATEGIES)]) for i in range(n)]


def _set_strategies(model, core, depthwise):
    """Pin every dynamic layer of ``model`` to a strategy; returns the previous ones (``{module: strategy}``)."""
    saved = {}
    for m in model.modules():
        if isinstance(m, (DynamicConv2dBase, ATConv2d)):
            saved[m] = m.strategy
            m.strategy = core if isinstance(m, DynamicConv2dBase) else depthwise
    return saved


def _non_finite_buffers(model):
    return [n for n, b in model.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]


def test_empty_batch_every_strategy(built):
    """An empty batch gives the empty ``(0, num_classes)`` output, as timm's own models do: in eval and in training
    (backward included, no statistic touched), in every execution strategy, ``forward_features`` too."""
    name, model = built
    x = torch.randn((0,) + _zoo_input_size(model))
    n_layers = len(_set_strategies(model, 'auto', 'auto'))
    assert n_layers > 0, f'{name} has no dynamic layer'
    for core, depthwise in _strategy_plans():
        saved = _set_strategies(model, core, depthwise)
        try:
            with torch.no_grad():
                model.eval()
                assert model(x).shape == (0, 10), (name, core, depthwise)
                assert model.forward_features(x).shape[0] == 0, (name, core, depthwise)
            model.train()
            xg = x.clone().requires_grad_()
            y = model(xg)
            assert y.shape == (0, 10), (name, core, depthwise)
            y.sum().backward()
            assert xg.grad is not None and xg.grad.shape == x.shape
        finally:
            for m, s in saved.items():
                m.strategy = s
            model.zero_grad(set_to_none=True)
    assert _non_finite_buffers(model) == [], f'{name}: an empty training batch left non-finite statistics'


@pytest.mark.parametrize('name', list(TRACE_MODELS.values()), ids=list(TRACE_MODELS))
def test_empty_batch_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    x = torch.randn((0,) + _zoo_input_size(model))
    with torch.no_grad():
        features = model(x)
    assert [f.shape[0] for f in features] == [0] * len(features)
    assert [f.shape[1] for f in features] == model.feature_info.channels()


def test_train_at_batch_size_one(built):
    """A forward + backward at batch size 1 in training mode (a YOLO-style warm-up): an attention head's BatchNorm
    on pooled vectors (a PooledBatchNorm2d) normalises the single sample with its running statistics and leaves them
    as they were; every other layer trains as usual."""
    name, model = built
    model.train()
    pooled = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for n, m in model.named_modules() if isinstance(m, PooledBatchNorm2d)}
    try:
        y = model(torch.randn((1,) + _zoo_input_size(model)))
        assert y.shape == (1, 10) and torch.isfinite(y).all()
        y.logsumexp(1).sum().backward()
        assert any(p.grad is not None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
    modules = dict(model.named_modules())
    for n, (mean, var, tracked) in pooled.items():
        bn = modules[n]
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var), n
        assert int(bn.num_batches_tracked) == tracked, n
    assert _non_finite_buffers(model) == []


@pytest.mark.parametrize('name', POOLED_BN_MODELS)
def test_single_sample_bn_error_mode(name):
    """``single_sample_bn='error'`` (the opt-in) refuses a training batch of one sample with the fix named; a batch
    of two trains; the default is ``'running'``."""
    model = timm.create_model(name, num_classes=10, single_sample_bn='error').train()
    assert any(isinstance(m, PooledBatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match=r"training input of shape \(1, \d+, 1, 1\): one value per channel, .* "
                                         r"\(expected >= 2\): train with a per-device batch >= 2, .*SyncBatchNorm"):
        model(torch.randn(1, 3, ZOO_INPUT, ZOO_INPUT))
    assert model(torch.randn(2, 3, ZOO_INPUT, ZOO_INPUT)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"single_sample_bn must be one of \('running', 'error'\), got 'skip'"):
        timm.create_model(name, single_sample_bn='skip', device='meta')


@pytest.mark.parametrize('name', list(TRACE_MODELS.values()), ids=list(TRACE_MODELS))
def test_trace_at_one_batch_size_runs_at_another(name):
    """``torch.jit.trace`` at batch 2, run at batch 3: the traced graph (the core's per-sample forms run as 'gemm'
    while tracing) equals the eager model; the weights are moved off their init so the logits are not trivial."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=perturbed_state_dict(name, seed=2))).eval()
    size = _zoo_input_size(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn((2,) + size), check_trace=False)
        x = torch.randn((3,) + size)
        expected = model(x)
        scale = expected.abs().max().item()
        assert scale > 1e-3, f'{name}: trivial logits'
        torch.testing.assert_close(traced(x), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize('geometry', list(GEOMETRIES))
@pytest.mark.parametrize('strategy', STRATEGIES)
@pytest.mark.parametrize('family', list(LAYERS))
def test_layer_empty_batch(family, strategy, geometry):
    """Every dynamic layer, strategy and geometry: ``(0, C_in, H, W) -> (0, C_out, H', W')``, eval and training."""
    factory, cond = LAYERS[family]
    c_in, c_out, k, stride, padding, groups = GEOMETRIES[geometry]
    layer = factory(c_in, c_out, k, stride, padding, groups=groups, strategy=strategy)
    out_hw = conv_output_size(7, k, stride, padding, 1)
    for training in (False, True):
        layer.train(training)
        x = torch.randn(0, c_in, 7, 7, requires_grad=training)
        with torch.set_grad_enabled(training):
            y = layer(x, None if cond is None else cond(0))
        assert y.shape == (0, c_out, out_hw, out_hw), (training, y.shape)
        if training:
            y.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize('strategy', DEPTHWISE_STRATEGIES)
def test_depthwise_empty_batch(strategy):
    """The per-sample depthwise conv (ATConv's) and ATConv itself, every strategy, eval and training."""
    x = torch.randn(0, 6, 7, 7, requires_grad=True)
    y = per_sample_depthwise_conv2d(x, torch.randn(0, 6, 3, 3), (1, 1), strategy)
    assert y.shape == (0, 6, 7, 7)
    layer = ATConv2d(6, strategy=strategy)
    for training in (False, True):
        layer.train(training)
        y = layer(x)
        assert y.shape == (0, 6, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_empty_batch_kernels_and_tile_plan():
    """The building blocks: per-sample convs in every strategy, the tile plan (an empty batch plans one sample) and
    the scripted layers (TorchScript dispatches per call)."""
    x = torch.randn(0, 4, 5, 5)
    for strategy in PER_SAMPLE_STRATEGIES:
        y = per_sample_conv2d(x, torch.randn(0, 6, 2, 3, 3), torch.randn(0, 6), (1, 1), (1, 1), (1, 1), 2, strategy)
        assert y.shape == (0, 6, 5, 5), strategy
    assert tile_plan(0, 64, 1, 576) == tile_plan(1, 64, 1, 576)
    assert tile_plan(0, 64, 1, 576, min_samples=8) == tile_plan(1, 64, 1, 576, min_samples=8)
    for layer in (FMDConv2d(4, 6, 3, padding=1), ATConv2d(4)):
        assert torch.jit.script(layer.eval())(x).shape == (0, layer(x).shape[1], 5, 5)


def test_set_temperature_no_heads_message():
    """The refusal names the model, the temperature role asked for and the roles the model has."""
    conv = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match=r"^Conv2d has no attention head with a 'kernel' temperature "
                                         r"\(temperature roles found: none\)$"):
        dynzoo.set_temperature(conv, 2.0)
    with pytest.raises(ValueError, match=r'^Conv2d has no attention head with a temperature \(temperature roles '
                                         r'found: none\)$'):
        dynzoo.set_temperature(conv, 2.0, role=None)
    gates_only = FMDConv2d(8, 8, 3, num_kernels=1, use_kernel_attn=False)
    with pytest.raises(ValueError, match=r"with a 'kernel' temperature \(temperature roles found: 'gate'\)"):
        dynzoo.set_temperature(gates_only, 2.0)
    assert dynzoo.set_temperature(gates_only, 2.0, role='gate') == 1
    with pytest.raises(ValueError, match=r"temperature role must be one of \('kernel', 'gate'\) or None \(every "
                                         r"role\), got 'softmax'"):
        dynzoo.set_temperature(gates_only, 2.0, role='softmax')


@pytest.mark.parametrize('call, match', [
    (lambda: aggregate_kernels(torch.randn(4, 6, 2, 3, 3), None),
     r'kernel_attn \(B, 4\) is required for a bank of 4 kernels, got None'),
    (lambda: A2D2CConv2d(4, 4, 3, padding=1)(torch.randn(1, 4, 5, 5), torch.full((4, 3), 25)),
     r'positions must lie in \[0, 25\) for a 5x5 output, got values in \[25, 25\]'),
    (lambda: ATConv2d(4)(torch.randn(4, 5, 5)), r'ATConv2d expects a 4-D input \(B, C, H, W\), got 3 dims'),
    (lambda: ATConv2d(4)(torch.randn(1, 3, 5, 5)), r'ATConv2d expects 4 input channels, got 3'),
    (lambda: DynamicResidualConv2d(4, 4, 3, token_dim=2)(torch.randn(3, 4, 5, 5)),
     r'conditioned on a token \(3, 2\); got None'),
    (lambda: FMDConv2d(4, 4, 3, num_kernels=2, use_kernel_attn=False),
     r'use_kernel_attn=False requires num_kernels=1 .*, got 2'),
])
def test_layer_input_messages(call, match):
    """Each refusal names the input, what was expected and what was found."""
    with pytest.raises(ValueError, match=match):
        call()
