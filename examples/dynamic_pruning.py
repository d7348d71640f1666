"""Dynamic pruning (InfoBatch) on MNIST-1D against full data, random dynamic pruning and static
EL2N pruning, with ``sw.DynamicPruner`` in an ordinary training loop.

Methods, each trained ``--epochs`` epochs from scratch over ``--seeds`` seeds, with the same
model, optimiser and learning-rate schedule (OneCycle's shape by the fraction of the run done, so
an epoch's length does not matter):

* ``full-data``: every example every epoch;
* ``infobatch``: ``DynamicPruner(prune, anneal)``, loss from ``pruner.reweight``;
* ``random-dynamic``: each epoch keeps as many examples as ``infobatch`` kept in that epoch (same
  seed), chosen uniformly at random, loss unweighted (uniform pruning needs no rescaling);
* ``static-el2n``: the hardest EL2N examples (scored after ``--score-epochs`` epochs of
  ``--score-seeds`` runs, Data Diet) at the fraction that gives the same number of example-passes
  as ``infobatch``; the scoring passes are reported apart.

The data is MNIST-1D generated on this machine (``mnist1d.data.make_dataset``, never downloaded);
the data, model and scoring come from ``examples/data_diet.py``. Each finished run (a cell) is
saved under ``--out``/cells at once, so an interrupted run resumes; ``--fresh`` recomputes.

Run: python examples/dynamic_pruning.py          (see docs/results.md for the time it took)
     python examples/dynamic_pruning.py --smoke  (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import sampleweights as sw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_diet  # the data, the model and the scoring of the Data Diet example

METHODS = ("full-data", "infobatch", "random-dynamic", "static-el2n")


def one_cycle(t: float, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """OneCycleLR's cosine shape as a multiple of the peak rate, at fraction ``t`` of the run."""
    lo, end = 1 / div, 1 / (div * final_div)
    if t < pct_start:
        return lo + (1 - lo) * (1 - math.cos(math.pi * t / pct_start)) / 2
    return end + (1 - end) * (1 + math.cos(math.pi * (t - pct_start) / (1 - pct_start))) / 2


