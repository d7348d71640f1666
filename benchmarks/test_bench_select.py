"""select + a sampler epoch on 10M scores, against one torch.sort + one torch.randperm of the same
size; per-item iteration of our samplers against torch's RandomSampler.

Run: python -m pytest benchmarks/test_bench_select.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import RandomSampler

import sampleweights as sw

N = 10_000_000


@pytest.fixture(scope="module")
def scores():
    return torch.rand(N, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "what",
    ["sort+randperm", "select-hardest+epoch", "select-random+epoch", "select-stratified+epoch"],
)
def test_select_10m(benchmark, scores, what):
    benchmark.group = "select-10M"
    gen = torch.Generator().manual_seed(0)
    if what == "sort+randperm":
        fn = lambda: (torch.sort(scores), torch.randperm(N, generator=gen))  # noqa: E731
    else:
        strategy = what.split("-")[1].split("+")[0]

        def fn():
            keep = sw.select(scores, 0.5, strategy)
            return sw.PrunedSampler(keep)._epoch_order(0, 1, 0)  # (epoch, num_replicas, rank)

    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("what", ["RandomSampler", "PrunedSampler", "JTTSampler"])
def test_iteration_per_item(benchmark, what):
    benchmark.group = "sampler-iteration-1M-items"
    n = 1_000_000
    if what == "RandomSampler":
        sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(0))
    elif what == "PrunedSampler":
        sampler = sw.PrunedSampler(range(n))
    else:
        # 900k examples, 5% of them upsampled ×3: ~990k items per epoch
        sampler = sw.JTTSampler(torch.arange(0, 900_000, 20), 900_000, 3)

    def consume():
        for _ in sampler:
            pass

    # 7 rounds: on a shared machine compare the minima (the least-disturbed round)
    benchmark.pedantic(consume, rounds=7, warmup_rounds=1)
