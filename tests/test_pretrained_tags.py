"""Pretrained tags that exist today: upcycled starts from timm's static checkpoints, and the user's own weights.

* Every host-based model gets one tag per timm pretrained tag of its static source (``fmdconv_resnet18.a1_in1k``
  from ``resnet18.a1_in1k``), with the source's cfg; ``pretrained=True`` downloads the source's
  ``model.safetensors`` through ``huggingface_hub`` and upcycles it on load. The tests lay timm-format static
  checkpoints they make themselves (random weights, the smallest hosts) into a Hugging Face cache on disk, or
  serve them from a hub on 127.0.0.1 (LFS answers, so the hub's sha256 is announced), and check: outputs equal to
  timm's static model loaded from the same file; the sha256 pinned on first download, offline loads after it; a
  cached file that is not what the hub announced, or a later hub file that does not match the pin, refused.
* The user's index (``$XDG_CACHE_HOME/dynzoo/weights_index.json``): ``dynzoo weights add / remove``, ``dynzoo
  convert`` and ``dynzoo publish --dry-run`` make real tags; ``hf-hub:ORG/REPO`` loads the repository it names.

Loads that depend on huggingface_hub's environment run in a fresh interpreter (see ``_hub_server``).
"""
import json
import os
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import save, save_file

import dynzoo
from dynzoo.cli import main as cli_main
from dynzoo.models import _hub as hub
from dynzoo.models._builder import known_tags, upcycle_sources, upcycled_source

from _hub_server import (
    LocalHub, hub_env, perturbed_state_dict, published_entry, run_user_script, sha256_bytes, write_hf_cache,
    write_index,
)

torch.set_num_threads(1)

MBV2, MBV2_TAG = 'mobilenetv2_050', 'lamb_in1k'  # the smallest static hosts timm has weights for
R18, R18_TAG = 'resnet18', 'a1_in1k'
UPCYCLED = [('fmdconv_mobilenetv2_050', MBV2), ('odconv_resnet18_1x', R18)]


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path, monkeypatch):
    """The user's index and pins of this process live in the test's folder, never in ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_cache'))


def _static_bytes(arch: str, seed: int) -> bytes:
    """A timm-format ``model.safetensors`` of the static ``arch`` with random weights and BN statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(arch)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith('running_mean'):
                buf.normal_(0, 0.1)
            elif name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _source_repo(arch: str, tag: str) -> str:
    return timm.get_pretrained_cfg(f'{arch}.{tag}').hf_hub_id


# --- the tags, registered at import -----------------------------------------------------------------------------

def test_upcycled_tags_follow_the_static_source():
    """One tag per timm pretrained tag of the source that has a classifier, the source's default first, each with
    the source's preprocessing, class count, licence and hub file; timm ships no results tables, so no top-1 is
    claimed."""
    assert not list(Path(timm.__file__).parent.rglob('*results*.csv'))  # "not available offline" is true
    pretrained = set(timm.list_models(pretrained=True))
    for name in dynzoo.list_dynzoo_models():
        sources = upcycle_sources(name)
        if not sources:
            continue
        source = sources[0].partition('.')[0]
        expected = [t for t in timm.list_pretrained(f'{source}.*') if timm.get_pretrained_cfg(t).num_classes]
        assert sorted(sources) == sorted(expected), name
        assert sources[0] == f'{source}.{timm.get_pretrained_cfg(source).tag}'  # the source's default
        assert timm.get_pretrained_cfg(name).tag == sources[0].partition('.')[2], name  # the model's default too
        for source_tag in sources:
            tag = source_tag.partition('.')[2]
            assert f'{name}.{tag}' in pretrained and upcycled_source(name, tag) == source_tag
            cfg, src = timm.get_pretrained_cfg(f'{name}.{tag}'), timm.get_pretrained_cfg(source_tag)
            for field in ('hf_hub_id', 'num_classes', 'input_size', 'test_input_size', 'crop_pct', 'interpolation',
                          'mean', 'std'):
                assert getattr(cfg, field) == getattr(src, field), (name, tag, field)
            assert cfg.license == (src.license or 'unknown') and source_tag in cfg.description
            assert 'not available offline' in ' '.join(cfg.notes)
    # the names that cannot be upcycled keep their declared tags only
    for name in ('attnet_xxs', 'dmf_xxs', 'sgdm_cspdarknet_n', 'fmdconv_mobilenetv2_075'):
        assert not upcycle_sources(name) and known_tags(name) == [hub.UNTRAINED_TAG], name
    # the authors' releases stay listed, truthfully not mirrored
    assert 'odconv_resnet18.in1k' not in pretrained and 'in1k' in known_tags('odconv_resnet18')
    assert upcycled_source('odconv_resnet18', 'in1k') is None


