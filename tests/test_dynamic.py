"""DynamicPruner: the rule (unbiasedness exactly, from the inclusion probabilities), the sampler
invariants the other samplers keep, resume, and DDP (one 2-process test)."""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw
from ddp import run_ddp


def recorded(n, losses, **kwargs):
    """A pruner that has recorded ``losses`` (a float tensor; NaN = leave unrecorded)."""
    kwargs.setdefault("epochs", 10)
    p = sw.DynamicPruner(n, **kwargs)
    seen = ~torch.isnan(losses)
    p.update(losses[seen], torch.arange(n)[seen])
    return p


def kept_set(p):
    return sorted(p.state_dict()["dynamic"]["kept"].nonzero().squeeze(1).tolist())


# -- the rule ----------------------------------------------------------------------------------


def test_epoch_zero_and_never_recorded_examples_are_always_kept():
    p = sw.DynamicPruner(6, prune=0.9, epochs=4, shuffle=False)
    p.set_epoch(0)
    assert list(p) == list(range(6)) and p.saving == 0.0
    # 2 never recorded; of the 4 recorded, mean 1.0: 0 and 1 are below it
    p.update(torch.tensor([0.0, 0.5, 1.5, 2.0]), torch.tensor([0, 1, 2, 3]))
    p.set_epoch(1)
    s = p.summary()
    assert s["threshold"] == pytest.approx(1.0) and s["below_mean"] == 2
    assert {2, 3, 4, 5} <= set(p)  # above the mean, or never recorded: kept
    assert p.weights(torch.tensor([4, 5])).tolist() == [1.0, 1.0]


def test_prune_is_the_fraction_of_below_mean_examples_skipped():
    losses = torch.cat((torch.zeros(37), torch.ones(13)))  # 37 below the mean
    for prune in (0.0, 0.1, 0.29, 0.5, 0.7, 0.99):
        p = recorded(50, losses, prune=prune)
        p.set_epoch(1)
        skip = math.floor(round(prune * 37, 6))  # 0.29 · 37 = 10.73 → 10
        k = 37 - skip
        assert len(p) == 50 - skip and p.saving == pytest.approx(skip / 50)
        assert p.summary()["scale"] == pytest.approx(37 / k)
        w = p.weights(torch.arange(50))
        kept = torch.tensor(kept_set(p))
        assert torch.equal(w[kept] > 1, torch.isin(kept, torch.arange(37))) or skip == 0
    # prune < 1 keeps at least one below-mean example: its loss is never dropped entirely
    p = recorded(3, torch.tensor([0.0, 0.0, 9.0]), prune=0.99)
    p.set_epoch(1)
    assert len(p) == 2 and p.summary()["scale"] == 2.0


def test_the_last_anneal_fraction_of_the_epochs_uses_all_data_at_weight_one():
    p = recorded(40, torch.arange(40.0), prune=0.5, anneal=0.25, epochs=8)
    assert p.pruning_epochs == 6
    lengths = []
    for epoch in range(10):
        p.set_epoch(epoch)
        lengths.append(len(p))
        if epoch >= 6:
            assert torch.equal(p.weights(torch.arange(40)), torch.ones(40))
    assert lengths[:6] == [30] * 6 and lengths[6:] == [40] * 4
    assert sw.DynamicPruner(5, anneal=0.1, epochs=30).pruning_epochs == 27  # not 26 (0.1·30)
    assert sw.DynamicPruner(5, anneal=0.0, epochs=3).pruning_epochs == 3
    assert sw.DynamicPruner(5, anneal=1.0, epochs=3).pruning_epochs == 0


