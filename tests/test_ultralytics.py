"""SGDM in Ultralytics YOLO detectors (dynzoo.integrations.ultralytics): configs derived from the installed YAMLs,
the paper's counts, fuse, ONNX, Ultralytics' own training; and the timm-backbone example of docs/detection.md."""
import atexit
import copy
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Ultralytics reads these at import: its settings go to a throw-away folder (never the user's), no network checks,
# no pip installs
_CONFIG_DIR = tempfile.mkdtemp(prefix='dynzoo-ultralytics-')
atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
os.environ['YOLO_CONFIG_DIR'] = _CONFIG_DIR
os.environ['YOLO_OFFLINE'] = '1'
os.environ['YOLO_AUTOINSTALL'] = 'false'
ultralytics = pytest.importorskip('ultralytics')

import logging  # noqa: E402

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn import tasks  # noqa: E402
from ultralytics.utils import LOGGER, SETTINGS  # noqa: E402

import dynzoo.integrations.ultralytics as dzu  # noqa: E402
from dynzoo.integrations.ultralytics.digits import train_digits  # noqa: E402
from dynzoo.layers.sgdm import SGDM, sgdm_num_params  # noqa: E402
from dynzoo.tools.digits_detection import DigitsDetection, make_digits_detection  # noqa: E402

SETTINGS.update(sync=False)
LOGGER.setLevel(logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]

# The paper's parameter counts in millions, rounded as printed (one decimal): (table, baseline, + SGDM). Table 2
# (VOC) lists all six hosts; Table 5 (COCO) repeats YOLOv8n's 3.1 -> 3.3 (its YOLOv5n row is the original yolov5
# repository's anchor-based model, not Ultralytics').
PAPER_PARAMS_M = {
    'yolov8n': ('Table 2', 3.1, 3.3),
    'yolov8s': ('Table 2', 11.2, 11.8),
    'yolov5n': ('Table 2', 2.5, 2.8),
    'yolov5s': ('Table 2', 9.2, 9.8),
    'yolov6n': ('Table 2', 4.5, 4.5),
    'yolov6s': ('Table 2', 16.5, 16.6),
}
# Ultralytics' counts (its default nc=80) that do not round to the paper's print: documented in docs/detection.md.
# Pinned, so that a change of Ultralytics' counts makes the docs' table fail here rather than go stale.
PAPER_MISMATCHES = {('yolov8n', 'baseline'), ('yolov5n', 'baseline'), ('yolov5s', 'sgdm')}


def _params(model) -> int:
    """Parameters as Ultralytics' ``model.info()`` counts them ((layers, params, gradients, GFLOPs))."""
    return model.info(verbose=True)[1]


def _detect_in_channels(model):
    return [seq[0].conv.in_channels for seq in model.model[-1].cv2]


# Detectors whose installed Ultralytics YAML sgdm_model_cfg is tested on (scale n): docs/detection.md lists them
SGDM_HOSTS = ('yolov5n', 'yolov6n', 'yolov8n', 'yolov8n-p2', 'yolov8n-p6', 'yolov9t', 'yolov10n', 'yolo11n',
              'yolo12n', 'yolo26n')


def _absolute(f, i: int) -> list:
    """Row ``i``'s ``from`` (an index or a list of them) as absolute layer indices."""
    return [i + x if x < 0 else x for x in ([f] if isinstance(f, int) else f)]


def _reads(m) -> list:
    return _absolute(m.f, m.i)


def _readers(model, layers) -> list:
    """Each layer reading any of ``layers``: (its class name, how many of them it reads), sorted."""
    return sorted((type(m).__name__, sum(j in layers for j in _reads(m))) for m in model.model
                  if set(_reads(m)) & set(layers))


def test_register_idempotent_and_cfg_names():
    dzu.register()
    dzu.register()
    assert tasks.SGDM is SGDM
    for wrapped in (tasks.parse_model, tasks.check_yaml, tasks.BaseModel.fuse):
        assert not hasattr(wrapped.__wrapped__, '__wrapped__'), 'register() wrapped twice'
    assert dzu.parse_sgdm_cfg_name('yolov5s-sgdm-inline.yaml') == ('yolov5s.yaml', 'inline')
    assert dzu.parse_sgdm_cfg_name('cfg/yolov8n-p2-sgdm.yml') == ('yolov8n-p2.yml', 'paper')
    assert dzu.parse_sgdm_cfg_name('yolov8n.yaml') is None and dzu.parse_sgdm_cfg_name('yolov8n-sgdm.pt') is None
    path = tasks.check_yaml('yolov6s-sgdm.yaml')  # derived from the installed yolov6.yaml, written to the cache
    assert Path(path).parent == dzu.cfg_cache_dir() and Path(_CONFIG_DIR) in Path(path).parents
    assert not list((Path(dzu.__file__).parent).rglob('*.yaml'))  # dynzoo ships no Ultralytics YAML


def test_insert_rows_after():
    rows = [[-1, 1, 'A', [8]], [-1, 1, 'B', [16]], [[-1, 0], 1, 'Concat', [1]], [1, 1, 'C', [4]],
            [[1, -1, 3], 1, 'Detect', ['nc']]]
    assert dzu.insert_rows_after(rows, {1: [1, 1, 'X', [16]], 4: [4, 1, 'Y', []]}) == [
        [-1, 1, 'A', [8]], [-1, 1, 'B', [16]], [-1, 1, 'X', [16]], [[-1, 0], 1, 'Concat', [1]], [2, 1, 'C', [4]],
        [[2, -1, 4], 1, 'Detect', ['nc']], [-1, 1, 'Y', []]]
    assert dzu.insert_rows_after(rows, {}) == rows


@pytest.mark.parametrize('host', SGDM_HOSTS)
def test_sgdm_model_cfg_hosts(host):
    """Both placements on other Ultralytics detectors: one SGDM per head input, the head reading the SGDMs, and
    (in-line) every other reader of a head input reading its SGDM; building checks every SGDM's channels."""
    base_cfg = tasks.yaml_model_load(f'{host}.yaml')
    rows = base_cfg['backbone'] + base_cfg['head']
    inputs = _absolute(rows[-1][0], len(rows) - 1)
    base_readers = sorted((row[2].split('.')[-1], sum(j in inputs for j in _absolute(row[0], r)))
                          for r, row in enumerate(rows) if set(_absolute(row[0], r)) & set(inputs))
    for placement in ('paper', 'inline'):
        model = tasks.DetectionModel(dzu.sgdm_model_cfg(f'{host}.yaml', placement), verbose=False)
        sgdm_layers = [m.i for m in model.model if isinstance(m, SGDM)]
        assert len(sgdm_layers) == len(inputs) and _reads(model.model[-1]) == sgdm_layers
        readers = _readers(model, sgdm_layers)
        if placement == 'paper':
            assert [_reads(model.model[j]) for j in sgdm_layers] == [[j] for j in inputs]
            assert readers == [(type(model.model[-1]).__name__, len(inputs))]
        else:
            assert all(_reads(model.model[j]) == [j - 1] for j in sgdm_layers)
            assert readers == base_readers


def test_sgdm_model_cfg_errors():
    with pytest.raises(ValueError, match='placement must be one of'):
        dzu.sgdm_model_cfg('yolov8n.yaml', 'neck')
    with pytest.raises(ValueError, match='already has SGDM rows'):
        dzu.sgdm_model_cfg('yolov8n-sgdm.yaml')
    with pytest.raises(ValueError, match='no multi-scale head row'):
        dzu.sgdm_model_cfg('yolov8n-cls.yaml')


@pytest.mark.parametrize('host', list(PAPER_PARAMS_M))
def test_hosts_build_and_paper_counts(host):
    """The six hosts with SGDM (both placements) as Ultralytics builds and counts them, against the paper; in-line,
    the layers that read a neck output in the host read its SGDM instead (the PAN's downsampling convs too)."""
    base = YOLO(f'{host}.yaml').model
    parallel = YOLO(f'{host}-sgdm.yaml').model
    inline = YOLO(f'{host}-sgdm-inline.yaml').model
    widths = _detect_in_channels(base)
    for model in (parallel, inline):
        assert [m.channels for m in model.modules() if isinstance(m, SGDM)] == widths
        assert _detect_in_channels(model) == widths
        assert model.model[-1].stride.tolist() == base.model[-1].stride.tolist() == [8.0, 16.0, 32.0]
    neck_outputs = _reads(base.model[-1])
    assert _readers(inline, [m.i for m in inline.model if isinstance(m, SGDM)]) == _readers(base, neck_outputs)
    assert _readers(parallel, [m.i for m in parallel.model if isinstance(m, SGDM)]) == [('Detect', 3)]
    n_base, n_sgdm = _params(base), _params(parallel)
    assert _params(inline) == n_sgdm
    assert n_sgdm - n_base == sum(sgdm_num_params(c) for c in widths)
    table, paper_base, paper_sgdm = PAPER_PARAMS_M[host]
    for which, count, paper in (('baseline', n_base, paper_base), ('sgdm', n_sgdm, paper_sgdm)):
        matches = math.isclose(round(count / 1e6, 1), paper)
        assert matches != ((host, which) in PAPER_MISMATCHES), (host, which, count, table, paper)


def test_bad_sgdm_rows():
    d = tasks.yaml_model_load('yolov8n-sgdm.yaml')
    d['head'][-2][3] = []
    with pytest.raises(ValueError, match='SGDM row needs its channel count'):
        tasks.DetectionModel(d, verbose=False)
    d = tasks.yaml_model_load('yolov8n-sgdm.yaml')
    d['head'][-2][3] = [512]  # P5 is 1024 at the base width
    with pytest.raises(ValueError, match=r'SGDM expects \(B, 128, H, W\)'):
        tasks.DetectionModel(d, verbose=False)


def test_import_error_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n.startswith('dynzoo.integrations.ultralytics')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'ultralytics', None)
    with pytest.raises(ImportError, match=r"pip install 'dynzoo\[ultralytics\]'"):
        __import__('dynzoo.integrations.ultralytics')