def test_cli_shows_upcycled_tags(capsys):
    assert cli_main(['weights', '--upcycled']) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(f'fmdconv_{R18}.{R18_TAG} '))
    assert 'upcycled' in line and _source_repo(R18, R18_TAG) in line and f'{R18}.{R18_TAG}' in line
    assert cli_main(['info', 'fmdconv_mobilenetv2_050']) == 0
    out = capsys.readouterr().out
    assert f'fmdconv_mobilenetv2_050.{MBV2_TAG}' in out and 'upcycled' in out and _source_repo(MBV2, MBV2_TAG) in out


# --- upcycling on load: a Hugging Face cache on disk, then a hub on 127.0.0.1 ----------------------------------

# Runs in the user process: for each (dynamic name, static arch, file, kwargs) the max relative difference of the
# logits (or the pooled features, for another head) against timm's static model loaded from the same file.
_COMPARE = r'''
import json, sys, torch
torch.set_num_threads(1)
import timm, dynzoo
out = {}
for label, name, arch, file, kwargs in json.loads(sys.argv[1]):
    try:
        model = timm.create_model(name, pretrained=True, **kwargs).eval()
    except Exception as e:
        out[label] = dict(ok=False, error_type=type(e).__name__, message=str(e))
        continue
    in_chans = kwargs.get('in_chans', 3)  # timm adapts both stems alike (adapt_input_conv)
    static = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=file),
                               in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kwargs.get('num_classes'):
            a, b = model.forward_head(model.forward_features(x), pre_logits=True), static.forward_head(
                static.forward_features(x), pre_logits=True)
        else:
            a, b = model(x), static(x)
    out[label] = dict(ok=True, rel=float((a - b).abs().max() / b.abs().max()), tag=model.pretrained_cfg['tag'],
                      num_classes=model.num_classes, license=model.pretrained_cfg.get('license'))
print('RESULT ' + json.dumps(out))
'''


def _pins(env) -> dict:
    return json.loads((Path(env['XDG_CACHE_HOME']) / 'dynzoo' / 'hub_pins.json').read_text())


def test_upcycled_tag_loads_offline_from_cache(tmp_path):
    """pretrained=True with HF_HUB_OFFLINE=1 and the static files in the cache: the upcycled model computes the
    static model's function (ResNet and MobileNetV2 hosts, the bare name and the tagged one, a fresh head); the
    hub's sha256 (the cache's blob name) is pinned; a cached blob whose bytes are not that sha256 is refused."""
    files = {}
    for arch, tag, seed in ((MBV2, MBV2_TAG, 1), (R18, R18_TAG, 2), ('mobilenetv2_100', 'ra_in1k', 3)):
        data = _static_bytes(arch, seed)
        files[arch] = (data, write_hf_cache(tmp_path / 'hf_home' / 'hub', _source_repo(arch, tag),
                                            'model.safetensors', data))
    # one cached blob altered in place (safetensors cannot notice it)
    blob = Path(os.path.realpath(files['mobilenetv2_100'][1]))
    altered = bytearray(blob.read_bytes())
    altered[-8] ^= 0xFF
    blob.write_bytes(bytes(altered))
    env = hub_env(tmp_path, offline=True)
    res = run_user_script(_COMPARE, [
        ('mbv2', 'fmdconv_mobilenetv2_050', MBV2, str(files[MBV2][1]), {}),
        ('r18', f'odconv_resnet18_1x.{R18_TAG}', R18, str(files[R18][1]), {}),
        ('head', f'fmdconv_mobilenetv2_050.{MBV2_TAG}', MBV2, str(files[MBV2][1]), {'num_classes': 10}),
        ('gray', 'odconv_resnet18_1x', R18, str(files[R18][1]), {'in_chans': 1}),
        ('altered', 'a2d2c_mobilenetv2_100', 'mobilenetv2_100', str(blob), {}),
    ], env)
    for label in ('mbv2', 'r18', 'head', 'gray'):
        assert res[label]['ok'], res[label]
        assert res[label]['rel'] <= 1e-5, res[label]
    assert res['mbv2']['tag'] == MBV2_TAG and res['r18']['license'] == 'apache-2.0'
    assert res['head']['num_classes'] == 10
    pins = _pins(env)
    for arch, tag in ((MBV2, MBV2_TAG), (R18, R18_TAG)):
        pin = pins[f'{_source_repo(arch, tag)}/model.safetensors@main']
        assert pin['sha256'] == sha256_bytes(files[arch][0]) and pin['verified_against'] == 'hub sha256'
    bad = res['altered']  # refused, both digests named, and not pinned
    assert not bad['ok'] and bad['error_type'] == 'CheckpointError', bad
    assert 'the hub announced' in bad['message'] and sha256_bytes(bytes(altered)) in bad['message']
    assert sha256_bytes(files['mobilenetv2_100'][0]) in bad['message']
    assert not any(key.startswith('timm/mobilenetv2_100') for key in pins)


