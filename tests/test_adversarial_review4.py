"""Adversarial review 4: ``sw.select``, ``save_scores``/``load_scores``, ``WithIndex``,
``BatchLayout`` and ``score_dataset``.

The references are plain Python written from the docstrings (sorting by hand, CCS binning and
budgets by hand, largest remainder with exact fractions). The bugs it found are fixed; their
tests say what was wrong before.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections import Counter, namedtuple
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import sampleweights as sw

# -- references ----------------------------------------------------------------------------------


def ranked_hardest_first(scores):
    """Indices by descending score (+inf first); ties by index (callers avoid relying on it)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


def hand_strata(values, bins):
    """CCS's strata written out: ``bins`` equal-width strata over ``[min, max * 1.0001)`` with
    edges ``min + k * step`` in float64; a value at or above the last edge goes to the last one."""
    lo, hi = min(values), max(values)
    step = (hi * 1.0001 - lo) / bins
    edges = [lo + k * step for k in range(bins + 1)]
    out = []
    for v in values:
        b = bins - 1
        for k in range(bins):
            if edges[k] <= v < edges[k + 1]:
                b = k
                break
        out.append(b)
    return out


def ccs_budgets(sizes, k):
    """CCS's bin_allocate with a stable order: ascending sizes, each ``min(size, rest // left)``."""
    order = sorted(range(len(sizes)), key=lambda b: sizes[b])
    budget = [0] * len(sizes)
    rest = k
    for i, b in enumerate(order):
        budget[b] = min(sizes[b], rest // (len(order) - i))
        rest -= budget[b]
    return budget


def largest_remainder(counts, k):
    """Exact quotas: floor of ``k * c / n``; the rest to the largest remainders, ties to the
    lower class id (the rule select's docstring states)."""
    total = sum(counts)
    exact = [Fraction(c * k, total) for c in counts]
    quota = [math.floor(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in order[: k - sum(quota)]:
        quota[c] += 1
    return quota


# -- select: counts, ranking, ties ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_hardest_easiest_and_offset_equal_a_hand_sort_with_inf(dtype):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randperm(40, generator=gen).to(dtype) / 4
    scores[[5, 17]] = math.inf  # never learned: hardest
    ranked = ranked_hardest_first(scores.tolist())
    for keep, offset in [(0.25, 0), (7, 3), (1.0, 0), (1, 0), (0.5, 0.1)]:
        k = round(keep * 40) if isinstance(keep, float) else keep
        skip = round(offset * 40) if isinstance(offset, float) else offset
        got = sw.select(scores, keep, offset=offset)
        assert got.dtype == torch.int64
        assert got.tolist() == sorted(ranked[skip : skip + k])
        pool = ranked[skip:]
        assert sw.select(scores, keep, "easiest", offset=offset).tolist() == sorted(pool[-k:])


def test_keep_fraction_vs_count_and_python_rounding():
    scores = torch.arange(5, dtype=torch.float64)
    assert sw.select(scores, 1).tolist() == [4]  # the int 1 is one example
    assert sw.select(scores, 1.0).tolist() == [0, 1, 2, 3, 4]  # the float 1.0 is all
    assert len(sw.select(scores, 0.5)) == round(2.5) == 2  # Python's round, half to even
    assert len(sw.select(scores, 0.7)) == 4
    assert len(sw.select(scores, np.float32(0.6))) == 3
    assert len(sw.select(scores, np.int64(2))) == 2
    for bad in (0.0, 0, 0.05, 6, -1, 1.5, math.nan):  # 0.05 · 5 rounds to 0
        with pytest.raises(ValueError, match="keep"):
            sw.select(scores, bad)
    for bad in (True, "0.5", None, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="keep"):
            sw.select(scores, bad)


@pytest.mark.parametrize("strategy", ["hardest", "easiest", "random", "stratified"])
def test_ties_are_deterministic_per_seed_and_not_index_ordered(strategy):
    scores = torch.tensor([1.0] * 30 + [2.0] * 30)
    runs = [sw.select(scores, 15, strategy, seed=s) for s in range(40)]
    assert torch.equal(runs[0], sw.select(scores.clone(), 15, strategy, seed=0))
    assert torch.equal(runs[0], sw.select(scores.double(), 15, strategy, seed=0))
    assert len({tuple(r.tolist()) for r in runs}) > 30
    if strategy == "hardest":
        assert all(set(r.tolist()) <= set(range(30, 60)) for r in runs)
        mean = torch.stack(runs).double().mean().item()
        assert 40 < mean < 49  # uniform over 30..59, not the lowest indices


def test_select_does_not_modify_its_inputs():
    scores = torch.tensor([0.3, math.inf, 0.1, 0.2])
    cut = torch.tensor([0.0, 1.0, 2.0, 3.0])
    labels = torch.tensor([0, 1, 0, 1])
    before = (scores.clone(), cut.clone(), labels.clone())
    for strategy in ("hardest", "easiest", "random", "stratified"):
        sw.select(scores, 2, strategy, cutoff_scores=cut, cutoff=1)
        sw.select(scores, 2, strategy, labels=labels, class_balanced=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (scores, cut, labels), strict=True))


def test_never_scored_and_minus_inf_are_errors_naming_the_argument():
    ok = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"`scores` has 1 NaN"):
        sw.select(torch.tensor([0.1, math.nan, 0.3]), 1)
    with pytest.raises(ValueError, match=r"`scores` contains -inf"):
        sw.select(torch.tensor([0.1, -math.inf, 0.3]), 1)
    with pytest.raises(ValueError, match=r"`cutoff_scores` has 1 NaN"):
        sw.select(ok, 1, cutoff_scores=torch.tensor([0.1, math.nan, 0.3]), cutoff=1)
    with pytest.raises(ValueError, match=r"`cutoff_scores` contains -inf"):
        sw.select(ok, 1, cutoff_scores=torch.tensor([0.1, -math.inf, 0.3]), cutoff=1)
    with pytest.raises(ValueError, match="cutoff_scores"):
        sw.select(ok, 1, cutoff_scores=torch.tensor([0.1, 0.2]), cutoff=1)
    with pytest.raises(ValueError, match="needs `cutoff_scores`"):
        sw.select(ok, 1, cutoff=1)
    with pytest.raises(ValueError, match="at most 1 remain"):
        sw.select(ok, 2, offset=1, cutoff_scores=ok, cutoff=1)


def test_cutoff_removes_the_top_of_the_second_score_then_offset_then_strategy():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randperm(30, generator=gen).double()
    second = torch.randperm(30, generator=gen).double()
    cut_away = set(ranked_hardest_first(second.tolist())[:4])
    rest = [i for i in ranked_hardest_first(scores.tolist()) if i not in cut_away]
    got = sw.select(scores, 6, cutoff_scores=second, cutoff=4, offset=2)
    assert got.tolist() == sorted(rest[2:8])
    got = sw.select(scores, 6, "easiest", cutoff_scores=second, cutoff=4 / 30, offset=2)
    assert got.tolist() == sorted(rest[-6:])
    # +inf in the cut-off score is the very first to go
    second[7] = math.inf
    assert 7 not in sw.select(scores, 29, "random", cutoff_scores=second, cutoff=1).tolist()


# -- select: stratified (CCS) --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_stratified_budgets_equal_hand_binning_and_allocation(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 120, (1,), generator=gen))
    bins = int(torch.randint(1, 10, (1,), generator=gen))
    scores = torch.rand(n, generator=gen, dtype=torch.float64) ** 2 * 5 - (seed % 3)
    if seed % 4 == 0:  # a grid: values on strata edges, strata of equal sizes
        scores = torch.randint(0, 3 * bins + 1, (n,), generator=gen).double() / (3 * bins)
    if seed % 5 == 1:
        scores[:3] = math.inf  # a stratum of its own
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    values = scores.tolist()
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]
    stratum = dict(zip(finite, hand_strata([values[i] for i in finite], bins), strict=True))
    for i, v in enumerate(values):
        if not math.isfinite(v):
            stratum[i] = bins
    sizes = [sum(1 for s in stratum.values() if s == b) for b in range(bins + 1)]
    if sizes[bins] == 0:
        sizes = sizes[:bins]  # the +inf stratum joins only when occupied
    budget = ccs_budgets(sizes, k)
    chosen = sw.select(scores, k, "stratified", bins=bins, seed=seed).tolist()
    assert len(chosen) == k == len(set(chosen))
    got = Counter(stratum[i] for i in chosen)
    # equal-sized strata may come in either order: compare (size, budget) pairs as multisets
    want_pairs = sorted((sizes[b], budget[b]) for b in range(len(sizes)))
    got_pairs = sorted((sizes[b], got.get(b, 0)) for b in range(len(sizes)))
    assert got_pairs == want_pairs


