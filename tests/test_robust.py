"""GroupDROLoss: online Group DRO (Sagawa et al. 2020) against a port of the authors' code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

import sampleweights as sw
from ddp import run_ddp
from groupdro_reference import ReferenceLossComputer

G = 4


def _batches(steps: int, seed: int, *, max_batch: int = 12, dtype=torch.float64):
    """Random per-example losses and groups; small batches, so groups are often absent."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        b = int(torch.randint(0, max_batch + 1, (), generator=gen))
        # skewed group frequencies, as in a spurious-correlation dataset
        probs = torch.tensor([0.5, 0.05, 0.05, 0.4])
        groups = torch.multinomial(probs, max(b, 1), True, generator=gen)[:b]
        # which group is hardest drifts, so the weights keep moving without collapsing
        scale = 1 + 0.8 * torch.sin(step / 25 + groups * math.pi / 2)
        losses = torch.rand(b, generator=gen, dtype=torch.float64) * 3 * scale
        yield losses.to(dtype), groups


COUNTS = torch.tensor([3000.0, 150.0, 170.0, 2900.0])


@pytest.mark.parametrize(
    "adjustment",
    [None, 2.0, [1.0, 3.0, 0.5, 2.0]],
    ids=["plain", "adjusted", "adjusted-per-group"],
)
def test_weights_and_loss_match_the_reference_over_many_steps(adjustment):
    step = 0.05
    gdro = sw.GroupDROLoss(G, step, adjustment=adjustment, group_counts=COUNTS)
    adj = (
        None
        if adjustment is None
        else torch.as_tensor(adjustment, dtype=torch.float64) * (torch.ones(G, dtype=torch.float64))
    )
    ref = ReferenceLossComputer(G, COUNTS, adj=adj, step_size=step, dtype=torch.float64)
    absent_steps = 0
    for losses, groups in _batches(400, seed=1):
        absent_steps += int(torch.bincount(groups, minlength=G).eq(0).any())
        mine = losses.clone().requires_grad_()
        theirs = losses.clone().requires_grad_()
        ours = gdro(mine, groups)
        expected = ref.loss(theirs, groups)
        torch.testing.assert_close(gdro.weights.double(), ref.adv_probs, rtol=1e-6, atol=1e-7)
        # the reference's value includes Σ q_g·C_g/√n_g (its in-place add): same gradient
        offset = ref.adv_probs @ gdro.adjustment
        torch.testing.assert_close(ours + offset, expected, rtol=1e-6, atol=1e-9)
        if len(losses):
            ours.backward()
            expected.backward()
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-6, atol=1e-12)
    assert absent_steps > 100  # the absent-group path was exercised
    assert gdro.num_steps == 400
    # the weights moved far from uniform: the test compares something
    assert float(gdro.weights.max() / gdro.weights.min()) > 10


def test_matches_the_float32_reference_as_the_authors_run_it():
    gdro = sw.GroupDROLoss(G, 0.01, adjustment=1.0, group_counts=COUNTS)
    ref = ReferenceLossComputer(G, COUNTS, adj=torch.ones(G), step_size=0.01)  # float32
    for losses, groups in _batches(300, seed=2, dtype=torch.float32):
        ours = gdro(losses, groups)
        expected = ref.loss(losses, groups)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(gdro.weights, ref.adv_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours + gdro.weights @ gdro.adjustment.float(), expected)


