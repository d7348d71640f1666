"""Adversarial review of the fused collection update (``ScorerCollection(..., compile=True)``
with every scorer fusable: statistics, values and state updates as one compiled call).

The reference is always the same scorers in an eager collection (``compile=False``): integer and
bool states (counts, flags, Misclassified's steps) must be the same bits, float states and scores
within 1e-5 relative (the compiled statistics sum in another order; subnormal values keep only an
absolute precision, hence the tiny ``atol``).

Compilation is CPU-heavy, so every test keeps to a few batch shapes: eager-path batches (a
run's first update, repeated indices) are always (8, 5) float32, so the compiled shared pass is
built once; fused batches use a handful of sizes (the first four kinds get static kernels,
process-wide, the rest the dynamic one).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import sampleweights as sw
from conftest import all_logit_scorers, assert_same_state, snapshot
from sampleweights.scorers import collection as collection_module
from sampleweights.scorers import fused as fused_module

N = 40  # dataset size: distinct from every batch size and class count (no duck-sized shapes)
C = 5

pytestmark = pytest.mark.skipif(
    not (hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()),
    reason="torch.compile is unavailable here",
)


# -- helpers -------------------------------------------------------------------------------------


def fusable_scorers(n: int = N, **kw) -> list[sw.Scorer]:
    """One of every fusable built-in type (plain means: no ema), the entropy included."""
    return all_logit_scorers(n, confidence_ema=None, **kw)


def pair(n: int = N, **kw) -> tuple[sw.ScorerCollection, sw.ScorerCollection]:
    fused = sw.ScorerCollection(*fusable_scorers(n, **kw), compile=True)
    eager = sw.ScorerCollection(*fusable_scorers(n, **kw))
    assert fused._whole is not None
    return fused, eager


def make_batch(gen, size, classes=C, *, dup=False, kind="randn", dtype=torch.float32, n=N):
    """A batch of distinct indices (``dup``: two rows share an index), logits of ``kind``."""
    idx = torch.randperm(n, generator=gen)[:size]
    if dup:
        idx[-1] = idx[0]
    if kind == "randn":
        logits = torch.randn(size, classes, generator=gen) * 4
    elif kind == "ties":  # small integers: exact ties for the maximum, target among them
        logits = torch.randint(-1, 2, (size, classes), generator=gen).float()
    elif kind == "extreme":  # ±1e4: probabilities of exactly 0 and 1
        sign = torch.randint(0, 2, (size, classes), generator=gen).float() * 2 - 1
        logits = sign * 1e4
        logits[0] = 0.0  # one all-tied row
    else:
        raise AssertionError(kind)
    targets = torch.randint(0, classes, (size,), generator=gen)
    return idx, logits.to(dtype), targets


def should_fuse(collection, idx, logits) -> bool:
    """The documented preconditions of the fused path (an independent restatement)."""
    return (
        logits.dim() == 2
        and logits.shape[0] >= 1
        and logits.shape[1] >= 2
        and len(set(torch.as_tensor(idx).tolist())) == len(idx)
        and all(s._device_fixed and s._run_updates > 0 for s in collection)
    )


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach the compiled whole update (every collection shares one)."""
    counter = {"n": 0}
    original = fused_module.CompiledUpdate.__call__

    def counting(self, *args):
        counter["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(fused_module.CompiledUpdate, "__call__", counting)
    return counter


def _atol(name: str, atol: float) -> float:
    """The probability margin is signed, in [-1, 1]: its sum over presentations cancels, so the
    last-bit differences of the values are absolute there (~1e-7 each), not relative."""
    return max(atol, 1e-6) if name == "margin" else atol


def assert_matches(fused, eager, *, rtol=1e-5, atol=1e-30):
    """The same bookkeeping, integer states bit for bit, float states and scores to ``rtol``."""
    for f, e in zip(fused, eager, strict=True):
        assert (f.num_updates, f.num_runs, f._run_updates, f.num_skipped) == (
            e.num_updates,
            e.num_runs,
            e._run_updates,
            e.num_skipped,
        ), f.name
        got, want = f.state_dict()["state"], e.state_dict()["state"]
        for key, w in want.items():
            g = got[key]
            assert g.dtype == w.dtype, f"{f.name}.{key}"
            if w.is_floating_point():
                torch.testing.assert_close(
                    g,
                    w,
                    rtol=rtol,
                    atol=_atol(f.name, atol),
                    equal_nan=True,
                    msg=lambda m, where=f"{f.name}.{key}": f"{where}: {m}",
                )
            else:
                assert torch.equal(g, w), f"{f.name}.{key}"
    got, want = fused.compute(), eager.compute()
    for name in ("forgetting", "misclassified", "aum"):  # integers, flags, exact margins
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True)
    for name in want:
        torch.testing.assert_close(
            got[name],
            want[name],
            rtol=rtol,
            atol=_atol(name, atol),
            equal_nan=True,
            msg=lambda m, where=name: f"{where}: {m}",
        )
    maps_f, maps_e = fused["datamaps"].compute_all(), eager["datamaps"].compute_all()
    torch.testing.assert_close(
        maps_f["correctness"], maps_e["correctness"], rtol=0, atol=0, equal_nan=True
    )
    torch.testing.assert_close(
        maps_f["confidence"], maps_e["confidence"], rtol=rtol, atol=atol, equal_nan=True
    )
    # a standard deviation of p_y: √ of a sum of squared differences, absolute precision
    torch.testing.assert_close(
        maps_f["variability"], maps_e["variability"], rtol=1e-4, atol=1e-6, equal_nan=True
    )


