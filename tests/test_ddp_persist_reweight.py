"""save_scores and LossReweighter under a real 2-process gloo group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import sampleweights as sw
from ddp import run_ddp

pytestmark = pytest.mark.ddp

N, CLASSES = 11, 3


def _logits(indices):
    """Deterministic logits per dataset index, so every rank and the reference agree."""
    return torch.stack(
        [torch.randn(CLASSES, generator=torch.Generator().manual_seed(int(i))) for i in indices]
    )


def _shard_scorer(rank, world):
    s = sw.EL2N(N)
    idx = torch.arange(rank, N, world)
    s.update_indexed(idx, _logits(idx), idx % CLASSES)
    return s


def _count_writes():
    """Record every np.savez (a write) and os.replace (its atomic rename) of this process."""
    calls = []
    original_savez, original_replace = np.savez, os.replace

    def savez(*args, **kwargs):
        calls.append("savez")
        return original_savez(*args, **kwargs)

    def replace(src, dst):
        calls.append(Path(dst).name)
        return original_replace(src, dst)

    def restore():
        np.savez, os.replace = original_savez, original_replace

    np.savez, os.replace = savez, replace
    return calls, restore


def _save(rank, world, directory):
    directory = Path(directory)
    writes, restore = _count_writes()
    s = _shard_scorer(rank, world)
    # a scorer: a collective; rank 0 writes the merged scores; the file exists on return
    path = sw.save_scores(directory / "el2n", s, epoch=1)
    exists_on_return = path.exists()
    loaded, meta = sw.load_scores(path, num_examples=N)
    merged = s.compute()
    # a tensor: rank 0 writes, the others return without writing and without a collective
    tensor_path = sw.save_scores(directory / "tensor", merged, scorer="el2n")
    restore()
    # rank 0's write fails: every rank raises at once, nothing is left behind
    original_savez = np.savez

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if rank == 0:
        np.savez = disk_full
    try:
        sw.save_scores(directory / "fail", s)
        error = None
    except (OSError, RuntimeError) as err:
        error = f"{type(err).__name__}: {err}"
    np.savez = original_savez
    listing = sorted(p.name for p in directory.iterdir())
    # the tempting workaround, "destroy the group, then save on rank 0", must not write this
    # rank's partial scores as if they were merged
    dist.barrier()
    dist.destroy_process_group()
    after_destroy = None
    if rank == 0:
        try:
            sw.save_scores(directory / "partial", s)
            after_destroy = "returned"
        except RuntimeError as err:
            after_destroy = f"RuntimeError: {err}"
    partial_written = (directory / "partial.npz").exists()
    return {
        "writes": writes,
        "exists_on_return": exists_on_return,
        "loaded": loaded,
        "merged": merged,
        "meta": meta,
        "tensor_path": tensor_path.name,
        "error": error,
        "listing": listing,
        "after_destroy": after_destroy,
        "partial_written": partial_written,
    }


def test_save_scores_writes_merged_scores_once_atomically(tmp_path):
    ranks = run_ddp(_save, str(tmp_path), timeout=60)
    reference = sw.EL2N(N)
    reference.update_indexed(torch.arange(N), _logits(range(N)), torch.arange(N) % CLASSES)
    expected = reference.compute()
    assert ranks[0]["writes"] == ["savez", "el2n.npz", "savez", "tensor.npz"]  # one writer...
    assert ranks[1]["writes"] == []  # ...and only one
    for r in ranks:
        assert r["exists_on_return"]  # no rank returns before the file exists
        torch.testing.assert_close(r["loaded"], expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(r["merged"], expected, rtol=1e-6, atol=0)
        assert r["meta"]["scorer"] == "el2n" and r["meta"]["epoch"] == 1
        assert r["tensor_path"] == "tensor.npz"
        assert r["listing"] == ["el2n.npz", "tensor.npz"]  # no temporary, no failed file
    assert "No space left" in ranks[0]["error"]
    assert ranks[0]["after_destroy"].startswith("RuntimeError"), ranks[0]["after_destroy"]
    assert "destroy_process_group" in ranks[0]["after_destroy"]
    assert not ranks[0]["partial_written"]
    assert ranks[1]["error"].startswith("RuntimeError") and "rank 0 failed" in ranks[1]["error"]
    loaded, _ = sw.load_scores(tmp_path / "tensor", num_examples=N)
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=0)


TIMEOUT = 3.0


def _save_on_rank_zero_only(rank, world, directory):
    directory = Path(directory)
    flag = directory / "rank0-done"
    s = _shard_scorer(rank, world)
    if rank != 0:  # stays in the group, doing nothing, until rank 0 has its answer
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    start = time.monotonic()
    try:
        sw.save_scores(directory / "scores", s)
        outcome = "returned"
    except RuntimeError as err:
        outcome = f"RuntimeError: {err}"
    elapsed = time.monotonic() - start
    flag.touch()
    return outcome, elapsed, (directory / "scores.npz").exists()


def test_misuse_on_rank_zero_only_fails_at_the_group_timeout_and_writes_nothing(tmp_path):
    # the documented usage is every rank; called under `if rank == 0:` it cannot be detected
    # without the others, so it fails at the process group's timeout with a message that says
    # what to do (here a 3 s group timeout bounds the test)
    outcome, elapsed, written = run_ddp(_save_on_rank_zero_only, str(tmp_path), timeout=TIMEOUT)[0]
    assert outcome.startswith("RuntimeError") and "every rank" in outcome, outcome
    assert elapsed < 10 * TIMEOUT
    assert not written


SPLITS = [(7, 2), (4, 5), (9, 0), (4, 4)]  # per-rank batch sizes of one global batch of 8 or 9


def _features():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(9, generator=gen, dtype=torch.float64)
    w = torch.rand(20, generator=gen) + 0.2  # a dataset of 20 examples; the batch holds 9
    idx = torch.tensor([3, 17, 0, 8, 8, 12, 5, 19, 1])
    return x, y, w, idx


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 1).double()


def _step_gradient(model, rw, x, y, idx):
    model.zero_grad()
    per_example = (model(x).squeeze(1) - y) ** 2
    rw(per_example, idx).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _ddp_gradients(rank, world):
    x, y, w, idx = _features()
    ddp = nn.parallel.DistributedDataParallel(_model())  # averages the ranks' gradients
    out = {}
    for split in SPLITS:
        total = sum(split)
        lo = sum(split[:rank])
        sl = slice(lo, lo + split[rank])
        for normalize in ("mean", "batch", "weights"):
            for sync in (False, True):
                rw = sw.LossReweighter(w, normalize, sync_batch=sync)
                out[split, normalize, sync] = _step_gradient(
                    ddp, rw, x[:total][sl], y[:total][sl], idx[:total][sl]
                )
    return out


def test_ddp_gradient_equals_the_global_batch_however_it_is_split():
    ranks = run_ddp(_ddp_gradients, timeout=60)
    x, y, w, idx = _features()
    for split in SPLITS:
        total = sum(split)
        for normalize in ("mean", "batch", "weights"):
            single = _step_gradient(
                _model(), sw.LossReweighter(w, normalize), x[:total], y[:total], idx[:total]
            )
            for r in ranks:  # DDP leaves the same averaged gradient on every rank
                torch.testing.assert_close(r[split, normalize, True], single)
            plain = ranks[0][split, normalize, False]
            if split[0] == split[1] and normalize != "weights":
                torch.testing.assert_close(plain, single)  # the default holds: equal batches
            else:
                assert not torch.allclose(plain, single, rtol=1e-3)  # ...and only then
