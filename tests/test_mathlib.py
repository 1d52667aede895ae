"""The inline math against numpy, in units in the last place: float32 exp/log/tanh/erf
and sigmoid (what the CPU and a GPU run), and float64 exp/log/tanh/erf and pow (what a GPU runs)."""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import re
import shutil

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir

from codegen import cpu, gpu, kir, nvptx
from codegen.llvm_emit import PTR, FunctionWriter
from compiler import compile_model
from ir.builder import GraphBuilder


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    spacing = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _run(op: str, x: np.ndarray) -> np.ndarray:
    b = GraphBuilder(op)
    return compile_model(b.build(b.op(op, b.input("x", x.shape))), name=f"ulp_{op}")(x)


def _sweep(lo: float, hi: float) -> np.ndarray:
    mags = np.geomspace(1e-30, hi, 200_000)
    return np.concatenate([np.linspace(lo, hi, 200_001), mags, -mags]).astype(np.float32)


@pytest.mark.parametrize(
    "op,exact,domain,max_ulp",
    [
        ("exp", np.exp, (-87.0, 87.0), 2),
        ("tanh", np.tanh, (-20.0, 20.0), 2),
        ("erf", np.vectorize(math.erf), (-6.0, 6.0), 8),
        # 1 / (1 + exp(-x)) rounds three times (numpy's float32 evaluation is 3.0 ulp
        # off); below -88.72 exp(-x) overflows float32, and the sigmoid is 0, as numpy's
        ("sigmoid", _sigmoid, (-88.72, 40.0), 2.5),
    ],
)
def test_accuracy_in_ulps(op, exact, domain, max_ulp):
    x = _sweep(*domain)
    x = x[(x >= domain[0]) & (x <= domain[1])]
    errors = ulp_error(_run(op, x), exact(x.astype(np.float64)))
    assert errors.max() <= max_ulp, f"{op}: {errors.max():.2f} ulp at x={x[errors.argmax()]}"


def test_log_accuracy_over_all_positive_floats():
    x = np.geomspace(1e-44, 3e38, 400_000).astype(np.float32)  # subnormals included
    errors = ulp_error(_run("log", x), np.log(x.astype(np.float64)))
    assert errors.max() <= 2, f"log: {errors.max():.2f} ulp at x={x[errors.argmax()]}"


# ---------------------------------------------------------------------------- inline float64 and pow
# What a GPU runs (FunctionWriter(libm=False), as the NVPTX backend writes it), compiled
# here for the host and run in-process.


needs_ptxas = pytest.mark.skipif(
    shutil.which("ptxas") is None and not os.environ.get("CI"), reason="ptxas is not installed"
)


def _inline(op: str, *arrays: np.ndarray) -> np.ndarray:
    """op over the arrays' elements by the inline (libm-free) code, JIT-compiled for this CPU."""
    n = arrays[0].size
    ins = [kir.Buffer(f"x{i}", a.dtype.name, (n,)) for i, a in enumerate(arrays)]
    out = kir.Buffer("y", arrays[0].dtype.name, (n,))
    k = kir.KernelBuilder("f", [*ins, out])
    with k.loop(n, kir.LoopKind.SERIAL) as i:
        xs = [buf.load_flat(i) for buf in ins]
        k.store(out, i, kir.binary(op, *xs) if len(xs) == 2 else kir.unary(op, xs[0]))
    kernel = k.finish()
    module = ir.Module("inline_math")
    module.triple, module.data_layout = cpu.target_machine().triple, str(cpu.target_machine().target_data)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * len(kernel.params)), "f")
    writer = FunctionWriter(fn, dict(zip(kernel.params, fn.args)), libm=False)
    writer.stmts(kernel.body)
    writer.finish()
    assert all(name.startswith("llvm.") for name in _declared(module)), _declared(module)
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )  # the JIT owns its target machine
    engine = llvm.create_mcjit_compiler(cpu.optimize(module), machine)
    engine.finalize_object()
    call = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * len(kernel.params))(engine.get_function_address("f"))
    flat = [np.ascontiguousarray(a).ravel() for a in arrays]
    y = np.empty_like(flat[0])
    call(*[a.ctypes.data for a in flat], y.ctypes.data)
    return y.reshape(arrays[0].shape)


