"""Test helpers for the weight hub: a tiny Hugging Face hub on 127.0.0.1, an HF cache laid out on disk, a
temporary weights index and a runner for user-side scripts in a fresh interpreter.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HOME`` once, at import time
(``huggingface_hub.constants``), so every load that depends on them runs in a subprocess started with that
environment -- exactly as a user would set the variables before starting Python.

:class:`LocalHub` implements what ``hf_hub_download`` uses (huggingface_hub 0.20 ... 2.x,
``file_download.get_hf_file_metadata`` / ``http_get``):

* ``HEAD /{repo_id}/resolve/{revision}/{filename}`` -> ``200`` with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length``; or, for ``lfs=True`` repos, the hub's LFS answer: ``302`` to a CDN URL on another host
  (``localhost`` instead of ``127.0.0.1``) carrying ``X-Linked-Etag``, ``X-Linked-Size`` and ``X-Repo-Commit``;
* ``GET`` of the same URL (or of the CDN URL) -> the bytes (``Range: bytes=N-`` honoured, ``206``);
* unknown repo / file / revision -> ``404`` with the hub's ``X-Error-Code`` (``RepoNotFound``,
  ``EntryNotFound``, ``RevisionNotFound``).

The server is bounded: it answers at most ``max_requests`` requests (then ``503``) and shuts itself down after
``lifetime_s`` seconds; :meth:`LocalHub.stop` (or leaving the ``with`` block) stops it at once.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMIT = '0123456789abcdef0123456789abcdef01234567'
INDEX_SCHEMA = 'dynzoo-weights-index/1'


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalHub:
    """A bounded, threaded HF-hub-compatible file server on 127.0.0.1 (see the module docstring)."""

    def __init__(
            self,
            repos: Dict[str, Dict[str, bytes]],
            commit: str = DEFAULT_COMMIT,
            lfs_repos: Tuple[str, ...] = (),
            max_requests: int = 64,
            lifetime_s: float = 120.0,
    ):
        self.repos = repos
        self.commit = commit
        self.lfs_repos = set(lfs_repos)
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.requests: List[Tuple[str, str, int]] = []  # (method, path, status)
        self.overflow = False
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None
        self._blobs = {sha256_bytes(d): d for files in repos.values() for d in files.values()}

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def start(self) -> 'LocalHub':
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs=dict(poll_interval=0.05),
                                        name='dynzoo-test-hub', daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> 'LocalHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, method: str, path_part: str = '') -> int:
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    # -- request handling ------------------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        method = 'HEAD' if head else 'GET'
        with self._lock:
            over = len(self.requests) >= self.max_requests
            if over:
                self.overflow = True
        if over:
            return self._send(req, method, 503, {}, b'', head)
        path = unquote(req.path.split('?', 1)[0])
        if path.startswith('/cdn/'):
            data = self._blobs.get(path[len('/cdn/'):])
            if data is None:
                return self._send(req, method, 404, {}, b'', head)
            return self._send_data(req, method, data, {'ETag': f'"{sha256_bytes(data)}"'}, head)
        parts = path.strip('/').split('/')
        # /{org}/{name}/resolve/{revision}/{filename...}
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._send(req, method, 404, {'X-Error-Code': 'RepoNotFound'}, b'', head)
        repo_id, revision, filename = '/'.join(parts[:2]), parts[3], '/'.join(parts[4:])
        files = self.repos.get(repo_id)
        if files is None:
            return self._send(req, method, 404, {'X-Error-Code': 'RepoNotFound'}, b'', head)
        if revision not in ('main', self.commit):
            return self._send(req, method, 404, {'X-Error-Code': 'RevisionNotFound'}, b'', head)
        data = files.get(filename)
        if data is None:
            return self._send(req, method, 404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': self.commit},
                              b'', head)
        etag = sha256_bytes(data)
        if repo_id in self.lfs_repos:  # the hub's LFS answer: redirect to a CDN host, metadata in X-Linked-*
            headers = {
                'Location': f'http://localhost:{self.port}/cdn/{etag}', 'X-Repo-Commit': self.commit,
                'X-Linked-Etag': f'"{etag}"', 'X-Linked-Size': str(len(data)), 'ETag': '"pointer-file-etag"',
            }
            return self._send(req, method, 302, headers, b'', head)
        return self._send_data(req, method, data, {'ETag': f'"{etag}"', 'X-Repo-Commit': self.commit}, head)

    def _send_data(self, req, method: str, data: bytes, headers: Dict[str, str], head: bool) -> None:
        start, status = 0, 200
        rng = req.headers.get('Range')
        if rng and rng.startswith('bytes=') and not head:
            first = rng[len('bytes='):].split('-', 1)[0]
            if first.isdigit() and int(first) < len(data):
                start, status = int(first), 206
                headers = dict(headers, **{'Content-Range': f'bytes {start}-{len(data) - 1}/{len(data)}'})
        headers = dict(headers, **{'Accept-Ranges': 'bytes', 'Content-Type': 'application/octet-stream'})
        self._send(req, method, status, headers, data[start:], head)

    def _send(self, req, method: str, status: int, headers: Dict[str, str], body: bytes, head: bool) -> None:
        with self._lock:
            if status != 503:
                self.requests.append((method, req.path, status))
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header('Content-Length', str(len(body)))
        req.end_headers()
        if not head and body:
            try:
                req.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass


# -- Hugging Face cache on disk, weights index, subprocess runner ---------------------------------------------

def write_hf_cache(hub_cache: Path, repo_id: str, filename: str, data: bytes, commit: str = DEFAULT_COMMIT,
                   ref: str = 'main') -> Path:
    """Lay ``data`` out as huggingface_hub's cache does: ``models--org--name/{blobs/<sha>, refs/<ref>,
    snapshots/<commit>/<filename> -> ../../blobs/<sha>}``. Returns the snapshot path."""
    repo_dir = Path(hub_cache) / ('models--' + repo_id.replace('/', '--'))
    blob = repo_dir / 'blobs' / sha256_bytes(data)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    (repo_dir / 'refs').mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs' / ref).write_text(commit)
    snap = repo_dir / 'snapshots' / commit / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    try:
        snap.symlink_to(os.path.relpath(blob, snap.parent))
    except OSError:  # no symlinks on this filesystem: huggingface_hub then copies
        snap.write_bytes(data)
    return snap


def published_entry(model: str, tag: str, data: bytes, filename: str = 'model.safetensors', **extra) -> dict:
    """A ``"published"`` weights-index entry for ``data`` (its real sha256 and size unless overridden)."""
    entry = dict(model=model, tag=tag, status='published', hf_hub_id=f'dynzoo/{model}.{tag}',
                 filename=filename, sha256=sha256_bytes(data), size=len(data))
    entry.update(extra)
    return entry


def write_index(path: Path, entries: List[dict]) -> Path:
    path = Path(path)
    path.write_text(json.dumps({'schema': INDEX_SCHEMA, 'entries': entries}, indent=2))
    return path


def hub_env(tmp_path: Path, index: Optional[Path] = None, endpoint: Optional[str] = None,
            offline: bool = False) -> Dict[str, str]:
    """Environment for a user process: HF_HOME/HF_HUB_CACHE and the user's cache (``XDG_CACHE_HOME``: dynzoo's
    own index and hub pins) in ``tmp_path``, the temp index (the packaged one where ``None``), the endpoint."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('HF_') and k not in ('DYNZOO_WEIGHTS_INDEX', 'DYNZOO_CACHE', 'TRANSFORMERS_OFFLINE')}
    hf_home = Path(tmp_path) / 'hf_home'
    if index is not None:
        env['DYNZOO_WEIGHTS_INDEX'] = str(index)
    env.update(
        HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / 'hub'), XDG_CACHE_HOME=str(Path(tmp_path) / 'xdg_cache'),
        HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_DISABLE_IMPLICIT_TOKEN='1',
        HF_HUB_ETAG_TIMEOUT='10', HF_HUB_DOWNLOAD_TIMEOUT='30',
        NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost',
        OMP_NUM_THREADS='1', PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
    )
    if endpoint:
        env['HF_ENDPOINT'] = endpoint
    if offline:
        env['HF_HUB_OFFLINE'] = '1'
    return env


