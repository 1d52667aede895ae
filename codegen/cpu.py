"""The CPU backend: kernels → one LLVM module → an object file for the host CPU.

Every kernel becomes `void PREFIX_NAME(void *const *bufs, int64_t begin, int64_t end)`.
`bufs` holds the kernel's buffer pointers in parameter order. A kernel whose body is
one parallel loop runs iterations [begin, end) of it, so the library's thread pool
hands each thread a slice; any other kernel runs whole when called with (0, 1).

A team kernel (kir.LoopKind.TEAM) is handed out the same way: a thread runs members
[begin, end). Its body is cut at the barriers (codegen.phases), each phase run for the
thread's members in turn, and a barrier waits until the members of all threads have
arrived: each thread adds its member count to the round's arrivals, the one that
completes the team's count starts the next round, the others spin (yielding the core
now and then) until it does. A thread that runs every member never waits.
"""

from __future__ import annotations

import functools
import os

import llvmlite.binding as llvm
from llvmlite import ir

from codegen import kir
from codegen.llvm_emit import I32, I64, PTR, FunctionWriter, loop_metadata
from codegen.phases import BarrierError, PhaseSplitter, carried_state, walk

#: a waiting team member gives up its core after this many spins (a machine with more
#: threads than cores must run the member it waits for)
TEAM_SPINS_PER_YIELD = 1024


@functools.cache
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


#: on x86, the loop vectorizer takes the widest vectors the CPU has: LLVM's tuning for
#: Intel's AVX-512 server cores prefers 256-bit ones, which halved every vector loop the
#: kernels leave to its cost model (elementwise chains, an LSTM's gates, pools) while
#: their register tiles, whose width is set, ran 512-bit
X86_FEATURES = "-prefer-256-bit"


@functools.cache
def target_machine(cpu_name: str | None = None) -> llvm.TargetMachine:
    """A TargetMachine for `cpu_name` (an LLVM CPU such as "x86-64-v3"), or for this
    CPU with all its features (AVX-512 where present) when None."""
    _init_llvm()
    target = llvm.Target.from_default_triple()
    host = cpu_name is None
    features = [llvm.get_host_cpu_features().flatten()] if host else []
    if target.name.startswith("x86"):
        features.append(X86_FEATURES)
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name() if host else cpu_name,
        features=",".join(f for f in features if f),
        opt=3,
        reloc="pic",
        codemodel="default",
    )


@functools.cache
def vector_unit(cpu_name: str | None = None) -> kir.VectorUnit:
    """The vector registers LLVM uses for float32 on `cpu_name` (None: this CPU), found
    by compiling one 16-lane add and reading which registers it took: zmm (AVX-512: 16
    lanes, 32 registers), ymm (AVX2: 8 lanes, 16 registers), else 128-bit vectors (4
    lanes; 32 registers on AArch64, 16 on x86-64). LLVM's own tuning decides, so a CPU
    where it prefers 256-bit vectors despite AVX-512 gets the AVX2 unit."""
    module = llvm.parse_assembly(
        "define void @probe(<16 x float>* %p) {\n"
        "  %v = load <16 x float>, <16 x float>* %p\n"
        "  %s = fadd <16 x float> %v, %v\n"
        "  store <16 x float> %s, <16 x float>* %p\n"
        "  ret void\n}\n"
    )
    asm = target_machine(cpu_name).emit_assembly(module)
    if "zmm" in asm:
        return kir.AVX512
    if "ymm" in asm:
        return kir.AVX2
    return kir.VectorUnit(4, 32 if llvm.get_default_triple().startswith("aarch64") else 16)


def default_threads() -> int:
    """The threads a library's pool starts with (KILN_NUM_THREADS, else this machine's
    processors, as kiln_default_threads in the runtime): a schedule that splits one
    batch row's work into team members sizes the team for them."""
    env = os.environ.get("KILN_NUM_THREADS", "").strip()
    threads = int(env) if env.isdigit() else (os.cpu_count() or 1)
    return max(1, threads)


def target_id(cpu_name: str | None = None) -> str:
    """What the generated code depends on: the triple, the CPU and its features, and the
    threads the schedules size teams for."""
    threads = default_threads()
    if cpu_name is not None:
        return f"{llvm.get_default_triple()}|{cpu_name}|{threads}"
    host = f"{llvm.get_host_cpu_name()}|{llvm.get_host_cpu_features().flatten()}"
    return f"{llvm.get_default_triple()}|{host}|{threads}"


