"""CPU teams (kir.LoopKind.TEAM): members that run at once on the pool's threads and
meet at barriers, and the recurrences that split their hidden units into a team."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import kernel_function, kernel_pointers

from codegen import kir
from codegen.phases import BarrierError
from compiler import compile_model
from ir.builder import GraphBuilder
from ir.interpreter import interpret
from ir.ops import recurrent

MEMBERS, UNITS, STEPS = 4, 64, 40


def neighbour_sums() -> kir.Kernel:
    """Member m owns units [m·UNITS, (m + 1)·UNITS) of a state; each step, its units
    become their old value halved plus the next member's: a step reads what another
    member wrote in the step before, so a missing or broken barrier shows."""
    x = kir.Buffer("x", "float32", (MEMBERS * UNITS,))
    y = kir.Buffer("y", "float32", (STEPS + 1, MEMBERS * UNITS))
    k = kir.KernelBuilder("neighbours", [x, y])
    with k.team(MEMBERS) as m:
        with k.loop(UNITS, kir.LoopKind.VECTOR, "j") as j:
            k.store(y, (0, m * UNITS + j), x.load_flat(m * UNITS + j))
        k.barrier()
        with k.loop(STEPS, kir.LoopKind.SERIAL, "s") as s:
            with k.loop(UNITS, kir.LoopKind.VECTOR, "j") as j:
                neighbour = (m + 1) % MEMBERS
                k.store(y, (s + 1, m * UNITS + j), y[s, neighbour * UNITS + j] + y[s, m * UNITS + j] * 0.5)
            k.barrier()
    return k.finish()


def run_in_threads(kernel: kir.Kernel, threads: int, *arrays: np.ndarray) -> None:
    """Hand the team's members out to `threads` threads as the runtime's pool does
    (contiguous slices; a thread with none does not call), all running at once."""
    fn, pointers = kernel_function(kernel), kernel_pointers(kernel, arrays)
    n = int(kernel.split_loop.extent.value)
    slices = [(n * t // threads, n * (t + 1) // threads) for t in range(threads)]
    workers = [threading.Thread(target=fn, args=(pointers, a, b)) for a, b in slices if a < b]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a team member never passed a barrier"


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 6])
def test_members_see_each_others_writes_after_a_barrier(threads, rng):
    """Fewer threads than members (slices of several members), as many, and more."""
    x = rng.standard_normal(MEMBERS * UNITS).astype(np.float32)
    expected = np.zeros((STEPS + 1, MEMBERS, UNITS), np.float32)
    expected[0] = x.reshape(MEMBERS, UNITS)
    for s in range(STEPS):
        expected[s + 1] = np.roll(expected[s], -1, axis=0) + expected[s] * np.float32(0.5)
    kernel = neighbour_sums()
    y = np.zeros((STEPS + 1, MEMBERS * UNITS), np.float32)
    state = np.zeros(kir.TEAM_STATE_WORDS, np.int64)
    run_in_threads(kernel, threads, x, y, state)
    np.testing.assert_allclose(y, expected.reshape(STEPS + 1, -1), rtol=1e-6)
    assert state[0] == 0 and state[8] == STEPS + 1, "every barrier completes and leaves no arrival behind"


def test_a_local_kept_across_a_barrier_is_refused_by_name():
    """A thread runs each phase for all its members before the next, so a member's
    local would hold the last member's value after the barrier."""
    x = kir.Buffer("x", "float32", (MEMBERS,))
    k = kir.KernelBuilder("kept", [x])
    with k.team(MEMBERS) as m:
        kept = k.local("float32", x.load_flat(m), "kept")
        k.barrier()
        k.store(x, m, kept.ref)
    with pytest.raises(BarrierError, match="kernel kept: kept.* is kept across a barrier"):
        kernel_function(k.finish())


def test_a_barrier_that_depends_on_the_member_is_refused():
    x = kir.Buffer("x", "float32", (MEMBERS,))
    k = kir.KernelBuilder("divergent", [x])
    with k.team(MEMBERS) as m:
        with k.when(m.lt(2)):
            k.barrier()
    with pytest.raises(BarrierError, match="kernel divergent: an if holding a barrier depends on the thread"):
        kernel_function(k.finish())


def recurrence_graph(op: str, hidden: int, batch: int, rng: np.random.Generator, **attrs):
    """One recurrence of constant Rᵀ (packed by the compiler) over 5 steps."""
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[op]
    seq = 5
    b = GraphBuilder(op)
    xw = b.input("xw", (seq, batch, gates * hidden))
    rt = b.param("rt", (rng.standard_normal((hidden, gates * hidden)) / np.sqrt(hidden)).astype(np.float32))
    extra = {"rnn": [], "gru": [(hidden,)], "lstm": [(batch, hidden), (3 * hidden,)]}[op]
    states = [b.input("h0", (batch, hidden))] + [b.input(f"s{i}", s) for i, s in enumerate(extra)]
    return b.build(b.op(op, xw, rt, *states, hidden=hidden, **attrs))


@pytest.mark.parametrize(
    "op,hidden,batch,attrs",
    [
        ("lstm", 256, 1, {}),  # four groups of 64 units, for 4 threads
        ("gru", 128, 3, {"reverse": True}),  # two phases, so two barriers a step
        ("rnn", 128, 2, {}),
    ],
)
def test_a_recurrence_team_matches_the_reference_on_any_thread_count(
    op, hidden, batch, attrs, rng, monkeypatch
):
    monkeypatch.setenv("KILN_NUM_THREADS", "4")  # the threads the compile sizes the team for
    graph = recurrence_graph(op, hidden, batch, rng, **attrs)
    assert recurrent._unit_groups(hidden, 1, 4) > 1, "the case must split its units"
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    expected = interpret(graph, feeds)[0]
    model = compile_model(graph, name=f"team_{op}")
    results = []
    for threads in (1, 2, 3, 5):
        model.set_num_threads(threads)
        results.append(model(*feeds))
        np.testing.assert_allclose(results[-1], expected, rtol=1e-4, atol=1e-5)
    for r in results[1:]:  # each unit's sums run the same way whichever thread runs them
        np.testing.assert_array_equal(r, results[0])


@pytest.mark.parametrize(
    "hidden,chunks,threads,groups",
    [
        (256, 1, 1, 1),  # one thread: no team
        (256, 1, 2, 2),  # the fewest groups that give each thread a member
        (256, 2, 2, 1),  # the chunks already fill the threads
        (256, 2, 4, 2),
        (256, 1, 16, 4),  # 4 groups of 64 units: 8 would fall under TEAM_MIN_UNITS
        (96, 1, 2, 1),  # 48 units a group: too few
        (256, 8, 16, 1),  # 16 members would pass TEAM_MEMBERS
    ],
)
def test_a_recurrence_splits_its_units_for_the_threads(hidden, chunks, threads, groups):
    assert recurrent._unit_groups(hidden, chunks, threads) == groups
