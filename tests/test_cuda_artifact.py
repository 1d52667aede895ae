"""--target cuda libraries, run through the mock CUDA driver (tests/mock_cuda): the real
host code of the library (driver loading, image choice, device memory, copies, launches,
status words, errors) runs end to end, each launch running the cuda-sim build of the
same kernel. The results match the interpreter from Python and from C; valgrind finds
no memory error; every failure the driver can report becomes a message, never a crash."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from codegen.cabi import build_c_runner, c_compiler
from compiler.driver import compile_model, to_graph
from frontends.zoo.onnx_models import MNIST_CNN_PATH
from ir.builder import GraphBuilder
from ir.graph import Graph
from ir.interpreter import interpret
from runtime import KilnRuntimeError, load
from tests import mock_cuda
from tests.helpers import mlp_graph

needs_ptxas = pytest.mark.skipif(
    shutil.which("ptxas") is None and not os.environ.get("CI"),
    reason="ptxas is not installed (.ci/run installs it; under CI its absence fails)",
)
needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None and not os.environ.get("CI"),
    reason="valgrind is not installed (.ci/run installs it; under CI its absence fails)",
)

#: every variable the library or the mock reads
DRIVER_VARS = (
    "KILN_LIBCUDA",
    "KILN_CUDA_IMAGE",
    "KILN_MOCK_KERNELS",
    "KILN_MOCK_FAIL",
    "KILN_MOCK_CC",
    "KILN_MOCK_DEVICES",
    "KILN_MOCK_CHECK_EXIT",
)
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Build:
    """A cuda library (with its header and C runner) and the cuda-sim kernels the mock runs."""

    so: Path
    name: str
    graph: Graph
    kernels: Path
    runner: Path

    def env(self, mock: Path, **more: str) -> dict[str, str]:
        """The environment a process needs to run this library on the mock."""
        env = {k: v for k, v in os.environ.items() if k not in DRIVER_VARS}
        return env | {"KILN_LIBCUDA": str(mock), "KILN_MOCK_KERNELS": str(self.kernels)} | more


def cuda_build(model: object, name: str, dest: Path, cpu_name: str | None = None) -> Build:
    graph = to_graph(model)
    so = compile_model(model, name=name, target="cuda").save(dest / f"{name}.so")
    runner = build_c_runner(so, name, dest / f"{name}_runner")
    return Build(so, name, graph, mock_cuda.kernels(graph, name, cpu_name=cpu_name), runner)


@pytest.fixture(scope="session")
def mock() -> Path:
    return mock_cuda.build_mock()


#: the MNIST CNN's GPU kernels (`kiln inspect mnist_cnn.onnx --target cuda`)
CNN_KERNELS = 13


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Build:
    return cuda_build(MNIST_CNN_PATH, "mnist_cnn", tmp_path_factory.mktemp("cnn"))


@pytest.fixture
def on_mock(monkeypatch, mock):
    """Point this process's CUDA libraries at the mock (and the kernels of `build`)."""

    def use(build: Build, **more: str) -> None:
        for var in DRIVER_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, value in build.env(mock, **more).items():
            if var in DRIVER_VARS:
                monkeypatch.setenv(var, value)

    return use


def live(mock: Path) -> int:
    """Driver objects (allocations, modules, streams, events, contexts) the mock holds."""
    return ctypes.CDLL(str(mock)).kiln_mock_live()


def calls(mock: Path, fn: str) -> int:
    f = ctypes.CDLL(str(mock)).kiln_mock_calls
    f.argtypes, f.restype = [ctypes.c_char_p], ctypes.c_long
    return f(fn.encode())


def random_feeds(graph: Graph, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in graph.inputs]


def assert_matches(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(float(np.abs(e).max()), 1e-3))


def run_c(build: Build, feeds: list[np.ndarray], work: Path, env: dict[str, str], prefix: tuple = ()):
    """The C runner on feeds; returns (process, outputs read back)."""
    ins = []
    for i, x in enumerate(feeds):
        (work / f"in{i}.bin").write_bytes(np.ascontiguousarray(x).tobytes())
        ins.append(str(work / f"in{i}.bin"))
    outs = [str(work / f"out{j}.bin") for j in range(len(build.graph.outputs))]
    proc = subprocess.run([*prefix, str(build.runner), *ins, *outs], capture_output=True, text=True, env=env)
    got = []
    if proc.returncode == 0:
        for path, v in zip(outs, build.graph.outputs):
            got.append(np.frombuffer(Path(path).read_bytes(), v.type.np_dtype).reshape(v.type.shape))
    return proc, got


