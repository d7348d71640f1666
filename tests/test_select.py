from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ccs_reference
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


def ccs_strata_counts(chosen, strata):
    """How many of ``chosen`` fall in each of CCS's strata (lists of dataset indices)."""
    where = {i: b for b, members in enumerate(strata) for i in members.tolist()}
    got = Counter(where[i] for i in chosen.tolist())
    return {b: c for b, c in got.items() if c}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(5, 200),
    frac=st.floats(0.05, 1.0),
    bins=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_stratified_counts_equal_the_ccs_code(n, frac, bins, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.rand(n, generator=gen, dtype=torch.float64) ** 3).to(dtype)  # skewed
    if seed % 2:  # values on a grid: many sit exactly on strata edges, many strata tie in size
        scores = (torch.randint(0, 4 * bins + 1, (n,), generator=gen) / (4 * bins)).to(dtype)
    k = max(1, int(frac * n))
    chosen = sw.select(scores, k, "stratified", bins=bins, seed=seed)
    assert len(chosen) == k == len(set(chosen.tolist()))
    _, budgets, strata = ccs_reference.stratified_sampling({"s": scores}, "s", k, stratas=bins)
    assert ccs_strata_counts(chosen, strata) == {b: int(c) for b, c in enumerate(budgets) if c}


def test_stratified_inf_is_a_stratum_of_its_own():
    scores = torch.cat([torch.full((3,), math.inf), torch.rand(97, dtype=torch.float64)])
    chosen = sw.select(scores, 40, "stratified", bins=4, seed=1).tolist()
    assert {0, 1, 2} <= set(chosen)  # the smallest stratum is taken whole first
    assert len(chosen) == 40


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


# -- CCS: a hard cut-off on a second score, then strata (Zheng et al. 2023) ------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 300),
    keep_frac=st.floats(0.05, 0.6),
    cut_frac=st.floats(0.0, 0.35),
    bins=st.sampled_from([1, 5, 50]),
    seed=st.integers(0, 1000),
)
def test_ccs_cutoff_then_strata_equal_the_ccs_code(n, keep_frac, cut_frac, bins, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen) ** 2  # float32, as CCS's score files
    aum = torch.randperm(n, generator=gen).float() - n / 3  # distinct: a well-defined cut
    k, cut = max(1, int(keep_frac * n)), int(cut_frac * n)
    chosen = sw.select(
        scores, k, "stratified", bins=bins, seed=seed, cutoff_scores=-aum, cutoff=cut
    )
    _, budgets, strata, removed = ccs_reference.ccs(scores, aum, k, cut, stratas=bins)
    assert not set(chosen.tolist()) & set(removed.tolist())
    assert ccs_strata_counts(chosen, strata) == {b: int(c) for b, c in enumerate(budgets) if c}
    # keeping everything that survives the cut-off shows the cut set is exactly CCS's
    every = sw.select(
        scores, n - cut, "stratified", bins=bins, seed=seed, cutoff_scores=-aum, cutoff=cut
    )
    assert set(every.tolist()) == set(range(n)) - set(removed.tolist())


def test_cutoff_applies_to_every_strategy_and_before_offset():
    scores = torch.arange(10, dtype=torch.float64)  # 9 is the hardest
    other = torch.zeros(10, dtype=torch.float64)
    other[9] = 1.0  # the cut-off score marks 9 as the one to remove
    assert sw.select(scores, 2, cutoff_scores=other, cutoff=1).tolist() == [7, 8]
    assert sw.select(scores, 2, cutoff_scores=other, cutoff=1, offset=1).tolist() == [6, 7]
    assert sw.select(scores, 2, "easiest", cutoff_scores=other, cutoff=0.1).tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cutoff": 2}, ValueError, "needs `cutoff_scores`"),
        ({"cutoff": 1, "cutoff_scores": torch.zeros(3)}, ValueError, "shape"),
        ({"cutoff": 1, "cutoff_scores": torch.full((10,), math.nan)}, ValueError, "NaN"),
        ({"cutoff": True, "cutoff_scores": torch.zeros(10)}, TypeError, "`cutoff`"),
        ({"cutoff": 1.5, "cutoff_scores": torch.zeros(10)}, ValueError, "`cutoff`"),
        ({"cutoff": 8, "cutoff_scores": torch.zeros(10)}, ValueError, "at most 2 remain"),
    ],
)
def test_cutoff_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        sw.select(torch.rand(10), 3, "stratified", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stratified_scores_spanning_the_whole_float_range(dtype):
    """float32 scores over ±3e38: max − min overflows; the strata are still the right ones."""
    big = torch.finfo(dtype).max / 1.2
    gen = torch.Generator().manual_seed(0)
    unit = torch.rand(500, generator=gen, dtype=torch.float64) * 2 - 1
    unit[0], unit[1] = -1.0, 1.0
    scores = (unit * big).to(dtype)
    assert not torch.isfinite(scores.max() * 1.0001 - scores.min())  # the overflow is real
    chosen = sw.select(scores, 100, "stratified", bins=10, seed=3)
    assert len(set(chosen.tolist())) == 100
    # the same strata as CCS's recipe on the scores divided by max |score|, in float64
    scaled = scores.to(torch.float64) / scores.abs().max().to(torch.float64)
    _, budgets, strata = ccs_reference.stratified_sampling({"s": scaled}, "s", 100, stratas=10)
    assert ccs_strata_counts(chosen, strata) == {b: int(c) for b, c in enumerate(budgets) if c}