def test_upcycled_tag_through_served_hub_is_pinned(tmp_path):
    """From a hub on 127.0.0.1 (LFS: the sha256 comes in X-Linked-Etag): the first load downloads, verifies and
    pins; a later load offline reads the cache; a new hub file under the same name does not match the pin and is
    refused, naming the pin file."""
    repo = _source_repo(MBV2, MBV2_TAG)
    first, changed = _static_bytes(MBV2, 3), _static_bytes(MBV2, 4)
    ref = tmp_path / 'static.safetensors'
    ref.write_bytes(first)
    action = [('load', f'fmdconv_mobilenetv2_050.{MBV2_TAG}', MBV2, str(ref), {})]
    with LocalHub({repo: {'model.safetensors': first}}, lfs_repos=(repo,), max_requests=20) as server:
        res = run_user_script(_COMPARE, action, hub_env(tmp_path, endpoint=server.endpoint))
    assert res['load']['ok'] and res['load']['rel'] <= 1e-5, res
    assert server.count('GET', '/cdn/') == 1
    env = hub_env(tmp_path, offline=True)
    assert _pins(env)[f'{repo}/model.safetensors@main']['sha256'] == sha256_bytes(first)
    assert run_user_script(_COMPARE, action, env)['load']['rel'] <= 1e-5

    with LocalHub({repo: {'model.safetensors': changed}}, commit='f' * 40, lfs_repos=(repo,)) as server:
        res = run_user_script(_COMPARE, action, hub_env(tmp_path, endpoint=server.endpoint))
    bad = res['load']
    assert not bad['ok'] and bad['error_type'] == 'CheckpointError', bad
    assert 'pinned on its first download' in bad['message'] and sha256_bytes(first) in bad['message']
    assert sha256_bytes(changed) in bad['message'] and 'hub_pins.json' in bad['message']


# --- the user's own weights ---------------------------------------------------------------------------------------

# Runs in the user process: the pretrained tags of a model, then each load's outcome and state (or error).
_USER_TAGS = r'''
import json, sys, torch
torch.set_num_threads(1)
import timm, dynzoo
from safetensors.torch import load_file
payload = json.loads(sys.argv[1])
out = {'listed': sorted(n for n in timm.list_models(payload['pattern'], pretrained=True))}
for label, name, reference in payload['loads']:
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:
        out[label] = dict(ok=False, error_type=type(e).__name__, message=str(e))
        continue
    sd, ref = model.state_dict(), load_file(reference)
    out[label] = dict(ok=True, tag=model.pretrained_cfg['tag'], num_classes=model.num_classes,
                      equal=all(torch.equal(sd[k], v) for k, v in ref.items()) and set(ref) <= set(sd))
print('RESULT ' + json.dumps(out))
'''