def _declared(module: ir.Module) -> list[str]:
    """The functions a module calls but does not define."""
    return re.findall(r'^declare [^@]*@"?([\w.]+)', str(module), re.MULTILINE)


def ulp64(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(got - exact) / np.spacing(np.abs(exact))


def _sweep64(lo: float, hi: float) -> np.ndarray:
    mags = np.geomspace(1e-300, max(abs(lo), hi), 200_000)
    x = np.concatenate([np.linspace(lo, hi, 200_001), mags, -mags])
    return x[(x >= lo) & (x <= hi)]


@pytest.mark.parametrize(
    "op,exact,domain,max_ulp",
    [
        ("exp", np.exp, (-745.0, 709.7), 1),
        ("tanh", np.tanh, (-40.0, 40.0), 2),
        ("erf", np.vectorize(math.erf), (-8.0, 8.0), 1),
        # against 1 / (1 + exp(-x)) in x87's extended precision: three roundings
        (
            "sigmoid",
            lambda x: (1 / (1 + np.exp(-x.astype(np.longdouble)))).astype(np.float64),
            (-700.0, 40.0),
            2.5,
        ),
    ],
)
def test_float64_accuracy_in_ulps(op, exact, domain, max_ulp):
    x = _sweep64(*domain)
    errors = ulp64(_inline(op, x), exact(x))
    assert errors.max() <= max_ulp, f"{op}: {errors.max():.2f} ulp at x={x[errors.argmax()]!r}"


def test_float64_log_over_all_positive_doubles():
    x = np.concatenate([np.geomspace(5e-324, 1.7e308, 400_000), np.linspace(0.5, 2.0, 200_001)])
    errors = ulp64(_inline("log", x), np.log(x))
    assert errors.max() <= 1, f"log: {errors.max():.2f} ulp at x={x[errors.argmax()]!r}"


SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324, 1e-310, -1.0, 1.0, 709.8, -745.2, 1e300]


@pytest.mark.parametrize("op", ["exp", "log", "tanh", "erf", "sigmoid"])
def test_float64_special_values_as_numpy(op):
    x = np.array(SPECIALS)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    exact = {
        "exp": np.exp,
        "log": np.log,
        "tanh": np.tanh,
        "erf": np.vectorize(math.erf),
        "sigmoid": sigmoid,
    }[op]
    with np.errstate(all="ignore"):
        expected = exact(x)
    got = _inline(op, x)
    np.testing.assert_allclose(got, expected, rtol=np.finfo(np.float64).eps, atol=0)  # within 1 ulp
    assert (np.signbit(got) == np.signbit(expected))[~np.isnan(expected)].all()


