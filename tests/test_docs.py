"""Every ```python block in README.md and docs/ runs (blocks of one file share a namespace, in
order), so the recipes cannot rot. Blocks run on tiny data in a temporary working directory.

A block the runner would not pick up (``py`` instead of ``python``, an indented fence, words after
the language) would silently never run; ``test_every_python_block_is_collected`` fails on one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n]*)$")
PYTHON = {"python", "py", "python3", "py3", "pycon", "ipython", "pytest"}
# folders that hold no project docs: virtual environments, caches, build and run outputs
NOT_DOCS = {"runs", "build", "dist", "node_modules", "site-packages"}


def blocks(path: Path) -> list[str]:
    """The python blocks that ``test_python_blocks_run`` executes."""
    return BLOCK.findall(path.read_text())


def fenced_python(text: str) -> list[str]:
    """Every fenced block a reader would take for Python (CommonMark fences: ``` or ~~~, any
    indent, a closing fence of the same character at least as long)."""
    found, opened, body = [], None, []
    for line in text.splitlines(keepends=True):
        match = FENCE.match(line.rstrip("\n"))
        if opened is None:
            if match:
                opened, body = match, []
        elif match and match["fence"][0] == opened["fence"][0] and not match["info"]:
            if len(match["fence"]) >= len(opened["fence"]):
                info = opened["info"].strip().strip("{}.").split()
                if info and info[0].lower() in PYTHON:
                    found.append("".join(body))
                opened = None
        else:
            body.append(line)
    if opened is not None:
        raise AssertionError(f"an unclosed fence: {opened.group(0)!r}")
    return found


def project_markdown() -> list[Path]:
    return sorted(
        p
        for p in ROOT.rglob("*.md")
        if not any(part.startswith(".") or part in NOT_DOCS for part in p.relative_to(ROOT).parts)
    )


DOCS_WITH_CODE = [f for f in FILES if blocks(f)]
# a page whose code needs an optional extra says so in a comment, e.g. <!-- requires: lightning -->;
# it is skipped (not failed) where that package is not installed
REQUIRES = re.compile(r"<!--\s*requires:\s*([\w.]+(?:\s*,\s*[\w.]+)*)\s*-->")


def required_modules(text: str) -> list[str]:
    return [m.strip() for found in REQUIRES.findall(text) for m in found.split(",")]


@pytest.mark.parametrize("path", DOCS_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, tmp_path, monkeypatch):
    for module in required_modules(path.read_text()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"{path.relative_to(ROOT)} block {i} failed: {err!r}") from err


def test_every_python_block_is_collected():
    """Every markdown file of the project with a Python block is run, and all its blocks are."""
    checked = 0
    for path in project_markdown():
        shown = fenced_python(path.read_text())
        if not shown:
            continue
        name = path.relative_to(ROOT)
        assert path in DOCS_WITH_CODE, (
            f"{name} has {len(shown)} Python block(s) but test_python_blocks_run runs none: open "
            "each with a bare ```python line, and keep the file in README.md or docs/ (or add it "
            "to FILES in tests/test_docs.py)."
        )
        run = blocks(path)
        skipped = [b.splitlines()[0] if b.strip() else "(empty)" for b in shown if b not in run]
        assert not skipped and len(run) == len(shown), (
            f"{name}: {len(shown)} Python block(s), {len(run)} run; not run, by first line: "
            f"{skipped}. Open each with a bare ```python line at the start of the line."
        )
        checked += 1
    # the README and the recipes have code: finding none means the scan itself is broken
    assert checked >= 2 and ROOT / "README.md" in DOCS_WITH_CODE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("```python\nx = 1\n```\n", 1),
        ("```py\nx = 1\n```\n", 0),  # another spelling of python
        ("  ```python\n  x = 1\n  ```\n", 0),  # indented, e.g. inside a list item
        ("```python title='a.py'\nx = 1\n```\n", 0),  # words after the language
        ("~~~python\nx = 1\n~~~\n", 0),  # tildes
    ],
)
def test_the_collection_check_catches_blocks_the_runner_skips(text, expected, tmp_path):
    """The checker itself: each case is a block a reader sees as Python; the runner only runs
    ``expected`` of them, and the difference is what the collection test reports."""
    path = tmp_path / "page.md"
    path.write_text(text)
    assert len(fenced_python(text)) == 1
    assert len(blocks(path)) == expected


def test_requires_comment_names_the_modules():
    assert required_modules("x\n<!-- requires: lightning -->\n") == ["lightning"]
    assert required_modules("<!--requires: transformers, accelerate-->") == [
        "transformers",
        "accelerate",
    ]
    assert required_modules("requires: torch") == []


def test_api_page_names_every_public_name():
    import sampleweights as sw

    page = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in sw.__all__ if f"`{name}" not in page]
    assert not missing, f"docs/api.md does not mention {missing}"
