"""Converters of the ONNX ops that become the contractions and CNN layers of ir/ops/nn.py:
MatMul, Gemm, Conv, ConvTranspose, the pools, BatchNormalization, LRN."""

from __future__ import annotations

import numpy as np
import onnx

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
from ir.graph import Value


@converter("MatMul")
def _matmul(ctx, node, attrs):
    return [emit(ctx, node, "matmul", *node_inputs(ctx, node))]


@converter("Gemm")
def _gemm(ctx, node, attrs):
    """alpha * A' @ B' + beta * C; a constant B is transposed and scaled once, here."""
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    a = ctx.value(node.input[0])
    if attrs.get("transA", 0):
        a = ctx.b.transpose(a, perm=(1, 0))
    if node.input[1] in ctx.constants:
        w = ctx.constants[node.input[1]]
        w = w.T if attrs.get("transB", 0) else w
        bmat = ctx.b.param(node.input[1], np.ascontiguousarray(w * np.float32(alpha) if alpha != 1 else w))
        alpha = 1.0
    else:
        bmat = ctx.value(node.input[1])
        if attrs.get("transB", 0):
            bmat = ctx.b.transpose(bmat, perm=(1, 0))
    n = bmat.type.shape[-1]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = []
    if c_name in ctx.constants and alpha == 1.0:
        cc = ctx.constants[c_name]
        if cc.shape in ((), (1,), (n,), (1, n)):
            scaled = np.broadcast_to(cc.reshape(-1) * cc.dtype.type(beta), (n,))
            bias = [ctx.b.param(c_name, np.ascontiguousarray(scaled))]
            c_name = None
    y = emit(ctx, node, "linear", a, bmat, *bias)
    if alpha != 1.0:
        y = ctx.b.mul(y, ctx.b.param("alpha", np.array(alpha, np.float32)), name=node.output[0])
    if c_name is not None and beta != 0.0:
        cv = ctx.value(c_name)
        if beta != 1.0:
            cv = ctx.b.mul(cv, ctx.b.param("beta", np.array(beta, np.float32)))
        y = ctx.b.add(y, cv, name=node.output[0])
    return [y]


