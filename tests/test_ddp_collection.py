"""ScorerCollection under a real 2-process gloo group: equal to one process replaying the same
presentations, the same bits on every rank, and its collectives fused (counted)."""

from __future__ import annotations

import pytest
import torch

import sampleweights as sw
from ddp import CollectiveCount, run_ddp

pytestmark = pytest.mark.ddp

N, CLASSES = 23, 5
# per step, the batch length on each rank: uneven, and an empty batch on each rank once
LENGTHS = [(5, 2), (3, 4), (0, 3), (4, 0), (6, 1), (2, 5), (3, 3)]
NEW_RUN_BEFORE = 4  # every rank calls new_run() before this step


def _scorers() -> list[sw.Scorer]:
    return [
        sw.EL2N(N),
        sw.ForgettingTracker(N, across_runs="sum"),
        sw.Misclassified(N),
        sw.AUM(N),
        sw.DataMaps(N),
        sw.Loss(N, ema=0.7),
    ]


def _schedule() -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per step, per rank: (indices, logits, targets); indices repeat within and across ranks."""
    gen = torch.Generator().manual_seed(11)
    steps = []
    for lengths in LENGTHS:
        parts = []
        for b in lengths:
            idx = torch.randint(0, N // 2, (b,), generator=gen)  # N // 2: many repeats
            y = idx % CLASSES  # one label per example, right about half the time
            logits = torch.randn(b, CLASSES, generator=gen) * 2
            logits[torch.arange(b), y] += torch.randn(b, generator=gen) * 2 + 2.5
            parts.append((idx, logits, y))
        steps.append(parts)
    return steps


def _skipping() -> sw.ScorerCollection:
    """Order-dependent scorers that drop non-finite rows (trash-slot indices travel too)."""
    kw = {"nonfinite": "skip"}
    return sw.ScorerCollection(sw.ForgettingTracker(N, **kw), sw.Loss(N, ema=0.5, **kw))


def _with_nan(logits: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    out[::3, 1] = float("nan")
    return out


def _ranked(rank: int, world: int) -> dict:
    collection, skipping = sw.ScorerCollection(*_scorers()), _skipping()
    per_update = []
    for k, parts in enumerate(_schedule()):
        if k == NEW_RUN_BEFORE:
            collection.new_run()
        with CollectiveCount() as count:
            collection.update_indexed(*parts[rank])
        per_update.append(list(count.calls))
        idx, logits, y = parts[rank]
        skipping.update_indexed(idx, _with_nan(logits), y)
    with CollectiveCount() as count:
        scores = collection.compute()
    at_compute = list(count.calls)
    with pytest.warns(RuntimeWarning, match="skipped"):
        skipped = skipping.compute()
    # the same scorers, each with its own collectives, for comparison
    separate = _scorers()
    for k, parts in enumerate(_schedule()):
        if k == NEW_RUN_BEFORE:
            for s in separate:
                s.new_run()
        for s in separate:
            s.update_indexed(*parts[rank])
    with CollectiveCount() as count:
        separate_scores = {s.name: s.compute() for s in separate}
    separate_at_compute = list(count.calls)
    # out of step: rank 0 makes one update more while rank 1 computes -> both raise at once
    errors = []
    try:
        if rank == 0:
            collection.update_indexed(*_schedule()[0][0])
        else:
            collection.compute()
    except sw.DistributedMismatchError as err:
        errors.append(str(err))
    return {
        "scores": scores,
        "skipped": skipped,
        "separate": separate_scores,
        "per_update": per_update,
        "at_compute": at_compute,
        "separate_at_compute": separate_at_compute,
        "errors": errors,
    }


def _single_process() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, each step's batch the ranks' batches in rank order."""
    collection, skipping = sw.ScorerCollection(*_scorers()), _skipping()
    for k, parts in enumerate(_schedule()):
        if k == NEW_RUN_BEFORE:
            collection.new_run()
        idx, logits, y = (torch.cat(list(col)) for col in zip(*parts, strict=True))
        collection.update_indexed(idx, logits, y)
        nan = torch.cat([_with_nan(p[1]) for p in parts])
        skipping.update_indexed(idx, nan, y)
    with pytest.warns(RuntimeWarning, match="skipped"):
        skipped = skipping.compute()
    return collection.compute(), skipped


