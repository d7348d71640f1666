"""Adversarial review 3: samplers, dynamic pruning, Group DRO and loss reweighting.

References are built by hand: exhaustive enumeration of every epoch's multiset over all ranks,
``DistributedSampler`` where it has the same order, a plain-Python port of InfoBatch's rule (as
this library defines it), the authors' ``LossComputer`` (``groupdro_reference``) and weighted
means computed with ``math.fsum``. The bugs it found are fixed; their tests say what was wrong
before.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

import sampleweights as sw
from groupdro_reference import ReferenceLossComputer

KEEP = [9, 2, 5, 7, 0, 11, 3]  # deliberately unsorted


class _Range(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _make(kind: str, **kw: Any) -> Any:
    if kind == "pruned":
        return sw.PrunedSampler(np.array(KEEP, dtype=np.int32), num_examples=12, **kw)
    if kind == "upsample":
        return sw.UpsampleSampler(np.array([0, 2, 1, 3]), **kw)
    return sw.JTTSampler([1, 3], 5, 3, **kw)


_MULTISET = {
    "pruned": Counter(KEEP),
    "upsample": Counter({1: 2, 2: 1, 3: 3}),
    "jtt": Counter({0: 1, 1: 3, 2: 1, 3: 3, 4: 1}),
}


# -- samplers: every epoch's multiset, by enumeration ------------------------------------------


@pytest.mark.parametrize("kind", ["pruned", "upsample", "jtt"])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("mode", ["pad", "nopad", "drop"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_epoch_over_all_ranks_is_the_multiset(kind, world, mode, shuffle):
    flags = {"pad": {}, "nopad": {"pad": False}, "drop": {"drop_last": True}}[mode]
    samplers = [
        _make(kind, num_replicas=world, rank=r, seed=3, shuffle=shuffle, **flags)
        for r in range(world)
    ]
    expected = _MULTISET[kind]
    size = sum(expected.values())
    for epoch in (0, 1, 7, 2):  # backwards too
        for s in samplers:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert [len(x) for x in shards] == [len(s) for s in samplers]
        got = Counter(i for shard in shards for i in shard)
        if mode == "nopad":  # each item exactly once per epoch
            assert got == expected and sum(map(len, shards)) == size
        elif mode == "pad":  # the multiset plus the fewest repeats making shards equal
            assert all(got[i] >= c for i, c in expected.items()) and set(got) == set(expected)
            assert sum(map(len, shards)) == math.ceil(size / world) * world
            assert len({len(x) for x in shards}) == 1
        else:  # drop_last: a sub-multiset of the multiset, size a multiple of the world
            assert all(got[i] <= expected[i] for i in got)
            assert sum(map(len, shards)) == size // world * world


@pytest.mark.parametrize("world", [1, 2, 3, 9])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_pruned_order_is_distributed_samplers_order_mapped_to_the_kept_indices(
    world, drop_last, shuffle
):
    keep = torch.tensor(KEEP)
    for epoch in (0, 3):
        for rank in range(world):
            ours = sw.PrunedSampler(
                keep, num_replicas=world, rank=rank, seed=11, drop_last=drop_last, shuffle=shuffle
            )
            ours.set_epoch(epoch)
            ref = DistributedSampler(
                _Range(len(KEEP)),
                num_replicas=world,
                rank=rank,
                shuffle=shuffle,
                seed=11,
                drop_last=drop_last,
            )
            ref.set_epoch(epoch)
            assert list(ours) == [KEEP[i] for i in ref]
            assert len(ours) == len(ref)


@pytest.mark.parametrize("num_samples", [1, 4, 9, 15])
def test_num_samples_cycles_the_multiset_without_padding(num_samples):
    samplers = [
        _make("pruned", num_samples=num_samples, num_replicas=2, rank=r, pad=False)
        for r in range(2)
    ]
    got = Counter(i for s in samplers for i in s)
    assert sum(got.values()) == num_samples
    full, rest = divmod(num_samples, len(KEEP))
    counts = sorted(got[i] for i in KEEP)
    assert counts == sorted([full] * (len(KEEP) - rest) + [full + 1] * rest)


def test_a_selection_of_one_on_many_ranks():
    for rank in range(4):
        s = sw.PrunedSampler([5], num_replicas=4, rank=rank)
        assert list(s) == [5] and len(s) == 1
    assert [len(sw.PrunedSampler([5], num_replicas=4, rank=r, pad=False)) for r in range(4)] == [
        1,
        0,
        0,
        0,
    ]


# -- samplers: resume, cursors, set_epoch --------------------------------------------------------


@pytest.mark.parametrize("kind", ["pruned", "upsample", "jtt"])
@pytest.mark.parametrize(("world", "mode"), [(1, "pad"), (3, "pad"), (3, "nopad"), (2, "drop")])
def test_state_taken_mid_iteration_resumes_the_identical_rest_in_a_fresh_sampler(kind, world, mode):
    flags = {"pad": {}, "nopad": {"pad": False}, "drop": {"drop_last": True}}[mode]
    for rank in range(world):
        a = _make(kind, num_replicas=world, rank=rank, seed=5, **flags)
        a.set_epoch(2)
        full = list(a)
        for k in range(len(full) + 1):
            it = iter(a)
            head = [next(it) for _ in range(k)]
            state = copy.deepcopy(a.state_dict())
            assert state["position"] == k
            b = _make(kind, num_replicas=world, rank=rank, seed=5, **flags)
            b.load_state_dict(state)
            assert b.state_dict()["position"] == k  # before iterating: the pending offset
            b.set_epoch(2)  # the saved epoch keeps the offset
            assert head + list(b) == full
            assert b.state_dict()["position"] == len(full)
            assert list(b) == full  # one shot: the next epoch is whole


@pytest.mark.parametrize(
    "settings",
    [
        {"seed": 6},
        {"shuffle": False},
        {"pad": False},
        {"drop_last": True},
        {"num_samples": 7},
        {"num_replicas": 2, "rank": 0},
    ],
)
def test_a_state_from_other_settings_is_refused_and_changes_nothing(settings):
    a = _make("pruned", seed=5)
    a.set_epoch(3)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    kw = {"seed": 5, **settings}
    b = _make("pruned", **kw)
    b.set_epoch(1)
    before = list(b)
    with pytest.raises(sw.StateMismatchError, match=next(iter(settings))):
        b.load_state_dict(state)
    assert b.epoch == 1 and list(b) == before and b.state_dict()["position"] == len(before)


def test_a_state_from_another_selection_or_sampler_type_is_refused():
    a = sw.PrunedSampler([0, 1, 2, 3])
    state = a.state_dict()
    for other in (sw.PrunedSampler([0, 1, 2, 4]), sw.PrunedSampler([3, 2, 1, 0])):
        with pytest.raises(sw.StateMismatchError, match="fingerprint"):
            other.load_state_dict(state)
    with pytest.raises(sw.StateMismatchError, match="sampler"):
        sw.UpsampleSampler([1, 1, 1, 1]).load_state_dict(state)


def test_two_interleaved_iterators_and_a_peek_lose_nothing():
    s = _make("jtt", seed=2)
    s.set_epoch(4)
    full = list(s)
    peeked = next(iter(s))  # next(iter(loader)) before the epoch
    i1, i2 = iter(s), iter(s)
    a, b = [], []
    for _ in range(len(full)):
        a.append(next(i1))
        b.append(next(i2))
    assert a == b == full and peeked == full[0]
    assert s.state_dict()["position"] == len(full)


def test_an_iterator_created_before_set_epoch_keeps_its_epoch():
    s = _make("pruned", seed=2)
    s.set_epoch(1)
    epoch1 = list(s)
    it = iter(s)
    first = next(it)
    s.set_epoch(2)
    assert [first, *it] == epoch1
    assert s.state_dict()["position"] == 0  # the current epoch (2) has given out nothing


def test_set_epoch_backwards_repeats_the_earlier_order_exactly():
    s = _make("upsample", seed=-3)
    orders = {}
    for e in (0, 1, 2, 3):
        s.set_epoch(e)
        orders[e] = list(s)
    for e in (2, 0, 3, 1):
        s.set_epoch(np.int32(e))
        assert list(s) == orders[e] and len(s) == len(orders[e])


def test_leaving_an_epoch_and_coming_back_does_not_report_the_old_position():
    """Before: set_epoch(3) → 5 of 10 items → set_epoch(2) → set_epoch(3) → state_dict(): expected
    position 0 (nothing of the re-set epoch handed out), got 5; a fresh sampler then resumes and
    loses 5 items silently (samplers.py _consumed / set_epoch keep the stale cursor)"""
    s = sw.PrunedSampler(range(10), seed=0)
    s.set_epoch(3)
    it = iter(s)
    for _ in range(5):
        next(it)
    s.set_epoch(2)
    s.set_epoch(3)
    state = s.state_dict()
    t = sw.PrunedSampler(range(10), seed=0)
    t.load_state_dict(state)
    assert state["position"] == 0 and len(list(t)) == 10


def test_consumed_is_checked_and_numpy_ints_accepted():
    s = _make("pruned")
    assert s.state_dict(consumed=np.int64(3))["position"] == 3
    with pytest.raises(TypeError, match="consumed"):
        s.state_dict(consumed=True)
    with pytest.raises(TypeError, match="consumed"):
        s.state_dict(consumed=3.0)
    for bad in (-1, len(s) + 1):
        with pytest.raises(ValueError, match="consumed"):
            s.state_dict(consumed=bad)


# -- samplers: inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices",
    [
        np.array(KEEP, dtype=np.int32),
        np.array(KEEP, dtype=np.uint64),
        np.array(KEEP)[::-1][::-1],
        torch.tensor(KEEP, dtype=torch.int32),
        torch.tensor([KEEP, KEEP]).t()[:, 0],  # non-contiguous
        [np.int16(i) for i in KEEP],
        tuple(KEEP),
    ],
)
def test_index_inputs_of_any_integer_kind_are_the_same_sampler(indices):
    ref = sw.PrunedSampler(torch.tensor(KEEP), seed=4)
    s = sw.PrunedSampler(indices, seed=4, num_examples=np.int64(12))
    assert s.fingerprint == ref.fingerprint and list(s) == list(ref)


@pytest.mark.parametrize(
    ("make", "exc", "name"),
    [
        (lambda: sw.PrunedSampler(np.array([True, False, True])), TypeError, "indices"),
        (lambda: sw.PrunedSampler(torch.tensor([True, False])), TypeError, "indices"),
        (lambda: sw.PrunedSampler([1.0, 2.0]), TypeError, "indices"),
        (lambda: sw.PrunedSampler([1, 1]), ValueError, "indices"),
        (lambda: sw.PrunedSampler([3], num_examples=3), ValueError, "indices"),
        (lambda: sw.PrunedSampler([-1]), ValueError, "indices"),
        (lambda: sw.UpsampleSampler(np.array([True, False])), TypeError, "repeats"),
        (lambda: sw.UpsampleSampler([1, -1]), ValueError, "repeats"),
        (lambda: sw.UpsampleSampler([0, 0]), ValueError, "repeats"),
        (lambda: sw.JTTSampler([1, 1], 4, 2), ValueError, "error_indices"),
        (lambda: sw.JTTSampler([4], 4, 2), ValueError, "error_indices"),
        (lambda: sw.JTTSampler(np.array([True]), 4, 2), TypeError, "error_indices"),
        (lambda: sw.JTTSampler([1], 4, 1.5), TypeError, "upweight"),
        (lambda: sw.JTTSampler([1], 4, 0), ValueError, "upweight"),
        (lambda: sw.PrunedSampler([1], num_replicas=2, rank=2), ValueError, "rank"),
        (lambda: sw.PrunedSampler([1], seed=1.0), TypeError, "seed"),
    ],
)
def test_bad_sampler_inputs_name_the_argument(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_an_empty_selection_names_the_argument():
    """Before: PrunedSampler([]) / PrunedSampler(np.array([], int)): expected an error naming
    `indices`; got 'The sampler would yield nothing: the selection is empty.' (samplers.py
    _MultisetSampler.__init__, the items.numel() == 0 check)"""
    with pytest.raises(ValueError, match="indices"):
        sw.PrunedSampler([])


def test_an_empty_error_set_is_the_plain_epoch():
    s = sw.JTTSampler([], 4, 5, shuffle=False)
    assert list(s) == [0, 1, 2, 3]


# -- DynamicPruner: the rule against a plain-Python port ----------------------------------------


def _port(scores: list[float | None], prune: float, epoch: int, pruning_epochs: int):
    """The documented rule: ``(low, skip)`` or None for "keep everything at weight 1"."""
    seen = [s for s in scores if s is not None]
    if epoch >= pruning_epochs or prune == 0 or not seen:
        return None
    threshold = math.fsum(seen) / len(seen)
    low = {i for i, s in enumerate(scores) if s is not None and s < threshold}
    n = len(low)
    skip = min(math.floor(prune * n + 1e-9), max(n - 1, 0))
    return low, skip


@pytest.mark.parametrize("trial", range(40))
def test_each_epochs_decision_is_the_rule(trial):
    g = torch.Generator().manual_seed(trial)
    n = int(torch.randint(1, 40, (1,), generator=g))
    prune = [0.0, 0.5, 0.999999, float(torch.rand(1, generator=g))][trial % 4]
    p = sw.DynamicPruner(n, prune=prune, anneal=0.25, epochs=8, seed=trial)
    p.set_epoch(0)
    assert sorted(p) == list(range(n)) and len(p) == n  # epoch 0: the full data
    seen = torch.rand(n, generator=g) < 0.7
    losses = torch.rand(n, generator=g) * 3
    idx = torch.arange(n)[seen]
    p.reweight(losses[idx].half().float(), idx)
    scores = [float(losses[i].half()) if seen[i] else None for i in range(n)]
    for epoch in (1, 5, 6, 9):  # 6 and 9: the anneal phase and beyond the schedule
        p.set_epoch(epoch)
        kept = list(p)
        w = p.weights(torch.arange(n)).tolist()
        assert len(kept) == len(set(kept)) == len(p)
        rule = _port(scores, prune, epoch, p.pruning_epochs)
        if rule is None:
            assert sorted(kept) == list(range(n)) and w == [1.0] * n
            continue
        low, skip = rule
        kept_low = [i for i in kept if i in low]
        assert set(range(n)) - low <= set(kept)
        assert len(kept_low) == len(low) - skip
        scale = len(low) / (len(low) - skip) if low else 1.0
        for i in range(n):
            expected = scale if i in low and i in kept else 1.0
            assert w[i] == pytest.approx(expected, rel=1e-6)
        # the loss returned: Σ pᵢ·lossᵢ / B, by hand
        batch = torch.tensor(kept[:5])
        loss = torch.rand(len(batch), generator=g)
        q = copy.deepcopy(p)
        hand = math.fsum(
            (scale if int(i) in low else 1.0) * float(x) for i, x in zip(batch, loss, strict=True)
        ) / len(batch)
        assert float(q.reweight(loss, batch)) == pytest.approx(hand, rel=1e-6)


def test_the_pruning_draw_is_uniform_over_the_below_mean_examples():
    # 4 below the mean, prune 0.5: each of them kept with probability 1/2 over seeds
    losses = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 5.0])
    hits = Counter()
    for seed in range(400):
        p = sw.DynamicPruner(6, prune=0.5, epochs=4, seed=seed, shuffle=False)
        p.update(losses, torch.arange(6))
        p.set_epoch(1)
        kept = list(p)
        assert {4, 5} <= set(kept) and len(kept) == 4
        hits.update(i for i in kept if i < 4)
    assert all(150 < hits[i] < 250 for i in range(4))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_lengths_are_known_after_set_epoch_and_unpadded_shards_cover_the_kept_set(world):
    g = torch.Generator().manual_seed(world)
    losses = torch.rand(29, generator=g)
    ps = [
        sw.DynamicPruner(29, prune=0.7, epochs=6, seed=1, num_replicas=world, rank=r, pad=False)
        for r in range(world)
    ]
    for epoch in range(7):
        lengths = []
        for p in ps:
            p.set_epoch(epoch)
            lengths.append(len(p))
        shards = [list(p) for p in ps]
        assert [len(s) for s in shards] == lengths
        union = sorted(i for s in shards for i in s)
        assert union == sorted(set(union)) == ps[0]._decision.items.tolist()
        for p in ps:
            p.update(losses + epoch, torch.arange(29))


def test_never_seen_and_non_finite_examples_are_always_kept_at_weight_one():
    p = sw.DynamicPruner(6, prune=0.99, epochs=4, shuffle=False)
    losses = torch.tensor([0.5, float("nan"), 2.0, float("inf"), 0.25, 70000.0]).half()
    p.update(losses, np.array([0, 1, 2, 3, 4, 5], dtype=np.int32))  # 70000 is inf in fp16
    assert torch.isnan(p.scores[[1, 3, 5]]).all()
    p.set_epoch(1)
    assert {1, 2, 3, 5} <= set(p)
    assert p.weights([1, 2, 3, 5]).tolist() == [1.0] * 4


def test_duplicate_rows_of_one_index_record_the_last():
    p = sw.DynamicPruner(4, prune=0.5, epochs=6)
    p.update(torch.tensor([1.0, 5.0, 3.0, 7.0]), [1, 2, 1, 2])
    assert p.scores[1:3].tolist() == [3.0, 7.0]


@pytest.mark.parametrize(
    ("loss", "idx", "exc"),
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 5]), ValueError),
        (torch.tensor([1.0, 2.0]), torch.tensor([-1, 0]), ValueError),
        (torch.tensor([1.0, 2.0]), torch.tensor([0]), ValueError),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), TypeError),
        (torch.tensor([1.0, 2.0]), np.array([True, False]), TypeError),
        (torch.tensor([[1.0, 2.0]]), [0, 1], ValueError),
    ],
)
def test_a_bad_batch_records_nothing(loss, idx, exc):
    p = sw.DynamicPruner(5, prune=0.5, epochs=6)
    p.update(torch.arange(5.0), torch.arange(5))
    before = copy.deepcopy(p.state_dict())
    with pytest.raises(exc):
        p.reweight(loss, idx)
    with pytest.raises(exc):
        p.update(loss, idx)
    after = p.state_dict()
    for key in ("scores", "fresh", "kept"):
        assert torch.equal(
            after["dynamic"][key].nan_to_num(-1), before["dynamic"][key].nan_to_num(-1)
        )


def test_a_reweighter_of_another_size_records_nothing():
    p = sw.DynamicPruner(5, prune=0.5, epochs=6)
    with pytest.raises(ValueError, match="reweighter"):
        p.reweight(torch.ones(2), [0, 1], reweighter=sw.LossReweighter(torch.ones(4)))
    assert torch.isnan(p.scores).all()


def test_pruning_weights_compose_with_a_reweighter_by_product():
    p = sw.DynamicPruner(6, prune=0.5, epochs=6, shuffle=False, seed=2)
    p.update(torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 5.0]), torch.arange(6))
    p.set_epoch(1)
    u = torch.tensor([1.0, 2.0, 3.0, 1.0, 4.0, 1.0])
    rw = sw.LossReweighter(u)
    batch = torch.tensor(list(p))
    loss = torch.linspace(0.5, 2.0, len(batch))
    pw = p.weights(batch)
    hand = math.fsum(float(pw[k] * u[i] * loss[k]) for k, i in enumerate(batch)) / (
        len(batch) * float(u.double().mean())
    )
    assert float(copy.deepcopy(p).reweight(loss, batch, reweighter=rw)) == pytest.approx(hand)


def _train(p: sw.DynamicPruner, losses: torch.Tensor, epochs, stop=None, batch=4):
    out = []
    for e in epochs:
        p.set_epoch(e)
        items = list(p)
        for k in range(0, len(items), batch):
            if stop == (e, k // batch):
                return out, p.state_dict(consumed=k)
            b = torch.tensor(items[k : k + batch])
            out.append((e, b.tolist(), float(p.reweight(losses[e][b], b))))
    return out, None


@pytest.mark.parametrize(("world", "rank", "pad"), [(1, 0, True), (3, 1, True), (3, 2, False)])
@pytest.mark.parametrize("stop", [(0, 1), (1, 1), (2, 0), (4, 1)])
def test_mid_epoch_resume_in_a_fresh_pruner_is_the_uninterrupted_run(world, rank, pad, stop):
    n, epochs = 23, 6
    losses = torch.rand(epochs, n, generator=torch.Generator().manual_seed(0)) * torch.arange(
        1.0, epochs + 1
    ).unsqueeze(1)
    kw = dict(prune=0.6, anneal=0.2, epochs=epochs, seed=4, num_replicas=world, rank=rank, pad=pad)
    full, _ = _train(sw.DynamicPruner(n, **kw), losses, range(epochs))
    head, state = _train(sw.DynamicPruner(n, **kw), losses, range(epochs), stop)
    assert state is not None
    b = sw.DynamicPruner(n, **kw)
    b.load_state_dict(copy.deepcopy(state))
    e0 = state["epoch"]
    b.set_epoch(e0)  # the saved decision and position are kept
    items = list(b)
    rest = []
    for k in range(0, len(items), 4):
        t = torch.tensor(items[k : k + 4])
        rest.append((e0, t.tolist(), float(b.reweight(losses[e0][t], t))))
    tail, _ = _train(b, losses, range(e0 + 1, epochs))
    got = head + rest + tail
    assert [x[:2] for x in got] == [x[:2] for x in full]
    assert [x[2] for x in got] == pytest.approx([x[2] for x in full], rel=1e-6)


@pytest.mark.parametrize(
    "settings",
    [{"prune": 0.4}, {"epochs": 7}, {"anneal": 0.5}, {"seed": 1}, {"pad": False}],
)
def test_a_pruner_state_from_other_settings_changes_nothing(settings):
    a = sw.DynamicPruner(10, prune=0.5, epochs=6)
    a.update(torch.arange(10.0), torch.arange(10))
    a.set_epoch(1)
    state = a.state_dict()
    b = sw.DynamicPruner(10, **{"prune": 0.5, "epochs": 6, **settings})
    b.update(torch.arange(10.0).flip(0), torch.arange(10))
    b.set_epoch(2)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(sw.StateMismatchError):
        b.load_state_dict(state)
    after = b.state_dict()
    assert after["epoch"] == before["epoch"] == 2
    for key in ("scores", "kept", "low"):
        assert torch.equal(after["dynamic"][key], before["dynamic"][key])


def test_progress_is_clamped_past_the_schedule_and_checks_its_arguments():
    p = sw.DynamicPruner(10, epochs=4)
    p.set_epoch(9)
    assert p.progress(0, 5) == 1.0
    with pytest.raises(ValueError, match="batches_done"):
        p.progress(6, 5)
    with pytest.raises(ValueError, match="batches_in_epoch"):
        p.progress(0, 0)


@pytest.mark.parametrize("prune", [-0.1, 1.0, float("nan"), True, "0.5"])
def test_bad_prune_is_refused(prune):
    with pytest.raises((TypeError, ValueError), match="prune"):
        sw.DynamicPruner(10, prune=prune, epochs=4)


# -- GroupDROLoss against the authors' LossComputer ---------------------------------------------


@pytest.mark.parametrize("adj", [None, 2.0])
@pytest.mark.parametrize("eta", [0.0, 0.01, 1.0, 5.0])
def test_group_dro_is_the_reference_step_by_step(adj, eta):
    g = torch.Generator().manual_seed(int(eta * 100) + (adj is not None))
    num_groups = 4
    counts = torch.tensor([100.0, 20.0, 5.0, 50.0])
    ref = ReferenceLossComputer(
        num_groups,
        counts,
        None if adj is None else torch.full((num_groups,), adj),
        eta,
        dtype=torch.float64,
    )
    ours = sw.GroupDROLoss(num_groups, eta, adj, counts if adj else None)
    for step in range(30):
        b = int(torch.randint(0, 9, (1,), generator=g))  # 0: an empty batch
        groups = torch.randint(0, 2 if step % 3 == 0 else num_groups, (b,), generator=g)
        loss = (torch.rand(b, generator=g) * 3).requires_grad_()
        loss64 = loss.detach().clone().double().requires_grad_()
        out = ours(loss, groups.numpy().astype(np.int32))
        expected = ref.loss(loss64, groups)
        assert torch.allclose(ours.weights.double(), ref.adv_probs, atol=1e-6)
        shift = float(ours.weights.double() @ ours.adjustment) if adj else 0.0
        assert float(out.detach()) + shift == pytest.approx(float(expected.detach()), abs=1e-5)
        if b:
            out.backward()
            expected.backward()
            assert torch.allclose(loss.grad.double(), loss64.grad, atol=1e-6)
    assert ours.num_steps == 30


@pytest.mark.parametrize(
    ("loss", "groups", "exc"),
    [
        (torch.tensor([1.0, 2.0]), torch.tensor([0, 3]), ValueError),
        (torch.tensor([1.0, 2.0]), torch.tensor([-1, 0]), ValueError),
        (torch.tensor([1.0, float("nan")]), [0, 1], ValueError),
        (torch.tensor([1.0, 70000.0]).half(), [0, 1], ValueError),
        (torch.tensor([1.0, 2.0]), np.array([True, False]), TypeError),
        (torch.tensor([1.0, 2.0]), [0], ValueError),
    ],
)
def test_group_dro_rejects_bad_batches_and_changes_nothing(loss, groups, exc):
    gd = sw.GroupDROLoss(3, 1.0)
    gd(torch.tensor([0.5, 1.5]), [0, 2])
    before = copy.deepcopy(gd.state_dict())
    with pytest.raises(exc):
        gd(loss, groups)
    after = gd.state_dict()
    assert after["num_steps"] == before["num_steps"] == 1
    for key in ("log_weights", "loss_sum", "count"):
        assert torch.equal(after[key], before[key])


def test_group_dro_without_validation_still_fails_out_of_range_before_changing():
    gd = sw.GroupDROLoss(3, 1.0, validate=False)
    for groups in (torch.tensor([0, 3]), torch.tensor([-1, 0])):
        with pytest.raises((IndexError, RuntimeError)):
            gd(torch.tensor([1.0, 2.0]), groups)
    assert gd.num_steps == 0 and torch.allclose(gd.weights, torch.full((3,), 1 / 3))


def test_group_dro_state_resumes_exactly_and_fp16_is_summed_wide():
    a = sw.GroupDROLoss(3, 1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a(torch.rand(6, generator=g), torch.randint(0, 3, (6,), generator=g))
    b = sw.GroupDROLoss(3, 1.0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(5):
        loss, groups = torch.rand(6, generator=g).half(), torch.randint(0, 3, (6,), generator=g)
        assert torch.equal(a(loss, groups), b(loss, groups))
        assert torch.equal(a.weights, b.weights)
    big = sw.GroupDROLoss(2, 0.0)
    assert float(big(torch.tensor([60000.0, 60000.0]).half(), [0, 1])) == 60000.0


# -- LossReweighter / jtt_weights ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_three_normalisations_by_hand(dtype):
    w = [0.0, 2.0, 1.0, 5.0]
    idx, loss = [0, 0, 3, 2], [1.0, 2.0, 3.0, 0.5]
    total = math.fsum(w[i] * x for i, x in zip(idx, loss, strict=True))
    hand = {
        "mean": total / (len(idx) * (sum(w) / len(w))),
        "batch": total / len(idx),
        "weights": total / math.fsum(w[i] for i in idx),
    }
    for normalize, expected in hand.items():
        rw = sw.LossReweighter(torch.tensor(w), normalize)
        out = rw(torch.tensor(loss, dtype=dtype), np.array(idx, dtype=np.int32))
        assert out.dtype == dtype
        assert float(out) == pytest.approx(expected, rel=1e-3 if dtype == torch.float16 else 1e-6)
        assert float(rw(torch.tensor([], dtype=dtype), [])) == 0.0
    assert float(sw.LossReweighter(torch.tensor(w), "weights")(torch.ones(2), [0, 0])) == 0.0


def test_jtt_loss_weights_on_the_full_batch_equal_the_upsampled_epochs_mean():
    n, errors, lam = 7, [1, 4], 5
    losses = torch.linspace(0.1, 2.0, n, dtype=torch.float64)
    rw = sw.LossReweighter(sw.jtt_weights(np.array(errors), n, np.int64(lam)))
    epoch = list(sw.JTTSampler(errors, n, lam, seed=3))
    mean_upsampled = math.fsum(float(losses[i]) for i in epoch) / len(epoch)
    assert float(rw(losses, torch.arange(n))) == pytest.approx(mean_upsampled, rel=1e-6)
    assert Counter(epoch) == {i: (lam if i in errors else 1) for i in range(n)}


def test_reweighter_bad_inputs_change_nothing():
    rw = sw.LossReweighter(torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="indices"):
        rw(torch.ones(2), [0, 2])
    with pytest.raises(TypeError, match="indices"):
        rw(torch.ones(2), np.array([True, False]))
    with pytest.raises(ValueError, match="normalize"):
        sw.LossReweighter(torch.ones(2), "Mean")
    for bad in ([0.0, 0.0], [1.0, -1.0], [1.0, float("inf")], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            sw.LossReweighter(torch.tensor(bad))
    for bad in (0.5, float("nan"), 1e39):
        with pytest.raises(ValueError, match="upweight"):
            sw.jtt_weights([0], 4, bad)
    with pytest.raises(TypeError, match="upweight"):
        sw.jtt_weights([0], 4, True)
    assert float(rw(torch.ones(2), [0, 1])) == 1.0


def test_reweighter_weights_are_a_private_copy():
    w = np.array([1.0, 3.0], dtype=np.float32)
    rw = sw.LossReweighter(w)
    w[:] = 100.0
    assert rw.weights.tolist() == [1.0, 3.0]
    assert float(rw(torch.ones(2), [0, 1])) == 1.0


def test_a_positive_weight_that_float32_flushes_to_zero_is_refused():
    """Before: LossReweighter(torch.tensor([1e-50, 1.0], dtype=float64)): the docstring says
    weights float32 rounds to 0 are refused; got accepted, example 0 silently weighted 0
    (reweight.py __init__: only all-zero after the float32 cast is refused)"""
    with pytest.raises(ValueError, match="weights"):
        sw.LossReweighter(torch.tensor([1e-50, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "weights", [np.arange(1.0, 5.0)[::-1], np.array([4.0, 3.0, 2.0, 1.0], dtype=">f4")]
)
def test_numpy_weights_of_any_layout_are_accepted(weights):
    """Before: LossReweighter(np.arange(1., 5.)[::-1]) (a reversed array) and big-endian '>f4'
    arrays: expected accepted (as index arrays are); got torch's ValueError 'At least one stride
    ... negative' / 'byte order', not naming `weights` (validation.py as_float_vector:
    torch.from_numpy without a copy)"""
    rw = sw.LossReweighter(weights)
    assert rw.weights.tolist() == [4.0, 3.0, 2.0, 1.0]


@pytest.mark.parametrize(
    "call",
    [
        lambda loss: sw.LossReweighter(torch.ones(4))(loss, [0, 1]),
        lambda loss: sw.DynamicPruner(4, epochs=2).update(loss, [0, 1]),
        lambda loss: sw.GroupDROLoss(2)(loss, [0, 1]),
    ],
)
def test_a_numpy_loss_gets_a_type_error_that_says_so(call):
    """Before: a numpy per_example_loss of shape (2,): expected a TypeError saying it must be a
    torch tensor; got the self-contradictory ValueError 'Expected `per_example_loss` of shape
    (batch,) ... but got (2,).' (validation.py per_example_ids, first check)"""
    with pytest.raises(TypeError, match=r"ndarray|[Tt]ensor"):
        call(np.array([1.0, 2.0]))


def test_a_state_with_a_non_finite_score_is_refused():
    """Before: a DynamicPruner state whose dynamic.scores holds +inf (never recorded by update,
    which drops non-finite losses): expected StateMismatchError; got accepted, and the next
    decision has threshold=inf, so every finite example counts as below the mean (dynamic.py
    _saved_decision checks dtype and shape of scores only)"""
    a = sw.DynamicPruner(6, prune=0.5, epochs=6, shuffle=False)
    a.update(torch.arange(6.0), torch.arange(6))
    a.set_epoch(1)
    state = copy.deepcopy(a.state_dict())
    state["dynamic"]["scores"][0] = float("inf")
    with pytest.raises(sw.StateMismatchError, match="scores"):
        sw.DynamicPruner(6, prune=0.5, epochs=6, shuffle=False).load_state_dict(state)