def test_the_expected_epoch_loss_equals_the_full_data_loss_exactly():
    """Exhaustive: over the C(n, k) equally likely kept subsets of the below-mean examples, the
    mean weighted epoch loss is the full-data epoch loss. The support and its uniformity are
    checked on the pruner's real draws; the expectation is then exact, not a tolerance."""
    gen = torch.Generator().manual_seed(0)
    for n, prune in ((6, 0.5), (7, 0.34), (9, 0.8)):
        losses = torch.rand(n, generator=gen, dtype=torch.float64).float()
        p = recorded(n, losses, prune=prune)
        p.set_epoch(1)
        low = (losses.double() < losses.double().mean()).nonzero().squeeze(1).tolist()
        k = len(low) - math.floor(round(prune * len(low), 6))
        pi = p.inclusion_probabilities()
        # the weight an example gets when kept: n / k below the mean, else 1
        w = torch.where(torch.isin(torch.arange(n), torch.tensor(low)), len(low) / k, 1.0).double()
        kept = torch.tensor(kept_set(p))
        assert torch.equal(p.weights(kept).double(), w[kept])
        # 1. the weights are the inverse inclusion probabilities, so E[Σ_kept w l] = Σ l
        assert torch.allclose(pi * w, torch.ones(n, dtype=torch.float64), atol=1e-6)
        assert float((pi * w * losses.double()).sum()) == pytest.approx(float(losses.sum()))
        # 2. exhaustive expectation over every subset the rule can draw
        subsets = list(itertools.combinations(low, k))
        rest = [i for i in range(n) if i not in low]
        epoch_losses = [float((w * losses.double())[list(s) + rest].sum()) for s in subsets]
        assert sum(epoch_losses) / len(subsets) == pytest.approx(float(losses.sum()), rel=1e-6)
        # 3. the draws cover exactly those subsets, uniformly: 300 draws per subset, each count
        # within 5 binomial standard deviations (a false alarm ~1e-6 per subset)
        draws = 300 * len(subsets)
        counts: Counter = Counter()
        for seed in range(draws):
            q = recorded(n, losses, prune=prune, seed=seed)
            q.set_epoch(1)
            counts[tuple(i for i in kept_set(q) if i in low)] += 1
        assert set(counts) == set(subsets)
        sd = math.sqrt(draws * (1 / len(subsets)) * (1 - 1 / len(subsets)))
        assert all(abs(c - 300) <= 5 * sd for c in counts.values()), counts


def test_reweight_summed_over_an_epoch_is_the_weighted_kept_loss():
    losses = torch.linspace(0.1, 2.0, 20)
    p = recorded(20, losses, prune=0.5, seed=3)
    p.set_epoch(1)
    total = torch.zeros((), dtype=torch.float64)
    for batch in DataLoader(list(p), batch_size=6):
        total += p.reweight(losses[batch], batch).double() * len(batch)
    kept = torch.tensor(kept_set(p))
    assert float(total) == pytest.approx(float((p.weights(kept) * losses[kept]).sum()), rel=1e-6)


def test_composes_with_loss_weights_by_product_and_stays_unbiased():
    """JTT weights u and pruning: E[Σ_kept reweighter(p·l)] is the u-weighted full-data loss."""
    n = 12
    losses = torch.rand(n, generator=torch.Generator().manual_seed(1))
    u = sw.jtt_weights([1, 5, 9], n, upweight=4.0)
    rw = sw.LossReweighter(u)
    p = recorded(n, losses, prune=0.5, seed=2)
    p.set_epoch(1)
    idx = torch.tensor(kept_set(p))
    got = p.reweight(losses[idx], idx, reweighter=rw)
    want = (u[idx] * p.weights(idx) * losses[idx]).sum() / (len(idx) * u.mean())
    assert torch.allclose(got, want)
    assert torch.allclose(got, rw(losses[idx] * p.weights(idx), idx))
    # in expectation over the pruning draw (exact: inclusion probabilities), per-example sums
    pi = p.inclusion_probabilities()
    w = torch.where(pi < 1, p.summary()["scale"], 1.0).double()  # the weight when kept
    full = rw(losses, torch.arange(n)).double() * n
    expected = (pi * w * u.double() * losses.double()).sum()
    assert float(expected / u.double().mean()) == pytest.approx(float(full), rel=1e-6)
    # a reweighter for another dataset is refused before anything is recorded
    before = p.scores
    with pytest.raises(ValueError, match="num_examples=12"):
        p.reweight(losses[:2] + 5, [0, 1], reweighter=sw.LossReweighter(torch.ones(5)))
    with pytest.raises(TypeError, match="LossReweighter"):
        p.reweight(losses[:2], [0, 1], reweighter=u)  # type: ignore[arg-type]
    assert torch.equal(p.scores, before)


