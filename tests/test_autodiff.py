"""Every gradient rule against central finite differences of the float64 interpreter,
and the compiled gradient program against the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import compile_model
from ir.autodiff import gradients
from ir.builder import GraphBuilder
from ir.interpreter import interpret
from ir.ops import REGISTRY, Gradient, Op

# op → (input shapes, attributes, how to draw inputs: "normal" | "positive" | "away")
CASES = {
    "add": ([(3, 4), (4,)], {}, "normal"),
    "sub": ([(3, 1), (3, 4)], {}, "normal"),
    "mul": ([(2, 3, 4), (3, 1)], {}, "normal"),
    "div": ([(3, 4), (3, 4)], {}, "positive"),
    "neg": ([(5,)], {}, "normal"),
    "abs": ([(4, 5)], {}, "away"),
    "relu": ([(4, 5)], {}, "away"),
    "leaky_relu": ([(4, 5)], {"alpha": 0.2}, "away"),
    "sigmoid": ([(4, 5)], {}, "normal"),
    "tanh": ([(4, 5)], {}, "normal"),
    "exp": ([(4, 5)], {}, "normal"),
    "log": ([(4, 5)], {}, "positive"),
    "sqrt": ([(4, 5)], {}, "positive"),
    "rsqrt": ([(4, 5)], {}, "positive"),
    "gelu": ([(4, 5)], {}, "normal"),
    "elu": ([(4, 5)], {"alpha": 0.7}, "away"),
    "softplus": ([(4, 5)], {}, "normal"),
    "clip": ([(4, 5)], {"min": -0.5, "max": 0.7}, "away"),
    "maximum": ([(4, 5), (5,)], {}, "normal"),
    "minimum": ([(4, 5), (4, 1)], {}, "normal"),
    "softmax": ([(3, 7)], {"axis": -1}, "normal"),
    "log_softmax": ([(3, 4, 5)], {"axis": 1}, "normal"),
    "reduce_sum": ([(3, 4, 5)], {"axes": (0, 2), "keepdims": False}, "normal"),
    "reduce_mean": ([(3, 4, 5)], {"axes": (1,), "keepdims": True}, "normal"),
    "reshape": ([(3, 4)], {"shape": (2, 6)}, "normal"),
    "flatten": ([(2, 3, 4)], {"axis": 1}, "normal"),
    "expand": ([(3, 1)], {"shape": (2, 3, 4)}, "normal"),
    "transpose": ([(2, 3, 4)], {"perm": (2, 0, 1)}, "normal"),
    "matmul": ([(2, 3, 4), (4, 5)], {}, "normal"),
    "linear": ([(6, 4), (4, 3), (3,)], {}, "normal"),
    "where": ([(4, 5), (4, 5), (5,)], {}, "mask"),
    "erf": ([(4, 5)], {}, "normal"),
    "reciprocal": ([(4, 5)], {}, "positive"),
    "pow": ([(4, 5), (5,)], {}, "positive"),
    "softsign": ([(4, 5)], {}, "away"),
    "selu": ([(4, 5)], {}, "away"),
    "celu": ([(4, 5)], {"alpha": 0.8}, "away"),
    "hard_sigmoid": ([(4, 5)], {"alpha": 0.3, "beta": 0.4}, "wide_away"),
    "hard_swish": ([(4, 5)], {}, "wide_away"),
    "mish": ([(4, 5)], {}, "normal"),
    "thresholded_relu": ([(4, 5)], {"alpha": 0.4}, "away"),
    "prelu": ([(3, 4, 5), (4, 1)], {}, "away"),
    "reduce_max": ([(3, 4, 5)], {"axes": (1,), "keepdims": False}, "normal"),
    "reduce_min": ([(3, 4, 5)], {"axes": (0, 2), "keepdims": True}, "normal"),
    "reduce_prod": ([(3, 4)], {"axes": (1,), "keepdims": False}, "positive"),
    "pad": ([(3, 4)], {"pads": (1, 0, 2, 3)}, "normal"),
    "tile": ([(2, 3)], {"repeats": (3, 2)}, "normal"),
    "cumsum": ([(3, 5)], {"axis": 1, "exclusive": True}, "normal"),
    "cumsum_reverse": ([(4, 3)], {"axis": 0, "reverse": True}, "normal"),
    "trilu": ([(4, 5)], {"upper": False, "k": 1}, "normal"),
    "global_avg_pool2d": ([(2, 3, 4, 5)], {}, "normal"),
    "layer_norm": ([(3, 4, 6), (4, 6), (4, 6)], {"axis": 1, "epsilon": 1e-3}, "normal"),
    "batch_norm": ([(2, 3, 4, 2), (3,), (3,), (3,), (3,)], {"epsilon": 1e-3}, "batchnorm"),
    "slice": ([(4, 6, 3)], {"starts": (1, 2), "ends": (3, 6), "axes": (0, 1)}, "normal"),
    "concat": ([(2, 3), (2, 1), (2, 4)], {"axis": 1}, "normal"),
    "gather": ([(6, 3)], {"axis": 0}, "indices"),
    "conv2d": ([(2, 3, 7, 6), (4, 3, 3, 2), (4,)], {"strides": (2, 1), "pads": (1, 0, 1, 1)}, "normal"),
    "conv2d_stride1": ([(2, 3, 6, 5), (4, 3, 3, 2)], {"pads": (1, 0, 2, 1), "dilations": (2, 1)}, "normal"),
    "avg_pool2d": ([(2, 3, 6, 7)], {"kernel": (3, 2), "strides": (2, 2), "pads": (1, 0, 1, 1)}, "normal"),
    "avg_pool2d_include_pad": (
        [(1, 2, 5, 5)],
        {"kernel": (2, 2), "strides": (1, 2), "pads": (1, 1, 0, 1), "count_include_pad": True},
        "normal",
    ),
    "conv_transpose2d": (
        [(2, 3, 4, 3), (3, 2, 3, 2), (2,)],
        {"strides": (2, 1), "pads": (1, 0, 0, 1), "output_padding": (1, 0)},
        "normal",
    ),
    "max_pool2d": ([(2, 3, 6, 7)], {"kernel": (3, 2), "strides": (2, 2), "pads": (1, 0, 1, 1)}, "normal"),
    "max_pool2d_tiled": ([(2, 3, 7, 5)], {"kernel": (2, 2), "strides": (2, 2)}, "normal"),
    "mod": ([(4, 5), (5,)], {}, "ratio"),
    "mod_fmod": ([(4, 5), (4, 1)], {"fmod": True}, "ratio"),
    "gather_elements": ([(6, 3)], {"axis": 0}, "indices"),
    "topk": ([(4, 6)], {"k": 3, "axis": 1}, "normal"),
    "einsum": ([(2, 3), (3, 4)], {"equation": "ij,jk->i"}, "normal"),  # k summed in one operand only
    "einsum_broadcast": ([(1, 3), (2, 3), (3, 4)], {"equation": "ij,ij,jk->ik"}, "normal"),
    "resample": ([(2, 5)], {"axes": (1,)}, "taps"),
    "rnn": ([(3, 2, 4), (4, 4), (2, 4)], {"hidden": 4}, "normal"),
    "gru": ([(3, 2, 9), (3, 9), (2, 3), (3,)], {"hidden": 3}, "normal"),
    "gru_reverse": (
        [(3, 2, 9), (3, 9), (2, 3), (3,)],
        {"hidden": 3, "reverse": True, "linear_before_reset": True},
        "normal",
    ),
    "lstm": ([(3, 2, 8), (2, 8), (2, 2), (2, 2), (6,)], {"hidden": 2, "clip": 1.5}, "normal"),
}


def _draw(rng, shape, kind):
    x = rng.standard_normal(shape)
    if kind == "mask":
        return x
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if kind == "wide_away":  # spread out, but off the kinks of hard_sigmoid / hard_swish
        x = x * 3
        return np.where(
            np.min(np.abs(x[..., None] - np.array([-3.0, -1.3, 2.0, 3.0])), axis=-1) < 0.1, 1.0, x
        )
    if kind == "batchnorm":
        return x
    if kind == "away":  # away from the kinks of relu, clip, ...
        return np.where(np.abs(x) < 0.1, 0.3, x) * np.where(np.abs(np.abs(x) - 0.6) < 0.15, 1.5, 1.0)
    return x


VARIANTS = (
    "_stride",
    "_include",
    "_reverse",
    "_tiled",
    "_fmod",
    "_broadcast",
)  # several cases of one op, under their own names


def _op_of(case_name: str) -> str:
    for suffix in VARIANTS:
        case_name = case_name.split(suffix)[0]
    return case_name


def _differentiable() -> set[str]:
    return {n for n, cls in REGISTRY.items() if cls.differentiation in (Gradient.RULE, Gradient.DECOMPOSE)}


def test_every_differentiable_op_has_a_case():
    assert _differentiable() == {_op_of(name) for name in CASES}


def test_ops_say_how_they_differentiate():
    """An op with a RULE defines gradient() (a differentiable op that lacks one fails
    here), a DECOMPOSE op defines decompose(), and the others define neither."""
    for name, cls in REGISTRY.items():
        has_rule, has_decomposition = cls.gradient is not Op.gradient, cls.decompose is not Op.decompose
        expected = (cls.differentiation is Gradient.RULE, cls.differentiation is Gradient.DECOMPOSE)
        assert (has_rule, has_decomposition) == expected, f"op {name}: {cls.differentiation}"


@pytest.mark.parametrize("op_name", sorted(CASES))
def test_rule_matches_finite_differences(op_name, rng):
    shapes, attrs, kind = CASES[op_name]
    op_name = _op_of(op_name)  # variants of one op under their own names
    b = GraphBuilder(op_name)
    operands = []
    if kind == "mask":  # where(cond, a, b): a fixed random condition, gradients for a and b
        operands.append(b.param("cond", rng.random(shapes[0]) < 0.5))
        shapes = shapes[1:]
    extra = []
    if kind == "indices":  # gather(data, indices): repeated and negative indices, gradient for data
        extra.append(b.param("idx", np.array([[0, 5, -1], [2, 0, 0]], np.int64)))
    if kind == "taps":  # resample(x, indices, weights) along axis 1: 4 outputs of 5, the last extrapolated
        extra.append(b.param("taps", np.array([[0, 1], [1, 3], [4, 4], [-1, 0]], np.int64)))
        extra.append(b.param("weights", rng.standard_normal((4, 2))))
    xs = [_draw(rng, s, kind) for s in shapes]
    if kind == "batchnorm":  # a variance must be positive
        xs[-1] = rng.uniform(0.5, 2.0, shapes[-1])
    if kind == "ratio":  # mod(x, y): x / y well away from the integers, where mod jumps
        xs[1] = rng.uniform(0.5, 2.0, shapes[1]) * rng.choice([-1.0, 1.0], shapes[1])
        xs[0] = (rng.integers(-3, 3, shapes[0]) + rng.uniform(0.2, 0.8, shapes[0])) * xs[1]
    inputs = [b.input(f"x{i}", s, "float64") for i, s in enumerate(shapes)]
    y = b.op(op_name, *operands, *inputs, *extra, **attrs)
    weights = b.param("w", rng.standard_normal(y.type.shape))  # loss = Σ w·y: every output counts
    loss = b.reduce_sum(b.mul(y, weights), keepdims=False)
    grads = gradients(b, loss, inputs)
    graph = b.build(loss, *grads)
    analytic = interpret(graph, xs)[1:]

    def loss_at(values):
        return float(interpret(graph, values)[0])

    eps = 1e-6
    for i, x in enumerate(xs):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus, minus = [v.copy() for v in xs], [v.copy() for v in xs]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            numeric[idx] = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        np.testing.assert_allclose(analytic[i], numeric, rtol=1e-5, atol=1e-7, err_msg=f"input {i}")


def test_compiled_gradients_match_the_interpreter(rng):
    """An MLP's loss and weight gradients, fused and compiled, in float32."""
    b = GraphBuilder("mlp_grad")
    x = b.input("x", (16, 8))
    w1, w2 = b.input("w1", (8, 32)), b.input("w2", (32, 4))
    h = b.relu(b.linear(x, w1))
    p = b.log_softmax(b.linear(h, w2), axis=-1)
    loss = b.neg(b.reduce_mean(p, keepdims=False))
    graph = b.build(loss, *gradients(b, loss, [w1, w2]))
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    expected = interpret(graph, feeds)
    got = compile_model(graph, name="mlp_grad").run(*feeds)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "windows,joined",
    [
        ([(0, 2), (2, 5), (5, 6)], True),  # slices that tile the axis
        ([(1, 2), (3, 5)], True),  # with gaps before, between and after
        ([(0, 3), (2, 6)], False),  # overlapping: summed as pads
        ([(2, 4), (2, 5)], False),  # overlapping from one start
    ],
)
def test_gradients_of_slices_that_split_a_value(windows, joined, rng):
    """The gradient parts of slices of one value along one axis, joined by one concat
    (zeros in the gaps) where their windows are disjoint, else summed; both exact."""
    b = GraphBuilder("split")
    x = b.input("x", (3, 6), "float64")
    y = b.mul(x, x)  # read once more, elsewhere, so the concat is added to another part
    loss = b.reduce_sum(y, keepdims=False)
    for i, (start, end) in enumerate(windows):
        part = b.slice(x, starts=(start,), ends=(end,), axes=(1,))
        w = b.param(f"w{i}", rng.standard_normal(part.type.shape))
        loss = b.add(loss, b.reduce_sum(b.mul(part, w), keepdims=False))
    start = len(b.nodes)
    (grad,) = gradients(b, loss, [x])
    assert any(n.op.name == "concat" for n in b.nodes[start:]) == joined
    graph = b.build(grad)
    xv = rng.standard_normal((3, 6))
    expected = 2 * xv
    for i, (s, e) in enumerate(windows):
        expected[:, s:e] += _param(graph, f"w{i}")
    np.testing.assert_allclose(interpret(graph, [xv])[0], expected, rtol=1e-12)


def _param(graph, name: str) -> np.ndarray:
    return next(a for v, a in graph.params.items() if v.name == name)
