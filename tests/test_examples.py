"""The README's main job and the JTT example, exercised by their --smoke flags (seconds each)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")


def smoke(tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    """A --smoke command line writing to ``tmp_path``; ``data``: a shared cache of the generated
    data (generating it takes seconds on a busy machine), else one under ``tmp_path``."""
    data = tmp_path / "d" if data is None else data
    return ["--smoke", "--out", str(tmp_path), "--data-dir", str(data), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist1d")


def test_data_diet_smoke(tmp_path, data, capsys):
    import data_diet

    out = data_diet.main(smoke(tmp_path, data=data))
    printed = capsys.readouterr().out
    assert "| random |" in printed and "el2n-hardest" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"].keys() == out["results"].keys() == data_diet.STRATEGIES.keys()
    assert (tmp_path / "data_diet.png").stat().st_size > 10_000
    # every cell holds one accuracy per seed, each a real probability
    for row in saved["results"].values():
        for accs in row.values():
            assert len(accs) == saved["seeds"] and all(0.0 <= a <= 1.0 for a in accs)
    # the generated data is cached for the next call
    assert any(data.iterdir())


def test_data_diet_resumes_from_saved_cells(tmp_path, data, monkeypatch, capsys):
    import data_diet

    first = data_diet.main(smoke(tmp_path, data=data))
    runs = 2 + 2 * len(data_diet.STRATEGIES) * 2  # full data + strategies × fractions, 2 seeds
    assert (first["runs_computed"], first["runs_resumed"]) == (runs, 0)
    cells = Path(first["cells"])
    assert len(list(cells.glob("*@*#*.json"))) == runs - 2

    # a rerun with the same settings trains nothing and reports the same numbers
    trained: list[str] = []
    real_train, real_score = data_diet.train, data_diet.score

    def counting_train(*args, **kwargs):
        trained.append(kwargs.get("desc", "?"))
        return real_train(*args, **kwargs)

    def no_scoring(*args, **kwargs):
        raise AssertionError("the saved scores should have been read back")

    monkeypatch.setattr(data_diet, "train", counting_train)
    monkeypatch.setattr(data_diet, "score", no_scoring)
    again = data_diet.main(smoke(tmp_path, data=data))
    assert trained == [] and (again["runs_computed"], again["runs_resumed"]) == (0, runs)
    assert again["results"] == first["results"] and again["full_data"] == first["full_data"]
    assert "already saved" in capsys.readouterr().out

    # an interrupted run: one cell missing is the only one computed, and it comes out the same
    (cells / "el2n-hardest@0.3#1.json").unlink()
    resumed = data_diet.main(smoke(tmp_path, data=data))
    assert trained == ["el2n-hardest@0.3#1"] and resumed["runs_computed"] == 1
    assert resumed["results"] == first["results"]

    # --fresh recomputes everything (the scores too)
    monkeypatch.setattr(data_diet, "score", real_score)
    trained.clear()
    fresh = data_diet.main(smoke(tmp_path, "--fresh", data=data))
    assert fresh["runs_computed"] == runs and len(trained) == runs + 2  # + 2 scoring runs


def test_data_diet_cells_of_other_settings_are_never_reused(tmp_path):
    import data_diet

    settings = {"n_train": 400, "epochs": 2, "lr": 0.01}
    same = data_diet.Cells(tmp_path, settings).folder
    assert data_diet.Cells(tmp_path, dict(settings)).folder == same
    assert data_diet.Cells(tmp_path, {**settings, "lr": 0.02}).folder != same
    assert data_diet.Cells(tmp_path, {**settings, "epochs": 3}).folder != same
    # the settings a folder was made with are written beside its cells
    assert json.loads((same / "settings.json").read_text())["lr"] == 0.01


def test_data_diet_forgetting_starts_afresh_each_scoring_run(tmp_path, data, monkeypatch):
    """Each scoring run trains a new model: its first presentations are not compared with the
    previous run's last ones, so the tracker is told a new run starts before each."""
    import data_diet

    calls: list[str] = []
    real_new_run = data_diet.sw.ForgettingTracker.new_run
    real_train = data_diet.train

    def new_run(self):
        calls.append("new_run")
        return real_new_run(self)

    def train(*args, tracker=None, **kwargs):
        if tracker is not None:
            calls.append("train")
        return real_train(*args, tracker=tracker, **kwargs)

    monkeypatch.setattr(data_diet.sw.ForgettingTracker, "new_run", new_run)
    monkeypatch.setattr(data_diet, "train", train)
    args = data_diet.parse(smoke(tmp_path, data=data))
    data = data_diet.load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, _ = data_diet.tensors(data)
    scores = data_diet.score(train_ds, args, torch.device("cpu"))
    assert calls == ["new_run", "train"] * args.score_seeds
    assert scores["forgetting"].shape == (len(train_ds),)


