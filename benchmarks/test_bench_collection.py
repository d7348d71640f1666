"""ScorerCollection: every logit scorer with one shared read of each batch, against EL2N alone
and against the same scorers updated one by one.

Run: python -m pytest benchmarks/test_bench_collection.py --benchmark-enable \\
    --benchmark-group-by=group
Compare entries within a group (one thread, same run).
"""

from __future__ import annotations

import pytest
import torch

import sampleweights as sw


def _scorers(n: int) -> list[sw.Scorer]:
    return [
        sw.EL2N(n),
        sw.AUM(n),
        sw.DataMaps(n),
        sw.Loss(n),
        sw.Margin(n),
        sw.Entropy(n),
        sw.Confidence(n),
        sw.ForgettingTracker(n),
        sw.Misclassified(n),
    ]


@pytest.mark.parametrize(("batch", "classes"), [(512, 10), (256, 1000), (64, 32000)])
@pytest.mark.parametrize("what", ["el2n_alone", "collection_all", "separate_all"])
def test_collection_vs_separate(benchmark, batch, classes, what):
    benchmark.group = f"collection-{batch}x{classes}"
    n = 50_000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=gen) * 3
    targets = torch.randint(0, classes, (batch,), generator=gen)
    indices = torch.randperm(n, generator=gen)[:batch]
    if what == "el2n_alone":
        el2n = sw.EL2N(n)
        benchmark(el2n.update_indexed, indices, logits, targets)
    elif what == "collection_all":
        collection = sw.ScorerCollection(*_scorers(n))
        benchmark(collection.update_indexed, indices, logits, targets)
    else:
        separate = _scorers(n)

        def update_each() -> None:
            for s in separate:
                s.update_indexed(indices, logits, targets)

        benchmark(update_each)
