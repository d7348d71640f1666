"""Data Diet on MNIST-1D, end to end, written as an ordinary training loop using sampleweights.

Paul, Ganguli & Dziugaite (2021) score every training example early in training — EL2N, the norm
of the error vector, and GraNd, the norm of the loss gradient, averaged over a few runs — keep the
highest-scoring fraction and train from scratch on it. This script reproduces that experiment on
MNIST-1D (Greydanus 2020), generated offline, with a small 1D-CNN:

1. train ``--score-seeds`` models for ``--score-epochs`` epochs (forgetting events tracked in the
   loop) and score the training set with EL2N and GraNd (eval mode, averaged over the seeds);
   GraNd is also taken at initialisation;
2. ``select`` subsets at each kept fraction with several strategies;
3. retrain from scratch on each subset with ``PrunedSampler`` — by default the same number of
   optimiser steps as a full-data run (``num_samples=N``: the kept fraction is trained for
   proportionally more epochs), as Data Diet, CCS and Sorscher et al. compare; ``--no-equal-steps``
   gives each pruned run ``--epochs`` passes over its subset instead (fewer steps) — over
   ``--seeds`` seeds;
4. print a table of test accuracy (mean ± std over seeds), with the verdict of each strategy
   against random at that fraction, and write ``results.json`` and ``data_diet.png``.

Every finished training run (a *cell*: one strategy, fraction and seed) is saved under
``--out``/cells as soon as it ends, so an interrupted run picks up where it stopped when started
again with the same settings; ``--fresh`` recomputes everything. Each process trains with one
thread (``--threads``): the models here have ~2.5k parameters, and with several threads per step
the threads' synchronisation costs more than the arithmetic (on a busy 2-core machine: 254 ms a
step with the default thread count, 27 ms with one).

The default (4 000 examples, 8 strategies × 4 fractions) is where random selection is hard to
beat. The larger setting in docs/results.md asks whether the hardest examples beat random at mild
pruning with more data; ``--examples`` sets the data size and ``--strategies``/``--fractions``
restrict the grid so it fits:

Run: python examples/data_diet.py            (defaults: see README.md for the measured time)
     python examples/data_diet.py --fresh    (ignore saved cells and recompute them)
     python examples/data_diet.py --smoke    (seconds; what the tests run)
     python examples/data_diet.py --examples 16000 --strategies random,el2n-hardest,grand-hardest \
         --fractions 0.5,0.7,0.9 --out runs/data_diet_16k     (the larger setting)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional

    class tqdm:  # type: ignore[no-redef]  # a stand-in with the calls used here
        def __init__(self, iterable: Any = None, **_: Any) -> None:
            self.iterable = iterable

        def __iter__(self) -> Iterator[Any]:
            return iter(self.iterable)

        def update(self, n: int = 1) -> None: ...

        def set_postfix_str(self, s: str) -> None: ...

        def close(self) -> None: ...


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Train with ``n`` intra-op threads, restoring the previous count afterwards.

    Tiny models are fastest on one thread: each step's work is a few microseconds per operator,
    less than what waking and joining a thread pool costs, and on a machine other jobs share
    the extra threads only compete for the same cores.
    """
    if n < 1:
        raise ValueError(f"Expected `--threads` ≥ 1, but got {n}; pass e.g. --threads 1.")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- data ---------------------------------------------------------------------------------------
def load_mnist1d(n_train: int, cache_dir: Path, seed: int = 42) -> dict[str, np.ndarray]:
    """MNIST-1D generated on this machine (never downloaded), cached in ``cache_dir``."""
    total = math.ceil(n_train / 0.8)
    path = cache_dir / f"mnist1d_{total}_{seed}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = total, 0.8, seed
    data = make_dataset(args)  # generated from templates on this machine
    data = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return data


