"""The recurrent ops' one cell definition, on each of its backends, and the Keras layers
that run on those ops.

test_ops.py checks the kernel against the reference, test_autodiff.py the unrolled
decomposition's gradients against finite differences; here the unrolled graph's values
are checked against the reference directly, and the Keras layers are checked to be one
op node each (the tuned kernel), not steps unrolled into the model's graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from frontends import keras
from frontends.keras.trainer import GraphContext
from ir.builder import GraphBuilder
from ir.interpreter import interpret

VARIANTS = {
    "rnn": ("rnn", {"hidden": 5}, [(4, 3, 5), (5, 5), (3, 5)]),
    "rnn_reverse_clip": ("rnn", {"hidden": 5, "reverse": True, "clip": 0.5}, [(4, 3, 5), (5, 5), (3, 5)]),
    "gru": ("gru", {"hidden": 4}, [(4, 3, 12), (4, 12), (3, 4), (4,)]),
    "gru_linear_before_reset": (
        "gru",
        {"hidden": 4, "linear_before_reset": True, "reverse": True},
        [(4, 3, 12), (4, 12), (3, 4), (4,)],
    ),
    "lstm": ("lstm", {"hidden": 3}, [(4, 2, 12), (3, 12), (2, 3), (2, 3), (9,)]),
    "lstm_clip_relu": (
        "lstm",
        {"hidden": 3, "clip": 0.8, "activations": (("sigmoid", ()), ("relu", ()), ("tanh", ()))},
        [(4, 2, 12), (3, 12), (2, 3), (2, 3), (9,)],
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unrolled_steps_compute_the_reference(variant, rng):
    op, attrs, shapes = VARIANTS[variant]
    b = GraphBuilder(variant)
    inputs = [b.input(f"x{i}", s, "float64") for i, s in enumerate(shapes)]
    node = b.op(op, *inputs, **attrs)
    unrolled = b.nodes[-1].op.decompose(b, inputs)
    values = [rng.standard_normal(s) for s in shapes]
    reference, steps = interpret(b.build(node, unrolled), values)
    np.testing.assert_allclose(steps, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras.layers.SimpleRNN(6, return_sequences=True),
        lambda: keras.layers.LSTM(6, go_backwards=True, return_state=True),
        lambda: keras.layers.GRU(6, reset_after=False),
        lambda: keras.layers.GRU(6),
    ],
)
def test_keras_recurrent_layers_are_one_op(layer):
    layer = layer()
    layer.build((7, 5))
    b = GraphBuilder("layer")
    weights = {id(w): b.input(w.name.replace("/", "_"), w.shape) for w in layer.weights}
    layer.call(GraphContext(b, weights), b.input("x", (4, 7, 5)), False)
    ops = [node.op.name for node in b.nodes]
    assert sum(name in ("rnn", "gru", "lstm") for name in ops) == 1
    assert ops.count("matmul") + ops.count("linear") == 1  # the input projection of all steps
