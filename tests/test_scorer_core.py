"""The Scorer base: validation before mutation, persistence, devices, the non-finite policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sampleweights as sw
from conftest import assert_same_state, snapshot


def warmed(cls, n=6):
    s = cls(n)
    s.update_indexed(torch.tensor([0, 1, 2]), torch.randn(3, 4), torch.tensor([0, 1, 3]))
    return s


BAD_INPUTS = [
    # (indices, logits, targets, error, message fragment)
    (torch.tensor([0, 6]), torch.zeros(2, 4), torch.tensor([0, 1]), ValueError, r"\[0, 6\)"),
    (torch.tensor([-1, 0]), torch.zeros(2, 4), torch.tensor([0, 1]), ValueError, "indices"),
    (torch.tensor([0, 1, 2]), torch.zeros(2, 4), torch.tensor([0, 1]), ValueError, "3 indices"),
    (torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([0]), ValueError, "1 targets"),
    (torch.tensor([0, 1]), torch.zeros(2, 4, 1), torch.tensor([0, 1]), ValueError, "shape"),
    (torch.tensor([0, 1]), torch.zeros(4), torch.tensor([0, 1]), ValueError, "shape"),
    (torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([0, 4]), ValueError, r"\[0, 4\)"),
    (torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([-1, 0]), ValueError, "targets"),
    (
        torch.tensor([0, 1]),
        torch.tensor([[0.0, math.nan, 0, 0], [0.0] * 4]),
        torch.tensor([0, 1]),
        ValueError,
        "nonfinite='skip'",
    ),
    (
        torch.tensor([0, 1]),
        torch.tensor([[0.0, math.inf, 0, 0], [0.0] * 4]),
        torch.tensor([0, 1]),
        ValueError,
        "NaN or inf",
    ),
    (
        torch.tensor([0, 1]),
        torch.zeros(2, 4, dtype=torch.int64),
        torch.tensor([0, 1]),
        TypeError,
        "float dtype",
    ),
    (torch.tensor([0.0, 1.0]), torch.zeros(2, 4), torch.tensor([0, 1]), TypeError, "integer"),
    (torch.tensor([0, 1]), torch.zeros(2, 4), torch.tensor([0.0, 1.0]), TypeError, "targets"),
    (torch.tensor([[0, 1]]), torch.zeros(2, 4), torch.tensor([0, 1]), ValueError, "1-D"),
    ("0,1", torch.zeros(2, 4), torch.tensor([0, 1]), TypeError, "indices"),
]


@pytest.mark.parametrize(("indices", "logits", "targets", "error", "match"), BAD_INPUTS)
def test_bad_input_is_rejected_and_changes_nothing(
    scorer_cls, indices, logits, targets, error, match
):
    s = warmed(scorer_cls)
    before = snapshot(s)
    with pytest.raises(error, match=match):
        s.update_indexed(indices, logits, targets)
    assert_same_state(before, snapshot(s))


def test_batch_without_index_tells_the_user_to_wrap(scorer_cls):
    s = warmed(scorer_cls)
    before = snapshot(s)
    with pytest.raises(ValueError, match="WithIndex"):
        s.update(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="WithIndex"):
        s.update({"x": torch.zeros(2), "label": torch.tensor([0, 1])}, torch.zeros(2, 4))
    assert_same_state(before, snapshot(s))


def test_lists_and_numpy_indices_are_accepted(scorer_cls):
    a, b = scorer_cls(4), scorer_cls(4)
    logits = torch.randn(2, 3)
    a.update_indexed([1, 3], logits, np.array([0, 2]))
    b.update_indexed(torch.tensor([1, 3]), logits, torch.tensor([0, 2]))
    torch.testing.assert_close(a.compute(), b.compute(), equal_nan=True)


def test_state_dict_round_trip(scorer_cls):
    s = warmed(scorer_cls)
    s.update_indexed(torch.tensor([2, 5]), torch.randn(2, 4), torch.tensor([3, 3]))
    fresh = scorer_cls(6)
    fresh.load_state_dict(s.state_dict())
    torch.testing.assert_close(fresh.compute(), s.compute(), equal_nan=True)
    assert fresh.num_updates == s.num_updates == 2
    # continuing after a restore gives the same result as never stopping
    logits, y = torch.randn(3, 4), torch.tensor([1, 1, 0])
    s.update_indexed(torch.tensor([0, 2, 4]), logits, y)
    fresh.update_indexed(torch.tensor([0, 2, 4]), logits, y)
    torch.testing.assert_close(fresh.compute(), s.compute(), equal_nan=True)


def test_state_dict_is_a_copy(scorer_cls):
    s = warmed(scorer_cls)
    sd = s.state_dict()
    s.reset()
    assert any(bool((t != 0).any()) for t in sd["state"].values())


def test_load_state_for_another_size_names_both_sizes(scorer_cls):
    s = warmed(scorer_cls, n=6)
    other = warmed(scorer_cls, n=9)
    before = snapshot(other)
    with pytest.raises(sw.StateMismatchError, match=r"num_examples=6.*num_examples=9"):
        other.load_state_dict(s.state_dict())
    assert_same_state(before, snapshot(other))


def test_load_state_of_another_scorer_is_rejected():
    el2n, forget = warmed(sw.EL2N), warmed(sw.ForgettingTracker)
    before = snapshot(forget)
    with pytest.raises(sw.StateMismatchError, match="el2n"):
        forget.load_state_dict(el2n.state_dict())
    sd = el2n.state_dict()
    del sd["state"]["count"]
    with pytest.raises(sw.StateMismatchError, match="count"):
        sw.EL2N(6).load_state_dict(sd)
    assert_same_state(before, snapshot(forget))


def test_reset(scorer_cls):
    s = warmed(scorer_cls)
    s.reset()
    assert s.num_updates == 0
    assert torch.isnan(s.compute()).all()


def test_nonfinite_skip_drops_rows_and_reports(scorer_cls):
    s = scorer_cls(4, nonfinite="skip")
    ref = scorer_cls(4)
    logits = torch.tensor([[1.0, 0.0], [math.nan, 0.0], [0.0, math.inf], [0.0, 1.0]])
    s.update_indexed(torch.tensor([0, 1, 2, 3]), logits, torch.tensor([0, 0, 1, 0]))
    ref.update_indexed(torch.tensor([0, 3]), logits[[0, 3]], torch.tensor([0, 0]))
    assert s.num_skipped == 2
    with pytest.warns(RuntimeWarning, match="2 presentation"):
        got = s.compute()
    torch.testing.assert_close(got, ref.compute(), equal_nan=True)
    assert torch.isnan(got[1:3]).all()


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="num_examples"):
        sw.EL2N(10.0)
    with pytest.raises(TypeError, match="num_examples"):
        sw.EL2N(True)
    with pytest.raises(ValueError, match="num_examples"):
        sw.EL2N(0)
    with pytest.raises(ValueError, match="nonfinite"):
        sw.EL2N(3, nonfinite="ignore")
    with pytest.raises(TypeError, match="layout"):
        sw.EL2N(3, layout={"index_pos": 0})


def test_state_follows_first_update_and_to(scorer_cls):
    s = scorer_cls(3)
    s.update_indexed(torch.tensor([0]), torch.randn(1, 2, dtype=torch.float64), torch.tensor([1]))
    assert s.device == torch.device("cpu")
    s.to("meta")
    assert all(t.device.type == "meta" for t in s._state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_lives_on_the_device_of_updates(scorer_cls):
    s = scorer_cls(5)
    logits = torch.randn(3, 4, device="cuda", dtype=torch.float16)
    s.update_indexed(torch.tensor([0, 1, 1]), logits, torch.tensor([0, 1, 2]))
    assert s.device.type == "cuda"
    ref = scorer_cls(5)
    ref.update_indexed(torch.tensor([0, 1, 1]), logits.cpu(), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(s.compute().cpu(), ref.compute(), equal_nan=True)


def test_bytes_per_example_are_documented_figures():
    assert sw.EL2N(1).state_bytes_per_example == 12
    assert sw.ForgettingTracker(1).state_bytes_per_example == 18
    assert sw.Misclassified(1).state_bytes_per_example == 5


def test_update_reads_tuple_and_dict_batches(scorer_cls):
    a, b = scorer_cls(5), scorer_cls(5)
    logits = torch.randn(3, 4)
    a.update((torch.zeros(3, 2), torch.tensor([0, 3, 1]), torch.tensor([4, 0, 2])), logits)
    b.update(
        {
            "pixel_values": torch.zeros(3, 2),
            "labels": torch.tensor([0, 3, 1]),
            "index": torch.tensor([4, 0, 2]),
        },
        logits,
    )
    torch.testing.assert_close(a.compute(), b.compute(), equal_nan=True)
    assert a.compute().isnan().sum() == 2


def test_validate_false_skips_the_range_checks_only(scorer_cls, monkeypatch):
    import sampleweights.scorers.base as base

    idx, logits, y = torch.tensor([0, 2, 2]), torch.randn(3, 4), torch.tensor([1, 3, 0])
    checked, trusting = scorer_cls(5), scorer_cls(5, validate=False)
    checked.update_indexed(idx, logits, y)
    calls = []
    monkeypatch.setattr(base, "check_range", lambda *a: calls.append(a))
    trusting.update_indexed(idx, logits, y)
    assert calls == []  # no range check, so no host sync for CUDA indices or targets
    torch.testing.assert_close(trusting.compute(), checked.compute(), equal_nan=True)
    with pytest.raises(ValueError, match="shape"):  # shape checks stay: they are free
        trusting.update_indexed(idx, torch.randn(3), y)


class _Staged:
    """Stands in for a pinned device→host copy in flight (the CUDA path, HostStaging)."""

    def __init__(self, indices, values, step):
        self.args = (indices, values, None, step)

    def wait(self):
        return self.args


def test_a_batch_in_flight_is_applied_before_results_and_dropped_on_reset_or_load():
    s, ref = sw.Misclassified(4), sw.Misclassified(4)
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    s.update_indexed(torch.tensor([2]), right, torch.tensor([0]))
    ref.update_indexed(torch.tensor([2]), right, torch.tensor([0]))
    ref.update_indexed(torch.tensor([2]), wrong, torch.tensor([0]))
    # update 2 of example 2 (wrong) still on its way to host memory
    s._staging = _Staged(torch.tensor([2]), torch.tensor([True]), step=2)
    s.num_updates = 2
    assert torch.equal(s.state_dict()["state"]["step"], ref.state_dict()["state"]["step"])
    torch.testing.assert_close(s.compute(), ref.compute(), equal_nan=True)
    s._staging = _Staged(torch.tensor([0]), torch.tensor([True]), step=3)
    s.load_state_dict(ref.state_dict())  # the in-flight batch belonged to the replaced state
    torch.testing.assert_close(s.compute(), ref.compute(), equal_nan=True)
    s._staging = _Staged(torch.tensor([0]), torch.tensor([True]), step=3)
    s.reset()
    assert s.compute().isnan().all()


BAD_STATES = [
    # (change to a valid state_dict, message fragment)
    (lambda sd: sd["state"].__setitem__("count", -sd["state"]["count"] - 1), "negative"),
    (lambda sd: sd["state"].__setitem__("count", sd["state"]["count"].double()), "dtype"),
    (lambda sd: sd.__setitem__("num_updates", 1.0), "num_updates"),
    (lambda sd: sd.__setitem__("num_updates", True), "num_updates"),
    (lambda sd: sd.__setitem__("num_updates", -1), "num_updates"),
    (lambda sd: sd.__setitem__("num_skipped", torch.tensor(-2)), "num_skipped"),
    (lambda sd: sd.__setitem__("run_updates", 9), "run_updates"),
    (lambda sd: sd.__setitem__("num_runs", 0), "num_runs"),
    (lambda sd: sd.update(world_size=2, rank=1), "rank 1 of a process group of 2"),
    (lambda sd: sd.update(world_size="2"), "world_size"),
]


@pytest.mark.parametrize(("corrupt", "match"), BAD_STATES)
def test_load_state_dict_validates_everything_before_changing_anything(corrupt, match):
    source = sw.EL2N(6)
    source.update_indexed([0, 1, 2], torch.randn(3, 4), [0, 1, 3])
    sd = source.state_dict()
    corrupt(sd)
    target = warmed(sw.EL2N)
    before = snapshot(target)
    with pytest.raises(sw.StateMismatchError, match=match):
        target.load_state_dict(sd)
    assert_same_state(snapshot(target), before)


def test_forgetting_and_misclassified_states_are_checked_for_consistency():
    t = warmed(sw.ForgettingTracker)
    sd = t.state_dict()
    sd["state"]["runs_unlearned"][0] = 1  # unlearned in a run it never saw
    with pytest.raises(sw.StateMismatchError, match="runs_unlearned"):
        sw.ForgettingTracker(6).load_state_dict(sd)
    m = warmed(sw.Misclassified)
    sd = m.state_dict()
    sd["state"]["step"][0] = 5
    with pytest.raises(sw.StateMismatchError, match="num_updates=1"):
        sw.Misclassified(6).load_state_dict(sd)
    # replicated state (forgetting) is the same on every rank: any rank may load it
    sd = t.state_dict()
    sd.update(world_size=2, rank=1)
    sw.ForgettingTracker(6).load_state_dict(sd)


def test_new_run_round_trips_through_state_dict_and_reset(scorer_cls):
    s = warmed(scorer_cls)
    s.new_run()
    s.update_indexed([3], torch.randn(1, 4), [1])
    sd = s.state_dict()
    assert (sd["num_runs"], sd["run_updates"], sd["num_updates"]) == (2, 1, 2)
    t = scorer_cls(6)
    t.load_state_dict(sd)
    assert t.num_runs == 2
    torch.testing.assert_close(t.compute(), s.compute(), equal_nan=True)
    assert torch.equal(t.compute(local=True).nan_to_num(-1), s.compute().nan_to_num(-1))
    t.reset()
    assert t.num_runs == 0 and t.state_dict()["run_updates"] == 0


# -- probabilities passed as logits ----------------------------------------------------------------
@pytest.mark.parametrize("cls", [sw.EL2N, sw.Misclassified, sw.ForgettingTracker])
def test_probabilities_for_logits_warn_once_per_scorer(cls):
    import warnings

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    idx, y = torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1])
    s = cls(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.update_indexed(idx, logits, y)  # raw logits: silent
    with pytest.warns(RuntimeWarning, match=rf"{cls.__name__}.*probabilities.*before softmax"):
        s.update_indexed(idx, logits.softmax(1), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.update_indexed(idx, logits.softmax(1), y)  # once per scorer
        cls(6).update_indexed(idx, logits.log_softmax(1), y)  # log-probabilities are logits
    assert s.num_updates == 3


def test_probability_check_runs_only_with_validate(monkeypatch):
    import warnings

    import sampleweights.scorers.base as base

    calls = []

    def spy(logits):
        calls.append(logits.shape)
        return False

    monkeypatch.setattr(base, "looks_like_probabilities", spy)
    probs = torch.full((3, 2), 0.5)
    trusting = sw.EL2N(3, validate=False, nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trusting.update_indexed(torch.arange(3), probs, torch.zeros(3, dtype=torch.int64))
    assert calls == []  # no check, so no host sync on CUDA
    sw.EL2N(3).update_indexed(torch.arange(3), probs, torch.zeros(3, dtype=torch.int64))
    assert calls == [(3, 2)]
