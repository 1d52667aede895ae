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

from codegen import cabi, cpu, kir
from compiler.fusion import Group, partition
from compiler.lowering import KernelCall, c_name, copy_call, lower_group, lowers_element_by_element
from compiler.memory import ALIGN, InPlace, MemoryPlan, plan_memory
from compiler.passes import simplify
from compiler.plan_check import Location, Step
from compiler.plan_check import check_plan as check_plan_replay
from ir.errors import UnsupportedError, internal_errors
from ir.graph import Graph, Value
from ir.printer import print_graph
from ir.verify import verify
from runtime import CompiledModel

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("cpu",)


@dataclass
class Lowered:
    """A graph taken down to kernels, bindings and memory: what `kiln inspect` shows."""

    graph: Graph  # after simplification
    groups: list[Group]
    calls: list[KernelCall]
    plan: MemoryPlan
    program: cabi.Program


def to_graph(
    model: object,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    constant_inputs: dict[str, object] | None = None,
) -> Graph:
    if isinstance(model, Graph):
        return model
    from frontends.onnx import import_onnx

    return import_onnx(model, input_shapes, constant_inputs)  # type: ignore[arg-type]


def _writes(group: Group, users: dict[Value, list], outputs: set[Value]) -> list[Value]:
    """The values a group computes that something outside it reads: it must store them."""
    return [
        n.outputs[0]
        for n in group.nodes
        if n.outputs[0] in outputs or any(u not in group.nodes for u in users[n.outputs[0]])
    ]


def lower_graph(
    graph: Graph,
    name: str,
    fuse: bool = True,
    gpu_threads: int | None = None,
    check_plan: bool | None = None,
) -> Lowered:
    """Simplify, partition into kernels, plan memory, lower, and describe the library's ABI.

    `fuse=False` keeps one kernel per op on the same simplified graph. With
    `gpu_threads`, kernels are scheduled for the GPU (one element per parallel
    iteration, bound to blocks of that many threads): the CPU library built from
    them runs the GPU kernels' exact loop structure, which is how they are tested.
    `check_plan` replays the schedule over the planned bytes (compiler.plan_check);
    by default it runs when the environment sets KILN_CHECK_PLAN=1, as the tests do."""
    verify(graph)
    with internal_errors("simplifying the graph"):
        graph = simplify(graph)
    with internal_errors("partitioning the graph into kernels"):
        groups = partition(graph, fuse)
    users, outputs = graph.consumers(), set(graph.outputs)
    kernels = [g for g in groups if g.kind != "view"]
    views = [(g.tail, g.nodes[0].inputs[0]) for g in groups if g.kind == "view"]

    schedule: list[list[Value]] = []
    writes: list[list[Value]] = []
    in_place: list[InPlace] = []
    for t, g in enumerate(kernels):
        produced = g.produced()
        reads = list(dict.fromkeys(v for n in g.nodes for v in n.inputs if v not in produced))
        writes.append(_writes(g, users, outputs))
        schedule.append(reads + writes[-1])
        # only a one-pass elementwise kernel may write over what it reads: a rows kernel
        # reads its inputs again after storing (found by the gradient of log(softmax(x)))
        if lowers_element_by_element(g):
            full = [x for x in reads if x.type.shape == g.shape]
            in_place += [InPlace(t, y, [x for x in full if x.type.dtype == y.type.dtype]) for y in writes[-1]]

    # graph outputs: written in place by their kernel, or copied (inputs, params, repeats)
    slots: list[Value] = []
    copies: list[tuple[Value, Value]] = []
    produced_by_kernel = {v for g in kernels for v in g.produced()}
    for v in graph.outputs:
        if v in produced_by_kernel and v not in slots:
            slots.append(v)
        else:
            slot = Value(v.name, v.type)
            slots.append(slot)
            copies.append((v, slot))
            schedule.append([v, slot])

    weights, weight_offsets = bytearray(), {}
    for v, array in graph.params.items():
        weight_offsets[v] = len(weights)
        weights += np.ascontiguousarray(array).tobytes()
        weights += bytes(-len(weights) % ALIGN)
    pins: dict[Value, cabi.BufferRef] = {v: cabi.BufferRef("input", i) for i, v in enumerate(graph.inputs)}
    pins.update({v: cabi.BufferRef("weights", o) for v, o in weight_offsets.items()})
    pins.update({v: cabi.BufferRef("output", j) for j, v in enumerate(slots)})
    with internal_errors("planning memory"):
        plan = plan_memory(schedule, set(pins), views, in_place, len(weights))

    pinned_classes = {plan.root.get(v, v): ref for v, ref in pins.items()}

    def storage(v: Value) -> cabi.BufferRef:
        root = plan.root.get(v, v)
        return pinned_classes.get(root) or cabi.BufferRef("arena", plan.offsets[root])

    buffers: dict[Value, kir.Buffer] = {}

    def buffer_for(v: Value) -> kir.Buffer:
        root = plan.root.get(v, v)
        if root not in buffers:
            buffers[root] = kir.Buffer(c_name(root.name), root.type.dtype, root.type.shape)
        base = buffers[root]
        return base if v.type.shape == base.shape else base.view(v.type.shape)

    flat_block = 1 if gpu_threads is not None else 4096
    calls = [_lower(g, i, writes[i], buffer_for, flat_block) for i, g in enumerate(kernels)]
    for src, slot in copies:
        calls.append(copy_call(buffer_for(src), buffer_for(slot), [src, slot], len(calls)))
    if check_plan if check_plan is not None else os.environ.get("KILN_CHECK_PLAN") == "1":
        steps = [
            Step(c.kernel.name, tuple(s[: len(s) - len(w)]), tuple(w), c.element_in_place)
            for c, s, w in zip(calls, schedule, [*writes, *([slot] for _, slot in copies)])
        ]
        spaces = {"arena": plan.arena_bytes, "weights": len(weights)}
        spaces |= {f"input {i}": v.type.nbytes for i, v in enumerate(graph.inputs)}
        spaces |= {f"output {j}": v.type.nbytes for j, v in enumerate(slots)}

        def location(v: Value) -> Location:
            ref = storage(v)
            if ref.space in ("input", "output"):
                return Location(f"{ref.space} {ref.index}", 0, v.type.nbytes)
            return Location(ref.space, ref.index, v.type.nbytes)

        every = {v for step in schedule for v in step} | set(graph.inputs) | set(graph.params)
        check_plan_replay(
            steps,
            {v: location(v) for v in every},
            spaces,
            [*graph.inputs, *graph.params],
            dict(views),
            slots,
        )
    if gpu_threads is not None:
        from codegen.nvptx import bind_gpu

        calls = [KernelCall(bind_gpu(c.kernel, gpu_threads), c.values, c.nodes) for c in calls]
    status = (cabi.BufferRef("status", 0),)
    launches = [
        cabi.Launch(
            f"{name}_{c.kernel.name}",
            tuple(storage(v) for v in c.values) + (status if c.kernel.checks else ()),
            c.extent,
            c.parallel,
            tuple(f"{_where(c)}: {msg}" for msg in c.kernel.checks),
        )
        for c in calls
    ]
    spec = lambda v: cabi.TensorSpec(v.name, v.type.dtype, v.type.shape)  # noqa: E731
    program = cabi.Program(
        name,
        [spec(v) for v in graph.inputs],
        [spec(v) for v in graph.outputs],
        launches,
        plan.arena_bytes,
        bytes(weights),
    )
    return Lowered(graph, groups, calls, plan, program)