def _trained_like(model: torch.nn.Module, affine: bool = True) -> torch.nn.Module:
    """``model`` in eval mode, its BatchNorms given running statistics of a batch and (``affine``) random affine
    parameters."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            if affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.2)
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64, dtype=next(model.parameters()).dtype))
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def test_fuse_runs_sgdm_reparameterized():
    """Ultralytics' fuse() folds every SGDM too; in float64 the fused detector equals the unfused one to rounding."""
    torch.manual_seed(0)
    model = _trained_like(tasks.DetectionModel('yolov8n-sgdm.yaml', nc=10, verbose=False).double())
    sgdms = [m for m in model.model if isinstance(m, SGDM)]
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    feats, outputs = {}, {}

    def record(module, inputs, output):
        feats[module] = inputs[0]
        outputs[module] = output

    hooks = [m.register_forward_hook(record) for m in sgdms]
    with torch.no_grad():
        y = model(x)[0]
    for h in hooks:
        h.remove()
    fused = copy.deepcopy(model).fuse(verbose=False)
    fused_sgdms = [m for m in fused.model if isinstance(m, SGDM)]
    assert all(m.guide is not None for m in fused_sgdms)
    assert not any(isinstance(b, torch.nn.BatchNorm2d) for m in fused_sgdms for b in m.modules())
    with torch.no_grad():
        for m, fused_m in zip(sgdms, fused_sgdms):  # each SGDM exactly, on its own input
            assert _close(fused_m(feats[m]), outputs[m], rtol=1e-10)
        assert _close(fused(x)[0], y, rtol=1e-10)  # the whole detector (Ultralytics' Conv+BN folds included)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    assert dzu.fuse_sgdm(fused) == 3
    assert all(torch.equal(v, fused.state_dict()[k]) for k, v in state.items())  # a second fold is a no-op