def test_one_step_by_hand_and_absent_groups():
    gdro = sw.GroupDROLoss(3, step_size=0.5)
    # group 0 has mean 2, group 1 mean 1, group 2 is absent (ℓ = 0: only the normalisation)
    loss = gdro(torch.tensor([1.0, 3.0, 1.0]), torch.tensor([0, 0, 1]))
    raw = torch.tensor([math.exp(0.5 * 2), math.exp(0.5 * 1), 1.0], dtype=torch.float64) / 3
    q = raw / raw.sum()
    torch.testing.assert_close(gdro.weights, q.float())
    # not renormalised over the groups present
    torch.testing.assert_close(loss, (q[0] * 2 + q[1] * 1).float())
    assert gdro.worst_group == 0
    torch.testing.assert_close(gdro.group_count, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    mean = gdro.mean_group_loss
    assert mean[:2].tolist() == [2.0, 1.0] and math.isnan(mean[2])


def test_adjustment_applies_per_group_including_zeros():
    """Unlike the reference (which adjusts only when every C_g > 0), C_g = 0 means no term."""
    counts = torch.tensor([100, 4])
    gdro = sw.GroupDROLoss(
        2, step_size=1.0, adjustment=torch.tensor([0.0, 2.0]), group_counts=counts
    )
    torch.testing.assert_close(gdro.adjustment, torch.tensor([0.0, 1.0], dtype=torch.float64))
    loss = gdro(torch.tensor([1.0]), torch.tensor([0]))  # group 1 absent: exponent η·(0 + 1)
    q = torch.tensor([math.e, math.e]) / (2 * math.e)
    torch.testing.assert_close(gdro.weights, q)
    torch.testing.assert_close(loss, torch.tensor(0.5))  # the adjustment never enters the loss
    # an adjustment for a group with no training examples would be infinite: it is refused...
    with pytest.raises(ValueError, match=r"groups \[1\] have 0 training examples"):
        sw.GroupDROLoss(2, adjustment=[0.0, 1.0], group_counts=[5, 0])
    # ...but a group with C = 0 may have none
    sw.GroupDROLoss(2, adjustment=[1.0, 0.0], group_counts=[5, 0])


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`step_size`.*≥ 0.*-0.1"):
        sw.GroupDROLoss(G, step_size=-0.1)
    with pytest.raises(ValueError, match="step_size"):
        sw.GroupDROLoss(G, step_size=float("nan"))
    with pytest.raises(TypeError, match="step_size"):
        sw.GroupDROLoss(G, step_size="0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_groups"):
        sw.GroupDROLoss(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_groups"):
        sw.GroupDROLoss(4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_groups"):
        sw.GroupDROLoss(0)
    with pytest.raises(ValueError, match=r"group_counts=torch\.bincount"):
        sw.GroupDROLoss(G, adjustment=1.0)
    with pytest.raises(ValueError, match=r"`adjustment`.*≥ 0"):
        sw.GroupDROLoss(G, adjustment=-1.0, group_counts=COUNTS)
    with pytest.raises(ValueError, match=r"`adjustment` of shape \(4,\).*\(3,\)"):
        sw.GroupDROLoss(G, adjustment=[1.0, 1.0, 1.0], group_counts=COUNTS)
    with pytest.raises(ValueError, match=r"`group_counts`.*≥ 0"):
        sw.GroupDROLoss(G, adjustment=1.0, group_counts=[1, 2, -3, 4])
    with pytest.raises(TypeError, match="group_counts"):
        sw.GroupDROLoss(G, adjustment=1.0, group_counts="many")
    with pytest.raises(TypeError, match="validate"):
        sw.GroupDROLoss(G, validate=1)  # type: ignore[arg-type]
    # a zero adjustment needs no counts (the reference's default "0.0")
    assert not sw.GroupDROLoss(G, adjustment=0.0).adjustment.any()


def _stepped(seed: int = 0) -> sw.GroupDROLoss:
    gdro = sw.GroupDROLoss(G, step_size=0.1)
    for losses, groups in _batches(5, seed, dtype=torch.float32):
        gdro(losses, groups)
    return gdro


@pytest.mark.parametrize(
    ("losses", "groups", "error", "match"),
    [
        (torch.rand(3), torch.tensor([0, 1, 4]), ValueError, r"`groups` in \[0, 4\)"),
        (torch.rand(3), torch.tensor([0, -1, 2]), ValueError, r"`groups` in \[0, 4\)"),
        (torch.rand(3), torch.tensor([0, 1]), ValueError, "2 group ids and 3 losses"),
        (torch.rand(3, 1), torch.tensor([0, 1, 2]), ValueError, "reduction='none'"),
        (torch.tensor(1.0), torch.tensor([0]), ValueError, "reduction='none'"),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), TypeError, "float tensor"),
        (torch.rand(2), torch.tensor([0.0, 1.0]), TypeError, "`groups`.*integer"),
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]), ValueError, "NaN or infinite"),
        (torch.tensor([float("inf"), 1.0]), torch.tensor([0, 0]), ValueError, "NaN or infinite"),
        (torch.tensor([float("inf"), -float("inf")]), [2, 2], ValueError, "NaN or infinite"),
    ],
    ids=[
        "id-too-large",
        "id-negative",
        "length-mismatch",
        "loss-2d",
        "loss-scalar",
        "loss-int",
        "groups-float",
        "nan",
        "inf",
        "inf-minus-inf",
    ],
)
def test_rejected_calls_leave_the_state_unchanged(losses, groups, error, match):
    gdro = _stepped()
    before = gdro.state_dict()
    with pytest.raises(error, match=match):
        gdro(losses, groups)
    after = gdro.state_dict()
    assert after["num_steps"] == before["num_steps"] == 5
    for key in ("log_weights", "loss_sum", "count"):
        assert torch.equal(after[key], before[key]), key


