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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codegen import cabi, cpu, cuda_lib, gpu, nvptx
from codegen.gpu_sim import simulate
from codegen.kir import ITEMSIZE
from compiler.batching import batch_dim, compile_batched
from compiler.fusion import Group, partition
from compiler.lowering import GpuLoops, KernelCall, Loops, copy_call, lower_group
from compiler.memory import MemoryPlan, plan_memory
from compiler.passes import Pass, simplify
from compiler.plan_check import Location, Step, check_plan
from compiler.schedule import Schedule, Storage, in_place_candidates, pack_weights, pins, schedule_kernels
from compiler.sequence import SequenceMixing, compile_sequences
from compiler.specialize import SpecializingModel, declared_inputs
from ir.errors import UnsupportedError, internal_errors
from ir.graph import Graph, Value
from ir.ops import BatchMixing
from ir.printer import print_graph
from ir.verify import verify
from runtime import CompiledModel
from runtime.batched import BatchedModel

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: cpu: a library of CPU kernels; cuda: GPU-scheduled kernels as PTX; cuda-sim: a CPU
#: library that runs the GPU-scheduled kernels exactly (codegen.gpu_sim)
TARGETS = ("cpu", "cuda", "cuda-sim")
GPU_TARGETS = ("cuda", "cuda-sim")


@dataclass
class Lowered:
    """A graph taken down to kernels, bindings and memory: what `kiln inspect` shows."""

    graph: Graph  # after simplification
    groups: list[Group]
    calls: list[KernelCall]  # as scheduled for the target: GPU kernels for cuda and cuda-sim
    cpu_calls: list[KernelCall]  # what a CPU library runs: the calls, or cuda-sim's simulated
    plan: MemoryPlan
    library: cabi.Library  # the CPU library's description
    target: str = "cpu"
    cpu_name: str | None = None  # the LLVM CPU its schedules were sized for (None: this one)


def to_graph(
    model: object,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    constant_inputs: dict[str, object] | None = None,
) -> Graph:
    if isinstance(model, Graph):
        return model
    from frontends.onnx import import_onnx

    return import_onnx(model, input_shapes, constant_inputs)  # type: ignore[arg-type]


def self_checks() -> bool:
    """Whether the compiler checks itself as it goes (the graph verifier after every pass,
    the memory plan replayed over its bytes): KILN_CHECKS=1, as the tests set."""
    return os.environ.get("KILN_CHECKS") == "1"


def lower_graph(
    graph: Graph,
    name: str,
    fuse: bool = True,
    target: str = "cpu",
    checks: bool | None = None,
    after_pass: Callable[[Pass, Graph], None] | None = None,
    cpu_name: str | None = None,
) -> Lowered:
    """Simplify, partition into kernels, schedule, plan memory, lower, and describe the
    library's ABI.

    `fuse=False` keeps one kernel per op on the same simplified graph. For the GPU
    targets, kernels are scheduled for the GPU (grids of blocks of threads), with the
    same groups and memory plan; for cuda-sim, the CPU library runs them simulated.
    `checks` (default: self_checks()) verifies the graph after every pass and replays
    the schedule over the planned bytes (compiler.plan_check). `after_pass` sees the
    graph each pass leaves. `cpu_name` is the LLVM CPU the library is built for (None:
    this one): the CPU schedules size their register tiles for its vector registers."""
    checks = self_checks() if checks is None else checks
    verify(graph)
    with internal_errors("simplifying the graph"):
        graph = simplify(graph, verify_each=checks, after=after_pass, target=target)
    with internal_errors("partitioning the graph into kernels"):
        groups = partition(graph, fuse)
        schedule = schedule_kernels(graph, groups)
        weights, weight_offsets = pack_weights(graph.params)
    with internal_errors("planning memory"):
        pinned = pins(graph, schedule, weight_offsets)
        plan = plan_memory(
            schedule.steps(), set(pinned), schedule.views, in_place_candidates(schedule), len(weights)
        )
    storage = Storage(plan, pinned)
    if target in GPU_TARGETS:
        loops = GpuLoops()
    else:
        loops = Loops(unit=cpu.vector_unit(cpu_name), threads=cpu.default_threads())
    calls = [_lower(g, i, schedule.writes[i], storage.buffer, loops) for i, g in enumerate(schedule.kernels)]
    for src, slot in schedule.copies:
        calls.append(copy_call(storage.buffer(src), storage.buffer(slot), [src, slot], len(calls), loops))
    if checks:
        _replay_plan(graph, schedule, storage, calls, len(weights))
    cpu_calls = calls
    if target == "cuda-sim":
        cpu_calls = [KernelCall(simulate(c.kernel), c.values, c.nodes, c.element_in_place) for c in calls]
    library = cabi.Library(
        name,
        [_spec(v) for v in graph.inputs],
        [_spec(v) for v in graph.outputs],
        _launches(name, cpu_calls, storage),
        plan.arena_bytes,
        weights,
    )
    return Lowered(graph, groups, calls, cpu_calls, plan, library, target, cpu_name)


