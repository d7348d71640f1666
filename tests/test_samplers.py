from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
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
    resumed = make(seed=1, num_replicas=2, rank=1)  # the epoch comes from the state
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    assert head + list(resumed) == full
    assert list(resumed) == full  # the resume offset is one-shot: the next iter() is whole
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
    with pytest.raises(TypeError, match="consumed"):
        s.state_dict(consumed=4.0)


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


# -- every iter() is a whole epoch; only the first after load_state_dict resumes ----------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_peeking_at_a_batch_loses_nothing_from_the_epoch(name):
    from torch.utils.data import DataLoader

    make, multiset = SAMPLERS[name]
    s = make(seed=2)
    loader = DataLoader(range(20), batch_size=2, sampler=s)
    next(iter(loader))  # look at one batch before training
    seen = [int(i) for batch in loader for i in batch]
    assert len(seen) == len(s) == sum(multiset.values())
    assert Counter(seen) == multiset


@pytest.mark.parametrize("name", SAMPLERS)
def test_breaking_out_early_does_not_shorten_the_next_epoch(name):
    make, _ = SAMPLERS[name]
    s = make(seed=5, num_replicas=2, rank=0)
    full = list(s)
    it = iter(s)
    for _ in range(3):  # leave the epoch after 3 items
        next(it)
    assert list(s) == full
    assert s.state_dict()["position"] == len(s)


@pytest.mark.parametrize("name", SAMPLERS)
def test_interleaved_iterators_each_yield_the_whole_epoch(name):
    make, _ = SAMPLERS[name]
    s = make(seed=8)
    first, second = iter(s), iter(s)
    a, b = [], []
    for _ in range(len(s)):
        a.append(next(first))
        b.append(next(second))
    assert a == b == list(s)
    with pytest.raises(StopIteration):
        next(first)


def test_an_iterator_keeps_the_order_of_the_epoch_it_was_made_in():
    s = sw.PrunedSampler(range(30), seed=1)
    s.set_epoch(1)
    epoch1 = list(s)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    s.set_epoch(2)
    assert head + list(it) == epoch1


def test_state_dict_reports_the_most_recent_iterator():
    s = sw.UpsampleSampler(torch.tensor([2, 0, 3, 1, 1]), seed=4)
    assert s.state_dict()["position"] == 0
    old = iter(s)
    for _ in range(5):
        next(old)
    assert s.state_dict()["position"] == 5
    new = iter(s)
    next(new), next(new)
    assert s.state_dict()["position"] == 2
    list(new)
    assert s.state_dict()["position"] == len(s)  # a finished epoch
    s.set_epoch(1)  # the last iterator belongs to epoch 0
    assert (s.state_dict()["epoch"], s.state_dict()["position"]) == (1, 0)


def test_a_loaded_position_is_reported_until_iterated_and_then_used_once():
    s = sw.JTTSampler([0, 3], 8, 3, seed=6)
    s.set_epoch(3)
    full = list(s)
    r = sw.JTTSampler([0, 3], 8, 3, seed=6)
    r.load_state_dict(s.state_dict(consumed=7))
    assert r.state_dict()["position"] == 7  # saved again before iterating: still 7
    it = iter(r)
    assert r.state_dict()["position"] == 7
    next(it)
    assert r.state_dict()["position"] == 8
    assert [full[7], *it] == full[7:]
    assert list(r) == full


def test_a_state_saved_at_the_end_of_an_epoch_resumes_at_the_next_epoch():
    s = sw.PrunedSampler(range(9), seed=3)
    s.set_epoch(4)
    list(s)
    r = sw.PrunedSampler(range(9), seed=3)
    r.load_state_dict(s.state_dict())
    assert list(r) == []  # epoch 4 was finished
    r.load_state_dict(s.state_dict())
    r.set_epoch(5)
    s.set_epoch(5)
    assert list(r) == list(s)


class _EvenOnOddEpochs(sw.PrunedSampler):
    """A sampler whose selection changes per epoch: on odd epochs only the even kept indices."""

    def _epoch_items(self, epoch):
        items = self._items
        return items[items % 2 == 0] if epoch % 2 else items


@pytest.mark.parametrize("mode", ["pad", "drop_last", "no_pad"])
def test_epoch_items_is_the_one_seam_for_a_changing_selection(mode):
    kwargs = {"drop_last": mode == "drop_last", "pad": mode != "no_pad", "seed": 2}
    samplers = [_EvenOnOddEpochs(range(11), num_replicas=3, rank=r, **kwargs) for r in range(3)]
    for epoch, want in ((0, list(range(11))), (1, list(range(0, 11, 2)))):
        for s in samplers:
            s.set_epoch(epoch)
        parts = [list(s) for s in samplers]
        assert [len(p) for p in parts] == [len(s) for s in samplers]
        union = Counter(i for p in parts for i in p)
        assert set(union) <= set(want)
        if mode == "no_pad":
            assert union == Counter(want)
        # resume within the changed epoch
        it = iter(samplers[1])
        next(it)
        resumed = _EvenOnOddEpochs(range(11), num_replicas=3, rank=1, **kwargs)
        resumed.load_state_dict(samplers[1].state_dict())
        assert list(resumed) == parts[1][1:]