def test_stratified_exact_count_under_random_fuzzing():
    gen = torch.Generator().manual_seed(11)
    for _ in range(300):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        bins = int(torch.randint(1, 60, (1,), generator=gen))
        scores = torch.randint(-3, 4, (n,), generator=gen).float() * 1.7
        if n > 2:
            scores[0] = math.inf
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        chosen = sw.select(scores, k, "stratified", bins=bins)
        assert len(chosen) == k == len(torch.unique(chosen)), (n, bins, k)
        assert int(chosen.min()) >= 0 and int(chosen.max()) < n


def test_stratified_with_a_non_positive_maximum_keeps_the_maximum_in_the_last_stratum():
    # the documented difference from CCS: max <= 0 puts the maximum in the last stratum
    scores = torch.tensor([-3.0, -2.0, -1.0], dtype=torch.float64)
    assert sw.select(scores, 3, "stratified", bins=3).tolist() == [0, 1, 2]
    assert sw.select(torch.zeros(7), 4, "stratified", bins=5).numel() == 4


def test_stratified_bins_a_narrow_negative_range_into_equal_width_strata():
    """Before: scores -1000 + linspace(0, 0.05, 100), keep 50 of 50 strata: expected one per equal-
    width stratum over [min, max]; got all 100 in the last stratum (max·1.0001 < min makes the
    step negative), so 'stratified' is a plain random draw"""
    scores = -1000 + torch.linspace(0, 0.05, 100, dtype=torch.float64)
    chosen = sw.select(scores, 50, "stratified", bins=50, seed=0).tolist()
    # 100 evenly spaced scores, 50 equal-width strata: two per stratum, one chosen from each
    assert sorted(Counter(i // 2 for i in chosen).values()) == [1] * 50


# -- select: class balance, labels ---------------------------------------------------------------


def test_class_balanced_quota_totals_are_exact_and_within_one_of_proportional():
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        counts = torch.randint(
            1, 30, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen
        )
        labels = torch.cat([torch.full((int(c),), 7 * c_id) for c_id, c in enumerate(counts)])
        n = len(labels)
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        chosen = sw.select(torch.rand(n, generator=gen), k, "random", labels=labels.tolist(),
                           class_balanced=True)  # fmt: skip
        assert len(chosen) == k == len(torch.unique(chosen))
        got = Counter(labels[chosen].tolist())
        for c_id, c in enumerate(counts.tolist()):
            assert abs(got.get(7 * c_id, 0) - k * c / n) < 1


def test_class_balanced_remainder_ties_go_to_the_lower_class_exactly():
    """Before: class sizes [1, 36, 33], keep 42: remainders .6, .6, .8 (exact); the docstring's tie
    rule gives the tie to the lower class id -> [1, 21, 20]; got [0, 22, 20] because 36·42/70 -
    21 = 0.6000000000000014 > 0.6 in float64 (_largest_remainder)"""
    for counts, k in [([1, 36, 33], 42), ([3, 11, 1], 9), ([6, 5, 37, 16, 35], 9)]:
        labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
        chosen = sw.select(torch.rand(len(labels)), k, "random", labels=labels,
                           class_balanced=True)  # fmt: skip
        got = Counter(labels[chosen].tolist())
        assert [got.get(i, 0) for i in range(len(counts))] == largest_remainder(counts, k)


def test_class_balanced_hardest_within_each_class_after_offset():
    labels = torch.tensor([0] * 6 + [1] * 6)
    scores = torch.arange(12, dtype=torch.float64)  # class 1 is all harder than class 0
    got = sw.select(scores, 4, labels=labels, class_balanced=True, offset=2).tolist()
    # offset removes 11 and 10 (class 1); the pool has 6 of class 0 and 4 of class 1: 2.4 / 1.6
    assert got == [4, 5, 8, 9]


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0, 1, 0]), r"`labels` of shape \(4,\)"),
        (torch.zeros(4, 1, dtype=torch.int64), r"`labels` of shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), "labels"),
        (torch.tensor([True, False, True, False]), "labels"),
        (torch.tensor([0, -1, 0, 1]), "labels"),
    ],
)
def test_bad_labels_are_errors_naming_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        sw.select(torch.rand(4), 2, labels=labels, class_balanced=True)


