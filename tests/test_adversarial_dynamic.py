"""Adversarial checks of DynamicPruner and GroupDROLoss: edge cases of the pruning rule, low
precision, device placement of the hot path, resume, and GroupDRO's arguments."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import sampleweights as sw


def _recorded(losses: torch.Tensor, **kwargs: Any) -> sw.DynamicPruner:
    kwargs.setdefault("epochs", 10)
    kwargs.setdefault("shuffle", False)
    p = sw.DynamicPruner(losses.numel(), **kwargs)
    p.update(losses, torch.arange(losses.numel()))
    return p


# -- the rule at its edges -----------------------------------------------------------------------


@pytest.mark.parametrize("prune", [1 - 1e-12, 1 - 1e-9, math.nextafter(1.0, 0.0)])
def test_prune_just_below_one_keeps_one_below_mean_example(prune: float) -> None:
    """``round(prune · n, 6)`` reaches n for a prune this close to 1: k = 0 must not happen."""
    losses = torch.cat((torch.zeros(10), torch.ones(10)))
    p = _recorded(losses, prune=prune)
    p.set_epoch(1)
    s = p.summary()
    assert s["below_mean"] == 10 and s["kept"] == 11 and s["scale"] == 10.0
    pi, w = p.inclusion_probabilities(), p.weights(torch.arange(20)).double()
    kept = torch.tensor(list(p))
    assert torch.allclose(pi[kept] * w[kept], torch.ones(len(kept), dtype=torch.float64))


@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 2.3, 1e-7, 1e30])
def test_all_equal_losses_prune_nothing(value: float) -> None:
    for n in (3, 7, 1000, 4097):
        p = _recorded(torch.full((n,), value), prune=0.9)
        p.set_epoch(1)
        assert p.summary()["below_mean"] == 0 and len(p) == n


def test_non_finite_and_bf16_losses_record_and_never_seen_stay_kept() -> None:
    p = sw.DynamicPruner(6, prune=0.99, epochs=4, shuffle=False)
    losses = torch.tensor([0.5, float("nan"), 2.0, float("inf"), 0.25, 3.0], dtype=torch.bfloat16)
    p.update(losses, torch.arange(6))
    p.set_epoch(1)
    assert torch.isnan(p.scores[[1, 3]]).all()
    assert {1, 3, 2, 5} <= set(p)  # never seen (non-finite) or above the mean: kept


def test_decisions_are_pure_under_repeated_skipped_and_backward_epochs() -> None:
    losses = torch.rand(300, generator=torch.Generator().manual_seed(0))
    a = _recorded(losses, prune=0.5, seed=7, shuffle=True)
    b = _recorded(losses, prune=0.5, seed=7, shuffle=True)
    for e in (3, 3, 1, 5, 2):  # twice, backwards, skipped
        a.set_epoch(e)
    b.set_epoch(2)
    assert list(a) == list(b) and torch.equal(
        a.weights(torch.arange(300)), b.weights(torch.arange(300))
    )
    a.set_epoch(12)  # past `epochs`: the full data at weight 1
    assert len(a) == 300 and torch.equal(a.weights(torch.arange(300)), torch.ones(300))


def test_the_pruning_draw_leaves_the_global_rng_alone() -> None:
    losses = torch.rand(100)
    state = torch.get_rng_state()
    p = _recorded(losses, prune=0.5, shuffle=True)
    p.set_epoch(1)
    list(p)
    p.reweight(losses[:10].requires_grad_(), torch.arange(10))
    g = sw.GroupDROLoss(3, step_size=0.1)
    g(losses[:10], torch.arange(10) % 3)
    assert torch.equal(torch.get_rng_state(), state)


# -- low precision with a reweighter -------------------------------------------------------------


def test_bf16_losses_with_a_reweighter_round_once_like_without() -> None:
    """The pruning weight n/k must not be rounded to the loss's dtype before the reweighter
    (bf16 holds 5/3 as 1.664: a systematic 0.16 % under-weighting of the kept examples)."""
    losses = torch.cat((torch.zeros(5), torch.ones(5)))
    p = _recorded(losses, prune=0.5)  # 5 below the mean, 2 skipped: scale 5/3
    p.set_epoch(1)
    assert p.summary()["scale"] == 5 / 3
    idx = torch.tensor([i for i in p if i < 5])
    batch = (torch.arange(1, 4, dtype=torch.float32) * 7 / 256).to(torch.bfloat16)
    ones = sw.LossReweighter(torch.ones(10))
    p2 = _recorded(losses, prune=0.5)
    p2.set_epoch(1)
    with_rw = p.reweight(batch, idx, reweighter=ones)
    without = p2.reweight(batch, idx)
    exact = (batch.double() * 5 / 3).mean()
    assert with_rw.dtype == torch.bfloat16
    assert with_rw == without == exact.to(torch.bfloat16), (with_rw, without, exact)


def test_fp16_losses_with_a_reweighter_do_not_overflow_in_the_product() -> None:
    # 100 below the mean at 1000, 100 above at 60000; prune 0.99 keeps 1 below, weight 100
    losses = torch.cat((torch.full((100,), 1000.0), torch.full((100,), 60000.0)))
    p = _recorded(losses, prune=0.99)
    p.set_epoch(1)
    assert p.summary()["scale"] == 100.0
    idx = torch.tensor(list(p))
    half = losses[idx].half()
    got = p.reweight(half, idx, reweighter=sw.LossReweighter(torch.ones(200)))
    want = (1000.0 * 100 + 100 * 60000.0) / 101
    assert torch.isfinite(got) and float(got) == pytest.approx(want, rel=1e-3)


# -- the hot path stays on the host-side indices -------------------------------------------------


def test_the_reweighter_gets_the_host_indices_not_a_device_copy() -> None:
    """Handing the reweighter the indices moved to the loss's device makes its range check read
    them back: a host sync per step on CUDA. The meta device (which cannot be read back) stands
    in for it here."""
    p = sw.DynamicPruner(8, prune=0.5, epochs=4)
    p.set_epoch(0)
    losses = torch.empty(4, device="meta")
    out = p.reweight(
        losses, torch.tensor([0, 1, 2, 3]), reweighter=sw.LossReweighter(torch.ones(8))
    )
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_per_step_on_cuda() -> None:
    p = sw.DynamicPruner(64, prune=0.5, epochs=4)
    rw = sw.LossReweighter(torch.ones(64))
    g = sw.GroupDROLoss(4, validate=False)
    p.set_epoch(0)
    warm = torch.rand(8, device="cuda")
    p.reweight(warm, torch.arange(8), reweighter=rw)
    g(warm, torch.arange(8) % 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            losses = torch.rand(8, device="cuda")
            p.reweight(losses, torch.arange(8))
            p.reweight(losses, torch.arange(8), reweighter=rw)
            g(losses, torch.arange(8) % 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- resume --------------------------------------------------------------------------------------


def test_resume_before_the_first_set_epoch_takes_the_same_decision() -> None:
    """Losses recorded before ``set_epoch(0)`` (a warm-up pass): the saved provisional
    decision must not stand in for the one ``set_epoch(0)`` takes."""
    losses = torch.arange(20.0)

    def make() -> sw.DynamicPruner:
        return sw.DynamicPruner(20, prune=0.5, epochs=4, seed=3)

    a = make()
    a.update(losses, torch.arange(20))
    b = make()
    b.load_state_dict(a.state_dict())
    a.set_epoch(0)
    b.set_epoch(0)
    assert len(a) < 20
    assert list(a) == list(b)
    assert torch.equal(a.weights(torch.arange(20)), b.weights(torch.arange(20)))


def test_mid_epoch_resume_on_a_padded_shard_is_exact() -> None:
    losses = torch.rand(23, generator=torch.Generator().manual_seed(5))

    def make() -> sw.DynamicPruner:
        return sw.DynamicPruner(23, prune=0.6, epochs=6, seed=1, num_replicas=3, rank=2)

    a = make()
    a.update(losses, torch.arange(23))
    a.set_epoch(2)
    it = iter(a)
    head = [next(it) for _ in range(2)]
    state = a.state_dict()
    rest = list(it)
    b = make()
    b.load_state_dict(state)
    b.set_epoch(2)
    assert len(b) == len(a) == len(head) + len(rest)
    assert list(b) == rest
    assert torch.equal(a.weights(torch.arange(23)), b.weights(torch.arange(23)))


# -- GroupDROLoss --------------------------------------------------------------------------------


@pytest.mark.parametrize("adjustment", [torch.tensor(2.0), torch.tensor([2.0])[0]])
def test_group_dro_takes_a_zero_dim_tensor_adjustment_as_one_number(
    adjustment: torch.Tensor,
) -> None:
    counts = torch.tensor([4, 9, 16])
    g = sw.GroupDROLoss(3, adjustment=adjustment, group_counts=counts)
    assert torch.allclose(g.adjustment, 2.0 / counts.double().sqrt())


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_group_dro_group_id_dtypes_single_group_and_empty_batches(dtype: torch.dtype) -> None:
    losses = torch.tensor([1.0, 2.0, 4.0])
    ref = sw.GroupDROLoss(3, step_size=0.5)
    want = ref(losses, torch.tensor([0, 2, 2]))
    g = sw.GroupDROLoss(3, step_size=0.5)
    assert torch.equal(g(losses, torch.tensor([0, 2, 2], dtype=dtype)), want)
    one = sw.GroupDROLoss(1, step_size=5.0)
    assert float(one(losses, torch.zeros(3, dtype=dtype))) == pytest.approx(7 / 3)
    assert torch.equal(one.weights, torch.ones(1))
    x = torch.empty(0, requires_grad=True)
    out = g(x, torch.empty(0, dtype=dtype))
    out.backward()  # type: ignore[no-untyped-call]
    assert float(out.detach()) == 0.0 and torch.isfinite(g.weights).all()
