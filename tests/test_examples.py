"""The README's main job and the JTT example, exercised by their --smoke flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")


def test_data_diet_smoke(tmp_path, capsys):
    import data_diet

    out = data_diet.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    assert "| random |" in printed and "el2n-hardest" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"].keys() == out["results"].keys()
    assert (tmp_path / "data_diet.png").stat().st_size > 10_000
    # every cell holds one accuracy per seed, each a real probability
    for row in saved["results"].values():
        for accs in row.values():
            assert len(accs) == saved["seeds"] and all(0.0 <= a <= 1.0 for a in accs)
    # the cache is reused on a second call
    assert any((tmp_path / "d").iterdir())


def test_jtt_smoke(tmp_path, capsys):
    import jtt

    jtt.main(["--smoke", "--out", str(tmp_path), "--data-dir", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    for name in ("ERM", "JTT (upsampling)", "JTT (loss weights)", "group-balanced oracle"):
        assert f"| {name} |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sum(saved["group_sizes_train"]) > 0
