import os

import pytest
import torch

import dynzoo  # noqa: F401  -- registers the models

# tests never reach the network: hub tests serve their own files on 127.0.0.1 or from a local cache
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

if os.environ.get('PYTEST_XDIST_WORKER'):
    # `make test` runs two xdist workers on the two cores: one thread each
    torch.set_num_threads(1)


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
