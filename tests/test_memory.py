"""Memory planning: values live at the same time never share bytes; the arena is tight."""

from __future__ import annotations

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
    plan = plan_memory(schedule, values, 0)
    live = {v: [t for t, vs in enumerate(schedule) if v in vs] for v in values}
    span = {v: (min(ts), max(ts)) for v, ts in live.items()}
    for a in values:
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
    plan = plan_memory(schedule, values, 0)
    assert plan.arena_bytes == plan.lower_bound == 2 * 4096
    assert plan.naive_bytes == 6 * 4096
