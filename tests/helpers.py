"""Small builders shared by tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from ir.builder import GraphBuilder
from ir.graph import Graph


def mlp_graph(seed: int = 0, batch: int = 4) -> Graph:
    """x[batch, 8] → linear 16 → relu → linear 3 → softmax."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("mlp")
    x = b.input("x", (batch, 8))
    h = b.relu(
        b.linear(
            x,
            b.param("w1", rng.standard_normal((8, 16)).astype(np.float32)),
            b.param("b1", rng.standard_normal(16).astype(np.float32)),
        )
    )
    y = b.softmax(b.linear(h, b.param("w2", rng.standard_normal((16, 3)).astype(np.float32))))
    return b.build(y)


def two_input_graph():
    """add(a[2, 3], b[3]) and its compiled model."""
    b = GraphBuilder("two")
    g = b.build(b.add(b.input("a", (2, 3)), b.input("b", (3,))))
    return g, compile_model(g, name="two")


def kernel_function(kernel):
    """One CPU kernel compiled alone, as a ctypes function (bufs, begin, end)."""
    import ctypes
    import subprocess
    import tempfile
    from pathlib import Path

    from codegen import cabi, cpu

    module = cpu.optimize(cpu.build_module([kernel], "kernel_test"))
    with tempfile.TemporaryDirectory() as d:
        obj, so = Path(d) / "k.o", Path(d) / "k.so"
        obj.write_bytes(cpu.object_code(module))
        subprocess.run([cabi.c_compiler(), "-shared", str(obj), "-o", str(so)], check=True)
        fn = getattr(ctypes.CDLL(str(so)), f"kernel_test_{kernel.name}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    return fn


def kernel_pointers(kernel, arrays: tuple[np.ndarray, ...]):
    """The `bufs` array of a kernel's buffers (its params, in order) for a call."""
    import ctypes

    for buf, a in zip(kernel.params, arrays, strict=True):
        assert a.flags.c_contiguous and a.size == buf.numel and a.dtype == np.dtype(buf.dtype), buf.name
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])


def run_kernel(kernel, *arrays: np.ndarray) -> None:
    """Compile one CPU kernel alone and run it once over its whole range on `arrays`
    (its buffers, in order): a kernel-IR test without a graph around it."""
    loop = kernel.split_loop
    extent = int(loop.extent.value) if loop is not None else 1
    kernel_function(kernel)(kernel_pointers(kernel, arrays), 0, extent)


def run_c_program(source: str, so: Path, args: list[str], tool: str) -> list[str]:
    """Build `source` (main.c beside `so`, including its NAME.h) against the library and
    run it with `args`, plainly or ("valgrind") under memcheck, which must report no
    error and no definite leak; its stdout lines. Without valgrind: a skip, or under CI
    a failure (.ci/run installs it)."""
    if tool == "valgrind" and shutil.which("valgrind") is None:
        if os.environ.get("CI"):
            pytest.fail("valgrind is not installed (.ci/run installs it)")
        pytest.skip("valgrind is not installed")
    from codegen.cabi import c_compiler

    folder = so.parent
    (folder / "main.c").write_text(source)
    exe = folder / "main"
    subprocess.run(
        [c_compiler(), "-Wall", "-Werror", f"-I{folder}", str(folder / "main.c"), str(so),
         f"-Wl,-rpath,{folder}", "-lm", "-o", str(exe)],
        check=True,
    )  # fmt: skip
    prefix = ["valgrind", "--tool=memcheck", "--error-exitcode=99", "--leak-check=full",
              "--errors-for-leak-kinds=definite"] if tool == "valgrind" else []  # fmt: skip
    result = subprocess.run([*prefix, str(exe), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if tool == "valgrind":
        assert "ERROR SUMMARY: 0 errors" in result.stderr
    return result.stdout.splitlines()
