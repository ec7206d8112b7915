"""Fine-tune on real data (UCI digits), publish to a hub served on 127.0.0.1 and load it back with
timm.create_model(..., pretrained=True); convert the authors' checkpoints of the parity fixtures."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import timm

import dynzoo
from dynzoo.models import _hub as hub
from dynzoo.tools.publish import ENTRY_NAME, validate_entry, validate_index
from conftest import official_fixture
from _hub_server import perturbed_state_dict

REPO = Path(__file__).resolve().parents[1]

# the short digits run: AttNet-XXS, 32x32, 2 epochs of the 1,437 training images (the full recipe runs 6)
DIGITS_ACCURACY_BAR = 80.0  # % top-1 on the 360 validation images; chance is 10%
HUB_REPO = 'dynzoo/attnet_xxs.digits'


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """The user's cache of this test (dynzoo's own index, written by convert and publish), handed to its user
    processes too."""
    path = tmp_path / 'xdg_cache'
    monkeypatch.setenv('XDG_CACHE_HOME', str(path))
    return path


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    from dynzoo.tools.train import main
    out = tmp_path_factory.mktemp('digits') / 'run'
    assert main(['--config', 'attnet_xxs_digits', '--epochs', '2', '--warmup-epochs', '0', '--output', str(out),
                     '--threads', '1', '--no-progress']) == 0
    return out, json.loads((out / 'results.json').read_text())


def test_digits_finetune_reaches_accuracy(digits_run):
    out, results = digits_run
    assert results['model'] == 'attnet_xxs' and results['dataset']['name'] == 'sklearn/digits'
    assert results['dataset']['train_images'] == 1437 and results['dataset']['val_images'] == 360
    assert results['best']['samples'] == 360
    assert results['best']['top1'] >= DIGITS_ACCURACY_BAR, results['best']
    assert (out / results['checkpoint']).is_file() and (out / 'last.pth.tar').is_file()


@pytest.fixture(scope='module')
def published_folder(digits_run, tmp_path_factory):
    from dynzoo.tools.publish import main
    out, results = digits_run
    folder = tmp_path_factory.mktemp('hub') / 'attnet_xxs.digits'
    with pytest.MonkeyPatch.context() as mp:  # the dry run records the file in this user cache
        mp.setenv('XDG_CACHE_HOME', str(folder.parent / 'xdg_cache'))
        assert main(['--train-dir', str(out), '--out', str(folder), '--repo-id', HUB_REPO, '--dry-run']) == 0
    return folder


def test_published_folder_is_timm_format(published_folder, digits_run, monkeypatch):
    _, results = digits_run
    files = {p.name for p in published_folder.iterdir()}
    assert {'config.json', 'model.safetensors', 'README.md', ENTRY_NAME} <= files
    config = json.loads((published_folder / 'config.json').read_text())
    assert config['architecture'] == 'attnet_xxs' and config['num_classes'] == 10
    pcfg = config['pretrained_cfg']
    assert pcfg['tag'] == 'digits' and tuple(pcfg['input_size']) == (3, 32, 32) and pcfg['crop_pct'] == 1.0
    assert pcfg['num_classes'] == 10 and config['label_names'] == [str(i) for i in range(10)]
    entry = json.loads((published_folder / ENTRY_NAME).read_text())
    validate_entry(entry)
    assert entry['sha256'] == hub.sha256_file(published_folder / 'model.safetensors')
    assert entry['size'] == (published_folder / 'model.safetensors').stat().st_size
    assert entry['source']['type'] == 'trained' and entry['source']['recipe'] == 'attnet_xxs_digits'
    assert entry['metrics'][0] == {'name': 'top1', 'value': round(results['best']['top1'], 4),
                                   'protocol': results['protocol'], 'measured_by': 'dynzoo'}
    card = (published_folder / 'README.md').read_text()
    paper = dynzoo.models.FAMILIES['attnet']['paper']
    assert paper and paper in card and f'{results["best"]["top1"]:.2f}' in card and entry['sha256'] in card
    # trained weights without --license: "unknown", not the licence of the code or of an authors' release
    assert entry['license'] == 'unknown' and 'license: unknown' in card
    # the dry run pushed nothing and recorded the folder's file in the user's index: a real tag from now on
    monkeypatch.setenv('XDG_CACHE_HOME', str(published_folder.parent / 'xdg_cache'))
    recorded = hub.find_entry('attnet_xxs', 'digits')
    assert recorded['file'] == str((published_folder / 'model.safetensors').resolve()) and 'hf_hub_id' not in recorded
    assert recorded['sha256'] == entry['sha256'] and recorded['pretrained_cfg']['num_classes'] == 10


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The two requests hf_hub_download makes: HEAD then GET ``/{repo_id}/resolve/{revision}/{filename}``.

    Like the Hub it answers with ``X-Repo-Commit`` (a 40-hex commit), an ``ETag`` (sha256 for the weights, as for
    LFS files; ``X-Linked-Etag`` / ``X-Linked-Size`` too) and ``Content-Length``.
    """
    repos: dict = {}
    requests: list = []
    commit = 'c0ffee' + '0' * 34

    def _resolve(self):
        parts = self.path.split('?')[0].strip('/').split('/')
        if len(parts) < 5 or parts[2] != 'resolve':
            return None
        folder = self.repos.get('/'.join(parts[:2]))
        path = folder / '/'.join(parts[4:]) if folder else None
        return path if path is not None and path.is_file() else None

    def _headers(self, path):
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('ETag', f'"{etag}"')
        self.send_header('X-Repo-Commit', self.commit)
        if path.suffix == '.safetensors':
            self.send_header('X-Linked-Etag', f'"{etag}"')
            self.send_header('X-Linked-Size', str(len(data)))
        self.end_headers()
        return data

    def do_HEAD(self):  # noqa: N802
        self.requests.append(('HEAD', self.path))
        path = self._resolve()
        if path is None:
            self.send_response(404)
            self.send_header('X-Error-Code', 'EntryNotFound')
            self.send_header('X-Repo-Commit', self.commit)
            self.end_headers()
            return
        self._headers(path)

    def do_GET(self):  # noqa: N802
        self.requests.append(('GET', self.path))
        path = self._resolve()
        if path is None:
            self.send_response(404)
            self.end_headers()
            return
        self.wfile.write(self._headers(path))

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _HubHandler)
    _HubHandler.repos, _HubHandler.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', _HubHandler
    server.shutdown()
    server.server_close()


