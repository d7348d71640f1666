"""Edge cases of the samplers' contract: seeds beyond 64 bits, aliasing, flags, the per-epoch seam,
pickling mid-epoch, the default device, resuming through a DataLoader, and tiny worlds."""

from __future__ import annotations

import copy
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import sampleweights as sw
import sampleweights.samplers as samplers_module

MAKERS = {
    "pruned": lambda **kw: sw.PrunedSampler(torch.tensor([8, 1, 5, 3, 0, 6]), **kw),
    "upsample": lambda **kw: sw.UpsampleSampler(torch.tensor([2, 0, 1, 3, 1]), **kw),
    "jtt": lambda **kw: sw.JTTSampler([0, 4], 7, 3, **kw),
}


# -- seeds: any Python int, as torch.Generator sees it modulo 2**64 ------------------------------


@pytest.mark.parametrize(
    ("seed", "epoch"), [(2**64 - 1, 1), (2**64, 0), (-(2**63) - 1, 0), (0, 2**70), (-5, 3)]
)
def test_seed_plus_epoch_beyond_64_bits_still_yields_an_epoch(seed, epoch):
    s = sw.PrunedSampler(range(20), seed=seed)
    s.set_epoch(epoch)
    order = list(s)
    assert sorted(order) == list(range(20)) and len(order) == len(s)
    # the same order as the seed those 64 bits stand for
    same = sw.PrunedSampler(range(20), seed=(seed + epoch) % 2**64)
    assert order == list(same)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63, 2**64 - 2])
def test_a_negative_or_64_bit_seed_matches_distributed_sampler(seed):
    ours = sw.PrunedSampler(range(11), seed=seed, num_replicas=2, rank=1)
    theirs = DistributedSampler(range(11), seed=seed, num_replicas=2, rank=1)
    ours.set_epoch(1)
    theirs.set_epoch(1)
    assert list(ours) == list(theirs)


# -- the multiset is the sampler's own ---------------------------------------------------------


def test_mutating_the_callers_tensor_later_changes_nothing():
    keep = torch.tensor([4, 1, 7])
    s = sw.PrunedSampler(keep, shuffle=False)
    fingerprint = s.fingerprint
    keep[0] = 9
    assert list(s) == [4, 1, 7]
    assert s.fingerprint == fingerprint == sw.PrunedSampler(torch.tensor([4, 1, 7])).fingerprint


# -- flags are bools ---------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["shuffle", "pad", "drop_last"])
@pytest.mark.parametrize("bad", ["False", None, 1, 0.0])
def test_a_flag_that_is_not_a_bool_is_refused(flag, bad):
    with pytest.raises(TypeError, match=f"`{flag}`"):
        sw.PrunedSampler(range(4), **{flag: bad})


def test_numpy_bools_are_flags():
    s = sw.PrunedSampler(range(5), shuffle=np.bool_(False), drop_last=np.bool_(True))
    assert (s.shuffle, s.drop_last, type(s.shuffle)) == (False, True, bool)
    assert list(s) == [0, 1, 2, 3, 4]


# -- the per-epoch seam: len() and iter() agree, even on a bad override ------------------------


class _EmptyOnEpochOne(sw.PrunedSampler):
    def _epoch_items(self, epoch):
        return self._items[:0] if epoch == 1 else self._items


class _ListItems(sw.PrunedSampler):
    def _epoch_items(self, epoch):
        return self._items.tolist()


@pytest.mark.parametrize("num_samples", [None, 4])
def test_an_empty_epoch_from_the_seam_fails_in_len_as_in_iter(num_samples):
    s = _EmptyOnEpochOne(range(4), num_samples=num_samples)
    assert len(s) == len(list(s)) == 4
    s.set_epoch(1)
    with pytest.raises(ValueError, match="empty"):
        list(s)
    with pytest.raises(ValueError, match="empty"):
        len(s)


def test_a_seam_that_returns_no_tensor_is_named():
    s = _ListItems(range(4))
    with pytest.raises(TypeError, match="_epoch_items"):
        list(s)