def test_the_decision_is_a_pure_function_of_seed_epoch_and_losses():
    losses = torch.rand(200, generator=torch.Generator().manual_seed(4))
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),  # noqa: NPY002
        random.getstate(),
    )
    a, b = recorded(200, losses, seed=7), recorded(200, losses.flip(0), seed=7)
    b.update(losses, torch.arange(200))  # same latest losses, recorded in another order
    for p in (a, b):
        p.set_epoch(3)
    assert kept_set(a) == kept_set(b) and list(a) == list(b)
    other_epoch, other_seed = recorded(200, losses, seed=7), recorded(200, losses, seed=8)
    other_epoch.set_epoch(4)
    other_seed.set_epoch(3)
    assert kept_set(other_epoch) != kept_set(a) and kept_set(other_seed) != kept_set(a)
    assert torch.equal(torch_state, torch.get_rng_state()) and random.getstate() == py_state
    assert all(np.array_equal(x, y) for x, y in zip(np_state, np.random.get_state(), strict=True))  # noqa: NPY002


def test_set_epoch_again_keeps_the_decision_taken():
    p = recorded(30, torch.arange(30.0), seed=1)
    p.set_epoch(1)
    first = kept_set(p)
    p.update(torch.arange(30.0).flip(0), torch.arange(30))  # new losses: the next epoch's
    p.set_epoch(1)
    assert kept_set(p) == first
    p.set_epoch(2)
    assert all(i >= 15 for i in set(range(30)) - set(kept_set(p)))  # pruned by the new losses