def test_labels_without_class_balanced_and_the_reverse_are_errors():
    with pytest.raises(ValueError, match="class_balanced"):
        sw.select(torch.rand(4), 2, labels=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="needs `labels`"):
        sw.select(torch.rand(4), 2, class_balanced=True)


def test_string_labels_give_an_error_naming_labels():
    """Before: labels=['a', 'b', 'a', 'b']: expected an error naming `labels`; got torch's
    ValueError 'too many dimensions 'str'' from torch.as_tensor (select.py labels branch)"""
    with pytest.raises((TypeError, ValueError), match="labels"):
        sw.select(torch.rand(4), 2, labels=["a", "b", "a", "b"], class_balanced=True)


@pytest.mark.parametrize("seed", [1.5, "3", None, 2**70])
def test_a_seed_that_is_not_an_int_is_an_error_naming_seed(seed):
    """Before: seed=1.5 / '3' / None / 2**70: expected a TypeError/ValueError naming `seed`; got
    1.5 silently truncated to 1, '3' parsed, None -> 'int() argument must be ...', 2**70 ->
    'Overflow when unpacking long long' (select.py: torch.Generator().manual_seed(int(seed)))"""
    with pytest.raises((TypeError, ValueError), match="seed"):
        sw.select(torch.rand(10), 3, "random", seed=seed)


