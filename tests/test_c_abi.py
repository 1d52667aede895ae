"""The library from C: a program built against NAME.h runs the bundled CNN; valgrind
finds no memory error in it; two models link into one program."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from codegen.cabi import build_c_runner, c_compiler
from compiler import compile_model
from compiler.demo import demo_input
from compiler.driver import to_graph
from frontends.zoo.onnx_models import MNIST_CNN_PATH
from ir.builder import GraphBuilder
from ir.graph import Graph
from ir.interpreter import interpret
from tests.helpers import mlp_graph


def _cnn(work: Path, cpu_name: str | None) -> tuple[Path, Path]:
    so = compile_model(MNIST_CNN_PATH, name="mnist_cnn", cpu_name=cpu_name).save(work / "mnist_cnn.so")
    return so, build_c_runner(so, "mnist_cnn", work / "runner")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return _cnn(tmp_path_factory.mktemp("cnn"), None)


@pytest.fixture(scope="module")
def cnn_avx2(tmp_path_factory):
    """Valgrind cannot decode AVX-512, so memcheck runs the same kernels built for AVX2."""
    return _cnn(tmp_path_factory.mktemp("cnn_avx2"), "x86-64-v3")


def _run_c(cmd_prefix: list[str], runner: Path, x: np.ndarray, work: Path) -> subprocess.CompletedProcess:
    (work / "in.bin").write_bytes(x.tobytes())
    return subprocess.run(
        [*cmd_prefix, str(runner), str(work / "in.bin"), str(work / "out.bin")],
        capture_output=True,
        text=True,
    )


def test_c_program_matches_interpreter(cnn, tmp_path, rng):
    so, runner = cnn
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    result = _run_c([], runner, x, tmp_path)
    assert result.returncode == 0, result.stderr
    got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, interpret(to_graph(MNIST_CNN_PATH), [x])[0], rtol=1e-4, atol=1e-6)


def test_c_program_rejects_short_input_file(cnn, tmp_path):
    _, runner = cnn
    (tmp_path / "in.bin").write_bytes(b"\0" * 100)
    result = subprocess.run(
        [str(runner), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True, text=True
    )
    assert result.returncode == 1 and "expected 3136 bytes" in result.stderr


@pytest.mark.skipif(
    shutil.which("valgrind") is None and not os.environ.get("CI"),
    reason="valgrind is not installed (.ci/run installs it; under CI its absence fails)",
)
@pytest.mark.parametrize("threads", ["1", "2"])
def test_valgrind_memcheck_reports_no_errors(cnn_avx2, tmp_path, threads, monkeypatch):
    _, runner = cnn_avx2
    monkeypatch.setenv("KILN_NUM_THREADS", threads)
    result = _run_c(
        [
            "valgrind",
            "--tool=memcheck",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
        ],
        runner,
        demo_input(),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in result.stderr
    got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float32).reshape(1, 10)
    expected = interpret(to_graph(MNIST_CNN_PATH), [demo_input()])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _winograd_graph(rng: np.random.Generator) -> Graph:
    """A 64-channel 3x3 conv that runs as Winograd (odd output: tiles end mid-row), its
    residual add and ReLU fused into the output transform."""
    b = GraphBuilder("winograd")
    x = b.input("x", (1, 64, 9, 11))
    w = b.param("w", (0.05 * rng.standard_normal((64, 64, 3, 3))).astype(np.float32))
    y = b.conv2d(x, w, b.param("bias", rng.standard_normal(64).astype(np.float32)), pads=(1, 1, 1, 1))
    return b.build(b.relu(b.add(y, x)))


def _winograd_fused_graph(rng: np.random.Generator) -> Graph:
    """A 64-channel 3x3 conv whose 2 x 25 x 24 tiles make several blocks, so it runs as
    one winograd_conv2d (blocks of 2 tile rows, columns padded past the last tile; odd
    output: tiles end mid-row), its residual add and ReLU as the epilogue."""
    b = GraphBuilder("winograd_fused")
    x = b.input("x", (2, 64, 49, 47))
    w = b.param("w", (0.05 * rng.standard_normal((64, 64, 3, 3))).astype(np.float32))
    y = b.conv2d(x, w, b.param("bias", rng.standard_normal(64).astype(np.float32)), pads=(1, 1, 1, 1))
    return b.build(b.relu(b.add(y, x)))


def _lstm_graph(rng: np.random.Generator) -> Graph:
    """An LSTM of constant Rᵀ (packed in panels), 8 rows: a 6-row block and the rest."""
    b = GraphBuilder("lstm")
    hidden, batch = 64, 8  # 8 steps: 2^20 multiply-adds, enough for a block of rest rows
    constants = {
        "rt": 0.2 * rng.standard_normal((hidden, 4 * hidden)),
        "h0": rng.standard_normal((batch, hidden)),
        "c0": rng.standard_normal((batch, hidden)),
        "peep": rng.standard_normal(3 * hidden),
    }
    xw = b.input("xw", (8, batch, 4 * hidden))
    params = [b.param(n, a.astype(np.float32)) for n, a in constants.items()]
    return b.build(b.op("lstm", xw, *params, hidden=hidden))


def _team_lstm_graph(rng: np.random.Generator) -> Graph:
    """An LSTM of one batch row whose 128 units split into a team of two members, which
    meet at a barrier after every step."""
    b = GraphBuilder("team_lstm")
    hidden = 128
    xw = b.input("xw", (4, 1, 4 * hidden))
    rt = b.param("rt", (0.1 * rng.standard_normal((hidden, 4 * hidden))).astype(np.float32))
    shapes = {"h0": (1, hidden), "c0": (1, hidden), "peep": (3 * hidden,)}
    states = [b.param(n, rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()]
    return b.build(b.op("lstm", xw, rt, *states, hidden=hidden))


def _attention_graph(rng: np.random.Generator) -> Graph:
    """Self-attention of 2 heads over 37 positions: Q, K and V read through index chains
    from one reshaped input (copied for each), Q scaled on the way; the attention op's
    last step of rows overlapping and its 37 keys one masked column tile."""
    b = GraphBuilder("attention")
    x = b.input("x", (2, 37, 48))
    heads = b.reshape(x, shape=(2, 37, 2, 24))
    q = b.mul(b.transpose(heads, perm=(0, 2, 1, 3)), b.param("scale", np.array([0.2], np.float32)))
    kt = b.transpose(heads, perm=(0, 2, 3, 1))
    v = b.transpose(heads, perm=(0, 2, 1, 3))
    out = b.matmul(b.softmax(b.matmul(q, kt)), v)
    return b.build(b.reshape(b.transpose(out, perm=(0, 2, 1, 3)), shape=(2, 37, 48)))


def _k_blocks_graph(rng: np.random.Generator) -> Graph:
    """x @ xᵀ with a bias and ReLU: the transposed operand is not packed at compile time
    and its rows are 1 KiB apart, so its column panels are copied in blocks of k rows
    (on AVX2, 512 of the 600 and then 88), for steps of 42 rows (the last 4 more)."""
    b = GraphBuilder("k_blocks")
    x = b.mul(b.input("x", (1, 256, 600)), b.param("scale", np.array([0.05], np.float32)))
    product = b.matmul(x, b.transpose(x, perm=(0, 2, 1)))
    return b.build(b.relu(b.add(product, b.param("bias", rng.standard_normal(256).astype(np.float32)))))


def _stem_pool_graph(rng: np.random.Generator) -> Graph:
    """ResNet's stem: a 7x7 conv of stride 2, its ReLU and a 3x3 max pool of stride 2
    padded by 1, the pool inside the conv (a ring of conv rows; two bands of pooled
    rows, whose windows reach past the conv's edges)."""
    b = GraphBuilder("stem_pool")
    w = b.param("w", (rng.standard_normal((64, 3, 7, 7)) / 11).astype(np.float32))
    bias = b.param("bias", rng.standard_normal(64).astype(np.float32))
    conv = b.relu(b.conv2d(b.input("x", (1, 3, 64, 64)), w, bias, pads=(3, 3, 3, 3), strides=(2, 2)))
    return b.build(b.op("max_pool2d", conv, kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)))


