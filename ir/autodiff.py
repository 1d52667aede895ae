"""Reverse-mode automatic differentiation on the graph IR.

`gradients(b, loss, wrt)` appends to the GraphBuilder `b` the nodes that compute
d loss / d v for each v in `wrt`, and returns those values. Each op's rule is a
function (builder, node, output gradient) → one gradient per input (None where the
input is not differentiable: indices, masks); the rules are written with ordinary
graph ops, so the backward pass is fused, memory-planned and compiled like any graph.

Every rule is tested against central finite differences of the float64 interpreter
(tests/test_autodiff.py). An op without a rule on the path from `wrt` to the loss is
an error naming the node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ir.builder import GraphBuilder
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import normalize_axis

Grads = list[Value | None]
Rule = Callable[[GraphBuilder, Node, Value], Grads]
RULES: dict[str, Rule] = {}


def rule(*op_names: str):
    def wrap(fn: Rule) -> Rule:
        for name in op_names:
            RULES[name] = fn
        return fn

    return wrap


def _scalar(b: GraphBuilder, value: float, like: Value) -> Value:
    return b.param("k", np.array(value, like.type.np_dtype))


def unbroadcast(b: GraphBuilder, g: Value, shape: tuple[int, ...]) -> Value:
    """The gradient of a value broadcast to g's shape: g summed over the broadcast axes."""
    if g.type.shape == shape:
        return g
    lead = g.type.rank - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.type.shape[lead + i] != 1
    )
    summed = b.reduce_sum(g, axes=axes, keepdims=False) if axes else g
    return b.reshape(summed, shape=shape)


@rule("add")
def _add(b, node, g):
    return [unbroadcast(b, g, v.type.shape) for v in node.inputs]


@rule("sub")
def _sub(b, node, g):
    x, y = node.inputs
    return [unbroadcast(b, g, x.type.shape), unbroadcast(b, b.neg(g), y.type.shape)]


@rule("mul")
def _mul(b, node, g):
    x, y = node.inputs
    return [unbroadcast(b, b.mul(g, y), x.type.shape), unbroadcast(b, b.mul(g, x), y.type.shape)]


@rule("div")
def _div(b, node, g):
    x, y = node.inputs
    gx = b.div(g, y)
    gy = b.neg(b.mul(gx, node.outputs[0]))  # -g x / y² = -(g / y) · (x / y)
    return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gy, y.type.shape)]


@rule("neg")
def _neg(b, node, g):
    return [b.neg(g)]


def _where_positive(b, x: Value, g: Value, strict: bool = True) -> Value:
    zero = _scalar(b, 0.0, g)
    return b.where(b.greater(x, zero) if strict else b.greater_equal(x, zero), g, zero)


@rule("abs")
def _abs(b, node, g):
    x = node.inputs[0]
    zero = _scalar(b, 0.0, g)
    return [b.where(b.greater(x, zero), g, b.where(b.less(x, zero), b.neg(g), zero))]


@rule("relu")
def _relu(b, node, g):
    return [_where_positive(b, node.inputs[0], g)]


@rule("leaky_relu")
def _leaky_relu(b, node, g):
    x = node.inputs[0]
    zero = _scalar(b, 0.0, g)
    return [b.where(b.greater(x, zero), g, b.mul(g, _scalar(b, node.op.alpha, g)))]


@rule("sigmoid")
def _sigmoid(b, node, g):
    y = node.outputs[0]
    return [b.mul(g, b.mul(y, b.sub(_scalar(b, 1.0, y), y)))]


@rule("tanh")
def _tanh(b, node, g):
    y = node.outputs[0]
    return [b.mul(g, b.sub(_scalar(b, 1.0, y), b.mul(y, y)))]


@rule("exp")
def _exp(b, node, g):
    return [b.mul(g, node.outputs[0])]


@rule("log")
def _log(b, node, g):
    return [b.div(g, node.inputs[0])]


