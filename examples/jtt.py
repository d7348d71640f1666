"""Just Train Twice on a spurious-correlation benchmark built offline from MNIST-1D.

Liu et al. (ICML 2021): train ERM for T epochs, take the training examples it misclassifies (the
error set), and retrain from scratch with the error set upsampled λ times — no group labels used
in training.

What ``λ`` means here: ``sw.JTTSampler(errors, n, upweight=λ)`` shows each error example **λ times
in total** per epoch (the others once), which is the paper's λ_up. The authors' released code
appends the error set λ more times to the full training set, so its examples are seen 1 + λ
times: their ``run_expt.py --up_weight k`` is ``upweight=k + 1`` here (and
``sw.jtt_weights(errors, n, k + 1)`` for the loss-weight variant). ``--lambda-grid`` takes our
convention.

This script builds the benchmark, then compares, over several seeds:

* ERM;
* JTT by upsampling (``Misclassified`` error set + ``JTTSampler``);
* JTT by loss weights (``LossReweighter(jtt_weights(...))``);
* Group DRO (``sw.GroupDROLoss``, Sagawa et al. 2020), which also uses the training group
  labels: online group weights, step size η chosen on validation like JTT's T and λ;
* a group-balanced oracle that *does* use training group labels (loss weights 1 / group size).

The benchmark: label ``y`` = digit ≥ 5; attribute ``a`` = the sign of a bump added to the first
positions of the signal. In training, ``a = y`` for ``--agree`` (95%) of the examples; in
validation and test ``a`` is independent of ``y``. The four groups ``(y, a)`` are used only for
validation (choosing T and λ by worst-group accuracy, as JTT does), testing, Group DRO and the
oracle.

Like ``data_diet.py`` it trains on one thread per process (``--threads``): faster for these tiny
models, and on a machine other jobs share.

Run: python examples/jtt.py            (defaults: see docs/results.md for the measured time)
     python examples/jtt.py --smoke    (seconds; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sampleweights as sw

sys.path.insert(0, str(Path(__file__).parent))
from data_diet import load_mnist1d, threads, tqdm  # the same offline data, threads and bars


def make_split(x: np.ndarray, digits: np.ndarray, agree: float, bump: float, rng) -> dict:
    """Binary label, spurious bump attribute agreeing with the label with probability ``agree``."""
    y = (digits >= 5).astype(np.int64)
    a = np.where(rng.random(len(y)) < agree, y, 1 - y)
    x = x.astype(np.float32).copy()
    x[:, :4] += np.where(a == 1, bump, -bump)[:, None].astype(np.float32)
    return {"x": torch.tensor(x).unsqueeze(1), "y": torch.tensor(y), "g": torch.tensor(2 * y + a)}


def build(args) -> dict[str, dict]:
    data = load_mnist1d(args.n_train, Path(args.data_dir))
    rng = np.random.default_rng(0)
    n_val = len(data["y"]) // 5
    x, d = data["x"], data["y"]
    return {
        "train": make_split(x[n_val:], d[n_val:], args.agree, args.bump, rng),
        "val": make_split(x[:n_val], d[:n_val], 0.5, args.bump, rng),
        "test": make_split(data["x_test"], data["y_test"], 0.5, args.bump, rng),
    }


def make_model(channels: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * 10, 2),
    )  # fmt: skip


def train(
    split, epochs, seed, args, *, sampler=None, reweighter=None, desc="training"
) -> nn.Module:
    """An ordinary loop: the sampler or the per-example loss weights are the only changes."""
    torch.manual_seed(seed)
    model = make_model()
    ds = sw.WithIndex(TensorDataset(split["x"], split["y"]))
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, position=1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for x, y, index in loader:
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = reweighter(losses, index) if reweighter is not None else losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def evaluate(model, split, train_groups) -> dict[str, float]:
    model.eval()
    preds = model(split["x"]).argmax(1)
    return {
        "avg": float((preds == split["y"]).float().mean()),
        "worst": sw.worst_group_accuracy(preds, split["y"], split["g"]),
        # JTT's Waterbirds convention: groups weighted by their training proportions
        "weighted": sw.group_weighted_accuracy(
            preds, split["y"], split["g"], torch.bincount(train_groups, minlength=4)
        ),
    }


def error_set(model, split) -> torch.Tensor:
    """JTT's error set: training examples the ERM model misclassifies (eval mode)."""
    ds = sw.WithIndex(TensorDataset(split["x"], split["y"]))
    wrong = sw.Misclassified(len(ds))
    sw.score_dataset(model, DataLoader(ds, batch_size=1024), wrong, progress=False)
    return (wrong.compute() == 1).nonzero().squeeze(1)


def jtt_run(splits, t, lam, seed, args, variant):
    train_split = splits["train"]
    n = len(train_split["y"])
    errors = error_set(train(train_split, t, seed, args, desc=f"ERM T={t}"), train_split)
    desc = f"JTT {variant} T={t} λ={lam} seed {seed}"
    if variant == "upsample":
        # λ appearances of each error example in total (the authors' code: upweight = k + 1)
        sampler = sw.JTTSampler(errors, n, lam, seed=seed)
        return train(train_split, args.epochs, seed, args, sampler=sampler, desc=desc), len(errors)
    weights = sw.jtt_weights(errors, n, float(lam))  # the same λ, as loss weights
    rw = sw.LossReweighter(weights)
    return train(train_split, args.epochs, seed, args, reweighter=rw, desc=desc), len(errors)