# -- save_scores / load_scores ---------------------------------------------------------------------


def test_every_truncation_of_a_scores_file_is_refused(tmp_path):
    good = sw.save_scores(tmp_path / "good", torch.tensor([1.0, 2.0, 3.0]), epoch=1).read_bytes()
    path = tmp_path / "cut.npz"
    for length in range(len(good)):
        path.write_bytes(good[:length])
        with pytest.raises(sw.StateMismatchError):
            sw.load_scores(path)


_KILLED_SAVE = r"""
import os, sys, numpy as np, torch
import sampleweights as sw
path, where = sys.argv[1], sys.argv[2]
real_savez = np.savez
def dying_savez(fh, **arrays):
    if where == "mid":
        fh.write(b"PK\x03\x04" + b"\0" * 100)
        fh.flush()
        os._exit(9)
    real_savez(fh, **arrays)
def dying_fsync(fd):
    os._exit(9)
np.savez = dying_savez
if where == "before-rename":
    os.fsync = dying_fsync
sw.save_scores(path, torch.tensor([9.0, 9.0, 9.0]), epoch=2)
"""


@pytest.mark.parametrize("where", ["mid", "before-rename"])
def test_a_process_killed_while_saving_leaves_the_previous_file(tmp_path, where):
    path = sw.save_scores(tmp_path / "scores", torch.tensor([0.5, 0.25, 2.0]), epoch=1)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(path), where],
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 9, proc.stderr.decode()
    scores, meta = sw.load_scores(path, num_examples=3)
    assert scores.tolist() == [0.5, 0.25, 2.0] and meta["epoch"] == 1
    # the dead writer's temporary is never the file a load finds, and the next save works
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert all(p.name.startswith(".scores") and p.suffix == ".tmp" for p in leftovers)
    sw.save_scores(path, torch.tensor([1.0, 1.0, 1.0]), epoch=3)
    assert sw.load_scores(path)[1]["epoch"] == 3


def test_concurrent_saves_and_loads_never_see_a_partial_file(tmp_path):
    path = tmp_path / "shared.npz"
    sw.save_scores(path, torch.full((500,), 0.0), writer=0)
    errors = []
    stop = threading.Event()

    def writer(w):
        try:
            for _ in range(15):
                sw.save_scores(path, torch.full((500,), float(w)), writer=w)
        except Exception as err:  # collected and asserted below
            errors.append(err)

    def reader():
        try:
            while not stop.is_set():
                scores, meta = sw.load_scores(path, num_examples=500)
                assert torch.all(scores == meta["writer"])
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2, 3)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.npz"]