def _spec(v: Value) -> cabi.TensorSpec:
    return cabi.TensorSpec(v.name, v.type.dtype, v.type.shape)


def _lower(group: Group, index: int, writes: list[Value], buffer_for, loops: Loops) -> KernelCall:
    """lower_group, an unexpected failure named by the kernel's nodes."""
    nodes = ", ".join(f"node {n.name} ({n.op.name})" for n in group.nodes)
    with internal_errors(f"lowering kernel {index} ({nodes})"):
        return lower_group(group, index, writes, buffer_for, loops)


def _launches(name: str, calls: list[KernelCall], storage: Storage) -> list[cabi.Launch]:
    """Each kernel's symbol, the storage of its arguments (and the status word, for a
    kernel with checks; the barrier state, for a team), and how it is split across
    threads."""
    status = (cabi.BufferRef(cabi.Space.STATUS, 0),)
    team = (cabi.BufferRef(cabi.Space.TEAM, 0),)
    return [
        cabi.Launch(
            f"{name}_{c.kernel.name}",
            tuple(storage.ref(v) for v in c.values)
            + (status if c.kernel.checks else ())
            + (team if c.kernel.team_loop else ()),
            c.extent,
            c.parallel,
            tuple(f"{_where(c)}: {msg}" for msg in c.kernel.checks),
            sum(b.numel * ITEMSIZE[b.dtype] for b in c.kernel.scratch),
            c.parallel and c.kernel.alternate_steps,
        )
        for c in calls
    ]


def _replay_plan(
    graph: Graph, schedule: Schedule, storage: Storage, calls: list[KernelCall], weights: int
) -> None:
    """compiler.plan_check over this program: every value's bytes, every step's reads
    and writes, and which kernels may write over what they read."""
    spaces = {"arena": storage.plan.arena_bytes, "weights": weights}
    spaces |= {f"input {i}": v.type.nbytes for i, v in enumerate(graph.inputs)}
    spaces |= {f"output {j}": v.type.nbytes for j, v in enumerate(schedule.slots)}

    def location(v: Value) -> Location:
        ref = storage.ref(v)
        if ref.space in (cabi.Space.INPUT, cabi.Space.OUTPUT):
            return Location(f"{ref.space.value} {ref.index}", 0, v.type.nbytes)
        return Location(ref.space.value, ref.index, v.type.nbytes)

    steps = [
        Step(c.kernel.name, tuple(reads), tuple(writes), c.element_in_place)
        for c, (reads, writes) in zip(calls, schedule.step_io())
    ]
    every = {v for step in schedule.steps() for v in step} | set(graph.inputs) | set(graph.params)
    initial = [*graph.inputs, *graph.params]
    check_plan(steps, {v: location(v) for v in every}, spaces, initial, dict(schedule.views), schedule.slots)


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
    if target == "cuda":  # the embedded cubins are ptxas's
        h.update(cuda_lib.ptxas_version().encode())
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
    extra_c: str | None = None,
    extra_blobs: dict[str, bytes] | None = None,
) -> Path:
    """Generate, optimize and link the library into dest/NAME.so (+ NAME.h, NAME.ll/.s)
    for the CPU it was lowered for; extra_c / extra_blobs: a wrapper API linked in (see
    cabi.link)."""
    name, cpu_name = lowered.library.prefix, lowered.cpu_name
    with internal_errors(f"generating LLVM code for {name}"):
        kernels = [c.kernel for c in lowered.cpu_calls]
        module = cpu.build_module(kernels, name, cpu_name, libm=lowered.target != "cuda-sim")
        optimized = cpu.optimize(module, cpu_name)
    dest.mkdir(parents=True, exist_ok=True)
    if "llvm" in emit:
        (dest / f"{name}.ll").write_text(str(optimized))
    if "asm" in emit:
        (dest / f"{name}.s").write_text(cpu.assembly(optimized, cpu_name))
    so = dest / f"{name}.so"
    with tempfile.TemporaryDirectory(prefix="kiln-link-") as work:
        cabi.link(lowered.library, cpu.object_code(optimized, cpu_name), Path(work), so, extra_c, extra_blobs)
    (dest / f"{name}.h").write_text(cabi.header_source(lowered.library))
    return so


