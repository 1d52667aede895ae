"""The README stays true: its op table names every registered op, and its two
commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from ir.ops import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _top_level_items(cell: str) -> list[str]:
    """A table cell's comma-separated items, commas inside parentheses left alone."""
    items, depth, current = [], 0, ""
    for ch in cell:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [*items, current]


def readme_ops(readme: str = README) -> list[str]:
    """The op names the README's table lists: the first word of each item of each row's
    ops cell (not the words of its explanations, which are in parentheses)."""
    table = readme.split("## Supported ops")[1].split("ONNX import (")[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return [re.match(r"\s*([a-z_0-9]+)", item)[1] for row in rows[1:] for item in _top_level_items(row)]


def test_readme_lists_every_op_once():
    listed = readme_ops()
    assert sorted(listed) == sorted(set(listed)), "an op listed twice"
    assert set(listed) == set(REGISTRY), (
        sorted(set(REGISTRY) - set(listed)),
        sorted(set(listed) - set(REGISTRY)),
    )


def test_op_table_parsing_sees_a_deleted_op():
    """Deleting an op from its row is seen, even where its name appears in another op's
    explanation (tile, in max_pool2d_tiled_backward's)."""
    assert ", tile," in README and "where windows tile the input" in README
    assert "tile" in readme_ops() and "tile" not in readme_ops(README.replace(", tile,", ","))