# ---------------------------------------------------------------------------- running
@needs_ptxas
def test_cnn_from_python_matches_the_interpreter(cnn, on_mock, mock, rng, capfd):
    on_mock(cnn)
    model = load(cnn.so)
    assert model.target == "cuda" and model.inputs[0].shape == (1, 1, 28, 28)
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    expected = interpret(cnn.graph, [x])
    for _ in range(3):  # the arena is reused run after run
        assert_matches(model.run(x), expected)
    assert (
        model.device == "device 0, Kiln mock GPU (compute capability 8.0, driver 12.8), running cubin sm_80"
    )
    model.set_num_threads(4)  # accepted, as by a CPU library; the GPU runs the kernels
    assert model.num_threads == 4
    model.set_profiling(True)
    model(x)
    times = model.kernel_times()
    assert len(times) == CNN_KERNELS and all(name.startswith("mnist_cnn_k") for name in times)
    assert all(t > 0 for t in times.values())
    del model
    assert live(mock) == 0  # destroy freed every allocation, the module, stream, events, context
    assert capfd.readouterr().err == ""


@needs_ptxas
def test_weights_go_up_once_and_each_run_launches_every_kernel(cnn, on_mock, mock, rng):
    on_mock(cnn)
    uploads, launches, copies_in = (
        calls(mock, f) for f in ("cuMemcpyHtoD_v2", "cuLaunchKernel", "cuMemcpyHtoDAsync_v2")
    )
    model = load(cnn.so).create()
    assert calls(mock, "cuMemcpyHtoD_v2") == uploads + 1
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    for _ in range(3):
        model(x)
    assert calls(mock, "cuMemcpyHtoD_v2") == uploads + 1
    assert calls(mock, "cuLaunchKernel") == launches + 3 * CNN_KERNELS
    assert calls(mock, "cuMemcpyHtoDAsync_v2") == copies_in + 3


@needs_ptxas
@pytest.mark.parametrize(
    "cc,only,image",
    [
        ("80", "", "cubin sm_80"),
        ("86", "", "cubin sm_80"),  # a cubin runs on later minor versions of its architecture
        ("90", "", "cubin sm_90"),
        ("100", "", "PTX sm_90"),  # no cubin for 10.0: the newest PTX, compiled by the driver
        ("90", "ptx", "PTX sm_90"),
        ("89", "ptx", "PTX sm_80"),
    ],
)
def test_the_image_suits_the_device(cnn, on_mock, rng, cc, only, image):
    on_mock(cnn, KILN_MOCK_CC=cc, KILN_CUDA_IMAGE=only)
    model = load(cnn.so)
    assert model.device.endswith(f"compute capability {cc[:-1]}.{cc[-1]}, driver 12.8), running {image}")
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    assert_matches(model.run(x), interpret(cnn.graph, [x]))


