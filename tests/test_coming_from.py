"""Every Python block of docs/coming-from.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "coming-from.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def _section(block: str) -> str:
    """The heading the block sits under, as the test's id."""
    text = DOC.read_text()
    heading = re.findall(r"^## (.+)$", text[:text.index(block)], flags=re.M)[-1]
    return re.sub(r"\W+", "-", heading.lower()).strip("-")[:40]


def test_the_page_has_a_snippet_for_every_library():
    assert len(BLOCKS) >= 4
    assert {_section(b).split("-")[0] for b in BLOCKS} >= {"lucidrains", "diffusers", "the", "a"}


@pytest.mark.parametrize("block", BLOCKS, ids=[_section(b) for b in BLOCKS])
def test_snippet_runs(block):
    torch.manual_seed(0)
    exec(compile(block, f"{DOC.name}:{_section(block)}", "exec"), {"__name__": "coming_from"})
