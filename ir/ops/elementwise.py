"""Elementwise ops: one output element from the same-index elements of the inputs."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from codegen.kir import Expr, ExprBuilder
from ir.errors import GraphError
from ir.ops import ElementwiseOp, Fusion, broadcast_shapes, register
from ir.types import DTYPES, TensorType

E = Fusion.ELEMENTWISE
FLOATS = ("float32", "float64")
NUMBERS = ("float32", "float64", "int64", "int32")
_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf_reference(x: np.ndarray) -> np.ndarray:
    """numpy has no erf; math.erf per element, rounded once to x's dtype."""
    return _erf(x.astype(np.float64)).astype(x.dtype)


class Unary(ElementwiseOp):
    arity = (1, 1)


class Binary(ElementwiseOp):
    arity = (2, 2)


# --------------------------------------------------------------------------- arithmetic


@register("add", E)
class Add(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return a + b

    def scalar(self, e: ExprBuilder, a: Expr, b: Expr) -> Expr:
        return a + b


@register("sub", E)
class Sub(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return a - b

    def scalar(self, e, a, b):
        return a - b


@register("mul", E)
class Mul(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return a * b

    def scalar(self, e, a, b):
        return a * b


@register("div", E)
class Div(Binary):
    """Float division; integer division truncates toward zero (ONNX, C), and x / 0 is 0."""

    accepts = NUMBERS

    def reference(self, a, b):
        if a.dtype.kind == "f":
            return a / b
        q = np.abs(a) // np.where(b == 0, 1, np.abs(b)) * np.sign(a) * np.sign(b)
        return np.where(b == 0, 0, q).astype(a.dtype)

    def scalar(self, e, a, b):
        return a / b


@register("pow", E)
class Pow(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return np.power(a, b)

    def scalar(self, e, a, b):
        return e.pow(a, b)


@register("maximum", E)
class Maximum(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return np.maximum(a, b)

    def scalar(self, e, a, b):
        return e.maximum(a, b)


@register("minimum", E)
class Minimum(Binary):
    accepts = NUMBERS

    def reference(self, a, b):
        return np.minimum(a, b)

    def scalar(self, e, a, b):
        return e.minimum(a, b)


@register("neg", E)
class Neg(Unary):
    accepts = NUMBERS

    def reference(self, x):
        return -x

    def scalar(self, e, x):
        return -x


@register("abs", E)
class Abs(Unary):
    accepts = NUMBERS

    def reference(self, x):
        return np.abs(x)

    def scalar(self, e, x):
        return e.abs(x)


@register("reciprocal", E)
class Reciprocal(Unary):
    def reference(self, x):
        return np.reciprocal(x)

    def scalar(self, e, x):
        return 1.0 / x


# --------------------------------------------------------------------------- transcendental


@register("exp", E)
class Exp(Unary):
    def reference(self, x):
        return np.exp(x)

    def scalar(self, e, x):
        return e.exp(x)


@register("log", E)
class Log(Unary):
    def reference(self, x):
        return np.log(x)

    def scalar(self, e, x):
        return e.log(x)


@register("sqrt", E)
class Sqrt(Unary):
    def reference(self, x):
        return np.sqrt(x)

    def scalar(self, e, x):
        return e.sqrt(x)


@register("rsqrt", E)
class Rsqrt(Unary):
    def reference(self, x):
        return (1 / np.sqrt(x)).astype(x.dtype)

    def scalar(self, e, x):
        return 1.0 / e.sqrt(x)


@register("tanh", E)
class Tanh(Unary):
    def reference(self, x):
        return np.tanh(x)

    def scalar(self, e, x):
        return e.tanh(x)


@register("erf", E)
class Erf(Unary):
    def reference(self, x):
        return erf_reference(x)

    def scalar(self, e, x):
        return e.erf(x)


@register("sigmoid", E)
class Sigmoid(Unary):
    def reference(self, x):
        return (1 / (1 + np.exp(-x))).astype(x.dtype)

    def scalar(self, e, x):
        return 1.0 / (1.0 + e.exp(-x))


# --------------------------------------------------------------------------- activations


@register("relu", E)
class Relu(Unary):
    accepts = NUMBERS

    def reference(self, x):
        return np.maximum(x, x.dtype.type(0))

    def scalar(self, e, x):
        return e.maximum(x, 0)


@register("leaky_relu", E)
class LeakyRelu(Unary):
    alpha: float = 0.01

    def reference(self, x):
        return np.where(x < 0, x * x.dtype.type(self.alpha), x)

    def scalar(self, e, x):
        return e.select(x.lt(0), x * self.alpha, x)


@register("elu", E)
class Elu(Unary):
    alpha: float = 1.0

    def reference(self, x):
        return np.where(x < 0, x.dtype.type(self.alpha) * (np.exp(x) - 1), x)

    def scalar(self, e, x):
        return e.select(x.lt(0), (e.exp(x) - 1.0) * self.alpha, x)


@register("gelu", E)
class Gelu(Unary):
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


@register("clip", E)
class Clip(Unary):
    min: float = -math.inf
    max: float = math.inf

    def reference(self, x):
        t = x.dtype.type
        return np.minimum(np.maximum(x, t(self.min)), t(self.max))

    def scalar(self, e, x):
        return e.minimum(e.maximum(x, self.min), self.max)


# --------------------------------------------------------------------------- comparisons, select, cast


class Comparison(Binary):
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
    accepts = NUMBERS + ("bool",)
    predicate = "eq"


@register("less", E)
class Less(Comparison):
    predicate = "lt"


@register("greater", E)
class Greater(Comparison):
    predicate = "gt"


@register("where", E)
class Where(ElementwiseOp):
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


@register("cast", E)
class CastOp(Unary):
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
class Floor(Unary):
    def reference(self, x):
        return np.floor(x)

    def scalar(self, e, x):
        return e.floor(x)


@register("ceil", E)
class Ceil(Unary):
    def reference(self, x):
        return np.ceil(x)

    def scalar(self, e, x):
        return e.ceil(x)


@register("round", E)
class Round(Unary):
    """Halves round to even, as ONNX and numpy do."""

    def reference(self, x):
        return np.round(x)

    def scalar(self, e, x):
        return e.roundeven(x)


@register("sign", E)
class Sign(Unary):
    accepts = NUMBERS

    def reference(self, x):
        return np.sign(x)

    def scalar(self, e, x):
        one, zero = e.const(1, x.dtype), e.const(0, x.dtype)
        signed = e.select(x.gt(0), one, e.select(x.lt(0), -one, zero))
        return e.select(x.ne(x), x, signed) if x.dtype in FLOATS else signed  # NaN stays NaN


# --------------------------------------------------------------------------- more activations


@register("softplus", E)
class Softplus(Unary):
    """log(1 + exp(x)), computed as max(x, 0) + log(1 + exp(-|x|)) so it never overflows."""

    def reference(self, x):
        return np.logaddexp(x.dtype.type(0), x)

    def scalar(self, e, x):
        return e.maximum(x, 0.0) + e.log(e.exp(-e.abs(x)) + 1.0)


@register("softsign", E)
class Softsign(Unary):
    def reference(self, x):
        return x / (1 + np.abs(x))

    def scalar(self, e, x):
        return x / (e.abs(x) + 1.0)


@register("hard_sigmoid", E)
class HardSigmoid(Unary):
    alpha: float = 0.2
    beta: float = 0.5

    def reference(self, x):
        t = x.dtype.type
        return np.clip(x * t(self.alpha) + t(self.beta), t(0), t(1))

    def scalar(self, e, x):
        return e.minimum(e.maximum(x * self.alpha + self.beta, 0.0), 1.0)


@register("hard_swish", E)
class HardSwish(Unary):
    def reference(self, x):
        t = x.dtype.type
        return x * np.clip(x * t(1 / 6) + t(0.5), t(0), t(1))

    def scalar(self, e, x):
        return x * e.minimum(e.maximum(x * (1 / 6) + 0.5, 0.0), 1.0)


@register("selu", E)
class Selu(Unary):
    alpha: float = 1.67326319217681884765625
    gamma: float = 1.05070102214813232421875

    def reference(self, x):
        t = x.dtype.type
        return np.where(x > 0, x * t(self.gamma), (np.exp(x) - 1) * t(self.alpha * self.gamma))

    def scalar(self, e, x):
        return e.select(x.gt(0), x * self.gamma, (e.exp(x) - 1.0) * (self.alpha * self.gamma))


@register("celu", E)
class Celu(Unary):
    alpha: float = 1.0

    def reference(self, x):
        t = x.dtype.type
        return np.maximum(x, t(0)) + np.minimum(t(0), t(self.alpha) * (np.exp(x / t(self.alpha)) - 1))

    def scalar(self, e, x):
        return e.maximum(x, 0.0) + e.minimum((e.exp(x * (1 / self.alpha)) - 1.0) * self.alpha, 0.0)


@register("mish", E)
class Mish(Unary):
    def reference(self, x):
        return x * np.tanh(np.logaddexp(x.dtype.type(0), x))

    def scalar(self, e, x):
        return x * e.tanh(Softplus().scalar(e, x))


@register("thresholded_relu", E)
class ThresholdedRelu(Unary):
    alpha: float = 1.0

    def reference(self, x):
        return np.where(x > x.dtype.type(self.alpha), x, x.dtype.type(0))

    def scalar(self, e, x):
        return e.select(x.gt(self.alpha), x, e.const(0.0, x.dtype))


@register("prelu", E)
class PRelu(Binary):
    """x where x >= 0, else slope * x (slope broadcast)."""

    def reference(self, x, slope):
        return np.where(x < 0, x * slope, x)

    def scalar(self, e, x, slope):
        return e.select(x.lt(0), x * slope, x)


# --------------------------------------------------------------------------- logic, tests


@register("less_equal", E)
class LessEqual(Comparison):
    predicate = "le"


@register("greater_equal", E)
class GreaterEqual(Comparison):
    predicate = "ge"


class Logical(Binary):
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
class LogicalNot(Unary):
    accepts = ("bool",)

    def reference(self, x):
        return np.logical_not(x)

    def scalar(self, e, x):
        return e.logical_not(x)


@register("isnan", E)
class IsNan(Unary):
    result = "bool"

    def reference(self, x):
        return np.isnan(x)

    def scalar(self, e, x):
        return x.ne(x)


@register("isinf", E)
class IsInf(Unary):
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
class Expand(Unary):
    """x broadcast to `shape` (numpy rules both ways, as ONNX Expand)."""

    accepts = NUMBERS + ("bool",)
    shape: tuple[int, ...] = ()

    def infer(self, x: TensorType) -> TensorType:
        return x.with_shape(broadcast_shapes("expand", [x.shape, tuple(self.shape)]))

    def reference(self, x):
        return np.broadcast_to(x, self.infer(TensorType.of(x)).shape).copy()

    def scalar(self, e, x):
        return x


@register("mod", E)
class Mod(Binary):
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