def gdro_run(splits, step_size, seed, args) -> nn.Module:
    """Group DRO: the loss Σ_g q_g·ℓ_g with online group weights, from training group labels."""
    train_split = splits["train"]
    groups = train_split["g"]
    gdro = sw.GroupDROLoss(4, step_size=step_size)
    return train(
        train_split, args.epochs, seed, args,
        reweighter=lambda losses, index: gdro(losses, groups[index]),
        desc=f"Group DRO η={step_size} seed {seed}",
    )  # fmt: skip


def run(args) -> dict:
    t0 = time.time()
    splits = build(args)
    train_groups = splits["train"]["g"]
    results: dict = {"group_sizes_train": torch.bincount(train_groups, minlength=4).tolist()}

    # choose T and λ on validation worst-group accuracy (seed 0), for each variant
    chosen = {}
    grid = [(t, lam) for t in args.t_grid for lam in args.lambda_grid]
    for variant in ("upsample", "loss_weights"):
        best = None
        for t, lam in tqdm(grid, desc=f"JTT ({variant}) grid"):
            model, n_err = jtt_run(splits, t, lam, 0, args, variant)
            worst = evaluate(model, splits["val"], train_groups)["worst"]
            if best is None or worst > best[0]:
                best = (worst, t, lam, n_err)
        assert best is not None
        chosen[variant] = {
            "T": best[1],
            "lambda": best[2],
            "val_worst": best[0],
            "error_set_size": best[3],
        }
    results["chosen"] = chosen

    # Group DRO's step size η, chosen the same way (seed 0, validation worst-group accuracy)
    best_gdro = None
    for eta in tqdm(args.gdro_step_grid, desc="Group DRO grid"):
        worst = evaluate(gdro_run(splits, eta, 0, args), splits["val"], train_groups)["worst"]
        if best_gdro is None or worst > best_gdro[0]:
            best_gdro = (worst, eta)
    assert best_gdro is not None
    results["chosen_group_dro"] = {"step_size": best_gdro[1], "val_worst": best_gdro[0]}

    group_w = 1.0 / torch.bincount(train_groups, minlength=4).clamp_min(1).float()
    methods = {
        "ERM": lambda s: train(splits["train"], args.epochs, s, args),
        "JTT (upsampling)": lambda s: jtt_run(
            splits, chosen["upsample"]["T"], chosen["upsample"]["lambda"], s, args, "upsample"
        )[0],
        "JTT (loss weights)": lambda s: jtt_run(
            splits, chosen["loss_weights"]["T"], chosen["loss_weights"]["lambda"], s, args,
            "loss_weights",
        )[0],
        "Group DRO": lambda s: gdro_run(splits, results["chosen_group_dro"]["step_size"], s, args),
        "group-balanced oracle": lambda s: train(
            splits["train"], args.epochs, s, args,
            reweighter=sw.LossReweighter(group_w[train_groups]),
        ),
    }  # fmt: skip
    table = {}
    for name, fit in tqdm(list(methods.items()), desc="methods"):
        runs = [evaluate(fit(100 + s), splits["test"], train_groups) for s in range(args.seeds)]
        table[name] = {k: [r[k] for r in runs] for k in runs[0]}
    results.update(
        table=table,
        command="python examples/jtt.py " + " ".join(args.argv),
        seconds=round(time.time() - t0, 1),
        seeds=args.seeds,
        epochs=args.epochs,
    )
    return results


def report(results: dict) -> str:
    lines = [
        f"MNIST-1D spurious bump, test set ({results['seeds']} seeds, mean ± std); "
        f"training groups (y,a) sizes {results['group_sizes_train']}",
        "",
        "| method | average acc. | worst-group acc. | train-weighted acc. |",
        "|---|---|---|---|",
    ]
    for name, r in results["table"].items():
        cells = [
            f"{100 * np.mean(r[k]):.1f} ± {100 * np.std(r[k]):.1f}"
            for k in ("avg", "worst", "weighted")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for variant, c in results["chosen"].items():
        lines.append(
            f"\nJTT ({variant}): T = {c['T']}, λ = {c['lambda']} chosen on validation worst-group "
            f"accuracy ({100 * c['val_worst']:.1f}%); error set {c['error_set_size']} examples"
        )
    if "chosen_group_dro" in results:
        c = results["chosen_group_dro"]
        lines.append(
            f"\nGroup DRO: η = {c['step_size']} chosen on validation worst-group accuracy "
            f"({100 * c['val_worst']:.1f}%)"
        )
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-train", type=int, default=4000, help="examples before the val split")
    p.add_argument("--agree", type=float, default=0.95, help="P(attribute = label) in training")
    p.add_argument("--bump", type=float, default=2.0, help="size of the spurious bump")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--t-grid", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument(
        "--lambda-grid",
        type=int,
        nargs="+",
        default=[5, 20, 50],
        help="λ: times each error example is seen per epoch in total (authors' code: k → k + 1)",
    )
    p.add_argument(
        "--gdro-step-grid",
        type=float,
        nargs="+",
        default=[0.01, 0.1],
        help="Group DRO step sizes η to choose from on validation (the authors' default: 0.01)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--out", default="runs/jtt")
    p.add_argument("--data-dir", default="examples/data")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: tiny models)")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the tests (seconds)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.smoke:
        args.n_train, args.epochs, args.seeds = 500, 2, 2
        args.t_grid, args.lambda_grid, args.gdro_step_grid = [1], [5], [0.01]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    with threads(args.threads):
        results = run(args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    print(f"\nwrote {folder / 'results.json'} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
