"""One thread's statements cut at its barriers into phases, each run for many threads.

Both a simulated GPU block (codegen.gpu_sim) and a CPU team whose thread holds several
members (codegen.cpu) run the body of one thread, or member, for a group of them
without running them at once: the body is cut at every barrier, and each phase (the
statements between two barriers) runs for every thread of the group before the next
phase starts. A barrier may sit inside loops and ifs only where they are uniform
(their trip count or condition the same for every thread: no thread index, no value
a thread loaded or computed), since otherwise the threads would not meet at the same
barriers; such a loop or if is kept around the phases of its body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from codegen import kir
from codegen.kir import Barrier, Shuffle
from codegen.kir_print import expr_text


class BarrierError(ValueError):
    """A kernel whose threads would not all reach the same barriers."""


class PhaseSplitter:
    """Cuts statements at barriers (see the module docstring). `phase(stmts)` wraps one
    phase's statements in the loop over the group; `thread` is the thread (or member)
    index a uniform loop or if must not depend on. Subclasses say what a barrier
    leaves behind (`at_barrier`) and how other synchronizing statements split."""

    def __init__(self, kernel: str, thread: kir.Var, phase: Callable[[list[kir.Stmt]], kir.Stmt]):
        self.kernel = kernel
        self.thread = thread
        self.phase = phase

    def split(self, stmts: list[kir.Stmt]) -> list[kir.Stmt]:
        out: list[kir.Stmt] = []
        region: list[kir.Stmt] = []

        def close() -> None:
            if region:
                out.append(self.phase(list(region)))
                region.clear()

        for s in stmts:
            if not synchronizes(s):
                region.append(s)
            elif isinstance(s, Barrier):
                close()
                out.extend(self.at_barrier(s))
            elif isinstance(s, Shuffle):
                self.at_shuffle(s, region, close)
            elif isinstance(s, kir.Loop):
                self.require_uniform(s.extent, "a loop holding a barrier")
                close()
                out.append(kir.Loop(s.var, s.extent, kir.LoopKind.SERIAL, self.split(s.body)))
            elif isinstance(s, kir.If):
                self.require_uniform(s.cond, "an if holding a barrier")
                close()
                out.append(kir.If(s.cond, self.split(s.body)))
            else:
                raise BarrierError(f"kernel {self.kernel}: {type(s).__name__} holds a barrier")
        close()
        return out

    def at_barrier(self, s: Barrier) -> list[kir.Stmt]:
        """What stands between the phases before and after the barrier: the barrier,
        where threads run the phases at once (a CPU team)."""
        return [s]

    def at_shuffle(self, s: Shuffle, region: list[kir.Stmt], close: Callable[[], None]) -> None:
        raise BarrierError(f"kernel {self.kernel}: a warp shuffle outside a GPU kernel")

    def require_uniform(self, e: kir.Expr, what: str) -> None:
        def check(x: kir.Expr) -> None:
            if x is self.thread or isinstance(x, (kir.LocalRef, kir.Load)):
                raise BarrierError(
                    f"kernel {self.kernel}: {what} depends on the thread ({expr_text(e)}); "
                    "every thread must reach the same barriers"
                )

        kir.rewrite(e, lambda x: check(x))


def synchronizes(s: kir.Stmt) -> bool:
    """s is, or holds, a barrier or shuffle."""
    if isinstance(s, (Barrier, Shuffle)):
        return True
    if isinstance(s, (kir.Loop, kir.If)):
        return any(synchronizes(x) for x in s.body)
    return False


def walk(body: list[kir.Stmt]) -> Iterator[kir.Stmt]:
    """Every statement of body, loops' and ifs' bodies included."""
    for s in body:
        yield s
        if isinstance(s, (kir.Loop, kir.If)):
            yield from walk(s.body)


def state_used(body: list[kir.Stmt], scratch: set[kir.Buffer]) -> set[object]:
    """The locals and scratch buffers the statements declare, assign, read or write."""
    found: set[object] = set()

    def note(e: kir.Expr) -> None:
        if isinstance(e, kir.LocalRef):
            found.add(e.local)
        elif isinstance(e, kir.Load) and e.buf.root in scratch:
            found.add(e.buf.root)

    def stmt(s: kir.Stmt) -> None:
        if isinstance(s, (kir.DeclareLocal, kir.Assign)):
            found.add(s.local)
        elif isinstance(s, kir.Store) and s.buf.root in scratch:
            found.add(s.buf.root)

    kir.rewrite_stmts(body, lambda e: note(e), lambda s: stmt(s))
    return found


def carried_state(phases: list[kir.Loop], scratch: set[kir.Buffer]) -> list[object]:
    """The locals and scratch buffers that more than one phase uses: what a thread
    carries across a barrier."""
    seen_in: dict[object, set[int]] = {}
    for i, phase in enumerate(phases):
        for thing in state_used(phase.body, scratch):
            seen_in.setdefault(thing, set()).add(i)
    return [x for x, where in seen_in.items() if len(where) > 1]
