"""The peak micro-benchmarks compute what they count: the register tile's loop sums a
(rows x depth) times b (depth x 64) once per pass, so its GFLOP/s are real work."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fma_peak  # noqa: E402


def test_the_tile_loop_sums_every_step_of_every_pass():
    rng = np.random.default_rng(7)
    rows, depth, cols = fma_peak.TILE_ROWS, fma_peak.TILE_DEPTH, 16 * fma_peak.TILE_VECTORS
    a = rng.standard_normal((rows, depth)).astype(np.float32)
    b = rng.standard_normal((depth, cols)).astype(np.float32)
    c = np.full((rows, cols), np.nan, np.float32)
    pointer = ctypes.POINTER(ctypes.c_float)
    passes = 3
    fma_peak.tile_kernel()(*(x.ctypes.data_as(pointer) for x in (a, b, c)), passes)
    np.testing.assert_allclose(c, passes * (a.astype(np.float64) @ b), rtol=1e-4, atol=1e-3)
