"""DynamicPruner: per-item iteration against torch's RandomSampler, and the per-epoch pruning
decision (``set_epoch``) on 10M examples against one ``torch.randperm`` of the same size.

Run: python -m pytest benchmarks/test_bench_dynamic.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=min,median,iqr,rounds
Targets: iteration ≤ 1.1× RandomSampler; the decision ≤ 2× randperm(10M).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import RandomSampler

import sampleweights as sw

N = 10_000_000


@pytest.mark.parametrize("what", ["RandomSampler", "DynamicPruner"])
def test_iteration_per_item(benchmark, what):
    benchmark.group = "dynamic-iteration-1M-items"
    n = 1_000_000
    if what == "RandomSampler":
        sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    else:
        # the full-data epoch (epoch 0): the same number of items as RandomSampler yields
        sampler = sw.DynamicPruner(n, epochs=10)
        sampler.set_epoch(0)
        assert len(sampler) == n

    def consume():
        for _ in sampler:
            pass

    # 7 rounds: on a shared machine compare the minima (the least-disturbed round)
    benchmark.pedantic(consume, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("what", ["randperm", "set_epoch"])
def test_decision_10m(benchmark, what):
    benchmark.group = "dynamic-decision-10M"
    if what == "randperm":
        gen = torch.Generator().manual_seed(0)
        fn = lambda: torch.randperm(N, generator=gen)  # noqa: E731
    else:
        pruner = sw.DynamicPruner(N, prune=0.5, epochs=10**6)
        pruner.update(torch.rand(N, generator=torch.Generator().manual_seed(0)), torch.arange(N))
        epochs = itertools.count(1)

        def fn():  # a new epoch each call: merge (no-op on one process), decide, install
            pruner.set_epoch(next(epochs))
            return len(pruner)

    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