@rule("sqrt")
def _sqrt(b, node, g):
    return [b.div(b.mul(g, _scalar(b, 0.5, g)), node.outputs[0])]


@rule("rsqrt")
def _rsqrt(b, node, g):
    y = node.outputs[0]  # d/dx x^(-1/2) = -y³/2
    return [b.mul(g, b.mul(_scalar(b, -0.5, y), b.mul(y, b.mul(y, y))))]


@rule("gelu")
def _gelu(b, node, g):
    """d/dx x·Φ(x) = Φ(x) + x·φ(x) (the erf form; the tanh form is not differentiated)."""
    if node.op.approximate != "none":
        raise GraphError(f"node {node.name}: only the erf form of gelu has a gradient rule")
    x = node.inputs[0]
    cdf = b.mul(_scalar(b, 0.5, x), b.add(_scalar(b, 1.0, x), b.erf(b.mul(x, _scalar(b, 0.5**0.5, x)))))
    pdf = b.mul(_scalar(b, (2 * np.pi) ** -0.5, x), b.exp(b.mul(_scalar(b, -0.5, x), b.mul(x, x))))
    return [b.mul(g, b.add(cdf, b.mul(x, pdf)))]


@rule("elu")
def _elu(b, node, g):
    x, y = node.inputs[0], node.outputs[0]
    zero = _scalar(b, 0.0, g)
    return [b.where(b.greater(x, zero), g, b.mul(g, b.add(y, _scalar(b, node.op.alpha, g))))]


@rule("softplus")
def _softplus(b, node, g):
    return [b.mul(g, b.sigmoid(node.inputs[0]))]


@rule("clip")
def _clip(b, node, g):
    x = node.inputs[0]
    zero = _scalar(b, 0.0, g)
    inside = b.logical_and(
        b.greater_equal(x, _scalar(b, node.op.min, x)), b.less_equal(x, _scalar(b, node.op.max, x))
    )
    return [b.where(inside, g, zero)]


@rule("maximum", "minimum")
def _extremum(b, node, g):
    x, y = node.inputs
    zero = _scalar(b, 0.0, g)
    x_wins = b.greater_equal(x, y) if node.op.name == "maximum" else b.less_equal(x, y)
    return [
        unbroadcast(b, b.where(x_wins, g, zero), x.type.shape),
        unbroadcast(b, b.where(x_wins, zero, g), y.type.shape),
    ]


@rule("where")
def _where(b, node, g):
    cond, x, y = node.inputs
    zero = _scalar(b, 0.0, g)
    return [
        None,
        unbroadcast(b, b.where(cond, g, zero), x.type.shape),
        unbroadcast(b, b.where(cond, zero, g), y.type.shape),
    ]


@rule("softmax")
def _softmax(b, node, g):
    y = node.outputs[0]
    axis = normalize_axis("softmax", node.op.axis, y.type.rank)
    dot = b.reduce_sum(b.mul(g, y), axes=(axis,), keepdims=True)
    return [b.mul(y, b.sub(g, dot))]


@rule("log_softmax")
def _log_softmax(b, node, g):
    y = node.outputs[0]
    axis = normalize_axis("log_softmax", node.op.axis, y.type.rank)
    total = b.reduce_sum(g, axes=(axis,), keepdims=True)
    return [b.sub(g, b.mul(b.exp(y), total))]


def _expand_back(b, g: Value, x: Value, axes: tuple[int, ...] | None, keepdims: bool) -> Value:
    rank = x.type.rank
    axes = tuple(range(rank)) if axes is None else tuple(normalize_axis("reduce", a, rank) for a in axes)
    kept_shape = tuple(1 if i in axes else d for i, d in enumerate(x.type.shape))
    return b.expand(b.reshape(g, shape=kept_shape), shape=x.type.shape)


@rule("reduce_sum")
def _reduce_sum(b, node, g):
    x = node.inputs[0]
    return [_expand_back(b, g, x, node.op.axes, node.op.keepdims)]


