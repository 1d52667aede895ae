"""Converters of the ONNX ops that become reductions or are built around one
(ir/ops/reduce.py): Reduce*, ArgMax/ArgMin, TopK, Softmax, and the normalizations
written as reductions (LayerNormalization, RMSNormalization, InstanceNormalization,
LpNormalization, Hardmax, GlobalMaxPool)."""

from __future__ import annotations

import numpy as np

from frontends.onnx.context import UnsupportedOnnxError, converter, emit, ints, node_inputs, node_label
from ir.graph import Value
from ir.ops import make_op

_REDUCE_OPS = {
    "ReduceSum": "reduce_sum",
    "ReduceMean": "reduce_mean",
    "ReduceMax": "reduce_max",
    "ReduceMin": "reduce_min",
    "ReduceProd": "reduce_prod",
}

_COMPOSED_REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")


def _reduce_axes(ctx, node, attrs):
    """The axes, from the attribute or (ReduceSum from opset 13, all from 18) the input."""
    if (node.op_type == "ReduceSum" and ctx.opset >= 13) or ctx.opset >= 18:
        axes_arr = ctx.constant(node, 1, "axes")
        return None if axes_arr is None or axes_arr.size == 0 else ints(axes_arr.ravel())
    return ints(attrs["axes"]) if "axes" in attrs else None


