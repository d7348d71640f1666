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
