"""The one-shot check of Kiln's --target cuda on a machine with an NVIDIA GPU.

    python benchmarks/gpu.py                      # everything, a few minutes
    python benchmarks/gpu.py --models mlp --batches 1 --quick --no-matmul

In one run: the device, driver and compute capability; each image the libraries embed
(cubin, PTX) loaded on its own; the five PyTorch-exported models at batch 1 and 32
compiled for cuda, checked against onnxruntime (else the interpreter) and timed (median
after warm-up, synchronized host timing: `run` with its host copies, `run_device` on
device buffers), beside onnxruntime's CUDA provider and PyTorch eager on the GPU where
installed; one train step (batch 32) of each Keras parity model
(frontends/zoo/keras_models.py) against the interpreter, timed the same two ways; a
4096³ float32 product against torch.matmul (TF32 off); the device-to-device copy
bandwidth. Writes a JSON report and prints a table. Without a GPU (no driver, no
device) it says so and exits 0. KILN_LIBCUDA names another driver library, as for
Kiln's CUDA libraries.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler import compile_model  # noqa: E402
from compiler.driver import to_graph  # noqa: E402
from frontends.zoo.keras_models import PARITY_MODELS, train_step  # noqa: E402
from ir.builder import GraphBuilder  # noqa: E402
from ir.interpreter import interpret  # noqa: E402
from runtime import CompiledModel, KilnRuntimeError  # noqa: E402

MODELS = ["mlp", "mnist_cnn", "lstm", "transformer", "resnet18"]
TRAIN_BATCH = 32
MATMUL_N = 4096


class Cuda:
    """The CUDA driver through ctypes: what this script measures with (device memory,
    copies, events), in the device's primary context, as Kiln's libraries and torch use."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self._check(self.lib.cuInit(0), "cuInit")
        count, version = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value == 0:
            raise RuntimeError("the driver finds no CUDA device")
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        self.driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
        self.device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(self.device), 0), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        self._check(self.lib.cuDeviceGetName(name, 256, self.device), "cuDeviceGetName")
        self.name = name.value.decode()
        major, minor, memory = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        self._check(
            self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, self.device), "cuDeviceGetAttribute"
        )
        self._check(
            self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, self.device), "cuDeviceGetAttribute"
        )
        self._check(self.lib.cuDeviceTotalMem_v2(ctypes.byref(memory), self.device), "cuDeviceTotalMem")
        self.capability = f"{major.value}.{minor.value}"
        self.memory_gib = memory.value / 2**30
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), self.device), "retain")
        self._check(self.lib.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        ptr, size = ctypes.c_ulonglong, ctypes.c_size_t
        self.lib.cuMemFree_v2.argtypes = [ptr]
        self.lib.cuMemcpyHtoD_v2.argtypes = [ptr, ctypes.c_void_p, size]
        self.lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ptr, size]
        self.lib.cuMemcpyDtoD_v2.argtypes = [ptr, ptr, size]
        self.lib.cuEventElapsedTime.argtypes = [
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.cuEventSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cuEventDestroy_v2.argtypes = [ctypes.c_void_p]

    def _check(self, result: int, what: str) -> None:
        if result:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what}: {(name.value or b'unknown error').decode()} ({result})")

    def alloc(self, nbytes: int) -> int:
        p = ctypes.c_ulonglong()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        return p.value

    def free(self, p: int) -> None:
        self._check(self.lib.cuMemFree_v2(p), "cuMemFree")

    def upload(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        p = self.alloc(a.nbytes)
        self._check(self.lib.cuMemcpyHtoD_v2(p, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
        return p

    def download(self, p: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        a = np.empty(shape, dtype)
        self._check(self.lib.cuMemcpyDtoH_v2(a.ctypes.data, p, a.nbytes), "cuMemcpyDtoH")
        return a

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        """Device-to-device copy, GB/s counting the bytes read and written, timed by events."""
        src, dst = self.alloc(nbytes), self.alloc(nbytes)
        start, end = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.cuEventCreate(ctypes.byref(start), 0), "cuEventCreate")
        self._check(self.lib.cuEventCreate(ctypes.byref(end), 0), "cuEventCreate")
        try:
            self._check(self.lib.cuMemcpyDtoD_v2(dst, src, nbytes), "cuMemcpyDtoD")  # warm-up
            times = []
            for _ in range(repeats):
                self._check(self.lib.cuEventRecord(start, None), "cuEventRecord")
                self._check(self.lib.cuMemcpyDtoD_v2(dst, src, nbytes), "cuMemcpyDtoD")
                self._check(self.lib.cuEventRecord(end, None), "cuEventRecord")
                self._check(self.lib.cuEventSynchronize(end), "cuEventSynchronize")
                ms = ctypes.c_float()
                self._check(self.lib.cuEventElapsedTime(ctypes.byref(ms), start, end), "cuEventElapsedTime")
                times.append(ms.value / 1e3)
            return 2 * nbytes / max(statistics.median(times), 1e-9) / 1e9
        finally:
            for e in (start, end):
                self.lib.cuEventDestroy_v2(e)
            self.free(src)
            self.free(dst)


def median_time(fn, warmup: int, runs: int, min_seconds: float) -> float:
    """Median seconds of fn (which returns only when the GPU has finished), after warm-up."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < min_seconds and len(times) < 10 * runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def library_name(job: tuple[str, int]) -> str:
    """The name a job's library is compiled under (its symbols' prefix)."""
    name, batch = job
    return name if name == "matmul" or name.startswith("train_") else f"{name}_b{batch}"


def _compile(job: tuple[str, int]) -> str:
    """A worker's compile (into the shared cache): the models build side by side."""
    from frontends.zoo.torch_models import export

    name, batch = job
    if name == "matmul":
        graph = matmul_graph(batch)
    elif name.startswith("train_"):
        graph, _ = train_step(name.removeprefix("train_"), batch, np.random.default_rng(0))
    else:
        graph = export(name, batch)
    return str(compile_model(graph, name=library_name(job), target="cuda").path)


def matmul_graph(n: int):
    b = GraphBuilder("matmul")
    return b.build(b.matmul(b.input("a", (n, n)), b.input("b", (n, n))))


def reference(model, feeds: list[np.ndarray], graph) -> tuple[list[np.ndarray], str]:
    """The expected outputs: onnxruntime's (CPU) where installed, else the interpreter's."""
    try:
        import onnxruntime
    except ImportError:
        return interpret(graph, feeds), "interpreter"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feeds))), "onnxruntime"


