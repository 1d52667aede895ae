"""The inline float32 exp/log/tanh/erf against float64 math, in units in the last place."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compiler import compile_model
from ir.builder import GraphBuilder


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    spacing = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def _run(op: str, x: np.ndarray) -> np.ndarray:
    b = GraphBuilder(op)
    return compile_model(b.build(b.op(op, b.input("x", x.shape))), name=f"ulp_{op}")(x)


def _sweep(lo: float, hi: float) -> np.ndarray:
    mags = np.geomspace(1e-30, hi, 200_000)
    return np.concatenate([np.linspace(lo, hi, 200_001), mags, -mags]).astype(np.float32)


@pytest.mark.parametrize(
    "op,exact,domain,max_ulp",
    [
        ("exp", np.exp, (-87.0, 87.0), 2),
        ("tanh", np.tanh, (-20.0, 20.0), 2),
        ("erf", np.vectorize(math.erf), (-6.0, 6.0), 8),
    ],
)
def test_accuracy_in_ulps(op, exact, domain, max_ulp):
    x = _sweep(*domain)
    x = x[(x >= domain[0]) & (x <= domain[1])]
    errors = ulp_error(_run(op, x), exact(x.astype(np.float64)))
    assert errors.max() <= max_ulp, f"{op}: {errors.max():.2f} ulp at x={x[errors.argmax()]}"


def test_log_accuracy_over_all_positive_floats():
    x = np.geomspace(1e-44, 3e38, 400_000).astype(np.float32)  # subnormals included
    errors = ulp_error(_run("log", x), np.log(x.astype(np.float64)))
    assert errors.max() <= 2, f"log: {errors.max():.2f} ulp at x={x[errors.argmax()]}"