@rule("reduce_mean")
def _reduce_mean(b, node, g):
    x = node.inputs[0]
    count = x.type.numel // max(node.outputs[0].type.numel, 1)
    scaled = b.mul(g, _scalar(b, 1.0 / count, g))
    return [_expand_back(b, scaled, x, node.op.axes, node.op.keepdims)]


@rule("reshape", "flatten")
def _reshape(b, node, g):
    return [b.reshape(g, shape=node.inputs[0].type.shape)]


@rule("expand")
def _expand(b, node, g):
    return [unbroadcast(b, g, node.inputs[0].type.shape)]


@rule("transpose")
def _transpose(b, node, g):
    rank = g.type.rank
    perm = node.op.perm if node.op.perm is not None else tuple(reversed(range(rank)))
    return [b.transpose(g, perm=tuple(int(i) for i in np.argsort(perm)))]


@rule("slice")
def _slice(b, node, g):
    """The gradient of a slice is g placed back where it was read, zeros elsewhere."""
    x = node.inputs[0]
    ranges = node.op.ranges(x.type.shape)
    if any(step != 1 for _, step, _ in ranges):
        raise GraphError(f"node {node.name}: the slice gradient supports step 1 only")
    begins = tuple(start for start, _, _ in ranges)
    ends = tuple(d - start - count for d, (start, _, count) in zip(x.type.shape, ranges))
    return [b.pad(g, pads=begins + ends)]


@rule("concat")
def _concat(b, node, g):
    axis = normalize_axis("concat", node.op.axis, g.type.rank)
    grads: Grads = []
    offset = 0
    for v in node.inputs:
        size = v.type.shape[axis]
        grads.append(b.slice(g, starts=(offset,), ends=(offset + size,), axes=(axis,)))
        offset += size
    return grads


@rule("gather")
def _gather(b, node, g):
    data, indices = node.inputs
    if node.op.axis != 0:
        raise GraphError(f"node {node.name}: the gather gradient supports axis 0 only")
    return [b.gather_backward(indices, g, shape=data.type.shape), None]


def _swap_last(b, v: Value) -> Value:
    perm = tuple(range(v.type.rank - 2)) + (v.type.rank - 1, v.type.rank - 2)
    return b.transpose(v, perm=perm)


@rule("matmul")
def _matmul(b, node, g):
    x, y = node.inputs
    if x.type.rank < 2 or y.type.rank < 2:
        raise GraphError(f"node {node.name}: the matmul gradient needs operands of rank >= 2")
    gx = b.matmul(g, _swap_last(b, y))
    gy = b.matmul(_swap_last(b, x), g)
    return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gy, y.type.shape)]


@rule("linear")
def _linear(b, node, g):
    x, w = node.inputs[0], node.inputs[1]
    rows = x.type.numel // x.type.shape[-1]
    gx = b.matmul(g, b.transpose(w, perm=(1, 0)))
    x2 = b.reshape(x, shape=(rows, x.type.shape[-1]))
    g2 = b.reshape(g, shape=(rows, g.type.shape[-1]))
    gw = b.matmul(b.transpose(x2, perm=(1, 0)), g2)
    grads: Grads = [gx, gw]
    if len(node.inputs) > 2:
        grads.append(b.reduce_sum(g2, axes=(0,), keepdims=False))
    return grads


def _weight_gradient(b, windowed: Value, other: Value, kernel, strides, pads, dilations, w_shape) -> Value:
    """A convolution's weight gradient: Σ over images and positions of `windowed`'s
    windows (im2col, read as they lie) times `other` (transposed, the smaller operand),
    as w[other channel, windowed channel, i, j]. For conv2d, windowed = x and other = g;
    for its adjoint conv_transpose2d, the two trade places."""
    n, c = windowed.type.shape[:2]
    o = other.type.shape[1]
    positions = other.type.numel // (n * o)
    cols = b.im2col(windowed, kernel=tuple(kernel), strides=strides, pads=pads, dilations=dilations)
    cols = b.reshape(cols, shape=(n, c * kernel[0] * kernel[1], positions))
    other_t = b.transpose(b.reshape(other, shape=(n, o, positions)), perm=(0, 2, 1))
    summed = b.reduce_sum(b.matmul(cols, other_t), axes=(0,), keepdims=False)  # (c·kh·kw, o)
    return b.reshape(b.transpose(summed, perm=(1, 0)), shape=w_shape)