# Runs in the user process: each action is a (label, model name, kwargs, reference file or None); prints one JSON
# line {label: {"ok", "error_type", "message", "max_abs_diff", "keys_equal"}}.
_USER_SCRIPT = r'''
import json, sys, torch
torch.set_num_threads(1)
import timm, dynzoo
from safetensors.torch import load_file
actions = json.loads(sys.argv[1])
out = {}
for label, name, kwargs, reference in actions:
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        out[label] = dict(ok=False, error_type=type(e).__name__, message=str(e),
                          is_checkpoint_error=isinstance(e, dynzoo.CheckpointError))
        continue
    res = dict(ok=True)
    if reference:
        ref, sd = load_file(reference), model.state_dict()
        res['keys_equal'] = set(ref) == set(sd)
        res['max_abs_diff'] = max(float((sd[k].float() - v.float()).abs().max()) for k, v in ref.items() if k in sd)
    out[label] = res
print('RESULT ' + json.dumps(out))
'''


def run_user_script(script: str, payload, env: Dict[str, str], timeout: float = 240.0):
    """Run ``script`` in a fresh interpreter with ``env`` and ``payload`` (JSON) as its argument; returns what it
    printed as its ``RESULT <json>`` line."""
    proc = subprocess.run(
        [sys.executable, '-c', script, json.dumps(payload)], env=env, cwd=str(REPO_ROOT),
        capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f'user process failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return json.loads(lines[-1][len('RESULT '):])


def run_user_loads(actions: List[tuple], env: Dict[str, str], timeout: float = 240.0) -> Dict[str, dict]:
    """Run ``timm.create_model(name, pretrained=True, **kwargs)`` for each action in a fresh interpreter."""
    return run_user_script(_USER_SCRIPT, actions, env, timeout)


def perturbed_state_dict(model_name: str, seed: int = 0, **kwargs) -> Dict[str, 'torch.Tensor']:
    """The state dict of a freshly built ``model_name`` with every float tensor moved away from its init
    (BN statistics, zero biases and temperatures included), so a load that silently does nothing is caught."""
    import torch
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(model_name, **kwargs)
    sd = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith('temperature'):
                v = v + 1.5 + seed  # a temperature of the checkpoint's own
            elif k.endswith('running_var'):
                v = torch.rand_like(v) + 0.5
            elif v.is_floating_point():
                v = v + 0.05 * torch.randn_like(v)
            sd[k] = v.detach().clone().contiguous()
    return sd
