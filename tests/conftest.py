import os

import pytest
import torch

import dynzoo  # noqa: F401  -- registers the models

# tests never reach the network: hub tests serve their own files on 127.0.0.1 or from a local cache
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