def emit_kernel(
    module: ir.Module,
    kernel: kir.Kernel,
    symbol: str,
    libm: bool = True,
    bodies: dict[str, ir.Function] | None = None,
) -> ir.Function:
    """The kernel's exported entry point unpacks the `bufs` array the thread pool passes
    and calls its body. `bodies` holds the bodies emitted so far by code_key: a kernel
    whose code is already there gets only its entry point, calling that body."""
    if bodies is None:
        body_fn = _emit_body(module, kernel, symbol, libm)
    else:
        key = kir.code_key(kernel)
        if key not in bodies:
            bodies[key] = _emit_body(module, kernel, symbol, libm)
        body_fn = bodies[key]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]), symbol)
    fn.visibility = "hidden"
    bufs, fbegin, fend = fn.args
    b = ir.IRBuilder(fn.append_basic_block())
    pointers = [
        b.load(b.gep(bufs, [ir.Constant(I64, i)], inbounds=True, source_etype=PTR), typ=PTR, name=buf.name)
        for i, buf in enumerate(kernel.params)
    ]
    b.call(body_fn, [*pointers, fbegin, fend])
    b.ret_void()
    return fn


def _emit_body(module: ir.Module, kernel: kir.Kernel, symbol: str, libm: bool) -> ir.Function:
    """The kernel body takes each buffer as its own `noalias` pointer (a kernel's buffers
    are distinct values, which the memory plan keeps apart while they are live), so
    LLVM may keep loaded values in registers across stores. A team's members read what
    the others write: its barriers hand LLVM the buffers the kernel writes (see
    _team_barrier), so that it loads them again after each."""
    n = len(kernel.params)
    body_fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * n + [I64, I64]), f"{symbol}.body")
    body_fn.linkage = "internal"
    split = kernel.split_loop
    team = kernel.team_loop
    for arg in body_fn.args[:n]:
        arg.add_attribute("noalias")
    begin, end = body_fn.args[n], body_fn.args[n + 1]
    pointers = dict(zip(kernel.params, body_fn.args[:n]))
    if team is not None:
        state = kernel.params[-1]  # the barrier's (KernelBuilder.team puts it last)
        written = [pointers[buf] for buf in kernel.params if buf in _written(kernel.body) - {state}]

    def loop_hook(w: FunctionWriter, loop: kir.Loop) -> bool:
        if loop is not split and not (team is not None and loop.var is team.var):
            return False
        w.counted_loop(loop.var, begin, end, loop.body, kir.LoopKind.SERIAL if team else loop.kind)
        return True

    def stmt_hook(w: FunctionWriter, s: kir.Stmt) -> bool:
        if not (isinstance(s, kir.Barrier) and team is not None):
            return False
        _team_barrier(w, pointers[state], w.b.sub(end, begin), team.extent.value, written)
        return True

    writer = FunctionWriter(body_fn, pointers, loop_hook, kernel.scratch, stmt_hook, libm=libm)
    if team is not None:
        writer.stmts(_team_phases(kernel, team))
    elif split is None:
        # run once, on the call with begin == 0
        with writer.b.if_then(writer.b.icmp_signed("==", begin, ir.Constant(I64, 0))):
            writer.stmts(kernel.body)
    else:
        writer.stmts(kernel.body)
    writer.finish()
    return body_fn


def _written(body: list[kir.Stmt]) -> set[kir.Buffer]:
    """The parameters the statements store to."""
    return {s.buf.root for s in walk(body) if isinstance(s, kir.Store)}


def _team_phases(kernel: kir.Kernel, team: kir.Loop) -> list[kir.Stmt]:
    """The team's body cut at its barriers, each phase a loop over the thread's members
    (a loop of the team's variable, which emit_kernel runs over [begin, end)). A thread
    running several members runs each phase for all of them before the next, so a
    member keeps nothing but buffers from one phase to the next: a local is refused, and
    a scratch buffer (the thread's) holds the last member's values after a barrier."""

    def phase(stmts: list[kir.Stmt]) -> kir.Loop:
        return kir.Loop(team.var, team.extent, team.kind, stmts)

    body = PhaseSplitter(kernel.name, team.var, phase).split(team.body)
    phases = [s for s in walk(body) if isinstance(s, kir.Loop) and s.var is team.var]
    carried = [x for x in carried_state(phases, set()) if isinstance(x, kir.Local)]
    if carried:
        names = ", ".join(sorted(x.name for x in carried))
        raise BarrierError(f"kernel {kernel.name}: {names} is kept across a barrier; keep it in a buffer")
    return body