def _streamed_columns_graph(rng: np.random.Generator, rows: int = 32, cols: int = 256) -> Graph:
    """`rows` rows by constant weights of `cols` columns: two threads split the weights'
    columns, each its part for every row (lower_matmul's streamed weights); at one row,
    the steps of column parts run last to first on odd runs (a C program's one run),
    and columns that end inside a tile are one more part; at 48 rows each thread runs
    its rows tile by tile."""
    name = {1: "alternate_columns" if cols % 64 == 0 else "ragged_columns", 32: "streamed_columns"}.get(
        rows, "tile_by_tile"
    )
    b = GraphBuilder(name)
    w = b.param("w", (rng.standard_normal((50, cols)) / 7).astype(np.float32))
    bias = b.param("bias", rng.standard_normal(cols).astype(np.float32))
    return b.build(b.relu(b.linear(b.input("x", (rows, 50)), w, bias)))


@pytest.mark.skipif(
    shutil.which("valgrind") is None and not os.environ.get("CI"),
    reason="valgrind is not installed (.ci/run installs it; under CI its absence fails)",
)
@pytest.mark.parametrize(
    "make",
    [
        _winograd_graph,
        _winograd_fused_graph,
        _lstm_graph,
        _team_lstm_graph,
        _attention_graph,
        _k_blocks_graph,
        _stem_pool_graph,
        _streamed_columns_graph,
        functools.partial(_streamed_columns_graph, rows=1),
        functools.partial(_streamed_columns_graph, rows=1, cols=200),
        functools.partial(_streamed_columns_graph, rows=48, cols=200),
    ],
    ids=[
        "winograd",
        "winograd_fused",
        "lstm",
        "team_lstm",
        "attention",
        "k_blocks",
        "stem_pool",
        "streamed_columns",
        "alternate_columns",
        "ragged_columns",
        "tile_by_tile",
    ],
)
def test_valgrind_memcheck_winograd_and_packed_recurrence(make, tmp_path, rng, monkeypatch):
    """The kernels whose loops end on overlapping vectors and partial tiles (Winograd's
    transforms, fused or not, attention's steps) or on a block of rest rows (a recurrence's), a
    team's barriers, index chains, a product's copied panels, a pool's ring of conv
    rows and a product's column parts, under memcheck, 2 threads (the team sized for
    them at compile time)."""
    monkeypatch.setenv("KILN_NUM_THREADS", "2")
    graph = make(rng)
    name = graph.name
    so = compile_model(graph, name=name, cpu_name="x86-64-v3").save(tmp_path / f"{name}.so")
    runner = build_c_runner(so, name, tmp_path / "runner")
    x = rng.standard_normal(graph.inputs[0].type.shape).astype(np.float32)
    valgrind = ["valgrind", "--tool=memcheck", "--error-exitcode=99"]
    result = _run_c(valgrind, runner, x, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in result.stderr
    expected = interpret(graph, [x])[0]
    got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_thread_stack_too_small_for_the_kernels_scratch_is_an_error(tmp_path, rng):
    """The fused Winograd conv keeps ~340 KiB of scratch on each running thread's stack:
    run from a process whose stack is 300 KiB, the model refuses with a clear error
    instead of overflowing it; with the usual 8 MiB it runs."""
    graph = _winograd_fused_graph(rng)
    so = compile_model(graph, name="small_stack", cpu_name="x86-64-v3").save(tmp_path / "small_stack.so")
    runner = build_c_runner(so, "small_stack", tmp_path / "runner")
    x = rng.standard_normal(graph.inputs[0].type.shape).astype(np.float32)
    small = _run_c(["bash", "-c", 'ulimit -s 300 && exec "$@"', "runner"], runner, x, tmp_path)
    assert small.returncode == 1, small.stderr
    refusal = re.search(r"this thread's stack \((\d+) KiB\) is too small for the \d+ KiB", small.stderr)
    # glibc reports the main thread's stack as the limit less what argv and the
    # environment take, to whole pages: all 300 KiB in some environments (CI's shell)
    assert refusal and int(refusal[1]) <= 300, small.stderr
    usual = _run_c(["bash", "-c", 'ulimit -s 8192 && exec "$@"', "runner"], runner, x, tmp_path)
    assert usual.returncode == 0, usual.stderr


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="Linux's huge pages")
def test_an_arena_of_a_huge_page_or_more_starts_on_one_and_is_advised_huge_pages(rng):
    """A model whose intermediates take 8 MiB gets an arena aligned to 2 MiB, and its
    mapping carries the huge-page advice (`hg` among smaps' VmFlags): a kernel that
    streams a large intermediate then costs a TLB entry per 2 MiB."""
    b = GraphBuilder("big_arena")
    x = b.input("x", (1024, 1024))
    model = compile_model(b.build(b.matmul(b.transpose(x, perm=(1, 0)), x)), name="big_arena")
    value = rng.standard_normal((1024, 1024)).astype(np.float32)
    np.testing.assert_allclose(model(value), value.T @ value, rtol=1e-4, atol=1e-3)
    arena = ctypes.c_void_p.from_address(model._handle.value).value  # the instance's first member
    assert arena % (2 << 20) == 0, hex(arena)
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", first):
            low, high = (int(v, 16) for v in first.split("-"))
            inside = low <= arena < high
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    assert flags is not None and "hg" in flags, flags