def ort_cuda_seconds(model, feeds: list[np.ndarray], timing: dict) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return None
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return median_time(lambda: session.run(None, dict(zip(names, feeds))), **timing)


def torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_eager_seconds(name: str, feeds: list[np.ndarray], timing: dict) -> float | None:
    """The same module in PyTorch eager on the GPU, input already there (its host copies aside)."""
    torch = torch_cuda()
    if torch is None:
        return None
    from frontends.zoo.torch_models import MODELS as BUILDERS

    torch.manual_seed(0)
    module, _ = BUILDERS[name]()
    module = module.eval().cuda()
    x = torch.from_numpy(feeds[0]).cuda()

    def step():
        with torch.no_grad():
            module(x)
        torch.cuda.synchronize()

    return median_time(step, **timing)


def check_images(cuda_path: Path, name: str) -> list[dict]:
    """Each kind of embedded image, loaded alone (KILN_CUDA_IMAGE), with its create time."""
    rows = []
    for kind in ("cubin", "ptx"):
        os.environ["KILN_CUDA_IMAGE"] = kind
        try:
            t0 = time.perf_counter()
            model = CompiledModel(cuda_path, name).create()
            rows.append(
                {"image": kind, "ok": True, "create_s": time.perf_counter() - t0, "device": model.device}
            )
            del model
        except KilnRuntimeError as e:
            rows.append({"image": kind, "ok": False, "error": str(e)})
        finally:
            del os.environ["KILN_CUDA_IMAGE"]
    return rows


