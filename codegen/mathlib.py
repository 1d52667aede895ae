"""exp, log, tanh, erf (and pow, for a GPU) as straight-line LLVM IR.

float32: LLVM turns `llvm.exp.f32` into a call to libm's expf, which its vectorizer
cannot widen. These versions are plain arithmetic (Cephes polynomials for exp, log
and tanh; the rational erf approximation Eigen and XLA use), emitted once per module
as internal always-inline functions, so a loop that calls them vectorizes, and the
same code is valid on NVPTX. Accuracy: within 2 ulp of the correctly rounded result
over the float range (tests/test_mathlib.py sweeps it).

float64 and pow: the CPU calls libm; a GPU has none, so the NVPTX backend uses the
inline versions below (fdlibm's exp and erf, Cephes' tanh, a table-driven log in
double-double; pow as exp(y·log x) with log and the product in double-double), each
within 1 ulp of numpy but tanh (2 ulp): see each function, and tests/test_mathlib.py.
"""

from __future__ import annotations

from collections.abc import Callable

from llvmlite import ir

F32 = ir.FloatType()
F64 = ir.DoubleType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I1 = ir.IntType(1)


class _ContractingBuilder(ir.IRBuilder):
    """An IRBuilder whose float adds and multiplies may fuse into FMAs ("contract"),
    but for `rounded` products, whose rounding a double-double computation relies on."""

    def fadd(self, lhs, rhs, name="", flags=()):
        return super().fadd(lhs, rhs, name, flags=("contract", *flags))

    def fsub(self, lhs, rhs, name="", flags=()):
        return super().fsub(lhs, rhs, name, flags=("contract", *flags))

    def fmul(self, lhs, rhs, name="", flags=()):
        return super().fmul(lhs, rhs, name, flags=("contract", *flags))

    def rounded(self, lhs, rhs):
        """lhs * rhs rounded, never fused into a later add (nor by ptxas)."""
        return super().fmul(lhs, rhs)


def _c(v: float) -> ir.Constant:
    return ir.Constant(F32, v)


def _poly(b: ir.IRBuilder, x: ir.Value, coeffs: list[float]) -> ir.Value:
    """Horner: coeffs[0] * x^(n-1) + ... + coeffs[-1]."""
    acc = ir.Constant(x.type, coeffs[0])
    for c in coeffs[1:]:
        acc = b.fadd(b.fmul(acc, x), ir.Constant(x.type, c))
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


