"""Finding flipped labels on MNIST-1D with training dynamics: AUM, data maps, loss, forgetting.

A fraction of the training labels (``--noise``, e.g. 10 % and 20 %) is flipped uniformly to
another class; a model is trained on the noisy labels with one ``sw.ScorerCollection`` updated at
every step, recording

* AUM, the mean logit margin of the assigned label (Pleiss et al., NeurIPS 2020);
* data maps: confidence, variability and correctness (Swayamdipta et al., EMNLP 2020);
* the mean training loss, and forgetting events (Toneva et al., ICLR 2019).

Each score then flags the ``k`` examples it finds most suspicious, ``k`` = the true number of
flipped labels (so precision = recall): the lowest AUM, the lowest confidence (data maps'
hard-to-learn end), the highest loss, the most forgetting events; against a random ``k``. Two
rules that do not know ``k`` are reported too, with their own precision and recall:

* **AUM with the fake-class threshold** — Pleiss et al.'s recipe: ``N / (C + 1)`` random examples
  are assigned to an extra class ``C`` (the model gets ``C + 1`` outputs), the model is trained,
  and the 99th percentile of those examples' AUM is the threshold; real examples below it are
  flagged. Two runs with disjoint threshold sets, so every example is assessed in at least one;
  an example assessed in both is flagged only if both runs flag it (our choice);
* **the data map's hard-to-learn region** — the third of the examples with the lowest confidence
  (the 33 % subsets of Swayamdipta et al.).

Finally the flagged examples are dropped and a model is retrained (the same number of steps as
on all the data), beside CCS pruning to half the data (``select(..., "stratified",
cutoff_scores=-aum)`` with the threshold's count as the cut-off), random half, and an oracle that
drops exactly the flipped labels; test accuracy on the clean test set.

Threads, progress bars, the offline data and saved cells are those of ``data_diet.py``: every
finished training run is saved under ``--out``/cells, an interrupted run resumes when started
again with the same settings, and ``--fresh`` recomputes everything.

Run: python examples/label_noise.py            (defaults: see docs/results.md for the time)
     python examples/label_noise.py --fresh    (ignore saved cells and recompute them)
     python examples/label_noise.py --smoke    (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw

sys.path.insert(0, str(Path(__file__).parent))
from data_diet import (  # the same offline data, model, loop, threads, bars and saved cells
    Cells,
    accuracy,
    load_mnist1d,
    make_model,
    tensors,
    threads,
    tqdm,
    train,
)

CLASSES = 10
CELLS_VERSION = 1  # bump when a change makes saved cells stale

# detectors that flag the k most suspicious examples: (score, higher = more suspicious?)
TOP_K = {
    "random": None,
    "AUM (lowest)": ("aum", False),
    "confidence (lowest)": ("confidence", False),
    "loss (highest)": ("loss", True),
    "forgetting (most)": ("forgetting", True),
}
RULES = ["AUM fake-class threshold", "hard-to-learn region (lowest 33% confidence)"]
# retraining runs: cell name → row of the table
RETRAIN = {
    "aum-cleaned": "AUM-flagged dropped",
    "ccs-half": "CCS 50% (cut-off: AUM-flagged count)",
    "random-half": "random 50%",
    "oracle": "oracle: flipped dropped",
}


# -- noise -------------------------------------------------------------------------------------
def flip_labels(y: torch.Tensor, rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``round(rate · N)`` labels, chosen uniformly, each to a uniformly chosen other class.

    Returns the noisy labels and the boolean mask of flipped examples.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = len(y)
    flipped = torch.zeros(n, dtype=torch.bool)
    chosen = torch.randperm(n, generator=gen)[: round(rate * n)]
    flipped[chosen] = True
    noisy = y.clone()
    shift = torch.randint(1, CLASSES, (len(chosen),), generator=gen)  # never 0: always another
    noisy[chosen] = (y[chosen] + shift) % CLASSES
    return noisy, flipped


# -- training runs -----------------------------------------------------------------------------
def loader_of(x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, keep=None, seed=0):
    ds = sw.WithIndex(TensorDataset(x, y))
    if keep is None:
        return DataLoader(ds, batch_size=args.batch_size, shuffle=True)
    # the same number of steps as on all the data: an epoch of the subset is N draws
    sampler = sw.PrunedSampler(keep, num_examples=len(ds), seed=seed, num_samples=len(ds))
    return DataLoader(ds, batch_size=args.batch_size, sampler=sampler)


def dynamics_run(x, noisy, test_ds, args, seed: int, device, desc: str) -> dict[str, Any]:
    """Train on the noisy labels with the collection updated at every step."""
    n = len(noisy)
    scorers = sw.ScorerCollection(sw.AUM(n), sw.DataMaps(n), sw.Loss(n), sw.ForgettingTracker(n))
    torch.manual_seed(seed)
    model = make_model().to(device)
    loader = loader_of(x, noisy, args)
    # the loop calls scorers.update((x, y, index), logits) after every step
    train(model, loader, args.epochs, args.lr, device, tracker=scorers, desc=desc)
    scores = scorers.compute()
    maps = scorers["datamaps"].compute_all()
    out = {
        "aum": scores["aum"],
        "loss": scores["loss"],
        "forgetting": scores["forgetting"],
        "confidence": maps["confidence"],
        "variability": maps["variability"],
    }
    return {
        "accuracy": accuracy(model, test_ds, device),
        # JSON has no inf: forgetting's "never learned" is stored as None
        "scores": {k: [None if np.isinf(v) else round(v, 6) for v in t.tolist()]
                   for k, t in out.items()},
    }  # fmt: skip


def threshold_runs(x, noisy, args, seed: int, device, desc: str) -> dict[str, Any]:
    """Pleiss et al.'s fake-class recipe, twice with disjoint threshold sets; the flagged mask."""
    n = len(noisy)
    gen = torch.Generator().manual_seed(20_000 + seed)
    order = torch.randperm(n, generator=gen)
    m = n // (CLASSES + 1)
    flagged = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for r in range(2):
        fake = order[r * m : (r + 1) * m]
        labels = noisy.clone()
        labels[fake] = CLASSES  # the extra class
        torch.manual_seed(seed + 100 * (r + 1))
        model = make_model()
        model[-1] = nn.Linear(model[-1].in_features, CLASSES + 1)  # C + 1 outputs
        model = model.to(device)
        aum = sw.AUM(n)
        loader = loader_of(x, labels, args)
        train(model, loader, args.epochs, args.lr, device, tracker=aum, desc=f"{desc} ({r + 1}/2)")
        scores = aum.compute()
        threshold = sw.AUM.threshold(scores, fake, percentile=args.percentile)
        is_fake = torch.zeros(n, dtype=torch.bool)
        is_fake[fake] = True
        flagged &= (scores.cpu() < threshold) | is_fake  # assessed where not a threshold example
        thresholds.append(threshold)
    return {"thresholds": thresholds, "flagged": flagged.nonzero().squeeze(1).tolist()}


