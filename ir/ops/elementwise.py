"""Elementwise ops: one output element from the same-index elements of the inputs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from codegen.kir import Expr, ExprBuilder
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import ElementwiseOp, Fusion, Gradient, Grads, broadcast_shapes, register
from ir.ops.grad import constant, unbroadcast, where_positive
from ir.types import DTYPES, TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder

E = Fusion.ELEMENTWISE
FLOATS = ("float32", "float64")
NUMBERS = ("float32", "float64", "int64", "int32")
_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf_reference(x: np.ndarray) -> np.ndarray:
    """numpy has no erf; math.erf per element, rounded once to x's dtype."""
    return _erf(x.astype(np.float64)).astype(x.dtype)


class UnaryOp(ElementwiseOp):
    arity = (1, 1)


class BinaryOp(ElementwiseOp):
    arity = (2, 2)


def _extremum_gradient(b: GraphBuilder, node: Node, g: Value, x_wins: Value) -> Grads:
    """g goes to x where x_wins (ties included), to y elsewhere."""
    x, y = node.inputs
    zero = constant(b, 0.0, g)
    return [
        unbroadcast(b, b.where(x_wins, g, zero), x.type.shape),
        unbroadcast(b, b.where(x_wins, zero, g), y.type.shape),
    ]


# --------------------------------------------------------------------------- arithmetic


@register("add", E)
class Add(BinaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, a, b):
        return a + b

    def scalar(self, e: ExprBuilder, a: Expr, b: Expr) -> Expr:
        return a + b

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [unbroadcast(b, g, v.type.shape) for v in node.inputs]


@register("sub", E)
class Sub(BinaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, a, b):
        return a - b

    def scalar(self, e, a, b):
        return a - b

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, y = node.inputs
        return [unbroadcast(b, g, x.type.shape), unbroadcast(b, b.neg(g), y.type.shape)]


@register("mul", E)
class Mul(BinaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, a, b):
        return a * b

    def scalar(self, e, a, b):
        return a * b

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, y = node.inputs
        return [unbroadcast(b, b.mul(g, y), x.type.shape), unbroadcast(b, b.mul(g, x), y.type.shape)]


@register("div", E)
class Div(BinaryOp):
    """Float division; integer division truncates toward zero (ONNX, C), and x / 0 is 0."""

    accepts = NUMBERS

    def reference(self, a, b):
        if a.dtype.kind == "f":
            return a / b
        q = np.abs(a) // np.where(b == 0, 1, np.abs(b)) * np.sign(a) * np.sign(b)
        return np.where(b == 0, 0, q).astype(a.dtype)

    def scalar(self, e, a, b):
        return a / b

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, y = node.inputs
        gx = b.div(g, y)
        gy = b.neg(b.mul(gx, node.outputs[0]))  # -g x / y² = -(g / y) · (x / y)
        return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gy, y.type.shape)]


@register("pow", E)
class Pow(BinaryOp):
    accepts = NUMBERS

    def reference(self, a, b):
        return np.power(a, b)

    def scalar(self, e, a, b):
        return e.pow(a, b)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """d/da a^e = e·a^(e-1); d/de a^e = a^e·log a (defined for a > 0)."""
        a, e = node.inputs
        y = node.outputs[0]
        ga = b.mul(g, b.mul(e, b.pow(a, b.sub(e, constant(b, 1.0, a)))))
        ge = b.mul(g, b.mul(y, b.log(a)))
        return [unbroadcast(b, ga, a.type.shape), unbroadcast(b, ge, e.type.shape)]


@register("maximum", E)
class Maximum(BinaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, a, b):
        return np.maximum(a, b)

    def scalar(self, e, a, b):
        return e.maximum(a, b)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return _extremum_gradient(b, node, g, b.greater_equal(*node.inputs))


@register("minimum", E)
class Minimum(BinaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, a, b):
        return np.minimum(a, b)

    def scalar(self, e, a, b):
        return e.minimum(a, b)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return _extremum_gradient(b, node, g, b.less_equal(*node.inputs))