# -- pickling and copying mid-epoch -------------------------------------------------------------


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))])
def test_a_copy_made_mid_epoch_keeps_the_position_not_the_rest_of_the_epoch(clone):
    s = sw.PrunedSampler(range(50_000), seed=3)
    full = list(s)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    twin = clone(s)
    next(it)  # the original moves on; the copy is a snapshot
    assert twin.state_dict()["position"] == 7
    assert s.state_dict()["position"] == 8
    resumed = sw.PrunedSampler(range(50_000), seed=3)
    resumed.load_state_dict(twin.state_dict())
    assert head + list(resumed) == full
    assert list(twin) == full  # the copy iterates whole epochs of its own
    fresh = len(pickle.dumps(sw.PrunedSampler(range(50_000), seed=3)))
    assert len(pickle.dumps(s)) < fresh * 1.05  # no copy of the remaining epoch


# -- the order does not depend on torch's default device ------------------------------------------


@pytest.mark.parametrize("name", MAKERS)
def test_iterating_under_another_default_device_yields_the_same_indices(name):
    s = MAKERS[name](seed=4, num_replicas=2, rank=1, num_samples=9)
    want = list(s)
    errors, repeats = torch.tensor([1]), torch.tensor([0, 2, 1])  # the caller's tensors: on the CPU
    with torch.device("meta"):  # as torch.set_default_device("cuda") would be, on a CPU host
        got = list(s)
        ranged = sw.PrunedSampler(range(3), seed=4, num_replicas=2, rank=1)
        jtt = sw.JTTSampler(errors, 3, 2, seed=4)
        upsample = sw.UpsampleSampler(repeats, seed=4)
    assert got == want
    assert list(ranged) == list(sw.PrunedSampler(range(3), seed=4, num_replicas=2, rank=1))
    assert list(jtt) == list(sw.JTTSampler([1], 3, 2, seed=4))
    assert list(upsample) == list(sw.UpsampleSampler([0, 2, 1], seed=4))


# -- the world at use time; repr never raises -----------------------------------------------------


def test_a_sampler_built_before_the_group_shards_once_it_exists(monkeypatch):
    s = sw.PrunedSampler(range(7), seed=1)
    assert len(s) == 7
    monkeypatch.setattr(samplers_module, "world", lambda: (3, 2))
    assert len(s) == len(list(s)) == 3
    assert s.state_dict()["num_replicas"] == 3
    ref = sw.PrunedSampler(range(7), seed=1, num_replicas=3, rank=2)
    assert list(s) == list(ref)


def test_repr_survives_a_world_the_rank_does_not_fit(monkeypatch):
    monkeypatch.setattr(samplers_module, "world", lambda: (4, 3))
    s = sw.PrunedSampler(range(7), rank=3)
    monkeypatch.setattr(samplers_module, "world", lambda: (1, 0))
    assert "PrunedSampler" in repr(s)
    with pytest.raises(ValueError, match="Invalid rank"):
        len(s)


# -- resuming through a DataLoader / BatchSampler -------------------------------------------------