def test_metadata_round_trips_as_json(tmp_path):
    meta = {
        "epoch": 3,
        "lr": 0.1,
        "nan": math.nan,
        "big": 2**80,
        "nested": {"a": [1, 2, {"b": None}]},
        "text": "ü\x00\n\"'",
        "flag": True,
    }
    path = sw.save_scores(tmp_path / "m", torch.tensor([1.0, 2.0]), scorer="el2n", **meta)
    _, got = sw.load_scores(path, num_examples=2)
    for key, value in meta.items():
        if key == "nan":
            assert math.isnan(got[key])
        else:
            assert got[key] == value and type(got[key]) is type(value)
    assert got["scorer"] == "el2n" and got["num_examples"] == 2 and got["format"]
    with pytest.raises(TypeError, match="JSON"):
        sw.save_scores(tmp_path / "bad", torch.tensor([1.0]), arr=np.int64(3))
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize(
    "name", ["a b.npz", "ü-ß-λ", "new\nline", "semi;colon&$(x)", "dots.in.name", "-dash", "x" * 200]
)
def test_odd_file_names_round_trip(tmp_path, name):
    path = sw.save_scores(tmp_path / "deep" / "er" / name, torch.tensor([0.5, math.inf, math.nan]))
    assert path.name.endswith(".npz") and path.exists()
    scores, _ = sw.load_scores(tmp_path / "deep" / "er" / name, num_examples=3)
    assert scores[0] == 0.5 and scores[1] == math.inf and math.isnan(scores[2])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_overwriting_replaces_contents_size_and_meta(tmp_path):
    path = sw.save_scores(tmp_path / "s", torch.rand(1000), epoch=1, note="long run")
    sw.save_scores(path, torch.tensor([1.0, 2.0]), epoch=2)
    scores, meta = sw.load_scores(path, num_examples=2)
    assert scores.tolist() == [1.0, 2.0] and meta["epoch"] == 2 and "note" not in meta
    with pytest.raises(sw.StateMismatchError, match="num_examples=1000"):
        sw.load_scores(path, num_examples=1000)


def test_float64_and_half_scores_round_trip_within_float32():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            x = torch.tensor([0.5, -2.25, 3.0, math.inf], dtype=dtype)
            scores, _ = sw.load_scores(sw.save_scores(os.path.join(d, str(dtype)), x))
            assert scores.dtype == torch.float32 and scores.tolist() == x.float().tolist()


def test_float64_scores_float32_cannot_hold_are_not_silently_changed(tmp_path):
    """Before: float64 scores [1e39, 1e-50]: expected an error (float32 cannot hold them;
    LossReweighter refuses such float64 weights) or exact values; got [inf, 0.0] silently, and
    +inf then ranks as 'never learned' in select (persist.py _as_array: .to(torch.float32))"""
    x = torch.tensor([1e39, 1e-50, 0.5], dtype=torch.float64)
    try:
        path = sw.save_scores(tmp_path / "s", x)
    except (TypeError, ValueError):
        return  # refusing is fine
    scores, _ = sw.load_scores(path)
    assert torch.isfinite(scores).all() and bool((scores[:2] != 0).all())


def test_a_path_ending_in_a_separator_is_refused(tmp_path):
    """Before: save_scores('out/') (a directory path): expected a ValueError like '.' and ''; got a
    file 'out.npz' written beside it (persist.py _npz_path: Path('out/').name == 'out')"""
    with pytest.raises(ValueError, match="file name"):
        sw.save_scores(str(tmp_path / "out") + os.sep, torch.rand(3))


# -- WithIndex -------------------------------------------------------------------------------------

Pair = namedtuple("Pair", "x y")


