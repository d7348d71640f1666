from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sampleweights as sw


def forgetting_reference(num_examples, updates):
    """Plain Python, one presentation at a time, in batch order (Toneva et al.)."""
    last: dict[int, bool] = {}
    events = [0] * num_examples
    learned = [False] * num_examples
    for indices, correct in updates:
        for i, c in zip(indices, correct, strict=True):
            if last.get(i, False) and not c:
                events[i] += 1
            last[i] = c
            learned[i] |= c
    out = []
    for i in range(num_examples):
        if i not in last:
            out.append(math.nan)
        elif not learned[i]:
            out.append(math.inf)
        else:
            out.append(float(events[i]))
    return out, last


def logits_for(correct: list[bool], targets: list[int], classes: int) -> torch.Tensor:
    """Logits whose argmax is the target where correct, another class where not."""
    logits = torch.zeros(len(correct), classes)
    for row, (c, y) in enumerate(zip(correct, targets, strict=True)):
        logits[row, y if c else (y + 1) % classes] = 1.0
    return logits


presentations = st.integers(1, 8).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(
            st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), min_size=1, max_size=12),
            min_size=1,
            max_size=10,
        ),
    )
)


@settings(max_examples=150, deadline=None)
@given(case=presentations)
def test_matches_python_reference_with_duplicates_in_batches(case):
    n, batches = case
    tracker, wrong = sw.ForgettingTracker(n), sw.Misclassified(n)
    updates = []
    for rows in batches:
        idx = [i for i, _ in rows]
        correct = [c for _, c in rows]
        targets = [i % 3 for i in idx]
        logits = logits_for(correct, targets, 3)
        tracker.update_indexed(torch.tensor(idx), logits, torch.tensor(targets))
        wrong.update_indexed(torch.tensor(idx), logits, torch.tensor(targets))
        updates.append((idx, correct))
    want, last = forgetting_reference(n, updates)
    got = tracker.compute().tolist()
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == w
    # Misclassified is the latest presentation's error, in the same batch order
    mis = wrong.compute().tolist()
    for i in range(n):
        if i in last:
            assert mis[i] == float(not last[i])
        else:
            assert math.isnan(mis[i])


def test_never_learned_ranks_above_every_count():
    t = sw.ForgettingTracker(3)
    y = torch.tensor([0, 0])
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for logits in (right, wrong) * 5:
        t.update_indexed(torch.tensor([0, 1]), torch.cat([logits, wrong]), y)
    scores = t.compute()
    assert scores[0] == 5 and scores[1] == math.inf and math.isnan(scores[2])


@pytest.mark.parametrize("cls", [sw.ForgettingTracker, sw.Misclassified])
def test_duplicates_in_one_update_are_consecutive_presentations(cls):
    s = cls(2)
    # example 0 presented right, then wrong, in one batch: one event; latest is wrong
    s.update_indexed(
        torch.tensor([0, 0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    )
    assert s.compute()[0] == 1.0


# -- several training runs ------------------------------------------------------------------------


def runs_reference(num_examples, runs, across_runs):
    """Each run scored alone by the plain reference, then combined as the papers' code does."""
    totals = [[] for _ in range(num_examples)]  # per example: (events or None, presentations)
    for updates in runs:
        scores, _ = forgetting_reference(num_examples, updates)
        shown = [0] * num_examples
        for indices, _ in updates:
            for i in indices:
                shown[i] += 1
        for i, s in enumerate(scores):
            if not math.isnan(s):
                totals[i].append((s, shown[i]))
    out = []
    for per_run in totals:
        if not per_run:
            out.append(math.nan)
        elif across_runs == "mean":  # Data Diet: np.mean of per-run scores with inf
            out.append(sum(s for s, _ in per_run) / len(per_run))
        elif all(math.isinf(s) for s, _ in per_run):
            out.append(math.inf)
        else:  # Toneva: a never-learned run adds its presentations
            out.append(float(sum(p if math.isinf(s) else s for s, p in per_run)))
    return out


@settings(max_examples=80, deadline=None)
@given(
    case=st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.lists(
                    st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), max_size=6),
                    max_size=5,
                ),
                min_size=1,
                max_size=4,
            ),
        )
    ),
    across_runs=st.sampled_from(["mean", "sum"]),
)
def test_runs_match_the_papers_aggregation(case, across_runs):
    n, runs = case
    tracker = sw.ForgettingTracker(n, across_runs=across_runs)
    wrong = sw.Misclassified(n)
    history = []
    for run in runs:
        tracker.new_run()
        wrong.new_run()
        updates = []
        for rows in run:
            idx, correct = [i for i, _ in rows], [c for _, c in rows]
            targets = [i % 3 for i in idx]
            logits = logits_for(correct, targets, 3)
            tracker.update_indexed(
                torch.tensor(idx, dtype=torch.long), logits, torch.tensor(targets, dtype=torch.long)
            )
            wrong.update_indexed(
                torch.tensor(idx, dtype=torch.long), logits, torch.tensor(targets, dtype=torch.long)
            )
            updates.append((idx, correct))
        history.append(updates)
    want = runs_reference(n, history, across_runs)
    got = tracker.compute().tolist()
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-6)
    # a run is counted once it has an update (an empty batch is an update)
    assert tracker.num_runs == sum(1 for run in runs if run)
    # Misclassified: the latest run's latest presentation only
    last_run = next((run for run in reversed(history) if run), [])
    _, last = forgetting_reference(n, last_run)
    mis = wrong.compute().tolist()
    for i in range(n):
        if i in last:
            assert mis[i] == float(not last[i])
        else:
            assert math.isnan(mis[i])