def feed(fused, eager, batch, calls=None, expected=None):
    """One update of both; checks the fast path was taken exactly when it should be."""
    before = None if calls is None else calls["n"]
    want = should_fuse(fused, batch[0], batch[1]) if expected is None else expected
    fused.update_indexed(*batch)
    eager.update_indexed(*batch)
    if calls is not None:
        assert calls["n"] - before == int(want), (tuple(batch[1].shape), want)


def states_of(collection) -> dict:
    return {s.name: snapshot(s) for s in collection}


def assert_states_unchanged(before: dict, collection) -> None:
    for s in collection:
        assert_same_state(before[s.name], snapshot(s))


# -- claim 1: the fused scores are the eager ones over random histories ----------------------------


def test_a_random_history_matches_the_eager_collection(calls, monkeypatch):
    """Changing batch sizes (4 static kinds, then the dynamic kernel), batches of one row, two
    classes, repeated indices (eager, interleaved), ties and ±1e4 logits, new_run(), a
    state_dict() resumed in fresh fused collections (device unset and device="cpu"), reset()."""
    gen = torch.Generator().manual_seed(0)
    fused, eager = pair()
    compiled = fused_module.compiled_update()
    dynamic = {"n": 0}
    inner = compiled.dynamic

    def counting_dynamic(*args):
        dynamic["n"] += 1
        return inner(*args)

    monkeypatch.setattr(compiled, "dynamic", counting_dynamic)
    epoch = [
        dict(size=8),  # the run's first update: eager
        dict(size=8),  # static kind 1
        dict(size=8, dup=True),  # repeated index: eager
        dict(size=5),
        dict(size=3, kind="ties"),
        dict(size=7, kind="extreme"),  # static kinds 2-4
        dict(size=6),  # from here the dynamic kernel
        dict(size=1),
        dict(size=4, kind="ties"),
        dict(size=8, dup=True, kind="ties"),
        dict(size=6, classes=2),
        dict(size=1, classes=2, kind="extreme"),
        dict(size=8, kind="extreme"),
    ]
    for spec in epoch:
        feed(fused, eager, make_batch(gen, **spec), calls)
    assert_matches(fused, eager)
    # nine kinds of fused batch: the static kernels are all taken, the rest went dynamic
    assert len(compiled.kinds) == compiled.STATIC_KINDS and dynamic["n"] >= 9 - 4
    for _ in range(2):  # two more runs, each starting eagerly
        fused.new_run()
        eager.new_run()
        for spec in epoch:
            feed(fused, eager, make_batch(gen, **spec), calls)
    assert_matches(fused, eager)
    # mid-run: the state in fresh fused collections, and on with both
    saved = copy.deepcopy(fused.state_dict())
    for device in (None, "cpu"):
        resumed = sw.ScorerCollection(*fusable_scorers(device=device), compile=True)
        resumed.load_state_dict(copy.deepcopy(saved))
        reference = sw.ScorerCollection(*fusable_scorers())
        reference.load_state_dict(copy.deepcopy(saved))
        for k, spec in enumerate(epoch[3:8]):
            batch = make_batch(gen, **spec)
            # device unset: the first update places the state, eagerly; "cpu": fused at once
            expected = (device is not None) if k == 0 else None
            feed(resumed, reference, batch, calls, expected)
        assert_matches(resumed, reference)
    fused.reset()
    eager.reset()
    for spec in epoch[:6]:
        feed(fused, eager, make_batch(gen, **spec), calls)
    assert_matches(fused, eager)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_logit_dtypes_match_the_eager_collection(dtype, calls):
    """float64/float16/bfloat16 logits through the fused kernel, ties and ±1e4 included; then
    NaN/±inf in that dtype are refused by the fused call with nothing changed."""
    gen = torch.Generator().manual_seed(1)
    fused, eager = pair()
    feed(fused, eager, make_batch(gen, 8), calls)  # float32 first update (eager)
    for spec in (
        dict(size=8),
        dict(size=6, kind="ties"),
        dict(size=8, kind="extreme"),
        dict(size=6, classes=2),
    ):
        feed(fused, eager, make_batch(gen, dtype=dtype, **spec), calls, expected=True)
    if dtype == torch.float64:  # logits that float32 cannot tell apart, or cannot hold
        idx = torch.randperm(N, generator=gen)[:6]
        logits = torch.tensor(
            [
                [1e4, 1e4 + 1e-4, 0.0],
                [0.0, 1e-300, -1e-300],
                [1e300, -1e300, 0.0],
                [-1e300, 1e300, 1e300],
                [5.0, 5.0, 5.0 - 1e-12],
                [0.0, -90.0, -100.0],  # subnormal probabilities in float32
            ],
            dtype=torch.float64,
        )
        feed(fused, eager, (idx, logits, torch.tensor([0, 1, 1, 2, 2, 0])), calls, True)
    assert_matches(fused, eager)
    before = states_of(fused)
    idx, logits, targets = make_batch(gen, 8, dtype=dtype)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[5, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fused.update_indexed(idx, broken, targets)
        with pytest.raises(ValueError, match="NaN or inf"):
            eager.update_indexed(idx, broken, targets)
        assert_states_unchanged(before, fused)
    feed(fused, eager, (idx, logits, targets), calls, expected=True)
    assert_matches(fused, eager)


# -- claim 2: validation before any change ---------------------------------------------------------


def _bad_inputs(gen):
    idx, logits, targets = make_batch(gen, 8)
    out = []

    def add(name, i=idx, x=logits, y=targets):
        out.append((name, i, x, y))

    add("index == N", idx.clone().index_fill_(0, torch.tensor([7]), N))
    add("index -1", idx.clone().index_fill_(0, torch.tensor([0]), -1))
    add("target == C", y=targets.clone().index_fill_(0, torch.tensor([4]), C))
    add("target -1", y=targets.clone().index_fill_(0, torch.tensor([4]), -1))
    for value in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[6, 0] = value
        add(f"logit {value} (fused kernel)", x=broken)
    dup = idx.clone()
    dup[3] = dup[1]
    broken = logits.clone()
    broken[2, 2] = float("nan")
    add("NaN with repeated indices (eager path)", i=dup, x=broken)
    i6, x6, y6 = make_batch(gen, 6)
    x6[5, 1] = float("nan")
    add("NaN, dynamic kernel", i6, x6, y6)
    i1, x1, y1 = make_batch(gen, 1)
    x1[0, 4] = float("inf")
    add("inf, one row", i1, x1, y1)
    add("one index short", i=idx[:7])
    add("one target more", y=torch.cat([targets, targets[:1]]))
    add("1-D logits", x=logits[:, 0].contiguous())
    add("no classes", x=logits[:, :0])
    add("float indices", i=idx.float())
    add("integer logits", x=logits.long())
    add("2-D targets", y=targets.view(2, 4))
    add("one class (no margin)", x=logits[:, :1].contiguous(), y=torch.zeros_like(targets))
    return out


def test_rejected_batches_raise_as_eager_and_change_nothing(calls):
    gen = torch.Generator().manual_seed(2)
    fused, eager = pair()
    for size in (8, 8, 6, 1):  # the run started; the static, dynamic and one-row kernels warm
        feed(fused, eager, make_batch(gen, size), calls)
    for name, idx, logits, targets in _bad_inputs(gen):
        before_f, before_e = states_of(fused), states_of(eager)
        with pytest.raises(Exception) as want:
            eager.update_indexed(idx, logits, targets)
        with pytest.raises(Exception) as got:
            fused.update_indexed(idx, logits, targets)
        assert type(got.value) is type(want.value), (name, got.value, want.value)
        assert_states_unchanged(before_f, fused)
        assert_states_unchanged(before_e, eager)
    for size in (8, 6, 8):  # and on with valid batches
        feed(fused, eager, make_batch(gen, size), calls, expected=True)
    assert_matches(fused, eager)


def test_non_finite_logits_at_the_first_update_are_refused_eagerly(calls):
    gen = torch.Generator().manual_seed(3)
    fused, eager = pair()
    idx, logits, targets = make_batch(gen, 8)
    broken = logits.clone()
    broken[0, 0] = float("nan")
    before = states_of(fused)
    for c in (fused, eager):
        with pytest.raises(ValueError, match="NaN or inf"):
            c.update_indexed(idx, broken, targets)
    assert_states_unchanged(before, fused)
    assert calls["n"] == 0
    assert all(s.num_updates == 0 and s.num_runs == 0 for s in fused)
    feed(fused, eager, (idx, logits, targets), calls, expected=False)
    feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)


