"""ScorerCollection: one read of the batch, shared statistics, the same bits as separate scorers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from buffers import LiveBuffers
from conftest import all_logit_scorers, assert_same_state, snapshot
from sampleweights.scorers.rowstats import RowStats


def updates(seed, n=10, steps=6, batch=8, classes=6, nonfinite=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        idx[2] = idx[1]
        logits = torch.randn(batch, classes, generator=gen) * 4
        if nonfinite:
            logits[3, 1] = float("nan")
        out.append((idx, logits, torch.randint(0, classes, (batch,), generator=gen)))
    return out


def states(scorers):
    return {s.name: copy.deepcopy(s.state_dict()["state"]) for s in scorers}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert_bitwise_equal(a[name], b[name])
        else:
            assert a[name].dtype == b[name].dtype, name
            assert torch.equal(a[name].nan_to_num(7.0), b[name].nan_to_num(7.0)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_collection_equals_separate_scorers_bit_for_bit(dtype, nonfinite):
    n = 10
    kw = {"nonfinite": "skip"} if nonfinite else {}
    separate = all_logit_scorers(n, **kw)
    collection = sw.ScorerCollection(*all_logit_scorers(n, **kw))
    for idx, logits, y in updates(0, n, nonfinite=nonfinite):
        logits = logits.to(dtype)
        for s in separate:
            s.update_indexed(idx, logits, y)
        collection.update_indexed(idx, logits, y)
    assert_bitwise_equal(states(separate), states(collection))
    with pytest.warns(RuntimeWarning) if nonfinite else _nothing():
        got = collection.compute()
    with pytest.warns(RuntimeWarning) if nonfinite else _nothing():
        want = {s.name: s.compute() for s in separate}
    assert_bitwise_equal(want, got)
    assert collection["datamaps"].compute_all().keys() == {
        "confidence",
        "variability",
        "correctness",
    }


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_resume_mid_run_equals_uninterrupted():
    n = 10
    history = updates(1, n, steps=8)
    straight = sw.ScorerCollection(*all_logit_scorers(n))
    for u in history:
        straight.update_indexed(*u)
    first = sw.ScorerCollection(*all_logit_scorers(n))
    for u in history[:3]:
        first.update_indexed(*u)
    saved = copy.deepcopy(first.state_dict())
    resumed = sw.ScorerCollection(*all_logit_scorers(n))
    resumed.load_state_dict(saved)
    for u in history[3:]:
        resumed.update_indexed(*u)
    assert_bitwise_equal(straight.compute(), resumed.compute())


def test_bad_batch_leaves_every_scorer_unchanged():
    n = 5
    c = sw.ScorerCollection(*all_logit_scorers(n))
    c.update_indexed([0, 1], torch.randn(2, 3), [0, 2])
    before = states(c)
    for idx, logits, y in [
        ([0, 5], torch.randn(2, 3), [0, 1]),
        ([0, 1], torch.randn(2, 3), [0, 3]),
        ([0, 1], torch.tensor([[0.0, float("inf"), 1.0], [0.0, 0.0, 0.0]]), [0, 1]),
        ([0], torch.randn(1, 1), [0]),  # AUM/Margin need 2 classes: raised before any change
    ]:
        with pytest.raises(ValueError):
            c.update_indexed(idx, logits, y)
        assert_bitwise_equal(before, states(c))


def test_mixed_policies_each_scorer_keeps_its_own():
    strict, lenient = sw.Loss(3), sw.AUM(3, nonfinite="skip")
    c = sw.ScorerCollection(strict, lenient)
    nan_row = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    with pytest.raises(ValueError, match="NaN"):  # the strict scorer rejects: nothing changes
        c.update_indexed([0, 1], nan_row, [0, 0])
    assert strict.num_updates == 0 and lenient.num_updates == 0


def test_construction_errors():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="separately"):
        sw.ScorerCollection(sw.EL2N(4), sw.GraNd(model, 4))
    with pytest.raises(TypeError, match="Expected scorers"):
        sw.ScorerCollection(sw.EL2N(4), "aum")
    with pytest.raises(ValueError, match="more than once"):
        sw.ScorerCollection(sw.EL2N(4), sw.EL2N(4, ema=0.9))
    with pytest.raises(ValueError, match="same num_examples"):
        sw.ScorerCollection(sw.EL2N(4), sw.AUM(5))
    with pytest.raises(ValueError, match="at least one"):
        sw.ScorerCollection()


def test_load_state_dict_is_all_or_nothing():
    n = 4
    c = sw.ScorerCollection(sw.Loss(n), sw.AUM(n))
    c.update_indexed([0, 1], torch.randn(2, 3), [0, 1])
    before = states(c)
    other = sw.ScorerCollection(sw.Loss(n), sw.AUM(n))
    other.update_indexed([2], torch.randn(1, 3), [2])
    bad = other.state_dict()
    bad["scorers"]["aum"]["num_examples"] = 99  # the second scorer rejects its part
    with pytest.raises(sw.StateMismatchError):
        c.load_state_dict(bad)
    assert_bitwise_equal(before, states(c))
    with pytest.raises(sw.StateMismatchError, match="ScorerCollection"):
        c.load_state_dict({"scorers": {"loss": {}}})


def test_reset_and_to():
    c = sw.ScorerCollection(*all_logit_scorers(3))
    c.update_indexed([0], torch.randn(1, 4), [1])
    c.reset()
    assert all(s.num_updates == 0 for s in c)
    assert c.to("cpu") is c and len(c) == 9 and c.keys()[0] == "el2n"


def test_score_dataset_accepts_a_collection():
    torch.manual_seed(0)
    ds = sw.WithIndex(TensorDataset(torch.randn(20, 3), torch.randint(0, 4, (20,))))
    model = torch.nn.Linear(3, 4)
    loader = DataLoader(ds, batch_size=6)
    c = sw.ScorerCollection(sw.EL2N(20), sw.AUM(20), sw.Loss(20))
    alone = sw.Loss(20)
    sw.score_dataset(model, loader, c, alone, progress=False)
    scores = c.compute()
    assert torch.equal(scores["loss"], alone.compute())
    assert all(bool(v.isfinite().all()) for v in scores.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_statistics_hold_at_most_one_batch_by_vocabulary_buffer(dtype):
    """Large vocabularies: every logit scorer's values from one RowStats, one (B, C) fp32
    buffer alive at a time."""
    batch, vocab = 4, 50_000
    logits = (torch.randn(batch, vocab) * 3).to(dtype)
    y = torch.randint(0, vocab, (batch,))
    scorers = all_logit_scorers(1)
    with LiveBuffers(logits) as counter:
        stats = RowStats(logits, y)
        values = [s._values_from(stats) for s in scorers]
    assert all(v.shape[0] == batch for v in values)
    assert counter.peak == 1


# -- one implementation of EL2N; the shared pass ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("classes", "scale"), [(1, 1.0), (2, 60.0), (10, 3.0), (1000, 30.0)])
def test_el2n_function_scorer_and_collection_agree_bit_for_bit(dtype, classes, scale):
    gen = torch.Generator().manual_seed(classes)
    logits = (torch.randn(33, classes, generator=gen) * scale).to(dtype)
    y = torch.randint(0, classes, (33,), generator=gen)
    idx = torch.arange(33)
    alone, in_collection = sw.EL2N(33), sw.EL2N(33)
    alone.update_indexed(idx, logits, y)
    others = [sw.Entropy(33), in_collection, sw.AUM(33)] if classes > 1 else [in_collection]
    sw.ScorerCollection(*others).update_indexed(idx, logits, y)
    want = sw.el2n(logits, y)
    assert torch.equal(alone.compute(), want)
    assert torch.equal(in_collection.compute(), want)
    # whatever order the statistics are read in (the entropy consumes the shared buffer)
    stats = RowStats(logits, y)
    assert stats.entropy.isfinite().all()
    assert torch.equal(stats.el2n, want)


def test_margins_and_correctness_from_the_shared_pass_equal_the_direct_ones():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 7, generator=gen) * 4
    logits[:8, 2] = logits[:8].amax(dim=1)  # exact ties with the maximum, target 2 or not
    logits[8:12] = 0.0  # all tied
    y = torch.randint(0, 7, (64,), generator=gen)
    y[:4] = 2
    direct = RowStats(logits, y, margins=False)
    want_margin = direct.target_logit - direct.other_logit  # topk
    want_correct = logits.argmax(dim=1) == y
    for margins in (True, None):
        shared = RowStats(logits, y, margins=margins)
        assert torch.equal(shared.logit_margin, want_margin)
        assert torch.equal(shared.correct, want_correct)
        assert torch.equal(shared.prob_margin, direct.prob_margin)
    assert torch.equal(direct.logit_margin, want_margin)
    assert want_correct[:12].any() and not want_correct[:12].all()  # the ties decide both ways


class _Ops(TorchDispatchMode):
    """Records the ATen ops called, and whether any ``exp`` saw ``−inf``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.exp_of_minus_inf = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in ("exp", "exp_") and bool((args[0] == -torch.inf).any()):
            self.exp_of_minus_inf = True
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("classes", [10, 1000])
def test_the_shared_pass_makes_no_arg_max_or_topk(classes):
    """On CPU an index-returning reduction (max with indices, argmax, topk) costs as much as the
    exponentials: the pass uses amax and comparisons instead, and never exponentiates −inf (a
    slow path of the vectorised exp)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, classes, generator=gen) * 3
    y = torch.randint(0, classes, (64,), generator=gen)
    scorers = [sw.EL2N(64), sw.ForgettingTracker(64), sw.Misclassified(64), sw.AUM(64)]
    scorers += [sw.DataMaps(64), sw.Loss(64), sw.Margin(64), sw.Confidence(64)]
    collection = sw.ScorerCollection(*scorers)
    for run in (
        lambda: sw.EL2N(64).update_indexed(torch.arange(64), logits, y),
        lambda: collection.update_indexed(torch.arange(64), logits, y),
    ):
        with _Ops() as ops:
            run()
        assert "max" not in ops.ops and "argmax" not in ops.ops and "topk" not in ops.ops
        assert not ops.exp_of_minus_inf


def test_exchange_rows_keep_every_bit():
    from sampleweights.scorers.collection import _from_int64_rows, _to_int64_rows

    values = [
        torch.tensor([1.5, float("nan"), -0.0, float("inf"), 1e-45]),
        torch.tensor([True, False, True, True, False]),
        torch.randn(5, 2, dtype=torch.float64),
        torch.randn(5).to(torch.bfloat16),
        torch.tensor([3, -1, 0, 2**40, 7]),
        torch.empty(0, 2),
    ]
    for v in values:
        rows = _to_int64_rows(v)
        assert all(r.dtype == torch.int64 and r.dim() == 1 for r in rows)
        back = _from_int64_rows(rows, v)
        assert back.dtype == v.dtype and back.shape == v.shape
        if v.dtype.is_floating_point:
            width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()]
            assert torch.equal(back.view(width), v.view(width))  # NaN payloads and -0.0 too
        else:
            assert torch.equal(back, v)


def test_grouping_of_a_batch_is_shared_within_one_update_only():
    from sampleweights.scorers.base import last_occurrence, one_batch

    idx = torch.tensor([3, 1, 3, 2])
    assert last_occurrence(idx) is not last_occurrence(idx)  # outside an update: never kept
    with one_batch():
        first = last_occurrence(idx)
        assert last_occurrence(idx) is first  # several scorers of one update: grouped once
        idx[0] = 0  # changed in place: grouped again
        sorted_idx, _, is_last = last_occurrence(idx)
        assert sorted_idx.tolist() == [0, 1, 2, 3] and is_last.all()
        assert last_occurrence(idx.clone()) is not last_occurrence(idx)
        with one_batch():  # nested: the outer scope's answers
            assert last_occurrence(idx)[0] is sorted_idx
    assert last_occurrence(idx)[0] is not sorted_idx  # the scope is over: forgotten
    with torch.inference_mode(), one_batch():  # no version counter: grouped every time
        made = torch.tensor([2, 2, 0])
        assert last_occurrence(made) is not last_occurrence(made)
        made[0] = 1
        assert last_occurrence(made)[0].tolist() == [0, 1, 2]
    with torch.inference_mode():
        c = sw.ScorerCollection(sw.ForgettingTracker(3), sw.Misclassified(3), sw.EL2N(3))
        c.update_indexed(made, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert c["misclassified"].compute().isfinite().all()


def test_the_distinct_answer_is_shared_within_one_update_only():
    from sampleweights.scorers.base import distinct_on_cpu, last_occurrence, one_batch

    with one_batch():
        _, _, is_last = last_occurrence(torch.tensor([4, 1, 2]))
        assert distinct_on_cpu(is_last)
        is_last[0] = False  # changed in place (the version moves): asked again
        assert not distinct_on_cpu(is_last)
        _, _, repeated = last_occurrence(torch.tensor([2, 0, 2]))
        assert not distinct_on_cpu(repeated) and distinct_on_cpu(torch.ones(3, dtype=torch.bool))
    with torch.inference_mode(), one_batch():  # no version counter: asked every time
        made = torch.ones(2, dtype=torch.bool)
        assert distinct_on_cpu(made)
        made[1] = False
        assert not distinct_on_cpu(made)
    # a repeated index after a distinct batch of the same length: the grouped (exact) path
    c = sw.ScorerCollection(sw.ForgettingTracker(3), sw.DataMaps(3), sw.Misclassified(3))
    alone = [sw.ForgettingTracker(3), sw.DataMaps(3), sw.Misclassified(3)]
    gen = torch.Generator().manual_seed(0)
    for idx in ([0, 1, 2], [1, 1, 0], [2, 0, 1], [2, 2, 2]):
        logits, y = torch.randn(3, 4, generator=gen), torch.randint(0, 4, (3,), generator=gen)
        c.update_indexed(torch.tensor(idx), logits, y)
        for s in alone:
            s.update_indexed(torch.tensor(idx), logits, y)
    for s in alone:
        torch.testing.assert_close(c[s.name].compute(), s.compute(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("in_collection", [False, True])
def test_an_index_buffer_refilled_through_numpy_is_grouped_afresh(in_collection):
    """Before: the grouping of a batch's indices was kept across updates, keyed on the tensor
    and its version; a loop that refills one index tensor through ``.numpy()`` (no version bump)
    got the previous batch's grouping: a forgetting event lost, a data-map mean wrong."""
    buf = np.array([0, 1, 2], dtype=np.int64)
    idx = torch.from_numpy(buf)
    y = torch.zeros(3, dtype=torch.int64)
    right, wrong = (
        torch.tensor([[5.0, 0.0]] * 3),
        torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]),
    )
    kinds = (sw.ForgettingTracker, sw.DataMaps, sw.Misclassified)
    got = [k(4) for k in kinds]
    want = [k(4) for k in kinds]
    updates = (
        [sw.ScorerCollection(*got).update_indexed]
        if in_collection
        else [s.update_indexed for s in got]
    )
    batches = (([0, 1, 2], right), ([3, 3, 1], wrong))
    for batch, logits in batches:
        buf[:] = batch  # the same tensor object, refilled in place
        for update in updates:
            update(idx, logits, y)
    for batch, logits in batches:  # after: nothing in between the refills above
        for s in want:
            s.update_indexed(torch.tensor(batch), logits, y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.compute(), w.compute(), rtol=0, atol=0, equal_nan=True)
    assert float(want[0].compute()[3]) == 1.0  # example 3: right, then wrong in one batch


