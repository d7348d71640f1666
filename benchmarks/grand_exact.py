"""GraNd's one-example-at-a-time engine (``engine="loop"``) against hooks, vmap and the floor.

Ratios to the floor (one forward + backward of the mean loss on the batch), all measured in one
run, one thread: each round times every engine once, each ratio is taken within its round, and
the table shows the median over ``--rounds`` rounds (after one warm-up call each).

Run: python benchmarks/grand_exact.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from models import TinyTransformer, cnn32, mlp_256
from torch import nn

import sampleweights as sw


class GRUClassifier(nn.Module):
    """A GRU over (B, 32, 16) with a Linear head: no per-layer rule, vmap cannot transform it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(16, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


CASES = {
    "MLP 40→256→256→10 (512)": (mlp_256, lambda: torch.randn(512, 40)),
    "CNN 32×32×3 (128)": (lambda: cnn32(False), lambda: torch.randn(128, 3, 32, 32)),
    "CNN + GroupNorm (128)": (lambda: cnn32(True), lambda: torch.randn(128, 3, 32, 32)),
    "transformer T = 64 (64)": (TinyTransformer, lambda: torch.randint(0, 1000, (64, 64))),
    "GRU 16→64, T = 32 (128)": (GRUClassifier, lambda: torch.randn(128, 32, 16)),
}


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
    engines = ("hooks", "vmap", "auto", "loop")
    print("| model (batch) | floor | hooks | vmap, chunk 32 | auto | loop | loop / vmap |")
    print("|---|---|---|---|---|---|---|")
    for name, (build, inputs) in CASES.items():
        torch.manual_seed(0)
        model = build().eval()
        x = inputs()
        y = torch.randint(0, 10, (x.shape[0],))
        idx = torch.arange(len(y))

        def floor(model=model, x=x, y=y) -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        fns = {"floor": floor}
        for engine in engines:
            scorer = sw.GraNd(model, len(y), engine=engine, chunk_size=32)  # type: ignore[arg-type]
            fn = lambda s=scorer, i=idx, a=x, b=y: s.update_indexed(i, a, b)  # noqa: E731
            try:
                fn()  # warm-up (and, for auto on the GRU, the one failed vmap attempt)
                fns[engine] = fn
            except (TypeError, RuntimeError):  # hooks / vmap cannot score this model
                pass
        floor()
        # rounds interleave the engines, and each ratio is taken against the floor of its own
        # round: load changes on a shared machine hit both sides of a ratio alike
        ratios: dict[str, list[float]] = {k: [] for k in fns}
        base = []
        for _ in range(args.rounds):
            t = {k: once(fn) for k, fn in fns.items()}
            base.append(t["floor"])
            for k in fns:
                ratios[k].append(t[k] / t["floor"])
            if "vmap" in fns:
                ratios.setdefault("loop/vmap", []).append(t["loop"] / t["vmap"])
        cells = [f"{statistics.median(base) * 1e3:.1f} ms"]
        for k in (*engines, "loop/vmap"):
            cells.append(f"{statistics.median(ratios[k]):.1f}×" if ratios.get(k) else "—")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