@converter(*_REDUCE_OPS, *_COMPOSED_REDUCTIONS)
def _reduce(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _reduce_axes(ctx, node, attrs)
    # no axes with noop_with_empty_axes: nothing is summed, but the composed reductions
    # still apply their elementwise parts (ReduceL1 gives |x|, ReduceLogSum log x), as
    # the ONNX reference and onnxruntime do
    noop = axes is None and bool(attrs.get("noop_with_empty_axes", 0))
    keep = bool(attrs.get("keepdims", 1))
    b, out = ctx.b, node.output[0]
    if node.op_type in _REDUCE_OPS:
        return [x if noop else emit(ctx, node, _REDUCE_OPS[node.op_type], x, axes=axes, keepdims=keep)]

    def total(v: Value) -> Value:
        return v if noop else b.reduce_sum(v, axes=axes, keepdims=keep)

    if node.op_type == "ReduceL1":
        return [b.rename(total(b.abs(x)), out)]
    if node.op_type == "ReduceSumSquare":
        return [b.rename(total(b.mul(x, x)), out)]
    if node.op_type == "ReduceL2":
        return [b.sqrt(total(b.mul(x, x)), name=out)]
    if node.op_type == "ReduceLogSum":
        return [b.log(total(x), name=out)]
    if noop:  # log(exp(x))
        return [x]
    # ReduceLogSumExp, stable: max + log(sum(exp(x - max)))
    m = b.reduce_max(x, axes=axes, keepdims=True)
    m_finite = b.where(b.isinf(m), b.param("zero", np.zeros((), x.type.np_dtype)), m)
    lse = b.add(b.log(b.reduce_sum(b.exp(b.sub(x, m_finite)), axes=axes, keepdims=True)), m_finite)
    shape = make_op("reduce_sum", axes=axes, keepdims=keep).infer(x.type).shape  # no node just for a shape
    return [b.reshape(lse, shape=shape, name=out)]


@converter("ArgMax", "ArgMin")
def _arg(ctx, node, attrs):
    return [
        emit(
            ctx,
            node,
            "arg_reduce",
            ctx.value(node.input[0]),
            axis=int(attrs.get("axis", 0)),
            keepdims=bool(attrs.get("keepdims", 1)),
            largest=node.op_type == "ArgMax",
            select_last_index=bool(attrs.get("select_last_index", 0)),
        )
    ]


@converter("TopK")
def _topk(ctx, node, attrs):
    """Values and indices are two nodes (Kiln ops have one output); sorted=0 leaves the
    order to the implementation, and Kiln's is sorted."""
    x = ctx.value(node.input[0])
    k = int(ctx.constant(node, 1, "K").item()) if ctx.opset >= 10 else int(attrs["k"])
    common = dict(k=k, axis=int(attrs.get("axis", -1)), largest=bool(attrs.get("largest", 1)))
    return [
        ctx.b.op("topk", x, name=name or None, output=output, **common)
        for name, output in zip(node.output, ("values", "indices"))
    ]


@converter("Softmax", "LogSoftmax")
def _softmax(ctx, node, attrs):
    """Opset 13 normalizes along one axis; older opsets over all axes from `axis` on."""
    x = ctx.value(node.input[0])
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    if ctx.opset >= 13:
        return [emit(ctx, node, op, x, axis=int(attrs.get("axis", -1)))]
    axis = int(attrs.get("axis", 1)) % max(x.type.rank, 1)
    flat = ctx.b.flatten(x, axis=axis)
    y = ctx.b.op(op, flat, axis=-1)
    return [emit(ctx, node, "reshape", y, shape=x.type.shape)]


@converter("Hardmax")
def _hardmax(ctx, node, attrs):
    """1 at the first largest value along the axis, 0 elsewhere: arg_reduce against an
    iota. Before opset 13 the axis means all axes from it on, flattened (as Softmax)."""
    x = ctx.value(node.input[0])
    b = ctx.b
    if ctx.opset >= 13:
        t, axis = x, int(attrs.get("axis", -1)) % x.type.rank
    else:
        t, axis = b.flatten(x, axis=int(attrs.get("axis", 1)) % max(x.type.rank, 1)), 1
    n = t.type.shape[axis]
    iota = np.arange(n, dtype=np.int64).reshape([n if i == axis else 1 for i in range(t.type.rank)])
    hit = b.equal(b.param("iota", iota), b.arg_reduce(t, axis=axis, keepdims=True))
    y = b.cast(hit, to=x.type.dtype)
    return [b.reshape(y, shape=x.type.shape, name=node.output[0])]


@converter("LayerNormalization")
def _layernorm(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axis = int(attrs.get("axis", -1))
    epsilon = float(attrs.get("epsilon", 1e-5))
    y = emit(ctx, node, "layer_norm", *node_inputs(ctx, node), axis=axis, epsilon=epsilon)
    if len(node.output) == 1:
        return [y]
    # the optional Mean and InvStdDev outputs: the statistics again, as graph ops
    b = ctx.b
    axes = tuple(range(axis % x.type.rank, x.type.rank))
    mean = b.reduce_mean(x, axes=axes, name=node.output[1] or None)
    centered = b.sub(x, mean)
    eps = b.param("epsilon", np.array(epsilon, x.type.np_dtype))
    inv_std = b.rsqrt(b.add(b.reduce_mean(b.mul(centered, centered), axes=axes), eps))
    return [y, mean, inv_std]


@converter("RMSNormalization")
def _rms_norm(ctx, node, attrs):
    """x / sqrt(mean(x², axes axis..end) + eps) * scale, in ops row fusion joins."""
    x, scale = node_inputs(ctx, node)[:2]
    b = ctx.b
    axis = int(attrs.get("axis", -1)) % x.type.rank
    rows = b.reshape(x, shape=(*x.type.shape[:axis], -1))
    eps = b.param("epsilon", np.array(attrs.get("epsilon", 1e-5), x.type.np_dtype))
    y = b.mul(rows, b.rsqrt(b.add(b.reduce_mean(b.mul(rows, rows), axes=(-1,)), eps)))
    return [b.mul(b.reshape(y, shape=x.type.shape), scale, name=node.output[0])]


@converter("InstanceNormalization")
def _instance_norm(ctx, node, attrs):
    """Per (image, channel) normalization over the spatial axes, written with the ops
    row fusion makes one kernel of."""
    x, scale, bias = node_inputs(ctx, node)
    b = ctx.b
    n, c = x.type.shape[:2]
    rows = b.reshape(x, shape=(n, c, -1))
    d = b.sub(rows, b.reduce_mean(rows, axes=(-1,)))
    var = b.reduce_mean(b.mul(d, d), axes=(-1,))
    eps = b.param("epsilon", np.array(attrs.get("epsilon", 1e-5), x.type.np_dtype))
    y = b.mul(d, b.rsqrt(b.add(var, eps)))
    y = b.add(b.mul(y, b.reshape(scale, shape=(c, 1))), b.reshape(bias, shape=(c, 1)))
    return [b.reshape(y, shape=x.type.shape, name=node.output[0])]


@converter("LpNormalization")
def _lp_normalization(ctx, node, attrs):
    x = ctx.value(node.input[0])
    b = ctx.b
    axis, p = int(attrs.get("axis", -1)), int(attrs.get("p", 2))
    if p not in (1, 2):
        raise UnsupportedOnnxError(f"{node_label(node, ctx.opset)}: p={p} (only 1 and 2 exist)")
    norm = b.reduce_sum(b.abs(x), axes=(axis,)) if p == 1 else b.sqrt(b.reduce_sum(b.mul(x, x), axes=(axis,)))
    zero = b.param("zero", np.zeros((), x.type.np_dtype))
    safe = b.where(b.equal(norm, zero), b.param("one", np.ones((), x.type.np_dtype)), norm)
    return [b.where(b.equal(norm, zero), zero, b.div(x, safe), name=node.output[0])]


@converter("GlobalMaxPool")
def _global_max(ctx, node, attrs):
    x = ctx.value(node.input[0])
    return [emit(ctx, node, "reduce_max", x, axes=tuple(range(2, x.type.rank)), keepdims=True)]
