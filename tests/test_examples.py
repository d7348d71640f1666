"""The README's main job and the JTT example, exercised by their --smoke flags (seconds each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")


def smoke(tmp_path: Path, *extra: str) -> list[str]:
    return ["--smoke", "--out", str(tmp_path), "--data-dir", str(tmp_path / "d"), *extra]


def test_data_diet_smoke(tmp_path, capsys):
    import data_diet

    out = data_diet.main(smoke(tmp_path))
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
    assert any((tmp_path / "d").iterdir())


def test_data_diet_resumes_from_saved_cells(tmp_path, monkeypatch, capsys):
    import data_diet

    first = data_diet.main(smoke(tmp_path))
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
    again = data_diet.main(smoke(tmp_path))
    assert trained == [] and (again["runs_computed"], again["runs_resumed"]) == (0, runs)
    assert again["results"] == first["results"] and again["full_data"] == first["full_data"]
    assert "already saved" in capsys.readouterr().out

    # an interrupted run: one cell missing is the only one computed, and it comes out the same
    (cells / "el2n-hardest@0.3#1.json").unlink()
    resumed = data_diet.main(smoke(tmp_path))
    assert trained == ["el2n-hardest@0.3#1"] and resumed["runs_computed"] == 1
    assert resumed["results"] == first["results"]

    # other settings never reuse these cells
    monkeypatch.setattr(data_diet, "score", real_score)
    trained.clear()
    other = data_diet.main(smoke(tmp_path, "--lr", "0.02"))
    assert Path(other["cells"]) != cells and other["runs_computed"] == runs

    # --fresh recomputes everything
    trained.clear()
    fresh = data_diet.main(smoke(tmp_path, "--fresh"))
    assert fresh["runs_computed"] == runs and len(trained) == runs + 2  # + 2 scoring runs


def test_data_diet_forgetting_starts_afresh_each_scoring_run(tmp_path, monkeypatch):
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
    args = data_diet.parse(smoke(tmp_path))
    data = data_diet.load_mnist1d(args.n_train, Path(args.data_dir))
    train_ds, _ = data_diet.tensors(data)
    scores = data_diet.score(train_ds, args, torch.device("cpu"))
    assert calls == ["new_run", "train"] * args.score_seeds
    assert scores["forgetting"].shape == (len(train_ds),)


def test_data_diet_trains_on_the_threads_asked_for(tmp_path, monkeypatch):
    import data_diet

    seen: set[int] = set()
    real_train = data_diet.train

    def train(model, *args, tracker=None, **kwargs):  # records the thread count
        seen.add(torch.get_num_threads())
        if tracker is None:  # retraining: skip the work, only the thread count matters here
            return model
        return real_train(model, *args, tracker=tracker, **kwargs)

    monkeypatch.setattr(data_diet, "train", train)
    before = torch.get_num_threads()
    out = data_diet.main(smoke(tmp_path, "--threads", "2"))
    assert seen == {2} and out["threads"] == 2
    assert torch.get_num_threads() == before  # restored for whoever called main()
    assert data_diet.parse([]).threads == 1  # one thread by default: the models are tiny
    with pytest.raises(ValueError, match="--threads"), data_diet.threads(0):
        pass


def test_jtt_smoke(tmp_path, capsys):
    import jtt

    jtt.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    for name in ("ERM", "JTT (upsampling)", "JTT (loss weights)", "group-balanced oracle"):
        assert f"| {name} |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sum(saved["group_sizes_train"]) > 0
