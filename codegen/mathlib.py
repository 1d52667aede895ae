"""float32 exp, log, tanh and erf as straight-line LLVM IR.

LLVM turns `llvm.exp.f32` into a call to libm's expf, which its vectorizer cannot
widen. These versions are plain arithmetic (Cephes polynomials for exp, log and
tanh; the rational erf approximation Eigen and XLA use), emitted once per module as
internal always-inline functions, so a loop that calls them vectorizes, and the
same code is valid on NVPTX. Accuracy: within 2 ulp of the correctly rounded
result over the float range (tests/test_mathlib.py sweeps it).
"""

from __future__ import annotations

from collections.abc import Callable

from llvmlite import ir

F32 = ir.FloatType()
I32 = ir.IntType(32)
I1 = ir.IntType(1)


class _ContractingBuilder(ir.IRBuilder):
    """An IRBuilder whose float adds and multiplies may fuse into FMAs ("contract")."""

    def fadd(self, lhs, rhs, name="", flags=()):
        return super().fadd(lhs, rhs, name, flags=("contract", *flags))

    def fsub(self, lhs, rhs, name="", flags=()):
        return super().fsub(lhs, rhs, name, flags=("contract", *flags))

    def fmul(self, lhs, rhs, name="", flags=()):
        return super().fmul(lhs, rhs, name, flags=("contract", *flags))


def _c(v: float) -> ir.Constant:
    return ir.Constant(F32, v)


def _poly(b: ir.IRBuilder, x: ir.Value, coeffs: list[float]) -> ir.Value:
    """Horner: coeffs[0] * x^(n-1) + ... + coeffs[-1]."""
    acc = _c(coeffs[0])
    for c in coeffs[1:]:
        acc = b.fadd(b.fmul(acc, x), _c(c))
    return acc


def _intrinsic(b: ir.IRBuilder, name: str, *args: ir.Value) -> ir.Value:
    typ = args[0].type
    fn = b.module.declare_intrinsic(name, [typ], ir.FunctionType(typ, [typ] * len(args)))
    return b.call(fn, list(args))


