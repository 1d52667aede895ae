"""Memory planning: every intermediate value gets a byte offset in one arena.

Values first gather into storage classes that must share bytes: a view (reshape,
flatten) with the value it views, and an elementwise kernel's output with an input
that dies in that kernel (in place). A class lives from the first kernel touching any
member to the last. Classes whose lifetimes do not overlap may share bytes;
placement is greedy, largest first, at the lowest offset clear of every overlapping
class already placed: the classic heuristic, usually at the liveness lower bound.
Classes holding a graph input, output or weight are pinned there, not in the arena.
"""

from __future__ import annotations

from dataclasses import dataclass

from codegen.cabi import ALIGN
from ir.graph import Value


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class InPlace:
    """Kernel `step` writes `output` at the same indices it reads each of `inputs`."""

    step: int
    output: Value
    inputs: list[Value]


@dataclass
class MemoryPlan:
    root: dict[Value, Value]  # every value → its storage class's representative
    offsets: dict[Value, int]  # arena classes (by representative) → byte offset
    arena_bytes: int
    lower_bound: int  # the most bytes live at any one kernel
    naive_bytes: int  # every intermediate in its own buffer
    weights_bytes: int
    in_place: list[tuple[Value, Value]]  # (output, input) pairs that share bytes

    def report(self) -> str:
        ratio = self.arena_bytes / self.lower_bound if self.lower_bound else 1.0
        return (
            f"arena {self.arena_bytes:,} B (lower bound {self.lower_bound:,} B, {ratio:.2f}x; "
            f"naive {self.naive_bytes:,} B); weights {self.weights_bytes:,} B; "
            f"{len(self.in_place)} in place"
        )


class _Classes:
    def __init__(self) -> None:
        self.parent: dict[Value, Value] = {}

    def find(self, v: Value) -> Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: Value, b: Value, keep: Value | None = None) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            if keep is not None and self.find(keep) is rb:
                ra, rb = rb, ra
            self.parent[rb] = ra


def plan_memory(
    schedule: list[list[Value]],
    pinned: set[Value],
    views: list[tuple[Value, Value]],
    in_place: list[InPlace],
    weights_bytes: int,
) -> MemoryPlan:
    """schedule[t]: the values kernel t reads or writes. pinned: graph inputs, outputs
    and params. views: (view, viewed) pairs. in_place: candidates, taken where safe."""
    classes = _Classes()
    for view, base in views:
        classes.union(base, view, keep=base)
    values = list(dict.fromkeys(v for step in schedule for v in step))
    for v in values:
        classes.find(v)

    def spans() -> dict[Value, tuple[int, int]]:
        out: dict[Value, tuple[int, int]] = {}
        for t, step in enumerate(schedule):
            for v in step:
                r = classes.find(v)
                lo, _ = out.get(r, (t, t))
                out[r] = (lo, t)
        return out

    pinned_roots = lambda: {classes.find(v) for v in pinned}  # noqa: E731
    taken: list[tuple[Value, Value]] = []
    for cand in in_place:
        span = spans()
        out_root = classes.find(cand.output)
        if out_root in pinned_roots() or span[out_root][0] != cand.step:
            continue
        for x in cand.inputs:
            root = classes.find(x)
            members_here = {v for v in schedule[cand.step] if classes.find(v) is root}
            if (
                root not in pinned_roots()
                and root is not out_root
                and members_here == {x}
                and span[root][1] == cand.step
                and x.type.nbytes == cand.output.type.nbytes
                and x.type.itemsize == cand.output.type.itemsize
            ):
                classes.union(x, cand.output, keep=x)
                taken.append((cand.output, x))
                break

    span = spans()
    pins = pinned_roots()
    members: dict[Value, list[Value]] = {}
    for v in values:
        members.setdefault(classes.find(v), []).append(v)
    arena = [r for r in members if r not in pins]
    size = {r: _align(max(v.type.nbytes for v in members[r])) for r in arena}
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets: dict[Value, int] = {}
    for r in sorted(arena, key=lambda r: (-size[r], span[r][0])):
        lo, hi = span[r]
        offset = 0
        for o, e in sorted((o, e) for o, e, f, la in placed if f <= hi and lo <= la):
            if offset + size[r] <= o:
                break
            offset = max(offset, e)
        offsets[r] = offset
        placed.append((offset, offset + size[r], lo, hi))
    bound = max(
        (sum(size[r] for r in arena if span[r][0] <= t <= span[r][1]) for t in range(len(schedule))),
        default=0,
    )
    intermediates = {v for v in values if v not in pinned and classes.find(v) not in pins}
    view_members = {view for view, _ in views}
    naive = sum(_align(v.type.nbytes) for v in intermediates if v not in view_members)
    return MemoryPlan(
        {v: classes.find(v) for v in values},
        offsets,
        max((e for _, e, _, _ in placed), default=0),
        bound,
        naive,
        weights_bytes,
        taken,
    )