def _lower(group: Group, index: int, writes: list[Value], buffer_for, flat_block: int) -> KernelCall:
    """lower_group, an unexpected failure named by the kernel's nodes."""
    nodes = ", ".join(f"node {n.name} ({n.op.name})" for n in group.nodes)
    with internal_errors(f"lowering kernel {index} ({nodes})"):
        return lower_group(group, index, writes, buffer_for, flat_block)


def _where(call: KernelCall) -> str:
    return ", ".join(f"node {n.name} ({n.op.name})" for n in call.nodes) or call.kernel.name


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


def build(
    lowered: Lowered,
    dest: Path,
    emit: tuple[str, ...] = (),
    cpu_name: str | None = None,
    extra_c: str | None = None,
    extra_blobs: dict[str, bytes] | None = None,
) -> Path:
    """Generate, optimize and link the library into dest/NAME.so (+ NAME.h, NAME.ll/.s);
    extra_c / extra_blobs: a wrapper API linked in (see cabi.link)."""
    name = lowered.program.prefix
    with internal_errors(f"generating LLVM code for {name}"):
        module = cpu.build_module([c.kernel for c in lowered.calls], name, cpu_name)
        optimized = cpu.optimize(module, cpu_name)
    dest.mkdir(parents=True, exist_ok=True)
    if "llvm" in emit:
        (dest / f"{name}.ll").write_text(str(optimized))
    if "asm" in emit:
        (dest / f"{name}.s").write_text(cpu.assembly(optimized, cpu_name))
    so = dest / f"{name}.so"
    with tempfile.TemporaryDirectory(prefix="kiln-link-") as work:
        cabi.link(lowered.program, cpu.object_code(optimized, cpu_name), Path(work), so, extra_c, extra_blobs)
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
    constant_inputs: dict[str, object] | None = None,
) -> CompiledModel:
    """Compile an ONNX file / ModelProto / ir Graph into a native library and load it.

    `name` prefixes every C symbol (NAME_create, NAME_run, ...). `fuse=False` keeps
    one kernel per op (the baseline that fused code is measured against). `emit` may
    hold "llvm" and/or "asm" to keep the LLVM IR or assembly beside the library.
    `cpu_name` targets an LLVM CPU (e.g. "x86-64-v3" for any AVX2 machine) instead of
    this host's own. `constant_inputs` fixes the values of ONNX model inputs that must
    be known at compile time (a Reshape's shape fed as an input); they are no longer
    inputs of the compiled model.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"target {target!r} is not supported (supported: {', '.join(TARGETS)})")
    cabi.check_prefix(name)
    graph = to_graph(model, input_shapes, constant_inputs)
    key = _cache_key(graph, name, target, fuse, cpu_name)
    if emit:  # a build of its own, so the .ll / .s files are there
        dest = Path(tempfile.mkdtemp(prefix=f"{key}.emit.", dir=_ensure(cache_dir())))
        build(lower_graph(graph, name, fuse), dest, emit, cpu_name)
        return CompiledModel(dest / f"{name}.so", name)
    final = cache_dir() / key
    so = final / f"{name}.so"
    if not so.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_ensure(cache_dir())))
        build(lower_graph(graph, name, fuse), staging, (), cpu_name)
        try:
            staging.rename(final)  # atomic: readers see all of a build or none
        except OSError:  # another process finished the same build first; it is identical
            shutil.rmtree(staging, ignore_errors=True)
    return CompiledModel(so, name)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
