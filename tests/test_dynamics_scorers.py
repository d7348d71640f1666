"""AUM, data maps, loss / margin / entropy / confidence and the EMA reduction, each against a
plain float64 reference that replays a presentation history (duplicates, resume mid-run)."""

from __future__ import annotations

import copy
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

import sampleweights as sw
from sampleweights.scorers.rowstats import RowStats

# -- float64 references -----------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _other_max(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    masked = a.copy()
    masked[np.arange(len(y)), y] = -np.inf
    return masked.max(axis=1)


def ref_values(name: str, logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One value per row, textbook formulas in float64."""
    z = logits.astype(np.float64)
    p = _softmax(z)
    rows = np.arange(len(y))
    if name == "loss":
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[rows, y]
    if name == "margin":
        return p[rows, y] - _other_max(p, y)
    if name == "entropy":
        return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    if name in ("confidence", "datamaps"):
        return p[rows, y]
    if name == "aum":
        return z[rows, y] - _other_max(z, y)
    if name == "el2n":
        return np.linalg.norm(p - np.eye(z.shape[1])[y], axis=1)
    raise KeyError(name)


FACTORIES = {
    "loss": sw.Loss,
    "margin": sw.Margin,
    "entropy": sw.Entropy,
    "confidence": sw.Confidence,
    "aum": sw.AUM,
    "el2n": sw.EL2N,
}
MEAN_NAMES = sorted(FACTORIES)


def history(seed: int, n: int = 12, steps: int = 6, batch: int = 9, classes: int = 5):
    """Random updates: indices with in-batch duplicates, logits at several scales."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        idx[1] = idx[0]  # always at least one duplicate
        scale = [0.3, 3.0, 20.0][int(torch.randint(0, 3, (1,), generator=gen))]
        logits = torch.randn(batch, classes, generator=gen) * scale
        y = torch.randint(0, classes, (batch,), generator=gen)
        out.append((idx, logits, y))
    return out


def replay(make, updates, resume_at=None):
    """Feed ``updates``; at ``resume_at`` move the state into a fresh scorer (a restart)."""
    s = make()
    for k, (idx, logits, y) in enumerate(updates):
        if k == resume_at:
            saved = copy.deepcopy(s.state_dict())
            s = make()
            s.load_state_dict(saved)
        s.update_indexed(idx, logits, y)
    return s


def ref_presentations(name, updates, n):
    """Per example, its values in presentation order (batch order within an update)."""
    seqs: list[list[float]] = [[] for _ in range(n)]
    for idx, logits, y in updates:
        values = ref_values(name, logits.double().numpy(), y.numpy())
        for i, v in zip(idx.tolist(), values.tolist(), strict=True):
            seqs[i].append(v)
    return seqs


# -- running means --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEAN_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_running_mean_matches_float64_reference_with_duplicates_and_resume(name, seed):
    n = 12
    updates = history(seed, n)
    got = replay(lambda: FACTORIES[name](n), updates, resume_at=3).compute().numpy()
    seqs = ref_presentations(name, updates, n)
    want = np.array([np.mean(s) if s else np.nan for s in seqs])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", MEAN_NAMES)
@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_ema_matches_float64_reference_with_duplicates_and_resume(name, decay):
    n = 12
    updates = history(7, n, steps=8)
    got = replay(lambda: FACTORIES[name](n, ema=decay), updates, resume_at=5).compute().numpy()
    want = []
    for seq in ref_presentations(name, updates, n):
        if not seq:
            want.append(np.nan)
            continue
        num = den = 0.0
        for v in seq:  # m_k = β m_{k−1} + v, w_k = β w_{k−1} + 1: bias-corrected EMA
            num, den = decay * num + v, decay * den + 1.0
        want.append(num / den)
    np.testing.assert_allclose(got, np.array(want), rtol=2e-5, atol=1e-6)


def test_ema_first_presentation_is_the_value_and_newest_weighs_most():
    s = sw.Confidence(1, ema=0.5)
    half = torch.zeros(1, 2)  # p_y = 0.5
    sure = torch.tensor([[30.0, -30.0]])  # p_y = 1
    s.update_indexed([0], half, [0])
    assert s.compute().item() == pytest.approx(0.5)  # no bias towards 0
    s.update_indexed([0], sure, [0])
    # weights 0.5 (old) and 1 (new): (0.5·0.5 + 1·1) / 1.5
    assert s.compute().item() == pytest.approx(1.25 / 1.5)
    # the same two presentations as duplicates of one update: the same average
    d = sw.Confidence(1, ema=0.5)
    d.update_indexed([0, 0], torch.cat([half, sure]), [0, 0])
    assert torch.equal(d.compute(), s.compute())


@pytest.mark.parametrize("ema", [0.0, 1.0, -0.5, 2])
def test_ema_out_of_range_is_a_value_error(ema):
    with pytest.raises(ValueError, match="`ema`"):
        sw.Loss(3, ema=ema)


@pytest.mark.parametrize("ema", [True, "0.9"])
def test_ema_of_wrong_type_is_a_type_error(ema):
    with pytest.raises(TypeError, match="`ema`"):
        sw.Loss(3, ema=ema)


def test_ema_and_mean_states_do_not_mix():
    mean, ema = sw.Loss(3), sw.Loss(3, ema=0.9)
    mean.update_indexed([0], torch.zeros(1, 2), [0])
    with pytest.raises(sw.StateMismatchError):
        ema.load_state_dict(mean.state_dict())
    assert ema.state_bytes_per_example == 16 and mean.state_bytes_per_example == 12


# -- data maps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_datamaps_match_float64_reference(seed):
    n = 12
    updates = history(seed, n, steps=7)
    s = replay(lambda: sw.DataMaps(n), updates, resume_at=4)
    maps = s.compute_all()
    assert torch.equal(s.compute(), maps["confidence"])
    seqs = ref_presentations("datamaps", updates, n)
    correct: list[list[float]] = [[] for _ in range(n)]
    for idx, logits, y in updates:
        ok = logits.double().numpy().argmax(axis=1) == y.numpy()
        for i, c in zip(idx.tolist(), ok.tolist(), strict=True):
            correct[i].append(float(c))
    conf = np.array([np.mean(q) if q else np.nan for q in seqs])
    var = np.array([np.std(q) if q else np.nan for q in seqs])  # population std, as the paper
    corr = np.array([np.mean(c) if c else np.nan for c in correct])
    np.testing.assert_allclose(maps["confidence"].numpy(), conf, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(maps["variability"].numpy(), var, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps["correctness"].numpy(), corr, rtol=0, atol=1e-7)


def test_datamaps_constant_confidence_has_zero_variability():
    s = sw.DataMaps(1)
    for _ in range(50):
        s.update_indexed([0], torch.tensor([[0.3, -0.7, 0.1]]), [2])
    assert s.compute_all()["variability"].item() == pytest.approx(0.0, abs=1e-7)


# -- precision at the confident end ----------------------------------------------------------


def _exact(logits: np.ndarray, y: np.ndarray):
    """Loss, entropy, 1 − p_y and the probability margin in 60-digit decimals."""
    getcontext().prec = 60
    out = []
    for row, t in zip(logits.tolist(), y.tolist(), strict=True):
        z = [Decimal(v) for v in row]
        top = max(z)
        e = [(v - top).exp() for v in z]
        total = sum(e)
        p = [v / total for v in e]
        loss = total.ln() - (z[t] - top)
        entropy = -sum(q * q.ln() for q in p if q > 0)
        other = max(q for j, q in enumerate(p) if j != t)
        el2n = sum((q - (1 if j == t else 0)) ** 2 for j, q in enumerate(p)).sqrt()
        out.append((float(loss), float(entropy), float(1 - p[t]), float(p[t] - other), float(el2n)))
    return np.array(out)


def test_confident_examples_keep_full_relative_precision():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(128, 10, generator=gen) * 30
    y = logits.argmax(dim=1)
    want = _exact(logits.numpy(), y.numpy())
    stats = RowStats(logits, y)
    assert want[:, 0].min() < 1e-9  # the regime where logsumexp − x_y rounds to 0
    np.testing.assert_allclose(stats.loss.numpy(), want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(stats.entropy.numpy(), want[:, 1], rtol=1e-5)
    np.testing.assert_allclose(stats.wrong_mass.numpy(), want[:, 2], rtol=1e-5)
    np.testing.assert_allclose(stats.prob_margin.numpy(), want[:, 3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.el2n.numpy(), want[:, 4], rtol=1e-5)
    # wrong targets too (the argmax is then not the target), and a scale where e^t underflows
    for scale in (30.0, 200.0):
        wrong = (y + 1 + torch.arange(128) % 9) % 10
        big = logits * (scale / 30.0)
        ref = _exact(big.numpy(), wrong.numpy())
        other = RowStats(big, wrong)
        for k, attr in enumerate(["loss", "entropy", "wrong_mass", "prob_margin", "el2n"]):
            np.testing.assert_allclose(
                getattr(other, attr).numpy(), ref[:, k], rtol=1e-5, atol=1e-30, err_msg=attr
            )
    naive = torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)
    assert (naive == 0).any()  # what the obvious formula gives


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_computes_in_fp32(dtype):
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(16, 7, generator=gen) * 4).to(dtype)
    y = torch.randint(0, 7, (16,), generator=gen)
    stats = RowStats(logits, y)
    for name, attr in [
        ("loss", "loss"),
        ("entropy", "entropy"),
        ("aum", "logit_margin"),
        ("margin", "prob_margin"),
        ("confidence", "p_target"),
    ]:
        got = getattr(stats, attr)
        assert got.dtype == torch.float32, name
        want = ref_values(name, logits.double().numpy(), y.numpy())
        np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-6, err_msg=name)


def test_margins_with_tied_maximum_are_zero():
    logits = torch.tensor([[1.0, 3.0, 3.0], [3.0, 3.0, 0.0]])
    stats = RowStats(logits, torch.tensor([2, 0]))
    assert stats.logit_margin.tolist() == [0.0, 0.0]
    assert stats.prob_margin.tolist() == [0.0, 0.0]


def test_single_class_margin_is_a_clear_error_and_changes_nothing():
    s = sw.AUM(2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        s.update_indexed([0], torch.zeros(1, 1), [0])
    assert s.num_updates == 0 and s.compute().isnan().all()


# -- AUM threshold ------------------------------------------------------------------------------


def test_aum_threshold_is_the_percentile_of_the_threshold_examples():
    scores = torch.arange(100, dtype=torch.float32) - 50
    idx = torch.arange(0, 100, 2)
    want = float(np.percentile(scores[idx].double().numpy(), 99))
    assert sw.AUM.threshold(scores, idx) == pytest.approx(want)
    with pytest.raises(ValueError, match="empty"):
        sw.AUM.threshold(scores, [])
    with pytest.raises(ValueError, match="percentile"):
        sw.AUM.threshold(scores, idx, percentile=0)
    with pytest.raises(ValueError, match="NaN"):
        sw.AUM.threshold(torch.full((3,), float("nan")), [0])


# -- contract shared by every new scorer ------------------------------------------------------

NEW = {
    **{k: FACTORIES[k] for k in ("loss", "margin", "entropy", "confidence", "aum")},
    "datamaps": sw.DataMaps,
}


@pytest.fixture(params=sorted(NEW), ids=str)
def make(request):
    return NEW[request.param]


def _state(s):
    return {k: v.clone() for k, v in s.state_dict()["state"].items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_leaves_state_unchanged(make):
    s = make(4)
    s.update_indexed([0, 1], torch.randn(2, 3), [0, 2])
    before = _state(s)
    bad = [
        ([0, 4], torch.randn(2, 3), [0, 1]),  # index out of range
        ([0, 1], torch.randn(2, 3), [0, 3]),  # target out of range
        ([0, 1], torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]]), [0, 1]),
        ([0], torch.randn(2, 3), [0, 1]),  # sizes
    ]
    for idx, logits, y in bad:
        with pytest.raises((ValueError, TypeError)):
            s.update_indexed(idx, logits, y)
        assert _same(_state(s), before)
    assert s.num_updates == 1