def test_data_diet_trains_on_the_threads_asked_for(tmp_path, data, monkeypatch):
    import data_diet

    seen: set[int] = set()

    def train(model, *args, **kwargs):  # records the thread count, skips the work
        seen.add(torch.get_num_threads())
        return model

    def score(train_ds, args, device):  # the same, for the scoring runs
        seen.add(torch.get_num_threads())
        return {k: torch.rand(len(train_ds)) for k in ("el2n", "grand", "grand_init", "forgetting")}

    monkeypatch.setattr(data_diet, "train", train)
    monkeypatch.setattr(data_diet, "score", score)
    monkeypatch.setattr(data_diet, "plot", lambda out, path: None)
    before = torch.get_num_threads()
    out = data_diet.main(smoke(tmp_path, "--threads", "2", data=data))
    assert seen == {2} and out["threads"] == 2
    assert torch.get_num_threads() == before  # restored for whoever called main()
    assert data_diet.parse([]).threads == 1  # one thread by default: the models are tiny
    with pytest.raises(ValueError, match="--threads"), data_diet.threads(0):
        pass


def test_jtt_smoke(tmp_path, data, capsys):
    import jtt

    jtt.main(smoke(tmp_path, data=data))
    printed = capsys.readouterr().out
    for name in ("ERM", "JTT (upsampling)", "JTT (loss weights)", "group-balanced oracle"):
        assert f"| {name} |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sum(saved["group_sizes_train"]) > 0


def test_dynamic_pruning_smoke_and_resume(tmp_path, capsys):
    import dynamic_pruning

    out = dynamic_pruning.main(smoke(tmp_path))
    printed = capsys.readouterr().out
    for method in dynamic_pruning.METHODS:
        assert f"| {method} |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    cells = saved["results"]
    full = cells["full-data"][0]["passes"]
    assert full == saved["n_train"] * saved["epochs"]
    # infobatch saves passes; random-dynamic matches them epoch by epoch; static roughly
    assert cells["infobatch"][0]["passes"] < full
    assert cells["random-dynamic"][0]["lengths"] == cells["infobatch"][0]["lengths"]
    assert abs(cells["static-el2n"][0]["passes"] - cells["infobatch"][0]["passes"]) <= 3
    assert all(0.0 <= c[0]["accuracy"] <= 1.0 for c in cells.values())
    # a rerun reads every finished cell back and trains nothing
    again = dynamic_pruning.main(smoke(tmp_path))
    assert again["runs_computed"] == 0 and again["results"] == out["results"]