def build_several(
    programs: list[Lowered],
    dest: Path,
    name: str,
    extra_c: str | list[str] | None = None,
    extra_blobs: dict[str, bytes] | None = None,
) -> Path:
    """Link several lowered graphs into one library dest/NAME.so (+ each program's
    PREFIX.h): each keeps the API build gives it under its own prefix (the prefixes must
    differ), and the library holds one LLVM module of all their kernels (one copy of
    the math helpers) and each program's glue as its own C file (the runtime's statics
    are each file's own, as each instance has its own thread pool). extra_c /
    extra_blobs: a wrapper API over the programs, as for build. CPU targets (cpu,
    cuda-sim) only."""
    prefixes = [p.library.prefix for p in programs]
    if not programs or len(set(prefixes)) != len(prefixes):
        raise ValueError(f"build_several takes programs with distinct prefixes, got {prefixes}")
    targets = {p.target for p in programs}
    if len(targets) != 1 or targets & {"cuda"}:
        raise UnsupportedError(f"build_several links CPU programs of one target, got {sorted(targets)}")
    cpus = {p.cpu_name for p in programs}
    if len(cpus) != 1:
        raise ValueError(f"build_several links programs lowered for one CPU, got {sorted(map(str, cpus))}")
    (cpu_name,) = cpus
    libm = programs[0].target != "cuda-sim"
    with internal_errors(f"generating LLVM code for {name}"):
        first, *rest = programs
        bodies: dict = {}  # kernels of equal code across the programs share it
        kernels = [c.kernel for c in first.cpu_calls]
        module = cpu.build_module(kernels, first.library.prefix, cpu_name, libm, bodies)
        for p in rest:
            for c in p.cpu_calls:
                cpu.emit_kernel(module, c.kernel, f"{p.library.prefix}_{c.kernel.name}", libm, bodies)
        optimized = cpu.optimize(module, cpu_name)
    dest.mkdir(parents=True, exist_ok=True)
    so = dest / f"{name}.so"
    blobs = {f"{p.library.prefix}_weights": p.library.weights for p in rest} | (extra_blobs or {})
    glue = [cabi.glue_source(p.library) for p in programs]
    with tempfile.TemporaryDirectory(prefix="kiln-link-") as work:
        kernels = cpu.object_code(optimized, cpu_name)
        cabi.link(first.library, kernels, Path(work), so, extra_c, blobs, glue=glue)
    for p in programs:
        (dest / f"{p.library.prefix}.h").write_text(cabi.header_source(p.library))
    return so


def gpu_modules(lowered: Lowered, archs: tuple[str, ...] = nvptx.ARCHS) -> dict[str, str]:
    """The PTX of a model lowered for a GPU target: one module per architecture."""
    if lowered.target not in GPU_TARGETS:
        raise UnsupportedError(f"PTX needs a GPU target (cuda or cuda-sim), not {lowered.target!r}")
    kernels = [c.kernel for c in lowered.calls]
    with internal_errors(f"generating PTX for {lowered.library.prefix}"):
        return {arch: nvptx.ptx_module(kernels, arch, lowered.library.prefix) for arch in archs}


def gpu_launches(lowered: Lowered) -> list[cuda_lib.GpuLaunch]:
    """Each GPU kernel's launch: its name in the PTX, the arguments the CPU library's
    launch of it takes (same memory plan), its grid and block, and what it computes."""
    if lowered.target not in GPU_TARGETS:
        raise UnsupportedError(f"GPU launches need a GPU target (cuda or cuda-sim), not {lowered.target!r}")
    return [
        cuda_lib.GpuLaunch(c.kernel.name, launch.args, *gpu.layout(c.kernel).launch, _where(c), launch.errors)
        for c, launch in zip(lowered.calls, lowered.library.launches)
    ]


