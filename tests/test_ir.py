"""The IR: builder, verifier, printer, interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from ir.builder import GraphBuilder
from ir.errors import GraphError
from ir.graph import Graph, Node, Value
from ir.interpreter import interpret
from ir.ops import make_op
from ir.types import TensorType
from tests.helpers import mlp_graph


def test_printer_is_stable_and_readable():
    text = str(mlp_graph())
    assert text == str(mlp_graph())
    assert text.splitlines()[0] == "graph mlp(%x: f32[4,8]) {"
    assert "  %linear = linear(%x, %w1, %b1) : f32[4,16]" in text
    assert "  return %softmax" in text


def test_attributes_print_when_not_default():
    b = GraphBuilder()
    y = b.conv2d(
        b.input("x", (1, 2, 5, 5)), b.param("w", np.zeros((3, 2, 3, 3), np.float32)), pads=(1, 1, 1, 1)
    )
    assert "conv2d(%x, %w) {pads=(1, 1, 1, 1)} : f32[1,3,5,5]" in str(b.build(y))


@pytest.mark.parametrize(
    "build,message",
    [
        (
            lambda b: b.add(b.input("x", (2, 3)), b.input("y", (4,))),
            r"node add: add: shapes \[\(2, 3\), \(4,\)\] do not broadcast",
        ),
        (lambda b: b.matmul(b.input("x", (2, 3)), b.input("y", (4, 5))), "inner dimensions differ"),
        (lambda b: b.exp(b.input("i", (2,), "int64")), "exp: input 0 has dtype int64"),
        (lambda b: b.reshape(b.input("x", (2, 3)), shape=(4, 2)), "has 6 elements"),
        (lambda b: b.op("relu", b.input("x", (2,)), b.input("y", (2,))), r"takes 1..1 inputs, got 2"),
        (lambda b: b.op("softmax", b.input("x", (2,)), axis=3), "axis 3 out of range"),
        (lambda b: b.op("relu", b.input("x", (2,)), bogus=1), r"unknown attribute\(s\) \['bogus'\]"),
        (lambda b: b.op("frobnicate", b.input("x", (2,))), "unknown op 'frobnicate'"),
    ],
)
def test_builder_type_errors_name_node_and_problem(build, message):
    with pytest.raises(GraphError, match=message):
        build(GraphBuilder())


def test_verifier_catches_use_before_def_and_bad_types():
    x = Value("x", TensorType("float32", (2,)))
    y = Value("y", TensorType("float32", (2,)))
    z = Value("z", TensorType("float32", (2,)))
    relu = make_op("relu")
    with pytest.raises(GraphError, match="input 0 %y is used before it is defined"):
        from ir.verify import verify

        verify(Graph([x], [z], [Node(relu, [y], [z], "late"), Node(relu, [x], [y], "early")]))
    bad = Value("bad", TensorType("float32", (3,)))
    with pytest.raises(GraphError, match=r"output type f32\[3\], op infers f32\[2\]"):
        verify(Graph([x], [bad], [Node(relu, [x], [bad], "r")]))
    with pytest.raises(GraphError, match="graph output %z is not defined"):
        verify(Graph([x], [z], []))


def test_interpreter_checks_inputs_and_runs(rng):
    g = mlp_graph()
    x = rng.standard_normal((4, 8)).astype(np.float32)
    (y,) = interpret(g, {"x": x})
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(GraphError, match=r"input x: expected f32\[4,8\]"):
        interpret(g, [x.astype(np.float64)])