@rule("conv2d")
def _conv2d(b, node, g):
    """dx: w^T @ g at every position, each product added back where its window read x
    (col2im): one matmul of the weights' shape, at any stride; dw: the forward pass's
    windows (im2col) times g; dbias: g summed over batch and positions."""
    op = node.op
    x, w = node.inputs[0], node.inputs[1]
    if op.groups != 1:
        raise GraphError(f"node {node.name}: the conv2d gradient supports groups=1 only")
    pads = op.pads
    n, o, oh, ow = g.type.shape
    _, c, kh, kw = w.type.shape
    w_t = b.transpose(b.reshape(w, shape=(o, c * kh * kw)), perm=(1, 0))
    cols = b.matmul(w_t, b.reshape(g, shape=(n, o, oh * ow)))
    gx = b.col2im(
        b.reshape(cols, shape=(n, c * kh * kw, oh, ow)),
        input_shape=x.type.shape,
        kernel=(kh, kw),
        strides=op.strides,
        pads=pads,
        dilations=op.dilations,
    )
    gw = _weight_gradient(b, x, g, (kh, kw), op.strides, pads, op.dilations, w.type.shape)
    grads: Grads = [gx, gw]
    if len(node.inputs) > 2:
        grads.append(b.reduce_sum(g, axes=(0, 2, 3), keepdims=False))
    return grads


@rule("conv_transpose2d")
def _conv_transpose2d(b, node, g):
    """The adjoint of conv2d: dx is the conv2d of g with the same weights; dw pairs g's
    windows (im2col with the same geometry) with x, per image, as conv2d's rule does."""
    op = node.op
    x, w = node.inputs[0], node.inputs[1]
    if op.groups != 1:
        raise GraphError(f"node {node.name}: the conv_transpose2d gradient supports groups=1 only")
    gx = b.conv2d(g, w, strides=op.strides, pads=op.pads, dilations=op.dilations)
    gw = _weight_gradient(b, g, x, w.type.shape[2:], op.strides, op.pads, op.dilations, w.type.shape)
    grads: Grads = [gx, gw]
    if len(node.inputs) > 2:
        grads.append(b.reduce_sum(g, axes=(0, 2, 3), keepdims=False))
    return grads


@rule("max_pool2d")
def _max_pool2d(b, node, g):
    op = node.op
    if tuple(op.dilations) != (1, 1) or op.output != "values":
        raise GraphError(f"node {node.name}: the max_pool2d gradient needs dilation 1 and values output")
    x = node.inputs[0]
    if tuple(op.strides) == tuple(op.kernel) and not any(op.pads):  # windows tile x: one fused pass
        return [b.max_pool2d_tiled_backward(x, g, kernel=op.kernel)]
    window = dict(kernel=op.kernel, strides=op.strides, pads=op.pads)
    indices = b.max_pool2d(x, output="indices", **window)
    return [b.max_pool2d_backward(indices, g, input_shape=x.type.shape, **window)]


@rule("avg_pool2d")
def _avg_pool2d(b, node, g):
    op = node.op
    if tuple(op.dilations) != (1, 1) or tuple(op.uncounted_end) != (0, 0):
        raise GraphError(f"node {node.name}: the avg_pool2d gradient needs dilation 1 and no ceil_mode")
    return [
        b.avg_pool2d_backward(
            g,
            input_shape=node.inputs[0].type.shape,
            kernel=op.kernel,
            strides=op.strides,
            pads=op.pads,
            count_include_pad=op.count_include_pad,
        )
    ]


def _k(b, node, v: float) -> Value:
    return _scalar(b, v, node.inputs[0])