class _Samples(Dataset):
    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 6

    def __getitem__(self, i):
        x = torch.full((3,), float(i))
        if self.kind == "tuple":
            return x, i % 2
        if self.kind == "list":
            return [x, i % 2]
        if self.kind == "namedtuple":
            return Pair(x, i % 2)
        if self.kind == "dict":
            return {"x": x, "label": i % 2}
        return x  # a bare tensor


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "dict", "tensor"])
def test_withindex_sample_kinds_through_a_loader_carry_the_right_index(kind):
    ds = sw.WithIndex(_Samples(kind))
    layout = sw.BatchLayout()
    seen = []
    for batch in DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    ):
        idx = layout.indices(batch)
        x = layout.model_input(batch)
        if kind == "dict":
            assert sorted(x) == ["x"]
            x = x["x"]
        assert torch.equal(x[:, 0], idx.float())  # each example's own index
        if kind != "tensor":
            assert torch.equal(layout.targets(batch), idx % 2)
        seen += idx.tolist()
    assert sorted(seen) == list(range(6))


def test_withindex_negative_numpy_and_tensor_indices():
    ds = sw.WithIndex(TensorDataset(torch.arange(5.0), torch.arange(5)))
    assert ds[-1][2] == 4 and ds[-5][2] == 0
    assert ds[np.int32(3)][2] == 3 and type(ds[np.int32(3)][2]) is int
    assert ds[torch.tensor(2)][2] == 2
    assert [s[2] for s in ds.__getitems__([-1, 0, np.int64(2)])] == [4, 0, 2]
    for bad in (5, -6, 2**70):
        with pytest.raises(IndexError):
            ds[bad]
    for bad in (1.0, "1", None, np.bool_(True), True, torch.tensor(1.0)):
        with pytest.raises(TypeError):
            ds[bad]


def test_withindex_refuses_a_bool_tensor_index():
    """Before: WithIndex(ds)[torch.tensor(True)]: expected TypeError like True and np.bool_; got
    example 1 (data.py WithIndex._normalise checks bool/np.bool_ only, operator.index accepts a
    bool tensor)"""
    ds = sw.WithIndex(TensorDataset(torch.arange(5.0), torch.arange(5)))
    with pytest.raises(TypeError):
        ds[torch.tensor(True)]


def test_nested_withindex_and_subsets():
    base = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    inner = sw.WithIndex(Subset(sw.WithIndex(base), [7, 8, 9]))
    assert len(inner) == 3
    _, y, original, position = inner[-1]
    assert (int(y), original, position) == (9, 9, 2)
    # the outer index is the last element: the default layout must not guess a target there
    batch = next(iter(DataLoader(inner, batch_size=3)))
    with pytest.raises(ValueError, match="target_pos"):
        sw.BatchLayout().targets(batch)
    layout = sw.BatchLayout(target_pos=1, input_pos=0)
    assert layout.indices(batch).tolist() == [0, 1, 2]
    assert layout.targets(batch).tolist() == [7, 8, 9]
    with pytest.raises(TypeError):
        sw.WithIndex([1, 2, 3].__iter__())


# -- BatchLayout -----------------------------------------------------------------------------------


def test_layout_positions_and_model_input_with_negative_positions():
    batch = (torch.arange(2), torch.zeros(2, 4), torch.tensor([1, 0]), torch.ones(2, 3))
    layout = sw.BatchLayout(index_pos=0, target_pos=-2, input_pos=-1)
    assert layout.indices(batch).tolist() == [0, 1]
    assert layout.targets(batch).tolist() == [1, 0]
    assert layout.model_input(batch).shape == (2, 3)
    assert [t.shape for t in layout.inputs(batch)] == [(2, 4), (2, 3)]
    with pytest.raises(ValueError, match="input_pos"):
        sw.BatchLayout(index_pos=0, target_pos=2, input_pos=-2).model_input(batch)
    with pytest.raises(ValueError, match="same element"):
        sw.BatchLayout(index_pos=-1, target_pos=3).targets(batch)
    with pytest.raises(ValueError, match="model input"):
        sw.BatchLayout(index_pos=0, target_pos=2).model_input(batch)
    with pytest.raises(ValueError, match="outside a batch"):
        sw.BatchLayout(target_pos=7).targets(batch)


def test_layout_dict_keys():
    batch = {"ids": torch.zeros(2, 5), "mask": torch.ones(2, 5), "y": torch.tensor([1, 0]),
             "idx": torch.tensor([3, 4])}  # fmt: skip
    layout = sw.BatchLayout(index_key="idx", target_key="y")
    assert layout.indices(batch).tolist() == [3, 4]
    assert layout.targets(batch).tolist() == [1, 0]
    assert sorted(layout.model_input(batch)) == ["ids", "mask"]
    with pytest.raises(KeyError, match="target"):
        sw.BatchLayout(index_key="idx").targets(batch)
    with pytest.raises(ValueError, match="index"):
        sw.BatchLayout().indices(batch)