def build_cuda(
    lowered: Lowered,
    dest: Path,
    cubins: bool | None = None,
    extra_c: str | None = None,
    extra_blobs: dict[str, bytes] | None = None,
) -> Path:
    """Link the --target cuda library dest/NAME.so (+ NAME.h) around the model's PTX for
    every architecture and, where ptxas is installed (or `cubins` is True), their
    cubins; each image is also written beside it (NAME.sm_80.ptx, NAME.sm_80.cubin, ...).
    extra_c / extra_blobs: a wrapper API linked in, as for build."""
    name = lowered.library.prefix
    modules = gpu_modules(lowered)
    cubins = bool(cuda_lib.ptxas_version()) if cubins is None else cubins
    images = []
    dest.mkdir(parents=True, exist_ok=True)
    with internal_errors(f"assembling the GPU images of {name}"):
        for arch, ptx in modules.items():
            if cubins:
                images.append(cuda_lib.Image(True, arch, cuda_lib.cubin(ptx, arch)))
        images += [cuda_lib.Image(False, arch, ptx.encode()) for arch, ptx in modules.items()]
    for image in images:
        (dest / f"{name}.{image.arch}.{'cubin' if image.cubin else 'ptx'}").write_bytes(image.data)
    glue = cuda_lib.glue_source(lowered.library, gpu_launches(lowered), images)
    so = dest / f"{name}.so"
    blobs = {f"{name}_{image.symbol}": image.data for image in images} | (extra_blobs or {})
    with tempfile.TemporaryDirectory(prefix="kiln-link-") as work:
        cabi.link(lowered.library, None, Path(work), so, extra_c, blobs, glue=glue, libs=("-ldl",))
    (dest / f"{name}.h").write_text(cuda_lib.header(lowered.library))
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
    specialize: bool = True,
    max_batch: int = 0,
    dims: dict[str, int] | None = None,
) -> CompiledModel | BatchedModel | SpecializingModel:
    """Compile an ONNX file / ModelProto / ir Graph into a native library and load it.

    `name` prefixes every C symbol (NAME_create, NAME_run, ...). `fuse=False` keeps
    one kernel per op (the baseline that fused code is measured against). `emit` may
    hold "llvm" and/or "asm" to keep the LLVM IR or assembly beside the library.
    `cpu_name` targets an LLVM CPU (e.g. "x86-64-v3" for any AVX2 machine) instead of
    this host's own. `constant_inputs` fixes the values of ONNX model inputs that must
    be known at compile time (a Reshape's shape fed as an input); they are no longer
    inputs of the compiled model.

    An ONNX model whose inputs name one dimension, left unbound, that each batch
    element runs apart along (a batch `N`) gives one library for every size of it, a
    BatchedModel (see compiler.batching; `max_batch` bounds it, 0: no bound). `dims`
    bounds named dimensions by name ({"N": 256, "S": 200}; 0: no bound): the batch's
    bound, as max_batch; a bounded one that is not the batch is a sequence, and the
    one library takes every length of it up to its bound (see compiler.sequence). Other
    models with named dimensions left unbound, or inputs needed at compile time and
    not fixed, give a SpecializingModel when `specialize` (and no `emit`): it compiles
    one library per distinct input shapes and such values as calls bring them (see
    compiler.specialize). Without `specialize`, such a model is an error that says what
    to bind.

    `target` "cuda" gives a library that runs on an NVIDIA GPU through the CUDA driver
    (see codegen.cuda_lib), with its PTX (and cubins) beside it; its instance, which
    needs the GPU, is made on first use, so compiling needs no GPU.
    """
    if target not in TARGETS:
        raise UnsupportedError(f"target {target!r} is not supported (supported: {', '.join(TARGETS)})")
    cabi.check_prefix(name)
    from frontends.onnx import ConstantInputNeeded, SymbolicDimension

    try:
        graph = to_graph(model, input_shapes, constant_inputs)
    except (SymbolicDimension, ConstantInputNeeded) as e:
        if isinstance(e, SymbolicDimension) and target == "cpu" and not emit and not input_shapes:
            try:
                return dynamic_batch(model, name, fuse, cpu_name, constant_inputs, max_batch, dims)
            except (BatchMixing, SequenceMixing, SymbolicDimension, ConstantInputNeeded) as why:
                if not specialize:
                    if isinstance(why, ConstantInputNeeded):
                        raise  # what to fix first
                    message = f"{e} (one library for every size is not possible: {why})"
                    raise SymbolicDimension(message, e.input_name) from None
        if not specialize or emit:
            raise
        return SpecializingModel(
            model, compile_model, target=target, name=name, fuse=fuse, cpu_name=cpu_name,
            input_shapes=input_shapes, constant_inputs=constant_inputs, specialize=False,
        )  # fmt: skip
    if target == "cuda":
        if set(emit) - {"ptx"}:
            raise UnsupportedError(
                f"a cuda library emits its PTX only, not {', '.join(sorted(set(emit) - {'ptx'}))}"
            )
        emit, cpu_name = (), None  # the PTX is always written beside the library; no CPU code
    key = _cache_key(graph, name, target, fuse, cpu_name)

    def make(dest: Path, emit: tuple[str, ...]) -> None:
        lowered = lower_graph(graph, name, fuse, target, cpu_name=cpu_name)
        if target == "cuda":
            build_cuda(lowered, dest)
        else:
            build(lowered, dest, emit)

    if emit:  # a build of its own, so the .ll / .s files are there
        dest = Path(tempfile.mkdtemp(prefix=f"{key}.emit.", dir=_ensure(cache_dir())))
        make(dest, emit)
        return CompiledModel(dest / f"{name}.so", name)
    return CompiledModel(cached_build(key, name, lambda dest: make(dest, ())), name)


