"""One converter per ONNX op type: (context, node, attributes) → Kiln values.

A converter returns the node's output values in order, or a numpy array when the
node is a constant (Constant), which the importer keeps as a known value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from frontends.onnx.importer import Context, OnnxImportError, UnsupportedOnnxError, _ints, _where
from ir.graph import Value
from ir.ops import make_op

Converter = Callable[[Context, onnx.NodeProto, dict], "list[Value] | np.ndarray"]
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str):
    def wrap(fn: Converter) -> Converter:
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return wrap


def _ins(ctx: Context, node: onnx.NodeProto) -> list[Value]:
    return [ctx.value(n) for n in node.input if n]


def _op(ctx: Context, node: onnx.NodeProto, op: str, *inputs: Value, **attrs) -> Value:
    return ctx.b.op(op, *inputs, name=node.output[0], **attrs)


# --------------------------------------------------------------------------- elementwise

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
    ins = _ins(ctx, node)
    if node.op_type == "Pow" and ins[1].type.dtype != ins[0].type.dtype:
        ins[1] = ctx.b.cast(ins[1], to=ins[0].type.dtype)  # Pow's exponent may have its own type
    return [_op(ctx, node, _SIMPLE[node.op_type], *ins)]


@converter("Max", "Min")
def _variadic_minmax(ctx, node, attrs):
    xs = _ins(ctx, node)
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
    return [_op(ctx, node, op, *_ins(ctx, node), **kwargs)]


@converter("Sum", "Mean")
def _sum_mean(ctx, node, attrs):
    xs = _ins(ctx, node)
    acc = xs[0]
    for x in xs[1:]:
        acc = ctx.b.add(acc, x, name=node.output[0])
    if node.op_type == "Mean" and len(xs) > 1:
        n = ctx.b.param("count", np.array(len(xs), dtype=acc.type.np_dtype))
        acc = ctx.b.div(acc, n, name=node.output[0])
    return [acc]


@converter("LeakyRelu")
def _leaky(ctx, node, attrs):
    return [_op(ctx, node, "leaky_relu", *_ins(ctx, node), alpha=float(attrs.get("alpha", 0.01)))]


@converter("Elu")
def _elu(ctx, node, attrs):
    return [_op(ctx, node, "elu", *_ins(ctx, node), alpha=float(attrs.get("alpha", 1.0)))]


@converter("Gelu")
def _gelu(ctx, node, attrs):
    approximate = attrs.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return [_op(ctx, node, "gelu", *_ins(ctx, node), approximate=approximate)]


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
            _op(
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
    from frontends.onnx.importer import ONNX_DTYPES

    to = attrs["to"]
    if to not in ONNX_DTYPES:
        raise UnsupportedOnnxError(
            f"{_where(node, ctx.opset)}: cast to {onnx.TensorProto.DataType.Name(to)} is not supported"
        )
    return [_op(ctx, node, "cast", ctx.value(node.input[0]), to=ONNX_DTYPES[to])]


@converter("CastLike")
def _cast_like(ctx, node, attrs):
    """Only `like`'s dtype matters: a constant cast like a computed value is a constant."""
    like = ctx.constants.get(node.input[1])
    dtype = like.dtype.name if like is not None else ctx.value(node.input[1]).type.dtype
    if node.input[0] in ctx.constants:
        return ctx.constants[node.input[0]].astype(dtype)
    return [_op(ctx, node, "cast", ctx.value(node.input[0]), to=dtype)]


@converter("Mod")
def _mod(ctx, node, attrs):
    return [_op(ctx, node, "mod", *_ins(ctx, node), fmod=bool(attrs.get("fmod", 0)))]


@converter("Trilu")
def _trilu(ctx, node, attrs):
    k = ctx.constant(node, 1, "k")
    return [
        _op(
            ctx,
            node,
            "trilu",
            ctx.value(node.input[0]),
            upper=bool(attrs.get("upper", 1)),
            k=0 if k is None else int(k.item()),
        )
    ]