LOAD_AND_EVALUATE = '''
import json, sys, torch, timm, dynzoo
from timm.data import create_loader, resolve_data_config
from dynzoo.tools.train import digits_datasets, evaluate
torch.set_num_threads(1)
name, val_fraction, seed, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = timm.create_model(name, pretrained=True, num_classes=10).eval()
cfg = resolve_data_config({}, model=model)
_, val = digits_datasets(val_fraction, seed)
loader = create_loader(val, input_size=cfg['input_size'], batch_size=batch, is_training=False,
                       interpolation=cfg['interpolation'], mean=cfg['mean'], std=cfg['std'], crop_pct=cfg['crop_pct'],
                       crop_mode=cfg.get('crop_mode'), num_workers=0, use_prefetcher=False, device=torch.device('cpu'))
result = {'eval': evaluate(model, loader, torch.device('cpu')), 'cfg': model.pretrained_cfg['tag']}
# without the index's entry, hf-hub: still loads the repository named, checked against the hub's sha256 (pinned)
import os
from dynzoo.models import _hub as hub
os.environ['DYNZOO_WEIGHTS_INDEX'] = sys.argv[5]
again = timm.create_model(name, pretrained=True, num_classes=10)
result['same_without_index'] = all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
result['pins'] = json.loads(hub.pins_path().read_text())
print('RESULT ' + json.dumps(result))
'''