@rule("erf")
def _erf(b, node, g):
    x = node.inputs[0]
    return [b.mul(g, b.mul(_k(b, node, 2 / np.sqrt(np.pi)), b.exp(b.neg(b.mul(x, x)))))]


@rule("reciprocal")
def _reciprocal(b, node, g):
    y = node.outputs[0]
    return [b.neg(b.mul(g, b.mul(y, y)))]


@rule("pow")
def _pow(b, node, g):
    """d/da a^e = e·a^(e-1); d/de a^e = a^e·log a (defined for a > 0)."""
    a, e = node.inputs
    y = node.outputs[0]
    ga = b.mul(g, b.mul(e, b.pow(a, b.sub(e, _k(b, node, 1.0)))))
    ge = b.mul(g, b.mul(y, b.log(a)))
    return [unbroadcast(b, ga, a.type.shape), unbroadcast(b, ge, e.type.shape)]


@rule("softsign")
def _softsign(b, node, g):
    d = b.add(_k(b, node, 1.0), b.abs(node.inputs[0]))
    return [b.div(g, b.mul(d, d))]


@rule("selu")
def _selu(b, node, g):
    x, op = node.inputs[0], node.op
    negative = b.mul(_k(b, node, op.gamma * op.alpha), b.exp(x))
    return [b.mul(g, b.where(b.greater(x, _k(b, node, 0.0)), _k(b, node, op.gamma), negative))]


@rule("celu")
def _celu(b, node, g):
    x, alpha = node.inputs[0], node.op.alpha
    negative = b.exp(b.div(x, _k(b, node, alpha)))
    return [b.mul(g, b.where(b.greater(x, _k(b, node, 0.0)), _k(b, node, 1.0), negative))]


@rule("hard_sigmoid")
def _hard_sigmoid(b, node, g):
    x, op = node.inputs[0], node.op
    z = b.add(b.mul(x, _k(b, node, op.alpha)), _k(b, node, op.beta))
    inside = b.logical_and(b.greater(z, _k(b, node, 0.0)), b.less(z, _k(b, node, 1.0)))
    return [b.where(inside, b.mul(g, _k(b, node, op.alpha)), _k(b, node, 0.0))]


@rule("hard_swish")
def _hard_swish(b, node, g):
    """x·clip(x/6 + 1/2, 0, 1): 0 below -3, 1 above 3, (2x + 3)/6 between."""
    x = node.inputs[0]
    middle = b.add(b.mul(x, _k(b, node, 1 / 3)), _k(b, node, 0.5))
    d = b.where(
        b.less(x, _k(b, node, -3.0)),
        _k(b, node, 0.0),
        b.where(b.greater(x, _k(b, node, 3.0)), _k(b, node, 1.0), middle),
    )
    return [b.mul(g, d)]


@rule("mish")
def _mish(b, node, g):
    """x·tanh(softplus(x)): tanh(sp) + x·(1 - tanh²(sp))·sigmoid(x)."""
    x = node.inputs[0]
    t = b.tanh(b.softplus(x))
    d = b.add(t, b.mul(x, b.mul(b.sub(_k(b, node, 1.0), b.mul(t, t)), b.sigmoid(x))))
    return [b.mul(g, d)]


@rule("thresholded_relu")
def _thresholded_relu(b, node, g):
    x = node.inputs[0]
    return [b.where(b.greater(x, _k(b, node, node.op.alpha)), g, _k(b, node, 0.0))]


@rule("prelu")
def _prelu(b, node, g):
    x, slope = node.inputs
    positive = b.greater(x, _k(b, node, 0.0))
    zero = _k(b, node, 0.0)
    gx = b.where(positive, g, b.mul(g, slope))
    gslope = b.where(positive, zero, b.mul(g, x))
    return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gslope, slope.type.shape)]