def retrain(x, noisy, keep, test_ds, args, seed: int, device, desc: str) -> dict[str, Any]:
    """Train from scratch on the examples ``keep``; test accuracy."""
    torch.manual_seed(seed)
    model = make_model().to(device)
    loader = loader_of(x, noisy, args, keep=keep, seed=seed)
    train(model, loader, args.epochs, args.lr, device, desc=desc)
    return {"accuracy": accuracy(model, test_ds, device), "kept": len(keep)}


def scores_of(cell: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor([np.inf if v is None else v for v in vals], dtype=torch.float32)
        for k, vals in cell["scores"].items()
    }


def flags(scores: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, torch.Tensor]:
    """Each top-k detector's ``k`` most suspicious examples (ties in a seeded random order)."""
    out = {}
    for name, spec in TOP_K.items():
        if spec is None:
            out[name] = sw.select(scores["aum"], k, "random", seed=seed)
        else:
            key, higher = spec
            s = scores[key] if higher else -scores[key]
            out[name] = sw.select(s, k, "hardest", seed=seed)
    return out


def precision_recall(chosen: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    hits = int(flipped[chosen].sum())
    precision = hits / len(chosen) if len(chosen) else 0.0
    return precision, hits / int(flipped.sum())


# -- the experiment ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    t0 = time.time()
    data = load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, test_ds = tensors(data)
    x, y = train_ds.tensors
    n = len(y)
    settings = {
        k: getattr(args, k) for k in ("n_train", "epochs", "batch_size", "lr", "percentile")
    }
    settings.update(example="label_noise", example_version=CELLS_VERSION, device=device.type)
    cells = Cells(Path(args.out) / "cells", settings, args.fresh)
    jobs = [(rate, s) for rate in args.noise for s in range(args.seeds)]
    stages = ["dynamics", "threshold", *RETRAIN]
    names = [f"{stage}@{rate}#{s}" for rate, s in jobs for stage in stages]
    done = sum(cells.path(c).exists() for c in names)
    print(
        f"cells in {cells.folder}: {done} of {len(names)} training runs already saved"
        + (" (resuming; --fresh recomputes them)" if done else ""),
        flush=True,
    )
    bar = tqdm(total=len(names), initial=done, desc="training runs", unit="run", position=0)
    computed, compute_seconds = 0, 0.0

    def cell(name: str, make, *make_args: Any) -> dict[str, Any]:
        """The saved cell ``name``, or ``make(*make_args, desc=name)`` computed and saved."""
        nonlocal computed, compute_seconds
        value = cells.get(name)
        if value is None:
            t1 = time.time()
            value = {**make(*make_args, desc=name), "seconds": round(time.time() - t1, 2)}
            cells.put(name, value)
            computed += 1
            bar.update()
        compute_seconds += value["seconds"]
        return value

    detection: dict[str, dict[str, list[list[float]]]] = {}
    test_acc: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, list[int]] = {}
    maps: dict[str, dict[str, Any]] = {}
    for rate, s in jobs:
        tag = f"@{rate}#{s}"
        noisy, flipped = flip_labels(y, rate, s)
        k = int(flipped.sum())
        dyn = cell("dynamics" + tag, dynamics_run, x, noisy, test_ds, args, s, device)
        thr = cell("threshold" + tag, threshold_runs, x, noisy, args, s, device)
        scores = scores_of(dyn)
        flagged = torch.tensor(thr["flagged"], dtype=torch.int64)
        chosen = flags(scores, k, s)
        chosen[RULES[0]] = flagged
        hard_cut = scores["confidence"].quantile(1 / 3)
        chosen[RULES[1]] = (scores["confidence"] <= hard_cut).nonzero().squeeze(1)
        for name, idx in chosen.items():
            detection.setdefault(name, {}).setdefault(str(rate), []).append(
                list(precision_recall(idx, flipped))
            )
        counts.setdefault(str(rate), []).append(len(flagged))

        clean = (~flipped).nonzero().squeeze(1)
        half = n // 2
        not_flagged = torch.ones(n, dtype=torch.bool)
        not_flagged[flagged] = False
        subsets = {
            "aum-cleaned": not_flagged.nonzero().squeeze(1),
            "ccs-half": sw.select(-scores["aum"], half, "stratified", seed=s,
                                  cutoff_scores=-scores["aum"],
                                  cutoff=min(len(flagged), n - half)),
            "random-half": sw.select(scores["aum"], half, "random", seed=s),
            "oracle": clean,
        }  # fmt: skip
        row = {"all (noisy) labels": dyn["accuracy"]}
        for name, keep in subsets.items():
            done_cell = cell(name + tag, retrain, x, noisy, keep, test_ds, args, s, device)
            row[RETRAIN[name]] = done_cell["accuracy"]
        for name, acc in row.items():
            test_acc.setdefault(name, {}).setdefault(str(rate), []).append(acc)
        if s == 0:  # the data map of the first seed, for the plot
            maps[str(rate)] = {
                "confidence": dyn["scores"]["confidence"],
                "variability": dyn["scores"]["variability"],
                "flipped": flipped.nonzero().squeeze(1).tolist(),
                "hard_cut": float(hard_cut),
            }
    bar.close()
    return {
        "command": "python examples/label_noise.py " + " ".join(args.argv),
        "n_train": n,
        "n_test": len(test_ds),
        "noise": args.noise,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "percentile": args.percentile,
        "threads": args.threads,
        "detection": detection,  # name → rate → [[precision, recall] per seed]
        "flagged_by_threshold": counts,
        "test_accuracy": test_acc,  # name → rate → [accuracy per seed]
        "maps": maps,
        "cells": str(cells.folder),
        "runs_computed": computed,
        "runs_resumed": len(names) - computed,
        "seconds": round(time.time() - t0, 1),
        "compute_seconds": round(compute_seconds, 1),
    }