# -- claim 3: the fast path is taken exactly where it should be ------------------------------------


class DoubledEL2N(sw.EL2N):
    """A subclass of a built-in type overriding ``_values_from``."""

    def _values_from(self, stats):
        return 2 * stats.el2n


class PlainSubclass(sw.Loss):
    """A subclass that overrides nothing: still not an exact built-in type."""


def _variant(which: str) -> list[sw.Scorer]:
    scorers = fusable_scorers()
    if which == "subclass":
        scorers[0] = DoubledEL2N(N)
    elif which == "plain-subclass":
        scorers[3] = PlainSubclass(N)
    elif which == "ema":
        scorers[6] = sw.Confidence(N, ema=0.7)
    elif which == "skip":
        scorers[1] = sw.AUM(N, nonfinite="skip")
    elif which == "validate-false":
        scorers[8] = sw.Misclassified(N, validate=False)
    return scorers


@pytest.mark.parametrize("which", ["subclass", "plain-subclass", "ema", "skip", "validate-false"])
def test_a_collection_with_an_unfusable_scorer_never_fuses_and_matches_eager(which, calls):
    gen = torch.Generator().manual_seed(4)
    fused = sw.ScorerCollection(*_variant(which), compile=True)
    eager = sw.ScorerCollection(*_variant(which))
    assert fused._whole is None
    for k in range(4):
        feed(fused, eager, make_batch(gen, 8, dup=k == 2), calls, expected=False)
    fused.new_run()
    eager.new_run()
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)
    assert_matches(fused, eager)


