"""Graphs that once gave wrong answers or crashed the compiler, kept as ONNX files with
the inputs that showed it (tests/data/regressions/NAME.onnx + NAME_inputs.npz; the
random-graph fuzzer saves its shrunk failures there too). Each runs fused, unfused,
through the interpreter and, where installed, through onnxruntime with its graph
optimizations off, on the saved inputs and on fresh ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from compiler.driver import to_graph
from ir.interpreter import interpret

CASES = sorted((Path(__file__).parent / "data" / "regressions").glob("*.onnx"))


def _onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _agree(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    for i, (g, e) in enumerate(zip(got, expected)):
        scale = max(1.0, float(np.nanmax(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(
            g, e, rtol=1e-4, atol=1e-5 * scale, equal_nan=True, err_msg=f"{what}, output {i}"
        )


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_regression_graph(path, rng):
    saved = dict(np.load(path.with_name(path.stem + "_inputs.npz")))
    fresh = {name: rng.standard_normal(a.shape).astype(a.dtype) for name, a in saved.items()}
    graph = to_graph(path)
    models = {fuse: compile_model(path, name="regression", fuse=fuse) for fuse in (True, False)}
    for feeds in (saved, fresh):
        expected = interpret(graph, feeds)
        for fuse, model in models.items():
            _agree(model.run(**feeds), expected, f"fuse={fuse} vs the interpreter")
        peer = _onnxruntime(path, feeds)
        if peer is not None:
            _agree(models[True].run(**feeds), peer, "fused vs onnxruntime")


def test_regression_cases_are_there():
    assert len(CASES) >= 5