def test_recording_keeps_the_last_presentation_and_skips_non_finite_losses():
    p = sw.DynamicPruner(4, epochs=3)
    p.update(torch.tensor([1.0, 2.0, 3.0, 0.5]), torch.tensor([0, 1, 0, 2]))
    p.update(torch.tensor([math.inf, math.nan, 4.0]), torch.tensor([1, 2, 3]))
    assert p.scores.tolist() == [3.0, 2.0, 0.5, 4.0]
    p.update(torch.tensor([], dtype=torch.float16), torch.tensor([], dtype=torch.int64))
    assert p.scores.tolist() == [3.0, 2.0, 0.5, 4.0]
    assert p.reweight(torch.tensor([], dtype=torch.float16), []).item() == 0.0


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.ones(2, 1), [0, 1]), ValueError, "shape"),
        ((torch.ones(2, dtype=torch.int64), [0, 1]), TypeError, "float"),
        ((torch.ones(2), [0]), ValueError, "one index per loss"),
        ((torch.ones(2), [0, 9]), ValueError, "num_examples=4"),
        ((torch.ones(2), [0.0, 1.0]), TypeError, "integer"),
    ],
)
def test_a_bad_batch_is_refused_and_records_nothing(args, error, match):
    p = recorded(4, torch.tensor([0.1, 0.2, 0.3, 0.4]))
    before = copy.deepcopy(p.state_dict())
    for call in (p.update, p.reweight):
        with pytest.raises(error, match=match):
            call(*args)
    assert torch.equal(p.state_dict()["dynamic"]["scores"], before["dynamic"]["scores"])
    assert torch.equal(p.state_dict()["dynamic"]["fresh"], before["dynamic"]["fresh"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prune": 1.0}, ValueError, r"`prune` in \[0, 1\)"),
        ({"prune": -0.1}, ValueError, "prune"),
        ({"prune": math.nan}, ValueError, "prune"),
        ({"prune": True}, TypeError, "prune"),
        ({"prune": "0.5"}, TypeError, "prune"),
        ({"anneal": 1.5}, ValueError, r"`anneal` in \[0, 1\]"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"epochs": 2.0}, TypeError, "epochs"),
        ({"seed": 0.5}, TypeError, "seed"),
        ({"pad": None}, TypeError, "pad"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = {"epochs": 3, **kwargs}
    with pytest.raises(error, match=match):
        sw.DynamicPruner(10, **kwargs)


def test_progress_spans_each_epoch_equally_whatever_its_length():
    p = recorded(40, torch.arange(40.0), epochs=4)
    assert p.progress(0, 10) == 0.0
    p.set_epoch(1)
    assert p.progress(3, 3) == 0.5 and p.progress(1, 4) == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="batches_done"):
        p.progress(4, 3)
    with pytest.raises(ValueError, match="batches_in_epoch"):
        p.progress(0, 0)


# -- sampler invariants ------------------------------------------------------------------------


def pruned_epoch(seed=0, **kwargs):
    p = recorded(23, torch.linspace(0, 1, 23), prune=0.6, seed=seed, **kwargs)
    p.set_epoch(2)
    return p


@pytest.mark.parametrize(
    ("world", "mode"), [(1, "pad"), (2, "pad"), (3, "pad"), (3, "drop"), (3, "uneven")]
)
def test_shards_cover_the_kept_set_exactly(world, mode):
    settings = {"pad": {}, "drop": {"drop_last": True}, "uneven": {"pad": False}}[mode]
    kept = kept_set(pruned_epoch())
    parts = [list(pruned_epoch(num_replicas=world, rank=r, **settings)) for r in range(world)]
    lengths = [len(pruned_epoch(num_replicas=world, rank=r, **settings)) for r in range(world)]
    assert [len(x) for x in parts] == lengths
    union = Counter(itertools.chain.from_iterable(parts))
    if mode == "uneven":
        assert union == Counter(kept)
    elif mode == "drop":
        assert not union - Counter(kept) and len(kept) - sum(union.values()) < world
    else:
        assert (
            not Counter(kept) - union
            and sum(union.values()) == math.ceil(len(kept) / world) * world
        )
        assert len(set(lengths)) == 1


def test_every_iterator_has_its_own_cursor_and_the_order_is_seeded():
    p = pruned_epoch(seed=5)
    full = list(p)
    assert sorted(full) == kept_set(p)
    a, b = iter(p), iter(p)
    head = [next(a) for _ in range(4)]
    assert list(b) == full and head + list(a) == full  # interleaved: nothing lost or shifted
    assert list(p) == full == list(pruned_epoch(seed=5))
    assert list(pruned_epoch(seed=6)) != full


def test_len_of_the_loader_is_known_after_set_epoch_before_the_epoch_starts():
    n = 64
    ds = sw.WithIndex(TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,))))
    p = sw.DynamicPruner(n, prune=0.5, epochs=6, seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=p)
    for epoch in range(6):
        p.set_epoch(epoch)
        expected = len(loader)
        seen = []
        for x, _, idx in loader:
            p.reweight(x.pow(2).sum(1), idx)
            seen.extend(idx.tolist())
        assert len(seen) == len(p) and math.ceil(len(p) / 8) == expected
        assert sorted(seen) == kept_set(p)
    assert p.summary()["pruning"] is False and len(p) == n  # 6·0.125 → the last epoch is full


