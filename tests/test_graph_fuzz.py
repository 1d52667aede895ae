"""Random graphs (hypothesis): diamonds, shared values, several consumers, broadcasting,
reductions broadcast back, matmuls and reshapes (views), compiled fused and unfused
and run against the interpreter. The long sweep is marked slow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import compile_model
from ir.builder import GraphBuilder
from ir.graph import Graph
from ir.interpreter import interpret

UNARY = ["relu", "tanh", "sigmoid", "neg", "abs", "exp", "gelu", "erf"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def graphs(draw):
    rows, cols = draw(st.sampled_from([(1, 1), (3, 7), (7, 33), (16, 64), (300, 130)]))
    b = GraphBuilder("fuzz")
    pool = [b.input("x", (rows, cols)), b.input("y", (cols,))]
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(
            st.sampled_from(
                [
                    "unary",
                    "binary",
                    "softmax",
                    "reduce",
                    "matmul",
                    "transpose2",
                    "reshape",
                    "center",
                    "layer_norm",
                ]
            )
        )
        a = draw(st.sampled_from(pool))
        if kind == "unary":
            v = b.op(draw(st.sampled_from(UNARY)), a)
            if a.type.shape and v.type.dtype == "float32" and draw(st.booleans()):
                v = b.op("clip", v, min=-3.0, max=3.0)  # keep exp from overflowing chains
        elif kind == "binary":
            c = draw(st.sampled_from([p for p in pool if p.type.shape[-1:] == a.type.shape[-1:]] or [a]))
            v = b.op(draw(st.sampled_from(BINARY)), a, c)
        elif kind == "softmax":
            v = b.softmax(a)
        elif kind == "reduce":
            v = b.op(
                draw(st.sampled_from(["reduce_sum", "reduce_max", "reduce_mean"])),
                a,
                axes=(-1,),
                keepdims=True,
            )
        elif kind == "matmul" and a.type.rank == 2:
            w = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((a.type.shape[1], cols))
            v = b.matmul(a, b.param("w", (w / np.sqrt(a.type.shape[1])).astype(np.float32)))
        elif kind == "transpose2" and a.type.rank == 2 and a.type.shape[0] == a.type.shape[1]:
            v = b.transpose(a)
        elif kind == "reshape" and a.type.rank == 2:
            v = b.reshape(b.reshape(a, shape=(a.type.numel,)), shape=a.type.shape)  # two views
        elif kind == "center" and a.type.rank == 2:  # x - max(x): a reduction broadcast back
            v = b.sub(a, b.reduce_max(a, axes=(-1,), keepdims=True))
        elif kind == "layer_norm" and a.type.rank == 2:
            v = b.layer_norm(a, b.param("g", np.ones(a.type.shape[-1:], np.float32)))
        else:
            continue
        pool.append(v)
    outs = draw(st.lists(st.sampled_from(pool[2:] or pool), min_size=1, max_size=3))
    return b.build(*outs)


def _scales(graph, feeds) -> list[float]:
    """Per output, the largest value among it and its producing node's operands (at
    least 1). float32 rounding is relative to the operands, not the result: x - max(x)
    or a layer norm of nearly equal values gives outputs near 0 whose error is eps times
    the operands' size."""
    nodes = graph.nodes
    every = Graph(graph.inputs, [n.outputs[0] for n in nodes], nodes, graph.params, graph.name)
    env = (
        dict(zip(graph.inputs, feeds))
        | dict(graph.params)
        | dict(zip(every.outputs, interpret(every, feeds)))
    )
    producer = {n.outputs[0]: n for n in nodes}

    def size(v) -> float:
        a = np.asarray(env[v])
        return float(np.nanmax(np.abs(a), initial=0.0)) if np.issubdtype(a.dtype, np.floating) else 0.0

    operands = lambda v: producer[v].inputs if v in producer else []  # noqa: E731
    return [max([1.0, size(v)] + [size(u) for u in operands(v)]) for v in graph.outputs]


def _check(graph, seed: int) -> None:
    rng = np.random.default_rng(seed)
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    expected = interpret(graph, feeds)
    scales = _scales(graph, feeds)
    for fuse in (True, False):
        got = compile_model(graph, name="fuzz", fuse=fuse).run(*feeds)
        for g, e, scale in zip(got, expected, scales):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)


@given(graphs(), st.integers(0, 2**31))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_graphs_match_interpreter(graph, seed):
    _check(graph, seed)


@pytest.mark.slow
@given(graphs(), st.integers(0, 2**31))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_graphs_match_interpreter_long(graph, seed):
    _check(graph, seed)