def test_two_models_link_into_one_program(tmp_path, rng):
    """Prefixes keep symbols apart: mlp_a and mlp_b, different weights, one executable."""
    libs = []
    for name, seed in (("mlp_a", 1), ("mlp_b", 2)):
        libs.append(compile_model(mlp_graph(seed), name=name).save(tmp_path / f"{name}.so"))
    main = tmp_path / "main.c"
    main.write_text(r"""
#include <stdio.h>
#include "mlp_a.h"
#include "mlp_b.h"
int main(void) {
    float x[32], ya[12], yb[12];
    for (int i = 0; i < 32; i++) x[i] = (float)i / 32.0f - 0.5f;
    const void *in[] = {x};
    void *oa[] = {ya}, *ob[] = {yb};
    mlp_a_model *a; mlp_b_model *b;
    if (mlp_a_create(&a) || mlp_b_create(&b)) return 1;
    if (mlp_a_run(a, in, oa) || mlp_b_run(b, in, ob)) return 2;
    if (mlp_a_run(a, NULL, oa) == 0) return 3;
    printf("%s\n", mlp_a_last_error(a));
    for (int i = 0; i < 12; i++) printf("%.9g %.9g\n", ya[i], yb[i]);
    printf("%d %s %lld\n", mlp_a_num_inputs(), mlp_a_input_name(0), (long long)mlp_a_input_shape(0)[1]);
    mlp_a_destroy(a); mlp_b_destroy(b);
    return 0;
}
""")
    exe = tmp_path / "main"
    subprocess.run(
        [
            c_compiler(),
            "-Wall",
            "-Werror",
            f"-I{tmp_path}",
            str(main),
            *map(str, libs),
            f"-Wl,-rpath,{tmp_path}",
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "inputs is NULL"
    values = np.array([[float(v) for v in line.split()] for line in out[1:13]], np.float32)
    x = (np.arange(32, dtype=np.float32) / 32 - 0.5).reshape(4, 8)
    for col, seed in ((0, 1), (1, 2)):
        expected = interpret(mlp_graph(seed), [x])[0].ravel()
        np.testing.assert_allclose(values[:, col], expected, rtol=1e-5, atol=1e-6)
    assert out[13] == "1 x 8"


def test_library_depends_only_on_libc_libm_pthread(cnn):
    so, _ = cnn
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    needed = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True).stdout
    libs = {line.split("[")[1].split("]")[0] for line in needed.splitlines() if "NEEDED" in line}
    assert libs <= {"libc.so.6", "libm.so.6", "libpthread.so.0"}, libs
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines()}
    assert all(s.startswith("mnist_cnn_") for s in exported if not s.startswith("_")), exported