# -- load_state_dict refuses a state that does not fit, before changing anything -----------------

BASE = {"seed": 3, "num_replicas": 2, "rank": 1, "pad": True, "drop_last": False}


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("seed", {"seed": 4}),
        ("pad", {"pad": False}),
        ("drop_last", {"drop_last": True}),
        ("rank", {"rank": 0}),
        ("num_replicas", {"num_replicas": 3}),
        ("shuffle", {"shuffle": False}),
        ("num_samples", {"num_samples": 9}),
    ],
)
def test_a_state_saved_with_other_settings_is_refused(field, other):
    saved = sw.PrunedSampler(range(7), **(BASE | other))
    saved.set_epoch(2)
    it = iter(saved)
    next(it)
    target = sw.PrunedSampler(range(7), **BASE)
    target.set_epoch(1)
    before = list(target)
    with pytest.raises(sw.StateMismatchError, match=f"{field}="):
        target.load_state_dict(saved.state_dict())
    assert target.epoch == 1
    assert list(target) == before


def _state(**changes):
    s = sw.PrunedSampler(range(7), **BASE)
    s.set_epoch(2)
    return s.state_dict(consumed=2) | changes


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (_state(fingerprint="7:0000"), "fingerprint="),
        (_state(sampler="JTTSampler"), "sampler="),
        (_state(epoch=-1), "epoch"),
        (_state(epoch="2"), "epoch"),
        (_state(epoch=2.0), "epoch"),
        (_state(position=5), r"position.*\[0, 4\]"),
        (_state(position=-1), "position"),
        (_state(position=True), "position"),
        (_state(position=1.0), "position"),
        (_state(pad=1), "pad="),
        (_state(seed=3.0), "seed="),
        (_state(seed=True), "seed="),
        ({k: v for k, v in _state().items() if k != "drop_last"}, "no `drop_last`"),
        ({k: v for k, v in _state().items() if k != "seed"}, "no `seed`"),
    ],
)
def test_a_malformed_state_is_refused_and_changes_nothing(state, match):
    target = sw.PrunedSampler(range(7), **BASE)
    target.load_state_dict(_state(position=1))
    with pytest.raises(sw.StateMismatchError, match=match):
        target.load_state_dict(state)
    assert (target.epoch, target.state_dict()["position"]) == (2, 1)  # the earlier load stands
    with pytest.raises(TypeError, match="state_dict"):
        target.load_state_dict([("epoch", 2)])


def test_a_state_loads_after_a_round_trip_through_torch_save(tmp_path):
    s = sw.JTTSampler([1, 2], 6, 3, seed=1, num_samples=10)
    s.set_epoch(3)
    full = list(s)
    torch.save(s.state_dict(consumed=4), tmp_path / "s.pt")
    r = sw.JTTSampler([1, 2], 6, 3, seed=1, num_samples=10)
    r.load_state_dict(torch.load(tmp_path / "s.pt"))
    assert list(r) == full[4:]


# -- numpy integers are ints; bools and floats are not ----------------------------------------


@pytest.mark.parametrize("np_int", [np.int64, np.int32])
def test_numpy_integers_are_accepted_everywhere_an_int_is(np_int):
    plain = sw.JTTSampler([1, 3], 9, 3, seed=5, num_samples=11, num_replicas=2, rank=1)
    numpy = sw.JTTSampler(
        [1, 3], 9, np_int(3), seed=np_int(5), num_samples=np_int(11),
        num_replicas=np_int(2), rank=np_int(1),
    )  # fmt: skip
    plain.set_epoch(4)
    numpy.set_epoch(np_int(4))
    assert list(numpy) == list(plain)
    assert numpy.state_dict() == plain.state_dict()
    assert [type(v) for v in numpy.state_dict().values()] == [
        type(v) for v in plain.state_dict().values()
    ]  # stored as Python ints: a state pickles without numpy and compares equal
    assert numpy.state_dict(consumed=np_int(3))["position"] == 3


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, np.float64(2.0), "2"])
@pytest.mark.parametrize(
    "call",
    [
        lambda v: sw.JTTSampler([1], 5, v),
        lambda v: sw.PrunedSampler(range(4), seed=v),
        lambda v: sw.PrunedSampler(range(4)).set_epoch(v),
        lambda v: sw.PrunedSampler(range(4), num_samples=v),
        lambda v: sw.PrunedSampler(range(4), num_replicas=v, rank=0),
        lambda v: sw.PrunedSampler(range(4), num_replicas=3, rank=v),
    ],
    ids=["upweight", "seed", "set_epoch", "num_samples", "num_replicas", "rank"],
)
def test_bools_floats_and_strings_are_not_ints(call, bad):
    with pytest.raises(
        TypeError, match=r"Expected `(upweight|seed|epoch|num_samples|num_replicas|rank)`"
    ):
        call(bad)


def test_set_epoch_rejects_a_negative_epoch_and_keeps_the_old_one():
    s = sw.PrunedSampler(range(4))
    s.set_epoch(np.int64(3))
    assert s.epoch == 3 and type(s.epoch) is int
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(np.int64(-1))
    assert s.epoch == 3


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