def test_nonfinite_rows_are_skipped_and_counted(make):
    s, ref = make(3, nonfinite="skip"), make(3)
    logits = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [0.5, -0.5]])
    s.update_indexed([0, 1, 2], logits, [0, 1, 1])
    ref.update_indexed([0, 2], logits[[0, 2]], [0, 1])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got = s.compute()
    torch.testing.assert_close(got, ref.compute(), equal_nan=True, rtol=0, atol=0)
    assert s.num_skipped == 1 and got[1].isnan()


def test_reset_forgets_everything(make):
    s = make(3)
    s.update_indexed([0, 0, 2], torch.randn(3, 4), [1, 2, 3])
    s.reset()
    assert s.num_updates == 0 and s.compute().isnan().all()
    fresh = make(3)
    assert _same(_state(s), _state(fresh))


def test_duplicates_equal_consecutive_updates(make):
    gen = torch.Generator().manual_seed(4)
    logits, y = torch.randn(3, 4, generator=gen), torch.tensor([1, 3, 0])
    together, apart = make(2), make(2)
    together.update_indexed([1, 1, 1], logits, y)
    for k in range(3):
        apart.update_indexed([1], logits[k : k + 1], y[k : k + 1])
    torch.testing.assert_close(together.compute(), apart.compute(), equal_nan=True)


@pytest.mark.parametrize("classes", [1, 2, 10, 33, 1000])
@pytest.mark.parametrize("scale", [0.1, 5.0, 60.0])
def test_shared_el2n_agrees_with_the_el2n_function(classes, scale):
    gen = torch.Generator().manual_seed(classes)
    logits = torch.randn(64, classes, generator=gen) * scale
    y = torch.randint(0, classes, (64,), generator=gen)
    got = RowStats(logits, y).el2n
    want = ref_values("el2n", logits.double().numpy(), y.numpy())
    fine = want > 1e-6  # float64 itself rounds 1 − p_y to 0 below that (see test_el2n.py)
    np.testing.assert_allclose(got.numpy()[fine], want[fine], rtol=2e-5)
    # the library's own exact-in-fp32 el2n, everywhere (e^-143 underflows to 0 in both)
    torch.testing.assert_close(got, sw.el2n(logits, y), rtol=2e-6, atol=1e-37)