def _team_barrier(
    w: FunctionWriter, state: ir.Value, weight: ir.Value, members: int, written: list[ir.Value]
) -> None:
    """Wait until `members` arrivals are counted this round (see the module docstring):
    state[0] counts the round's arrivals, state[8] the rounds completed. The buffers
    the team writes are `noalias` (within a phase no other pointer touches them, which
    LLVM needs to keep loaded values in registers); so that no load of one moves across
    the barrier, nor a store, an empty asm statement before and after the wait takes
    their pointers and may read and write any memory."""
    b, fn = w.b, w.fn
    fence = ir.InlineAsm(
        ir.FunctionType(ir.VoidType(), [PTR] * len(written)),
        "",
        ",".join(["r"] * len(written) + ["~{memory}"]),
        side_effect=True,
    )
    b.call(fence, written)
    arrivals = state
    rounds = b.gep(state, [ir.Constant(I64, 8)], inbounds=True, source_etype=I64)
    round_ = b.load_atomic(rounds, "acquire", 8, typ=I64)
    before = b.atomic_rmw("add", arrivals, weight, "acq_rel")
    last = b.icmp_signed("==", b.add(before, weight), ir.Constant(I64, members))
    spin = fn.append_basic_block("team.spin")
    give_up = fn.append_basic_block("team.spin.yield")
    check = fn.append_basic_block("team.spin.check")
    done = fn.append_basic_block("team.done")
    with b.if_then(last):
        b.atomic_rmw("xchg", arrivals, ir.Constant(I64, 0), "monotonic")
        b.atomic_rmw("add", rounds, ir.Constant(I64, 1), "release")
    b.cbranch(last, done, spin)
    entry = b.block
    b.position_at_end(spin)
    spins = b.phi(I64, "spins")
    if "x86" in fn.module.triple:
        pause = fn.module.globals.get("llvm.x86.sse2.pause") or ir.Function(
            fn.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
        )
        b.call(pause, [])
    next_spins = b.add(spins, ir.Constant(I64, 1))
    mask = ir.Constant(I64, TEAM_SPINS_PER_YIELD - 1)
    due = b.icmp_signed("==", b.and_(next_spins, mask), ir.Constant(I64, 0))
    b.cbranch(due, give_up, check)
    b.position_at_end(give_up)
    sched_yield = fn.module.globals.get("sched_yield") or ir.Function(
        fn.module, ir.FunctionType(I32, []), "sched_yield"
    )
    b.call(sched_yield, [])
    b.branch(check)
    b.position_at_end(check)
    now = b.load_atomic(rounds, "acquire", 8, typ=I64)
    b.cbranch(b.icmp_signed("==", now, round_), spin, done)
    spins.add_incoming(ir.Constant(I64, 0), entry)
    spins.add_incoming(next_spins, check)
    b.position_at_end(done)
    b.call(fence, written)


def build_module(
    kernels: list[kir.Kernel],
    prefix: str,
    cpu_name: str | None = None,
    libm: bool = True,
    bodies: dict[str, ir.Function] | None = None,
) -> ir.Module:
    """One module of the kernels' entry points, the code of equal kernels emitted once
    (`bodies`, see emit_kernel: pass the same dict to emit more kernels into the module).
    libm=False computes float64 math inline as a GPU does (codegen.mathlib), so a
    simulated GPU kernel rounds as the real one."""
    module = ir.Module(name=prefix)
    tm = target_machine(cpu_name)
    module.triple = tm.triple
    module.data_layout = str(tm.target_data)
    bodies = {} if bodies is None else bodies
    for kernel in kernels:
        emit_kernel(module, kernel, f"{prefix}_{kernel.name}", libm, bodies)
    return module


def optimize(module: ir.Module, cpu_name: str | None = None) -> llvm.ModuleRef:
    """Parse, verify and run LLVM's O3 pipeline (with loop and SLP vectorization)."""
    tm = target_machine(cpu_name)
    mod = llvm.parse_assembly(loop_metadata(str(module)))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def object_code(mod: llvm.ModuleRef, cpu_name: str | None = None) -> bytes:
    return target_machine(cpu_name).emit_object(mod)


def assembly(mod: llvm.ModuleRef, cpu_name: str | None = None) -> str:
    return target_machine(cpu_name).emit_assembly(mod)