# -- reporting ---------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def table(out: dict[str, Any]) -> str:
    rates = [str(r) for r in out["noise"]]
    head = " | ".join(f"{float(r):.0%} noise: precision | recall" for r in rates)
    lines = [
        f"Finding flipped labels on MNIST-1D ({out['n_train']} train), % mean ± std over "
        f"{out['seeds']} seeds; top-k rows flag k = the number of flipped labels",
        "",
        f"| detector | {head} |",
        "|---|" + "---|---|" * len(rates),
    ]
    for name, row in out["detection"].items():
        cells = []
        for r in rates:
            pr = np.array(row[r])
            cells += [mean_std(pr[:, 0].tolist()), mean_std(pr[:, 1].tolist())]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    flagged = ", ".join(
        f"{float(r):.0%}: {np.mean(out['flagged_by_threshold'][r]):.0f} of "
        f"{round(float(r) * out['n_train'])} flipped"
        for r in rates
    )
    lines += ["", f"flagged by the AUM threshold (mean over seeds): {flagged}", ""]
    lines += [
        f"Test accuracy (%) after training on the noisy labels, mean ± std over {out['seeds']} "
        "seeds",
        "",
        "| training set | " + " | ".join(f"{float(r):.0%} noise" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for name, row in out["test_accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(mean_std(row[r]) for r in rates) + " |")
    return "\n".join(lines)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = out["maps"]
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.5), squeeze=False)
    for ax, (rate, m) in zip(axes[0], maps.items(), strict=True):
        conf, var = np.array(m["confidence"]), np.array(m["variability"])
        flipped = np.zeros(len(conf), dtype=bool)
        flipped[m["flipped"]] = True
        ax.scatter(var[~flipped], conf[~flipped], s=4, alpha=0.4, c="tab:blue", label="clean")
        ax.scatter(var[flipped], conf[flipped], s=4, alpha=0.6, c="tab:red", label="flipped")
        ax.axhline(m["hard_cut"], color="black", linestyle="--", linewidth=1,
                   label="hard-to-learn below (lowest 33%)")  # fmt: skip
        ax.set_xlabel("variability (std of p_y)")
        ax.set_ylabel("confidence (mean p_y)")
        ax.set_title(f"MNIST-1D, {float(rate):.0%} labels flipped (seed 0)")
        ax.legend(fontsize=7, loc="lower right", markerscale=3)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=4000, help="training examples (test: n/4)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2], help="flipped fractions")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30, help="epochs of every training run")
    p.add_argument("--percentile", type=float, default=99.0, help="of the fake class's AUM")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/label_noise", help="output folder")
    p.add_argument("--data-dir", default="examples/data", help="cache of the generated data")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: tiny models)")
    p.add_argument("--fresh", action="store_true", help="recompute every cell instead of resuming")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the tests (seconds)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    for rate in args.noise:
        if not 0.0 < rate < 1.0:
            p.error(f"--noise expects fractions in (0, 1), e.g. 0.1 0.2, but got {rate}")
    if not 0.0 < args.percentile <= 100.0:
        p.error(f"--percentile expects a number in (0, 100], e.g. 99, but got {args.percentile}")
    if args.seeds < 1 or args.epochs < 1:
        p.error(f"--seeds and --epochs expect ≥ 1, but got {args.seeds} and {args.epochs}")
    if args.smoke:
        args.n_train, args.noise, args.seeds, args.epochs = 400, [0.2], 2, 3
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    with threads(args.threads):
        out = run(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1))
    plot(out, folder / "data_map.png")
    print(table(out))
    print(
        f"wrote {folder / 'results.json'} and {folder / 'data_map.png'} in {out['seconds']} s "
        f"({out['runs_computed']} runs computed, {out['runs_resumed']} read back from "
        f"{out['cells']}; all runs together: {out['compute_seconds']} s)"
    )
    return out


if __name__ == "__main__":
    main()
