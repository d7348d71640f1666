from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sampleweights as sw


def el2n_reference(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The textbook formula in float64: ‖softmax(z) − onehot(y)‖₂."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(z.shape[1])[targets]
    return np.linalg.norm(p - onehot, axis=1)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(torch.float32, 1e-5), (torch.float64, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)],
)
def test_matches_textbook_formula_for_any_float_dtype(dtype, rtol):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 10, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 10, (64,), generator=gen)
    got = sw.el2n(logits, targets)
    assert got.dtype == torch.float32
    # the reference sees exactly the values the low-precision tensor holds
    want = el2n_reference(logits.float().numpy(), targets.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=1e-7)


def el2n_exact(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The textbook formula in 60-digit decimal arithmetic: float64 itself rounds 1 − p_y to 0
    once p_y > 1 − 1e-16, so confident examples need more than double precision."""
    getcontext().prec = 60
    out = []
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        z = [Decimal(v) for v in row]
        top = max(z)
        e = [(v - top).exp() for v in z]
        total = sum(e)
        p = [v / total for v in e]
        out.append(float(sum((pj - (1 if j == y else 0)) ** 2 for j, pj in enumerate(p)).sqrt()))
    return np.array(out)


def test_confident_examples_keep_full_relative_precision():
    """Logits ×30: p_y ≈ 1 − 1e-20 … the cancelling Σp² − 2p_y + 1 formula is wrong here."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 10, generator=gen) * 30
    targets = logits.argmax(dim=1)  # confident and correct: the easy end pruning removes
    want = el2n_exact(logits.numpy(), targets.numpy())
    got = sw.el2n(logits, targets).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want.min() < 1e-6  # the test really reaches the regime where cancellation bites
    p = torch.softmax(logits, dim=1)
    naive = (p.pow(2).sum(1) - 2 * p.gather(1, targets[:, None]).squeeze(1) + 1).clamp_min(0).sqrt()
    naive_err = np.abs(naive.numpy() - want) / want
    assert naive_err.max() > 1e-2  # the naive formula is visibly wrong; ours is not


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 20),
    classes=st.integers(1, 12),
    scale=st.sampled_from([0.1, 1.0, 10.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(batch, classes, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen) * scale
    targets = torch.randint(0, classes, (batch,), generator=gen)
    want = el2n_reference(logits.numpy(), targets.numpy())
    np.testing.assert_allclose(sw.el2n(logits, targets).numpy(), want, rtol=2e-5, atol=1e-7)


def test_running_mean_over_updates_and_duplicates():
    s = sw.EL2N(5)
    gen = torch.Generator().manual_seed(2)
    runs = []
    for _ in range(3):  # three "seeds" scoring the same examples
        logits = torch.randn(4, 3, generator=gen)
        idx, y = torch.tensor([0, 1, 1, 3]), torch.tensor([0, 2, 2, 1])
        s.update_indexed(idx, logits, y)
        runs.append(el2n_reference(logits.numpy(), y.numpy()))
    runs = np.stack(runs)  # (3, 4)
    got = s.compute().numpy()
    np.testing.assert_allclose(got[0], runs[:, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(got[1], runs[:, 1:3].mean(), rtol=1e-6)  # both duplicates count
    np.testing.assert_allclose(got[3], runs[:, 3].mean(), rtol=1e-6)
    assert np.isnan(got[2]) and np.isnan(got[4])
    assert s.compute().dtype == torch.float32


def test_logits_requiring_grad_are_detached():
    model = torch.nn.Linear(3, 4)
    s = sw.EL2N(2)
    s.update_indexed(torch.tensor([0, 1]), model(torch.randn(2, 3)), torch.tensor([1, 3]))
    out = s.compute()
    assert not out.requires_grad and out.grad_fn is None
    assert all(t.grad_fn is None for t in s._state.values())
