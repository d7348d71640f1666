from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import sampleweights as sw


def test_default_normalisation_formula_and_alternatives():
    w = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3
    loss, idx = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([3, 0, 1])
    total = 6 * 0.5 + 1 * 1.0 + 2 * 2.0
    torch.testing.assert_close(sw.LossReweighter(w)(loss, idx), torch.tensor(total / (3 * 3)))
    torch.testing.assert_close(sw.LossReweighter(w, "batch")(loss, idx), torch.tensor(total / 3))
    torch.testing.assert_close(sw.LossReweighter(w, "weights")(loss, idx), torch.tensor(total / 9))


def test_equal_weights_give_the_plain_mean_and_splits_do_not_matter():
    loss, idx = torch.rand(8), torch.arange(8)
    torch.testing.assert_close(sw.LossReweighter(torch.full((8,), 4.0))(loss, idx), loss.mean())
    rw = sw.LossReweighter(torch.rand(8) + 0.1)
    halves = (rw(loss[:4], idx[:4]) + rw(loss[4:], idx[4:])) / 2  # two ranks / micro-batches
    torch.testing.assert_close(halves, rw(loss, idx))


def test_loss_weights_match_jtt_upsampling_in_expectation():
    """Exhaustively: the mean of the reweighted loss over every example (uniform sampling) equals
    the mean loss over the epoch of a JTTSampler with the same upweight."""
    n, errors, up = 7, [1, 4], 5
    loss = torch.rand(n, dtype=torch.float64)
    rw = sw.LossReweighter(sw.jtt_weights(errors, n, up).double())
    expected_weighted = torch.stack([rw(loss[[i]], torch.tensor([i])) for i in range(n)]).mean()
    epoch = list(sw.JTTSampler(errors, n, up, shuffle=False))
    upsampled_mean = loss[epoch].mean()
    torch.testing.assert_close(expected_weighted, upsampled_mean)


def test_gradient_flows_and_bad_input():
    w = torch.ones(4)
    rw = sw.LossReweighter(w)
    loss = torch.rand(2, requires_grad=True)
    rw(loss, torch.tensor([0, 1])).backward()
    assert loss.grad is not None
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rw(torch.rand(2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="reduction='none'"):
        rw(torch.rand(()), torch.tensor([0]))
    with pytest.raises(ValueError, match="2 indices and 3 losses"):
        rw(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="≥ 0"):
        sw.LossReweighter(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="all zero"):
        sw.LossReweighter(torch.zeros(3))
    with pytest.raises(TypeError, match="float tensor"):
        sw.LossReweighter(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="normalize"):
        sw.LossReweighter(w, "sum")
    with pytest.raises(ValueError, match="upweight"):
        sw.jtt_weights([0], 3, 0.5)
    with pytest.raises(ValueError, match="duplicates"):
        sw.jtt_weights([0, 0], 3, 2.0)


def test_group_accuracies_against_loops():
    gen = torch.Generator().manual_seed(0)
    preds, targets = (
        torch.randint(0, 2, (50,), generator=gen),
        torch.randint(0, 2, (50,), generator=gen),
    )
    groups = torch.randint(0, 4, (50,), generator=gen)
    acc = sw.group_accuracy(preds, targets, groups)
    for g in range(4):
        members = [i for i in range(50) if groups[i] == g]
        want = sum(int(preds[i] == targets[i]) for i in members) / len(members)
        assert abs(float(acc[g]) - want) < 1e-6
    assert sw.worst_group_accuracy(preds, targets, groups) == pytest.approx(float(acc.min()))
    w = torch.tensor([4.0, 3.0, 2.0, 1.0])
    want = sum(float(acc[g]) * float(w[g]) for g in range(4)) / 10
    assert sw.group_weighted_accuracy(preds, targets, groups, w) == pytest.approx(want)
    logits = torch.nn.functional.one_hot(preds, 2).float()
    torch.testing.assert_close(sw.group_accuracy(logits, targets, groups), acc)


def test_group_accuracy_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        sw.group_accuracy(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_weights"):
        sw.group_weighted_accuracy(
            torch.tensor([0]), torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0])
        )


def test_every_permutation_of_a_small_dataset_gives_same_weighted_epoch_loss():
    # the default normalisation does not depend on the order or split of an epoch
    w, loss = torch.tensor([1.0, 5.0, 2.0]), torch.tensor([0.3, 0.1, 0.9])
    rw = sw.LossReweighter(w)
    values = {
        round(float(sum(rw(loss[[i]], torch.tensor([i])) for i in p)), 6)
        for p in itertools.permutations(range(3))
    }
    assert len(values) == 1


def test_weights_are_copied_so_the_normaliser_never_goes_stale():
    loss, idx = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.arange(4)
    w = torch.tensor([1.0, 1.0, 1.0, 3.0])  # mean 1.5
    rw = sw.LossReweighter(w)
    before = rw(loss, idx)
    w[3] = 1.0  # the caller edits its own tensor in place
    torch.testing.assert_close(rw(loss, idx), before)
    array = np.array([1.0, 1.0, 1.0, 3.0], dtype=np.float32)  # from_numpy shares memory
    rw = sw.LossReweighter(array)
    array[:] = 1.0
    torch.testing.assert_close(rw(loss, idx), before)
    rw.weights[3] = 100.0  # the attribute is a copy too
    torch.testing.assert_close(rw(loss, idx), before)
    # equal weights edited in place give the plain mean only through a new reweighter
    torch.testing.assert_close(sw.LossReweighter(w)(loss, idx), loss.mean())


@pytest.mark.parametrize("normalize", ["mean", "batch", "weights"])
def test_sync_batch_without_a_process_group_is_the_plain_loss(normalize):
    w, loss, idx = torch.rand(6) + 0.5, torch.rand(4), torch.tensor([5, 0, 2, 2])
    plain = sw.LossReweighter(w, normalize)(loss, idx)
    synced = sw.LossReweighter(w, normalize, sync_batch=True)
    torch.testing.assert_close(synced(loss, idx), plain)
    assert "sync_batch=True" in repr(synced)


def test_reweighter_argument_types():
    with pytest.raises(TypeError, match="sync_batch"):
        sw.LossReweighter(torch.ones(3), sync_batch=1)
    with pytest.raises(TypeError, match=r"per_example_loss.*float"):
        sw.LossReweighter(torch.ones(3))(torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_jtt_upweight_is_the_papers_total_count_and_the_authors_code_adds_one():
    # the authors' code: ConcatDataset([train, Subset(train, errors * up_weight)])
    n, errors, up_weight = 6, [1, 4], 3
    concat = list(range(n)) + errors * up_weight
    seen = torch.bincount(torch.tensor(concat), minlength=n).float()
    torch.testing.assert_close(sw.jtt_weights(errors, n, upweight=up_weight + 1), seen)
