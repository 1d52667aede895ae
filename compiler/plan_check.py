"""An independent check of a memory plan: replay the schedule over the bytes.

The planner reasons about storage classes and lifetimes; this check knows nothing of
them. It takes each kernel's reads and writes, in schedule order, and where each value
ended up (a space and a byte range), and replays the program over the bytes, recording
which value's content each byte range holds. It fails when

- a kernel reads a value whose bytes no longer hold it (overwritten by a later write,
  or never written),
- a kernel writes bytes it also reads, unless it is an element-by-element kernel
  writing an output exactly over an input of the same shape and element size (it reads
  each element before it writes it); a kernel that reads its inputs again after it
  stores (a rows kernel keeps values in its outputs between passes over a row, a
  contraction accumulates in its output) may share no bytes between them,
- two outputs of one kernel share bytes, or a value lies outside its space,
- a graph output's buffer does not hold that output when the program ends.

A view (reshape, flatten) is its base's content under another type.
"""

from __future__ import annotations

from dataclasses import dataclass

from ir.errors import InternalCompilerError
from ir.graph import Value


class PlanError(InternalCompilerError):
    """The memory plan lets a kernel read bytes that no longer hold what it expects: a
    bug in Kiln."""


@dataclass(frozen=True)
class Location:
    """Where a value's bytes are: a space ("arena", "weights", "input 0", "output 1")
    and a byte range in it."""

    space: str
    start: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def overlaps(self, other: Location) -> bool:
        return self.space == other.space and self.start < other.end and other.start < self.end


@dataclass(frozen=True)
class Step:
    """One kernel of the schedule: what it reads, what it writes, and whether it may
    write an output over an input element by element."""

    name: str
    reads: tuple[Value, ...]
    writes: tuple[Value, ...]
    element_in_place: bool


class _Bytes:
    """Which content each byte range of each space holds: disjoint (start, end, content)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[int, int, Value]]] = {}

    def write(self, loc: Location, content: Value) -> None:
        kept = []
        for s, e, c in self.spans.get(loc.space, []):
            if s < loc.start:
                kept.append((s, min(e, loc.start), c))
            if e > loc.end:
                kept.append((max(s, loc.end), e, c))
        kept.append((loc.start, loc.end, content))
        self.spans[loc.space] = sorted(kept, key=lambda span: span[0])

    def holds(self, loc: Location, content: Value) -> bool:
        covered = loc.start
        for s, e, c in self.spans.get(loc.space, []):
            if e <= loc.start or s >= loc.end:
                continue
            if c is not content or s > covered:
                return False
            covered = max(covered, e)
        return covered >= loc.end or loc.nbytes == 0


def check_plan(
    steps: list[Step],
    location: dict[Value, Location],
    space_bytes: dict[str, int],
    initial: list[Value],
    views: dict[Value, Value],
    final: list[Value],
) -> None:
    """Replay `steps`; raise PlanError at the first hazard. `initial`: values whose
    bytes hold them before the first kernel (inputs, weights); `views`: view → the
    value it views; `final`: the values the output buffers must hold at the end."""

    def content(v: Value) -> Value:
        while v in views:
            v = views[v]
        return v

    def where(v: Value) -> Location:
        loc = location[v]
        if loc.start < 0 or loc.end > space_bytes[loc.space]:
            size = space_bytes[loc.space]
            raise PlanError(f"{v.name}: bytes {loc.start}..{loc.end} lie outside {loc.space} ({size} B)")
        return loc

    memory = _Bytes()
    for v in initial:
        memory.write(where(v), content(v))
    for step in steps:
        for v in step.reads:
            if not memory.holds(where(v), content(v)):
                raise PlanError(
                    f"kernel {step.name} reads {v.name} from {_describe(where(v))}, which no longer hold it"
                )
        for i, w in enumerate(step.writes):
            for other in step.writes[i + 1 :]:
                if where(w).overlaps(where(other)):
                    raise PlanError(f"kernel {step.name} writes {w.name} and {other.name} to shared bytes")
            for r in step.reads:
                if where(w).overlaps(where(r)) and not _element_in_place(step, w, r, where(w), where(r)):
                    raise PlanError(
                        f"kernel {step.name} writes {w.name} over {r.name} ({_describe(where(w))}), "
                        f"which it reads"
                    )
        for w in step.writes:
            memory.write(where(w), content(w))
    for v in final:
        if not memory.holds(where(v), content(v)):
            raise PlanError(f"output {v.name}: its buffer does not hold it when the program ends")


def _element_in_place(step: Step, w: Value, r: Value, wl: Location, rl: Location) -> bool:
    return (
        step.element_in_place
        and wl == rl
        and w.type.shape == r.type.shape
        and w.type.itemsize == r.type.itemsize
    )


def _describe(loc: Location) -> str:
    return f"{loc.space} bytes {loc.start}..{loc.end}"
