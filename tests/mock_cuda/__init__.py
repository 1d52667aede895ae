"""The mock CUDA driver (mock_cuda.c) and the kernels its launches run.

A --target cuda library loaded with KILN_LIBCUDA pointing at the mock runs its real
host code; each launch runs the cuda-sim build of the same kernel, which `kernels`
links with a table (mock_cuda.h) naming each GPU kernel's CPU entry point, grid, block
and argument sizes. Both are cached: the mock per source, the kernels like any build.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from math import prod
from pathlib import Path

import numpy as np

from codegen import cabi, gpu
from compiler import driver
from ir.graph import Graph

HERE = Path(__file__).parent


def build_mock() -> Path:
    """libcuda_mock.so, compiled with the system C compiler (once per source)."""
    source = (HERE / "mock_cuda.c").read_bytes() + (HERE / "mock_cuda.h").read_bytes()
    dest = driver.cache_dir() / f"mock-cuda-{hashlib.sha256(source).hexdigest()[:16]}"
    so = dest / "libcuda_mock.so"
    if not so.exists():
        staging = Path(tempfile.mkdtemp(prefix="mock-cuda.", dir=_ensure(driver.cache_dir())))
        cmd = [cabi.c_compiler(), "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Werror", f"-I{HERE}"]
        cmd += [str(HERE / "mock_cuda.c"), "-o", str(staging / so.name), "-ldl", "-pthread"]
        subprocess.run(cmd, check=True)
        _publish(staging, dest)
    return so


def table_source(lowered: driver.Lowered) -> str:
    """C for the kernel table of a cuda-sim lowering: GPU names, CPU entry points, the
    grid and block each kernel was scheduled for, and its arguments' bytes."""
    prefix = lowered.library.prefix
    lines = [f'#include "{HERE / "mock_cuda.h"}"', ""]
    rows = []
    for i, (call, launch) in enumerate(zip(lowered.calls, lowered.library.launches)):
        kernel = call.kernel
        grid, block = gpu.layout(kernel).launch
        sizes = [prod(b.shape) * np.dtype(b.dtype).itemsize for b in kernel.params]
        lines.append(f"void {launch.symbol}(void *const *bufs, int64_t begin, int64_t end);")
        lines.append(f"static const int64_t bytes_{i}[] = {{{', '.join(map(str, sizes)) or '0'}}};")
        rows.append(
            f'    {{"{kernel.name}", {launch.symbol}, {{{", ".join(map(str, grid))}}}, '
            f"{{{', '.join(map(str, block))}}}, {len(sizes)}, bytes_{i}}},"
        )
    assert all(launch.symbol.startswith(prefix) for launch in lowered.library.launches)
    lines += [
        "",
        '__attribute__((visibility("default"))) const kiln_mock_kernel kiln_mock_kernels[] = {',
        *rows,
        "};",
        f'__attribute__((visibility("default"))) const int kiln_mock_num_kernels = {len(rows)};',
    ]
    return "\n".join(lines) + "\n"


def kernels(graph: Graph, name: str, fuse: bool = True, cpu_name: str | None = None) -> Path:
    """The cuda-sim library of `graph` with its kernel table, for KILN_MOCK_KERNELS.
    `name` must be the cuda library's (the kernels are found by their GPU names)."""
    layout = hashlib.sha256((HERE / "mock_cuda.h").read_bytes() + Path(__file__).read_bytes()).hexdigest()
    key = driver._cache_key(graph, name, f"cuda-sim+mock {layout}", fuse, cpu_name)
    dest = driver.cache_dir() / key
    so = dest / f"{name}.so"
    if not so.exists():
        lowered = driver.lower_graph(graph, name, fuse, target="cuda-sim", cpu_name=cpu_name)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_ensure(driver.cache_dir())))
        driver.build(lowered, staging, (), extra_c=table_source(lowered))
        _publish(staging, dest)
    return so


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _publish(staging: Path, dest: Path) -> None:
    try:
        staging.rename(dest)  # atomic: readers see all of a build or none
    except OSError:  # another process finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
