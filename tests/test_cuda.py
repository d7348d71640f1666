"""CUDA paths: state on the device of the updates, fp16/bf16 logits, host-memory state with
asynchronous pinned transfers, GraNd on CUDA. Skipped without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sampleweights as sw
from conftest import all_logit_scorers
from grand_settings import SETTINGS, reference_grand

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


# -- the collection on CUDA ----------------------------------------------------------------------


def _history(n: int, steps: int, classes: int, seed: int = 0):
    """Batches with in-batch duplicates (every other step) and a few confident rows."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        idx = torch.randint(0, n, (24,), generator=gen)
        if step % 2:
            idx[:6] = idx[6:12]  # repeated indices inside one batch
        logits = torch.randn(24, classes, generator=gen) * 4
        logits[0] *= 20  # a very confident row
        y = torch.randint(0, classes, (24,), generator=gen)
        out.append((idx, logits, y))
    return out


def _assert_same_scores(got: dict, want: dict, rtol: float, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name].cpu(),
            want[name].cpu(),
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state", ["cuda", "cpu"])
def test_collection_on_cuda_matches_cpu(dtype, state):
    """Every logit scorer in one collection, logits on the GPU in fp32/fp16/bf16 (math in
    fp32), state on the GPU or in host memory, against the same collection on the CPU fed the
    same (rounded) logits in fp32."""
    data = _history(40, 6, 7)
    cpu = sw.ScorerCollection(*all_logit_scorers(40))
    gpu = sw.ScorerCollection(*all_logit_scorers(40, device=state))
    for idx, logits, y in data:
        rounded = logits.to(dtype)
        cpu.update_indexed(idx, rounded.float(), y)
        gpu.update_indexed(idx, rounded.cuda(), y)
    assert all(s.device.type == state for s in gpu)
    _assert_same_scores(gpu.compute(), cpu.compute(), rtol=1e-5, atol=1e-6)
    sd = gpu.state_dict()
    again = sw.ScorerCollection(*all_logit_scorers(40))
    again.load_state_dict(sd)  # a CUDA run's state resumes on the CPU
    _assert_same_scores(again.compute(), cpu.compute(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("classes", [10, 1000, 32000])
def test_compiled_collection_on_cuda_matches_eager(classes):
    """``compile=True`` on CUDA (Triton kernels): the same scores as the eager pass (the sums
    of exponentials round in the compiler's order), and the compiler did not fall back."""
    data = _history(64, 4, classes, seed=classes)
    eager = sw.ScorerCollection(*all_logit_scorers(64))
    compiled = sw.ScorerCollection(*all_logit_scorers(64), compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns
        for idx, logits, y in data:
            logits = logits.cuda()
            eager.update_indexed(idx, logits, y)
            compiled.update_indexed(idx, logits, y)
    assert compiled._fused is not None
    rtol = 1e-5 if classes <= 1000 else 2e-5  # ~√C ulps: sums over the classes reordered
    _assert_same_scores(compiled.compute(), eager.compute(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True])
def test_collection_update_has_no_host_sync_on_cuda(compile):
    """With ``validate=False`` and ``nonfinite="skip"`` an update only launches kernels: no
    device-to-host read, for distinct indices and for repeated ones."""
    kw = {"validate": False, "nonfinite": "skip"}
    coll = sw.ScorerCollection(*all_logit_scorers(64, device="cuda", **kw), compile=compile)
    data = [(i.cuda(), x.cuda(), y.cuda()) for i, x, y in _history(64, 5, 10)]
    coll.update_indexed(*data[0])  # claims the device, compiles
    coll.update_indexed(*data[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in data[2:]:
            coll.update_indexed(*batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = sw.ScorerCollection(*all_logit_scorers(64))
    for i, x, y in data:
        ref.update_indexed(i.cpu(), x.cpu(), y.cpu())
    _assert_same_scores(coll.compute(), ref.compute(), rtol=1e-5, atol=1e-6)


def test_large_vocabulary_update_holds_one_fp32_buffer():
    """Peak extra GPU memory of a whole collection's update at 150k classes: at most one
    ``(B, C)`` fp32 buffer plus O(B), beyond the bf16 logits themselves."""
    b, c = 32, 150_000
    coll = sw.ScorerCollection(*all_logit_scorers(1000, device="cuda"))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(1000, generator=gen)[:b]
    logits = (torch.randn(b, c, generator=gen) * 3).to(torch.bfloat16).cuda()
    y = torch.randint(0, c, (b,), generator=gen).cuda()
    coll.update_indexed(idx, logits, y)  # state allocated, caches warm
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    coll.update_indexed(idx, logits, y)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= b * c * 4 + 64 * 1024, f"{extra} bytes against {b * c * 4} for one buffer"


# -- GraNd on CUDA -------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_grand_settings_on_cuda_match_the_float64_reference(setting, engine):
    """Every GraNd setting, on the GPU (TF32 off: the probe's tolerance is not the claim here),
    against one-example-at-a-time float64 autograd on the CPU."""
    torch.manual_seed(0)
    model = setting.build().eval()
    gen = torch.Generator().manual_seed(1)
    x = setting.inputs(7, gen)
    y = torch.randint(0, setting.classes, (7,), generator=gen)
    want = reference_grand(model.double(), x.double() if x.is_floating_point() else x, y)
    model.float().cuda()
    g = sw.GraNd(model, 7, engine=engine)
    g.update_indexed(torch.arange(7), x.cuda(), y.cuda())
    torch.testing.assert_close(g.compute().cpu().double(), want, rtol=2e-4, atol=1e-6)


def test_grand_hooks_under_autocast_on_cuda():
    """bf16 autocast forward (math in fp32 for the norms): close to the fp32 result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).cuda()
    x, y = torch.randn(32, 20, device="cuda"), torch.randint(0, 5, (32,), device="cuda")
    plain = sw.GraNd(model, 32)
    plain.update_indexed(torch.arange(32), x, y)
    mixed = sw.GraNd(model, 32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed.update_indexed(torch.arange(32), x, y)
    got, want = mixed.compute(), plain.compute()
    assert got.dtype == torch.float32 and got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-3)


def test_fused_collection_update_on_cuda_matches_eager():
    """``compile=True`` with fusable scorers: one compiled call per update (Triton), indices
    from the CPU (as a DataLoader gives them), the eager collection's scores; non-finite logits
    raise and change nothing."""
    from sampleweights.scorers import fused as fused_module

    calls = []
    inner = fused_module.compiled_update()
    data = [(i.unique()[:16], x, y) for i, x, y in _history(64, 6, 10)]  # distinct indices
    data = [(i, x[: len(i)].cuda(), y[: len(i)]) for i, x, y in data]
    eager = sw.ScorerCollection(*all_logit_scorers(64, confidence_ema=None))
    fused = sw.ScorerCollection(*all_logit_scorers(64, confidence_ema=None), compile=True)
    fused._whole = lambda *args: calls.append(1) or inner(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for batch in data:
            eager.update_indexed(*batch)
            fused.update_indexed(*batch)
    assert len(calls) == len(data) - 1  # the first update places the states
    _assert_same_scores(fused.compute(), eager.compute(), rtol=1e-5, atol=1e-6)
    before = {s.name: s.state_dict() for s in fused}
    idx, logits, y = data[0]
    logits = logits.clone()
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fused.update_indexed(idx, logits, y)
    for s in fused:
        for key, value in before[s.name]["state"].items():
            assert torch.equal(s.state_dict()["state"][key].nan_to_num(), value.nan_to_num())