def test_round_trip_through_local_hub(published_folder, digits_run, local_hub, tmp_path):
    """fine-tune -> publish -> hub on 127.0.0.1 -> timm.create_model(pretrained=True) in a fresh process, through a
    temporary weights index: the same validation accuracy (and loss) as measured after training; without the
    index's entry, ``hf-hub:`` loads the same repository, checked against the hub's sha256 and pinned."""
    _, results = digits_run
    endpoint, handler = local_hub
    handler.repos[HUB_REPO] = published_folder
    entry = json.loads((published_folder / ENTRY_NAME).read_text())
    index = {'schema': hub.INDEX_SCHEMA, 'entries': [entry]}
    validate_index(index)
    index_path = tmp_path / 'weights_index.json'
    index_path.write_text(json.dumps(index))
    empty_index = tmp_path / 'empty_index.json'
    empty_index.write_text(json.dumps({'schema': hub.INDEX_SCHEMA, 'entries': []}))
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / 'hf'), HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', DYNZOO_WEIGHTS_INDEX=str(index_path), OMP_NUM_THREADS='1',
               PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(tmp_path / 'xdg_cache'))
    env.pop('HF_HUB_OFFLINE', None)
    batch = 32
    proc = subprocess.run(
        [sys.executable, '-c', LOAD_AND_EVALUATE, f'hf-hub:{HUB_REPO}', str(0.2), str(results['dataset']['split_seed']),
         str(batch), str(empty_index)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
    loaded = json.loads(line[len('RESULT '):])
    assert loaded['cfg'] == 'digits' and loaded['same_without_index'] is True
    assert loaded['pins'][f'{HUB_REPO}/model.safetensors@main']['sha256'] == entry['sha256']
    fetched = {p.rsplit('/', 1)[-1] for method, p in handler.requests if method == 'GET'}
    assert {'config.json', 'model.safetensors'} <= fetched, handler.requests
    assert loaded['eval']['samples'] == results['best']['samples'] == 360
    assert loaded['eval']['top1'] == results['best']['top1']
    assert loaded['eval']['loss'] == pytest.approx(results['best']['loss'], rel=1e-5, abs=1e-6)


class _FakeHfApi:
    calls: list = []

    def __init__(self, endpoint=None, token=None, library_name=None):
        self.calls.append(('init', endpoint))

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(('create_repo', repo_id, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message='', ignore_patterns=None):
        uploaded = sorted(p.name for p in Path(folder_path).iterdir() if p.name not in (ignore_patterns or []))
        self.calls.append(('upload_folder', repo_id, uploaded))
        return type('CommitInfo', (), {'oid': 'a' * 40})()


def test_publish_pushes_with_hfapi_and_records_revision(published_folder, tmp_path, monkeypatch):
    import huggingface_hub
    from dynzoo.tools.publish import main
    monkeypatch.setattr(huggingface_hub, 'HfApi', _FakeHfApi)
    _FakeHfApi.calls = []
    index = tmp_path / 'index.json'
    assert main(['--folder', str(published_folder), '--index', str(index), '--endpoint', 'http://hub.test']) == 0
    assert _FakeHfApi.calls[0] == ('init', 'http://hub.test')
    assert ('create_repo', HUB_REPO, True) in _FakeHfApi.calls
    upload = next(c for c in _FakeHfApi.calls if c[0] == 'upload_folder')
    assert upload[1] == HUB_REPO and upload[2] == ['README.md', 'config.json', 'model.safetensors']
    data = json.loads(index.read_text())
    validate_index(data)
    assert data['entries'][0]['revision'] == 'a' * 40 and data['entries'][0]['hf_hub_id'] == HUB_REPO


def test_publish_refuses_modified_weights(published_folder, tmp_path):
    import shutil
    from dynzoo.tools.publish import publish_folder
    copy = tmp_path / 'copy'
    shutil.copytree(published_folder, copy)
    with open(copy / 'model.safetensors', 'r+b') as f:
        f.seek(-4, os.SEEK_END)
        f.write(b'\x00\x01\x02\x03')
    with pytest.raises(hub.CheckpointError, match='changed after export'):
        publish_folder(copy, dry_run=True)


# ---------------------------------------------------------------------------------------------------------------
# authors' checkpoints -> dynzoo safetensors (parity fixtures)


def _container(name, sd, use_ema=False):
    """The checkpoint layout each authors' training script writes (fixture .json, checkpoint_container)."""
    if name.startswith('fmdconv'):  # FMDConv main.py: DDP state dict under 'state_dict'
        return {'epoch': 99, 'state_dict': {'module.' + k: v for k, v in sd.items()}, 'best_acc': 73.2}
    if use_ema:  # AttNet / DMF: {'model': ..., 'model_ema': ...}; here only the EMA holds the real weights
        return {'model': {k: torch.zeros_like(v) for k, v in sd.items()}, 'model_ema': sd, 'epoch': 299}
    return {'model': sd, 'epoch': 299}


CONVERT_CASES = [('fmdconv_resnet18', False), ('attnet_t1', False), ('dmf_xxs', False), ('attnet_t1', True)]


@pytest.mark.parametrize('name,use_ema', CONVERT_CASES, ids=[f'{n}{"-ema" if e else ""}' for n, e in CONVERT_CASES])
def test_convert_authors_checkpoint(name, use_ema, tmp_path):
    """`dynzoo convert` on the authors' container of each parity fixture: the safetensors it writes reproduces
    the authors' logits; the entry holds sha256, size and the source release."""
    assert timm.is_model(name), f'{name} is not registered'
    from dynzoo.tools.convert import main
    sd, x, logits, meta = official_fixture(name)
    ckpt = tmp_path / 'authors.pth'
    torch.save(_container(name, sd, use_ema), ckpt)
    out = tmp_path / 'converted'
    argv = ['--model', name, '--checkpoint', str(ckpt), '--out', str(out), '--source-repo', meta['source_repo'],
            '--source-commit', meta['source_commit'], '--source-file', meta['source_file'], '--quiet']
    assert main(argv + (['--use-ema'] if use_ema else [])) == 0
    weights = out / 'model.safetensors'
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))).eval()
    with torch.no_grad():
        diff = (model(x) - logits).abs().max().item()
    assert diff <= 1e-4 * max(1.0, logits.abs().max().item()), diff
    entry = json.loads((out / ENTRY_NAME).read_text())
    validate_entry(entry)
    assert entry['sha256'] == hub.sha256_file(weights) and entry['size'] == weights.stat().st_size
    src = entry['source']
    assert src['type'] == 'converted' and src['repo'] == meta['source_repo']
    assert src['commit'] == meta['source_commit'] and src['url'] == f'https://github.com/{meta["source_repo"]}'
    assert src['original_sha256'] == hub.sha256_file(ckpt) and src['ema'] is use_ema
    assert entry['metrics'] == []  # no claimed metric was given: none is invented
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == name and config['num_classes'] == 1000
    assert meta['source_repo'] in (out / 'README.md').read_text()


