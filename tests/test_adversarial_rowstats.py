"""Adversarial inputs for the shared per-row statistics and the training-dynamics scorers, each
against a 60-digit (mpmath) or float64 textbook reference: float64 logits closer than fp32's
resolution, confident rows, huge and infinite logits, ties, one and two classes, data maps'
variability at the cancellation limit, the AUM threshold's indices, the EMA with duplicates."""

from __future__ import annotations

import copy
import math

import mpmath
import numpy as np
import pytest
import torch

import sampleweights as sw
from sampleweights.scorers.rowstats import RowStats

ATTRS = ("loss", "entropy", "wrong_mass", "p_target", "el2n", "logit_margin", "prob_margin")
TINY = torch.finfo(torch.float32).tiny


def exact(row: list[float], t: int) -> dict[str, float | None]:
    """Every statistic of one row in 60-digit arithmetic from the logits' exact values."""
    with mpmath.workdps(60):
        z = [mpmath.mpf(v) for v in row]
        top = max(z)
        e = [mpmath.exp(v - top) for v in z]
        total = mpmath.fsum(e)
        p = [v / total for v in e]
        others = [j for j in range(len(z)) if j != t]
        return {
            "loss": float(mpmath.log(total) - (z[t] - top)),
            "entropy": float(-mpmath.fsum(q * mpmath.log(q) for q in p if q > 0)),
            "wrong_mass": float(mpmath.fsum(p[j] for j in others)),
            "p_target": float(p[t]),
            "el2n": float(mpmath.sqrt(mpmath.fsum((q - (j == t)) ** 2 for j, q in enumerate(p)))),
            "logit_margin": float(z[t] - max(z[j] for j in others)) if others else None,
            "prob_margin": float(p[t] - max(p[j] for j in others)) if others else None,
        }


def assert_exact(logits: torch.Tensor, y: list[int], rtol: float = 2e-6, attrs=ATTRS) -> None:
    stats = RowStats(logits, torch.tensor(y))
    rows = logits.double().tolist()
    for attr in attrs:
        got = getattr(stats, attr)
        assert got.dtype == torch.float32, attr
        for i, (row, t) in enumerate(zip(rows, y, strict=True)):
            want = exact(row, t)[attr]
            if want is None:
                continue
            g = float(got[i])
            if abs(want) > torch.finfo(torch.float32).max:  # beyond fp32: inf of the right sign
                assert g == math.copysign(math.inf, want), (attr, i)
            elif abs(want) < TINY:  # subnormal: absolute precision only
                assert abs(g - want) <= 2.0**-149 * 64, (attr, i, g, want)
            else:
                assert g == pytest.approx(want, rel=rtol, abs=0), (attr, i, g, want)


# -- float64 logits: one rounding from the exact difference, not a cast first ----------------


def test_float64_logits_closer_than_fp32_resolution():
    logits = torch.tensor(
        [[1e4, 1e4 - 1e-4, 0.0], [1e10, 1e10 + 1.0, 1e10 - 2.0], [1e4, 1e4 + 1e-4, 1e4]],
        dtype=torch.float64,
    )
    assert_exact(logits, [0, 0, 2])