@converter("RMSNormalization")
def _rms_norm(ctx, node, attrs):
    """x / sqrt(mean(x², axes axis..end) + eps) * scale, in ops row fusion joins."""
    x, scale = _ins(ctx, node)[:2]
    b = ctx.b
    axis = int(attrs.get("axis", -1)) % x.type.rank
    rows = b.reshape(x, shape=(*x.type.shape[:axis], -1))
    eps = b.param("epsilon", np.array(attrs.get("epsilon", 1e-5), x.type.np_dtype))
    y = b.mul(rows, b.rsqrt(b.add(b.reduce_mean(b.mul(rows, rows), axes=(-1,)), eps)))
    return [b.mul(b.reshape(y, shape=x.type.shape), scale, name=node.output[0])]


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
            f"{_where(node, ctx.opset)}: training-mode dropout (a random mask) is not supported"
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
    raise UnsupportedOnnxError(f"{_where(node, ctx.opset)}: constant attribute {sorted(attrs)} not supported")


# --------------------------------------------------------------------------- contractions


@converter("MatMul")
def _matmul(ctx, node, attrs):
    return [_op(ctx, node, "matmul", *_ins(ctx, node))]


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
    y = _op(ctx, node, "linear", a, bmat, *bias)
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
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return _ints(attrs.get("pads", (0, 0, 0, 0)))
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
    raise OnnxImportError(f"{_where(node, ctx.opset)}: unknown auto_pad {auto!r}")


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
        lifted.output[0] = f"{node.output[0]}.as2d"
        ones = {"kernel_shape": 1, "strides": 1, "dilations": 1, "output_shape": 1, "output_padding": 0}
        attrs2d = {
            k: ([ones[k], *v] if k in ones else [0, v[0], 0, v[1]] if k == "pads" else v)
            for k, v in attrs.items()
        }
        (y,) = convert(ctx, lifted, attrs2d)[:1]
        return [ctx.b.reshape(y, shape=y.type.shape[:2] + y.type.shape[3:], name=node.output[0])]

    return wrapped


def _check_2d(ctx, node, x: Value) -> None:
    if x.type.rank != 4:
        raise UnsupportedOnnxError(
            f"{_where(node, ctx.opset)}: only 2-D (NCHW) inputs are supported, got rank {x.type.rank}"
        )


def _conv_window(ctx, node, attrs):
    """A Conv/ConvTranspose node's inputs, checked 2-D, and its kernel, strides, dilations."""
    ins = _ins(ctx, node)
    _check_2d(ctx, node, ins[0])
    strides = _ints(attrs.get("strides", (1, 1)))
    dilations = _ints(attrs.get("dilations", (1, 1)))
    return ins, ins[1].type.shape[2:], strides, dilations


