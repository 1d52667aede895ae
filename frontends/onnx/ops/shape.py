"""Converters of the ONNX ops that move or make values without arithmetic (ir/ops/shape.py):
reshapes, transposes, slices, pads, gathers, Identity, and the ops whose result is known
at import (Constant, Shape, Size, ConstantOfShape, Range), which become constants."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from frontends.onnx.context import (
    OnnxImportError,
    UnsupportedOnnxError,
    converter,
    emit,
    ints,
    node_inputs,
    node_label,
    text,
)


@converter("Trilu")
def _trilu(ctx, node, attrs):
    k = ctx.constant(node, 1, "k")
    return [
        emit(
            ctx,
            node,
            "trilu",
            ctx.value(node.input[0]),
            upper=bool(attrs.get("upper", 1)),
            k=0 if k is None else int(k.item()),
        )
    ]


@converter("Identity", "Dropout")
def _identity(ctx, node, attrs):
    """Dropout in inference mode (or with ratio 0) passes x through; its mask is all true."""
    if node.op_type == "Dropout":
        _check_dropout_is_identity(ctx, node, attrs)
    x = ctx.constants[node.input[0]] if node.input[0] in ctx.constants else ctx.value(node.input[0])
    if len(node.output) < 2 or not node.output[1]:
        return x if isinstance(x, np.ndarray) else [x]
    x = ctx.value(node.input[0])
    mask = ctx.b.expand(ctx.b.param("true", np.array(True)), shape=x.type.shape, name=node.output[1])
    return [x, mask]


def _check_dropout_is_identity(ctx, node, attrs) -> None:
    training = ctx.constant(node, 2, "training_mode") if ctx.opset >= 12 else None
    if training is None or not bool(training):
        return
    ratio = ctx.constant(node, 1, "ratio")
    if ratio is None or float(ratio) != 0.0:
        raise UnsupportedOnnxError(
            f"{node_label(node, ctx.opset)}: training-mode dropout (a random mask) is not supported"
        )


@converter("Constant")
def _constant(ctx, node, attrs):
    if "value" in attrs:
        return np.asarray(numpy_helper.to_array(attrs["value"]), order="C")
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    raise UnsupportedOnnxError(
        f"{node_label(node, ctx.opset)}: constant attribute {sorted(attrs)} not supported"
    )


@converter("Flatten")
def _flatten(ctx, node, attrs):
    return [emit(ctx, node, "flatten", ctx.value(node.input[0]), axis=int(attrs.get("axis", 1)))]


@converter("Reshape")
def _reshape(ctx, node, attrs):
    x = ctx.value(node.input[0])
    shape = [int(d) for d in ctx.constant(node, 1, "shape").ravel()]
    if not attrs.get("allowzero", 0):
        shape = [x.type.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [emit(ctx, node, "reshape", x, shape=tuple(shape))]


def _axes_arg(ctx, node, attrs, pos: int) -> tuple[int, ...]:
    if ctx.opset >= 13:
        arr = ctx.constant(node, pos, "axes")
        return () if arr is None else ints(arr.ravel())
    return ints(attrs.get("axes", ()))


@converter("Unsqueeze")
def _unsqueeze(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _axes_arg(ctx, node, attrs, 1)
    rank = x.type.rank + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(x.type.shape)
    for a in axes:
        shape.insert(a, 1)
    return [emit(ctx, node, "reshape", x, shape=tuple(shape))]


@converter("Squeeze")
def _squeeze(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _axes_arg(ctx, node, attrs, 1)
    drop = {a % x.type.rank for a in axes} if axes else {i for i, d in enumerate(x.type.shape) if d == 1}
    bad = [a for a in drop if x.type.shape[a] != 1]
    if bad:
        raise OnnxImportError(
            f"{node_label(node, ctx.opset)}: cannot squeeze axes {bad} of shape {x.type.shape}"
        )
    shape = tuple(d for i, d in enumerate(x.type.shape) if i not in drop)
    return [emit(ctx, node, "reshape", x, shape=shape)]


@converter("Transpose")
def _transpose(ctx, node, attrs):
    perm = ints(attrs["perm"]) if "perm" in attrs else None
    return [emit(ctx, node, "transpose", ctx.value(node.input[0]), perm=perm)]


@converter("Concat")
def _concat(ctx, node, attrs):
    return [emit(ctx, node, "concat", *node_inputs(ctx, node), axis=int(attrs["axis"]))]


@converter("Slice")
def _slice(ctx, node, attrs):
    x = ctx.value(node.input[0])
    if ctx.opset < 10:
        starts, ends = ints(attrs["starts"]), ints(attrs["ends"])
        axes = ints(attrs["axes"]) if "axes" in attrs else None
        steps = None
    else:
        starts = ints(ctx.constant(node, 1, "starts").ravel())
        ends = ints(ctx.constant(node, 2, "ends").ravel())
        a = ctx.constant(node, 3, "axes")
        s = ctx.constant(node, 4, "steps")
        axes = None if a is None else ints(a.ravel())
        steps = None if s is None else ints(s.ravel())
    big = 2**62  # ONNX uses INT64_MAX-like sentinels for "to the end"
    clamp = lambda v: tuple(max(min(i, big), -big) for i in v)  # noqa: E731
    return [emit(ctx, node, "slice", x, starts=clamp(starts), ends=clamp(ends), axes=axes, steps=steps)]


@converter("Pad")
def _pad(ctx, node, attrs):
    x = ctx.value(node.input[0])
    mode = text(attrs, "mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise UnsupportedOnnxError(f"{node_label(node, ctx.opset)}: pad mode {mode!r} is not supported")
    if ctx.opset < 11:
        pads, value = ints(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = ints(ctx.constant(node, 1, "pads").ravel())
        v = ctx.constant(node, 2, "constant_value")
        value = 0.0 if v is None else float(v.item())
        axes_arr = ctx.constant(node, 3, "axes")
        if axes_arr is not None:
            r = x.type.rank
            axes = [a % r for a in axes_arr.ravel()]
            full = [0] * (2 * r)
            for i, a in enumerate(axes):
                full[a], full[a + r] = pads[i], pads[i + len(axes)]
            pads = tuple(full)
    return [emit(ctx, node, "pad", x, pads=pads, value=value, mode=mode)]


@converter("Gather", "GatherElements")
def _gather(ctx, node, attrs):
    data, idx = node_inputs(ctx, node)
    op = "gather" if node.op_type == "Gather" else "gather_elements"
    return [emit(ctx, node, op, data, idx, axis=int(attrs.get("axis", 0)))]


@converter("Expand", "Tile")
def _expand_tile(ctx, node, attrs):
    """The second input (the target shape, or the repeats) must be known when compiling."""
    op, what = {"Expand": ("expand", "shape"), "Tile": ("tile", "repeats")}[node.op_type]
    values = ints(ctx.constant(node, 1, what).ravel())
    return [emit(ctx, node, op, ctx.value(node.input[0]), **{what: values})]


@converter("Split")
def _split(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axis = int(attrs.get("axis", 0)) % x.type.rank
    dim = x.type.shape[axis]
    sizes = ctx.constant(node, 1, "split") if ctx.opset >= 13 else attrs.get("split")
    if sizes is None or len(sizes) == 0:
        parts = int(attrs.get("num_outputs", len(node.output)))
        chunk = -(-dim // parts)
        sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    outs, start = [], 0
    for name, size in zip(node.output, ints(np.asarray(sizes).ravel())):
        outs.append(ctx.b.slice(x, starts=(start,), ends=(start + size,), axes=(axis,), name=name))
        start += size
    return outs


@converter("DepthToSpace", "SpaceToDepth")
def _depth_space(ctx, node, attrs):
    x = ctx.value(node.input[0])
    n, c, h, w = x.type.shape
    bs = int(attrs["blocksize"])
    b = ctx.b
    mode = text(attrs, "mode", "DCR")
    if node.op_type == "SpaceToDepth":
        t = b.reshape(x, shape=(n, c, h // bs, bs, w // bs, bs))
        t = b.transpose(t, perm=(0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4))
        return [b.reshape(t, shape=(n, c * bs * bs, h // bs, w // bs), name=node.output[0])]
    if mode == "DCR":
        t = b.transpose(b.reshape(x, shape=(n, bs, bs, c // (bs * bs), h, w)), perm=(0, 3, 4, 1, 5, 2))
    else:
        t = b.transpose(b.reshape(x, shape=(n, c // (bs * bs), bs, bs, h, w)), perm=(0, 1, 4, 2, 5, 3))
    return [b.reshape(t, shape=(n, c // (bs * bs), h * bs, w * bs), name=node.output[0])]


@converter("Size")
def _size(ctx, node, attrs):
    name = node.input[0]
    shape = ctx.constants[name].shape if name in ctx.constants else ctx.value(name).type.shape
    return np.array(int(np.prod(shape)), dtype=np.int64)


@converter("ConstantOfShape")
def _constant_of_shape(ctx, node, attrs):
    shape = ints(ctx.constant(node, 0, "shape").ravel())
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return np.full(shape, value.ravel()[0], dtype=value.dtype)


@converter("Range")
def _range(ctx, node, attrs):
    start, limit, delta = (ctx.constant(node, i, what) for i, what in enumerate(("start", "limit", "delta")))
    return np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)


@converter("CumSum")
def _cumsum(ctx, node, attrs):
    axis = int(ctx.constant(node, 1, "axis").item())
    return [
        emit(
            ctx,
            node,
            "cumsum",
            ctx.value(node.input[0]),
            axis=axis,
            exclusive=bool(attrs.get("exclusive", 0)),
            reverse=bool(attrs.get("reverse", 0)),
        )
    ]


@converter("Shape")
def _shape(ctx, node, attrs):
    x = ctx.value(node.input[0]) if node.input[0] not in ctx.constants else None
    shape = x.type.shape if x is not None else ctx.constants[node.input[0]].shape
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return np.array(shape[start : None if end is None else int(end)], dtype=np.int64)
