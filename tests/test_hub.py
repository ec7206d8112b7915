"""The weight hub, used the way a user uses it.

Checkpoints are made by the tests themselves (a perturbed state dict saved as safetensors) and listed in a temporary
weights index (``$DYNZOO_WEIGHTS_INDEX``) as ``"published"`` with their real sha256 and size, under the tag of a
model the authors released weights for (``odconv_mobilenetv2_*_1x.in1k``: a model tagged ``.untrained`` has none);
listed as published, that tag becomes the model's default. ``timm.create_model(name, pretrained=True)`` then loads
them

* from a Hugging Face cache laid out on disk, with ``HF_HUB_OFFLINE=1``;
* from a hub served on 127.0.0.1 through ``HF_ENDPOINT`` (:class:`_hub_server.LocalHub`, bounded, stopped by the
  test), both as a plain file and through the hub's LFS redirect to a CDN host.

huggingface_hub reads those variables at import time, so those loads run in a fresh interpreter
(:func:`_hub_server.run_user_loads`). Local files (``pretrained_cfg_overlay=dict(file=...)``) and the authors'
training containers are loaded in-process.
"""
import dataclasses
import urllib.error
import urllib.request

import pytest
import torch
import timm
from safetensors.torch import save, save_file

import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.models._builder import known_tags

from _hub_server import (
    DEFAULT_COMMIT, LocalHub, hub_env, perturbed_state_dict, published_entry, run_user_loads, sha256_bytes,
    write_hf_cache, write_index,
)

torch.set_num_threads(1)  # 2 shared CPU cores: oversubscribed OpenMP threads only spin

