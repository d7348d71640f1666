"""GraNd's one-example-at-a-time engine (``engine="loop"``) against hooks, vmap and the floor.

Ratios to the floor (one forward + backward of the mean loss on the batch), all measured in one
run, one thread, medians over ``--rounds`` rounds after one warm-up.

Run: python benchmarks/grand_exact.py [--rounds 3]
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


def median_time(fn, rounds: int) -> float:
    fn()  # warm-up (and, for auto on the GRU, the one failed vmap attempt)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "GraNd: ", UserWarning)
    print("| model (batch) | floor | hooks | vmap, chunk 32 | auto | loop |")
    print("|---|---|---|---|---|---|")
    for name, (build, inputs) in CASES.items():
        torch.manual_seed(0)
        model = build().eval()
        x = inputs()
        y = torch.randint(0, 10, (x.shape[0],))
        idx = torch.arange(len(y))

        def floor(model=model, x=x, y=y) -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()

        cells = {"floor": median_time(floor, args.rounds)}
        for engine in ("hooks", "vmap", "auto", "loop"):
            scorer = sw.GraNd(model, len(y), engine=engine, chunk_size=32)  # type: ignore[arg-type]
            try:
                cells[engine] = median_time(
                    lambda s=scorer: s.update_indexed(idx, x, y), args.rounds
                )
            except (TypeError, RuntimeError):  # hooks / vmap cannot score this model
                cells[engine] = float("nan")
        base = cells["floor"]
        row = [f"{base * 1e3:.1f} ms"] + [
            "—" if cells[k] != cells[k] else f"{cells[k] / base:.1f}×"
            for k in ("hooks", "vmap", "auto", "loop")
        ]
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