def test_a_new_run_is_never_compared_with_the_end_of_the_last():
    right, wrong, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    t = sw.ForgettingTracker(1)
    t.new_run()
    t.new_run()  # no updates yet: no empty run
    t.update_indexed([0], right, y)  # run 1 ends learned
    t.new_run()
    t.update_indexed([0], wrong, y)  # run 2 starts fresh: no event (the artefact)
    t.update_indexed([0], right, y)
    assert t.num_runs == 2
    assert t.compute().tolist() == [0.0]


def test_data_diet_forget_scores_then_mean_over_runs():
    """Data Diet's own per-run code (data_diet/forgetting.py), then get_mean_score's np.mean."""
    import numpy as np

    n = 5
    rng = np.random.default_rng(0)
    tracker = sw.ForgettingTracker(n, across_runs="mean")
    per_run = []
    for _ in range(3):
        prev = np.zeros(n, dtype=np.int32)
        forgets = np.zeros(n)
        never = np.arange(n)
        tracker.new_run()
        for _ in range(6):  # every run presents every example, once per "epoch"
            idxs = rng.permutation(n)
            accs = (rng.random(n) < 0.5).astype(np.int32)
            accs[idxs == 4] = 0  # example 4: never learned
            forgets[idxs[prev[idxs] > accs]] += 1
            prev[idxs] = accs
            never = np.setdiff1d(never, idxs[accs.astype(bool)], True)
            targets = torch.zeros(n, dtype=torch.long)
            tracker.update_indexed(
                torch.from_numpy(idxs), logits_for(accs.astype(bool).tolist(), [0] * n, 2), targets
            )
        scores = forgets.copy()
        scores[never] = np.inf
        per_run.append(scores)
    want = np.stack(per_run).mean(0)
    got = tracker.compute().numpy()
    assert np.array_equal(np.isinf(got), np.isinf(want)) and np.isinf(got[4])
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_toneva_sum_over_runs_adds_presentations_of_a_never_learned_run():
    right, wrong, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    t = sw.ForgettingTracker(1, across_runs="sum")
    t.new_run()
    for logits in (right, wrong, right, wrong):  # 2 events
        t.update_indexed([0], logits, y)
    t.new_run()
    for logits in (wrong, wrong, wrong):  # never learned: 3 presentations
        t.update_indexed([0], logits, y)
    assert t.compute().tolist() == [5.0]
    mean = sw.ForgettingTracker(1)  # the same presentations, Data Diet's mean: inf
    for run in ((right, wrong, right, wrong), (wrong, wrong, wrong)):
        mean.new_run()
        for logits in run:
            mean.update_indexed([0], logits, y)
    assert mean.compute().tolist() == [math.inf]


def test_runs_resume_mid_run_bit_identical():
    gen = torch.Generator().manual_seed(0)
    plan = [
        [
            (torch.randint(0, 6, (4,), generator=gen), torch.randn(4, 3, generator=gen))
            for _ in range(4)
        ]
        for _ in range(3)
    ]
    live = sw.ForgettingTracker(6, across_runs="sum")
    resumed = sw.ForgettingTracker(6, across_runs="sum")
    for r, run in enumerate(plan):
        for s in (live, resumed):
            s.new_run()
        for k, (idx, logits) in enumerate(run):
            for s in (live, resumed):
                s.update_indexed(idx, logits, idx % 3)
            if r == 1 and k == 1:
                sd = resumed.state_dict()
                resumed = sw.ForgettingTracker(6, across_runs="sum")
                resumed.load_state_dict(sd)
                assert resumed.num_runs == 2
    assert torch.equal(live.compute().nan_to_num(-1), resumed.compute().nan_to_num(-1))
    live.reset()
    assert live.num_runs == 0 and live.compute().isnan().all()


def test_running_means_span_runs_and_across_runs_is_checked():
    a, b = sw.EL2N(3), sw.EL2N(3)
    logits, y = torch.randn(2, 3), torch.tensor([0, 2])
    a.update_indexed([0, 1], logits, y)
    a.new_run()
    a.update_indexed([0, 1], logits * 2, y)
    b.update_indexed([0, 1], logits, y)
    b.update_indexed([0, 1], logits * 2, y)
    assert a.num_runs == 2 and b.num_runs == 1
    assert torch.equal(a.compute().nan_to_num(-1), b.compute().nan_to_num(-1))
    with pytest.raises(ValueError, match="across_runs"):
        sw.ForgettingTracker(3, across_runs="max")
