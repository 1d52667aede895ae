"""Converters of the ONNX ops that become elementwise Kiln ops (ir/ops/elementwise.py):
arithmetic, comparisons, logic, activations, casts."""

from __future__ import annotations

import numpy as np
import onnx

from frontends.onnx.context import (
    ONNX_DTYPES,
    UnsupportedOnnxError,
    converter,
    emit,
    node_inputs,
    node_label,
    text,
)

_SIMPLE = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Neg": "neg",
    "Abs": "abs",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Relu": "relu",
    "Erf": "erf",
    "Where": "where",
    "Equal": "equal",
    "Less": "less",
    "Greater": "greater",
    "Floor": "floor",
    "Ceil": "ceil",
    "Round": "round",
    "Sign": "sign",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "HardSwish": "hard_swish",
    "Mish": "mish",
    "PRelu": "prelu",
    "LessOrEqual": "less_equal",
    "GreaterOrEqual": "greater_equal",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
    "Not": "logical_not",
    "IsNaN": "isnan",
}


@converter(*_SIMPLE)
def _simple(ctx, node, attrs):
    ins = node_inputs(ctx, node)
    if node.op_type == "Pow" and ins[1].type.dtype != ins[0].type.dtype:
        ins[1] = ctx.b.cast(ins[1], to=ins[0].type.dtype)  # Pow's exponent may have its own type
    return [emit(ctx, node, _SIMPLE[node.op_type], *ins)]


@converter("Max", "Min")
def _variadic_minmax(ctx, node, attrs):
    xs = node_inputs(ctx, node)
    op = "maximum" if node.op_type == "Max" else "minimum"
    acc = xs[0]
    for x in xs[1:]:
        acc = ctx.b.op(op, acc, x, name=node.output[0])
    return [acc]


@converter("HardSigmoid", "Selu", "Celu", "ThresholdedRelu", "IsInf")
def _with_float_attrs(ctx, node, attrs):
    """Activations whose attributes carry over by name (lower-cased)."""
    op = {
        "HardSigmoid": "hard_sigmoid",
        "Selu": "selu",
        "Celu": "celu",
        "ThresholdedRelu": "thresholded_relu",
        "IsInf": "isinf",
    }[node.op_type]
    kwargs = {k.lower(): (bool(v) if node.op_type == "IsInf" else float(v)) for k, v in attrs.items()}
    return [emit(ctx, node, op, *node_inputs(ctx, node), **kwargs)]


@converter("Sum", "Mean")
def _sum_mean(ctx, node, attrs):
    xs = node_inputs(ctx, node)
    acc = xs[0]
    for x in xs[1:]:
        acc = ctx.b.add(acc, x, name=node.output[0])
    if node.op_type == "Mean" and len(xs) > 1:
        n = ctx.b.param("count", np.array(len(xs), dtype=acc.type.np_dtype))
        acc = ctx.b.div(acc, n, name=node.output[0])
    return [acc]


@converter("LeakyRelu")
def _leaky(ctx, node, attrs):
    return [emit(ctx, node, "leaky_relu", *node_inputs(ctx, node), alpha=float(attrs.get("alpha", 0.01)))]


@converter("Elu")
def _elu(ctx, node, attrs):
    return [emit(ctx, node, "elu", *node_inputs(ctx, node), alpha=float(attrs.get("alpha", 1.0)))]


@converter("Gelu")
def _gelu(ctx, node, attrs):
    return [emit(ctx, node, "gelu", *node_inputs(ctx, node), approximate=text(attrs, "approximate", "none"))]


@converter("Clip")
def _clip(ctx, node, attrs):
    """Constant bounds become the clip op's attributes; bounds computed at run time
    become maximum/minimum ops. Integer inputs clip with maximum/minimum too."""
    x = ctx.value(node.input[0])
    if ctx.opset < 11:
        bounds = {"min": attrs.get("min"), "max": attrs.get("max")}
    else:
        bounds = {
            what: (node.input[i] if len(node.input) > i and node.input[i] else None)
            for i, what in ((1, "min"), (2, "max"))
        }
    constant = {
        k: (ctx.constants[v].item() if isinstance(v, str) else v)
        for k, v in bounds.items()
        if v is None or not isinstance(v, str) or v in ctx.constants
    }
    if len(constant) == 2 and x.type.dtype.startswith("float"):
        lo, hi = constant["min"], constant["max"]
        return [
            emit(
                ctx,
                node,
                "clip",
                x,
                min=float(-np.inf if lo is None else lo),
                max=float(np.inf if hi is None else hi),
            )
        ]
    y = x
    for what, op in (("min", "maximum"), ("max", "minimum")):
        v = bounds[what]
        if v is None:
            continue
        bound = ctx.value(v) if isinstance(v, str) else ctx.b.param(what, np.array(v, x.type.np_dtype))
        y = ctx.b.op(op, y, bound, name=node.output[0])
    return [y]


@converter("Cast")
def _cast(ctx, node, attrs):
    to = attrs["to"]
    if to not in ONNX_DTYPES:
        raise UnsupportedOnnxError(
            f"{node_label(node, ctx.opset)}: cast to {onnx.TensorProto.DataType.Name(to)} is not supported"
        )
    return [emit(ctx, node, "cast", ctx.value(node.input[0]), to=ONNX_DTYPES[to])]


@converter("CastLike")
def _cast_like(ctx, node, attrs):
    """Only `like`'s dtype matters: a constant cast like a computed value is a constant."""
    like = ctx.constants.get(node.input[1])
    dtype = like.dtype.name if like is not None else ctx.value(node.input[1]).type.dtype
    if node.input[0] in ctx.constants:
        return ctx.constants[node.input[0]].astype(dtype)
    return [emit(ctx, node, "cast", ctx.value(node.input[0]), to=dtype)]


@converter("Mod")
def _mod(ctx, node, attrs):
    return [emit(ctx, node, "mod", *node_inputs(ctx, node), fmod=bool(attrs.get("fmod", 0)))]
