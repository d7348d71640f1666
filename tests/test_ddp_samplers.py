"""Samplers under a real 2-process gloo group: defaults come from the group, shards cover."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import sampleweights as sw
from ddp import run_ddp

pytestmark = pytest.mark.ddp


def _shard(rank, world, kind):
    assert torch.distributed.get_world_size() == world
    if kind == "pruned":
        s = sw.PrunedSampler(sw.select(torch.arange(31.0), 0.5), seed=3)
    else:
        s = sw.JTTSampler([1, 4, 7], 21, 5, seed=3)
    s.set_epoch(1)
    return s.rank, s.num_replicas, list(s)


@pytest.mark.parametrize("kind", ["pruned", "jtt"])
def test_shards_cover_the_selection_across_two_processes(kind):
    results = run_ddp(_shard, kind)
    assert [(r, w) for r, w, _ in results] == [(0, 2), (1, 2)]
    parts = [p for _, _, p in results]
    assert len(parts[0]) == len(parts[1])
    if kind == "pruned":
        want = Counter(sw.select(torch.arange(31.0), 0.5).tolist())
    else:
        want = Counter(list(sw.JTTSampler([1, 4, 7], 21, 5, num_replicas=1, rank=0)))
    union = Counter(parts[0] + parts[1])
    assert not want - union
    assert sum((union - want).values()) == sum(want.values()) % 2


def _iterate_prebuilt(rank, world, samplers):
    # the samplers were built in the parent process, before any process group existed
    out = []
    for s in samplers:
        s.set_epoch(2)
        out.append((s.num_replicas, s.rank, len(s), list(s), s.state_dict().get("rank")))
    return out


def test_a_sampler_built_before_init_process_group_shards_once_the_group_exists():
    assert not torch.distributed.is_initialized()
    prebuilt = sw.JTTSampler([1, 4, 7], 21, 5, seed=3)
    assert (prebuilt.num_replicas, prebuilt.rank, len(prebuilt)) == (1, 0, 33)
    pinned = sw.PrunedSampler(range(9), seed=3, num_replicas=1, rank=0)  # explicit: never resolved
    results = run_ddp(_iterate_prebuilt, [prebuilt, pinned])
    reference = sw.JTTSampler([1, 4, 7], 21, 5, seed=3, num_replicas=1, rank=0)
    reference.set_epoch(2)
    whole = list(reference)
    for rank, ((replicas, r, length, part, saved_rank), pinned_result) in enumerate(results):
        assert (replicas, r, saved_rank) == (2, rank, rank)
        assert length == len(part) == 17  # len() agrees with what iter() yields: ceil(33 / 2)
        assert part == (whole + whole[:1])[rank::2]
        assert pinned_result[:3] == (1, 0, 9) and sorted(pinned_result[3]) == list(range(9))
    # back outside the group, the same sampler is whole again
    assert (prebuilt.num_replicas, len(prebuilt), len(list(prebuilt))) == (1, 33, 33)