def test_state_dict_resume_reset_and_mismatch():
    gdro = _stepped(seed=3)
    saved = gdro.state_dict()
    resumed = sw.GroupDROLoss(G, step_size=0.1)
    resumed.load_state_dict(saved)
    for losses, groups in _batches(20, seed=4, dtype=torch.float32):
        assert torch.equal(gdro(losses, groups), resumed(losses, groups))
    assert torch.equal(gdro.weights, resumed.weights) and resumed.num_steps == 25
    # the saved copy is independent of later steps
    assert not torch.equal(saved["log_weights"], gdro.state_dict()["log_weights"])

    other = sw.GroupDROLoss(G + 1)
    before = other.state_dict()
    with pytest.raises(sw.StateMismatchError, match=r"num_groups=5.*num_groups=4"):
        other.load_state_dict(saved)
    bad = dict(saved, log_weights=saved["log_weights"] + 1.0)  # weights summing to e
    with pytest.raises(sw.StateMismatchError, match="summing to 1"):
        resumed.load_state_dict(bad)
    with pytest.raises(sw.StateMismatchError, match="lacks"):
        resumed.load_state_dict({k: v for k, v in saved.items() if k != "count"})
    with pytest.raises(sw.StateMismatchError, match="kind"):
        resumed.load_state_dict(dict(saved, kind="EL2N"))
    with pytest.raises(sw.StateMismatchError, match=r"`count` of shape \(4,\)"):
        resumed.load_state_dict(dict(saved, count=torch.zeros(3, dtype=torch.float64)))
    with pytest.raises(sw.StateMismatchError, match="`count` ≥ 0"):
        resumed.load_state_dict(dict(saved, count=-torch.ones(4, dtype=torch.float64)))
    with pytest.raises(TypeError, match="state_dict"):
        resumed.load_state_dict([1, 2])  # type: ignore[arg-type]
    after = other.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in ("log_weights", "loss_sum", "count"))
    assert torch.equal(resumed.weights, gdro.weights)  # the refused loads changed nothing

    resumed.reset()
    assert resumed.num_steps == 0 and not resumed.group_count.any()
    torch.testing.assert_close(resumed.weights, torch.full((G,), 0.25))
    assert torch.isnan(resumed.mean_group_loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_losses_update_in_float64_and_return_their_dtype(dtype):
    losses, groups = torch.tensor([0.3, 2.7, 1.1, 0.2], dtype=dtype), torch.tensor([0, 1, 1, 3])
    wide = sw.GroupDROLoss(G, step_size=1.0)
    expected = wide(losses.double(), groups)
    gdro = sw.GroupDROLoss(G, step_size=1.0)
    x = losses.clone().requires_grad_()
    out = gdro(x, groups)
    assert out.dtype == dtype
    assert torch.equal(gdro.weights, wide.weights)  # the same float64 update from the same values
    torch.testing.assert_close(
        out.double(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=0
    )
    out.backward()
    assert x.grad is not None and x.grad.dtype == dtype


def test_huge_losses_and_long_runs_stay_finite():
    """The float32 product q·exp(η·ℓ) of the reference overflows (NaN) for η·ℓ > 88 and lets a
    weight underflow to a permanent 0; the log-space update does neither."""
    ref = ReferenceLossComputer(2, torch.ones(2), step_size=0.01)
    ref.loss(torch.tensor([1e4, 0.0]), torch.tensor([0, 1]))
    assert torch.isnan(ref.adv_probs).any()
    gdro = sw.GroupDROLoss(2, step_size=0.01)
    gdro(torch.tensor([1e4, 0.0]), torch.tensor([0, 1]))
    assert torch.isfinite(gdro.weights).all() and gdro.worst_group == 0
    # group 1 loses for 10 000 steps (its weight ~ e^-1000), then becomes the worst for 2 000
    gdro = sw.GroupDROLoss(2, step_size=0.1)
    both = torch.tensor([0, 1])
    for _ in range(10_000):
        gdro(torch.tensor([1.0, 0.0]), both)
    assert gdro.weights[1] == 0  # float32 cannot show it...
    for _ in range(2_000):
        gdro(torch.tensor([0.0, 10.0]), both)
    assert gdro.worst_group == 1  # ...but it was never lost


def test_empty_batch_is_a_step_with_every_group_absent():
    gdro = sw.GroupDROLoss(2, step_size=1.0, adjustment=[1.0, 0.0], group_counts=[1, 1])
    loss = gdro(torch.zeros(0), [])
    assert loss.item() == 0.0 and gdro.num_steps == 1
    torch.testing.assert_close(gdro.weights, torch.tensor([math.e, 1.0]) / (1 + math.e))


def test_list_and_numpy_group_ids_and_repr():
    gdro = sw.GroupDROLoss(np.int64(3))
    a = gdro(torch.tensor([1.0, 2.0]), [0, 2])
    b = sw.GroupDROLoss(3)(torch.tensor([1.0, 2.0]), np.array([0, 2], dtype=np.int32))
    assert torch.equal(a, b)
    assert repr(gdro) == "GroupDROLoss(num_groups=3, step_size=0.01, num_steps=1)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_losses_give_the_cpu_weights_and_keep_the_state_there():
    cpu, gpu = sw.GroupDROLoss(G, 0.1), sw.GroupDROLoss(G, 0.1)
    for losses, groups in _batches(50, seed=6, dtype=torch.float32):
        expected = cpu(losses, groups)
        out = gpu(losses.cuda(), groups)  # CPU group ids, as a DataLoader yields them
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), expected)
    assert gpu.weights.device.type == "cuda"
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights)
    cpu.load_state_dict(gpu.state_dict())  # mapped to the CPU state's device
    assert cpu.state_dict()["log_weights"].device.type == "cpu"