def test_a_numpy_refilled_index_buffer_is_never_answered_from_a_stale_check(calls):
    """One CPU index tensor refilled in place through numpy (no version bump) between updates,
    alternating distinct and repeated contents: each update must see its own indices."""
    gen = torch.Generator().manual_seed(5)
    fused, eager = pair()
    fresh = sw.ScorerCollection(*fusable_scorers())  # fed new tensors every time
    buffer = torch.zeros(8, dtype=torch.int64)
    plan = [False, False, True, False, True, True, False, False]  # repeated indices or not
    for k, dup in enumerate(plan):
        idx, logits, targets = make_batch(gen, 8, dup=dup)
        buffer.numpy()[:] = idx.numpy()
        feed(fused, eager, (buffer, logits, targets), calls, expected=k > 0 and not dup)
        fresh.update_indexed(idx.clone(), logits, targets)
    assert_matches(fused, eager)
    assert_matches(fused, fresh)


def test_a_numpy_index_array_refilled_in_place_is_read_afresh(calls):
    gen = torch.Generator().manual_seed(6)
    fused, eager = pair()
    array = np.zeros(8, dtype=np.int64)
    for k, dup in enumerate([False, False, True, False, False, True, False]):
        idx, logits, targets = make_batch(gen, 8, dup=dup)
        array[:] = idx.numpy()
        feed(fused, eager, (array, logits, targets), calls, expected=k > 0 and not dup)
    assert_matches(fused, eager)


