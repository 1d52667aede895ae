"""Shared test setup: one compile cache for the whole run (all xdist workers share it), and
the compiler's self-checks on for every compile."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Set before any worker starts, so every process of the run shares compiled kernels.
os.environ.setdefault("KILN_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"kiln-test-cache-{os.getuid()}"))
# Every compile in the tests checks itself: the graph verifier after every pass, and the
# schedule replayed over the planned bytes (compiler.plan_check).
os.environ["KILN_CHECKS"] = "1"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random inputs per test, but reproducible: the seed is printed on failure."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
