"""The GPU schedules of the reductions and data-movement ops (ir/ops/reduce.py and
shape.py): fused prologues and epilogues run on them, and a warp's reads and writes are
consecutive addresses, which is what they are laid out for."""

from __future__ import annotations

import operator

import numpy as np
import pytest

from codegen import gpu, kir
from compiler.driver import compile_model, lower_graph
from ir.builder import GraphBuilder
from ir.interpreter import interpret


def test_fused_prologues_and_epilogues_run_on_the_gpu_schedules(rng):
    """exp(x)·2 → reduce over the leading axis → + 1; x·0.5 → softmax over a middle axis
    → + 1; x - 1 → layer_norm → relu: one kernel each, run simulated."""
    b = GraphBuilder("fused")
    x = b.input("x", (300, 70))
    y = b.input("y", (4, 50, 40))
    z = b.input("z", (6, 300))
    scale = b.param("scale", rng.standard_normal(300).astype(np.float32))
    bias = b.param("bias", rng.standard_normal(300).astype(np.float32))
    one = b.param("one", np.ones((), np.float32))
    half = b.param("half", np.full((), 0.5, np.float32))
    reduced = b.add(b.reduce_sum(b.mul(b.exp(x), b.add(one, one)), axes=(0,), keepdims=False), one)
    soft = b.add(b.softmax(b.mul(y, half), axis=1), one)
    norm = b.relu(b.layer_norm(b.sub(z, one), scale, bias))
    graph = b.build(reduced, soft, norm)
    lowered = lower_graph(graph, "fused", target="cuda")
    assert len(lowered.calls) == 3, [c.kernel.name for c in lowered.calls]
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    got = compile_model(graph, name="fused", target="cuda-sim").run(*feeds)
    for g, e in zip(got, interpret(graph, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(e).max())))


_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
    "rem": operator.mod, "min": min, "max": max, "and": operator.and_, "or": operator.or_,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq,
    "ne": operator.ne,
}  # fmt: skip


def _value(e: kir.Expr, env: dict[kir.Var, int]) -> int:
    """An integer index expression's value, the variables bound by env."""
    if isinstance(e, kir.Const):
        return int(e.value)
    if isinstance(e, kir.Var):
        return env[e]
    if isinstance(e, kir.Select):
        return _value(e.a if _value(e.cond, env) else e.b, env)
    if isinstance(e, (kir.Binary, kir.Compare)):
        return _OPS[e.op](_value(e.a, env), _value(e.b, env))
    raise LookupError(f"an address that depends on data: {e!r}")


def _accesses(kernel: kir.Kernel, buf: kir.Buffer) -> list[kir.Expr]:
    """The index of every load from and store to buf in the kernel."""
    found: list[kir.Expr] = []

    def load(e: kir.Expr) -> None:
        if isinstance(e, kir.Load) and e.buf.root is buf:
            found.append(e.index)

    def store(s: kir.Stmt) -> None:
        if isinstance(s, kir.Store) and s.buf.root is buf:
            found.append(s.index)

    kir.rewrite_stmts(kernel.body, load, store)
    return found


def _loop_vars(body: list[kir.Stmt]) -> list[kir.Var]:
    out = []
    for s in body:
        if isinstance(s, kir.Loop):
            out += [s.var, *_loop_vars(s.body)]
        elif isinstance(s, kir.If):
            out += _loop_vars(s.body)
    return out


def _lane(env: dict[kir.Var, int], layout: gpu.GpuLayout, lane: int) -> dict[kir.Var, int]:
    """env with the thread indices of the lane'th thread of the block (x fastest)."""
    env = dict(env)
    for var, extent in zip(layout.thread_vars, layout.block):
        env[var], lane = lane % extent, lane // extent
    return env


def _graph(op: str, shape: tuple[int, ...], **attrs):
    b = GraphBuilder(op)
    return b.build(b.op(op, b.input("x", shape), **attrs))


@pytest.mark.parametrize(
    "op,shape,attrs",
    [
        ("reduce_sum", (300, 200), {"axes": (0,)}),  # leading axis: lanes over the kept axis
        ("reduce_max", (2, 300, 3, 40), {"axes": (1, 3)}),  # a kept axis between reduced ones
        ("reduce_mean", (7, 1000), {"axes": (1,), "keepdims": False}),  # lanes along the row
        ("softmax", (2, 50, 64), {"axis": 1}),
        ("log_softmax", (3, 700), {}),
        ("arg_reduce", (40, 70), {"axis": 0}),
        ("topk", (6, 500), {"k": 4}),
        ("cumsum", (3, 700), {"axis": 1}),
        ("transpose", (300, 200), {"perm": (1, 0)}),  # tiled: both sides
        ("transpose", (2, 40, 3, 50), {"perm": (0, 3, 2, 1)}),
        ("slice", (7, 330), {"starts": (1, 2), "ends": (5, 300)}),
        ("pad", (7, 330), {"pads": (0, 2, 3, 0), "mode": "edge"}),
    ],
)
def test_a_warp_reads_and_writes_consecutive_addresses(op, shape, attrs):
    """For the first warp of the first block, at the first step of every serial loop:
    each global load's and store's addresses across the 32 lanes are consecutive or
    the same (one thread's store, a broadcast read, idle lanes), never strided; and the
    input is read at consecutive addresses somewhere. Addresses that depend on data
    (where topk stores by rank) are not the layout's to choose."""
    (call,) = lower_graph(_graph(op, shape, **attrs), op, target="cuda").calls
    kernel = call.kernel
    layout = gpu.layout(kernel)
    env = dict.fromkeys(_loop_vars(kernel.body), 0)
    consecutive = set()
    for buf in kernel.params:
        for index in _accesses(kernel, buf):
            try:
                seen = [_value(index, _lane(env, layout, lane)) for lane in range(kir.WARP)]
            except LookupError:
                continue
            steps = {b - a for a, b in zip(seen, seen[1:])}
            assert steps <= {0, 1}, f"{buf.name}: lanes at {seen}"
            if 1 in steps:
                consecutive.add(buf)
    assert kernel.params[0] in consecutive