def test_a_scorer_updated_on_its_own_keeps_its_own_step(calls):
    gen = torch.Generator().manual_seed(7)
    fused, eager = pair()
    for k in range(6):
        feed(fused, eager, make_batch(gen, 8), calls, expected=k > 0)
        if k in (1, 3):  # Misclassified and ForgettingTracker (and a mean) alone in between
            solo = make_batch(gen, 8, dup=k == 3)
            for name in ("misclassified", "forgetting", "loss"):
                fused[name].update_indexed(*solo)
                eager[name].update_indexed(*solo)
    assert fused["misclassified"].num_updates == 8 and fused["aum"].num_updates == 6
    assert_matches(fused, eager)


def test_scorers_moved_with_to_cpu_fuse_from_their_second_update(calls):
    gen = torch.Generator().manual_seed(8)
    scorers = fusable_scorers()
    for s in scorers[::2]:
        s.to("cpu")
    fused = sw.ScorerCollection(*scorers, compile=True)
    eager = sw.ScorerCollection(*fusable_scorers())
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)  # the run's first update
    for _ in range(3):
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    fused.to("cpu")
    eager.to("cpu")
    feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)


def test_a_collection_of_scorers_that_already_have_state(calls):
    """Scorers updated alone (different counts, one mid-way through a second run) and then
    collected: their first collection update may fuse, each with its own step."""
    gen = torch.Generator().manual_seed(9)
    mine, theirs = fusable_scorers(), fusable_scorers()
    for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        for j in range(k % 3 + 1):
            batch = make_batch(gen, 8, dup=j == 1)
            a.update_indexed(*batch)
            b.update_indexed(*batch)
        if k == 4:
            a.new_run()
            b.new_run()
            batch = make_batch(gen, 8)
            a.update_indexed(*batch)
            b.update_indexed(*batch)
    fused = sw.ScorerCollection(*mine, compile=True)
    eager = sw.ScorerCollection(*theirs)
    for _ in range(3):
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)


def test_a_rollback_with_load_state_dict_in_the_same_collection(calls):
    gen = torch.Generator().manual_seed(10)
    fused, eager = pair()
    for _ in range(3):
        feed(fused, eager, make_batch(gen, 8), calls)
    saved_f, saved_e = copy.deepcopy(fused.state_dict()), copy.deepcopy(eager.state_dict())
    for _ in range(2):
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    fused.load_state_dict(saved_f)
    eager.load_state_dict(saved_e)
    for _ in range(2):
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)


# -- claim 4: a compiler that fails ----------------------------------------------------------------


class _Raises:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        from torch._dynamo.exc import InternalTorchDynamoError

        self.calls += 1
        raise InternalTorchDynamoError("no C++ compiler")  # what a failing compilation raises


