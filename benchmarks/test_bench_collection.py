"""ScorerCollection: the logit scorers with one shared read of each batch, against EL2N alone,
against the same scorers updated one by one, and against the forward passes they ride on.

Run: python -m pytest benchmarks/test_bench_collection.py --benchmark-enable \\
    --benchmark-group-by=group --benchmark-timer=time.process_time
Compare entries within a group (one thread, same run). ``time.process_time`` keeps the ratios
steady on a shared machine (wall time counts the time other processes hold the core).

Targets (docs/performance.md, "Scoring hot path"): the collection of EL2N, forgetting,
Misclassified, AUM, data maps and loss (``collection_six``) ≤ 1.5× ``el2n_alone`` and ≤ 0.6×
``separate_six``; per update ≤ 2 % of a ResNet-18-width CNN's forward at batch 128 and ≤ 10 % of
the MNIST-1D CNN's forward at batch 512. ``collection_all`` adds margin, entropy and confidence
(the entropy is a log per logit, as dear as the exponentials). ``collection_six_compiled`` is
``ScorerCollection(..., compile=True)``: the six are fusable, so every update is one compiled call
(statistics and state updates; its compilation happens before the timing).
"""

from __future__ import annotations

import pytest
import torch
from models import mnist1d_cnn, resnet18_gn

import sampleweights as sw

N = 50_000


def _six(n: int) -> list[sw.Scorer]:
    return [
        sw.EL2N(n),
        sw.ForgettingTracker(n),
        sw.Misclassified(n),
        sw.AUM(n),
        sw.DataMaps(n),
        sw.Loss(n),
    ]


def _all(n: int) -> list[sw.Scorer]:
    return [*_six(n), sw.Margin(n), sw.Entropy(n), sw.Confidence(n)]


def _batch(batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=gen) * 3
    targets = torch.randint(0, classes, (batch,), generator=gen)
    indices = torch.randperm(N, generator=gen)[:batch]
    return indices, logits, targets


@pytest.mark.parametrize(("batch", "classes"), [(512, 10), (256, 1000), (64, 32000)])
@pytest.mark.parametrize(
    "what",
    ["el2n_alone", "collection_six", "collection_six_compiled", "collection_all", "separate_six"],
)
def test_collection_vs_separate(benchmark, batch, classes, what):
    benchmark.group = f"collection-{batch}x{classes}"
    indices, logits, targets = _batch(batch, classes)
    if what == "el2n_alone":
        el2n = sw.EL2N(N)
        benchmark(el2n.update_indexed, indices, logits, targets)
    elif what.startswith("collection"):
        compiled = what.endswith("_compiled")
        scorers = _all(N) if what == "collection_all" else _six(N)
        collection = sw.ScorerCollection(*scorers, compile=compiled)
        if compiled:  # the first update places the states, the second compiles: not timed
            collection.update_indexed(indices, logits, targets)
            collection.update_indexed(indices, logits, targets)
        benchmark(collection.update_indexed, indices, logits, targets)
    else:
        separate = _six(N)

        def update_each() -> None:
            for s in separate:
                s.update_indexed(indices, logits, targets)

        benchmark(update_each)


@pytest.mark.parametrize(
    ("name", "make_model", "inputs"),
    [
        ("mnist1d-cnn-b512", lambda: mnist1d_cnn(16), lambda: torch.randn(512, 1, 40)),
        ("resnet18-gn-b128", resnet18_gn, lambda: torch.randn(128, 3, 32, 32)),
    ],
)
@pytest.mark.parametrize(
    "what", ["forward", "collection_six", "collection_six_compiled", "el2n_alone"]
)
def test_collection_vs_forward(benchmark, name, make_model, inputs, what):
    """The collection's update against the no-grad forward that produced its logits (10
    classes); the MNIST-1D CNN is the README's 2.5k-parameter model (16 channels)."""
    benchmark.group = f"collection-vs-forward-{name}"
    x = inputs()
    if what == "forward":
        model = make_model().eval()
        rounds = 2 if name.startswith("resnet") else 20
        with torch.no_grad():
            benchmark.pedantic(model, args=(x,), rounds=rounds, warmup_rounds=1)
        return
    indices, logits, targets = _batch(x.shape[0], 10)
    if what == "el2n_alone":
        scorer: sw.Scorer | sw.ScorerCollection = sw.EL2N(N)
    else:
        scorer = sw.ScorerCollection(*_six(N), compile=what.endswith("_compiled"))
    for _ in range(2):  # the states placed and any compilation done outside the timing
        scorer.update_indexed(indices, logits, targets)
    benchmark(scorer.update_indexed, indices, logits, targets)