@needs_ptxas
def test_cnn_from_c_matches_the_interpreter(cnn, mock, rng, tmp_path):
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    proc, got = run_c(cnn, [x], tmp_path, cnn.env(mock, KILN_MOCK_CHECK_EXIT="1"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert_matches(got, interpret(cnn.graph, [x]))


@needs_ptxas
def test_run_device_takes_device_buffers(cnn, on_mock, mock, rng):
    """Buffers the caller allocated with the driver: no copies by the library."""
    on_mock(cnn)
    model = load(cnn.so).create()
    cu = ctypes.CDLL(str(mock))
    ptr = ctypes.c_ulonglong
    ctx = ctypes.c_void_p()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0 and cu.cuCtxPushCurrent_v2(ctx) == 0
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    y = np.zeros((1, 10), np.float32)
    d_x, d_y = ptr(), ptr()
    assert cu.cuMemAlloc_v2(ctypes.byref(d_x), ctypes.c_size_t(x.nbytes)) == 0
    assert cu.cuMemAlloc_v2(ctypes.byref(d_y), ctypes.c_size_t(y.nbytes)) == 0
    cu.cuMemcpyHtoD_v2.argtypes = [ptr, ctypes.c_void_p, ctypes.c_size_t]
    cu.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ptr, ctypes.c_size_t, ctypes.c_void_p]
    cu.cuMemFree_v2.argtypes = [ptr]
    assert cu.cuMemcpyHtoD_v2(d_x, x.ctypes.data, x.nbytes) == 0
    copies = calls(mock, "cuMemcpyHtoDAsync_v2")
    model.run_device([d_x.value], [d_y.value])
    assert calls(mock, "cuMemcpyHtoDAsync_v2") == copies
    assert cu.cuMemcpyDtoHAsync_v2(y.ctypes.data, d_y, y.nbytes, None) == 0
    assert_matches([y], interpret(cnn.graph, [x]))
    with pytest.raises(TypeError, match="takes 1 input and 1 output device buffers"):
        model.run_device([d_x.value], [])
    with pytest.raises(KilnRuntimeError, match=r"input 0 \(input\) is NULL"):
        model.run_device([0], [d_y.value])
    for d in (d_x, d_y):
        assert cu.cuMemFree_v2(d) == 0
    assert cu.cuCtxPopCurrent_v2(ctypes.byref(ctx)) == 0 and cu.cuDevicePrimaryCtxRelease_v2(0) == 0


@needs_ptxas
def test_the_library_lends_device_memory(tmp_path, on_mock, mock, rng):
    """NAME_alloc / NAME_upload / NAME_download / NAME_free (CompiledModel.alloc, a
    DeviceBuffer): state kept on the GPU between runs, with no CUDA library of the
    host's own; what the host does not free, destroy does."""
    from ir.errors import KilnError

    build = cuda_build(mlp_graph(1), "lender", tmp_path)
    on_mock(build)
    model = load(build.so)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    d_x, d_y = model.alloc(x.nbytes, "x on the GPU"), model.alloc(4 * 3 * 4, "y on the GPU")
    d_x.upload(x)
    model.run_device([d_x.address], [d_y.address])
    assert_matches([d_y.download(np.empty((4, 3), np.float32))], model.run(x))
    with pytest.raises(ValueError, match=r"x on the GPU has 128 bytes: 64 bytes at offset 100 do not fit"):
        d_x.upload(np.zeros(16, np.float32), offset=100)
    assert model._fn["free"](model._handle, 12345) == 1
    assert model.last_error() == "free: 0x3039 is not a live buffer of this instance (lender_alloc's)"
    d_x.free()
    d_x.free()  # once only
    with pytest.raises(KilnError, match="x on the GPU was freed"):
        d_x.upload(x)
    os.environ["KILN_MOCK_FAIL"] = "cuMemAlloc_v2"
    try:
        with pytest.raises(KilnRuntimeError, match=r"lender_alloc failed for the state: allocating a device "
                           r"buffer \(1024 bytes\) on device 0, .*CUDA_ERROR_OUT_OF_MEMORY"):  # fmt: skip
            model.alloc(1024, "the state")
    finally:
        del os.environ["KILN_MOCK_FAIL"]
    with pytest.raises(KilnError, match="is a CPU library: device memory needs one compiled for cuda"):
        compile_model(mlp_graph(1), name="lender_cpu").alloc(4)
    model.alloc(64).address = 0  # as if the host forgot it: destroy frees it
    del model, d_x, d_y
    gc.collect()
    assert live(mock) == 0


@needs_ptxas
def test_instances_run_on_separate_threads(cnn, on_mock, rng):
    on_mock(cnn)
    first = load(cnn.so)
    models = [first.create(), first.instance(), first.instance()]
    xs = [rng.standard_normal((1, 1, 28, 28)).astype(np.float32) for _ in models]
    expected = [interpret(cnn.graph, [x])[0] for x in xs]
    errors: list[BaseException] = []

    def work(model, x, e):
        try:
            for _ in range(20):
                np.testing.assert_allclose(model(x), e, rtol=1e-4, atol=1e-6)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=args) for args in zip(models, xs, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@needs_ptxas
def test_a_failed_check_is_reported_like_the_cpu_library(tmp_path, on_mock, rng):
    """A kernel's check sets its status word on the GPU; the run reads it back."""
    b = GraphBuilder("g")
    data, idx = b.input("data", (5, 3)), b.input("idx", (4,), "int64")
    build = cuda_build(b.build(b.gather(data, idx, name="embedding")), "gather_cuda", tmp_path)
    on_mock(build)
    model = load(build.so)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(model(x, np.array([0, 4, -5, 2])), x[[0, 4, 0, 2]])
    for bad in ([0, 5, 1, 2], [-6, 0, 0, 0]):
        with pytest.raises(KilnRuntimeError, match=r"node embedding \(gather\): .*outside \[-5, 5\)"):
            model(x, np.array(bad))
    np.testing.assert_array_equal(model(x, np.array([1, 1, 1, 1])), x[[1, 1, 1, 1]])  # recovers


# ---------------------------------------------------------------------------- failures
WHERE = r"device 0, Kiln mock GPU \(compute capability 8\.0, driver 12\.8\)"
FAILURES = [  # the environment, where it fails, what the message says
    pytest.param(
        {"KILN_LIBCUDA": "/nonexistent/libcuda.so.1"},
        "create",
        r"no CUDA driver: cannot load /nonexistent/libcuda.so.1 \(.*No such file.*\); is the NVIDIA driver",
        id="no-libcuda",
    ),
    pytest.param(
        {"KILN_LIBCUDA": "libm.so.6"},
        "create",
        r"the CUDA driver libm.so.6 has no cuInit: it is older than this library needs",
        id="not-a-driver",
    ),
    pytest.param(
        {"KILN_MOCK_DEVICES": "0"},
        "create",
        r"no CUDA device: the driver \(.*\) finds none \(cuInit: CUDA_ERROR_NO_DEVICE \(100\)",
        id="no-device",
    ),
    pytest.param(
        {"KILN_MOCK_CC": "75"},
        "create",
        r"device 0, Kiln mock GPU \(compute capability 7\.5, driver 12\.8\) can run none of this "
        r"library's images \(cubin sm_80, cubin sm_90, PTX sm_80, PTX sm_90;",
        id="device-too-old",
    ),
    pytest.param(
        {"KILN_MOCK_CC": "100", "KILN_MOCK_FAIL": "cuModuleLoadDataEx"},
        "create",
        r"\(compute capability 10\.0, driver 12\.8\) could not load any of this library's images "
        r"\(cubin sm_80, cubin sm_90, PTX sm_80, PTX sm_90\); "
        r"PTX sm_90: CUDA_ERROR_INVALID_PTX \(218\): a PTX JIT compilation failed; "
        r"JIT log: ptxas fatal   : the mock driver was told to fail \(KILN_MOCK_FAIL\); PTX sm_80: ",
        id="image-rejected",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuDevicePrimaryCtxRetain"},
        "create",
        rf"cuDevicePrimaryCtxRetain on {WHERE}: CUDA_ERROR_UNKNOWN \(999\)",
        id="context",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuModuleGetFunction@4"},
        "create",
        r"kernel k3_im2col \(node .* \(im2col\)\) is not in the loaded image: "
        r"cuModuleGetFunction: CUDA_ERROR_UNKNOWN",
        id="kernel-missing",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuMemAlloc_v2@2"},
        "create",
        rf"allocating the weights \(373312 bytes\) on {WHERE}, running cubin sm_80: "
        r"cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY \(2\): out of memory",
        id="out-of-memory",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuMemAlloc_v2@3"},
        "run",
        rf"allocating input \(3136 bytes\) on {WHERE}, running cubin sm_80: cuMemAlloc: "
        r"CUDA_ERROR_OUT_OF_MEMORY",
        id="staging",  # made by the first run: run_device alone needs none
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuMemcpyHtoD_v2"},
        "create",
        r"uploading the weights \(373312 bytes\): cuMemcpyHtoD: CUDA_ERROR_ILLEGAL_ADDRESS",
        id="weights-upload",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuMemcpyHtoDAsync_v2"},
        "run",
        r"copying input 0 \(input, 3136 bytes\) to the device: "
        r"cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS \(700\)",
        id="copy-in",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuLaunchKernel@3"},
        "run",
        r"kernel k2_max_pool2d \(node .* \(max_pool2d\)\): cuLaunchKernel: "
        r"CUDA_ERROR_LAUNCH_FAILED \(719\): unspecified launch failure",
        id="launch",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuMemcpyDtoHAsync_v2=1"},
        "run",
        r"copying output 0 \(probabilities, 40 bytes\) from the device: "
        r"cuMemcpyDtoHAsync: CUDA_ERROR_INVALID_VALUE",
        id="copy-out",
    ),
    pytest.param(
        {"KILN_MOCK_FAIL": "cuStreamSynchronize"},
        "run",
        r"running the kernels: cuStreamSynchronize: CUDA_ERROR_ILLEGAL_ADDRESS \(700\): "
        r"an illegal memory access",
        id="asynchronous",
    ),
]


@needs_ptxas
@pytest.mark.parametrize("env,stage,message", FAILURES)
def test_each_failure_gives_its_message_and_no_crash(cnn, mock, tmp_path, env, stage, message):
    """From C: the runner prints `create failed: MESSAGE` or `run failed: MESSAGE` and
    exits 1; the library prints nothing itself, and leaves no driver object behind."""
    x = np.zeros((1, 1, 28, 28), np.float32)
    proc, _ = run_c(cnn, [x], tmp_path, cnn.env(mock, KILN_MOCK_CHECK_EXIT="1", **env))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage} failed: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]


