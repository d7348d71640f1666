"""CUDA paths: state on the device of the updates, fp16/bf16 logits, host-memory state with
asynchronous pinned transfers, GraNd on CUDA. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sampleweights as sw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCORERS = [sw.EL2N, sw.ForgettingTracker, sw.Misclassified]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", SCORERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("state", ["cuda", "cpu"])
def test_cuda_logits_match_cpu_reference(cls, dtype, state):
    gen = torch.Generator().manual_seed(0)
    ref, s = cls(50), cls(50, device=state)
    for _ in range(5):
        idx = torch.randint(0, 50, (32,), generator=gen)
        logits = (torch.randn(32, 7, generator=gen) * 4).to(dtype)
        y = torch.randint(0, 7, (32,), generator=gen)
        ref.update_indexed(idx, logits.float(), y)
        s.update_indexed(idx, logits.cuda(), y)
    assert s.device.type == state
    got = s.compute().cpu()
    torch.testing.assert_close(got, ref.compute(), equal_nan=True, rtol=1e-5, atol=1e-6)
    sd = s.state_dict()  # flushes a pending host transfer
    assert sd["num_updates"] == 5


def test_grand_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    cpu = sw.GraNd(model, 16)
    cpu.update_indexed(torch.arange(16), x, y)
    model.cuda()
    gpu = sw.GraNd(model, 16)
    gpu.update_indexed(torch.arange(16), x, y)
    torch.testing.assert_close(gpu.compute().cpu(), cpu.compute(), rtol=1e-4, atol=1e-6)