# --------------------------------------------------------------------------- DDP

STEPS = 30


def _ddp_batches():
    """Per step: the global batch and its split (uneven, sometimes empty on a rank)."""
    out = []
    gen = torch.Generator().manual_seed(7)
    for step, (losses, groups) in enumerate(_batches(STEPS, seed=5)):
        cut = 0 if step % 7 == 3 else int(torch.randint(0, len(losses) + 1, (), generator=gen))
        out.append((losses, groups, cut))
    return out


def _per_example_losses(theta: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    return losses * theta.sum() + theta[0] ** 2  # differentiable in theta, value = losses + 1


def _ddp_group_dro(rank, world):
    gdro = sw.GroupDROLoss(G, step_size=0.05, adjustment=1.0, group_counts=COUNTS)
    out = []
    for losses, groups, cut in _ddp_batches():
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        theta = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        loss = gdro(_per_example_losses(theta, losses[part]), groups[part])
        loss.backward()
        grad = theta.grad.clone()
        dist.all_reduce(grad)  # DDP's average
        out.append((loss.detach(), grad / world, gdro.state_dict()))
    return out


@pytest.mark.ddp
def test_ddp_weights_loss_and_gradient_equal_one_process_on_the_whole_batch():
    ranks = run_ddp(_ddp_group_dro, timeout=60)
    single = sw.GroupDROLoss(G, step_size=0.05, adjustment=1.0, group_counts=COUNTS)
    for step, (losses, groups, _) in enumerate(_ddp_batches()):
        theta = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        loss = single(_per_example_losses(theta, losses), groups)
        if len(losses):
            loss.backward()
        grad = theta.grad if theta.grad is not None else torch.zeros(2, dtype=torch.float64)
        state = single.state_dict()
        (l0, g0, s0), (l1, g1, s1) = ranks[0][step], ranks[1][step]
        for key in ("log_weights", "loss_sum", "count"):
            assert torch.equal(s0[key], s1[key]), (step, key)  # identical on every rank
            torch.testing.assert_close(s0[key], state[key], rtol=1e-12, atol=1e-12)
        assert torch.equal(l0, l1)
        torch.testing.assert_close(l0, loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g0, grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g1, grad, rtol=1e-12, atol=1e-12)
    assert s0["num_steps"] == STEPS