def _runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_a_failing_whole_update_warns_once_and_stays_eager(monkeypatch):
    broken = _Raises()
    monkeypatch.setattr(collection_module, "compiled_update", lambda: broken)
    gen = torch.Generator().manual_seed(11)
    fused, eager = pair()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(5):
            feed(fused, eager, make_batch(gen, 8, dup=k == 3))
    assert _runtime_warnings(record) == [
        "ScorerCollection(compile=True): torch.compile of the whole update failed "
        "(InternalTorchDynamoError: no C++ compiler); updating the scorers eagerly from now on."
    ]
    assert broken.calls == 1 and fused._whole is None
    assert_matches(fused, eager)


def test_a_broken_torch_compile_warns_once(monkeypatch):
    """Before: BUG (minor): a torch.compile that fails warns twice, once for the compiled shared
    pass (the collection's first, eager update) and again for the whole update"""

    def broken_compile(fn, **kwargs):
        return _Raises()

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused_module, "_COMPILED", [])  # the process-wide compiled functions
    monkeypatch.setattr(collection_module, "_COMPILED", [])
    gen = torch.Generator().manual_seed(12)
    fused, eager = pair()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(5):
            feed(fused, eager, make_batch(gen, 8, dup=k == 3))
    assert_matches(fused, eager)  # nothing lost or double counted (this part holds)
    assert len(_runtime_warnings(record)) == 1, _runtime_warnings(record)


class _WritesThenFails:
    """A compiled update that fails at run time after its kernels wrote the states (an
    out-of-memory error or a kernel's runtime check part-way through the call)."""

    def __call__(self, *args):
        fused_module.whole_update(*args)
        raise RuntimeError("out of memory")


def test_a_run_time_failure_of_the_compiled_call_never_counts_a_batch_twice(monkeypatch):
    """Before: BUG: any exception from the compiled call is taken for a compile failure and the
    batch is applied again eagerly, so rows the call had already written count twice"""
    monkeypatch.setattr(collection_module, "compiled_update", lambda: _WritesThenFails())
    gen = torch.Generator().manual_seed(13)
    fused, eager = pair()
    before = sw.ScorerCollection(*fusable_scorers())  # the state before the failing batch
    first = make_batch(gen, 8)
    feed(fused, eager, first)
    before.update_indexed(*first)
    batch = make_batch(gen, 8)
    eager.update_indexed(*batch)
    with pytest.raises(RuntimeError, match="out of memory"):  # raised, not retried eagerly
        fused.update_indexed(*batch)
    for f, e, b in zip(fused, eager, before, strict=True):
        assert f.num_updates == b.num_updates  # not counted
        for key, want in e.state_dict()["state"].items():  # written once (by the call), not twice
            if not want.is_floating_point():
                assert torch.equal(f.state_dict()["state"][key], want), f"{f.name}.{key}"


# -- claim 5: anything else ------------------------------------------------------------------------