@rule("reduce_max", "reduce_min")
def _reduce_extremum(b, node, g):
    """The gradient goes to the elements equal to the result, shared among ties."""
    x, op = node.inputs[0], node.op
    y = _expand_back(b, node.outputs[0], x, op.axes, op.keepdims)
    hit = b.cast(b.equal(x, y), to=x.type.dtype)
    ties = _expand_back(b, b.reduce_sum(hit, axes=op.axes, keepdims=op.keepdims), x, op.axes, op.keepdims)
    return [b.div(b.mul(_expand_back(b, g, x, op.axes, op.keepdims), hit), ties)]


@rule("reduce_prod")
def _reduce_prod(b, node, g):
    """∂(∏x)/∂x_i = ∏x / x_i (for x_i ≠ 0)."""
    x, op = node.inputs[0], node.op
    y = _expand_back(b, node.outputs[0], x, op.axes, op.keepdims)
    return [b.div(b.mul(_expand_back(b, g, x, op.axes, op.keepdims), y), x)]


@rule("pad")
def _pad(b, node, g):
    x, op = node.inputs[0], node.op
    if op.mode != "constant" or any(p < 0 for p in op.pads):
        raise GraphError(f"node {node.name}: the pad gradient supports constant mode without cropping")
    r = x.type.rank
    return [
        b.slice(
            g,
            starts=op.pads[:r],
            ends=tuple(p + d for p, d in zip(op.pads[:r], x.type.shape)),
            axes=tuple(range(r)),
        )
    ]


@rule("tile")
def _tile(b, node, g):
    """Each copy's gradient, summed: g seen as (repeats, size) per axis, the repeats summed."""
    x, repeats = node.inputs[0], node.op.repeats
    split = tuple(v for r, d in zip(repeats, x.type.shape) for v in (r, d))
    summed = b.reduce_sum(b.reshape(g, shape=split), axes=tuple(range(0, 2 * x.type.rank, 2)), keepdims=False)
    return [b.reshape(summed, shape=x.type.shape)]


@rule("cumsum")
def _cumsum(b, node, g):
    op = node.op
    return [b.cumsum(g, axis=op.axis, exclusive=op.exclusive, reverse=not op.reverse)]


@rule("trilu")
def _trilu(b, node, g):
    return [b.trilu(g, upper=node.op.upper, k=node.op.k)]


@rule("global_avg_pool2d")
def _global_avg_pool2d(b, node, g):
    x = node.inputs[0]
    h, w = x.type.shape[2:]
    return [b.expand(b.mul(g, _k(b, node, 1.0 / (h * w))), shape=x.type.shape)]


@rule("layer_norm")
def _layer_norm(b, node, g):
    """With x̂ = (x - mean)·rstd over axes [axis, rank): dx = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)),
    ĝ = g·scale; dscale = Σ g·x̂ and dbias = Σ g over the leading axes."""
    x, scale = node.inputs[0], node.inputs[1]
    rank = x.type.rank
    axis = normalize_axis("layer_norm", node.op.axis, rank)
    axes, lead = tuple(range(axis, rank)), tuple(range(axis))
    mean = b.reduce_mean(x, axes=axes, keepdims=True)
    centered = b.sub(x, mean)
    var = b.reduce_mean(b.mul(centered, centered), axes=axes, keepdims=True)
    rstd = b.rsqrt(b.add(var, _k(b, node, node.op.epsilon)))
    xhat = b.mul(centered, rstd)
    gh = b.mul(g, scale)
    inner = b.sub(
        b.sub(gh, b.reduce_mean(gh, axes=axes, keepdims=True)),
        b.mul(xhat, b.reduce_mean(b.mul(gh, xhat), axes=axes, keepdims=True)),
    )
    grads: Grads = [
        b.mul(rstd, inner),
        b.reduce_sum(b.mul(g, xhat), axes=lead, keepdims=False) if lead else b.mul(g, xhat),
    ]
    if len(node.inputs) > 2:
        grads.append(b.reduce_sum(g, axes=lead, keepdims=False) if lead else g)
    return grads