def test_onnx_export_parity(tmp_path, monkeypatch):
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    yolo = YOLO('yolov8n-sgdm.yaml')
    _trained_like(yolo.model, affine=False)
    path = yolo.export(format='onnx', imgsz=64, batch=1, simplify=False, device='cpu')
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert 'BatchNormalization' not in ops  # SGDM's BNs were folded by the fuse() hook before tracing
    x = torch.rand(1, 3, 64, 64)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    y_onnx = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        y_torch = copy.deepcopy(yolo.model).fuse(verbose=False)(x)[0]
        y_unfused = yolo.model(x)[0]
    assert y_onnx.shape == y_torch.shape == (1, 4 + 80, 84)
    assert _close(y_onnx, y_torch) and _close(y_onnx, y_unfused)


@pytest.fixture(scope='module')
def tiny_digits(tmp_path_factory):
    return make_digits_detection(tmp_path_factory.mktemp('digits'), num_train=6, num_val=3, seed=1)


def test_digits_detection_dataset(tiny_digits, tmp_path):
    root = tiny_digits.parent
    assert 'names:' in tiny_digits.read_text() and f'path: {root.resolve()}' in tiny_digits.read_text()
    for split, count in (('train', 6), ('val', 3)):
        data = DigitsDetection(root, split)
        assert len(data) == count
        for image, target in data:
            assert image.shape[0] == 3 and 96 <= image.shape[1] <= 128 and 96 <= image.shape[2] <= 128
            boxes = target['boxes']
            assert len(boxes) == len(target['labels']) >= 1
            assert ((boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, :2] >= 0).all()
                    and (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all())
            assert ((target['labels'] >= 0) & (target['labels'] <= 9)).all()
            for x0, y0, x1, y1 in boxes.round().int().tolist():  # each box holds ink, the background is dark
                assert image[0, y0:y1, x0:x1].max() > 0.5
    again = make_digits_detection(tmp_path, num_train=6, num_val=3, seed=1)
    for a, b in zip(sorted((root / 'labels').rglob('*.txt')), sorted((again.parent / 'labels').rglob('*.txt'))):
        assert a.read_text() == b.read_text()  # seeded
    with pytest.raises(ValueError, match='digit_sizes'):
        make_digits_detection(tmp_path, digit_sizes=(20, 200))