def _select_nan(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    return b.select(b.fcmp_unordered("uno", x, x), x, y)


def _pow2(b: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """2**n as a float, for integer n in [-126, 127]."""
    return b.bitcast(b.shl(b.add(n, ir.Constant(I32, 127)), ir.Constant(I32, 23)), F32)


_LOG2E = 1.44269504088896341
_EXP_POLY = [
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
]


def _exp_reduced(b: ir.IRBuilder, x: ir.Value, n: ir.Value) -> ir.Value:
    """exp(x - n ln 2) for n the integer nearest x / ln 2 (Cephes: ln 2 split in two
    parts so that the reduction is exact, then a degree-7 polynomial)."""
    r = b.fsub(b.fsub(x, b.fmul(n, _c(0.693359375))), b.fmul(n, _c(-2.12194440e-4)))
    return b.fadd(b.fadd(b.fmul(_poly(b, r, _EXP_POLY), b.fmul(r, r)), r), _c(1.0))


def _exp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    xc = _intrinsic(b, "llvm.maxnum", _intrinsic(b, "llvm.minnum", x, _c(88.8)), _c(-104.0))
    n = _intrinsic(b, "llvm.rint", b.fmul(xc, _c(_LOG2E)))
    y = _exp_reduced(b, xc, n)
    ni = b.fptosi(n, I32)
    half = b.ashr(ni, ir.Constant(I32, 1))
    y = b.fmul(b.fmul(y, _pow2(b, half)), _pow2(b, b.sub(ni, half)))
    y = b.select(b.fcmp_ordered(">", x, _c(88.72283935546875)), _c(float("inf")), y)
    y = b.select(b.fcmp_ordered("<", x, _c(-103.972084)), _c(0.0), y)
    return _select_nan(b, x, y)


def _log(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    tiny = b.fcmp_ordered("<", x, _c(1.17549435e-38))
    xs = b.select(tiny, b.fmul(x, _c(8388608.0)), x)  # lift subnormals by 2**23
    bits = b.bitcast(xs, I32)
    e = b.sub(b.lshr(bits, ir.Constant(I32, 23)), ir.Constant(I32, 126))
    e = b.select(tiny, b.sub(e, ir.Constant(I32, 23)), e)
    m = b.bitcast(b.or_(b.and_(bits, ir.Constant(I32, 0x807FFFFF)), ir.Constant(I32, 0x3F000000)), F32)
    small = b.fcmp_ordered("<", m, _c(0.707106781186547524))
    e = b.select(small, b.sub(e, ir.Constant(I32, 1)), e)
    m = b.fsub(b.select(small, b.fadd(m, m), m), _c(1.0))
    ef = b.sitofp(e, F32)
    z = b.fmul(m, m)
    y = _poly(
        b,
        m,
        [
            7.0376836292e-2,
            -1.1514610310e-1,
            1.1676998740e-1,
            -1.2420140846e-1,
            1.4249322787e-1,
            -1.6668057665e-1,
            2.0000714765e-1,
            -2.4999993993e-1,
            3.3333331174e-1,
        ],
    )
    y = b.fmul(b.fmul(y, m), z)
    y = b.fadd(y, b.fmul(ef, _c(-2.12194440e-4)))
    y = b.fsub(y, b.fmul(z, _c(0.5)))
    r = b.fadd(b.fadd(m, y), b.fmul(ef, _c(0.693359375)))
    r = b.select(b.fcmp_ordered("==", x, _c(float("inf"))), x, r)
    r = b.select(b.fcmp_ordered("==", x, _c(0.0)), _c(float("-inf")), r)
    r = b.select(b.fcmp_ordered("<", x, _c(0.0)), _c(float("nan")), r)
    return _select_nan(b, x, r)


def _exp_small(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp(x) for x in [0, 88]: _exp without the range handling, for tanh."""
    n = _intrinsic(b, "llvm.rint", b.fmul(x, _c(_LOG2E)))
    return b.fmul(_exp_reduced(b, x, n), _pow2(b, b.fptosi(n, I32)))


def _tanh(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    a = _intrinsic(b, "llvm.fabs", x)
    z = b.fmul(x, x)
    p = _poly(
        b, z, [-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1]
    )
    near0 = b.fadd(b.fmul(b.fmul(p, z), x), x)
    a9 = _intrinsic(b, "llvm.minnum", a, _c(9.0))  # tanh(9) rounds to 1 in float32
    far = b.fsub(_c(1.0), b.fdiv(_c(2.0), b.fadd(_exp_small(b, b.fadd(a9, a9)), _c(1.0))))
    far = _intrinsic(b, "llvm.copysign", far, x)
    return b.select(b.fcmp_unordered("<", a, _c(0.625)), near0, far)


def _erf(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    xc = _intrinsic(b, "llvm.maxnum", _intrinsic(b, "llvm.minnum", x, _c(4.0)), _c(-4.0))
    x2 = b.fmul(xc, xc)
    num = b.fmul(
        xc,
        _poly(
            b,
            x2,
            [
                -2.72614225801306e-10,
                2.77068142495902e-08,
                -2.10102402082508e-06,
                -5.69250639462346e-05,
                -7.34990630326855e-04,
                -2.95459980854025e-03,
                -1.60960333262415e-02,
            ],
        ),
    )
    den = _poly(
        b,
        x2,
        [
            -1.45660718464996e-05,
            -2.13374055278905e-04,
            -1.68282697438203e-03,
            -7.37332916720468e-03,
            -1.42647390514189e-02,
        ],
    )
    return _select_nan(b, x, b.fdiv(num, den))


BODIES: dict[str, Callable[[ir.IRBuilder, ir.Value], ir.Value]] = {
    "exp": _exp,
    "log": _log,
    "tanh": _tanh,
    "erf": _erf,
}


def math_function(module: ir.Module, name: str) -> ir.Function:
    """The module's internal float32 `name` function, emitted on first use."""
    symbol = f"kiln.{name}f"
    if symbol in module.globals:
        return module.globals[symbol]
    fn = ir.Function(module, ir.FunctionType(F32, [F32]), symbol)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = _ContractingBuilder(fn.append_basic_block())
    b.ret(BODIES[name](b, fn.args[0]))
    return fn
