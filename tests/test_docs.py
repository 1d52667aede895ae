"""The README stays true: its op table names every registered op, and its two
commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from ir.ops import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_lists_every_op():
    table = README.split("## Supported ops")[1].split("ONNX import (")[0]
    listed = set(re.findall(r"[a-z_0-9]+", table))
    assert set(REGISTRY) <= listed, sorted(set(REGISTRY) - listed)


def test_ci_runs_the_readme_test_command():
    block = README.split("```bash")[1].split("```")[0].strip().splitlines()
    install, test = (line.split("#")[0].strip() for line in block[:2])
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == test
    assert install.startswith("pip install -e '.[dev]'") and "python -m pip install -q -e '.[dev]'" in ci
