"""Shared pytest setup for tests/ and the doctests in skbilevel/."""

import os

import pytest
import torch

# Under pytest-xdist every worker is one process: one torch thread each avoids
# oversubscribing the cores (CI has two).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """torch on one CPU thread for the test (restored after): the numpy and
    scipy routes of the heavy products are taken only then."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