SMALL = 'fmdconv_mobilenetv2_050'  # local files and the FMDConv authors' containers
HUB, HUB2 = 'odconv_mobilenetv2_050_1x', 'odconv_mobilenetv2_075_1x'  # the hub path: released, tagged
TAG = TAG2 = 'in1k'  # the authors' release (not mirrored in the shipped index)


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path, monkeypatch):
    """The user's index and pins of this process live in the test's folder, never in ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg_cache'))


@pytest.fixture(scope='module')
def small_sd():
    return perturbed_state_dict(SMALL, seed=1)


@pytest.fixture(scope='module')
def hub_bytes():
    return save(perturbed_state_dict(HUB, seed=1))


@pytest.fixture(scope='module')
def hub2_bytes():
    return save(perturbed_state_dict(HUB2, seed=2))


def _assert_same_state(model: torch.nn.Module, reference: dict) -> None:
    sd = model.state_dict()
    assert set(sd) == set(reference)
    for k, v in reference.items():
        assert torch.equal(sd[k], v), k


# --- from a Hugging Face cache on disk, offline ------------------------------------------------------------------

def test_offline_hf_cache(tmp_path, hub_bytes, hub2_bytes):
    ref = tmp_path / 'reference.safetensors'
    ref.write_bytes(hub_bytes)
    index = write_index(tmp_path / 'index.json', [
        published_entry(HUB, TAG, hub_bytes),
        published_entry(HUB2, TAG2, hub2_bytes),  # published, but not in this (offline) cache
    ])
    env = hub_env(tmp_path, index, offline=True)
    write_hf_cache(tmp_path / 'hf_home' / 'hub', f'dynzoo/{HUB}.{TAG}', 'model.safetensors', hub_bytes)

    res = run_user_loads([
        ('plain', HUB, {}, str(ref)),
        ('tagged', f'{HUB}.{TAG}', {}, str(ref)),
        ('not_cached', HUB2, {}, None),
    ], env)

    for label in ('plain', 'tagged'):
        assert res[label]['ok'], res[label]
        assert res[label]['keys_equal'] and res[label]['max_abs_diff'] == 0.0
    bad = res['not_cached']
    assert not bad['ok'] and bad['is_checkpoint_error']
    assert f'dynzoo/{HUB2}.{TAG2}' in bad['message'] and 'Offline?' in bad['message']
    assert 'pretrained_cfg_overlay' in bad['message']


# --- from a hub served on 127.0.0.1 through HF_ENDPOINT -------------------------------------------------------

def test_served_hub(tmp_path, hub_bytes, hub2_bytes):
    ref, ref2 = tmp_path / 'ref.safetensors', tmp_path / 'ref2.safetensors'
    ref.write_bytes(hub_bytes)
    ref2.write_bytes(hub2_bytes)
    repo, repo2 = f'dynzoo/{HUB}.{TAG}', f'dynzoo/{HUB2}.{TAG2}'
    missing = 'odconv_resnet18_1x'
    index = write_index(tmp_path / 'index.json', [
        published_entry(HUB, TAG, hub_bytes),
        published_entry(HUB2, TAG2, hub2_bytes),
        # listed as published, but the hub has no such repository
        dict(published_entry(missing, known_tags(missing)[0], b'x'), hf_hub_id='dynzoo/missing-repo'),
    ])
    repos = {repo: {'model.safetensors': hub_bytes}, repo2: {'model.safetensors': hub2_bytes}}
    with LocalHub(repos, lfs_repos=(repo2,), max_requests=40, lifetime_s=200) as server:
        env = hub_env(tmp_path, index, endpoint=server.endpoint)
        res = run_user_loads([
            ('download', HUB, {}, str(ref)),
            ('cached', HUB, {}, str(ref)),  # second load: metadata HEAD only, no second download
            ('lfs', HUB2, {}, str(ref2)),
            ('missing_repo', missing, {}, None),
        ], env)
        requests = list(server.requests)
    assert server._server is None  # stopped by the context manager
    assert not server.overflow, requests

    for label in ('download', 'cached', 'lfs'):
        assert res[label]['ok'], res[label]
        assert res[label]['keys_equal'] and res[label]['max_abs_diff'] == 0.0, res[label]
    # exactly one download of each file; the second load of SMALL only revalidated
    resolve = f'/{repo}/resolve/main/model.safetensors'
    assert sum(1 for m, p, s in requests if m == 'GET' and p == resolve and s == 200) == 1, requests
    assert sum(1 for m, p, s in requests if m == 'HEAD' and p == resolve) == 2, requests
    assert sum(1 for m, p, s in requests if m == 'HEAD' and p.startswith(f'/{repo2}/') and s == 302) == 1, requests
    assert sum(1 for m, p, s in requests if m == 'GET' and p == f'/cdn/{sha256_bytes(hub2_bytes)}') == 1, requests

    bad = res['missing_repo']
    assert not bad['ok'] and bad['is_checkpoint_error']
    assert 'dynzoo/missing-repo' in bad['message'] and 'could not fetch' in bad['message']

    # the download landed in the standard cache layout, keyed by the commit the hub announced
    snap = tmp_path / 'hf_home' / 'hub' / f'models--dynzoo--{HUB}.{TAG}' / 'snapshots' / DEFAULT_COMMIT
    assert (snap / 'model.safetensors').read_bytes() == hub_bytes


def test_local_hub_is_bounded():
    """The test hub answers at most max_requests requests, and stops by itself after lifetime_s."""
    with LocalHub({'a/b': {'f': b'123'}}, max_requests=2, lifetime_s=120) as server:
        url = f'{server.endpoint}/a/b/resolve/main/f'
        statuses = []
        for _ in range(3):
            try:
                statuses.append(urllib.request.urlopen(url, timeout=30).status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        assert statuses == [200, 200, 503] and server.overflow
    short = LocalHub({'a/b': {'f': b'123'}}, lifetime_s=0.2).start()
    url = f'{short.endpoint}/a/b/resolve/main/f'
    short._timer.join(timeout=30)
    assert short._server is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


# --- no published checkpoint: refuse at once, say what exists ---------------------------------------------------

def test_pretrained_unavailable_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub

    def _no_download(*args, **kwargs):
        raise AssertionError('pretrained=True without a published checkpoint must not touch the network')

    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', _no_download)
    url = 'https://example.invalid/authors/releases/od_mobilenetv2_050.pth'
    index = write_index(tmp_path / 'index.json', [
        dict(model=HUB, tag=TAG, status='not_mirrored', source=dict(url=url), top1=70.23)])
    monkeypatch.setenv(hub.INDEX_ENV, str(index))
    with pytest.raises(dynzoo.PretrainedUnavailableError) as ei:
        timm.create_model(f'{HUB}.{TAG}', pretrained=True, device='meta')
    msg = str(ei.value)
    assert f"No published dynzoo checkpoint exists for '{HUB}.{TAG}'" in msg
    assert f'{HUB}.{TAG}: not_mirrored' in msg and url in msg  # what exists
    start = known_tags(HUB)[0]  # the upcycled start, the model's default
    assert f'{HUB}.{start}: upcycled on load from the static timm checkpoint mobilenetv2_050.{start}' in msg
    assert 'pretrained_cfg_overlay=dict(file=' in msg and 'pretrained=False' in msg  # how to load a local file

    # nothing at all in the index for a model without a static source
    monkeypatch.setenv(hub.INDEX_ENV, str(write_index(tmp_path / 'empty.json', [])))
    with pytest.raises(dynzoo.PretrainedUnavailableError, match='lists no checkpoint at all'):
        timm.create_model('attnet_xxs', pretrained=True, device='meta')


def test_shipped_index_is_truthful():
    """A timm cfg carries weights (an hf_hub_id) only where the index says published or where the tag is an
    upcycled start, whose hf_hub_id is its static source's."""
    from dynzoo.models._builder import upcycled_source
    index = hub.load_index()
    published = {(e['model'], e.get('tag') or '') for e in index['entries'] if e.get('status') == 'published'}
    for name in dynzoo.list_dynzoo_models():
        for name_tag, cfg in timm.models.get_arch_pretrained_cfgs(name).items():
            source = upcycled_source(name, cfg.tag)
            assert bool(cfg.has_weights) == ((name, cfg.tag or '') in published or source is not None), name_tag
            if source is not None:
                assert cfg.hf_hub_id == timm.get_pretrained_cfg(source).hf_hub_id, name_tag
    for e in index['entries']:
        if e.get('status') == 'published':
            assert len(e['sha256']) == 64 and int(e['size']) > 0, e