def test_switching_to_nonfinite_skip_after_construction_skips_only_the_bad_rows(calls):
    """Before: BUG: fusable() is decided once in __init__; switching a scorer to nonfinite='skip'
    later keeps the fused path, which sends the whole batch to the trash slot and counts the
    update (finite rows lost, num_skipped 0)"""
    gen = torch.Generator().manual_seed(14)
    fused, eager = pair()
    for _ in range(2):
        feed(fused, eager, make_batch(gen, 8), calls)
    for c in (fused, eager):
        for s in c:
            s.nonfinite = "skip"  # e.g. turning on fp16 autocast mid-training
    idx, logits, targets = make_batch(gen, 8)
    logits[2, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute() warns about the skipped row
        fused.update_indexed(idx, logits, targets)
        eager.update_indexed(idx, logits, targets)
        assert eager["el2n"].num_skipped == 1
        assert fused["el2n"].num_skipped == 1, "the NaN row was not counted as skipped"
        assert_matches(fused, eager)


@pytest.mark.parametrize("bad", [-1, N + 3])
def test_switching_validate_off_after_construction_behaves_as_eager(bad, calls):
    """Before: BUG: with validate switched off after construction the fused kernel still runs; an
    out-of-range index makes it write the rows before it (or wrap -1 into the trash slot) unlike
    the eager path, and the run-time error is reported as a compile failure"""
    gen = torch.Generator().manual_seed(15)
    fused, eager = pair()
    for _ in range(2):
        feed(fused, eager, make_batch(gen, 8), calls)
    for c in (fused, eager):
        for s in c:
            s.validate = False
    idx, logits, targets = make_batch(gen, 8)
    idx[-1] = bad
    outcomes, warned = [], []
    for c in (eager, fused):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                c.update_indexed(idx, logits, targets)
                outcomes.append(None)
            except Exception as err:
                outcomes.append(type(err))
        warned.append(_runtime_warnings(record))
    for f, e in zip(fused, eager, strict=True):  # what the failed update left behind
        for key, want in e.state_dict()["state"].items():
            if not want.is_floating_point():
                assert torch.equal(f.state_dict()["state"][key], want), f"{f.name}.{key}"
    assert outcomes[1] is outcomes[0], outcomes  # eager: IndexError
    assert warned == [[], []], warned


def test_updates_under_no_grad_inference_mode_and_with_grad_logits_match_eager(calls):
    gen = torch.Generator().manual_seed(16)
    fused, eager = pair()
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)
    idx, logits, targets = make_batch(gen, 8)
    feed(fused, eager, (idx, logits.requires_grad_(), targets), calls, expected=True)
    with torch.no_grad():
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    with torch.inference_mode():
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)


def test_indices_given_as_lists_arrays_and_other_integer_dtypes(calls):
    gen = torch.Generator().manual_seed(17)
    fused, eager = pair()
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)
    for convert in (
        lambda i: i.tolist(),
        lambda i: i.numpy().astype(np.uint16),
        lambda i: i.to(torch.int32),
        lambda i: torch.stack([i, i], 1)[:, 1],  # strided
        lambda i: torch.stack([i, i])[1],  # a view at an offset
    ):
        idx, logits, targets = make_batch(gen, 8)
        feed(fused, eager, (convert(idx), logits, targets.to(torch.int32)), calls, expected=True)
    assert_matches(fused, eager)


def test_two_fused_collections_of_different_sizes_share_the_compiled_update(calls):
    """One process-wide compiled update: collections of another dataset size (the state's
    length is part of a kernel's kind) interleaved with one another."""
    gen = torch.Generator().manual_seed(18)
    big, big_ref = pair()
    small, small_ref = pair(n=17)
    for k in range(4):
        feed(big, big_ref, make_batch(gen, 8), calls, expected=k > 0)
        feed(small, small_ref, make_batch(gen, 8, n=17), calls, expected=k > 0)
    assert_matches(big, big_ref)
    assert_matches(small, small_ref)


def test_sequence_and_empty_batches_interleaved_with_fused_ones(calls):
    """(B, T, C) batches and empty batches take the eager path of a fused collection; the fused
    updates around them keep the same counts and steps."""
    gen = torch.Generator().manual_seed(19)
    fused, eager = pair()
    feed(fused, eager, make_batch(gen, 8), calls, expected=False)
    for k in range(3):
        feed(fused, eager, make_batch(gen, 8), calls, expected=True)
        idx = torch.randperm(N, generator=gen)[:4]
        logits = torch.randn(4, 3, C, generator=gen) * 3
        targets = torch.randint(0, C, (4, 3), generator=gen)
        targets[1, 1:] = -100
        if k == 1:
            idx[2] = idx[0]
        feed(fused, eager, (idx, logits, targets), calls, expected=False)
        if k == 2:
            broken = logits.clone()
            broken[3, 0, 0] = float("nan")
            before = states_of(fused)
            for c in (fused, eager):
                with pytest.raises(ValueError, match="NaN or inf"):
                    c.update_indexed(idx, broken, targets)
            assert_states_unchanged(before, fused)
        nothing = torch.zeros(0, dtype=torch.int64)
        empty = (nothing, torch.zeros(0, C), nothing)
        feed(fused, eager, empty, calls, expected=False)
    feed(fused, eager, make_batch(gen, 8), calls, expected=True)
    assert_matches(fused, eager)