#: DataMaps merges the ranks' running means and squared deviations by Chan's pairwise formula,
#: which rounds differently from one process's sequential merge: equal to float32 precision.
_ROUNDED_BY_MERGE = {"datamaps"}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, bitwise: bool = False) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name in _ROUNDED_BY_MERGE and not bitwise:
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, equal_nan=True)
        else:
            assert torch.equal(a[name].nan_to_num(-7.0), b[name].nan_to_num(-7.0)), name


def test_collection_under_ddp_equals_one_process_with_fused_collectives():
    ranks = run_ddp(_ranked, world=2, timeout=60)
    want, want_skipped = _single_process()
    assert want_skipped["loss"].isfinite().sum() < want["loss"].isfinite().sum()  # rows dropped
    _same(ranks[0]["scores"], ranks[1]["scores"], bitwise=True)  # ranks agree bit for bit
    for got in ranks:
        _same(want, got["scores"])  # one process's scores (bit for bit but DataMaps)
        _same(want, got["separate"])
        _same(want_skipped, got["skipped"])
        # one exchange per update for both order-dependent scorers (forgetting, the EMA loss):
        # a header and one data all-gather, whatever the batch length (0 included)
        assert all(calls == ["all_gather", "all_gather"] for calls in got["per_update"])
        # compute(): one header, one all-reduce per dtype of every summed state (float64 sums,
        # int32 counts, int64 skipped counts with the ranks' update counts), and Misclassified's
        # own merge (latest step, then its flags): 5 all-reduces; DataMaps merges its running
        # means and squared deviations by Chan's formula in its own two rounds (counts and
        # correct, then means, then deviations: 4 more), against 16 and 6 headers for the
        # scorers computed one by one
        assert got["at_compute"].count("all_gather") == 1
        assert got["at_compute"].count("all_reduce") == 5 + 4
        assert got["separate_at_compute"].count("all_gather") == 6
        assert got["separate_at_compute"].count("all_reduce") == 16
        assert len(got["errors"]) == 1 and "out of step" in got["errors"][0]


def _fusable() -> list[sw.Scorer]:
    return [sw.EL2N(N), sw.ForgettingTracker(N), sw.Misclassified(N), sw.Loss(N)]


def _distinct(part: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A rank's batch cut to its distinct indices (a fusable batch but for the process group)."""
    idx, logits, y = part
    kept = torch.unique(idx)
    return kept, logits[: len(kept)], y[: len(kept)]


def _compiled_on_rank(rank: int, world: int) -> dict:
    """``compile=True`` with fusable scorers under a process group: the fused call (which makes
    no exchange) must never run; the updates exchange as the eager collection's do."""
    from sampleweights.scorers import fused as fused_module

    calls = []
    inner = fused_module.CompiledUpdate.__call__

    def counted(self, *args):
        calls.append(1)
        return inner(self, *args)

    fused_module.CompiledUpdate.__call__ = counted  # this process only
    collection = sw.ScorerCollection(*_fusable(), compile=True)
    for parts in _schedule():
        collection.update_indexed(*_distinct(parts[rank]))
    return {"scores": collection.compute(), "calls": len(calls)}


def test_a_compiled_collection_under_ddp_never_takes_the_fused_update():
    ranks = run_ddp(_compiled_on_rank, world=2, timeout=60)
    eager = sw.ScorerCollection(*_fusable())
    for parts in _schedule():  # one process: each step the ranks' batches in rank order
        cut = [_distinct(part) for part in parts]
        eager.update_indexed(*(torch.cat(list(col)) for col in zip(*cut, strict=True)))
    want = eager.compute()
    for got in ranks:
        assert got["calls"] == 0
        for name in want:  # the compiled statistics round in another order: ≤ 1e-5 relative
            torch.testing.assert_close(
                got["scores"][name], want[name], rtol=1e-5, atol=1e-6, equal_nan=True
            )
    _same(ranks[0]["scores"], ranks[1]["scores"], bitwise=True)