@rule("batch_norm")
def _batch_norm(b, node, g):
    """Inference batch norm y = (x - mean)·s + bias, s = scale / sqrt(var + eps), per channel."""
    x, scale, bias, mean, var = node.inputs
    rank = x.type.rank
    channel = (1, -1) + (1,) * (rank - 2)
    others = (0, *range(2, rank))
    inv = b.rsqrt(b.add(var, _k(b, node, node.op.epsilon)))
    centered = b.sub(x, b.reshape(mean, shape=channel))
    g_sum = b.reduce_sum(g, axes=others, keepdims=False)
    g_centered = b.reduce_sum(b.mul(g, centered), axes=others, keepdims=False)
    return [
        b.mul(g, b.reshape(b.mul(scale, inv), shape=channel)),
        b.mul(g_centered, inv),
        g_sum,
        b.neg(b.mul(g_sum, b.mul(scale, inv))),
        b.mul(b.mul(g_centered, scale), b.mul(_k(b, node, -0.5), b.mul(inv, b.mul(inv, inv)))),
    ]


@rule("mod")
def _mod(b, node, g):
    """x - y·q with q = floor(x / y) (Python's %) or trunc(x / y) (fmod): 1 and -q."""
    x, y = node.inputs
    if x.type.dtype not in ("float32", "float64"):
        return [None, None]
    ratio = b.div(x, y)
    q = (
        b.where(b.less(ratio, _scalar(b, 0.0, ratio)), b.ceil(ratio), b.floor(ratio))
        if node.op.fmod
        else b.floor(ratio)
    )
    return [unbroadcast(b, g, x.type.shape), unbroadcast(b, b.neg(b.mul(g, q)), y.type.shape)]


@rule("gather_elements")
def _gather_elements(b, node, g):
    data, indices = node.inputs
    return [b.gather_elements_backward(indices, g, shape=data.type.shape, axis=node.op.axis), None]


@rule("topk")
def _topk(b, node, g):
    """The values are x gathered at the indices: their gradient goes back to those places."""
    op = node.op
    if op.output != "values":
        return [None]
    x = node.inputs[0]
    indices = b.topk(x, k=op.k, axis=op.axis, largest=op.largest, output="indices")
    return [b.gather_elements_backward(indices, g, shape=x.type.shape, axis=op.axis)]


@rule("einsum")
def _einsum(b, node, g):
    """Each operand's gradient is the einsum of g with the other operands onto its own
    letters; letters only that operand has (summed away alone) broadcast back, and
    letters it holds at size 1 (broadcast) are summed."""
    from ir.ops.einsum import letter_sizes, parse

    terms, out = parse(node.op.equation)
    sizes = letter_sizes(node.op.equation, [v.type.shape for v in node.inputs])
    grads: Grads = []
    for i, (term, x) in enumerate(zip(terms, node.inputs)):
        if len(set(term)) != len(term):
            raise GraphError(
                f"node {node.name}: no einsum gradient for a repeated letter (diagonal) in {term!r}"
            )
        others = [(t, v) for j, (t, v) in enumerate(zip(terms, node.inputs)) if j != i]
        reachable = set(out).union(*(t for t, _ in others))
        kept = "".join(c for c in term if c in reachable)
        gx = b.einsum(
            g, *(v for _, v in others), equation=",".join([out, *(t for t, _ in others)]) + "->" + kept
        )
        if kept != term:
            gx = b.reshape(gx, shape=tuple(gx.type.shape[kept.index(c)] if c in kept else 1 for c in term))
        gx = b.expand(gx, shape=tuple(sizes[c] for c in term))
        grads.append(unbroadcast(b, gx, x.type.shape))
    return grads