def tensors(data: dict[str, np.ndarray]) -> tuple[TensorDataset, TensorDataset]:
    def ds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y))

    return ds(data["x"], data["y"]), ds(data["x_test"], data["y_test"])


# -- model and training ----------------------------------------------------------------------------
def make_model(channels: int = 16) -> nn.Module:
    """A 1D-CNN for MNIST-1D (B, 1, 40) → 10 classes: ~2.5k parameters at 16 channels."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, 10),
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    device: torch.device,
    tracker: sw.ForgettingTracker | None = None,
    desc: str = "training",
) -> nn.Module:
    """An ordinary loop; the only sampleweights line is the forgetting tracker's update."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    sampler = loader.sampler
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, position=1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        for x, y, index in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            F.cross_entropy(logits, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if tracker is not None:
                tracker.update((x, y, index), logits)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, test: TensorDataset, device: torch.device) -> float:
    model.eval()
    x, y = test.tensors
    return float((model(x.to(device)).argmax(1).cpu() == y).float().mean())


# -- the experiment --------------------------------------------------------------------------------
STRATEGIES = {
    # name: (score, strategy, offset)
    "random": ("el2n", "random", 0.0),
    "el2n-hardest": ("el2n", "hardest", 0.0),
    "el2n-easiest": ("el2n", "easiest", 0.0),
    "el2n-stratified": ("el2n", "stratified", 0.0),
    "el2n-offset": ("el2n", "hardest", 0.05),
    "grand-init-hardest": ("grand_init", "hardest", 0.0),
    "grand-hardest": ("grand", "hardest", 0.0),
    "forgetting-hardest": ("forgetting", "hardest", 0.0),
}


# -- cells: every finished training run is saved, so a stopped run resumes ------------------------
CELLS_VERSION = 2  # bump when a change makes saved cells stale (2: forgetting restarts per run)


class Cells:
    """One JSON file per finished training run, in a folder named by the settings that made it.

    Files are written atomically (a temporary file, then a rename), so a run killed mid-write
    leaves either the whole cell or none. Settings that change results (data size, epochs,
    learning rate, batch size, scoring runs, device type) are part of the folder name, so cells
    from other settings are never mixed in; the thread count is not (it does not change what is
    computed, only how fast).
    """

    def __init__(self, root: Path, settings: dict[str, Any], fresh: bool = False) -> None:
        key = json.dumps({"version": CELLS_VERSION, **settings}, sort_keys=True)
        self.folder = root / hashlib.sha1(key.encode()).hexdigest()[:12]
        if fresh and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "settings.json").write_text(key)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, name: str, value: dict[str, Any]) -> None:
        path = self.path(name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)


def score(train_ds, args, device) -> dict[str, torch.Tensor]:
    """EL2N and GraNd after ``score_epochs`` (averaged over seeds), GraNd at init, forgetting."""
    n = len(train_ds)
    ds = sw.WithIndex(train_ds)
    scoring_loader = DataLoader(ds, batch_size=512)
    el2n, forgetting = sw.EL2N(n), sw.ForgettingTracker(n)
    grand_init = grand = None
    for seed in range(args.score_seeds):
        torch.manual_seed(1000 + seed)
        model = make_model().to(device)
        # one GraNd scorer per score, re-pointed at each seed's model: the running mean averages
        grand_init = grand_init or sw.GraNd(model, n)
        grand_init.set_model(model)
        sw.score_dataset(model, scoring_loader, grand_init, progress=False)  # at initialisation
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True)
        # a fresh model: its first presentation of an example must not be compared with the last
        # presentation of the previous run (that would count spurious forgetting events)
        forgetting.new_run()
        desc = f"scoring run {seed + 1}/{args.score_seeds}"
        train(model, loader, args.score_epochs, args.lr, device, tracker=forgetting, desc=desc)
        grand = grand or sw.GraNd(model, n)
        grand.set_model(model)
        sw.score_dataset(model, scoring_loader, el2n, grand, progress=False)  # early in training
    if grand is None or grand_init is None:
        raise ValueError(f"Expected `--score-seeds` ≥ 1, but got {args.score_seeds}.")
    return {
        "el2n": el2n.compute().cpu(),
        "grand": grand.compute().cpu(),
        "grand_init": grand_init.compute().cpu(),
        "forgetting": forgetting.compute().cpu(),
    }