def run_model(cuda: Cuda, name: str, batch: int, timing: dict) -> dict:
    from frontends.zoo.torch_models import export

    onnx_model = export(name, batch)
    graph = to_graph(onnx_model)
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    model = compile_model(onnx_model, name=f"{name}_b{batch}", target="cuda")  # cached by the workers
    got = model.run(*feeds)
    expected, oracle = reference(onnx_model, feeds, graph)
    scale = max(float(np.abs(e).max()) for e in expected)
    error = max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) / max(scale, 1e-30)
    row = {"model": name, "batch": batch, "oracle": oracle, "max_err_over_max": error}
    row |= time_both_ways(cuda, model, feeds, timing)
    for key, seconds in (
        ("ort_cuda_ms", ort_cuda_seconds(onnx_model, feeds, timing)),
        ("torch_eager_ms", torch_eager_seconds(name, feeds, timing)),
    ):
        row[key] = None if seconds is None else 1e3 * seconds
    return row


def time_both_ways(cuda: Cuda, model: CompiledModel, feeds: list[np.ndarray], timing: dict) -> dict:
    """Milliseconds of `run` (host buffers, copies included) and of `run_device`."""
    outs = [np.empty(t.shape, t.dtype) for t in model.outputs]
    times = {"run_ms": 1e3 * median_time(lambda: model.run_into(outs, *feeds), **timing)}
    d_in = [cuda.upload(x) for x in feeds]
    d_out = [cuda.alloc(o.nbytes) for o in outs]
    try:
        times["run_device_ms"] = 1e3 * median_time(lambda: model.run_device(d_in, d_out), **timing)
    finally:
        for p in d_in + d_out:
            cuda.free(p)
    return times


def run_train_step(cuda: Cuda, name: str, timing: dict) -> dict:
    """A Keras parity model's train step (forward, loss, backward, optimizer update) on
    the GPU against the interpreter: the largest error of any output (loss, metrics, new
    weights and slots) relative to that output's largest magnitude (at least 1)."""
    graph, feeds = train_step(name, TRAIN_BATCH, np.random.default_rng(0))
    model = compile_model(graph, name=f"train_{name}", target="cuda")  # cached by the workers
    got = model.run(*feeds)
    error = max(
        float(np.abs(g - e).max()) / max(float(np.abs(e).max()), 1.0)
        for g, e in zip(got, interpret(graph, feeds))
    )
    return {"model": name, "batch": TRAIN_BATCH, "max_err_over_max": error} | time_both_ways(
        cuda, model, feeds, timing
    )


def run_matmul(cuda: Cuda, n: int, timing: dict) -> dict:
    model = compile_model(matmul_graph(n), name="matmul", target="cuda")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    d_a, d_b, d_c = cuda.upload(a), cuda.upload(b), cuda.alloc(4 * n * n)
    try:
        seconds = median_time(lambda: model.run_device([d_a, d_b], [d_c]), **timing)
        c = cuda.download(d_c, (n, n), "float32")
    finally:
        for p in (d_a, d_b, d_c):
            cuda.free(p)
    rows = rng.integers(0, n, 16)
    expected = a[rows].astype(np.float64) @ b.astype(np.float64)
    row = {
        "n": n,
        "kiln_ms": 1e3 * seconds,
        "kiln_tflops": 2 * n**3 / seconds / 1e12,
        "max_err_over_max": float(np.abs(c[rows] - expected).max() / np.abs(expected).max()),
        "torch_ms": None,
    }
    torch = torch_cuda()
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False  # plain float32, as Kiln computes
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()

        def product():
            torch.matmul(ta, tb)
            torch.cuda.synchronize()

        t = median_time(product, **timing)
        row |= {"torch_ms": 1e3 * t, "torch_tflops": 2 * n**3 / t / 1e12, "kiln_over_torch": t / seconds}
    return row