def _sigmoid(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """1 / (1 + exp(-x)), with exp(-x) as _exp computes it but for its range handling,
    which the sigmoid needs little of: -x clamped to [-87, 89], where 2**(n-1) is a
    normal float (n the exponent of the reduction), and e = y * 2**(n-1) * 2 overflows
    to inf exactly where exp does (-x > 88.72: the sigmoid's 0); where -x < -87, 1 + e
    rounds to 1 whatever e is. NaN stays NaN. About two thirds of the instructions of
    1 / (1 + _exp(-x)), which the recurrences' cells run three times a unit."""
    z = _intrinsic(b, "llvm.maxnum", _intrinsic(b, "llvm.minnum", b.fneg(x), _c(89.0)), _c(-87.0))
    n = _intrinsic(b, "llvm.rint", b.fmul(z, _c(_LOG2E)))
    y = _exp_reduced(b, z, n)
    half = _pow2(b, b.sub(b.fptosi(n, I32), ir.Constant(I32, 1)))
    e = b.fmul(b.fmul(y, half), _c(2.0))
    return _select_nan(b, x, b.fdiv(_c(1.0), b.fadd(e, _c(1.0))))


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


# ---------------------------------------------------------------------------- float64
# fdlibm's constants: ln 2 split so that k * _LN2_HI is exact for |k| < 2**20


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP64_POLY = [  # fdlibm e_exp.c P5..P1
    4.13813679705723846039e-08,
    -1.65339022054652515390e-06,
    6.61375632143793436117e-05,
    -2.77777777770155933842e-03,
    1.66666666666666019037e-01,
]
#: log(1 + j/16) for j in -5..7 as double-double (hi, lo), from mpmath at 200 bits
_LOG_TABLE = [
    (-0.3746934494414107, 3.9243112288632396e-18),
    (-0.2876820724517809, -2.607160616442564e-17),
    (-0.2076393647782445, -1.2053243216686129e-17),
    (-0.13353139262452263, 3.664457663660085e-18),
    (-0.06453852113757118, 6.470486661692933e-18),
    (0.0, 0.0),
    (0.06062462181643484, 2.6424025938726934e-18),
    (0.11778303565638346, -1.1971685747593677e-18),
    (0.17185025692665923, -6.0224538210113705e-18),
    (0.22314355131420976, -9.091270597324799e-18),
    (0.27193371548364176, 7.83319637697442e-19),
    (0.3184537311185346, 2.7114779367326236e-17),
    (0.3629054936893685, -2.1492361455310972e-17),
]


def _d(v: float) -> ir.Constant:
    return ir.Constant(F64, v)


def _fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """x * y + z with one rounding: the exact error of a product, for double-double."""
    return _intrinsic(b, "llvm.fma", x, y, z)


def _pow2_64(b: ir.IRBuilder, n: ir.Value) -> ir.Value:
    """2**n as a double, for integer n (i64) in [-1022, 1023]."""
    return b.bitcast(b.shl(b.add(n, ir.Constant(I64, 1023)), ir.Constant(I64, 52)), F64)


def _exp64_dd(b: ir.IRBuilder, x: ir.Value, dx: ir.Value) -> ir.Value:
    """exp(x + dx), dx a finite correction below ulp(x) (fdlibm's e_exp: x - k ln 2 = hi - lo
    reduced exactly, then exp(r) = 1 + r + r·c / (2 - c) with a degree-5 minimax c; dx
    joins lo). Within 1 ulp; overflows to inf and underflows to 0 as exp does."""
    xc = _intrinsic(b, "llvm.maxnum", _intrinsic(b, "llvm.minnum", x, _d(710.0)), _d(-746.0))
    k = _intrinsic(b, "llvm.rint", b.fmul(xc, _d(_INV_LN2)))
    hi = b.fsub(xc, b.fmul(k, _d(_LN2_HI)))
    lo = b.fsub(b.fmul(k, _d(_LN2_LO)), dx)
    r = b.fsub(hi, lo)
    t = b.fmul(r, r)
    c = b.fsub(r, b.fmul(t, _poly(b, t, _EXP64_POLY)))
    y = b.fsub(_d(1.0), b.fsub(b.fsub(lo, b.fdiv(b.fmul(r, c), b.fsub(_d(2.0), c))), hi))
    ki = b.fptosi(k, I64)
    half = b.ashr(ki, ir.Constant(I64, 1))  # two factors: 2**k alone may not be a double
    y = b.fmul(b.fmul(y, _pow2_64(b, half)), _pow2_64(b, b.sub(ki, half)))
    return _select_nan(b, x, y)


def _exp64(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    return _exp64_dd(b, x, _d(0.0))


def _two_sum(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(s, e) with s = fl(x + y) and s + e = x + y exactly (Knuth)."""
    s = b.fadd(x, y)
    v = b.fsub(s, x)
    return s, b.fadd(b.fsub(x, b.fsub(s, v)), b.fsub(y, v))


def _log_table(b: ir.IRBuilder, j: ir.Value) -> tuple[ir.Value, ir.Value]:
    """log(1 + j/16) as (hi, lo), read from the module's constant table."""
    name = "kiln.log_table"
    table = b.module.globals.get(name)
    if table is None:
        typ = ir.ArrayType(F64, 2 * len(_LOG_TABLE))
        table = ir.GlobalVariable(b.module, typ, name)
        table.linkage = "internal"
        table.global_constant = True
        table.initializer = ir.Constant(typ, [v for pair in _LOG_TABLE for v in pair])
    at = b.add(b.mul(j, ir.Constant(I64, 2)), ir.Constant(I64, 10))  # j = -5 is entry 0
    hi = b.load(b.gep(table, [ir.Constant(I64, 0), at], inbounds=True))
    lo = b.load(b.gep(table, [ir.Constant(I64, 0), b.add(at, ir.Constant(I64, 1))], inbounds=True))
    return hi, lo


def _log64_dd(b: ir.IRBuilder, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """log(x) as hi + lo, to about 2**-70 absolute: what pow needs of y·log x.

    x = 2**e · m with m in [√½, √2); c = 1 + j/16 is m to the nearest 16th, so
    log m = log c + 2·atanh(s) with s = (m - c) / (m + c), |s| < 0.023, where the
    Taylor series 2s + 2s³/3 + ... + 2s¹³/13 is exact to 2**-80. s is carried as
    s + s_lo (the division's residual, exact through an FMA), log c comes from a
    table in double-double, and e·ln 2, log c and 2s are summed exactly. lo is 0 at
    the special values (0: -inf, inf: inf, negative or NaN: NaN)."""
    tiny = b.fcmp_ordered("<", x, _d(2.2250738585072014e-308))
    xs = b.select(tiny, b.fmul(x, _d(2.0**54)), x)  # subnormals lifted into the normal range
    bits = b.bitcast(xs, I64)
    e = b.sub(b.lshr(bits, ir.Constant(I64, 52)), ir.Constant(I64, 1022))
    e = b.select(tiny, b.sub(e, ir.Constant(I64, 54)), e)
    mant = b.and_(bits, ir.Constant(I64, 0x000FFFFFFFFFFFFF))  # no sign: j stays in the table
    m = b.bitcast(b.or_(mant, ir.Constant(I64, 0x3FE0000000000000)), F64)  # x = m 2**e, m in [½, 1)
    small = b.fcmp_ordered("<", m, _d(0.70710678118654752440))
    e = b.select(small, b.sub(e, ir.Constant(I64, 1)), e)
    m = b.select(small, b.fadd(m, m), m)
    j = _intrinsic(b, "llvm.rint", b.fmul(b.fsub(m, _d(1.0)), _d(16.0)))
    c = b.fadd(_d(1.0), b.fmul(j, _d(1 / 16)))
    d = b.fsub(m, c)  # exact: m and c are within a factor 2
    t, t_lo = _two_sum(b, m, c)
    s = b.fdiv(d, t)
    residual = b.fsub(_fma(b, b.fneg(s), t, d), b.fmul(s, t_lo))  # d - s (m + c)
    s_lo = b.fdiv(residual, t)
    z = b.fmul(s, s)
    series = _poly(b, z, [2 / 13, 2 / 11, 2 / 9, 2 / 7, 2 / 5, 2 / 3])
    tail = b.fadd(b.fmul(_d(2.0), s_lo), b.fmul(b.fmul(s, z), series))
    log_c, log_c_lo = _log_table(b, b.fptosi(j, I64))
    ef = b.sitofp(e, F64)
    head, err1 = _two_sum(b, b.fmul(ef, _d(_LN2_HI)), log_c)
    head, err2 = _two_sum(b, head, b.fmul(s, _d(2.0)))
    tail = b.fadd(b.fadd(err1, err2), b.fadd(b.fadd(b.fmul(ef, _d(_LN2_LO)), log_c_lo), tail))
    hi = b.fadd(head, tail)
    lo = b.fsub(tail, b.fsub(hi, head))
    special = None
    for cond, value in (
        (b.fcmp_ordered("==", x, _d(float("inf"))), x),
        (b.fcmp_ordered("==", x, _d(0.0)), _d(float("-inf"))),
        (b.fcmp_unordered("<", x, _d(0.0)), _d(float("nan"))),  # negative or NaN
    ):
        hi = b.select(cond, value, hi)
        special = cond if special is None else b.or_(special, cond)
    return hi, b.select(special, _d(0.0), lo)


def _log64(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """The double-double log rounded once: correctly rounded but for rare ties."""
    return _log64_dd(b, x)[0]


def _tanh64(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Cephes' tanh: below 0.625 x + x³·P(x²)/Q(x²), else 1 - 2 / (exp(2|x|) + 1); within
    2 ulp. tanh(22) rounds to 1 in double, so |x| is clamped there (inf included)."""
    a = _intrinsic(b, "llvm.fabs", x)
    z = b.fmul(x, x)
    p = _poly(b, z, [-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3])
    q = _poly(b, z, [1.0, 1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3])
    near0 = b.fadd(x, b.fmul(b.fmul(x, z), b.fdiv(p, q)))
    a22 = _intrinsic(b, "llvm.minnum", a, _d(22.0))
    far = b.fsub(_d(1.0), b.fdiv(_d(2.0), b.fadd(_exp64(b, b.fadd(a22, a22)), _d(1.0))))
    y = b.select(b.fcmp_unordered("<", a, _d(0.625)), near0, far)
    return _intrinsic(b, "llvm.copysign", y, x)  # tanh is odd: -0 stays -0


# fdlibm's s_erf.c: erf on [0, 0.84375) as x + x·P(x²)/Q(x²), on [0.84375, 1.25) as
# erx + P(|x| - 1)/Q(|x| - 1), beyond as 1 - exp(-x² - 0.5625 + R(1/x²)/S(1/x²)) / |x|
# (R/S in two pieces, split at 1/0.35). Coefficients highest degree first; the shorter
# polynomial of each pair is padded with zeros, so one Horner loop evaluates either.
_ERX = 8.45062911510467529297e-01
_ERF_P = ([0.0, 0.0, -2.37630166566501626084e-05, -5.77027029648944159157e-03, -2.84817495755985104766e-02,
           -3.25042107247001499370e-01, 1.28379167095512558561e-01],
          [-2.16637559486879084300e-03, 3.54783043256182359371e-02, -1.10894694282396677476e-01,
           3.18346619901161753674e-01, -3.72207876035701323847e-01, 4.14856118683748331666e-01,
           -2.36211856075265944077e-03])  # fmt: skip
_ERF_Q = ([0.0, -3.96022827877536812320e-06, 1.32494738004321644526e-04, 5.08130628187576562776e-03,
           6.50222499887672944485e-02, 3.97917223959155352819e-01, 1.0],
          [1.19844998467991074170e-02, 1.36370839120290507362e-02, 1.26171219808761642112e-01,
           7.18286544141962662868e-02, 5.40397917702171048937e-01, 1.06420880400844228286e-01,
           1.0])  # fmt: skip
_ERF_R = ([-9.81432934416914548592e00, -8.12874355063065934246e01, -1.84605092906711035994e02,
           -1.62396669462573470355e02, -6.23753324503260060396e01, -1.05586262253232909814e01,
           -6.93858572707181764372e-01, -9.86494403484714822705e-03],
          [0.0, -4.83519191608651397019e02, -1.02509513161107724954e03, -6.37566443368389627722e02,
           -1.60636384855821916062e02, -1.77579549177547519889e01, -7.99283237680523006574e-01,
           -9.86494292470009928597e-03])  # fmt: skip
_ERF_S = ([-6.04244152148580987438e-02, 6.57024977031928170135e00, 1.08635005541779435134e02,
           4.29008140027567833386e02, 6.45387271733267880336e02, 4.34565877475229228821e02,
           1.37657754143519042600e02, 1.96512716674392571292e01, 1.0],
          [0.0, -2.24409524465858183362e01, 4.74528541206955367215e02, 2.55305040643316442583e03,
           3.19985821950859553908e03, 1.53672958608443695994e03, 3.25792512996573918826e02,
           3.03380607434824582924e01, 1.0])  # fmt: skip


def _poly_pick(b: ir.IRBuilder, x: ir.Value, first: ir.Value, pair: tuple[list[float], ...]) -> ir.Value:
    """Horner over pair[0]'s coefficients where `first` holds, else pair[1]'s."""
    acc = None
    for c0, c1 in zip(*pair):
        c = b.select(first, _d(c0), _d(c1))
        acc = c if acc is None else b.fadd(b.fmul(acc, x), c)
    return acc


def _erf64(b: _ContractingBuilder, x: ir.Value) -> ir.Value:
    """fdlibm's erf (see the coefficients above): within 1 ulp."""
    a = _intrinsic(b, "llvm.fabs", x)
    near0 = b.fcmp_ordered("<", a, _d(0.84375))
    t = b.select(near0, b.fmul(x, x), b.fsub(a, _d(1.0)))
    ratio = b.fdiv(_poly_pick(b, t, near0, _ERF_P), _poly_pick(b, t, near0, _ERF_Q))
    middle = _intrinsic(b, "llvm.copysign", b.fadd(_d(_ERX), ratio), x)
    inner = b.select(near0, b.fadd(x, b.fmul(x, ratio)), middle)
    sq = b.rounded(a, a)
    sq_lo = _fma(b, a, a, b.fneg(sq))  # a² = sq + sq_lo
    s = b.fdiv(_d(1.0), sq)
    nearer = b.fcmp_ordered("<", a, _d(1 / 0.35))
    fit = b.fdiv(_poly_pick(b, s, nearer, _ERF_R), _poly_pick(b, s, nearer, _ERF_S))
    tail = _exp64_dd(b, b.fadd(b.fsub(_d(-0.5625), sq), fit), b.fneg(sq_lo))
    outer = _intrinsic(b, "llvm.copysign", b.fsub(_d(1.0), b.fdiv(tail, a)), x)
    outer = b.select(b.fcmp_ordered("<", a, _d(6.0)), outer, _intrinsic(b, "llvm.copysign", _d(1.0), x))
    return _select_nan(b, x, b.select(b.fcmp_ordered("<", a, _d(1.25)), inner, outer))


def _pow64(b: _ContractingBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """x**y = exp(y·log|x|), with log|x| and the product in double-double (an FMA gives
    the product's error), so the result is within 1 ulp (the tests' sweeps) even where
    y·log x is near ±709; then C99's cases: x**±0 = 1 (even NaN), 1**y = 1 (even NaN), (-1)**±inf = 1,
    odd integer y keeps x's sign (-0 and -inf too), x < 0 finite with y not an integer
    is NaN, |x| vs 1 decides ±inf powers, and NaN otherwise propagates."""
    a = _intrinsic(b, "llvm.fabs", x)
    lh, ll = _log64_dd(b, a)
    zh = b.rounded(y, lh)
    zl = b.fadd(_fma(b, y, lh, b.fneg(zh)), b.fmul(y, ll))
    zl = b.select(b.fcmp_ordered("<", _intrinsic(b, "llvm.fabs", zh), _d(float("inf"))), zl, _d(0.0))
    mag = b.select(b.fcmp_ordered("==", a, _d(1.0)), _d(1.0), _exp64_dd(b, zh, zl))
    integer = b.fcmp_ordered("==", _intrinsic(b, "llvm.floor", y), y)  # ±inf counts, NaN not
    half = b.fmul(y, _d(0.5))
    odd = b.and_(integer, b.fcmp_unordered("!=", _intrinsic(b, "llvm.floor", half), half))
    negative = b.icmp_signed("<", b.bitcast(x, I64), ir.Constant(I64, 0))  # -0 too
    r = b.select(b.and_(negative, odd), b.fneg(mag), mag)
    finite_negative = b.and_(b.fcmp_ordered("<", x, _d(0.0)), b.fcmp_ordered(">", x, _d(float("-inf"))))
    r = b.select(b.and_(finite_negative, b.xor(integer, ir.Constant(I1, 1))), _d(float("nan")), r)
    return b.select(b.fcmp_ordered("==", y, _d(0.0)), _d(1.0), r)


def _pow32(b: _ContractingBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """float32 pow through the double one: correctly rounded but for double rounding."""
    return b.fptrunc(_pow64(b, b.fpext(x, F64), b.fpext(y, F64)), F32)


BODIES: dict[tuple[str, str], Callable[..., ir.Value]] = {
    ("exp", "float32"): _exp,
    ("log", "float32"): _log,
    ("tanh", "float32"): _tanh,
    ("erf", "float32"): _erf,
    ("sigmoid", "float32"): _sigmoid,
    ("pow", "float32"): _pow32,
    ("exp", "float64"): _exp64,
    ("log", "float64"): _log64,
    ("tanh", "float64"): _tanh64,
    ("erf", "float64"): _erf64,
    ("sigmoid", "float64"): lambda b, x: b.fdiv(_d(1.0), b.fadd(_exp64(b, b.fneg(x)), _d(1.0))),
    ("pow", "float64"): _pow64,
}
ARITY = {"pow": 2}


def math_function(module: ir.Module, name: str, dtype: str = "float32") -> ir.Function:
    """The module's internal `name` function for `dtype`, emitted on first use."""
    typ = F32 if dtype == "float32" else F64
    symbol = f"kiln.{name}{'f' if dtype == 'float32' else ''}"
    if symbol in module.globals:
        return module.globals[symbol]
    fn = ir.Function(module, ir.FunctionType(typ, [typ] * ARITY.get(name, 1)), symbol)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = _ContractingBuilder(fn.append_basic_block())
    b.ret(BODIES[name, dtype](b, *fn.args))
    return fn
