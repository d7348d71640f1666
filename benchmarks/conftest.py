"""Benchmarks run on one thread: the machine has 2 shared cores, and ratios between entries of one
group (pytest-benchmark's relative columns) are the claim, not absolute times."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)
    return