@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("batches_done", [0, 1, 2, "all"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_through_a_loader_at_a_batch_boundary(name, batches_done, drop_last):
    make = MAKERS[name]
    s = make(seed=2, num_replicas=2, rank=0)
    s.set_epoch(1)
    loader = DataLoader(range(10), batch_size=2, sampler=s, drop_last=drop_last)
    batches = [b.tolist() for b in loader]
    assert len(batches) == len(loader)
    done = len(batches) if batches_done == "all" else batches_done
    state = s.state_dict(consumed=min(done * 2, len(s)))
    r = make(seed=2, num_replicas=2, rank=0)
    r.load_state_dict(state)
    r.set_epoch(1)  # a loop that calls set_epoch(epoch) on resume keeps the position
    again = DataLoader(range(10), batch_size=2, sampler=r, drop_last=drop_last)
    assert [b.tolist() for b in again] == batches[done:]
    assert [b.tolist() for b in again] == batches  # and only once


def test_a_batch_sampler_reports_whole_batches():
    s = sw.UpsampleSampler(torch.tensor([3, 1, 2]), seed=5)
    full = list(s)
    it = iter(BatchSampler(s, 4, drop_last=False))
    first = next(it)
    assert s.state_dict()["position"] == 4
    r = sw.UpsampleSampler(torch.tensor([3, 1, 2]), seed=5)
    r.load_state_dict(s.state_dict())
    assert first + [i for b in BatchSampler(r, 4, drop_last=False) for i in b] == full


def test_the_reported_position_across_load_set_epoch_and_a_second_resume():
    s = sw.JTTSampler([1], 9, 4, seed=8)
    s.set_epoch(2)
    full = list(s)
    r = sw.JTTSampler([1], 9, 4, seed=8)
    assert r.state_dict()["position"] == 0  # before any iter()
    r.load_state_dict(s.state_dict(consumed=3))
    r.set_epoch(2)
    assert r.state_dict()["position"] == 3  # loaded, not yet iterated
    it = iter(r)
    got = [next(it) for _ in range(2)]
    assert got == full[3:5]
    second = sw.JTTSampler([1], 9, 4, seed=8)  # resume the resumed one
    second.load_state_dict(r.state_dict())
    assert second.state_dict()["position"] == 5
    assert list(second) == full[5:]
    r.load_state_dict(s.state_dict(consumed=3))
    r.set_epoch(3)  # another epoch drops the position
    assert r.state_dict()["position"] == 0 and len(list(r)) == len(r)


def test_a_state_from_another_num_examples_with_the_same_items_resumes_the_same_order():
    a = sw.PrunedSampler(torch.tensor([2, 5, 6]), num_examples=7, seed=1)
    b = sw.PrunedSampler(torch.tensor([2, 5, 6]), num_examples=100, seed=1)
    full = list(a)
    it = iter(a)
    first = next(it)
    b.load_state_dict(a.state_dict())
    assert [first, *b] == full


# -- tiny worlds and odd multisets --------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_more_ranks_than_items_is_distributed_sampler(drop_last):
    for rank in range(3):
        ours = sw.PrunedSampler(range(2), num_replicas=3, rank=rank, seed=1, drop_last=drop_last)
        theirs = DistributedSampler(
            range(2), num_replicas=3, rank=rank, seed=1, drop_last=drop_last
        )
        assert list(ours) == list(theirs) and len(ours) == len(theirs)
        state = ours.state_dict()
        ours.load_state_dict(state)
        assert list(ours) == []  # the finished epoch (0 or 1 items) stays finished


def test_more_ranks_than_items_without_padding_gives_each_item_once():
    parts = [list(sw.PrunedSampler(range(2), num_replicas=3, rank=r, pad=False)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == [0, 1] and parts[2] == []


def test_upsampling_a_single_example():
    s = sw.UpsampleSampler(torch.tensor([0, 0, 5, 0]), num_replicas=2, rank=1)
    assert list(s) == [2, 2, 2] and len(s) == 3


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 12),
    num_samples=st.one_of(st.none(), st.integers(1, 30)),
    world=st.integers(1, 5),
    mode=st.sampled_from(["pad", "drop_last", "no_pad"]),
    position=st.integers(0, 40),
)
def test_num_samples_with_replicas_len_iter_and_resume_agree(m, num_samples, world, mode, position):
    kwargs = {
        "seed": 6,
        "num_samples": num_samples,
        "drop_last": mode == "drop_last",
        "pad": mode != "no_pad",
    }
    size = num_samples or m
    single = list(sw.PrunedSampler(range(m), **kwargs))
    assert len(single) == size and Counter(single) == Counter(
        (list(sw.PrunedSampler(range(m), seed=6)) * math.ceil(size / m))[:size]
    )
    for rank in range(world):
        s = sw.PrunedSampler(range(m), num_replicas=world, rank=rank, **kwargs)
        part = list(s)
        assert len(part) == len(s)
        cut = min(position, len(s))
        r = sw.PrunedSampler(range(m), num_replicas=world, rank=rank, **kwargs)
        r.load_state_dict(s.state_dict(consumed=cut))
        assert list(r) == part[cut:]