def test_pow64_accuracy_over_wide_ranges():
    """Results from the subnormal edge to the overflow edge (|y·log x| up to 740), near
    x = 1 with huge y, and small integers: within 1 ulp of numpy's."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.exp(rng.uniform(-700, 700, 300_000)), rng.uniform(0, 4, 200_000),
                        rng.uniform(0.99, 1.01, 100_000)])  # fmt: skip
    y = np.concatenate([rng.uniform(-1, 1, 300_000) * 740 / np.maximum(np.abs(np.log(x[:300_000])), 1e-3),
                        rng.uniform(-60, 60, 200_000), rng.uniform(-1e5, 1e5, 100_000)])  # fmt: skip
    with np.errstate(all="ignore"):
        expected = np.power(x, y)
    got = _inline("pow", x, y)
    normal = np.isfinite(expected) & (np.abs(expected) >= np.finfo(np.float64).tiny)
    errors = ulp64(got[normal], expected[normal])
    worst = errors.argmax()
    assert errors.max() <= 1, f"pow: {errors.max():.2f} ulp at {x[normal][worst]!r}, {y[normal][worst]!r}"
    tiny = ~normal & np.isfinite(expected)  # subnormal results: within one subnormal step
    assert np.abs(got[tiny] - expected[tiny]).max(initial=0) <= 5e-324
    np.testing.assert_array_equal(got[~np.isfinite(expected)], expected[~np.isfinite(expected)])


def test_pow64_special_cases_as_numpy():
    """C99's table: zeros and infinities of either sign, ±1, NaN, negative bases with
    integer, odd and fractional exponents; signs of zero and infinity included."""
    values = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, -3.0, 2.5, -2.5, np.inf, -np.inf, np.nan]
    values.append(1e-310)
    pairs = np.array(list(itertools.product(values, values)))
    with np.errstate(all="ignore"):
        expected = np.power(pairs[:, 0], pairs[:, 1])
    got = _inline("pow", pairs[:, 0].copy(), pairs[:, 1].copy())
    same = (got == expected) & (np.signbit(got) == np.signbit(expected)) | np.isnan(got) & np.isnan(expected)
    close = np.isclose(got, expected, rtol=2e-16, atol=0)  # 1e-310 ** 0.5 and the like
    assert (same | close & np.isfinite(expected)).all(), pairs[~(same | close)]


def test_pow32_rounds_the_double_result():
    """float32 pow goes through double: within 1 ulp of the exact float64 power."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(0, 10, 200_000), np.exp(rng.uniform(-80, 80, 200_000))])
    x = x.astype(np.float32)
    y = rng.uniform(-8, 8, 400_000).astype(np.float32)
    with np.errstate(all="ignore"):
        exact = np.power(x.astype(np.float64), y.astype(np.float64))
    got = _inline("pow", x, y)
    ok = np.isfinite(exact) & (exact > np.finfo(np.float32).tiny) & (exact < np.finfo(np.float32).max)
    errors = np.abs(got[ok] - exact[ok]) / np.spacing(exact[ok].astype(np.float32)).astype(np.float64)
    assert errors.max() <= 1


def test_integer_pow_is_exact():
    base = np.repeat(np.arange(-20, 21, dtype=np.int64), 13)
    power = np.tile(np.arange(13, dtype=np.int64), 41)
    np.testing.assert_array_equal(_inline("pow", base, power), base**power)


def test_the_cpu_backend_keeps_libm_for_float64():
    x, y = kir.Buffer("x", "float64", (4,)), kir.Buffer("y", "float64", (4,))
    k = kir.KernelBuilder("k", [x, y])
    with k.loop(4) as i:
        k.store(y, i, kir.binary("pow", kir.unary("exp", x.load_flat(i)), x.load_flat(i)))
    assert {"exp", "pow"} <= set(_declared(cpu.build_module([k.finish()], "libm")))


@needs_ptxas
def test_ptxas_accepts_the_inline_math():
    kernels = []
    for dtype in ("float64", "float32", "int64"):
        x, y = kir.Buffer("x", dtype, (100,)), kir.Buffer("y", dtype, (100,))
        k = kir.KernelBuilder(f"math_{dtype}", [x, y])
        with gpu.grid(k, (1,), (128,)) as (_, (t,)):
            with k.when(t.lt(100)):
                v = x.load_flat(t)
                if dtype == "float64":
                    v = sum((kir.unary(op, v) for op in ("log", "tanh", "erf")), kir.unary("exp", v))
                k.store(y, t, kir.binary("pow", v, x.load_flat(t)))
        kernels.append(k.finish())
    for arch in nvptx.ARCHS:
        report = nvptx.ptxas(nvptx.ptx_module(kernels, arch), arch)  # ptx_module refuses outside calls
        assert all(f"Compiling entry function '{k.name}'" in report for k in kernels)
