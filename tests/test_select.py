from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sampleweights as sw


def distinct_scores(n, seed=0):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() / n


@pytest.mark.parametrize("keep", [0.3, 7, 1.0, 1])
def test_hardest_and_easiest_against_brute_force(keep):
    scores = distinct_scores(23)
    k = round(keep * 23) if isinstance(keep, float) else keep
    ranked = sorted(range(23), key=lambda i: -float(scores[i]))
    assert sw.select(scores, keep).tolist() == sorted(ranked[:k])
    assert sw.select(scores, keep, "easiest").tolist() == sorted(ranked[23 - k :])


def test_offset_removes_the_highest_first_for_every_strategy():
    scores = distinct_scores(40)
    ranked = sorted(range(40), key=lambda i: -float(scores[i]))
    top = set(ranked[:4])
    assert sw.select(scores, 5, offset=0.1).tolist() == sorted(ranked[4:9])
    for strategy in ("easiest", "random", "stratified"):
        chosen = set(sw.select(scores, 20, strategy, offset=4).tolist())
        assert len(chosen) == 20
        assert not chosen & top


def test_inf_ranks_hardest_and_nan_is_an_error_with_a_count():
    scores = torch.tensor([0.2, math.inf, 0.9, 0.1])
    assert sw.select(scores, 1).tolist() == [1]
    with pytest.raises(ValueError, match="2 NaN entries of 4"):
        sw.select(torch.tensor([0.2, math.nan, math.nan, 0.1]), 1)


def test_ties_broken_by_seeded_permutation_not_index_order():
    scores = torch.zeros(100)
    a, b = sw.select(scores, 10, seed=1), sw.select(scores, 10, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, sw.select(scores, 10, seed=2))
    mean_index = torch.stack([sw.select(scores, 10, seed=s) for s in range(200)]).float().mean()
    assert 40 < mean_index < 59  # uniform over 0..99, not the low indices


def test_random_is_uniform_over_the_pool():
    scores = distinct_scores(10)
    counts = Counter()
    for s in range(2000):
        counts.update(sw.select(scores, 3, "random", seed=s).tolist())
    assert set(counts) == set(range(10))
    assert all(abs(c / 2000 - 0.3) < 0.05 for c in counts.values())


def reference_stratified_counts(scores, k, bins):
    """Per-bin counts of CCS: equal-width bins, water-filling from the smallest bin up."""
    finite = [s for s in scores if math.isfinite(s)] or [0.0]
    lo, hi = min(finite), max(finite)
    width = (hi - lo) / bins
    sizes = Counter()
    for s in scores:
        if math.isinf(s):
            sizes["inf"] += 1
        else:
            sizes[min(int((s - lo) / width), bins - 1) if width > 0 else 0] += 1
    want, left = {}, k
    # equal sizes: the lower-score bin first (+inf last), so ties favour harder bins
    ordered = sorted(sizes, key=lambda b: (sizes[b], bins if b == "inf" else b))
    for i, b in enumerate(ordered):
        want[b] = min(sizes[b], left // (len(ordered) - i))
        left -= want[b]
    return want, lo, width


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(5, 200),
    frac=st.floats(0.05, 1.0),
    bins=st.integers(1, 12),
    infs=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_stratified_matches_reference_bin_counts(n, frac, bins, infs, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen, dtype=torch.float64) ** 3  # skewed, like EL2N
    scores[:infs] = math.inf
    k = max(1, round(frac * n))
    chosen = sw.select(scores, k, "stratified", bins=bins, seed=seed)
    assert len(chosen) == k == len(set(chosen.tolist()))
    want, lo, width = reference_stratified_counts(scores.tolist(), k, bins)
    got = Counter()
    for i in chosen.tolist():
        s = float(scores[i])
        got[
            "inf" if math.isinf(s) else (min(int((s - lo) / width), bins - 1) if width > 0 else 0)
        ] += 1
    assert {b: c for b, c in got.items() if c} == {b: c for b, c in want.items() if c}


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    frac=st.floats(0.01, 1.0),
    strategy=st.sampled_from(["hardest", "easiest", "random", "stratified"]),
)
def test_class_balanced_quotas_by_largest_remainder(sizes, frac, strategy):
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    n = len(labels)
    k = round(frac * n)
    if k == 0:
        return
    chosen = sw.select(distinct_scores(n), frac, strategy, labels=labels, class_balanced=True)
    assert len(chosen) == k
    per_class = Counter(labels[chosen].tolist())
    exact = [k * s / n for s in sizes]
    for c, e in enumerate(exact):
        assert math.floor(e) <= per_class.get(c, 0) <= math.ceil(e)


def test_class_balanced_hardest_within_each_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6])
    assert sw.select(scores, 0.5, labels=labels, class_balanced=True).tolist() == [1, 2, 4, 6]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep": True}, TypeError, "keep"),
        ({"keep": 1.5}, ValueError, r"fraction in \(0, 1\] or a count in \[1, 10\]"),
        ({"keep": 0.0}, ValueError, "keep"),
        ({"keep": 11}, ValueError, "keep"),
        ({"keep": 0.01}, ValueError, "rounds to 0"),
        ({"keep": "half"}, TypeError, "keep"),
        ({"keep": 5, "strategy": "top"}, ValueError, "hardest.*easiest.*random.*stratified"),
        ({"keep": 5, "offset": 0.8}, ValueError, "at most 2 remain"),
        ({"keep": 5, "offset": -1}, ValueError, "offset"),
        (
            {"keep": 5, "labels": torch.zeros(3, dtype=torch.long), "class_balanced": True},
            ValueError,
            r"shape \(10,\)",
        ),
        ({"keep": 5, "class_balanced": True}, ValueError, "labels"),
        ({"keep": 5, "bins": 0}, ValueError, "bins"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sw.select(distinct_scores(10), **kwargs)


def test_scores_must_be_float_vectors():
    with pytest.raises(TypeError, match="scores"):
        sw.select(torch.arange(5), 2)
    with pytest.raises(ValueError, match="scores"):
        sw.select(torch.zeros(2, 3), 2)