def test_convert_refuses_wrong_architecture(tmp_path):
    """An authors' checkpoint of another network is refused, naming the mismatch; nothing is written."""
    from dynzoo.tools.convert import main
    sd = official_fixture('fmdconv_resnet18').state_dict
    ckpt = tmp_path / 'r18.pth'
    torch.save({'state_dict': sd}, ckpt)
    out = tmp_path / 'out'
    with pytest.raises(hub.CheckpointError, match='does not match|shapes do not match'):
        main(['--model', 'fmdconv_resnet34', '--checkpoint', str(ckpt), '--out', str(out),
                  '--source-repo', 'tianyu00824/FMDConv', '--quiet'])
    assert not (out / 'model.safetensors').exists()


def _fmd_authors_checkpoint(path: Path, seed: int = 0) -> Path:
    """A container as the FMDConv authors' main.py writes it, for the smallest FMDConv model."""
    sd = {k: v for k, v in perturbed_state_dict('fmdconv_mobilenetv2_050', seed=seed).items()
          if not k.endswith('temperature')}  # their code has none
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in sd.items()}}, path)
    return path


def test_convert_is_reproducible_and_honest(tmp_path):
    """The same authors' file converted twice gives the same bytes (every file, so the same sha256) and the same
    file modes; FMDConv's authors publish no licence, so the weights say "unknown" (not dynzoo's apache-2.0)
    unless --license says otherwise."""
    from dynzoo.tools.convert import main
    ckpt = _fmd_authors_checkpoint(tmp_path / 'fmd.pth')
    base = ['--model', 'fmdconv_mobilenetv2_050', '--checkpoint', str(ckpt), '--source-repo', 'tianyu00824/FMDConv',
            '--quiet', '--no-verify', '--no-user-index']
    outs = [tmp_path / 'a', tmp_path / 'b', tmp_path / 'c']
    for out in outs[:2]:
        assert main(base + ['--out', str(out)]) == 0
    assert main(base + ['--out', str(outs[2]), '--license', 'cc-by-4.0']) == 0
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ['README.md', 'config.json', ENTRY_NAME, 'model.safetensors']
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert len({(out / name).stat().st_mode for out in outs for name in names}) == 1
    entries = [json.loads((out / ENTRY_NAME).read_text()) for out in outs]
    assert entries[0]['license'] == 'unknown' and entries[2]['license'] == 'cc-by-4.0'
    assert json.loads((outs[0] / 'config.json').read_text())['pretrained_cfg']['license'] == 'unknown'
    assert 'license: unknown' in (outs[0] / 'README.md').read_text()
    assert hub.find_entry('fmdconv_mobilenetv2_050', 'in1k') is None  # --no-user-index


