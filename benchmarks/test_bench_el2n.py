"""EL2N.update against the forward it rides on, and against the naive formula.

Run: python -m pytest benchmarks/test_bench_el2n.py --benchmark-enable --benchmark-group-by=group
Compare entries within a group (one thread, same run).
"""

from __future__ import annotations

import pytest
import torch
from models import mnist1d_cnn, tiny_mlp

import sampleweights as sw


def naive_el2n(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=1)
    return torch.linalg.vector_norm(
        p - torch.nn.functional.one_hot(targets, logits.shape[1]), dim=1
    )


def _update_fn(batch: int, classes: int, n: int = 50_000):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=gen)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    indices = torch.randperm(n, generator=gen)[:batch]
    scorer = sw.EL2N(n)
    return lambda: scorer.update_indexed(indices, logits, targets)


@pytest.mark.benchmark(group="el2n-vs-forward-512x10")
@pytest.mark.parametrize("what", ["el2n_update", "cnn_forward", "mlp_forward"])
def test_update_vs_forward(benchmark, what):
    x = torch.randn(512, 40)
    if what == "el2n_update":
        benchmark(_update_fn(512, 10))
        return
    model = mnist1d_cnn() if what == "cnn_forward" else tiny_mlp()
    inp = x[:, None, :] if what == "cnn_forward" else x
    with torch.no_grad():
        benchmark(model, inp)


@pytest.mark.parametrize(("batch", "classes"), [(256, 1000), (64, 32000)])
@pytest.mark.parametrize("what", ["el2n_update", "el2n_formula", "naive_formula"])
def test_formula_vs_naive(benchmark, batch, classes, what):
    benchmark.group = f"el2n-vs-naive-{batch}x{classes}"
    if what == "el2n_update":
        benchmark(_update_fn(batch, classes))
        return
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=gen)
    targets = torch.randint(0, classes, (batch,), generator=gen)
    fn = sw.el2n if what == "el2n_formula" else naive_el2n
    benchmark(fn, logits, targets)
