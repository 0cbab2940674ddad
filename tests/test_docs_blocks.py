"""Every ```python block of README.md and docs/*.md runs as written, or says why not.

A page is read like a notebook: its blocks run in order, in one fresh namespace per page (later
blocks use what earlier ones defined, as ``docs/changing_a_learner.md`` states), in a fresh
temporary working directory. Doctest blocks (``>>>``) are left to pytest's ``--doctest-glob=*.md``.

A block that cannot run offline, or is not a whole program (an excerpt of the package's source, a
sketch on the reader's own ``dls``), is preceded by a marker that says why, in the form
``<!-- not-run: REASON -->``; a reason that says it fails offline names the error the user gets
after ``fails with:``. Blocks run under ``torchrun`` are not ```python blocks: the DDP script is
included from ``examples/train_ddp.py`` and launched by ``tests/test_distributed.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*not-run:((?:(?!-->).)*)-->\s*\Z", re.S)
# A reason must say something: at least a few words, not a placeholder.
MIN_REASON_WORDS = 4


@dataclass
class Block:
    """One ```python block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the marker's reason, None for a block that must run

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The ```python blocks of ``page``, in order, with the reason of a ``not-run`` marker just above each."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        marker = MARKER.search(text[: m.start()])
        found.append(
            Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), marker.group(1).strip() if marker else None)
        )
    return found


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


PAGES_WITH_CODE = [p for p in PAGES if any(not b.doctest and b.not_run is None for b in blocks_of(p))]


def test_blocks_are_found():
    # Guards the regular expression: the README's usage block and a known docs block must be seen.
    readme = blocks_of(REPO / "README.md")
    assert readme and "make_fake_imagenette" in readme[0].code and readme[0].not_run is None
    assert any("get_dls" in b.code for b in blocks_of(REPO / "docs" / "changing_a_learner.md"))


def test_marker_parsing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- not-run: downloads Imagenette; offline it fails with: DataUnavailableError: ... -->\n"
        "```python\nx = 1\n```\n\nMore.\n\n```python\ny = 2\n```\n\n```python\n>>> 1\n1\n```\n"
    )
    first, second, third = blocks_of(page)
    assert first.not_run.startswith("downloads Imagenette") and first.line == 4 and first.code == "x = 1\n"
    assert second.not_run is None and second.code == "y = 2\n"
    assert third.doctest


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_not_run_marker_gives_a_reason(page):
    for block in blocks_of(page):
        if block.not_run is None:
            continue
        assert len(block.not_run.split()) >= MIN_REASON_WORDS, f"{block.where}: the not-run marker needs a reason"
        if "offline" in block.not_run:
            error = block.not_run.partition("fails with:")[2].strip()
            assert error, f"{block.where}: say which error the user gets offline, after 'fails with:'"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_page_id)
def test_page_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    for block in blocks_of(page):
        if block.doctest or block.not_run is not None:
            continue
        try:
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - running the docs is the test
        except Exception as err:
            pytest.fail(f"the block at {block.where} raised {type(err).__name__}: {err}\n\n{block.code}")
        finally:
            import matplotlib.pyplot as plt

            plt.close("all")