@rule("resample")
def _resample(b, node, g):
    """Resampling is linear in x: per axis a matrix A (out × in) from the tap tables
    (rows of extrapolated points zero), so x's gradient is Aᵀ g along each axis."""
    x, tables = node.inputs[0], node.inputs[1:]
    if any(t not in b.params for t in tables):
        raise GraphError(f"node {node.name}: the resample gradient needs constant tap tables")
    axes = node.op._axes(x.type.rank)
    gx = g
    for a, indices, weights in zip(axes, tables[::2], tables[1::2]):
        idx, w = b.params[indices], b.params[weights]
        n_in = x.type.shape[a]
        dense = np.zeros((idx.shape[0], n_in), np.float64)
        rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
        np.add.at(dense, (rows, np.clip(idx, 0, n_in - 1).ravel()), w.astype(np.float64).ravel())
        dense[idx[:, 0] < 0] = 0.0  # extrapolated: a constant, no gradient
        last = tuple(d for d in range(x.type.rank) if d != a) + (a,)
        moved = b.matmul(b.transpose(gx, perm=last), b.param("interpolation", dense.astype(x.type.np_dtype)))
        gx = b.transpose(moved, perm=tuple(int(p) for p in np.argsort(last)))
    return [gx, *[None] * len(tables)]


@rule("rnn", "gru", "lstm")
def _recurrence(b, node, g):
    """The recurrence unrolled into graph ops (steps of matmuls and gate arithmetic, as
    the op's reference computes them), then differentiated with the ordinary rules,
    g standing for the gradient of every slot."""
    from ir.ops.recurrent import unroll

    start = len(b.nodes)
    slots = unroll(b, node.op, node.inputs)
    return _pullback(b, b.nodes[start:], {slots: g}, node.inputs)


def _pullback(b: GraphBuilder, nodes: list[Node], seeds: dict[Value, Value], wrt: list[Value]) -> Grads:
    """Σ seed · d value / d v for each v in wrt, through `nodes` only (None where no path)."""
    needed: set[Value] = set(wrt)
    on_path = []
    for node in nodes:
        if any(v in needed for v in node.inputs):
            needed.add(node.outputs[0])
            on_path.append(node)
    grads = dict(seeds)
    _reverse(b, on_path, needed, grads)
    return [grads.get(v) for v in wrt]


def _reverse(b: GraphBuilder, on_path: list[Node], needed: set[Value], grads: dict[Value, Value]) -> None:
    """Carry the gradients in `grads` back through on_path (in topological order)."""
    for node in reversed(on_path):
        out = node.outputs[0]
        if out not in grads:
            continue
        rule_fn = RULES.get(node.op.name)
        if rule_fn is None:
            raise GraphError(f"node {node.name} ({node.op.name}): no gradient rule for this op")
        for v, gv in zip(node.inputs, rule_fn(b, node, grads[out])):
            if gv is None or v not in needed:
                continue
            grads[v] = b.add(grads[v], gv) if v in grads else gv


def _no_gradient(b, node, g):
    """Booleans and indices carry no gradient; piecewise-constant ops give zero (None:
    nothing flows back through them)."""
    return [None] * len(node.inputs)


NOT_DIFFERENTIABLE = (
    "cast", "equal", "less", "greater", "less_equal", "greater_equal", "arg_reduce", "isnan", "isinf",
    "logical_and", "logical_or", "logical_xor", "logical_not",
    "floor", "ceil", "round", "sign",  # piecewise constant: zero almost everywhere
)  # fmt: skip
for _name in NOT_DIFFERENTIABLE:
    RULES[_name] = _no_gradient


def gradients(b: GraphBuilder, loss: Value, wrt: list[Value], unreached: str = "zeros") -> list[Value | None]:
    """d loss / d v for each v in wrt; where the loss does not depend on v, zeros, or
    None with unreached="none" (a trainer then leaves v alone)."""
    if loss.type.numel != 1:
        raise GraphError(f"gradients: the loss must be a scalar, got {loss.type}")
    one = b.param("one", np.ones(loss.type.shape, loss.type.np_dtype))
    grads = dict(zip(wrt, _pullback(b, list(b.nodes), {loss: one}, wrt)))
    if unreached == "none":
        return [grads[v] for v in wrt]
    return [
        grads[v] if grads[v] is not None else b.param("zero", np.zeros(v.type.shape, v.type.np_dtype))
        for v in wrt
    ]
