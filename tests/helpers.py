"""Small builders shared by tests."""

from __future__ import annotations

import numpy as np

from compiler import compile_model
from ir.builder import GraphBuilder
from ir.graph import Graph


def mlp_graph(seed: int = 0, batch: int = 4) -> Graph:
    """x[batch, 8] → linear 16 → relu → linear 3 → softmax."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("mlp")
    x = b.input("x", (batch, 8))
    h = b.relu(
        b.linear(
            x,
            b.param("w1", rng.standard_normal((8, 16)).astype(np.float32)),
            b.param("b1", rng.standard_normal(16).astype(np.float32)),
        )
    )
    y = b.softmax(b.linear(h, b.param("w2", rng.standard_normal((16, 3)).astype(np.float32))))
    return b.build(y)


def two_input_graph():
    """add(a[2, 3], b[3]) and its compiled model."""
    b = GraphBuilder("two")
    g = b.build(b.add(b.input("a", (2, 3)), b.input("b", (3,))))
    return g, compile_model(g, name="two")