def test_float64_margin_is_the_same_bits_by_either_path():
    logits = torch.tensor([[1e4, 1e4 - 1e-4], [5.0, 5.0 + 2e-9]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    shared = RowStats(logits, y, margins=True).logit_margin
    direct = RowStats(logits, y, margins=False)
    _ = direct.el2n  # the shared pass past its exponentials: the margin comes from topk
    assert torch.equal(shared, direct.logit_margin)
    assert shared[0].item() == pytest.approx(1e-4, rel=1e-6)
    aum = sw.AUM(2)
    aum.update_indexed([0, 1], logits, y)
    assert aum.compute()[1].item() == pytest.approx(-2e-9, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype_moderate_logits_to_2e_6(dtype):
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(24, 6, generator=gen) * 3).to(dtype)
    y = torch.randint(0, 6, (24,), generator=gen).tolist()
    assert_exact(logits, y)


# -- confident rows, huge and infinite logits ------------------------------------------------


def test_confident_one_minus_p_y_of_1e_20():
    # p_y = 1 − 1e-20: t = −46.05 (fp32 rounding of t: ≤ 46·2⁻²⁴ ≈ 2.7e-6 relative)
    logits = torch.tensor([[46.0517, 0.0, -1e4], [0.0, -46.0517, -50.0], [10.0, -36.0517, -40.0]])
    assert_exact(logits, [0, 0, 0], rtol=3e-6)
    stats = RowStats(logits, torch.tensor([0, 0, 0]))
    assert (stats.wrong_mass > 0).all() and (stats.loss > 0).all() and (stats.el2n > 0).all()


def test_rounding_of_x_minus_max_is_the_documented_bound():
    # x − m is rounded once to fp32; exp amplifies it to |t|·2⁻²⁴ relative at most
    logits = torch.tensor([[50.1, -30.3, -35.7], [50.1, -30.3, -35.7]])
    assert_exact(logits, [0, 1], rtol=90 * 2.0**-24)


@pytest.mark.parametrize("big", [1e4, 3e38])
def test_huge_logits(big):
    logits = torch.tensor([[big, -big, 0.0], [-big, big, big / 2], [big, big, -big]])
    assert_exact(logits, [0, 0, 1])


def test_minus_infinity_in_other_classes():
    inf = math.inf
    logits = torch.tensor([[0.0, -inf, -inf], [1.0, -inf, 0.5], [-inf, 2.0, 2.0]])
    y = [0, 0, 1]
    assert_exact(logits, y)
    stats = RowStats(logits, torch.tensor(y), margins=True)
    assert stats.logit_margin[0].item() == inf and stats.prob_margin[0].item() == 1.0
    assert stats.correct.tolist() == [True, True, True]  # row 2: a tie, the first maximum is y


# -- ties, one class, two classes, all equal ---------------------------------------------------


def test_ties_give_zero_margins_and_first_maximum_correctness():
    logits = torch.tensor([[1.0, 3.0, 3.0], [3.0, 3.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    y = [2, 0, 1, 0]
    assert_exact(logits, y)
    for margins in (None, True, False):
        stats = RowStats(logits, torch.tensor(y), margins=margins)
        assert stats.logit_margin.tolist() == [0.0] * 4
        assert stats.prob_margin.tolist() == [0.0] * 4
        assert stats.correct.tolist() == [False, True, False, True]  # argmax: the first maximum


def test_one_class():
    logits = torch.tensor([[5.0], [-3e38], [0.0]])
    assert_exact(logits, [0, 0, 0], attrs=("loss", "entropy", "wrong_mass", "p_target", "el2n"))
    stats = RowStats(logits, torch.zeros(3, dtype=torch.long))
    assert stats.loss.tolist() == [0.0] * 3 and stats.el2n.tolist() == [0.0] * 3
    assert stats.correct.all()
    with pytest.raises(ValueError, match="at least 2 classes"):
        _ = stats.logit_margin


def test_two_classes_and_all_equal():
    logits = torch.tensor([[0.0, 100.0], [1e-7, 0.0], [0.0, 1e-30], [7.0, 7.0]])
    assert_exact(logits, [0, 0, 1, 1])
    wide = torch.zeros(3, 50_000)
    stats = RowStats(wide, torch.tensor([0, 17, 49_999]))
    assert stats.entropy.tolist() == pytest.approx([math.log(50_000)] * 3, rel=2e-6)
    assert stats.p_target.tolist() == pytest.approx([2e-5] * 3, rel=2e-6)


# -- data maps: the variability without cancellation -------------------------------------------


def test_datamaps_constant_confidence_has_exactly_zero_variability():
    s = sw.DataMaps(2)
    logits = torch.tensor([[0.3, -0.7, 0.1]]).expand(100, 3)
    for _ in range(100):  # 10⁴ presentations, 100 duplicates per update
        s.update_indexed(torch.zeros(100, dtype=torch.long), logits, torch.full((100,), 2))
    maps = s.compute_all()
    assert maps["variability"][0].item() == 0.0
    assert maps["confidence"][0].item() == RowStats(logits[:1], torch.tensor([2])).p_target.item()


def test_datamaps_tiny_variability_of_confident_examples_keeps_relative_precision():
    gen = torch.Generator().manual_seed(0)
    s, seen = sw.DataMaps(1), []
    zero = torch.zeros(50, dtype=torch.long)
    for step in range(40):
        logits = torch.stack([torch.full((50,), 10.0), -torch.rand(50, generator=gen) * 1e-3], 1)
        seen += RowStats(logits, zero).p_target.double().tolist()
        if step == 20:  # resume mid-run
            saved = copy.deepcopy(s.state_dict())
            s = sw.DataMaps(1)
            s.load_state_dict(saved)
        s.update_indexed(zero, logits, zero)
    want = float(np.std(np.array(seen)))
    assert want < 1e-7
    assert s.compute_all()["variability"].item() == pytest.approx(want, rel=1e-6)


# -- AUM threshold -----------------------------------------------------------------------------


def test_aum_threshold_takes_a_boolean_mask_not_indices_0_and_1():
    scores = torch.tensor([5.0, -1.0, -2.0, 7.0])
    mask = torch.tensor([False, True, True, False])
    assert sw.AUM.threshold(scores, mask, percentile=50.0) == pytest.approx(-1.5)
    assert sw.AUM.threshold(scores, [1, 2], percentile=50.0) == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="mask"):
        sw.AUM.threshold(scores, mask[:3])


@pytest.mark.parametrize("bad", [[-1], [4], [1, 1]])
def test_aum_threshold_rejects_out_of_range_and_repeated_indices(bad):
    with pytest.raises(ValueError, match="threshold_indices"):
        sw.AUM.threshold(torch.tensor([5.0, -1.0, -2.0, 7.0]), bad)


def test_aum_threshold_rejects_float_indices():
    with pytest.raises(TypeError, match="threshold_indices"):
        sw.AUM.threshold(torch.tensor([5.0, -1.0]), torch.tensor([1.0]))


# -- EMA: duplicates and resume against the definition ---------------------------------------


def test_ema_with_duplicates_and_resume_is_the_bias_corrected_definition():
    decay, n = 0.7, 3
    gen = torch.Generator().manual_seed(9)
    updates = []
    for _ in range(6):
        idx = torch.tensor([0, 0, 2, 0, 1, 2])
        updates.append((idx, torch.randn(6, 4, generator=gen) * 5, torch.randint(0, 4, (6,))))
    s = sw.Loss(n, ema=decay)
    history: list[list[float]] = [[] for _ in range(n)]
    for k, (idx, logits, y) in enumerate(updates):
        if k == 3:
            saved = copy.deepcopy(s.state_dict())
            s = sw.Loss(n, ema=decay)
            s.load_state_dict(saved)
        s.update_indexed(idx, logits, y)
        z = logits.double()
        loss = (torch.logsumexp(z, 1) - z.gather(1, y[:, None]).squeeze(1)).tolist()
        for i, v in zip(idx.tolist(), loss, strict=True):
            history[i].append(v)
    want = []
    for values in history:
        w = [decay ** (len(values) - 1 - k) for k in range(len(values))]
        want.append(sum(a * b for a, b in zip(w, values, strict=True)) / sum(w))
    np.testing.assert_allclose(s.compute().numpy(), want, rtol=2e-6)