@converter("Conv")
@_as_2d
def _conv(ctx, node, attrs):
    ins, kernel, strides, dilations = _conv_window(ctx, node, attrs)
    x = ins[0]
    pads = _pads(node, attrs, ctx, x.type.shape[2:], kernel, strides, dilations)
    return [
        _op(
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
    extra = list(_ints(attrs.get("output_padding", (0, 0))))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(_ints(attrs.get("pads", (0, 0, 0, 0))))
    wanted = _ints(attrs["output_shape"])[-2:] if "output_shape" in attrs else None
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
        _op(
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
    kernel = _ints(attrs["kernel_shape"])
    strides = _ints(attrs.get("strides", (1,) * len(kernel)))
    dilations = _ints(attrs.get("dilations", (1,) * len(kernel)))
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
    outs = [_op(ctx, node, "max_pool2d", x, **window)]
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
    return [_op(ctx, node, "avg_pool2d", x, count_include_pad=include, uncounted_end=uncounted, **window)]


@converter("GlobalAveragePool")
def _gap(ctx, node, attrs):
    x = ctx.value(node.input[0])
    _check_2d(ctx, node, x)
    return [_op(ctx, node, "global_avg_pool2d", x)]


@converter("BatchNormalization")
def _batchnorm(ctx, node, attrs):
    epsilon = float(attrs.get("epsilon", 1e-5))
    if not attrs.get("training_mode", 0) and len([o for o in node.output if o]) == 1:
        return [_op(ctx, node, "batch_norm", *_ins(ctx, node), epsilon=epsilon)]
    if ctx.opset < 14:
        raise UnsupportedOnnxError(f"{_where(node, ctx.opset)}: training-mode batch norm before opset 14")
    # training mode: normalize with the batch's statistics, and update the running ones
    b = ctx.b
    x, scale, bias, running_mean, running_var = _ins(ctx, node)
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


@converter("LayerNormalization")
def _layernorm(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axis = int(attrs.get("axis", -1))
    epsilon = float(attrs.get("epsilon", 1e-5))
    y = _op(ctx, node, "layer_norm", *_ins(ctx, node), axis=axis, epsilon=epsilon)
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


@converter("Softmax", "LogSoftmax")
def _softmax(ctx, node, attrs):
    """Opset 13 normalizes along one axis; older opsets over all axes from `axis` on."""
    x = ctx.value(node.input[0])
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    if ctx.opset >= 13:
        return [_op(ctx, node, op, x, axis=int(attrs.get("axis", -1)))]
    axis = int(attrs.get("axis", 1)) % max(x.type.rank, 1)
    flat = ctx.b.flatten(x, axis=axis)
    y = ctx.b.op(op, flat, axis=-1)
    return [_op(ctx, node, "reshape", y, shape=x.type.shape)]


# --------------------------------------------------------------------------- reductions


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
        return None if axes_arr is None or axes_arr.size == 0 else _ints(axes_arr.ravel())
    return _ints(attrs["axes"]) if "axes" in attrs else None


@converter(*_REDUCE_OPS, *_COMPOSED_REDUCTIONS)
def _reduce(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _reduce_axes(ctx, node, attrs)
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return [x]
    keep = bool(attrs.get("keepdims", 1))
    b, out = ctx.b, node.output[0]
    if node.op_type in _REDUCE_OPS:
        return [_op(ctx, node, _REDUCE_OPS[node.op_type], x, axes=axes, keepdims=keep)]
    if node.op_type == "ReduceL1":
        return [b.reduce_sum(b.abs(x), axes=axes, keepdims=keep, name=out)]
    if node.op_type == "ReduceSumSquare":
        return [b.reduce_sum(b.mul(x, x), axes=axes, keepdims=keep, name=out)]
    if node.op_type == "ReduceL2":
        return [b.sqrt(b.reduce_sum(b.mul(x, x), axes=axes, keepdims=keep), name=out)]
    if node.op_type == "ReduceLogSum":
        return [b.log(b.reduce_sum(x, axes=axes, keepdims=keep), name=out)]
    # ReduceLogSumExp, stable: max + log(sum(exp(x - max)))
    m = b.reduce_max(x, axes=axes, keepdims=True)
    m_finite = b.where(b.isinf(m), b.param("zero", np.zeros((), x.type.np_dtype)), m)
    lse = b.add(b.log(b.reduce_sum(b.exp(b.sub(x, m_finite)), axes=axes, keepdims=True)), m_finite)
    shape = make_op("reduce_sum", axes=axes, keepdims=keep).infer(x.type).shape  # no node just for a shape
    return [b.reshape(lse, shape=shape, name=out)]


@converter("Einsum")
def _einsum(ctx, node, attrs):
    """Two-operand contractions become one batched matmul between transposes; other
    equations (diagonals, traces, three operands) the generic einsum op."""
    from ir.ops.einsum import as_matmul, normalize_equation

    xs = _ins(ctx, node)
    equation = attrs["equation"]
    equation = normalize_equation(
        equation.decode() if isinstance(equation, bytes) else equation, [x.type.rank for x in xs]
    )
    plan = as_matmul(equation, [x.type.shape for x in xs])
    if plan is None or xs[0].type.dtype not in ("float32", "float64"):
        return [_op(ctx, node, "einsum", *xs, equation=equation)]
    b = ctx.b
    a = b.reshape(b.transpose(xs[0], perm=plan["perm_a"]), shape=plan["shape_a"])
    c = b.reshape(b.transpose(xs[1], perm=plan["perm_b"]), shape=plan["shape_b"])
    y = b.reshape(b.matmul(a, c), shape=plan["unflat"])
    return [b.transpose(y, perm=plan["perm_out"], name=node.output[0])]


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


@converter("ArgMax", "ArgMin")
def _arg(ctx, node, attrs):
    return [
        _op(
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


@converter("LpNormalization")
def _lp_normalization(ctx, node, attrs):
    x = ctx.value(node.input[0])
    b = ctx.b
    axis, p = int(attrs.get("axis", -1)), int(attrs.get("p", 2))
    if p not in (1, 2):
        raise UnsupportedOnnxError(f"{_where(node, ctx.opset)}: p={p} (only 1 and 2 exist)")
    norm = b.reduce_sum(b.abs(x), axes=(axis,)) if p == 1 else b.sqrt(b.reduce_sum(b.mul(x, x), axes=(axis,)))
    zero = b.param("zero", np.zeros((), x.type.np_dtype))
    safe = b.where(b.equal(norm, zero), b.param("one", np.ones((), x.type.np_dtype)), norm)
    return [b.where(b.equal(norm, zero), zero, b.div(x, safe), name=node.output[0])]


@converter("GlobalMaxPool")
def _global_max(ctx, node, attrs):
    x = ctx.value(node.input[0])
    return [_op(ctx, node, "reduce_max", x, axes=tuple(range(2, x.type.rank)), keepdims=True)]


@converter("InstanceNormalization")
def _instance_norm(ctx, node, attrs):
    """Per (image, channel) normalization over the spatial axes, written with the ops
    row fusion makes one kernel of."""
    x, scale, bias = _ins(ctx, node)
    b = ctx.b
    n, c = x.type.shape[:2]
    rows = b.reshape(x, shape=(n, c, -1))
    d = b.sub(rows, b.reduce_mean(rows, axes=(-1,)))
    var = b.reduce_mean(b.mul(d, d), axes=(-1,))
    eps = b.param("epsilon", np.array(attrs.get("epsilon", 1e-5), x.type.np_dtype))
    y = b.mul(d, b.rsqrt(b.add(var, eps)))
    y = b.add(b.mul(y, b.reshape(scale, shape=(c, 1))), b.reshape(bias, shape=(c, 1)))
    return [b.reshape(y, shape=x.type.shape, name=node.output[0])]


# --------------------------------------------------------------------------- shapes


@converter("Flatten")
def _flatten(ctx, node, attrs):
    return [_op(ctx, node, "flatten", ctx.value(node.input[0]), axis=int(attrs.get("axis", 1)))]


@converter("Reshape")
def _reshape(ctx, node, attrs):
    x = ctx.value(node.input[0])
    shape = [int(d) for d in ctx.constant(node, 1, "shape").ravel()]
    if not attrs.get("allowzero", 0):
        shape = [x.type.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [_op(ctx, node, "reshape", x, shape=tuple(shape))]


def _axes_arg(ctx, node, attrs, pos: int) -> tuple[int, ...]:
    if ctx.opset >= 13:
        arr = ctx.constant(node, pos, "axes")
        return () if arr is None else _ints(arr.ravel())
    return _ints(attrs.get("axes", ()))


@converter("Unsqueeze")
def _unsqueeze(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _axes_arg(ctx, node, attrs, 1)
    rank = x.type.rank + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(x.type.shape)
    for a in axes:
        shape.insert(a, 1)
    return [_op(ctx, node, "reshape", x, shape=tuple(shape))]


@converter("Squeeze")
def _squeeze(ctx, node, attrs):
    x = ctx.value(node.input[0])
    axes = _axes_arg(ctx, node, attrs, 1)
    drop = {a % x.type.rank for a in axes} if axes else {i for i, d in enumerate(x.type.shape) if d == 1}
    bad = [a for a in drop if x.type.shape[a] != 1]
    if bad:
        raise OnnxImportError(f"{_where(node, ctx.opset)}: cannot squeeze axes {bad} of shape {x.type.shape}")
    shape = tuple(d for i, d in enumerate(x.type.shape) if i not in drop)
    return [_op(ctx, node, "reshape", x, shape=shape)]


@converter("Transpose")
def _transpose(ctx, node, attrs):
    perm = _ints(attrs["perm"]) if "perm" in attrs else None
    return [_op(ctx, node, "transpose", ctx.value(node.input[0]), perm=perm)]


@converter("Concat")
def _concat(ctx, node, attrs):
    return [_op(ctx, node, "concat", *_ins(ctx, node), axis=int(attrs["axis"]))]


@converter("Slice")
def _slice(ctx, node, attrs):
    x = ctx.value(node.input[0])
    if ctx.opset < 10:
        starts, ends = _ints(attrs["starts"]), _ints(attrs["ends"])
        axes = _ints(attrs["axes"]) if "axes" in attrs else None
        steps = None
    else:
        starts = _ints(ctx.constant(node, 1, "starts").ravel())
        ends = _ints(ctx.constant(node, 2, "ends").ravel())
        a = ctx.constant(node, 3, "axes")
        s = ctx.constant(node, 4, "steps")
        axes = None if a is None else _ints(a.ravel())
        steps = None if s is None else _ints(s.ravel())
    big = 2**62  # ONNX uses INT64_MAX-like sentinels for "to the end"
    clamp = lambda v: tuple(max(min(i, big), -big) for i in v)  # noqa: E731
    return [_op(ctx, node, "slice", x, starts=clamp(starts), ends=clamp(ends), axes=axes, steps=steps)]


@converter("Pad")
def _pad(ctx, node, attrs):
    x = ctx.value(node.input[0])
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise UnsupportedOnnxError(f"{_where(node, ctx.opset)}: pad mode {mode!r} is not supported")
    if ctx.opset < 11:
        pads, value = _ints(attrs["pads"]), float(attrs.get("value", 0.0))
    else:
        pads = _ints(ctx.constant(node, 1, "pads").ravel())
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
    return [_op(ctx, node, "pad", x, pads=pads, value=value, mode=mode)]


@converter("Gather", "GatherElements")
def _gather(ctx, node, attrs):
    data, idx = _ins(ctx, node)
    op = "gather" if node.op_type == "Gather" else "gather_elements"
    return [_op(ctx, node, op, data, idx, axis=int(attrs.get("axis", 0)))]


@converter("Expand", "Tile")
def _expand_tile(ctx, node, attrs):
    """The second input (the target shape, or the repeats) must be known when compiling."""
    op, what = {"Expand": ("expand", "shape"), "Tile": ("tile", "repeats")}[node.op_type]
    values = _ints(ctx.constant(node, 1, what).ravel())
    return [_op(ctx, node, op, ctx.value(node.input[0]), **{what: values})]


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
    for name, size in zip(node.output, _ints(np.asarray(sizes).ravel())):
        outs.append(ctx.b.slice(x, starts=(start,), ends=(start + size,), axes=(axis,), name=name))
        start += size
    return outs


@converter("DepthToSpace", "SpaceToDepth")
def _depth_space(ctx, node, attrs):
    x = ctx.value(node.input[0])
    n, c, h, w = x.type.shape
    bs = int(attrs["blocksize"])
    b = ctx.b
    mode = attrs.get("mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
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
    shape = _ints(ctx.constant(node, 0, "shape").ravel())
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
        _op(
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


# RNN/GRU/LSTM and Resize register their converters in modules of their own
from frontends.onnx import recurrent, resize  # noqa: E402,F401
