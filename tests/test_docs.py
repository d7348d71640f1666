"""Every ```python block in README.md and docs/ runs (blocks of one file share a namespace, in
order), so the recipes cannot rot. Blocks run on tiny data in a temporary working directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize(
    "path", [f for f in FILES if blocks(f)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.relative_to(ROOT)} block {i} failed: {err!r}") from err


def test_every_doc_with_code_is_collected():
    assert (ROOT / "README.md") in FILES
    assert os.path.isdir(ROOT / "docs")


def test_api_page_names_every_public_name():
    import sampleweights as sw

    page = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in sw.__all__ if f"`{name}" not in page]
    assert not missing, f"docs/api.md does not mention {missing}"