# --- local files and the authors' containers ------------------------------------------------------------------

def test_load_checkpoint_of_a_model(tmp_path, small_sd):
    """``hub.load_checkpoint`` takes a model built by timm (its pretrained cfg) as well as a cfg dict; anything
    else is a TypeError that says what it expects."""
    path = tmp_path / 'w.safetensors'
    save_file(small_sd, str(path))
    model = timm.create_model(SMALL, device='meta', pretrained_cfg_overlay=dict(file=str(path)))
    for source in (model, model.pretrained_cfg, dataclasses.replace(timm.get_pretrained_cfg(SMALL), file=str(path))):
        sd = hub.load_checkpoint(source)
        assert set(sd) == set(small_sd) and all(torch.equal(sd[k], v) for k, v in small_sd.items())
    with pytest.raises(dynzoo.PretrainedUnavailableError, match=f"exists for '{SMALL}"):
        hub.load_checkpoint(timm.create_model(SMALL, device='meta'))  # no file, and nothing published
    with pytest.raises(TypeError, match='the Conv2d has no pretrained_cfg'):
        hub.load_checkpoint(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match='expects a pretrained cfg .* got a str'):
        hub.load_checkpoint(str(path))


def test_local_safetensors_and_pth(tmp_path, small_sd):
    st, pth = tmp_path / 'w.safetensors', tmp_path / 'w.pth'
    save_file(small_sd, str(st))
    torch.save(small_sd, str(pth))
    for path in (st, pth):
        model = timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        _assert_same_state(model, small_sd)
        assert model.pretrained_cfg.get('state_dict') is None  # the checkpoint is not kept alive on the model


def test_container_state_dict_with_module_prefix(tmp_path, small_sd):
    """The FMDConv authors' training script: {'epoch', 'state_dict': DDP keys, 'best_acc', 'optimizer'}."""
    authors_sd = {k: v for k, v in small_sd.items() if not k.endswith('temperature')}  # their code has none
    container = {
        'epoch': 99, 'best_acc': 70.23,
        'state_dict': {'module.' + k: v for k, v in authors_sd.items()},
        'optimizer': {'state': {}, 'param_groups': [dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False,
                                                         params=list(range(len(authors_sd))))]},
    }
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save(container, str(path))
    model = timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    for k, v in authors_sd.items():
        assert torch.equal(sd[k], v), k
    # their code runs the kernel softmax at T = 34 and the sigmoid gates at T = 1: the converter says so
    temps = dynzoo.get_temperatures(model)
    assert temps and all(t == (34.0 if role == 'kernel' else 1.0) for role, t in temps.values())


def test_container_model_and_ema(tmp_path, small_sd):
    ema = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in small_sd.items()}
    path = tmp_path / 'ema.pth'
    torch.save({'model': small_sd, 'model_ema': ema, 'epoch': 3}, str(path))
    model = timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_same_state(model, small_sd)  # the 'model' weights, not the EMA copy
    # the EMA weights are reachable through hub.unwrap_checkpoint
    picked = hub.unwrap_checkpoint(hub.load_checkpoint_file(path), use_ema=True)
    assert all(torch.equal(picked[k], ema[k]) for k in ema)


def test_finetune_head_from_checkpoint(tmp_path, small_sd):
    """A new ``num_classes`` keeps every backbone tensor and gives a fresh classifier (timm's behaviour)."""
    path = tmp_path / 'w.safetensors'
    save_file(small_sd, str(path))
    model = timm.create_model(SMALL, pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    assert sd['classifier.weight'].shape == (7, small_sd['classifier.weight'].shape[1])
    for k, v in small_sd.items():
        if not k.startswith('classifier.'):
            assert torch.equal(sd[k], v), k
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    # reloading that fine-tuned 7-class checkpoint keeps its head when the overlay says its class count
    tuned = tmp_path / 'tuned.safetensors'
    save_file(model.state_dict(), str(tuned))
    again = timm.create_model(SMALL, pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(tuned), num_classes=7))
    _assert_same_state(again, model.state_dict())