def test_mid_epoch_resume_restores_losses_decision_and_order(tmp_path):
    def make():
        return sw.DynamicPruner(40, prune=0.5, epochs=6, seed=2, num_replicas=2, rank=1)

    losses = torch.rand(40, generator=torch.Generator().manual_seed(0))
    a = make()
    a.update(losses, torch.arange(40))
    a.set_epoch(1)
    full = list(a)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    a.update(losses[head] * 3, torch.tensor(head))  # losses of the epoch so far
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    b = make()
    b.load_state_dict(torch.load(path))
    b.set_epoch(1)  # the saved epoch: keeps the decision and the position
    assert head + list(b) == full and torch.equal(b.scores, a.scores)
    assert torch.equal(b.weights(torch.arange(40)), a.weights(torch.arange(40)))
    rest = torch.tensor(full[5:])
    a.update(losses[rest] / 2, rest)
    b.update(losses[rest] / 2, rest)
    for p in (a, b):
        p.set_epoch(2)
    assert list(a) == list(b) and p.summary() == a.summary()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("dynamic"), "no `dynamic` field"),
        (lambda s: s["dynamic"].update(prune=0.3), "prune=0.3"),
        (lambda s: s["dynamic"].update(epochs=7), "epochs=7"),
        (lambda s: s["dynamic"].update(scale=3.0), "scale"),
        (lambda s: s["dynamic"].update(scores=torch.zeros(5)), "scores"),
        (lambda s: s["dynamic"].update(decision_epoch=0), "decision_epoch"),
        (lambda s: s["dynamic"]["kept"].zero_(), "keeps no example"),
        (lambda s: s.update(seed=9), "seed=9"),
        (lambda s: s.update(position=10_000), "position"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(edit, match):
    a = recorded(20, torch.arange(20.0), seed=1)
    a.set_epoch(1)
    state = copy.deepcopy(a.state_dict())
    edit(state)
    b = recorded(20, torch.arange(20.0).flip(0), seed=1)
    b.set_epoch(3)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(sw.StateMismatchError, match=match):
        b.load_state_dict(state)
    after = b.state_dict()
    assert after.keys() == before.keys() and list(b) == list(b)
    for key in ("epoch", "position", "seed"):
        assert after[key] == before[key]
    for key in ("scores", "kept", "low", "fresh"):
        assert torch.equal(after["dynamic"][key], before["dynamic"][key]), key
    assert len(b) == len(before["dynamic"]["kept"].nonzero())


# -- DDP -----------------------------------------------------------------------------------------


def _ddp_epochs(rank, world):
    """Two epochs on uneven shards (pad=False, 21 examples), one short last batch each."""
    losses = torch.linspace(0.0, 2.0, 21) ** 2
    p = sw.DynamicPruner(21, prune=0.5, epochs=5, seed=3, pad=False)
    out = []
    for epoch in range(3):
        p.set_epoch(epoch)  # the collective: merges the ranks' latest losses
        shard, merged = list(p), p.scores
        for batch in DataLoader(shard, batch_size=4):
            p.reweight(losses[batch] + epoch, batch)
        out.append((shard, merged, p.summary()))
    return out


@pytest.mark.ddp
def test_ranks_merge_their_losses_and_take_the_same_decision():
    results = run_ddp(_ddp_epochs, timeout=60)
    losses = torch.linspace(0.0, 2.0, 21) ** 2
    reference = sw.DynamicPruner(21, prune=0.5, epochs=5, seed=3)  # one process, all losses
    for epoch in range(3):
        reference.set_epoch(epoch)
        (s0, scores0, sum0), (s1, scores1, sum1) = (results[0][epoch], results[1][epoch])
        assert sorted(s0 + s1) == kept_set(reference)  # the union covers the kept set
        assert sum0 == sum1 == reference.summary()  # the same decision on every rank
        ref = reference.scores.nan_to_num(-1.0)
        assert torch.equal(scores0.nan_to_num(-1.0), ref) and torch.equal(
            scores1.nan_to_num(-1.0), ref
        )
        kept = torch.tensor(kept_set(reference))
        reference.update(losses[kept] + epoch, kept)
        assert len(s0) + len(s1) == len(kept) and abs(len(s0) - len(s1)) <= 1