def test_weights_add_makes_a_real_tag(tmp_path, capsys):
    """`dynzoo weights add attnet_xxs.digits FILE` (the call the issue reports failing with "Unknown pretrained
    tag"): in a new process the tag is listed, loads the file (sha256-checked) and is the model's default; an
    altered file is refused; `dynzoo weights remove` takes the tag away again."""
    weights = tmp_path / 'digits.safetensors'
    save_file(perturbed_state_dict('attnet_xxs', seed=5, num_classes=10), str(weights))
    env = hub_env(tmp_path)  # the same user cache as this process's (the autouse fixture)
    payload = dict(pattern='attnet_xxs*', loads=[('tagged', 'attnet_xxs.digits', str(weights)),
                                                  ('default', 'attnet_xxs', str(weights))])
    assert not timm.list_models('attnet_xxs*', pretrained=True)  # before: no such tag
    with pytest.raises(ValueError, match='Unknown pretrained tag attnet_xxs.digits'):
        timm.create_model('attnet_xxs.digits', pretrained=True)

    assert cli_main(['weights', 'add', 'attnet_xxs.digits', str(weights), '--num-classes', '10',
                     '--dataset', 'sklearn/digits']) == 0
    assert 'license unknown' in capsys.readouterr().out
    entry = hub.find_entry('attnet_xxs', 'digits')
    assert entry['sha256'] == hub.sha256_file(weights) and entry['file'] == str(weights.resolve())
    assert entry['license'] == 'unknown' and entry['pretrained_cfg'] == {'num_classes': 10}
    assert cli_main(['weights']) == 0 and 'attnet_xxs.digits' in capsys.readouterr().out

    after = run_user_script(_USER_TAGS, payload, env)
    assert after['listed'] == ['attnet_xxs.digits']
    for label in ('tagged', 'default'):
        assert after[label]['ok'] and after[label]['equal'], after[label]
        assert after[label]['tag'] == 'digits' and after[label]['num_classes'] == 10

    with open(weights, 'r+b') as f:  # altered after it was indexed
        f.seek(-4, os.SEEK_END)
        f.write(b'\x00\x01\x02\x03')
    altered = run_user_script(_USER_TAGS, dict(payload, loads=payload['loads'][:1]), env)['tagged']
    assert not altered['ok'] and 'sha256 mismatch for attnet_xxs.digits' in altered['message']

    assert cli_main(['weights', 'remove', 'attnet_xxs.digits']) == 0
    assert hub.find_entry('attnet_xxs', 'digits') is None
    assert cli_main(['weights', 'remove', 'attnet_xxs.digits']) == 2
    assert 'lists no attnet_xxs.digits' in capsys.readouterr().err
    assert cli_main(['weights', 'add', 'attnet_xxs.untrained', str(weights)]) == 2  # timm's tag for no weights
    assert 'tag of your own' in capsys.readouterr().err


def test_hf_hub_prefix_loads_the_repository_it_names(tmp_path):
    """``hf-hub:ORG/REPO`` takes the weights of the repository named (verified against the hub's sha256 and
    pinned), not those of the index's repository for the same model.tag."""
    listed, named = (save(perturbed_state_dict('attnet_xxs', seed=s, num_classes=10)) for s in (6, 7))
    ref = tmp_path / 'named.safetensors'
    ref.write_bytes(named)
    from timm.models._hub import save_config_for_hf
    config = tmp_path / 'config.json'
    save_config_for_hf(timm.create_model('attnet_xxs', num_classes=10, device='meta'), str(config),
                       model_config={'pretrained_cfg': {'tag': 'digits', 'architecture': 'attnet_xxs'}})
    index = write_index(tmp_path / 'index.json', [published_entry('attnet_xxs', 'digits', listed)])
    repos = {'dynzoo/attnet_xxs.digits': {'model.safetensors': listed},
             'someone/attnet-xxs-digits': {'model.safetensors': named, 'config.json': config.read_bytes()}}
    with LocalHub(repos, lfs_repos=tuple(repos), max_requests=30) as server:
        env = hub_env(tmp_path, index, endpoint=server.endpoint)
        res = run_user_script(_USER_TAGS, dict(pattern='attnet_xxs*', loads=[
            ('named', 'hf-hub:someone/attnet-xxs-digits', str(ref))]), env)
        assert server.count('GET', '/cdn/' + sha256_bytes(named)) == 1
        assert server.count('HEAD', '/dynzoo/attnet_xxs.digits/') == 0  # the index's repository is not asked
    assert res['named']['ok'] and res['named']['equal'], res['named']
    assert _pins(env)['someone/attnet-xxs-digits/model.safetensors@main']['sha256'] == sha256_bytes(named)
