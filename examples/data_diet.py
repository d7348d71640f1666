"""Data Diet on MNIST-1D, end to end, written as an ordinary training loop using sampleweights.

Paul, Ganguli & Dziugaite (2021) score every training example early in training — EL2N, the norm
of the error vector, and GraNd, the norm of the loss gradient, averaged over a few runs — keep the
highest-scoring fraction and train from scratch on it. This script reproduces that experiment on
MNIST-1D (Greydanus 2020), generated offline, with a small 1D-CNN:

1. train ``--score-seeds`` models for ``--score-epochs`` epochs (forgetting events tracked in the
   loop) and score the training set with EL2N and GraNd (eval mode, averaged over the seeds);
   GraNd is also taken at initialisation;
2. ``select`` subsets at each kept fraction with several strategies;
3. retrain from scratch on each subset with ``PrunedSampler`` — the same number of steps as a
   full-data run (``num_samples=N``), as in CCS and Sorscher et al. — over ``--seeds`` seeds;
4. print a table of test accuracy (mean ± std over seeds), with the verdict of each strategy
   against random at that fraction, and write ``results.json`` and ``data_diet.png``.

Run: python examples/data_diet.py            (defaults: < 10 minutes on 2 CPU cores)
     python examples/data_diet.py --smoke    (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is optional

    def tqdm(iterable=None, **_):  # type: ignore[no-redef]
        return iterable


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
) -> nn.Module:
    """An ordinary loop; the only sampleweights line is the forgetting tracker's update."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    sampler = loader.sampler
    for epoch in range(epochs):
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


def score(train_ds, args, device) -> dict[str, torch.Tensor]:
    """EL2N and GraNd after ``score_epochs`` (averaged over seeds), GraNd at init, forgetting."""
    n = len(train_ds)
    ds = sw.WithIndex(train_ds)
    scoring_loader = DataLoader(ds, batch_size=512)
    el2n, forgetting = sw.EL2N(n), sw.ForgettingTracker(n)
    grand_init = grand = None
    for seed in tqdm(range(args.score_seeds), desc="scoring runs"):
        torch.manual_seed(1000 + seed)
        model = make_model().to(device)
        # one GraNd scorer per score, re-pointed at each seed's model: the running mean averages
        grand_init = grand_init or sw.GraNd(model, n)
        grand_init.set_model(model)
        sw.score_dataset(model, scoring_loader, grand_init, progress=False)  # at initialisation
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True)
        train(model, loader, args.score_epochs, args.lr, device, tracker=forgetting)
        grand = grand or sw.GraNd(model, n)
        grand.set_model(model)
        sw.score_dataset(model, scoring_loader, el2n, grand, progress=False)  # early in training
    assert grand is not None and grand_init is not None
    return {
        "el2n": el2n.compute().cpu(),
        "grand": grand.compute().cpu(),
        "grand_init": grand_init.compute().cpu(),
        "forgetting": forgetting.compute().cpu(),
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    t0 = time.time()
    data = load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, test_ds = tensors(data)
    n = len(train_ds)
    scores = score(train_ds, args, device)
    ds = sw.WithIndex(train_ds)

    def retrain(indices: torch.Tensor | None, seed: int) -> float:
        torch.manual_seed(seed)
        model = make_model().to(device)
        if indices is None:
            loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True)
        else:  # same number of steps as full data: an epoch of the subset is n draws
            sampler = sw.PrunedSampler(indices, num_examples=n, seed=seed, num_samples=n)
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler)
        train(model, loader, args.epochs, args.lr, device)
        return accuracy(model, test_ds, device)

    seeds = list(range(args.seeds))
    full = [retrain(None, s) for s in tqdm(seeds, desc="full data")]
    results: dict[str, dict[str, list[float]]] = {}
    jobs = [(name, f) for f in args.fractions for name in STRATEGIES]
    for name, frac in tqdm(jobs, desc="pruned runs"):
        score_name, strategy, offset = STRATEGIES[name]
        accs = []
        for s in seeds:
            keep = sw.select(scores[score_name], frac, strategy, offset=offset, seed=s)
            accs.append(retrain(keep, s))
        results.setdefault(name, {})[str(frac)] = accs
    out = {
        "command": "python examples/data_diet.py " + " ".join(args.argv),
        "n_train": n,
        "n_test": len(test_ds),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "score_seeds": args.score_seeds,
        "score_epochs": args.score_epochs,
        "fractions": args.fractions,
        "full_data": full,
        "results": results,
        "seconds": round(time.time() - t0, 1),
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
    base = out["results"]["random"]
    for name, row in out["results"].items():
        cells = []
        for f in fracs:
            accs = row[f]
            cell = f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f}"
            if name != "random":
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
    p.add_argument("--n-train", type=int, default=4000, help="training examples (test: n/4)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per cell")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each (re)training run")
    p.add_argument("--score-seeds", type=int, default=4, help="runs averaged into the scores")
    p.add_argument("--score-epochs", type=int, default=3, help="training before scoring")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/data_diet", help="output folder")
    p.add_argument("--data-dir", default="examples/data", help="cache of the generated data")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the tests (seconds)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.smoke:
        args.n_train, args.fractions, args.seeds, args.epochs = 400, [0.3, 0.7], 2, 2
        args.score_seeds, args.score_epochs = 2, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = run(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1))
    plot(out, folder / "data_diet.png")
    print(table(out))
    print(f"\n{out['never_learned']} examples never learned during scoring (forgetting = inf)")
    print(f"wrote {folder / 'results.json'} and {folder / 'data_diet.png'} in {out['seconds']} s")
    return out


if __name__ == "__main__":
    main()
