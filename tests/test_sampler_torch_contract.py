"""PyTorch's own sampler assertions, run against our three samplers.

Each test names the torch test it ports (``test/test_dataloader.py`` and
``torch/testing/_internal/distributed/distributed_test.py`` in the PyTorch repository). Where torch
asserts "no duplicates" of a dataset, an upsampling sampler's epoch is a multiset, so the port
asserts "nothing beyond the multiset" instead.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import sampleweights as sw

CASES = {
    "pruned": (
        lambda **kw: sw.PrunedSampler(torch.arange(3, 40, 2), **kw),
        Counter(range(3, 40, 2)),
    ),
    "upsample": (
        lambda **kw: sw.UpsampleSampler(torch.tensor([1, 0, 2, 3, 1, 0, 4, 1, 1, 2]), **kw),
        Counter({0: 1, 2: 2, 3: 3, 4: 1, 6: 4, 7: 1, 8: 1, 9: 2}),
    ),
    "jtt": (
        lambda **kw: sw.JTTSampler([2, 5, 11], 17, 4, **kw),
        Counter({i: 4 if i in (2, 5, 11) else 1 for i in range(17)}),
    ),
}
DATASET = torch.arange(40)  # every index any case yields is < 40


@pytest.mark.parametrize("name", CASES)
def test_sampler_reproducibility(name):
    # mirrors test_dataloader.py TestDataLoader.test_sampler_reproducibility
    make, _ = CASES[name]
    assert list(make(seed=42)) == list(make(seed=42))
    sampler = make(seed=42)
    torch.manual_seed(0)
    l1 = list(sampler) + list(sampler)
    torch.manual_seed(0)
    l2 = list(sampler) + list(sampler)
    assert l1 == l2
    its = (iter(sampler), iter(sampler))
    ls: tuple[list[int], list[int]] = ([], [])
    for idx in range(len(sampler)):
        for i in range(2):
            if idx == 0:
                torch.manual_seed(0)
            ls[i].append(next(its[i]))
    assert ls[0] == ls[1]
    # stronger than torch asks: without reseeding the global RNG, too
    assert list(sampler) == l1[: len(sampler)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", CASES)
def test_shuffle_reproducibility(name, num_workers):
    # mirrors test_dataloader.py TestDataLoader.test_shuffle_reproducibility
    make, _ = CASES[name]

    def fn():
        return DataLoader(DATASET, sampler=make(seed=42), num_workers=num_workers)

    assert [b.tolist() for b in fn()] == [b.tolist() for b in fn()]


@pytest.mark.parametrize("name", CASES)
def test_distributed_sampler_invalid_rank(name):
    # mirrors test_dataloader.py TestDataLoader.test_distributed_sampler_invalid_rank
    make, _ = CASES[name]
    with pytest.raises(ValueError, match="Invalid rank"):
        make(num_replicas=3, rank=3)
    with pytest.raises(ValueError, match="Invalid rank"):
        make(num_replicas=3, rank=-1)


@pytest.mark.parametrize("name", CASES)
def test_duplicating_data_with_drop_last(name):
    # mirrors test_dataloader.py TestDataLoader.test_duplicating_data_with_drop_last: a loader
    # with drop_last=True over padded shards yields no padding duplicates
    make, multiset = CASES[name]
    num_processes = 4
    size = sum(multiset.values())
    scanned: list[int] = []
    for i in range(num_processes):
        s = make(num_replicas=num_processes, rank=i)
        loader = DataLoader(DATASET, batch_size=size // num_processes, drop_last=True, sampler=s)
        for data in loader:
            scanned += data.tolist()
    assert not Counter(scanned) - multiset  # torch: scanned.size() == scanned.unique().size()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("name", CASES)
def test_DistributedSampler_padding(name, world_size):  # torch's test name
    # mirrors distributed_test.py DistributedTest.test_DistributedSampler_padding, with the
    # process group replaced by explicit num_replicas/rank and all ranks in one process
    make, multiset = CASES[name]
    dataset_size = sum(multiset.values())

    def local_lengths(**kwargs):
        lengths = []
        for rank in range(world_size):
            s = make(num_replicas=world_size, rank=rank, **kwargs)
            indices_list = list(iter(s))
            assert len(indices_list) == len(s)
            lengths.append(len(s))
        assert len(set(lengths)) == 1  # validate_global_samples: the same on every rank
        return lengths[0]

    local_num_samples = local_lengths(drop_last=True)
    effective_dataset_size = (
        math.ceil((dataset_size - world_size) / world_size)
        if dataset_size % world_size != 0
        else dataset_size / world_size
    )
    assert local_num_samples == effective_dataset_size
    local_num_samples = local_lengths()  # padding added
    assert local_num_samples == math.ceil(dataset_size / world_size)
    # the tiny dataset: fewer items than ranks, padded by cycling
    tiny_size = max(world_size // 2 - 1, 1)
    for rank in range(world_size):
        s = sw.PrunedSampler(range(tiny_size), num_replicas=world_size, rank=rank)
        assert len(list(iter(s))) == len(s) == math.ceil(tiny_size / world_size)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_shards_cover_the_epoch_across_ranks(name, drop_last):
    # mirrors the subsampling contract of DistributedSampler.__iter__ (indices[rank::R] of one
    # padded or cut epoch), which test_DistributedSampler_padding relies on: the union of the
    # ranks covers the dataset (padding) or drops fewer than num_replicas items (drop_last)
    make, multiset = CASES[name]
    world_size = 3
    union = Counter(
        i
        for r in range(world_size)
        for i in make(num_replicas=world_size, rank=r, drop_last=drop_last)
    )
    size = sum(multiset.values())
    if drop_last:
        assert not union - multiset
        assert sum((multiset - union).values()) == size % world_size
    else:
        assert not multiset - union
        assert sum((union - multiset).values()) == (-size) % world_size


@pytest.mark.parametrize("name", CASES)
def test_set_epoch_changes_the_order_and_only_set_epoch_does(name):
    # mirrors DistributedSampler.set_epoch's documented contract: with shuffle=True a new epoch
    # gives a new order; otherwise the next iteration yields the same ordering
    make, _ = CASES[name]
    sampler = make(seed=0)
    first = list(sampler)
    assert list(sampler) == first  # no set_epoch: the same order again
    sampler.set_epoch(1)
    second = list(sampler)
    assert Counter(second) == Counter(first) and second != first
    unshuffled = make(shuffle=False)
    unshuffled.set_epoch(5)
    assert list(unshuffled) == list(make(shuffle=False))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("batch_size", [1, 6])
def test_random_sampler_len(name, batch_size):
    # mirrors test_dataloader.py test_random_sampler_len_without_replacement: len(sampler),
    # the items iterated, and len(loader) agree
    make, multiset = CASES[name]
    sampler = make(num_samples=sum(multiset.values()) + 5)
    assert len(sampler) == sum(1 for _ in sampler) == sum(multiset.values()) + 5
    loader = DataLoader(DATASET, batch_size=batch_size, sampler=sampler)
    assert len(loader) == math.ceil(len(sampler) / batch_size) == sum(1 for _ in loader)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("n", "world_size"), [(10, 1), (10, 3), (9, 4), (2, 5), (16, 4)])
def test_pruned_over_the_whole_dataset_is_distributed_sampler(n, world_size, shuffle, drop_last):
    # the reference itself: PrunedSampler(range(n)) is DistributedSampler, index for index
    for rank in range(world_size):
        ours = sw.PrunedSampler(
            range(n), num_replicas=world_size, rank=rank, seed=7, shuffle=shuffle,
            drop_last=drop_last,
        )  # fmt: skip
        theirs = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, seed=7, shuffle=shuffle,
            drop_last=drop_last,
        )  # fmt: skip
        for epoch in range(3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)