@needs_ptxas
def test_a_rejected_cubin_falls_back_to_ptx(cnn, mock, rng, tmp_path):
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    proc, got = run_c(cnn, [x], tmp_path, cnn.env(mock, KILN_MOCK_FAIL="cuModuleLoadDataEx@1"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert_matches(got, interpret(cnn.graph, [x]))


@needs_ptxas
def test_failures_from_python_raise_and_the_model_recovers(cnn, on_mock, mock, rng, capfd):
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    on_mock(cnn, KILN_LIBCUDA="/nonexistent/libcuda.so.1")
    with pytest.raises(KilnRuntimeError, match=r"mnist_cnn_create failed: no CUDA driver: cannot load"):
        load(cnn.so)(x)
    on_mock(cnn)
    model = load(cnn.so)
    os.environ["KILN_MOCK_FAIL"] = "cuLaunchKernel"
    try:
        with pytest.raises(KilnRuntimeError, match=r"mnist_cnn_run failed: kernel k0_im2col .*LAUNCH_FAILED"):
            model(x)
    finally:
        del os.environ["KILN_MOCK_FAIL"]
    assert_matches(model.run(x), interpret(cnn.graph, [x]))
    del model
    assert live(mock) == 0
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------- C, valgrind, linking
@needs_ptxas
@needs_valgrind
@pytest.mark.parametrize("fail", ["", "cuMemAlloc_v2@2", "cuLaunchKernel@5"])
def test_valgrind_memcheck_reports_no_errors(tmp_path, mock, fail):
    """The kernels the mock runs are built for AVX2, which valgrind decodes."""
    from compiler.demo import demo_input

    build = cuda_build(MNIST_CNN_PATH, "mnist_cnn", tmp_path, cpu_name="x86-64-v3")
    valgrind = ["valgrind", "--tool=memcheck", "--error-exitcode=99", "--leak-check=full"]
    valgrind.append("--errors-for-leak-kinds=definite")
    env = build.env(mock, KILN_MOCK_CHECK_EXIT="1", KILN_MOCK_FAIL=fail)
    proc, got = run_c(build, [demo_input()], tmp_path, env, tuple(valgrind))
    assert "ERROR SUMMARY: 0 errors" in proc.stderr, proc.stderr[-3000:]
    assert "mock_cuda:" not in proc.stderr
    if fail:
        assert proc.returncode == 1 and ("create failed" if "Alloc" in fail else "run failed") in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_matches(got, interpret(build.graph, [demo_input()]))


@needs_ptxas
def test_library_needs_no_cuda_to_link_or_load(cnn):
    needed = subprocess.run(["readelf", "-d", str(cnn.so)], capture_output=True, text=True, check=True).stdout
    libs = {line.split("[")[1].split("]")[0] for line in needed.splitlines() if "NEEDED" in line}
    assert libs <= {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2"}, libs
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(cnn.so)], capture_output=True, text=True
    ).stdout
    exported = {line.split()[-1] for line in symbols.splitlines()}
    assert all(s.startswith("mnist_cnn_") for s in exported if not s.startswith("_")), exported
    assert {"mnist_cnn_run_device", "mnist_cnn_create_device", "mnist_cnn_device"} <= exported
    header = cnn.so.with_suffix(".h").read_text()
    assert "KILN_LIBCUDA" in header and "int mnist_cnn_run_device(" in header


@needs_ptxas
def test_a_cpu_and_a_cuda_model_link_into_one_program(tmp_path, mock):
    """The header compiles with -Wall -Werror; create_device names a missing device."""
    cpu = compile_model(mlp_graph(1), name="mlp_cpu").save(tmp_path / "mlp_cpu.so")
    gpu = cuda_build(mlp_graph(1), "mlp_gpu", tmp_path)
    main = tmp_path / "main.c"
    main.write_text(r"""
#include <stdio.h>
#include "mlp_cpu.h"
#include "mlp_gpu.h"
int main(void) {
    float x[32], yc[12], yg[12];
    for (int i = 0; i < 32; i++) x[i] = (float)i / 32.0f - 0.5f;
    const void *in[] = {x};
    void *oc[] = {yc}, *og[] = {yg};
    mlp_cpu_model *c; mlp_gpu_model *g, *none;
    if (mlp_cpu_create(&c) || mlp_gpu_create(&g)) return 1;
    if (mlp_cpu_run(c, in, oc) || mlp_gpu_run(g, in, og)) return 2;
    if (mlp_gpu_create_device(&none, 3) == 0 || none) return 3;
    printf("%s\n", mlp_gpu_last_error(NULL));
    printf("%s\n", mlp_gpu_device(g));
    for (int i = 0; i < 12; i++) printf("%.9g %.9g\n", yc[i], yg[i]);
    mlp_cpu_destroy(c); mlp_gpu_destroy(g);
    return 0;
}
""")
    exe = tmp_path / "main"
    cmd = [c_compiler(), "-Wall", "-Wextra", "-Werror", f"-I{tmp_path}", str(main), str(cpu), str(gpu.so)]
    subprocess.run([*cmd, f"-Wl,-rpath,{tmp_path}", "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, env=gpu.env(mock), check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "no CUDA device 3: the driver sees 1 (0 to 0)"
    assert lines[1].startswith("device 0, Kiln mock GPU")
    values = np.array([[float(v) for v in line.split()] for line in lines[2:14]], np.float32)
    np.testing.assert_allclose(values[:, 1], values[:, 0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the CLI
@needs_ptxas
def test_cli_compiles_runs_and_benches_for_cuda(tmp_path, cnn, on_mock, rng, capsys):
    from compiler.cli import main

    out = tmp_path / "net.so"
    args = [
        "compile",
        str(MNIST_CNN_PATH),
        "--target",
        "cuda",
        "--emit",
        "ptx",
        "-o",
        str(out),
        "--name",
        "mnist_cnn",
    ]
    assert main(args) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"net.so", "mnist_cnn.h", "net.sm_80.ptx", "net.sm_90.ptx"}
    assert ".target sm_90" in (tmp_path / "net.sm_90.ptx").read_text()
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    on_mock(cnn)
    capsys.readouterr()
    run = ["run", str(out), "--name", "mnist_cnn", "--input", f"input={tmp_path / 'x.npy'}"]
    assert main([*run, "--target", "cuda", "-o", str(tmp_path / "y.npz")]) == 0
    assert_matches([np.load(tmp_path / "y.npz")["probabilities"]], interpret(cnn.graph, [x]))
    assert main([*run, "--target", "cpu"]) == 2
    assert "was compiled for the GPU (cuda), not for --target cpu" in capsys.readouterr().err
    assert main(["compile", str(MNIST_CNN_PATH), "--target", "cuda", "--emit", "asm", "-o", str(out)]) == 2


@needs_ptxas
def test_bench_times_a_cuda_build(mock, monkeypatch, tmp_path):
    from compiler.bench import bench

    graph = mlp_graph(3)
    build = cuda_build(graph, "bench_fused", tmp_path)  # the name bench gives its fused build
    for var, value in build.env(mock).items():
        if var in DRIVER_VARS:
            monkeypatch.setenv(var, value)
    result = bench(graph, "bench", (True,), repeats=3, min_seconds=0, target="cuda")[True]
    assert result.median_ms > 0 and result.kernels == 3


# ---------------------------------------------------------------------------- the five PyTorch models
SMALL = ["mlp", "mnist_cnn", "lstm"]
LARGE = ["transformer", "resnet18"]
TORCH_CASES = [
    *[pytest.param(name, 1) for name in SMALL],
    *[pytest.param(name, 1, marks=pytest.mark.slow) for name in LARGE],
    *[pytest.param(name, 32, marks=pytest.mark.slow) for name in SMALL + LARGE],
]


@needs_ptxas
@pytest.mark.parametrize("name,batch", TORCH_CASES)
def test_torch_models_on_the_mock_match_the_interpreter(name, batch, tmp_path, mock, on_mock, rng):
    pytest.importorskip("torch")
    from frontends.zoo.torch_models import export

    build = cuda_build(export(name, batch), f"{name}_b{batch}", tmp_path)
    feeds = random_feeds(build.graph, rng)
    expected = interpret(build.graph, feeds)
    on_mock(build)
    assert_matches(load(build.so).run(*feeds), expected)
    if batch == 1:  # the C program runs the same host code; once per model is enough
        proc, got = run_c(build, feeds, tmp_path, build.env(mock, KILN_MOCK_CHECK_EXIT="1"))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert_matches(got, expected)


# ---------------------------------------------------------------------------- benchmarks/gpu.py
def test_gpu_benchmark_says_there_is_no_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DRIVER_VARS}
    env["KILN_LIBCUDA"] = "/nonexistent/libcuda.so.1"  # no GPU, even on a machine that has one
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout


@needs_ptxas
@pytest.mark.parametrize(
    "args,kernels",
    [
        (["--models", "mlp", "--batches", "1", "--no-matmul", "--train-models"], "mlp"),
        (["--models", "--train-models", "mlp", "--no-matmul"], "train_mlp"),
        (["--models", "--train-models", "--matmul-size", "64"], "matmul"),
    ],
)
def test_gpu_benchmark_runs_on_the_mock(tmp_path, mock, args, kernels):
    """Its every step but the comparisons with other GPU runtimes, on a small scale."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu import matmul_graph
    finally:
        sys.path.pop(0)
    from frontends.zoo.keras_models import train_step
    from frontends.zoo.torch_models import export

    pytest.importorskip("torch")
    if kernels == "matmul":
        graph, name = matmul_graph(64), "matmul"
    elif kernels == "train_mlp":
        graph, name = train_step("mlp", 32, np.random.default_rng(0))[0], "train_mlp"
    else:
        graph, name = to_graph(export("mlp", 1)), "mlp_b1"
    env = {k: v for k, v in os.environ.items() if k not in DRIVER_VARS}
    env |= {"KILN_LIBCUDA": str(mock), "KILN_MOCK_KERNELS": str(mock_cuda.kernels(graph, name))}
    report = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu.py"),
            *args,
            "--quick",
            "--jobs",
            "1",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device: Kiln mock GPU, compute capability 8.0, driver 12.8" in proc.stdout
    result = json.loads(report.read_text())
    assert [im["ok"] for im in result["images"]] == [True, True]
    for row in result["models"] + result["train_steps"]:
        assert row["max_err_over_max"] < 1e-4 and row["run_ms"] > 0 and row["run_device_ms"] > 0
    assert len(result["train_steps"]) == (kernels == "train_mlp")
    if result["matmul"]:
        assert result["matmul"]["max_err_over_max"] < 1e-4
    assert result["copy_gb_s"] > 0