def test_layout_refuses_the_same_key_for_index_and_target():
    """Before: BatchLayout(target_key='index'): expected ValueError (two roles on one key, as for
    positions); got a layout whose targets() returns the dataset indices, scored as classes
    without error (data.py BatchLayout.__post_init__ compares positions only)"""
    with pytest.raises(ValueError, match="index_key"):
        sw.BatchLayout(target_key="index")


# -- score_dataset ---------------------------------------------------------------------------------


def _tuple_data(n=12):
    gen = torch.Generator().manual_seed(0)
    return sw.WithIndex(TensorDataset(torch.randn(n, 3, generator=gen), torch.arange(n) % 2))


def test_score_dataset_restores_modes_and_grad_mode_after_an_exception():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[2].eval()  # deliberately frozen
    flags = [m.training for m in net.modules()]
    calls = []

    def forward(model, batch):
        calls.append(torch.is_grad_enabled())
        assert not model.training and not model[1].training
        if len(calls) == 2:
            raise RuntimeError("boom")
        return model(batch[0])

    scorer = sw.EL2N(12)
    with pytest.raises(RuntimeError, match="boom"):
        sw.score_dataset(net, DataLoader(_tuple_data(), batch_size=4), scorer, forward=forward,
                         progress=False)  # fmt: skip
    assert calls == [False, False]  # the forward runs without autograd
    assert [m.training for m in net.modules()] == flags
    assert torch.is_grad_enabled()
    assert scorer.num_updates == 1
    assert all(p.grad is None for p in net.parameters())


def test_score_dataset_with_grand_in_train_mode_restores_eval_flags_after_an_error():
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 2)).eval()
    grand = sw.GraNd(net, 12, mode="train")

    def forward(model, batch):
        assert model.training  # GraNd's own mode
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        sw.score_dataset(net, DataLoader(_tuple_data(), batch_size=4), grand, forward=forward,
                         progress=False)  # fmt: skip
    assert not any(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_score_dataset_with_a_dict_loader_and_kwargs_model():
    class Dicts(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"x": torch.full((3,), i / 10), "label": i % 2}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    model = Model()
    ds = sw.WithIndex(Dicts())
    scorer = sw.EL2N(10)
    sw.score_dataset(model, DataLoader(ds, batch_size=4, shuffle=True), scorer, progress=False)
    x = torch.stack([ds[i]["x"] for i in range(10)])
    y = torch.tensor([i % 2 for i in range(10)])
    with torch.no_grad():
        probs = model.lin(x).softmax(-1)
    want = (probs - nn.functional.one_hot(y, 2).float()).norm(dim=1)
    torch.testing.assert_close(scorer.compute(), want)


def test_score_dataset_over_a_partially_consumed_iterator_scores_the_rest_only():
    ds = _tuple_data()
    model = nn.Linear(3, 2)
    batches = iter(DataLoader(ds, batch_size=4))
    next(batches)  # peeked
    scorer = sw.EL2N(12)
    sw.score_dataset(model, batches, scorer, progress=False)
    scores = scorer.compute()
    assert torch.isnan(scores[:4]).all() and torch.isfinite(scores[4:]).all()
    with pytest.raises(ValueError, match="4 NaN"):
        sw.select(scores, 2)  # never-scored examples cannot be selected silently


def test_score_dataset_checks_every_scorers_index_range_before_any_update():
    """Before: score_dataset(model, loader, EL2N(12), EL2N(6)) on a batch with index 11: expected
    the error before any scorer changes; got EL2N(12) updated (num_updates 1) and EL2N(6) not
    (passes.py: only layouts are read before updating; index ranges are checked per update)"""
    a, b = sw.EL2N(12), sw.EL2N(6)
    with pytest.raises(ValueError, match="num_examples=6"):
        sw.score_dataset(nn.Linear(3, 2), DataLoader(_tuple_data(), batch_size=12), a, b,
                         progress=False)  # fmt: skip
    assert a.num_updates == 0 and b.num_updates == 0