@register("neg", E)
class Neg(UnaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, x):
        return -x

    def scalar(self, e, x):
        return -x

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.neg(g)]


@register("abs", E)
class Abs(UnaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, x):
        return np.abs(x)

    def scalar(self, e, x):
        return e.abs(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        zero = constant(b, 0.0, g)
        return [b.where(b.greater(x, zero), g, b.where(b.less(x, zero), b.neg(g), zero))]


@register("reciprocal", E)
class Reciprocal(UnaryOp):
    def reference(self, x):
        return np.reciprocal(x)

    def scalar(self, e, x):
        return 1.0 / x

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        return [b.neg(b.mul(g, b.mul(y, y)))]


# --------------------------------------------------------------------------- transcendental


@register("exp", E)
class Exp(UnaryOp):
    def reference(self, x):
        return np.exp(x)

    def scalar(self, e, x):
        return e.exp(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.mul(g, node.outputs[0])]


@register("log", E)
class Log(UnaryOp):
    def reference(self, x):
        return np.log(x)

    def scalar(self, e, x):
        return e.log(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.div(g, node.inputs[0])]


@register("sqrt", E)
class Sqrt(UnaryOp):
    def reference(self, x):
        return np.sqrt(x)

    def scalar(self, e, x):
        return e.sqrt(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.div(b.mul(g, constant(b, 0.5, g)), node.outputs[0])]


@register("rsqrt", E)
class Rsqrt(UnaryOp):
    def reference(self, x):
        return (1 / np.sqrt(x)).astype(x.dtype)

    def scalar(self, e, x):
        return 1.0 / e.sqrt(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]  # d/dx x^(-1/2) = -y³/2
        return [b.mul(g, b.mul(constant(b, -0.5, y), b.mul(y, b.mul(y, y))))]


@register("tanh", E)
class Tanh(UnaryOp):
    def reference(self, x):
        return np.tanh(x)

    def scalar(self, e, x):
        return e.tanh(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        return [b.mul(g, b.sub(constant(b, 1.0, y), b.mul(y, y)))]


@register("erf", E)
class Erf(UnaryOp):
    def reference(self, x):
        return erf_reference(x)

    def scalar(self, e, x):
        return e.erf(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        return [b.mul(g, b.mul(constant(b, 2 / np.sqrt(np.pi), x), b.exp(b.neg(b.mul(x, x)))))]


@register("sigmoid", E)
class Sigmoid(UnaryOp):
    def reference(self, x):
        return (1 / (1 + np.exp(-x))).astype(x.dtype)

    def scalar(self, e, x):
        return e.sigmoid(x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        return [b.mul(g, b.mul(y, b.sub(constant(b, 1.0, y), y)))]


# --------------------------------------------------------------------------- activations


@register("relu", E)
class Relu(UnaryOp):
    cheap = True
    accepts = NUMBERS

    def reference(self, x):
        return np.maximum(x, x.dtype.type(0))

    def scalar(self, e, x):
        return e.maximum(x, 0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        # relu(x) > 0 exactly where x > 0: masking by the output leaves the input to
        # its producer alone (a convolution then takes the ReLU as its epilogue).
        return [where_positive(b, node.outputs[0], g)]


@register("leaky_relu", E)
class LeakyRelu(UnaryOp):
    cheap = True
    alpha: float = 0.01

    def reference(self, x):
        return np.where(x < 0, x * x.dtype.type(self.alpha), x)

    def scalar(self, e, x):
        return e.select(x.lt(0), x * self.alpha, x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        zero = constant(b, 0.0, g)
        return [b.where(b.greater(x, zero), g, b.mul(g, constant(b, self.alpha, g)))]


@register("elu", E)
class Elu(UnaryOp):
    alpha: float = 1.0

    def reference(self, x):
        return np.where(x < 0, x.dtype.type(self.alpha) * (np.exp(x) - 1), x)

    def scalar(self, e, x):
        return e.select(x.lt(0), (e.exp(x) - 1.0) * self.alpha, x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, y = node.inputs[0], node.outputs[0]
        zero = constant(b, 0.0, g)
        return [b.where(b.greater(x, zero), g, b.mul(g, b.add(y, constant(b, self.alpha, g))))]


@register("gelu", E)
class Gelu(UnaryOp):
    approximate: str = "none"  # "none": the erf form; "tanh": the tanh approximation

    def __post_init__(self):
        if self.approximate not in ("none", "tanh"):
            raise GraphError(f"gelu: approximate must be 'none' or 'tanh', got {self.approximate!r}")

    def reference(self, x):
        t = x.dtype.type
        if self.approximate == "tanh":
            inner = t(math.sqrt(2 / math.pi)) * (x + t(0.044715) * x * x * x)
            return t(0.5) * x * (t(1) + np.tanh(inner))
        return t(0.5) * x * (t(1) + erf_reference(x * t(1 / math.sqrt(2))))

    def scalar(self, e, x):
        if self.approximate == "tanh":
            inner = (x + x * x * x * 0.044715) * math.sqrt(2 / math.pi)
            return x * 0.5 * (e.tanh(inner) + 1.0)
        return x * 0.5 * (e.erf(x * (1 / math.sqrt(2))) + 1.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """d/dx x·Φ(x) = Φ(x) + x·φ(x) (the erf form; the tanh form is not differentiated)."""
        if self.approximate != "none":
            raise GraphError(f"node {node.name}: only the erf form of gelu has a gradient rule")
        x = node.inputs[0]
        cdf = b.mul(
            constant(b, 0.5, x), b.add(constant(b, 1.0, x), b.erf(b.mul(x, constant(b, 0.5**0.5, x))))
        )
        pdf = b.mul(constant(b, (2 * np.pi) ** -0.5, x), b.exp(b.mul(constant(b, -0.5, x), b.mul(x, x))))
        return [b.mul(g, b.add(cdf, b.mul(x, pdf)))]


@register("clip", E)
class Clip(UnaryOp):
    cheap = True
    min: float = -math.inf
    max: float = math.inf

    def reference(self, x):
        t = x.dtype.type
        return np.minimum(np.maximum(x, t(self.min)), t(self.max))

    def scalar(self, e, x):
        return e.minimum(e.maximum(x, self.min), self.max)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        zero = constant(b, 0.0, g)
        inside = b.logical_and(
            b.greater_equal(x, constant(b, self.min, x)), b.less_equal(x, constant(b, self.max, x))
        )
        return [b.where(inside, g, zero)]


# --------------------------------------------------------------------------- comparisons, select, cast


class Comparison(BinaryOp):
    differentiation = Gradient.ZERO
    accepts = NUMBERS
    result = "bool"
    predicate: ClassVar[str]

    def reference(self, a, b):
        names = {"eq": "equal", "lt": "less", "gt": "greater", "le": "less_equal", "ge": "greater_equal"}
        return getattr(np, names[self.predicate])(a, b)

    def scalar(self, e, a, b):
        return getattr(a, self.predicate)(b)


@register("equal", E)
class Equal(Comparison):
    cheap = True
    accepts = NUMBERS + ("bool",)
    predicate = "eq"


@register("less", E)
class Less(Comparison):
    cheap = True
    predicate = "lt"


@register("greater", E)
class Greater(Comparison):
    cheap = True
    predicate = "gt"


@register("where", E)
class Where(ElementwiseOp):
    cheap = True
    arity = (3, 3)

    def infer(self, cond: TensorType, a: TensorType, b: TensorType) -> TensorType:
        if cond.dtype != "bool":
            raise GraphError(f"where: condition must be bool, got {cond.dtype}")
        if a.dtype != b.dtype:
            raise GraphError(f"where: branch dtypes differ: {a.dtype} vs {b.dtype}")
        return TensorType(a.dtype, broadcast_shapes("where", [cond.shape, a.shape, b.shape]))

    def reference(self, cond, a, b):
        return np.where(cond, a, b)

    def scalar(self, e, cond, a, b):
        return e.select(cond, a, b)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        cond, x, y = node.inputs
        zero = constant(b, 0.0, g)
        return [
            None,
            unbroadcast(b, b.where(cond, g, zero), x.type.shape),
            unbroadcast(b, b.where(cond, zero, g), y.type.shape),
        ]


@register("cast", E)
class CastOp(UnaryOp):
    cheap = True
    differentiation = Gradient.ZERO  # casts to and from floats carry no gradient in Kiln
    to: str = "float32"

    def infer(self, x: TensorType) -> TensorType:
        if self.to not in DTYPES:
            raise GraphError(f"cast: target dtype {self.to!r} not supported")
        return x.with_dtype(self.to)

    def reference(self, x):
        return x.astype(DTYPES[self.to])

    def scalar(self, e, x):
        if self.to == "bool":
            return x.ne(0)
        if x.dtype == "bool":
            return e.select(x, e.const(1, self.to), e.const(0, self.to))
        return e.cast(x, self.to)


# --------------------------------------------------------------------------- rounding, sign


@register("floor", E)
class Floor(UnaryOp):
    differentiation = Gradient.ZERO  # piecewise constant: zero almost everywhere

    def reference(self, x):
        return np.floor(x)

    def scalar(self, e, x):
        return e.floor(x)


@register("ceil", E)
class Ceil(UnaryOp):
    differentiation = Gradient.ZERO  # piecewise constant: zero almost everywhere

    def reference(self, x):
        return np.ceil(x)

    def scalar(self, e, x):
        return e.ceil(x)


@register("round", E)
class Round(UnaryOp):
    """Halves round to even, as ONNX and numpy do."""

    differentiation = Gradient.ZERO  # piecewise constant: zero almost everywhere

    def reference(self, x):
        return np.round(x)

    def scalar(self, e, x):
        return e.roundeven(x)


@register("sign", E)
class Sign(UnaryOp):
    differentiation = Gradient.ZERO  # piecewise constant: zero almost everywhere
    accepts = NUMBERS

    def reference(self, x):
        return np.sign(x)

    def scalar(self, e, x):
        one, zero = e.const(1, x.dtype), e.const(0, x.dtype)
        signed = e.select(x.gt(0), one, e.select(x.lt(0), -one, zero))
        return e.select(x.ne(x), x, signed) if x.dtype in FLOATS else signed  # NaN stays NaN


# --------------------------------------------------------------------------- more activations


@register("softplus", E)
class Softplus(UnaryOp):
    """log(1 + exp(x)), computed as max(x, 0) + log(1 + exp(-|x|)) so it never overflows."""

    def reference(self, x):
        return np.logaddexp(x.dtype.type(0), x)

    def scalar(self, e, x):
        return e.maximum(x, 0.0) + e.log(e.exp(-e.abs(x)) + 1.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.mul(g, b.sigmoid(node.inputs[0]))]


@register("softsign", E)
class Softsign(UnaryOp):
    def reference(self, x):
        return x / (1 + np.abs(x))

    def scalar(self, e, x):
        return x / (e.abs(x) + 1.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        d = b.add(constant(b, 1.0, x), b.abs(x))
        return [b.div(g, b.mul(d, d))]


@register("hard_sigmoid", E)
class HardSigmoid(UnaryOp):
    alpha: float = 0.2
    beta: float = 0.5

    def reference(self, x):
        t = x.dtype.type
        return np.clip(x * t(self.alpha) + t(self.beta), t(0), t(1))

    def scalar(self, e, x):
        return e.minimum(e.maximum(x * self.alpha + self.beta, 0.0), 1.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        z = b.add(b.mul(x, constant(b, self.alpha, x)), constant(b, self.beta, x))
        inside = b.logical_and(b.greater(z, constant(b, 0.0, x)), b.less(z, constant(b, 1.0, x)))
        return [b.where(inside, b.mul(g, constant(b, self.alpha, x)), constant(b, 0.0, x))]


@register("hard_swish", E)
class HardSwish(UnaryOp):
    def reference(self, x):
        t = x.dtype.type
        return x * np.clip(x * t(1 / 6) + t(0.5), t(0), t(1))

    def scalar(self, e, x):
        return x * e.minimum(e.maximum(x * (1 / 6) + 0.5, 0.0), 1.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """x·clip(x/6 + 1/2, 0, 1): 0 below -3, 1 above 3, (2x + 3)/6 between."""
        x = node.inputs[0]
        middle = b.add(b.mul(x, constant(b, 1 / 3, x)), constant(b, 0.5, x))
        d = b.where(
            b.less(x, constant(b, -3.0, x)),
            constant(b, 0.0, x),
            b.where(b.greater(x, constant(b, 3.0, x)), constant(b, 1.0, x), middle),
        )
        return [b.mul(g, d)]


@register("selu", E)
class Selu(UnaryOp):
    alpha: float = 1.67326319217681884765625
    gamma: float = 1.05070102214813232421875

    def reference(self, x):
        t = x.dtype.type
        return np.where(x > 0, x * t(self.gamma), (np.exp(x) - 1) * t(self.alpha * self.gamma))

    def scalar(self, e, x):
        return e.select(x.gt(0), x * self.gamma, (e.exp(x) - 1.0) * (self.alpha * self.gamma))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        negative = b.mul(constant(b, self.gamma * self.alpha, x), b.exp(x))
        return [b.mul(g, b.where(b.greater(x, constant(b, 0.0, x)), constant(b, self.gamma, x), negative))]


@register("celu", E)
class Celu(UnaryOp):
    alpha: float = 1.0

    def reference(self, x):
        t = x.dtype.type
        return np.maximum(x, t(0)) + np.minimum(t(0), t(self.alpha) * (np.exp(x / t(self.alpha)) - 1))

    def scalar(self, e, x):
        return e.maximum(x, 0.0) + e.minimum((e.exp(x * (1 / self.alpha)) - 1.0) * self.alpha, 0.0)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, alpha = node.inputs[0], self.alpha
        negative = b.exp(b.div(x, constant(b, alpha, x)))
        return [b.mul(g, b.where(b.greater(x, constant(b, 0.0, x)), constant(b, 1.0, x), negative))]


@register("mish", E)
class Mish(UnaryOp):
    def reference(self, x):
        return x * np.tanh(np.logaddexp(x.dtype.type(0), x))

    def scalar(self, e, x):
        return x * e.tanh(Softplus().scalar(e, x))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """x·tanh(softplus(x)): tanh(sp) + x·(1 - tanh²(sp))·sigmoid(x)."""
        x = node.inputs[0]
        t = b.tanh(b.softplus(x))
        d = b.add(t, b.mul(x, b.mul(b.sub(constant(b, 1.0, x), b.mul(t, t)), b.sigmoid(x))))
        return [b.mul(g, d)]


@register("thresholded_relu", E)
class ThresholdedRelu(UnaryOp):
    alpha: float = 1.0

    def reference(self, x):
        return np.where(x > x.dtype.type(self.alpha), x, x.dtype.type(0))

    def scalar(self, e, x):
        return e.select(x.gt(self.alpha), x, e.const(0.0, x.dtype))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        return [b.where(b.greater(x, constant(b, self.alpha, x)), g, constant(b, 0.0, x))]


@register("prelu", E)
class PRelu(BinaryOp):
    """x where x >= 0, else slope * x (slope broadcast)."""

    def reference(self, x, slope):
        return np.where(x < 0, x * slope, x)

    def scalar(self, e, x, slope):
        return e.select(x.lt(0), x * slope, x)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, slope = node.inputs
        positive = b.greater(x, constant(b, 0.0, x))
        zero = constant(b, 0.0, x)
        gx = b.where(positive, g, b.mul(g, slope))
        gslope = b.where(positive, zero, b.mul(g, x))
        return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gslope, slope.type.shape)]


# --------------------------------------------------------------------------- logic, tests


@register("less_equal", E)
class LessEqual(Comparison):
    predicate = "le"


@register("greater_equal", E)
class GreaterEqual(Comparison):
    predicate = "ge"


class Logical(BinaryOp):
    differentiation = Gradient.ZERO
    accepts = ("bool",)

    def reference(self, a, b):
        return getattr(np, f"logical_{self.name.split('_')[1]}")(a, b)


@register("logical_and", E)
class LogicalAnd(Logical):
    def scalar(self, e, a, b):
        return e.logical_and(a, b)


@register("logical_or", E)
class LogicalOr(Logical):
    def scalar(self, e, a, b):
        return e.logical_or(a, b)


@register("logical_xor", E)
class LogicalXor(Logical):
    def scalar(self, e, a, b):
        return a.ne(b)


@register("logical_not", E)
class LogicalNot(UnaryOp):
    differentiation = Gradient.ZERO
    accepts = ("bool",)

    def reference(self, x):
        return np.logical_not(x)

    def scalar(self, e, x):
        return e.logical_not(x)


@register("isnan", E)
class IsNan(UnaryOp):
    differentiation = Gradient.ZERO
    result = "bool"

    def reference(self, x):
        return np.isnan(x)

    def scalar(self, e, x):
        return x.ne(x)


@register("isinf", E)
class IsInf(UnaryOp):
    differentiation = Gradient.ZERO
    result = "bool"
    detect_negative: bool = True
    detect_positive: bool = True

    def reference(self, x):
        return (np.isposinf(x) & self.detect_positive) | (np.isneginf(x) & self.detect_negative)

    def scalar(self, e, x):
        pos, neg = x.eq(float("inf")), x.eq(float("-inf"))
        if self.detect_positive and self.detect_negative:
            return e.logical_or(pos, neg)
        if self.detect_positive:
            return pos
        return neg if self.detect_negative else e.const(False, "bool")


@register("expand", E)
class Expand(UnaryOp):
    """x broadcast to `shape` (numpy rules both ways, as ONNX Expand)."""

    accepts = NUMBERS + ("bool",)
    shape: tuple[int, ...] = ()

    def infer(self, x: TensorType) -> TensorType:
        return x.with_shape(broadcast_shapes("expand", [x.shape, tuple(self.shape)]))

    def reference(self, x):
        return np.broadcast_to(x, self.infer(TensorType.of(x)).shape).copy()

    def scalar(self, e, x):
        return x

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [unbroadcast(b, g, node.inputs[0].type.shape)]


@register("mod", E)
class Mod(BinaryOp):
    """Remainder. fmod=False: the sign of the divisor, as Python's % (np.mod);
    fmod=True: the sign of the dividend, as C's fmod. Integer x mod 0 is 0."""

    accepts = NUMBERS
    fmod: bool = False

    def reference(self, a, b):
        if a.dtype.kind == "f":
            return np.fmod(a, b) if self.fmod else np.mod(a, b)
        safe = np.where(b == 0, 1, b)
        r = np.fmod(a, safe) if self.fmod else np.mod(a, safe)
        return np.where(b == 0, 0, r).astype(a.dtype)

    def scalar(self, e, a, b):
        if a.dtype in FLOATS:
            r = a % b  # frem: C's fmod
            if self.fmod:
                return r
            wrong_sign = e.logical_and(r.ne(0.0), e.logical_xor(r.lt(0.0), b.lt(0.0)))
            return e.select(wrong_sign, r + b, r)
        zero = e.const(0, a.dtype)
        safe = e.select(b.eq(0), e.const(1, a.dtype), b)
        r = e.trunc_rem(a, safe) if self.fmod else a % safe
        return e.select(b.eq(0), zero, r)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """x - y·q with q = floor(x / y) (Python's %) or trunc(x / y) (fmod): 1 and -q."""
        x, y = node.inputs
        if x.type.dtype not in ("float32", "float64"):
            return [None, None]
        ratio = b.div(x, y)
        q = (
            b.where(b.less(ratio, constant(b, 0.0, ratio)), b.ceil(ratio), b.floor(ratio))
            if self.fmod
            else b.floor(ratio)
        )
        return [unbroadcast(b, g, x.type.shape), unbroadcast(b, b.neg(b.mul(g, q)), y.type.shape)]