def table(report: dict) -> str:
    dev = report["device"]
    lines = [f"{dev['name']}: compute capability {dev['capability']}, driver {dev['driver']}, "
             f"{dev['memory_gib']:.0f} GiB"]  # fmt: skip
    for im in report["images"]:
        state = f"loads in {im['create_s'] * 1e3:.0f} ms: {im['device']}" if im["ok"] else im["error"]
        lines.append(f"  image {im['image']:<5} {state}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(
        f"\n{'model':<12} {'batch':>5} {'run ms':>9} {'device ms':>10} {'ort-cuda ms':>12} {'torch ms':>9} "
        f"{'err/max':>9}  oracle"
    )
    for r in report["models"]:
        lines.append(
            f"{r['model']:<12} {r['batch']:>5} {r['run_ms']:>9.3f} {r['run_device_ms']:>10.3f} "
            f"{fmt(r['ort_cuda_ms']):>12} {fmt(r['torch_eager_ms']):>9} {r['max_err_over_max']:>9.1e}  "
            f"{r['oracle']}"
        )
    if report.get("train_steps"):
        lines.append(f"\n{'train step':<12} {'batch':>5} {'run ms':>9} {'device ms':>10} {'err/max':>9}")
        for r in report["train_steps"]:
            lines.append(
                f"{r['model']:<12} {r['batch']:>5} {r['run_ms']:>9.3f} {r['run_device_ms']:>10.3f} "
                f"{r['max_err_over_max']:>9.1e}"
            )
    if report.get("matmul"):
        m = report["matmul"]
        vs = (
            f", torch.matmul {m['torch_tflops']:.1f} TFLOP/s: {m['kiln_over_torch']:.0%}"
            if m["torch_ms"]
            else ""
        )
        lines.append(
            f"\nmatmul {m['n']}³ float32: Kiln {m['kiln_ms']:.2f} ms, {m['kiln_tflops']:.1f} TFLOP/s{vs} "
            f"(err/max {m['max_err_over_max']:.1e})"
        )
    lines.append(f"device-to-device copy: {report['copy_gb_s']:.0f} GB/s (read + write)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "gpu.json"), help="the report")
    p.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument(
        "--train-models", nargs="*", default=list(PARITY_MODELS), choices=list(PARITY_MODELS),
        help="the Keras parity models whose train step runs (none: skip them)",
    )  # fmt: skip
    p.add_argument("--no-matmul", action="store_true", help="skip the 4096³ product")
    p.add_argument("--matmul-size", type=int, default=MATMUL_N, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="few runs and small copies (a smoke test)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compiles at once")
    args = p.parse_args(argv)
    try:
        cuda = Cuda(os.environ.get("KILN_LIBCUDA") or "libcuda.so.1")
    except (OSError, RuntimeError) as e:
        print(f"no GPU: {e}; nothing to measure")
        return 0
    print(f"device: {cuda.name}, compute capability {cuda.capability}, driver {cuda.driver}", flush=True)
    timing = (
        dict(warmup=1, runs=3, min_seconds=0.0) if args.quick else dict(warmup=3, runs=20, min_seconds=0.5)
    )
    jobs = [(m, b) for m in args.models for b in args.batches]
    jobs += [(f"train_{m}", TRAIN_BATCH) for m in args.train_models]
    jobs += [] if args.no_matmul else [("matmul", args.matmul_size)]
    t0 = time.perf_counter()
    # spawned workers (this process has the driver open) write the shared build cache
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=spawn) as pool:
        paths = dict(zip(jobs, pool.map(_compile, jobs)))
    print(f"compiled {len(jobs)} libraries in {time.perf_counter() - t0:.0f} s", flush=True)
    first = jobs[0]
    report: dict = {
        "device": {
            "name": cuda.name,
            "capability": cuda.capability,
            "driver": cuda.driver,
            "memory_gib": cuda.memory_gib,
        },  # fmt: skip
        "images": check_images(Path(paths[first]), library_name(first)),
        "models": [],
        "train_steps": [],
    }
    for name, batch in jobs:
        if name.startswith("train_"):
            report["train_steps"].append(run_train_step(cuda, name.removeprefix("train_"), timing))
        elif name != "matmul":
            report["models"].append(run_model(cuda, name, batch, timing))
        print(f"  {name} batch {batch}: done", flush=True)
    report["matmul"] = None if args.no_matmul else run_matmul(cuda, args.matmul_size, timing)
    report["copy_gb_s"] = cuda.copy_bandwidth(
        (1 << 20) if args.quick else (256 << 20), 3 if args.quick else 20
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