def saved_scores(train_ds, args, device, cells: Cells) -> tuple[dict[str, torch.Tensor], float]:
    """The scores, computed once per settings and then read back (``--fresh`` recomputes)."""
    cell = cells.get("scores")
    if cell is None:
        t0 = time.time()
        scores = score(train_ds, args, device)
        # JSON has no inf: forgetting's "never learned" is stored as None
        cell = {
            "seconds": round(time.time() - t0, 2),
            "scores": {
                k: [None if math.isinf(v) else v for v in t.double().tolist()]
                for k, t in scores.items()
            },
        }
        cells.put("scores", cell)
    scores = {
        k: torch.tensor([math.inf if v is None else v for v in vals], dtype=torch.float32)
        for k, vals in cell["scores"].items()
    }
    return scores, float(cell["seconds"])


def make_loader(
    ds: sw.WithIndex,
    indices: torch.Tensor | None,
    seed: int,
    batch_size: int,
    equal_steps: bool,
) -> DataLoader:
    """The training loader of one run: all of ``ds`` (``indices=None``) or the kept ``indices``.

    With ``equal_steps`` an epoch of a subset draws ``len(ds)`` examples (``PrunedSampler``'s
    ``num_samples``), so every run takes as many optimiser steps as a full-data run; without it
    an epoch is one pass over the subset.
    """
    n = len(ds)
    if indices is None:
        return DataLoader(ds, batch_size=batch_size, shuffle=True)
    num_samples = n if equal_steps else None
    sampler = sw.PrunedSampler(indices, num_examples=n, seed=seed, num_samples=num_samples)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler)


