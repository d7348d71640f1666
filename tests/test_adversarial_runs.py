"""Adversarial checks of runs, resume and the distributed exchange of order-dependent scorers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sampleweights as sw
import sampleweights.scorers.base as base_mod
from sampleweights.errors import StateMismatchError

C = 3


def _logits(correct: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits whose argmax equals the target exactly where ``correct``."""
    logits = torch.zeros(len(targets), C)
    wrong = (targets + 1) % C
    logits[torch.arange(len(targets)), torch.where(correct, targets, wrong)] = 1.0
    return logits


def _random_runs(seed: int, n: int, runs: int):
    """Per run a list of updates ``(indices, correct, targets, finite)``; some examples skip
    whole runs, batches hold duplicates, some rows are non-finite."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(runs):
        present = torch.rand(n, generator=gen) < 0.8
        pool = present.nonzero().flatten()
        updates = []
        for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
            size = int(torch.randint(0, 6, (1,), generator=gen))
            idx = pool[torch.randint(0, len(pool), (size,), generator=gen)] if len(pool) else pool
            correct = torch.rand(size, generator=gen) < 0.55
            targets = torch.randint(0, C, (size,), generator=gen)
            finite = torch.rand(size, generator=gen) < 0.85
            updates.append((idx, correct, targets, finite))
        out.append(updates)
    return out


def _reference(runs, n: int, across: str) -> list[float]:
    """Data Diet (mean, never-learned = inf per run) / Toneva (sum) from presentation lists."""
    per_run = []
    for updates in runs:
        seq: dict[int, list[bool]] = {}
        for idx, correct, _, finite in updates:
            for i, c, f in zip(idx.tolist(), correct.tolist(), finite.tolist(), strict=True):
                if f:
                    seq.setdefault(i, []).append(c)
        per_run.append(seq)
    scores = []
    for i in range(n):
        runs_i = [seq[i] for seq in per_run if i in seq]
        if not runs_i:
            scores.append(math.nan)
            continue
        events = [sum(a and not b for a, b in itertools.pairwise(s)) for s in runs_i]
        learned = [any(s) for s in runs_i]
        if across == "mean":
            each = [e if ok else math.inf for e, ok in zip(events, learned, strict=True)]
            scores.append(sum(each) / len(each))
        elif not any(learned):
            scores.append(math.inf)
        else:
            scores.append(
                float(
                    sum(
                        e if ok else len(s)
                        for e, ok, s in zip(events, learned, runs_i, strict=True)
                    )
                )
            )
    return scores


def _feed(scorer, runs, *, save_at=None):
    """Replay ``runs``; at update number ``save_at`` (or just after a new_run when negative)
    round-trip the state through a fresh scorer."""
    count = 0
    for r, updates in enumerate(runs):
        scorer.new_run()
        if save_at is not None and save_at == -r - 1:
            scorer = _roundtrip(scorer)
        for idx, correct, targets, finite in updates:
            logits = _logits(correct, targets)
            logits[~finite] = torch.nan
            scorer.update_indexed(idx, logits, targets)
            count += 1
            if count == save_at:
                scorer = _roundtrip(scorer)
    return scorer


def _roundtrip(scorer):
    fresh = type(scorer)(
        scorer.num_examples,
        nonfinite=scorer.nonfinite,
        **({"across_runs": scorer.across_runs} if hasattr(scorer, "across_runs") else {}),
    )
    fresh.load_state_dict(scorer.state_dict())
    return fresh


@pytest.mark.parametrize("across", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(6))
def test_forgetting_runs_equal_reference_aggregations(across, seed):
    n = 9
    runs = _random_runs(seed, n, runs=3)
    tracker = _feed(sw.ForgettingTracker(n, across_runs=across, nonfinite="skip"), runs)
    want = torch.tensor(_reference(runs, n, across), dtype=torch.float32)
    with pytest.warns(RuntimeWarning) if tracker.num_skipped else _no_warning():
        got = tracker.compute()
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("save_at", [1, 2, 3, 5, 8, -1, -2, -3])
@pytest.mark.parametrize("kind", ["forgetting", "misclassified", "el2n"])
def test_resume_at_every_point_of_runs_is_bit_identical(kind, save_at):
    n = 9
    runs = _random_runs(11, n, runs=3)

    def make():
        if kind == "forgetting":
            return sw.ForgettingTracker(n, nonfinite="skip")
        if kind == "misclassified":
            return sw.Misclassified(n, nonfinite="skip")
        return sw.EL2N(n, nonfinite="skip")

    live = _feed(make(), runs)
    resumed = _feed(make(), runs, save_at=save_at)
    assert (resumed.num_updates, resumed.num_runs) == (live.num_updates, live.num_runs)
    with pytest.warns(RuntimeWarning):
        a = live.compute()
    with pytest.warns(RuntimeWarning):
        b = resumed.compute()
    assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))


def test_new_run_twice_and_before_any_update_count_no_empty_run():
    s = sw.ForgettingTracker(2)
    s.new_run()
    s.new_run()
    assert s.num_runs == 0
    s.update_indexed([0], _logits(torch.tensor([True]), torch.tensor([0])), [0])
    s.new_run()
    s.new_run()
    sd = s.state_dict()
    assert (sd["num_runs"], sd["run_updates"], sd["num_updates"]) == (1, 0, 1)
    t = sw.ForgettingTracker(2)
    t.load_state_dict(sd)
    t.update_indexed([0], _logits(torch.tensor([False]), torch.tensor([0])), [0])
    # run 2's first presentation is never compared with run 1's last: no event
    assert t.num_runs == 2
    assert t.compute()[0] == math.inf  # mean: never learned in run 2 -> inf
    s.reset()
    assert (s.num_runs, s.num_updates, s.state_dict()["run_updates"]) == (0, 0, 0)


def test_misclassified_shows_previous_run_until_the_next_update():
    s = sw.Misclassified(3)
    s.update_indexed([0, 1], _logits(torch.tensor([False, True]), torch.tensor([0, 0])), [0, 0])
    s.new_run()
    before = s.compute()
    r = sw.Misclassified(3)
    r.load_state_dict(s.state_dict())
    assert torch.equal(r.compute().nan_to_num(-1), before.nan_to_num(-1))
    r.update_indexed([2], _logits(torch.tensor([True]), torch.tensor([1])), [1])
    assert torch.equal(r.compute().nan_to_num(-1), torch.tensor([-1.0, -1.0, 0.0]))


# -- the packed exchange ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "wide"), [(2**30 - 1, torch.int32), (2**30, torch.int64), (2**31 + 5, torch.int64)]
)
def test_packed_exchange_is_exact_at_the_int32_boundary(monkeypatch, n, wide):
    """No DDP needed: a tracker shell with a huge num_examples and the collectives stubbed."""
    sent = []

    def header(*args, length, **kwargs):
        return [[0, 0, 1, 1, 0, length], [0, 0, 1, 1, 0, length]]

    def gather(tensors, group=None, *, counts=None):
        sent.append(tensors[0].dtype)
        return [torch.cat([t, t]) for t in tensors]  # two ranks sending the same batch

    monkeypatch.setattr(base_mod, "exchange_header", header)
    monkeypatch.setattr(base_mod, "all_gather_uneven", gather)
    shell = sw.ForgettingTracker.__new__(sw.ForgettingTracker)
    shell.num_examples, shell.num_runs, shell._run_updates = n, 0, 0
    shell.num_updates, shell.process_group = 0, None
    # every index up to n - 1, the trash slot n, duplicates, both values
    indices = torch.tensor([0, 1, n - 2, n - 1, n, n, n - 1, 0], dtype=torch.int64)
    values = torch.tensor([True, False, True, False, True, False, True, True])
    got_i, got_v = shell._exchange(indices, values)
    assert sent == [wide]
    assert torch.equal(got_i, torch.cat([indices, indices]))
    assert torch.equal(got_v, torch.cat([values, values]))


def test_nonfinite_rows_between_duplicates_are_not_presentations():
    s = sw.ForgettingTracker(2, nonfinite="skip")
    correct = torch.tensor([True, False, False])
    logits = _logits(correct, torch.tensor([0, 0, 0]))
    logits[1] = torch.inf  # the only wrong presentation in between is dropped ...
    logits[2] = _logits(torch.tensor([True]), torch.tensor([0]))[0]
    s.update_indexed([0, 0, 0], logits, [0, 0, 0])
    with pytest.warns(RuntimeWarning, match="1 presentation"):
        scores = s.compute()
    assert scores[0] == 0.0  # ... so right, right: no event


# -- load_state_dict ------------------------------------------------------------------------------
def _tracked():
    s = sw.ForgettingTracker(3)
    y = torch.tensor([0, 0])
    s.update_indexed([0, 1], _logits(torch.tensor([True, False]), y), y)
    s.new_run()
    s.update_indexed([0, 2], _logits(torch.tensor([False, True]), y), y)
    return s


@pytest.mark.parametrize(
    "corrupt",
    [
        # every earlier run had an update, so num_runs - 1 <= num_updates - run_updates
        lambda sd: sd.update(run_updates=2),
        lambda sd: sd.update(num_runs=2, run_updates=0, num_updates=1),
        # an example cannot have been seen in more runs than have finished
        lambda sd: sd["state"]["runs_seen"].fill_(2),
        # events need a presentation before them, learned needs a presentation
        lambda sd: sd["state"]["events"].fill_(5),
        lambda sd: sd["state"]["learned"].fill_(True),
        lambda sd: sd["state"]["last_correct"].fill_(True),
    ],
)
def test_load_rejects_impossible_run_bookkeeping_and_changes_nothing(corrupt):
    s = _tracked()
    sd = s.state_dict()
    corrupt(sd)
    target = sw.ForgettingTracker(3)
    before = target.state_dict()
    with pytest.raises(StateMismatchError):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    assert (target.num_updates, target.num_runs) == (0, 0)


def test_misclassified_load_rejects_steps_of_a_finished_run_in_a_new_one():
    s = sw.Misclassified(3)
    y = torch.tensor([0])
    s.update_indexed([0], _logits(torch.tensor([True]), y), y)
    s.new_run()
    s.update_indexed([1], _logits(torch.tensor([False]), y), y)
    sd = s.state_dict()
    sd["state"]["step"][0] = 1  # run 2 started at update 2: step 1 belongs to run 1
    with pytest.raises(StateMismatchError):
        sw.Misclassified(3).load_state_dict(sd)


def test_per_rank_state_keeps_refusing_compute_after_a_local_update():
    """A per-rank state updated under a group of 2 stays partial after a later local update."""
    s = sw.EL2N(4)
    y = torch.tensor([0])
    s.update_indexed([0], torch.randn(1, C), y)
    s._world = (2, 1)  # as recorded by an update on rank 1 of 2 (group since destroyed)
    s.update_indexed([1], torch.randn(1, C), y)
    with pytest.raises(RuntimeError, match="local=True"):
        s.compute()
    assert s.state_dict()["world_size"] == 2
    assert (~s.compute(local=True).isnan()).sum() == 2


# -- under a real 2-process gloo group ------------------------------------------------------------
DN = 11


def _ddp_scorers():
    return {
        "sum": sw.ForgettingTracker(DN, across_runs="sum", nonfinite="skip"),
        "mean": sw.ForgettingTracker(DN, nonfinite="skip"),
        "mis": sw.Misclassified(DN, nonfinite="skip"),
        "ema": sw.EL2N(DN, ema=0.5, nonfinite="skip"),
    }


def _ddp_batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    size = int(torch.randint(0, 5, (1,), generator=gen))
    # duplicates within a rank's batch and across the ranks' batches of one step
    idx = torch.randint(0, 4, (size,), generator=gen) * 2 + torch.randint(0, 2, (1,), generator=gen)
    y = torch.randint(0, C, (size,), generator=gen)
    logits = _logits(torch.rand(size, generator=gen) < 0.6, y)
    logits[torch.rand(size, generator=gen) < 0.2] = torch.inf  # trash-slot rows
    return idx % DN, logits, y


def _compute_quiet(scorers):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: s.compute() for k, s in scorers.items()}


def _ddp_runs(rank, world):
    import torch.distributed as dist

    live, resumed = _ddp_scorers(), _ddp_scorers()
    log, step = [], 0
    for run in range(3):
        for group in (live, resumed):
            for s in group.values():
                s.new_run()
        log.append("new_run")
        if run == 1:  # resume right after new_run, before the run's first update
            saved = {k: s.state_dict() for k, s in resumed.items()}
            resumed = _ddp_scorers()
            for k, s in resumed.items():
                s.load_state_dict(saved[k])
        for i in range(4):
            batch = _ddp_batch(rank, step)
            step += 1
            for group in (live, resumed):
                for s in group.values():
                    s.update_indexed(*batch)
            log.append(batch)
            if run == 2 and i == 1:  # mid-run resume
                saved = {k: s.state_dict() for k, s in resumed.items()}
                resumed = _ddp_scorers()
                for k, s in resumed.items():
                    s.load_state_dict(saved[k])
    out = {"log": log, "live": _compute_quiet(live), "resumed": _compute_quiet(resumed)}
    dist.destroy_process_group()
    # a per-rank state that gets one more local update is still only this rank's part
    live["mis"].update_indexed(*_ddp_batch(rank, 99))
    try:
        live["mis"].compute()
        out["after_destroy"] = None
    except RuntimeError as err:
        out["after_destroy"] = str(err)
    return out


@pytest.mark.ddp
def test_ddp_runs_with_trash_rows_and_duplicates_equal_one_process(tmp_path):
    from ddp import run_ddp

    ranks = run_ddp(_ddp_runs, timeout=30)
    single = _ddp_scorers()
    for step in range(len(ranks[0]["log"])):
        for r in ranks:
            entry = r["log"][step]
            for s in single.values():
                if isinstance(entry, str):
                    if r is ranks[0]:
                        s.new_run()
                else:
                    s.update_indexed(*entry)
    want = _compute_quiet(single)
    assert single["mean"].num_runs == 3
    for r in ranks:
        for k in ("sum", "mean", "mis"):
            assert torch.equal(r["live"][k].nan_to_num(-1), want[k].nan_to_num(-1)), k
        torch.testing.assert_close(r["live"]["ema"], want["ema"], equal_nan=True)
        for k in want:
            assert torch.equal(r["resumed"][k].nan_to_num(-1), r["live"][k].nan_to_num(-1)), k
        assert r["after_destroy"] is not None and "local=True" in r["after_destroy"]
    assert torch.equal(
        ranks[0]["live"]["ema"].nan_to_num(-1), ranks[1]["live"]["ema"].nan_to_num(-1)
    )


def _ddp_out_of_step(rank, world):
    y = torch.zeros(2, dtype=torch.long)
    logits = torch.randn(2, C)
    out = {}
    # (a) only rank 0 starts a new run, then both update
    tracker = sw.ForgettingTracker(DN)
    tracker.update_indexed(torch.tensor([rank, 2 + rank]), logits, y)
    if rank == 0:
        tracker.new_run()
    try:
        tracker.update_indexed(torch.tensor([rank, 2 + rank]), logits, y)
        out["new_run"] = None
    except sw.DistributedMismatchError as err:
        out["new_run"] = str(err)
    # (b) rank 0 updates a tracker while rank 1 already computes another scorer
    tracker, mis = sw.ForgettingTracker(DN), sw.Misclassified(DN)
    try:
        if rank == 0:
            tracker.update_indexed(torch.tensor([0]), logits[:1], y[:1])
        else:
            mis.compute()
        out["other"] = None
    except sw.DistributedMismatchError as err:
        out["other"] = str(err)
    # (c) Misclassified: rank 1 presents nothing in run 2; its run-1 answer must not survive
    mis = sw.Misclassified(DN)
    wrong = _logits(torch.tensor([False]), torch.tensor([0]))
    mis.update_indexed(torch.tensor([5 + rank]), wrong, torch.tensor([0]))
    mis.new_run()
    if rank == 0:
        mis.update_indexed(torch.tensor([0]), wrong, torch.tensor([0]))
    out["stale"] = _compute_quiet({"m": mis})["m"]
    return out


@pytest.mark.ddp
def test_ddp_out_of_step_runs_and_scorers_fail_fast():
    from ddp import run_ddp

    ranks = run_ddp(_ddp_out_of_step, timeout=20)
    for r in ranks:
        assert r["new_run"] is not None and "run 2" in r["new_run"] and "run 1" in r["new_run"]
        assert r["other"] is not None and "of another scorer" in r["other"]
        # the latest run presented only example 0 (on rank 0)
        assert r["stale"][0] == 1.0 and r["stale"][1:].isnan().all(), r["stale"]