def test_converted_release_becomes_the_pretrained_weights(user_cache, tmp_path):
    """An authors' release listed as not mirrored (ODConv MobileNetV2-0.5 1x), converted once with `dynzoo
    convert`: its tag is recorded in the user's index with the release's licence, and in a new process
    ``pretrained=True`` on the name loads it (the default tag now), sha256-checked."""
    from dynzoo.tools.convert import main
    from _hub_server import hub_env, run_user_script
    name = 'odconv_mobilenetv2_050_1x'
    release = hub.find_entry(name, 'in1k')
    assert release['status'] == 'not_mirrored'
    sd = perturbed_state_dict(name, seed=3)
    ckpt = tmp_path / 'od.pth'
    torch.save({'state_dict': {k: v for k, v in sd.items() if not k.endswith('temperature')}}, ckpt)
    out = tmp_path / 'converted'
    assert main(['--model', name, '--checkpoint', str(ckpt), '--out', str(out), '--source-repo', 'OSVAI/ODConv',
                 '--quiet']) == 0
    entry = hub.find_entry(name, 'in1k')
    assert entry['status'] == 'published' and entry['file'] == str((out / 'model.safetensors').resolve())
    assert entry['license'] == release['license']
    env = dict(hub_env(tmp_path, offline=True), XDG_CACHE_HOME=str(user_cache))
    script = r'''
import json, sys, torch, timm, dynzoo
from safetensors.torch import load_file
name, reference = json.loads(sys.argv[1])
model, ref = timm.create_model(name, pretrained=True), load_file(reference)
print('RESULT ' + json.dumps(dict(tag=model.pretrained_cfg['tag'],
      equal=all(torch.equal(model.state_dict()[k], v) for k, v in ref.items()))))
'''
    res = run_user_script(script, [name, str(out / 'model.safetensors')], env)
    assert res == {'tag': 'in1k', 'equal': True}


def test_publish_records_in_the_user_index(user_cache, tmp_path, monkeypatch):
    """`dynzoo publish --dry-run` records the folder's local file in the user's index (the tag loads from it);
    a push records the repository and its commit instead."""
    import huggingface_hub
    from dynzoo.tools.convert import convert_checkpoint
    from dynzoo.tools.publish import main
    folder = tmp_path / 'fmd'
    convert_checkpoint('fmdconv_mobilenetv2_050', _fmd_authors_checkpoint(tmp_path / 'fmd.pth', seed=4), folder,
                       tag='authors', source={'repo': 'tianyu00824/FMDConv'}, verify=False, quiet=True)
    assert hub.find_entry('fmdconv_mobilenetv2_050', 'authors') is None  # the API writes no index unless asked
    assert main(['--folder', str(folder), '--dry-run']) == 0
    local = hub.find_entry('fmdconv_mobilenetv2_050', 'authors')
    assert local['file'] == str((folder / 'model.safetensors').resolve()) and 'hf_hub_id' not in local
    assert local['sha256'] == hub.sha256_file(folder / 'model.safetensors') and local['license'] == 'unknown'
    model = timm.create_model('fmdconv_mobilenetv2_050', pretrained=True,
                              pretrained_cfg=dict(architecture='fmdconv_mobilenetv2_050', tag='authors',
                                                  file=local['file']))
    assert model.pretrained_cfg['tag'] == 'authors'
    monkeypatch.setattr(huggingface_hub, 'HfApi', _FakeHfApi)
    assert main(['--folder', str(folder), '--endpoint', 'http://hub.test']) == 0
    pushed = hub.find_entry('fmdconv_mobilenetv2_050', 'authors')
    assert pushed['revision'] == 'a' * 40 and pushed['hf_hub_id'] == 'dynzoo/fmdconv_mobilenetv2_050.authors'
    assert 'file' not in pushed
