from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sampleweights as sw


def shards(make, world, **kwargs):
    return [list(make(num_replicas=world, rank=r, **kwargs)) for r in range(world)]


SAMPLERS = {
    "pruned": (
        lambda **kw: sw.PrunedSampler(torch.tensor([9, 3, 4, 0, 7, 12, 5]), **kw),
        Counter([9, 3, 4, 0, 7, 12, 5]),
    ),
    "upsample": (
        lambda **kw: sw.UpsampleSampler(torch.tensor([0, 2, 1, 3, 0, 1]), **kw),
        Counter({1: 2, 2: 1, 3: 3, 5: 1}),
    ),
    "jtt": (
        lambda **kw: sw.JTTSampler(torch.tensor([1, 4]), 6, 3, **kw),
        Counter({0: 1, 1: 3, 2: 1, 3: 1, 4: 3, 5: 1}),
    ),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_epoch_is_a_permutation_of_the_multiset(name):
    make, multiset = SAMPLERS[name]
    s = make(seed=3)
    orders = set()
    for epoch in range(5):
        s.set_epoch(epoch)
        order = list(s)
        assert Counter(order) == multiset
        assert len(s) == len(order)
        orders.add(tuple(order))
    assert len(orders) > 1  # the epoch changes the order


@settings(max_examples=80, deadline=None)
@given(
    repeats=st.lists(st.integers(0, 4), min_size=1, max_size=25).filter(lambda r: sum(r) > 0),
    world=st.integers(1, 5),
    mode=st.sampled_from(["pad", "drop_last", "no_pad"]),
    seed=st.integers(0, 100),
    epoch=st.integers(0, 3),
)
def test_shards_cover_the_multiset_exactly_across_ranks(repeats, world, mode, seed, epoch):
    multiset = Counter({i: r for i, r in enumerate(repeats) if r})
    m = sum(repeats)
    kwargs = {"seed": seed, "drop_last": mode == "drop_last", "pad": mode != "no_pad"}
    samplers = [
        sw.UpsampleSampler(torch.tensor(repeats), num_replicas=world, rank=r, **kwargs)
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    parts = [list(s) for s in samplers]
    assert [len(p) for p in parts] == [len(s) for s in samplers]
    union = Counter(i for p in parts for i in p)
    if mode == "no_pad":
        assert union == multiset
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    elif mode == "pad":
        assert len({len(p) for p in parts}) == 1
        assert not multiset - union  # everything covered
        assert sum((union - multiset).values()) == (-m) % world  # ≤ world − 1 pads
    else:
        assert len({len(p) for p in parts}) == 1
        assert not union - multiset
        assert sum((multiset - union).values()) == m % world
    # the shards are the positions r, r + R, … of one shared epoch order
    single = sw.UpsampleSampler(torch.tensor(repeats), seed=seed, num_replicas=1, rank=0)
    single.set_epoch(epoch)
    order = list(single)
    for r, part in enumerate(parts):
        assert part[: len(order[r::world])] == order[r::world][: len(part)]


def test_deterministic_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = list(sw.PrunedSampler(range(50), seed=4))
    b = list(sw.PrunedSampler(range(50), seed=4))
    assert a == b
    assert a != list(sw.PrunedSampler(range(50), seed=5))
    assert torch.equal(state, torch.get_rng_state())


def test_same_order_in_another_process():
    code = (
        "import sampleweights as sw, torch; s = sw.JTTSampler([2, 5], 20, 4, seed=7); "
        "s.set_epoch(3); print(list(s))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    s = sw.JTTSampler([2, 5], 20, 4, seed=7)
    s.set_epoch(3)
    assert out.stdout.strip() == str(list(s))


@pytest.mark.parametrize("name", SAMPLERS)
def test_mid_epoch_resume_continues_the_identical_order(name):
    make, _ = SAMPLERS[name]
    s = make(seed=1, num_replicas=2, rank=1)
    s.set_epoch(2)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = s.state_dict()
    resumed = make(seed=99, num_replicas=2, rank=1)  # seed and epoch come from the state
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    # the epoch after the resumed one is the normal next epoch
    resumed.set_epoch(3)
    s.set_epoch(3)
    assert list(resumed) == list(s)


def test_consumed_overrides_the_prefetched_position_and_set_epoch_rules():
    s = sw.PrunedSampler(range(10), seed=0)
    full = list(s)
    it = iter(s)
    for _ in range(6):  # a prefetching loader pulled 6 items, the loop consumed 4
        next(it)
    state = s.state_dict(consumed=4)
    r = sw.PrunedSampler(range(10))
    r.load_state_dict(state)
    r.set_epoch(0)  # same epoch: keeps the position
    assert list(r) == full[4:]
    r.load_state_dict(state)
    r.set_epoch(1)  # another epoch: starts at 0
    assert len(list(r)) == 10
    with pytest.raises(ValueError, match="consumed"):
        s.state_dict(consumed=11)


def test_loading_a_state_from_another_selection_is_rejected_and_changes_nothing():
    a = sw.PrunedSampler(torch.tensor([1, 2, 3]))
    b = sw.PrunedSampler(torch.tensor([1, 2, 4]))
    b.set_epoch(5)
    with pytest.raises(sw.StateMismatchError, match="fingerprint"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(sw.StateMismatchError, match="sampler"):
        sw.UpsampleSampler(torch.tensor([0, 1, 1, 1])).load_state_dict(a.state_dict())
    with pytest.raises(sw.StateMismatchError, match="num_replicas"):
        sw.PrunedSampler(torch.tensor([1, 2, 3]), num_replicas=2, rank=0).load_state_dict(
            a.state_dict()
        )
    assert b.epoch == 5


def test_num_samples_keeps_the_epoch_length_fixed():
    s = sw.JTTSampler([0], 10, 20, num_samples=10, seed=2)
    assert len(s) == 10
    assert len(list(s)) == 10
    long = sw.PrunedSampler(range(3), num_samples=8)
    assert sorted(Counter(list(long)).values()) == [2, 3, 3]  # the shuffled subset, cycled


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: sw.PrunedSampler(torch.tensor([1, 1, 2])), ValueError, "duplicates"),
        (lambda: sw.PrunedSampler(torch.tensor([1, 5]), num_examples=5), ValueError, r"\[0, 5\)"),
        (lambda: sw.PrunedSampler(torch.tensor([-1])), ValueError, "indices"),
        (lambda: sw.PrunedSampler(torch.tensor([], dtype=torch.long)), ValueError, "empty"),
        (lambda: sw.UpsampleSampler(torch.tensor([1, -2])), ValueError, "repeats"),
        (lambda: sw.UpsampleSampler(torch.tensor([0, 0])), ValueError, "all zeros"),
        (lambda: sw.JTTSampler([1], 5, 0), ValueError, "upweight"),
        (lambda: sw.JTTSampler([1], 5, 2.5), TypeError, "LossReweighter"),
        (lambda: sw.JTTSampler([7], 5, 2), ValueError, "error_indices"),
        (lambda: sw.PrunedSampler(range(4), num_replicas=2, rank=2), ValueError, r"\[0, 1\]"),
        (lambda: sw.PrunedSampler(range(4), num_replicas=0), ValueError, "num_replicas"),
        (lambda: sw.PrunedSampler(range(4), drop_last=True, pad=False), ValueError, "drop_last"),
    ],
)
def test_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_works_in_a_dataloader_over_withindex():
    from torch.utils.data import DataLoader, TensorDataset

    ds = sw.WithIndex(TensorDataset(torch.arange(20.0), torch.arange(20) % 2))
    keep = sw.select(torch.arange(20.0), 0.25)
    seen = [
        int(i)
        for _, _, idx in DataLoader(ds, batch_size=3, sampler=sw.PrunedSampler(keep))
        for i in idx
    ]
    assert sorted(seen) == keep.tolist()
