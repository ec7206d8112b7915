import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, NamedTuple

import pytest
import torch

# tests never reach the network: hub tests serve their own files on 127.0.0.1 or from a local cache (each in a
# process of its own, with its own environment: tests/_hub_server.py). huggingface_hub reads these at import time.
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# the suite never reads or writes the user's own dynzoo cache (user weights index, hub pins): see _own_dynzoo_cache
os.environ.pop('DYNZOO_CACHE', None)
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='dynzoo-test-xdg-cache-')
os.environ['HF_HUB_CACHE'] = tempfile.mkdtemp(prefix='dynzoo-test-hf-cache-')  # an empty hub cache

import dynzoo  # noqa: F401  -- registers the models  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):
    # `make test` runs two xdist workers on the two cores: one thread each
    torch.set_num_threads(1)

# The authors' parity fixtures: networks built with the authors' own public code, their state dicts in the authors'
# key names, one input and the logits their code computed. CI lays them beside the checkout (the default) and fails
# without them; anywhere else, point the variable at their folder, or the parity tests skip.
OFFICIAL_FIXTURES_ENV = 'DYNZOO_OFFICIAL_FIXTURES'
OFFICIAL_FIXTURES = Path(os.environ.get(OFFICIAL_FIXTURES_ENV)
                         or Path(__file__).resolve().parents[2] / 'shared' / 'fixtures' / 'official')


class OfficialFixture(NamedTuple):
    state_dict: Dict[str, torch.Tensor]  # the authors' state dict, their key names
    input: torch.Tensor  # (2, 3, 224, 224)
    logits: torch.Tensor  # their network's eval-mode fp32 logits of ``input``
    meta: Dict[str, Any]  # source repository and commit, checkpoint container, parameter count


def official_fixture(name: str) -> OfficialFixture:
    """The parity fixture of dynzoo model ``name`` (``<name>.official.safetensors`` + ``.json``), or a skip of the
    calling test when the folder ``$DYNZOO_OFFICIAL_FIXTURES`` (default: where CI lays it, beside the checkout)
    does not hold it. A float tensor is stored as int8 ``q.<key>`` times a power-of-two ``scale.<key>`` (exact in
    fp32), an integer buffer as ``raw.<key>``."""
    from safetensors.torch import load_file
    tensors = OFFICIAL_FIXTURES / f'{name}.official.safetensors'
    if not tensors.is_file():
        pytest.skip(f'authors\' parity fixture {tensors} not found: set ${OFFICIAL_FIXTURES_ENV} to the folder '
                    f'that holds {name}.official.safetensors')
    data = load_file(str(tensors))
    state_dict = {k[2:]: v.float() * data['scale.' + k[2:]] for k, v in data.items() if k.startswith('q.')}
    state_dict.update({k[4:]: v for k, v in data.items() if k.startswith('raw.')})
    meta = json.loads(tensors.with_suffix('.json').read_text())
    return OfficialFixture(state_dict, data['input'], data['logits'], meta)


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` every test of one model stays on one worker (the model is built once there)."""
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        if 'built' in params:
            item.add_marker(pytest.mark.xdist_group(f'model-{params["built"]}'))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _own_dynzoo_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty dynzoo cache of its own (``$XDG_CACHE_HOME/dynzoo``: the user's weights index
    and hub pins), so what one test writes there (``dynzoo convert``, ``weights add``) is not seen by another."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path_factory.mktemp('xdg_cache')))


# A zoo-wide sweep runs in CI on one model of every (family, structure): the variants that only widen or deepen a
# sibling of the same structure (ResNet-34 beside -18, ResNet-101 beside -50, MobileNetV2 0.75 / 1.0 beside 0.5,
# AttNet T2..T4 beside T1, DMF XS / S beside XXS, the larger Swin / PVT / CSPDarknet) are `slow` (make test-all).
# timm's own tests/test_models.py still runs on every name in CI.
_STRUCTURE = [(r'resnet(18|34)', 'resnet-basic'), (r'resnet(50|101)', 'resnet-bottleneck'),
              (r'mobilenetv2_\d+', 'mobilenetv2'), (r'^attnet_t\d$', 'attnet_t'), (r'^attnet_(xxs|xs|s)$', 'attnet_x'),
              (r'^dmf_(xxs|xs|s)$', 'dmf'), (r'^atconv_swin_.*', 'atconv_swin'), (r'^atconv_pvt_.*', 'atconv_pvt'),
              (r'^sgdm_cspdarknet_.*', 'sgdm_cspdarknet')]


def structure(name: str) -> str:
    """``name`` with its width / depth left out: the models one representative stands for."""
    for pattern, repl in _STRUCTURE:
        name = re.sub(pattern, repl, name)
    return name


def zoo_params(names):
    """``names`` as pytest params, all but the smallest model of each :func:`structure` marked ``slow``."""
    def size(n):  # depth / width in the name: 18 < 50, 050 < 100, t1 < t4, xxs < xs < s, tiny < base
        words = ['xxs', 'xs', 'n', 'tiny', 's', 'small', 'medium', 'large', 'base']
        tail = n.rsplit('_', 2)
        rank = min((words.index(w) for w in tail if w in words), default=len(words))
        number = re.search(r'(\d+)(?:_\dx)?$|resnet(\d+)', n)
        return rank, int(next(g for g in number.groups() if g)) if number else 0, n
    representatives = {}
    for n in sorted(names, key=size):
        representatives.setdefault(structure(n), n)
    return [pytest.param(n, id=n, marks=() if representatives[structure(n)] == n else pytest.mark.slow) for n in names]
