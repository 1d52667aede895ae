"""compile_model: the one entry point from a model to a loaded native library.

model (ONNX path / ModelProto / ir Graph) → Graph → kernels (one per node group)
→ memory plan → LLVM module → object → linked NAME.so + NAME.h → CompiledModel.
Builds are cached by content (graph, weights, options, host CPU and Kiln's own
sources), so compiling the same model twice in a test run costs one build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegen import cabi, cpu
from compiler.lowering import KernelCall, copy_call, lower_node
from compiler.memory import ALIGN, MemoryPlan, plan_memory
from ir.errors import UnsupportedError
from ir.graph import Graph, Value
from ir.printer import print_graph
from ir.verify import verify
from runtime import CompiledModel

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("cpu",)


@dataclass
class Lowered:
    """A graph taken down to kernels, bindings and memory: what `kiln inspect` shows."""

    graph: Graph
    calls: list[KernelCall]
    plan: MemoryPlan
    program: cabi.Program


def to_graph(model: object, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    if isinstance(model, Graph):
        return model
    from frontends.onnx import import_onnx

    return import_onnx(model, input_shapes=input_shapes)  # type: ignore[arg-type]


def lower_graph(graph: Graph, name: str, gpu_threads: int | None = None) -> Lowered:
    """Lower every node to a kernel, lay out memory, and describe the library's ABI.

    With `gpu_threads`, kernels are scheduled for the GPU (one element per parallel
    iteration, bound to blocks of that many threads): the CPU library built from
    them runs the GPU kernels' exact loop structure, which is how they are tested."""
    verify(graph)
    if gpu_threads is None:
        calls = [lower_node(node, i) for i, node in enumerate(graph.nodes)]
    else:
        from codegen.nvptx import bind_gpu

        calls = [lower_node(node, i, flat_block=1) for i, node in enumerate(graph.nodes)]
        calls = [KernelCall(bind_gpu(c.kernel, gpu_threads), c.values) for c in calls]
    storage: dict[Value, cabi.BufferRef] = {v: cabi.BufferRef("input", i) for i, v in enumerate(graph.inputs)}
    weights = bytearray()
    for v, array in graph.params.items():
        storage[v] = cabi.BufferRef("weights", len(weights))
        weights += np.ascontiguousarray(array).tobytes()
        weights += bytes(-len(weights) % ALIGN)
    produced = {v for node in graph.nodes for v in node.outputs}
    outputs: list[Value] = []
    for j, v in enumerate(graph.outputs):
        slot = Value(f"{v.name}", v.type)
        if v in produced and v not in storage:
            storage[v] = cabi.BufferRef("output", j)
        else:  # an input, a param or a repeated output: copy it out
            storage[slot] = cabi.BufferRef("output", j)
            calls.append(copy_call(v, slot, len(calls)))
        outputs.append(v)
    intermediates = [v for v in produced if v not in storage]
    plan = plan_memory([c.values for c in calls], intermediates, len(weights))
    for v, offset in plan.offsets.items():
        storage[v] = cabi.BufferRef("arena", offset)
    launches = [
        cabi.Launch(f"{name}_{c.kernel.name}", tuple(storage[v] for v in c.values), c.extent, c.parallel)
        for c in calls
    ]
    spec = lambda v: cabi.TensorSpec(v.name, v.type.dtype, v.type.shape)  # noqa: E731
    program = cabi.Program(
        name,
        [spec(v) for v in graph.inputs],
        [spec(v) for v in outputs],
        launches,
        plan.arena_bytes,
        bytes(weights),
    )
    return Lowered(graph, calls, plan, program)


@functools.cache
def _sources_digest() -> str:
    """A digest of Kiln's own code generator, so a changed compiler misses the cache."""
    h = hashlib.sha256()
    for pkg in ("ir", "compiler", "codegen", "frontends"):
        for path in sorted((PACKAGE_ROOT / pkg).rglob("*")):
            if path.suffix in (".py", ".h", ".c"):
                h.update(path.read_bytes())
    return h.hexdigest()


def _cache_key(graph: Graph, name: str, target: str, fuse: bool, cpu_name: str | None) -> str:
    h = hashlib.sha256()
    h.update(f"{name}|{target}|{fuse}|{cpu.target_id(cpu_name)}|".encode())
    h.update(print_graph(graph).encode())
    for v, array in graph.params.items():
        h.update(v.name.encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(_sources_digest().encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root)


def build(lowered: Lowered, dest: Path, emit: tuple[str, ...] = (), cpu_name: str | None = None) -> Path:
    """Generate, optimize and link the library into dest/NAME.so (+ NAME.h, NAME.ll/.s)."""
    name = lowered.program.prefix
    module = cpu.build_module([c.kernel for c in lowered.calls], name, cpu_name)
    optimized = cpu.optimize(module, cpu_name)
    dest.mkdir(parents=True, exist_ok=True)
    if "llvm" in emit:
        (dest / f"{name}.ll").write_text(str(optimized))
    if "asm" in emit:
        (dest / f"{name}.s").write_text(cpu.assembly(optimized, cpu_name))
    so = dest / f"{name}.so"
    with tempfile.TemporaryDirectory(prefix="kiln-link-") as work:
        cabi.link(lowered.program, cpu.object_code(optimized, cpu_name), Path(work), so)
    (dest / f"{name}.h").write_text(cabi.header_source(lowered.program))
    return so


def compile_model(
    model: object,
    target: str = "cpu",
    name: str = "model",
    fuse: bool = True,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    emit: tuple[str, ...] = (),
    cpu_name: str | None = None,
) -> CompiledModel:
    """Compile an ONNX file / ModelProto / ir Graph into a native library and load it.

    `name` prefixes every C symbol (NAME_create, NAME_run, ...). `fuse` selects
    operator fusion (the fusion pass is a later step: today each op is a kernel
    either way). `emit` may hold "llvm" and/or "asm" to keep the LLVM IR or
    assembly beside the library. `cpu_name` targets an LLVM CPU (e.g. "x86-64-v3"
    for any AVX2 machine) instead of this host's own.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"target {target!r} is not supported (supported: {', '.join(TARGETS)})")
    cabi.check_prefix(name)
    graph = to_graph(model, input_shapes)
    key = _cache_key(graph, name, target, fuse, cpu_name)
    final = cache_dir() / key
    so = final / f"{name}.so"
    if not so.exists() or emit:
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_ensure(cache_dir())))
        build(lower_graph(graph, name), staging, emit, cpu_name)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            staging.rename(final)
        except OSError:  # another process finished the same build first
            shutil.rmtree(staging, ignore_errors=True)
    return CompiledModel(so, name)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
