"""A GPU kernel run on the CPU, exactly (the `cuda-sim` target).

`simulate` turns a GPU kernel (see codegen.gpu) into a plain CPU kernel that computes
what the GPU would, whatever the order of its threads:

- the grid becomes one parallel loop over blocks: each CPU thread runs whole blocks,
  one after another; shared memory is a buffer of the CPU thread's, reused block
  after block (a GPU block must not expect it initialized either);
- the block's threads become a loop over threads, split at every barrier into
  phases: every thread finishes a phase before any starts the next. Within a phase
  the threads run one after another, one legal order; a kernel whose result depends
  on the order within a phase has a race, and a missing barrier shows as a wrong
  answer here as it would on a GPU;
- what a thread keeps from one phase to a later one (a local, a scratch buffer)
  becomes one per thread: an array indexed by the thread;
- a warp shuffle is a phase boundary: every lane writes its value to the shuffle's
  exchange array, and after the split each reads its partner's;
- a barrier or shuffle may sit inside loops and ifs only where they are uniform (their
  trip count or condition the same for every thread of the block: no thread index,
  no per-thread value), as on a GPU, where anything else can hang: an error here.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

from codegen import gpu, kir
from codegen.kir import Barrier, Const, LoopKind, Shuffle, Var
from codegen.phases import BarrierError, PhaseSplitter, carried_state, walk

#: the GPU kernel cannot run as written (a barrier under thread-dependent control)
SimulationError = BarrierError


def simulate(kernel: kir.Kernel) -> kir.Kernel:
    return _Simulation(kernel).kernel()


def _x_fastest(flat: kir.Expr, dims: tuple[int, ...]) -> list[kir.Expr]:
    """CUDA's order: x varies fastest in the flat block (or thread) index."""
    return list(reversed(kir.unravel(flat, tuple(reversed(dims)))))


class _Simulation:
    def __init__(self, kernel: kir.Kernel):
        self.source = kernel
        self.layout = gpu.layout(kernel)
        self.block = Var("block")
        self.thread = Var("thread")
        self.extra: list[kir.Buffer] = []  # exchange arrays and per-thread copies
        self.per_thread: set[kir.Buffer] = set()  # scratch buffers replaced by per-thread copies

    def kernel(self) -> kir.Kernel:
        lay = self.layout
        env = dict(zip(lay.block_vars, _x_fastest(self.block, lay.grid)))
        env |= dict(zip(lay.thread_vars, _x_fastest(self.thread, lay.block)))
        phased = self._per_thread(self._phases(kir.substitute_stmts(lay.body, env)))
        blocks = kir.Loop(self.block, Const(prod(lay.grid), "int64"), LoopKind.PARALLEL, phased)
        k = self.source
        scratch = [*(b for b in k.scratch if b not in self.per_thread), *k.shared, *self.extra]
        return kir.Kernel(k.name, k.params, [blocks], k.checks, scratch)

    # ------------------------------------------------------------------ phases
    def _phase(self, stmts: list[kir.Stmt]) -> kir.Loop:
        return kir.Loop(self.thread, Const(self.layout.threads, "int64"), LoopKind.SERIAL, stmts)

    def _phases(self, stmts: list[kir.Stmt]) -> list[kir.Stmt]:
        """stmts (one thread's) as block-level statements: loops over the threads, split
        at each barrier and shuffle, and the uniform loops and ifs that hold them."""
        return _BlockSplitter(self).split(stmts)

    def _exchange(self, s: Shuffle) -> kir.Buffer:
        """A shuffle's own exchange array: the lanes read it in the phase after they
        write it, and the next shuffle may write its own in that same phase."""
        buf = kir.Buffer(f"exchange_{s.local.name}", s.value.dtype, (self.layout.threads,))
        self.extra.append(buf)
        return buf

    def _partner(self, s: Shuffle) -> kir.Expr:
        """The thread whose value lane t reads."""
        t, o = self.thread, s.offset
        if s.mode is kir.ShuffleMode.XOR:  # t ^ o, o a power of two below the warp size
            return kir.select((t // o % 2).eq(0), t + o, t - o)
        lane = t % kir.WARP  # DOWN: past the warp's last lane, a lane keeps its own value
        return kir.select((lane + o).lt(kir.WARP), t + o, t)

    # ------------------------------------------------------------------ per-thread state
    def _per_thread(self, body: list[kir.Stmt]) -> list[kir.Stmt]:
        """Locals and scratch buffers used in more than one phase, one per thread."""
        loops = [s for s in walk(body) if isinstance(s, kir.Loop) and s.var is self.thread]
        shared = carried_state(loops, set(self.source.scratch))
        if not shared:
            return body
        t, n = self.thread, self.layout.threads
        locals_: dict[kir.Local, kir.Buffer] = {}
        buffers: dict[kir.Buffer, kir.Buffer] = {}
        for x in shared:
            if isinstance(x, kir.Local):
                locals_[x] = kir.Buffer(f"{x.name}_per_thread", x.dtype, (n,))
                self.extra.append(locals_[x])
            else:
                buffers[x] = kir.Buffer(f"{x.name}_per_thread", x.dtype, (n * x.numel,))
                self.extra.append(buffers[x])

        def expr(e: kir.Expr) -> kir.Expr | None:
            if isinstance(e, kir.LocalRef) and e.local in locals_:
                return kir.Load(locals_[e.local], t)
            if isinstance(e, kir.Load) and e.buf.root in buffers:
                root = e.buf.root
                return kir.Load(buffers[root], t * root.numel + e.index)
            return None

        def stmt(s: kir.Stmt) -> list[kir.Stmt] | None:
            if isinstance(s, kir.DeclareLocal) and s.local in locals_:
                return [kir.Store(locals_[s.local], t, s.init)]
            if isinstance(s, kir.Assign) and s.local in locals_:
                return [kir.Store(locals_[s.local], t, s.value)]
            if isinstance(s, kir.Store) and s.buf.root in buffers:
                return [kir.Store(buffers[s.buf.root], t * s.buf.root.numel + s.index, s.value)]
            return None

        self.per_thread = set(buffers)
        return kir.rewrite_stmts(body, expr, stmt)


class _BlockSplitter(PhaseSplitter):
    """A block's phases: a barrier leaves nothing (the phases run in order); a shuffle
    ends a phase after each lane writes its value and starts the next with the reads."""

    def __init__(self, sim: _Simulation):
        super().__init__(sim.source.name, sim.thread, sim._phase)
        self.sim = sim

    def at_barrier(self, s: Barrier) -> list[kir.Stmt]:
        return []

    def at_shuffle(self, s: Shuffle, region: list[kir.Stmt], close: Callable[[], None]) -> None:
        xchg = self.sim._exchange(s)
        region.append(kir.Store(xchg, self.thread, s.value))
        close()
        region.append(kir.DeclareLocal(s.local, kir.Load(xchg, self.sim._partner(s))))
