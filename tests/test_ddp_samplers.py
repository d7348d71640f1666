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
