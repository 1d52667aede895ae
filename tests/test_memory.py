"""Memory planning: values live at the same time never share bytes; the arena is tight."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.memory import ALIGN, plan_memory
from ir.graph import Value
from ir.types import TensorType


@st.composite
def schedules(draw):
    n_steps = draw(st.integers(1, 12))
    values, schedule = [], [[] for _ in range(n_steps)]
    for i in range(draw(st.integers(1, 16))):
        v = Value(f"v{i}", TensorType("float32", (draw(st.integers(1, 5000)),)))
        start = draw(st.integers(0, n_steps - 1))
        end = draw(st.integers(start, n_steps - 1))
        for t in {start, end, *draw(st.lists(st.integers(start, end), max_size=3))}:
            schedule[t].append(v)
        values.append(v)
    return schedule, values


@given(schedules())
@settings(max_examples=200, deadline=None)
def test_live_values_never_overlap(case):
    schedule, values = case
    plan = plan_memory(schedule, set(), [], [], 0)
    live = {v: [t for t, vs in enumerate(schedule) if v in vs] for v in values}
    span = {v: (min(ts), max(ts)) for v, ts in live.items()}
    for a in values:
        assert plan.root[a] is a  # no views, no in-place candidates: every value is its own class
        assert plan.offsets[a] % ALIGN == 0
        assert plan.offsets[a] + a.type.nbytes <= plan.arena_bytes
        for b in values:
            if a is b:
                continue
            time_overlap = span[a][0] <= span[b][1] and span[b][0] <= span[a][1]
            bytes_overlap = (
                plan.offsets[a] < plan.offsets[b] + b.type.nbytes
                and plan.offsets[b] < plan.offsets[a] + a.type.nbytes
            )
            assert not (time_overlap and bytes_overlap), (a.name, b.name)
    assert plan.lower_bound <= plan.arena_bytes <= plan.naive_bytes


def test_a_chain_reuses_memory():
    """x → v0 → v1 → ... : each value dies as the next is made, so two buffers suffice."""
    values = [Value(f"v{i}", TensorType("float32", (1024,))) for i in range(6)]
    schedule = [[values[0]]] + [[values[i - 1], values[i]] for i in range(1, 6)]
    plan = plan_memory(schedule, set(), [], [], 0)
    assert plan.arena_bytes == plan.lower_bound == 2 * 4096
    assert plan.naive_bytes == 6 * 4096


def _chain(n: int, size: int = 1024) -> list[Value]:
    return [Value(f"v{i}", TensorType("float32", (size,))) for i in range(n)]


def test_in_place_when_the_input_dies_here():
    """v0 → v1 → v2 → v3, each kernel elementwise: every output may overwrite its input."""
    from compiler.memory import InPlace

    v = _chain(4)
    schedule = [[v[0]]] + [[v[i - 1], v[i]] for i in range(1, 4)]
    cands = [InPlace(i, v[i], [v[i - 1]]) for i in range(1, 4)]
    plan = plan_memory(schedule, set(), [], cands, 0)
    assert len({plan.root[x] for x in v}) == 1 and plan.arena_bytes == 4096
    assert len(plan.in_place) == 3


def test_no_in_place_when_the_input_is_read_later_or_pinned():
    from compiler.memory import InPlace

    v = _chain(3)
    schedule = [[v[0]], [v[0], v[1]], [v[0], v[1], v[2]]]  # v0 is read again by kernel 2
    plan = plan_memory(schedule, set(), [], [InPlace(1, v[1], [v[0]])], 0)
    assert plan.root[v[1]] is not plan.root[v[0]] and not plan.in_place
    plan = plan_memory(schedule[:2], {v[0]}, [], [InPlace(1, v[1], [v[0]])], 0)  # v0 a graph input
    assert not plan.in_place


def test_views_share_their_base_and_extend_its_life():
    base, view, other = _chain(3)
    schedule = [[base], [other], [view, other]]
    plan = plan_memory(schedule, set(), [(view, base)], [], 0)
    assert plan.root[view] is plan.root[base]
    assert plan.offsets[plan.root[base]] != plan.offsets[plan.root[other]]  # base lives until step 2


def _chain_graph():
    """a = x @ w1 stays live across two products (b, c) and a rows kernel (c minus its
    row maxima), which reads c again after its first pass."""
    from ir.builder import GraphBuilder

    rng = np.random.default_rng(0)
    b = GraphBuilder("chain")
    x = b.input("x", (4, 33))
    w = [b.param(f"w{i}", rng.standard_normal((33, 33)).astype(np.float32)) for i in range(3)]
    a = b.matmul(x, w[0])
    c = b.matmul(b.matmul(a, w[1]), w[2])
    centered = b.sub(c, b.reduce_max(c, axes=(-1,), keepdims=True))
    return b.build(b.add(b.matmul(centered, w[0]), a))


def test_plan_check_passes_real_plans():
    from compiler.driver import lower_graph

    lower_graph(_chain_graph(), "chain", checks=True)  # raises on a hazard


def test_plan_check_catches_overlapping_offsets(monkeypatch):
    """Every arena value at offset 0: values live at once share bytes."""
    import compiler.driver as driver
    from compiler.plan_check import PlanError

    def squashed(*args, **kwargs):
        plan = plan_memory(*args, **kwargs)
        plan.offsets = dict.fromkeys(plan.offsets, 0)
        return plan

    monkeypatch.setattr(driver, "plan_memory", squashed)
    with pytest.raises(PlanError, match="writes matmul_0 over matmul"):
        driver.lower_graph(_chain_graph(), "chain", checks=True)


def test_plan_check_catches_in_place_over_a_kernel_that_rereads(monkeypatch):
    """A broken in-place policy (every kernel may write over its dying inputs) puts the
    rows kernel's output over the input it reads in every pass."""
    import compiler.driver as driver
    import compiler.schedule as schedule
    from compiler.plan_check import PlanError

    monkeypatch.setattr(schedule, "writes_in_place", lambda group: True)
    with pytest.raises(PlanError, match="which it reads"):
        driver.lower_graph(_chain_graph(), "chain", checks=True)


def test_plan_check_catches_a_read_after_its_bytes_were_reused():
    """b takes a's bytes while a still has a reader: the replay sees a overwritten."""
    from compiler.plan_check import Location, PlanError, Step, check_plan

    t = TensorType("float32", (16,))
    x, a, b, y = (Value(n, t) for n in "xaby")
    steps = [Step("k0", (x,), (a,), True), Step("k1", (x,), (b,), True), Step("k2", (a, b), (y,), True)]
    here = {x: Location("input 0", 0, 64), y: Location("output 0", 0, 64)}
    spaces = {"input 0": 64, "output 0": 64, "arena": 128}
    sound = here | {a: Location("arena", 0, 64), b: Location("arena", 64, 64)}
    check_plan(steps, sound, spaces, [x], {}, [y])
    broken = here | {a: Location("arena", 0, 64), b: Location("arena", 0, 64)}
    with pytest.raises(PlanError, match="kernel k2 reads a from arena bytes 0..64, which no longer hold it"):
        check_plan(steps, broken, spaces, [x], {}, [y])