def cached_build(key: str, name: str, make: Callable[[Path], None]) -> Path:
    """The library NAME.so the build cache holds under `key`, made by make(dest) into a
    fresh folder the first time."""
    final = cache_dir() / key
    so = final / f"{name}.so"
    if not so.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=_ensure(cache_dir())))
        make(staging)
        try:
            staging.rename(final)  # atomic: readers see all of a build or none
        except OSError:  # another process finished the same build first; it is identical
            shutil.rmtree(staging, ignore_errors=True)
    return so


def dynamic_batch(
    model: object,
    name: str,
    fuse: bool = True,
    cpu_name: str | None = None,
    constant_inputs: dict[str, object] | None = None,
    max_batch: int = 0,
    dims: dict[str, int] | None = None,
) -> BatchedModel:
    """The dynamic-batch library of an ONNX model whose inputs name one dimension (see
    compiler.batching), or two where `dims` bounds one that is not the batch (a
    sequence, see compiler.sequence); BatchMixing or SequenceMixing when there is no
    such dimension, or the model mixes batch elements or positions."""
    import onnx

    from frontends.onnx import load_model

    proto = load_model(model)
    fixed = set(constant_inputs or ()) | {t.name for t in proto.graph.initializer}
    declared = [i for i in declared_inputs(proto.graph.input, onnx) if i.name not in fixed]
    named = list(dict.fromkeys(d for i in declared for d in i.shape if isinstance(d, str) and d != "?"))
    dims = dims or {}
    unknown = sorted(set(dims) - set(named))
    if unknown:
        listed = ", ".join(named) or "none"
        raise ValueError(f"{', '.join(unknown)}: no input of {name} names it (named: {listed})")
    if len(named) == 2 and any(dims.get(d) for d in named):
        refused: list[Exception] = []
        for batch, sequence in (named, named[::-1]):
            if not dims.get(sequence):
                continue
            try:
                return compile_sequences(
                    proto, batch, sequence, dims[sequence], name, dims.get(batch, max_batch), fuse, cpu_name,
                    constant_inputs,
                )  # fmt: skip
            except (BatchMixing, SequenceMixing) as e:
                refused.append(e)
        unbounded = [d for d in named if not dims.get(d)]
        hint = f"; a sequence dimension needs a bound ({unbounded[0]}=1..MAX)" if unbounded else ""
        raise type(refused[0])(f"{refused[0]}{hint}")
    dim = batch_dim(declared)
    if dim is None:
        raise BatchMixing("the inputs do not name exactly one dimension, at most once each")
    return compile_batched(proto, dim, name, max_batch=dims.get(dim, max_batch), fuse=fuse, cpu_name=cpu_name,
                           constant_inputs=constant_inputs)  # fmt: skip


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
