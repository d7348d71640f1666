"""GraNd engines against the floor and the alternatives, ratios within one run (one thread).

floor: one ordinary forward + backward of the mean loss on the batch (what a training step costs);
hooks: our hook engine (probe verdicts cached: every batch after the first of its shape);
hooks-first: the first batch of a shape, which also runs the layout probe (two more passes);
vmap / vmap-chunk32: ``torch.func`` vmap(grad) unchunked and chunked;
loop: one example at a time (only on the MLP — it is 50–500× slower elsewhere).

Run: python -m pytest benchmarks/test_bench_grand.py --benchmark-enable \
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
Peak memory: python benchmarks/grand_memory.py
"""

from __future__ import annotations

import pytest
import torch
from models import TinyTransformer, cnn32, mlp_256, resnet18_gn
from torch import nn

import sampleweights as sw
from sampleweights.pergrad import hooks

CASES = {
    "mlp-b512": (mlp_256, lambda: torch.randn(512, 40), 10),
    "cnn-b128": (lambda: cnn32(False), lambda: torch.randn(128, 3, 32, 32), 10),
    "cnn-gn-b128": (lambda: cnn32(True), lambda: torch.randn(128, 3, 32, 32), 10),
    "transformer-b64-t64": (TinyTransformer, lambda: torch.randint(0, 1000, (64, 64)), 10),
    "resnet18-gn-b64": (resnet18_gn, lambda: torch.randn(64, 3, 32, 32), 10),
}
HEAVY = {"resnet18-gn-b64"}


def _setup(name):
    torch.manual_seed(0)
    build, inputs, classes = CASES[name]
    model = build().eval()
    x = inputs()
    y = torch.randint(0, classes, (x.shape[0],))
    return model, x, y


def floor_step(model: nn.Module, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def one_example_loop(model, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for b in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[b : b + 1]), y[b : b + 1])
        out.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, params)).sqrt())
    return torch.stack(out)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("what", ["floor", "hooks", "hooks-first", "vmap-chunk32", "vmap", "loop"])
def test_grand(benchmark, name, what):
    if what == "loop" and name != "mlp-b512":
        pytest.skip("the one-example loop is only timed on the MLP")
    if what == "vmap" and name in HEAVY:
        pytest.skip("unchunked vmap(grad) needs > 10 GB here; see grand_memory.py")
    benchmark.group = f"grand-{name}"
    model, x, y = _setup(name)
    rounds = 2 if name in HEAVY else 5
    if what == "floor":
        fn = lambda: floor_step(model, x, y)  # noqa: E731
    elif what == "loop":
        fn = lambda: one_example_loop(model, x, y)  # noqa: E731
    elif what == "hooks-first":
        scorer = sw.GraNd(model, len(y), engine="hooks")
        idx = torch.arange(len(y))
        benchmark.pedantic(
            lambda: scorer.update_indexed(idx, x, y),
            setup=hooks._PROBED.clear,  # forget the verdicts: every round is a first batch
            rounds=rounds,
            warmup_rounds=1,
        )
        return
    else:
        engine = "vmap" if what.startswith("vmap") else "hooks"
        chunk = 32 if what == "vmap-chunk32" else len(y)
        scorer = sw.GraNd(model, len(y), engine=engine, chunk_size=chunk)
        idx = torch.arange(len(y))
        fn = lambda: scorer.update_indexed(idx, x, y)  # noqa: E731
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
