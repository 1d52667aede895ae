"""Memory planning: every intermediate value gets a byte offset in one arena.

Values whose lifetimes (from the kernel that writes them to the last kernel that
reads them) do not overlap may share bytes. Placement is greedy, largest first,
at the lowest offset that conflicts with no overlapping value already placed: the
classic heuristic, usually at or near the liveness lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.graph import Value

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class MemoryPlan:
    offsets: dict[Value, int]
    arena_bytes: int
    lower_bound: int  # the most bytes live at any one kernel
    naive_bytes: int  # every intermediate in its own buffer
    weights_bytes: int

    def report(self) -> str:
        ratio = self.arena_bytes / self.lower_bound if self.lower_bound else 1.0
        return (
            f"arena {self.arena_bytes:,} B (lower bound {self.lower_bound:,} B, {ratio:.2f}x; "
            f"naive {self.naive_bytes:,} B); weights {self.weights_bytes:,} B"
        )


def plan_memory(schedule: list[list[Value]], intermediates: list[Value], weights_bytes: int) -> MemoryPlan:
    """`schedule[t]` lists the values kernel t touches; `intermediates` go in the arena."""
    first: dict[Value, int] = {}
    last: dict[Value, int] = {}
    for t, values in enumerate(schedule):
        for v in values:
            first.setdefault(v, t)
            last[v] = t
    sizes = {v: _align(v.type.nbytes) for v in intermediates}
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets: dict[Value, int] = {}
    for v in sorted(intermediates, key=lambda v: (-sizes[v], first[v])):
        lo, hi = first[v], last[v]
        clashes = sorted((o, e) for o, e, f, la in placed if f <= hi and lo <= la)
        offset = 0
        for o, e in clashes:
            if offset + sizes[v] <= o:
                break
            offset = max(offset, e)
        offsets[v] = offset
        placed.append((offset, offset + sizes[v], lo, hi))
    arena = max((e for _, e, _, _ in placed), default=0)
    bound = max(
        (sum(sizes[v] for v in intermediates if first[v] <= t <= last[v]) for t in range(len(schedule))),
        default=0,
    )
    return MemoryPlan(offsets, arena, bound, sum(sizes.values()), weights_bytes)