def test_ultralytics_short_training(tiny_digits, tmp_path):
    """Ultralytics' own trainer and validator, one epoch on six images (the full comparison: docs/detection.md)."""
    result = train_digits('yolov8n-sgdm.yaml', tiny_digits, epochs=1, imgsz=64, batch=3, project=tmp_path,
                          mosaic=0.0)
    assert all(math.isfinite(result[k]) and 0.0 <= result[k] <= 1.0 for k in ('map50', 'map', 'untrained_map50'))
    assert result['params'] == _params(tasks.DetectionModel('yolov8n-sgdm.yaml', nc=10, verbose=False))


def test_timm_backbone_example(tmp_path, monkeypatch):
    """docs/detection.md's example (sgdm_cspdarknet_n features_only -> FPN -> torchvision FCOS), as written."""
    pytest.importorskip('torchvision')
    text = (ROOT / 'docs' / 'detection.md').read_text()
    code = re.search(r'<!-- example: timm-backbone -->\s*```python\n(.*?)```', text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {'__name__': 'detection_example'}
    exec(compile(code, 'docs/detection.md', 'exec'), scope)
    assert math.isfinite(scope['loss'].item())
    assert set(scope['detections']) == {'boxes', 'scores', 'labels'}
    assert _close(scope['p3_deployed'], scope['p3'], rtol=1e-5)
    sgdms = [m for m in scope['deployed'].modules() if isinstance(m, SGDM)]
    assert len(sgdms) == 3 and all(m.guide is not None for m in sgdms)