def train(
    method: str,
    seed: int,
    args: argparse.Namespace,
    ds: sw.WithIndex,
    test: Any,
    plan: dict[str, Any],
) -> dict[str, Any]:
    """One training run; returns its test accuracy, example-passes and per-epoch lengths."""
    n = len(ds)
    torch.manual_seed(seed)
    model = data_diet.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    progress = 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: one_cycle(progress))
    pruner = sw.DynamicPruner(n, args.prune, args.anneal, epochs=args.epochs, seed=seed)
    lengths: list[int] = []
    for epoch in range(args.epochs):
        if method == "infobatch":
            sampler: sw.PrunedSampler | sw.DynamicPruner = pruner
        elif method == "random-dynamic":  # as many as infobatch kept this epoch, at random
            count = plan["infobatch_lengths"][epoch]
            sampler = sw.PrunedSampler(
                sw.select(torch.zeros(n), count, "random", seed=seed * 100_003 + epoch)
            )
        elif method == "static-el2n":
            sampler = sw.PrunedSampler(plan["static_keep"], seed=seed)
        else:
            sampler = sw.PrunedSampler(range(n), seed=seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler)
        model.train()
        for i, (x, y, index) in enumerate(loader):
            per_example = F.cross_entropy(model(x), y, reduction="none")
            loss = pruner.reweight(per_example, index) if sampler is pruner else per_example.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress = (epoch + (i + 1) / len(loader)) / args.epochs
            sched.step()
        lengths.append(len(sampler))
    return {
        "accuracy": data_diet.accuracy(model, test, torch.device("cpu")),
        "passes": sum(lengths),
        "lengths": lengths,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    data = data_diet.load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, test_ds = data_diet.tensors(data)
    ds = sw.WithIndex(train_ds)
    n = len(ds)
    keys = ("n_train", "epochs", "batch_size", "lr", "prune", "anneal", "score_seeds")
    settings = {k: getattr(args, k) for k in (*keys, "score_epochs")}
    cells = data_diet.Cells(
        Path(args.out) / "cells", {"example": "dynamic", **settings}, args.fresh
    )
    computed = 0
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    scoring_passes = args.score_seeds * args.score_epochs * n
    for seed in range(args.seeds):
        plan: dict[str, Any] = {}
        for method in METHODS:
            name = f"{method}#{seed}"
            cell = cells.get(name)
            if cell is None:
                if method == "static-el2n":  # the same example-passes as infobatch
                    fraction = results["infobatch"][seed]["passes"] / (args.epochs * n)
                    plan["static_keep"] = sw.select(static_scores(train_ds, args, cells), fraction)
                t1 = time.time()
                cell = train(method, seed, args, ds, test_ds, plan)
                cell["seconds"] = round(time.time() - t1, 2)
                cells.put(name, cell)
                computed += 1
                print(
                    f"  {name}: {100 * cell['accuracy']:.1f}% test accuracy, "
                    f"{cell['passes']} example-passes, {cell['seconds']} s",
                    flush=True,
                )
            else:
                print(f"  {name}: already saved in {cells.folder}", flush=True)
            results[method].append(cell)
            if method == "infobatch":
                plan["infobatch_lengths"] = cell["lengths"]
    return {
        "command": "python examples/dynamic_pruning.py " + " ".join(args.argv),
        "n_train": n,
        "n_test": len(test_ds),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "prune": args.prune,
        "anneal": args.anneal,
        "scoring_passes": scoring_passes,
        "results": results,
        "cells": str(cells.folder),
        "runs_computed": computed,
        "seconds": round(time.time() - t0, 1),
    }


def static_scores(train_ds: Any, args: argparse.Namespace, cells: data_diet.Cells) -> torch.Tensor:
    """EL2N after ``score_epochs`` epochs of ``score_seeds`` runs (Data Diet), saved as a cell."""
    cell = cells.get("el2n-scores")
    if cell is None:
        scores = data_diet.score(train_ds, args, torch.device("cpu"))["el2n"]
        cell = {"el2n": scores.double().tolist()}
        cells.put("el2n-scores", cell)
    return torch.tensor(cell["el2n"], dtype=torch.float32)


def table(out: dict[str, Any]) -> str:
    n, epochs = out["n_train"], out["epochs"]
    full_passes = n * epochs
    full = [c["accuracy"] for c in out["results"]["full-data"]]
    lines = [
        f"MNIST-1D, {n} train / {out['n_test']} test, {epochs} epochs, {out['seeds']} seeds; "
        f"prune={out['prune']}, anneal={out['anneal']}",
        "",
        "| method | test accuracy (%) | Δ vs full (points) | example-passes | vs full | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for method, cells in out["results"].items():
        accs = [c["accuracy"] for c in cells]
        passes = float(np.mean([c["passes"] for c in cells]))
        extra = f" + {out['scoring_passes']} scoring" if method == "static-el2n" else ""
        lines.append(
            f"| {method} | {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} "
            f"| {100 * (np.mean(accs) - np.mean(full)):+.2f} | {passes:.0f}{extra} "
            f"| {passes / full_passes:.1%} | {np.mean([c['seconds'] for c in cells]):.1f} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=20000, help="training examples (test: n/4)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--prune", type=float, default=0.5, help="fraction of below-mean skipped")
    p.add_argument("--anneal", type=float, default=0.125, help="last fraction of epochs: full")
    p.add_argument("--score-seeds", type=int, default=2, help="runs averaged into EL2N")
    p.add_argument("--score-epochs", type=int, default=2, help="training before scoring")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: fastest here)")
    p.add_argument("--out", default="runs/dynamic_pruning", help="output folder")
    p.add_argument("--data-dir", default="examples/data", help="cache of the generated data")
    p.add_argument("--fresh", action="store_true", help="recompute every cell")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the tests (seconds)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.smoke:
        args.n_train, args.epochs, args.seeds, args.score_seeds, args.score_epochs = 600, 3, 1, 1, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    with data_diet.threads(args.threads):
        out = run(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"wrote {folder / 'results.json'} in {out['seconds']} s ({out['runs_computed']} runs)")
    return out


if __name__ == "__main__":
    main()