def _pads(
    node,
    attrs,
    ctx,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[int, ...]:
    """ONNX pads (begins, then ends) for 2-D, resolving auto_pad."""
    auto = text(attrs, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return ints(attrs.get("pads", (0, 0, 0, 0)))
    if auto == "VALID":
        return (0, 0, 0, 0)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        return tuple(begins + ends)
    raise OnnxImportError(f"{node_label(node, ctx.opset)}: unknown auto_pad {auto!r}")


def _as_2d(convert):
    """Let a 2-D (NCHW) converter take 1-D (NCW) nodes: the input (and a Conv's weights)
    are viewed with a height of 1, the window attributes get a first axis of size 1,
    and the result is viewed back without it."""

    def wrapped(ctx, node, attrs):
        x = ctx.value(node.input[0])
        if x.type.rank != 3:
            return convert(ctx, node, attrs)
        lifted = onnx.NodeProto()
        lifted.CopyFrom(node)
        for pos in range(min(2, len(node.input))):
            name = node.input[pos]
            if not name or (pos == 1 and node.op_type not in ("Conv", "ConvTranspose")):
                continue
            new = f"{name}.as2d"
            if name in ctx.constants:
                a = ctx.constants[name]
                ctx.constants[new] = a.reshape(a.shape[:2] + (1,) + a.shape[2:])
            else:
                v = ctx.value(name)
                ctx.values[new] = ctx.b.reshape(v, shape=v.type.shape[:2] + (1,) + v.type.shape[2:])
            lifted.input[pos] = new
        named = [name for name in node.output if name]  # a MaxPool's Indices too
        for pos, name in enumerate(node.output):
            if name:
                lifted.output[pos] = f"{name}.as2d"
        ones = {"kernel_shape": 1, "strides": 1, "dilations": 1, "output_shape": 1, "output_padding": 0}
        attrs2d = {
            k: ([ones[k], *v] if k in ones else [0, v[0], 0, v[1]] if k == "pads" else v)
            for k, v in attrs.items()
        }
        # with a height of 1, a flat index into (N, C, 1, W) is the same number in (N, C, W)
        return [
            ctx.b.reshape(y, shape=y.type.shape[:2] + y.type.shape[3:], name=name)
            for y, name in zip(convert(ctx, lifted, attrs2d), named)
        ]

    return wrapped


def _check_2d(ctx, node, x: Value) -> None:
    if x.type.rank != 4:
        raise UnsupportedOnnxError(
            f"{node_label(node, ctx.opset)}: only 2-D (NCHW) inputs are supported, got rank {x.type.rank}"
        )


def _conv_window(ctx, node, attrs):
    """A Conv/ConvTranspose node's inputs, checked 2-D, and its kernel, strides, dilations."""
    ins = node_inputs(ctx, node)
    _check_2d(ctx, node, ins[0])
    strides = ints(attrs.get("strides", (1, 1)))
    dilations = ints(attrs.get("dilations", (1, 1)))
    return ins, ins[1].type.shape[2:], strides, dilations


@converter("Conv")
@_as_2d
def _conv(ctx, node, attrs):
    ins, kernel, strides, dilations = _conv_window(ctx, node, attrs)
    x = ins[0]
    pads = _pads(node, attrs, ctx, x.type.shape[2:], kernel, strides, dilations)
    return [
        emit(
            ctx,
            node,
            "conv2d",
            *ins,
            strides=strides,
            dilations=dilations,
            pads=pads,
            groups=int(attrs.get("group", 1)),
        )
    ]


@converter("ConvTranspose")
@_as_2d
def _conv_transpose(ctx, node, attrs):
    ins, kernel, strides, dilations = _conv_window(ctx, node, attrs)
    x = ins[0]
    extra = list(ints(attrs.get("output_padding", (0, 0))))
    auto = text(attrs, "auto_pad", "NOTSET")
    pads = list(ints(attrs.get("pads", (0, 0, 0, 0))))
    wanted = ints(attrs["output_shape"])[-2:] if "output_shape" in attrs else None
    if wanted is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = tuple(size * s for size, s in zip(x.type.shape[2:], strides))
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    if wanted is not None:  # the pads that give this output size, split as the spec says
        for a, (size, k, s, d) in enumerate(zip(x.type.shape[2:], kernel, strides, dilations)):
            total = s * (size - 1) + extra[a] + d * (k - 1) + 1 - wanted[a]
            if total < 0:  # a bigger output than the windows cover: the rest is output padding
                extra[a] -= total
                total = 0
            small, big = total // 2, total - total // 2
            pads[a], pads[a + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return [
        emit(
            ctx,
            node,
            "conv_transpose2d",
            *ins,
            strides=strides,
            dilations=dilations,
            pads=tuple(pads),
            output_padding=tuple(extra),
            groups=int(attrs.get("group", 1)),
        )
    ]


def _pool_attrs(ctx, node, attrs, x: Value) -> dict:
    """The window attributes; ceil_mode becomes extra end padding (returned apart too,
    under "ceil_extra", for an average pool, whose divisor never counts it)."""
    _check_2d(ctx, node, x)
    kernel = ints(attrs["kernel_shape"])
    strides = ints(attrs.get("strides", (1,) * len(kernel)))
    dilations = ints(attrs.get("dilations", (1,) * len(kernel)))
    pads = list(_pads(node, attrs, ctx, x.type.shape[2:], kernel, strides, dilations))
    ceil_extra = [0, 0]
    if attrs.get("ceil_mode", 0):
        # ceil rounding = extra end padding that the last window may reach into
        for a, size in enumerate(x.type.shape[2:]):
            span = dilations[a] * (kernel[a] - 1) + 1
            total = size + pads[a] + pads[a + 2] - span
            extra = (-total) % strides[a]
            if (total + extra) // strides[a] * strides[a] >= size + pads[a]:
                extra = 0  # the last window would start in the padding: ONNX drops it
            pads[a + 2] += extra
            ceil_extra[a] = extra
    return dict(
        kernel=kernel, strides=strides, dilations=dilations, pads=tuple(pads), ceil_extra=tuple(ceil_extra)
    )


@converter("MaxPool")
@_as_2d
def _maxpool(ctx, node, attrs):
    x = ctx.value(node.input[0])
    window = _pool_attrs(ctx, node, attrs, x)
    del window["ceil_extra"]
    outs = [emit(ctx, node, "max_pool2d", x, **window)]
    if len(node.output) > 1 and node.output[1]:  # Indices: the same windows, another node
        order = int(attrs.get("storage_order", 0))
        outs.append(
            ctx.b.op("max_pool2d", x, name=node.output[1], output="indices", storage_order=order, **window)
        )
    return outs


@converter("AveragePool")
@_as_2d
def _avgpool(ctx, node, attrs):
    x = ctx.value(node.input[0])
    window = _pool_attrs(ctx, node, attrs, x)
    uncounted = window.pop("ceil_extra")
    include = bool(attrs.get("count_include_pad", 0))
    return [emit(ctx, node, "avg_pool2d", x, count_include_pad=include, uncounted_end=uncounted, **window)]


@converter("GlobalAveragePool")
def _gap(ctx, node, attrs):
    x = ctx.value(node.input[0])
    _check_2d(ctx, node, x)
    return [emit(ctx, node, "global_avg_pool2d", x)]


@converter("BatchNormalization")
def _batchnorm(ctx, node, attrs):
    epsilon = float(attrs.get("epsilon", 1e-5))
    if not attrs.get("training_mode", 0) and len([o for o in node.output if o]) == 1:
        return [emit(ctx, node, "batch_norm", *node_inputs(ctx, node), epsilon=epsilon)]
    if ctx.opset < 14:
        raise UnsupportedOnnxError(f"{node_label(node, ctx.opset)}: training-mode batch norm before opset 14")
    # training mode: normalize with the batch's statistics, and update the running ones
    b = ctx.b
    x, scale, bias, running_mean, running_var = node_inputs(ctx, node)
    rank = x.type.rank
    axes = (0, *range(2, rank))
    channel = (1, -1) + (1,) * (rank - 2)
    mean = b.reduce_mean(x, axes=axes, keepdims=False)
    centered = b.sub(x, b.reshape(mean, shape=channel))
    var = b.reduce_mean(b.mul(centered, centered), axes=axes, keepdims=False)
    dtype = x.type.np_dtype
    eps = b.param("epsilon", np.array(epsilon, dtype))
    normalized = b.mul(centered, b.reshape(b.rsqrt(b.add(var, eps)), shape=channel))
    y = b.add(b.mul(normalized, b.reshape(scale, shape=channel)), b.reshape(bias, shape=channel))
    momentum = float(attrs.get("momentum", 0.9))
    keep, take = (
        b.param("momentum", np.array(momentum, dtype)),
        b.param("1-momentum", np.array(1 - momentum, dtype)),
    )
    new_mean = b.add(b.mul(running_mean, keep), b.mul(mean, take))
    new_var = b.add(b.mul(running_var, keep), b.mul(var, take))
    return [y, new_mean, new_var][: len(node.output)]


@converter("LRN")
def _lrn(ctx, node, attrs):
    """x / (bias + alpha * mean of x² over a window of `size` channels) ** beta: the window
    mean is an average pool over the channel axis (zeros outside, counted)."""
    x = ctx.value(node.input[0])
    b = ctx.b
    n, c = x.type.shape[:2]
    size = int(attrs["size"])
    alpha, beta, bias = (float(attrs.get(k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    sq = b.reshape(b.mul(x, x), shape=(n, 1, c, -1))
    mean = b.avg_pool2d(
        sq, kernel=(size, 1), strides=(1, 1), count_include_pad=True, pads=((size - 1) // 2, 0, size // 2, 0)
    )
    const = lambda v: b.param("lrn", np.array(v, x.type.np_dtype))  # noqa: E731
    scale = b.pow(b.add(b.mul(mean, const(alpha)), const(bias)), const(beta))
    return [b.div(x, b.reshape(scale, shape=x.type.shape), name=node.output[0])]