def cell_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The settings that change what a cell holds, which name the cells' folder.

    ``--strategies``, ``--fractions`` and ``--seeds`` are not among them: they choose which cells
    are run, and each cell's file is named by its strategy, fraction and seed. ``equal_steps`` is
    keyed only when off, so cells saved by runs made before the flag existed stay valid.
    """
    keys = ("n_train", "epochs", "score_seeds", "score_epochs", "batch_size", "lr")
    settings: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if not args.equal_steps:
        settings["equal_steps"] = False
    return {**settings, "device": device.type}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    t0 = time.time()
    data = load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, test_ds = tensors(data)
    n = len(train_ds)
    cells = Cells(Path(args.out) / "cells", cell_settings(args, device), args.fresh)
    ds = sw.WithIndex(train_ds)
    seeds = list(range(args.seeds))
    jobs = [("full-data", None, s) for s in seeds]
    jobs += [(name, f, s) for f in args.fractions for name in args.strategies for s in seeds]
    cell_names = [f"{name}#{s}" if f is None else f"{name}@{f}#{s}" for name, f, s in jobs]
    done = sum(cells.path(c).exists() for c in cell_names)
    print(
        f"cells in {cells.folder}: {done} of {len(jobs)} training runs already saved"
        + (" (resuming; --fresh recomputes them)" if done else ""),
        flush=True,
    )
    scores, scoring_seconds = saved_scores(train_ds, args, device, cells)

    def retrain(indices: torch.Tensor | None, seed: int, desc: str) -> float:
        torch.manual_seed(seed)
        model = make_model().to(device)
        loader = make_loader(ds, indices, seed, args.batch_size, args.equal_steps)
        train(model, loader, args.epochs, args.lr, device, desc=desc)
        return accuracy(model, test_ds, device)

    # optimiser steps of one run, per kept fraction (the same for every strategy and seed)
    steps = {"full-data": args.epochs * len(make_loader(ds, None, 0, args.batch_size, True))}
    for f in args.fractions:
        kept = torch.arange(max(1, round(f * n)))
        loader = make_loader(ds, kept, 0, args.batch_size, args.equal_steps)
        steps[str(f)] = args.epochs * len(loader)

    full: list[float] = []
    results: dict[str, dict[str, list[float]]] = {}
    train_seconds, computed = 0.0, 0
    bar = tqdm(total=len(jobs), initial=done, desc="training runs", unit="run", position=0)
    for cell_name, (name, frac, s) in zip(cell_names, jobs, strict=True):
        cell = cells.get(cell_name)
        if cell is None:
            t1 = time.time()
            if frac is None:
                acc = retrain(None, s, cell_name)
            else:
                score_name, strategy, offset = STRATEGIES[name]
                keep = sw.select(scores[score_name], frac, strategy, offset=offset, seed=s)
                acc = retrain(keep, s, cell_name)
            cell = {"accuracy": acc, "seconds": round(time.time() - t1, 2)}
            cells.put(cell_name, cell)
            computed += 1
            bar.update()
            bar.set_postfix_str(f"{cell_name}: {100 * acc:.1f}%")
        train_seconds += cell["seconds"]
        if frac is None:
            full.append(cell["accuracy"])
        else:
            results.setdefault(name, {}).setdefault(str(frac), []).append(cell["accuracy"])
    bar.close()
    out = {
        "command": "python examples/data_diet.py " + " ".join(args.argv),
        "n_train": n,
        "n_test": len(test_ds),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "score_seeds": args.score_seeds,
        "score_epochs": args.score_epochs,
        "fractions": args.fractions,
        "strategies": args.strategies,
        "equal_steps": args.equal_steps,
        "steps": steps,
        "threads": args.threads,
        "full_data": full,
        "results": results,
        "cells": str(cells.folder),
        "runs_computed": computed,
        "runs_resumed": len(jobs) - computed,
        # wall time of this invocation, and the summed time of every run (scoring included)
        # across however many invocations it took
        "seconds": round(time.time() - t0, 1),
        "compute_seconds": round(scoring_seconds + train_seconds, 1),
        "never_learned": int(torch.isinf(scores["forgetting"]).sum()),
    }
    return out


# -- reporting -------------------------------------------------------------------------------------
def verdict(accs: list[float], base: list[float]) -> str:
    """Better / worse than random when the mean differs by more than 2 standard errors."""
    if len(accs) < 2:
        return "?"
    diff = float(np.mean(accs) - np.mean(base))
    se = math.sqrt(np.var(accs, ddof=1) / len(accs) + np.var(base, ddof=1) / len(base))
    if diff > 2 * se:
        return "better"
    if diff < -2 * se:
        return "worse"
    return "≈"


def table(out: dict) -> str:
    fracs = [str(f) for f in out["fractions"]]
    full = out["full_data"]
    lines = [
        f"Test accuracy (%) on MNIST-1D, mean ± std over {out['seeds']} seeds; "
        f"full data: {100 * np.mean(full):.1f} ± {100 * np.std(full):.1f}",
        "vs random: better / worse = mean differs by > 2 standard errors, ≈ = within noise",
        "",
        "| strategy | " + " | ".join(f"keep {float(f):.0%}" for f in fracs) + " |",
        "|---|" + "---|" * len(fracs),
    ]
    base = out["results"].get("random")  # absent when --strategies leaves it out: no verdicts
    for name, row in out["results"].items():
        cells = []
        for f in fracs:
            accs = row[f]
            cell = f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f}"
            if name != "random" and base is not None:
                cell += f" ({verdict(accs, base[f])})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fracs = out["fractions"]
    for name, row in out["results"].items():
        means = [100 * np.mean(row[str(f)]) for f in fracs]
        stds = [100 * np.std(row[str(f)]) for f in fracs]
        ax.errorbar(fracs, means, yerr=stds, marker="o", capsize=3, label=name)
    full = 100 * np.mean(out["full_data"])
    ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full data")
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Data Diet on MNIST-1D ({out['n_train']} train, {out['seeds']} seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--examples",
        "--n-train",
        dest="n_train",
        metavar="N",
        type=int,
        default=4000,
        help="training examples, generated offline (test: n/4)",
    )
    p.add_argument(
        "--fractions",
        nargs="+",
        default=["0.1,0.3,0.5,0.7"],
        help="kept fractions in (0, 1], comma- or space-separated, e.g. 0.5,0.7,0.9",
    )
    p.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help=f"comma-separated subset of: {', '.join(STRATEGIES)} (default: all)",
    )
    p.add_argument(
        "--equal-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pruned runs take as many optimiser steps as a full-data run, i.e. proportionally\n"
        "more epochs (Data Diet's comparison; the default); --no-equal-steps: --epochs\n"
        "passes over the subset",
    )
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per cell")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each (re)training run")
    p.add_argument("--score-seeds", type=int, default=4, help="runs averaged into the scores")
    p.add_argument("--score-epochs", type=int, default=3, help="training before scoring")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/data_diet", help="output folder")
    p.add_argument("--data-dir", default="examples/data", help="cache of the generated data")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per process (1: fastest for these tiny models, and on a busy box)",
    )
    p.add_argument("--fresh", action="store_true", help="recompute every cell instead of resuming")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the tests (seconds)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.fractions = parse_fractions(args.fractions)
    args.strategies = parse_strategies(args.strategies)
    if args.n_train < 10:
        raise ValueError(f"Expected `--examples` ≥ 10, but got {args.n_train}; pass e.g. 16000.")
    if args.smoke:
        args.n_train, args.fractions, args.seeds, args.epochs = 400, [0.3, 0.7], 2, 2
        args.score_seeds, args.score_epochs = 2, 1
    return args


def parse_fractions(values: list[str]) -> list[float]:
    """``["0.5,0.7", "0.9"]`` → ``[0.5, 0.7, 0.9]``, each in (0, 1]."""
    parts = [v for value in values for v in value.split(",") if v.strip()]
    try:
        fractions = [float(v) for v in parts]
    except ValueError:
        raise ValueError(
            f"Expected `--fractions` to be numbers in (0, 1], but got {' '.join(values)!r}; "
            "pass e.g. --fractions 0.5,0.7,0.9."
        ) from None
    bad = [f for f in fractions if not 0 < f <= 1]
    if not fractions or bad:
        raise ValueError(
            f"Expected `--fractions` in (0, 1], but got {bad or 'none'}; "
            "pass e.g. --fractions 0.5,0.7,0.9."
        )
    return fractions


def parse_strategies(value: str) -> list[str]:
    """``"random,el2n-hardest"`` → ``["random", "el2n-hardest"]``, each a name in STRATEGIES."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in STRATEGIES]
    if not names or unknown:
        raise ValueError(
            f"Expected `--strategies` to name some of {', '.join(STRATEGIES)}, but got "
            f"{unknown or 'none'}; pass e.g. --strategies random,el2n-hardest,grand-hardest."
        )
    return list(dict.fromkeys(names))  # in the order given, once each


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    with threads(args.threads):
        out = run(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1))
    plot(out, folder / "data_diet.png")
    print(table(out))
    print(
        f"\n{out['never_learned']} examples never classified correctly in at least one scoring run "
        "(forgetting = inf: Data Diet's mean over runs)"
    )
    print(
        f"wrote {folder / 'results.json'} and {folder / 'data_diet.png'} in {out['seconds']} s "
        f"({out['runs_computed']} runs computed, {out['runs_resumed']} read back from "
        f"{out['cells']}; all runs together: {out['compute_seconds']} s)"
    )
    return out


if __name__ == "__main__":
    main()