def test_label_noise_smoke_and_resume(tmp_path, monkeypatch, capsys):
    import label_noise

    first = label_noise.main(smoke(tmp_path))
    printed = capsys.readouterr().out
    rows = (*label_noise.TOP_K, *label_noise.RULES, *label_noise.RETRAIN.values())
    assert all(f"| {name} |" in printed for name in rows)
    assert (tmp_path / "data_map.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["detection"] == first["detection"]
    for name, row in saved["detection"].items():
        for pairs in row.values():  # [precision, recall] per seed
            assert len(pairs) == saved["seeds"] and all(0 <= v <= 1 for pr in pairs for v in pr)
            if name in label_noise.TOP_K:  # k = the number of flipped labels: P = R
                assert all(p == pytest.approx(r) for p, r in pairs)
    runs = len(saved["noise"]) * saved["seeds"] * (2 + len(label_noise.RETRAIN))
    assert (first["runs_computed"], first["runs_resumed"]) == (runs, 0)

    # exactly round(rate · N) labels flipped, each to another class
    y = torch.arange(50) % 10
    noisy, flipped = label_noise.flip_labels(y, 0.2, seed=3)
    assert int(flipped.sum()) == 10 and bool((noisy[flipped] != y[flipped]).all())
    assert torch.equal(noisy[~flipped], y[~flipped])

    # a rerun trains nothing and reports the same; a missing cell is the only one recomputed
    trained: list[str] = []
    real_train = label_noise.train

    def counting_train(*args, **kwargs):
        trained.append(kwargs.get("desc", "?"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(label_noise, "train", counting_train)
    again = label_noise.main(smoke(tmp_path))
    assert trained == [] and again["runs_computed"] == 0
    assert again["detection"] == first["detection"]
    assert again["test_accuracy"] == first["test_accuracy"]
    (Path(first["cells"]) / "oracle@0.2#1.json").unlink()
    resumed = label_noise.main(smoke(tmp_path))
    assert trained == ["oracle@0.2#1"] and resumed["test_accuracy"] == first["test_accuracy"]


def test_data_diet_larger_setting_flags_parse_and_are_validated():
    import data_diet

    default = data_diet.parse([])
    assert default.n_train == 4000 and default.equal_steps
    assert default.fractions == [0.1, 0.3, 0.5, 0.7]
    assert default.strategies == list(data_diet.STRATEGIES)
    large = data_diet.parse(
        ["--examples", "16000", "--strategies", "random,grand-hardest", "--fractions", "0.5,0.9"]
    )
    assert large.n_train == 16000 and large.strategies == ["random", "grand-hardest"]
    assert large.fractions == [0.5, 0.9]
    assert data_diet.parse(["--n-train", "800"]).n_train == 800  # the old spelling still works
    assert data_diet.parse(["--fractions", "0.5", "0.7"]).fractions == [0.5, 0.7]
    assert not data_diet.parse(["--no-equal-steps"]).equal_steps
    for argv, flag in [
        (["--strategies", "random,el2n-hardst"], "--strategies"),
        (["--strategies", ","], "--strategies"),
        (["--fractions", "0.5,1.5"], "--fractions"),
        (["--fractions", "half"], "--fractions"),
        (["--examples", "0"], "--examples"),
    ]:
        with pytest.raises(ValueError, match=flag):
            data_diet.parse(argv)


def test_data_diet_cell_key_follows_the_settings_that_change_results(tmp_path):
    import data_diet

    cpu = torch.device("cpu")

    def folder(*argv: str) -> Path:
        return data_diet.Cells(tmp_path, data_diet.cell_settings(data_diet.parse(argv), cpu)).folder

    default = folder()
    # the default key is what it was before the flags existed: saved cells stay valid
    before = {"n_train": 4000, "epochs": 30, "score_seeds": 4, "score_epochs": 3}
    before |= {"batch_size": 128, "lr": 0.01, "device": "cpu"}
    assert default == data_diet.Cells(tmp_path, before).folder
    assert folder("--examples", "16000") != default
    assert folder("--no-equal-steps") != default
    assert folder("--equal-steps") == default
    # which cells run does not change what a cell holds (cells are named by strategy@fraction#seed)
    assert folder("--strategies", "random,el2n-hardest", "--fractions", "0.5,0.9") == default


@pytest.mark.parametrize("equal_steps", [True, False])
def test_data_diet_equal_steps_and_grid_restriction(tmp_path, data, monkeypatch, equal_steps):
    import data_diet

    steps: dict[str, int] = {}
    real_train = data_diet.train

    def counting_train(model, loader, epochs, *args, **kwargs):
        steps[kwargs["desc"]] = epochs * len(loader)
        return real_train(model, loader, epochs, *args, **kwargs)

    monkeypatch.setattr(data_diet, "train", counting_train)
    monkeypatch.setattr(data_diet, "plot", lambda out, path: None)
    flag = "--equal-steps" if equal_steps else "--no-equal-steps"
    out = data_diet.main(smoke(tmp_path, "--strategies", "random,el2n-hardest", flag, data=data))
    # only the strategies asked for were trained: full data + 2 strategies × 2 fractions × 2 seeds
    assert list(out["results"]) == out["strategies"] == ["random", "el2n-hardest"]
    retrained = {k: v for k, v in steps.items() if not k.startswith("scoring")}
    assert len(retrained) == 2 + 2 * 2 * 2 and out["runs_computed"] == len(retrained)
    full = steps["full-data#0"]
    assert out["steps"]["full-data"] == full == 2 * math.ceil(400 / 128)  # 2 epochs of 400
    for name, n in retrained.items():
        if name.startswith("full-data"):
            assert n == full
            continue
        frac = float(name.split("@")[1].split("#")[0])
        assert out["steps"][str(frac)] == n
        if equal_steps:
            assert n == full  # every kept fraction: as many optimiser steps as full data
        else:
            assert n == 2 * math.ceil(round(frac * 400) / 128)  # one pass over the subset an epoch
    assert out["equal_steps"] is equal_steps