# -- the opt-in compiled statistics (ScorerCollection(..., compile=True)) ------------------------


def _compile_works() -> bool:
    try:
        import torch._dynamo
    except Exception:  # pragma: no cover - a torch build without dynamo
        return False
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


def test_a_collection_compiles_nothing_unless_asked(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called without compile=True")

    monkeypatch.setattr(torch, "compile", refuse)
    c = sw.ScorerCollection(*all_logit_scorers(10))
    for idx, logits, targets in updates(0):
        c.update_indexed(idx, logits, targets)
    assert c._fused is None


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match=r"`compile` to be True or False.*got str"):
        sw.ScorerCollection(sw.EL2N(3), compile="yes")


def test_a_failing_compiler_falls_back_to_the_eager_statistics_with_a_warning():
    class Broken:
        def __call__(self, *args):
            raise RuntimeError("no C++ compiler")

    eager = sw.ScorerCollection(*all_logit_scorers(10))
    broken = sw.ScorerCollection(*all_logit_scorers(10))
    broken._fused = Broken()  # stands for a compiled pass whose compilation fails
    batches = updates(1)
    with pytest.warns(RuntimeWarning, match="compile of the statistics failed.*no C\\+\\+"):
        broken.update_indexed(*batches[0])
    eager.update_indexed(*batches[0])
    for batch in batches[1:]:  # warned once, then eager for good
        broken.update_indexed(*batch)
        eager.update_indexed(*batch)
    assert broken._fused is None
    for name, scores in eager.compute().items():
        torch.testing.assert_close(broken.compute()[name], scores, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_compiled_statistics_agree_with_the_eager_ones(monkeypatch):
    """Correctness and the margins are the eager bits; the sums of exponentials round in the
    compiler's order: ≤ 1e-5 relative (a few fp32 ulps of a sum over the classes)."""
    from sampleweights.scorers import collection as module

    # one static-shape kernel, then the dynamic-shape one: both paths in two compilations
    monkeypatch.setattr(module, "_STATIC_SHAPES", 1)
    monkeypatch.setattr(module, "_COMPILED", [])
    eager = sw.ScorerCollection(*all_logit_scorers(40))
    compiled = sw.ScorerCollection(*all_logit_scorers(40), compile=True)
    gen = torch.Generator().manual_seed(3)
    for batch in (16, 16, 9, 23, 16):  # changing batch sizes
        idx = torch.randint(0, 40, (batch,), generator=gen)
        logits = torch.randn(batch, 7, generator=gen) * 6
        logits[0, 3] = logits[0, 5] = logits[0].max() + 1  # an exact tie for the maximum
        targets = torch.randint(0, 7, (batch,), generator=gen)
        targets[0] = 5
        eager.update_indexed(idx, logits, targets)
        compiled.update_indexed(idx, logits, targets)
    assert compiled._fused is not None  # no fallback
    assert len(compiled._fused.kinds) == 1  # the batches of 9 and 23 took the dynamic kernel
    want, got = eager.compute(), compiled.compute()
    for name in ("forgetting", "misclassified", "aum"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("make", [sw.DataMaps, sw.ForgettingTracker, sw.Misclassified])
def test_batches_without_repeated_indices_scatter_the_same_bits_as_grouped_ones(make):
    """A batch whose indices are distinct takes a shorter scatter on CPU; the same rows plus two
    rows for the trash slot (a repeat: the grouped scatter) must leave the same state."""
    n = 12
    fast, grouped = make(n), make(n)
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 9):
        idx = torch.randperm(n, generator=gen)[:7]
        if make is sw.DataMaps:
            values = torch.stack(
                [torch.rand(7, generator=gen), (torch.rand(7, generator=gen) > 0.5).float()], 1
            )
        else:
            values = torch.rand(7, generator=gen) > 0.4
        trash = torch.tensor([n, n])
        fast._scatter(idx, values, step)
        grouped._scatter(torch.cat([idx, trash]), torch.cat([values, values[:2]]), step)
    for name, state in fast._state.items():
        other = grouped._state[name]
        assert torch.equal(state[:n].view(-1), other[:n].view(-1)), name
        if state.is_floating_point():  # bit for bit, signed zeros included
            assert torch.equal(state[:n].view(torch.int64), other[:n].view(torch.int64)), name


# -- the fused update: statistics, values and every state update in one compiled call ----------


def _fusable_scorers(n: int, **kw) -> list[sw.Scorer]:
    return all_logit_scorers(n, confidence_ema=None, **kw)


def _distinct_updates(seed: int, n: int = 30, sizes=(8, 8, 5, 8, 1, 8), classes: int = 6):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        idx = torch.randperm(n, generator=gen)[:size]
        logits = torch.randn(size, classes, generator=gen) * 4
        out.append((idx, logits, torch.randint(0, classes, (size,), generator=gen)))
    return out


class _CountingUpdate:
    """Wraps a collection's compiled update and counts the calls that reached it."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


def _assert_same_scores(fused, eager, *, rtol=1e-5, atol=1e-6):
    for s, e in zip(fused, eager, strict=True):
        assert s.num_updates == e.num_updates and s.num_runs == e.num_runs, s.name
        for key, state in e.state_dict()["state"].items():
            got = s.state_dict()["state"][key]
            if state.is_floating_point():  # the compiled statistics round in another order
                torch.testing.assert_close(got, state, rtol=rtol, atol=atol, msg=key)
            else:  # counts, flags and steps: the same integers
                assert torch.equal(got, state), f"{s.name}.{key}"


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_a_fused_update_is_one_compiled_call_with_the_eager_scores():
    """Every update after a scorer's first (which places its state) is one compiled call;
    repeated indices, a new run's first update and a changed batch size take or keep the
    eager path, interleaved, with the same states."""
    eager = sw.ScorerCollection(*_fusable_scorers(30))
    fused = sw.ScorerCollection(*_fusable_scorers(30), compile=True)
    assert fused._whole is not None
    counter = fused._whole = _CountingUpdate(fused._whole)
    batches = _distinct_updates(0)
    for k, batch in enumerate(batches):
        eager.update_indexed(*batch)
        fused.update_indexed(*batch)
        if k == 2:  # repeated indices: the eager path
            idx, logits, targets = _distinct_updates(9, sizes=(6,))[0]
            idx[3] = idx[0]
            eager.update_indexed(idx, logits, targets)
            fused.update_indexed(idx, logits, targets)
    assert counter.calls == len(batches) - 1  # all but the very first
    eager.new_run()
    fused.new_run()
    for batch in _distinct_updates(1):
        eager.update_indexed(*batch)
        fused.update_indexed(*batch)
    assert counter.calls == 2 * len(batches) - 2  # a run's first update is eager (_begin_run)
    _assert_same_scores(fused, eager)
    want, got = eager.compute(), fused.compute()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_a_fused_update_refuses_non_finite_logits_and_changes_nothing():
    fused = sw.ScorerCollection(*_fusable_scorers(30), compile=True)
    eager = sw.ScorerCollection(*_fusable_scorers(30))
    batches = _distinct_updates(2)
    for batch in batches[:2]:
        fused.update_indexed(*batch)
        eager.update_indexed(*batch)
    before = {s.name: snapshot(s) for s in fused}
    idx, logits, targets = batches[2]
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match=r"NaN or inf in 1 of 5 rows"):
            fused.update_indexed(idx, broken, targets)
        for s in fused:
            assert_same_state(before[s.name], snapshot(s))
    for batch in batches[2:]:
        fused.update_indexed(*batch)
        eager.update_indexed(*batch)
    _assert_same_scores(fused, eager)


def _subclass_el2n(n):
    class Doubled(sw.EL2N):
        name = "doubled"

        def _values_from(self, stats):
            return 2 * stats.el2n

    return Doubled(n)


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
@pytest.mark.parametrize(
    "extra",
    [
        lambda n: sw.Confidence(n, ema=0.5),
        lambda n: sw.Loss(n, nonfinite="skip"),
        lambda n: sw.Loss(n, validate=False),
        _subclass_el2n,
    ],
    ids=["ema", "nonfinite-skip", "validate-false", "subclass"],
)
def test_collections_with_a_scorer_that_cannot_be_fused_stay_eager(extra):
    scorers = [sw.AUM(20), sw.Misclassified(20), extra(20)]
    fused = sw.ScorerCollection(*scorers, compile=True)
    assert fused._whole is None  # the shared statistics alone are compiled
    eager = sw.ScorerCollection(sw.AUM(20), sw.Misclassified(20), extra(20))
    for batch in _distinct_updates(3, n=20):
        fused.update_indexed(*batch)
        eager.update_indexed(*batch)
    _assert_same_scores(fused, eager)


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_a_scorer_updated_on_its_own_keeps_its_own_step_in_a_fused_update():
    """Misclassified records each example's update number: scorers of one fused call may be
    at different counts (one updated alone in between), and each keeps its own."""
    wrong, aum = sw.Misclassified(30), sw.AUM(30)
    fused = sw.ScorerCollection(wrong, aum, compile=True)
    ref_wrong, ref_aum = sw.Misclassified(30), sw.AUM(30)
    batches = _distinct_updates(4)
    for k, batch in enumerate(batches):
        fused.update_indexed(*batch)
        ref_wrong.update_indexed(*batch)
        ref_aum.update_indexed(*batch)
        if k == 1:
            wrong.update_indexed(*batches[0])
            ref_wrong.update_indexed(*batches[0])
    assert wrong.num_updates == len(batches) + 1 and aum.num_updates == len(batches)
    assert torch.equal(wrong.state_dict()["state"]["step"], ref_wrong.state_dict()["state"]["step"])
    torch.testing.assert_close(wrong.compute(), ref_wrong.compute(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(aum.compute(), ref_aum.compute(), equal_nan=True)


def test_a_failing_whole_update_compiler_falls_back_with_a_warning():
    from torch._dynamo.exc import InternalTorchDynamoError

    class Broken:  # stands for a compilation that fails (dynamo raises before running anything)
        def __call__(self, *args):
            raise InternalTorchDynamoError("no C++ compiler")

    eager = sw.ScorerCollection(*_fusable_scorers(30))
    broken = sw.ScorerCollection(*_fusable_scorers(30))
    broken._whole, broken._steps_numpy = Broken(), np.zeros(9, dtype=np.int64)
    broken._steps = torch.from_numpy(broken._steps_numpy)
    batches = _distinct_updates(5)
    broken.update_indexed(*batches[0])  # the first update places the states: eager
    eager.update_indexed(*batches[0])
    with pytest.warns(RuntimeWarning, match="compile of the whole update failed.*no C\\+\\+"):
        broken.update_indexed(*batches[1])
    eager.update_indexed(*batches[1])
    for batch in batches[2:]:  # warned once, then eager for good
        broken.update_indexed(*batch)
        eager.update_indexed(*batch)
    assert broken._whole is None
    _assert_same_scores(broken, eager, rtol=0, atol=0)


def test_an_error_from_running_the_whole_update_is_raised_not_retried_eagerly():
    """Only a compile error falls back: an error from running the compiled update may come after
    some of its writes, and applying the batch again eagerly would count it twice."""

    class FailsWhileRunning:
        def __call__(self, *args):
            raise RuntimeError("out of memory")

    c = sw.ScorerCollection(*_fusable_scorers(30))
    c._whole, c._steps_numpy = FailsWhileRunning(), np.zeros(9, dtype=np.int64)
    c._steps = torch.from_numpy(c._steps_numpy)
    batches = _distinct_updates(6)
    c.update_indexed(*batches[0])
    with pytest.raises(RuntimeError, match="out of memory"):
        c.update_indexed(*batches[1])
    assert all(s.num_updates == 1 for s in c)  # not counted, and not applied eagerly


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_a_method_replaced_on_one_scorer_keeps_its_collection_eager():
    """The fused call reads each scorer's class: a ``_values_from`` set on the instance must
    send the update down the eager path, which honours it."""
    doubled = sw.EL2N(30)
    doubled._values_from = lambda stats: 2 * stats.el2n  # type: ignore[method-assign]
    fused = sw.ScorerCollection(doubled, sw.AUM(30), compile=True)
    counter = fused._whole = _CountingUpdate(fused._whole)
    plain = sw.EL2N(30)
    for batch in _distinct_updates(7):
        fused.update_indexed(*batch)
        plain.update_indexed(*batch)
    assert counter.calls == 0
    torch.testing.assert_close(doubled.compute(), 2 * plain.compute(), equal_nan=True)


@pytest.mark.skipif(not _compile_works(), reason="torch.compile is unavailable here")
def test_a_spent_recompile_limit_falls_back_to_eager_with_a_warning(monkeypatch):
    """Dynamo's recompile limit is per function and process-wide: a process with many
    differently composed collections can spend it. Under fullgraph that is an error raised
    before anything runs; the collection must take it as a failed compilation (warn, then
    eager, same scores), not raise it from update()."""
    import torch._dynamo

    from sampleweights.scorers import fused as fused_module

    torch._dynamo.reset()  # this test's own budget, whatever ran before
    monkeypatch.setattr(fused_module, "_COMPILED", [])  # a fresh one: static-shape kernels
    with torch._dynamo.config.patch(recompile_limit=1):
        _spend_the_recompile_limit()
    torch._dynamo.reset()  # the next tests compile afresh


def _spend_the_recompile_limit():
    first = sw.ScorerCollection(*_fusable_scorers(30), compile=True)
    for batch in _distinct_updates(8, sizes=(8, 8, 8)):
        first.update_indexed(*batch)  # the one compilation the limit allows
    # the same scorers for another dataset size: the state's length changes, a recompilation
    other = sw.ScorerCollection(*_fusable_scorers(31), compile=True)
    eager = sw.ScorerCollection(*_fusable_scorers(31))
    batches = _distinct_updates(9, n=31, sizes=(8, 8, 8, 8))
    other.update_indexed(*batches[0])
    eager.update_indexed(*batches[0])
    with pytest.warns(RuntimeWarning, match="compile of the whole update failed"):
        other.update_indexed(*batches[1])  # another kind of call: a recompilation, refused
    eager.update_indexed(*batches[1])
    for batch in batches[2:]:
        other.update_indexed(*batch)
        eager.update_indexed(*batch)
    assert other._whole is None
    _assert_same_scores(other, eager)  # the first update used the compiled statistics
