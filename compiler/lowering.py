"""Groups of graph nodes → kernel IR, one kernel a group (see compiler.fusion).

Elementwise groups become one loop nest that computes every member at each point
from the members' `scalar` rules: a flat loop when every operand has the group's
shape, otherwise a nest where broadcast axes index element 0. An anchored group is
its anchor's own loop nest (`Op.lower`), given a prologue (input 0 computed on the
fly) and an epilogue (applied as it stores) built from the other members.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from math import prod

from codegen import kir
from compiler.fusion import Group
from ir.graph import Node, Value

#: below this much work (statements executed, see kir.estimate_work) a kernel is not
#: worth waking the thread pool for
PARALLEL_MIN_WORK = 1 << 15
_E = kir.ExprBuilder()

BufferFor = Callable[[Value], kir.Buffer]


@dataclass
class KernelCall:
    """A kernel, the group it computes, and the storage (class representative) of each
    of its buffer parameters, in order."""

    kernel: kir.Kernel
    values: list[Value]
    nodes: list[Node]

    @property
    def parallel(self) -> bool:
        loop = self.kernel.parallel_loop
        return loop is not None and self.extent > 1 and self.kernel.work >= PARALLEL_MIN_WORK

    @property
    def extent(self) -> int:
        loop = self.kernel.parallel_loop
        return int(loop.extent.value) if loop is not None else 1  # type: ignore[union-attr]


def c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


class Point:
    """One point of a loop nest over `shape`, as a flat index and/or a multi-index;
    each is derived from the other on demand."""

    def __init__(
        self, shape: tuple[int, ...], flat: kir.Expr | None = None, multi: list[kir.Expr] | None = None
    ):
        self.shape, self._flat, self._multi = shape, flat, multi

    def flat(self) -> kir.Expr:
        if self._flat is None:
            self._flat = kir.Buffer("_", "int64", self.shape).offset(self._multi or [])
        return self._flat

    def multi(self) -> list[kir.Expr]:
        if self._multi is None:
            flat, idx, inner = self.flat(), [], 1
            for d in reversed(self.shape):
                idx.insert(0, flat // inner % d)
                inner *= d
            self._multi = idx
        return self._multi

    def load(self, buf: kir.Buffer) -> kir.Expr:
        """buf at this point, numpy-broadcast: size-1 axes read element 0."""
        if buf.shape == self.shape:
            return buf.load_flat(self.flat())
        if prod(buf.shape) == 1:
            return buf.load_flat(kir.const(0, "int64"))
        multi, lead = self.multi(), len(self.shape) - len(buf.shape)
        return buf[[0 if d == 1 else multi[lead + a] for a, d in enumerate(buf.shape)]]


class Computed:
    """A prologue: the value of an elementwise chain, shaped like the buffer it replaces.
    It offers what an op that `accepts_prologue` uses of its input 0."""

    def __init__(self, value: Value, nodes: list[Node], buffer_for: BufferFor):
        self.name = c_name(value.name)
        self.value, self.nodes, self.buffer_for = value, nodes, buffer_for
        self.dtype, self.shape = value.type.dtype, value.type.shape

    def load_flat(self, index: kir.Expr) -> kir.Expr:
        return evaluate(self.nodes, Point(self.shape, flat=index), self.buffer_for, {})[self.value]


def evaluate(
    nodes: list[Node], point: Point, buffer_for: BufferFor, known: dict[Value, kir.Expr], bind=None
) -> dict[Value, kir.Expr]:
    """Expressions for the nodes' outputs at `point`; values outside come from `known`
    or are loaded. `bind(value, expr)` may turn an expression into a local."""
    env = dict(known)
    for node in nodes:
        args = []
        for v in node.inputs:
            if v not in env:
                env[v] = point.load(buffer_for(v))
                if bind is not None:
                    env[v] = bind(v, env[v])
            args.append(env[v])
        expr = node.op.scalar(_E, *args)
        env[node.outputs[0]] = bind(node.outputs[0], expr) if bind is not None else expr
    return env


def _elementwise(k: kir.KernelBuilder, group: Group, writes: list[Value], buffer_for: BufferFor) -> None:
    """Every external input is read into a local before the first store, so an output
    written in place over an input never feeds a later read."""
    shape = group.shape
    produced = group.produced()
    operands = {v for n in group.nodes for v in n.inputs if v not in produced} | set(writes)
    full = all(v.type.shape == shape for v in operands)

    def body(point: Point) -> None:
        def bind(v: Value, expr: kir.Expr) -> kir.Expr:
            return k.local(v.type.dtype, expr, "v").ref

        env = evaluate(group.nodes, point, buffer_for, {}, bind)
        for v in writes:
            k.store(buffer_for(v), point.flat(), env[v])

    if full:
        with k.flat(prod(shape)) as i:
            body(Point(shape, flat=i))
    else:
        with k.nest(shape) as idx:
            body(Point(shape, multi=idx))


def _anchored(k: kir.KernelBuilder, group: Group, buffer_for: BufferFor) -> None:
    anchor = group.anchor
    after = group.nodes[group.nodes.index(anchor) + 1 :]
    ins: list = [
        Computed(v, group.prologue, buffer_for) if i == 0 and group.prologue else buffer_for(v)
        for i, v in enumerate(anchor.inputs)
    ]
    epilogue = None
    if after:
        raw, shape = anchor.outputs[0], anchor.outputs[0].type.shape

        def epilogue(value: kir.Expr, flat: kir.Expr) -> kir.Expr:
            return evaluate(after, Point(shape, flat=flat), buffer_for, {raw: value})[group.tail]

    anchor.op.lower(k, ins, buffer_for(group.tail), epilogue)


def lower_group(
    group: Group, index: int, writes: list[Value], buffer_for: BufferFor, flat_block: int = 4096
) -> KernelCall:
    """The kernel computing `group`, storing `writes` (the values read outside it)."""
    params: dict[int, kir.Buffer] = {}
    roots: list[Value] = []

    def bound(v: Value) -> kir.Buffer:
        buf = buffer_for(v)
        if id(buf.root) not in params:
            params[id(buf.root)] = buf.root
            roots.append(v)
        return buf

    label = "_".join(dict.fromkeys(n.op.name for n in group.nodes))
    k = kir.KernelBuilder(f"k{index}_{label}"[:60], [], flat_block)
    if group.anchor is not None:
        _anchored(k, group, bound)
    elif group.nodes[0].op.fusion.value == "elementwise":
        _elementwise(k, group, writes, bound)
    else:
        (node,) = group.nodes
        node.op.lower(k, [bound(v) for v in node.inputs], bound(node.outputs[0]))
    k.params = list(params.values())
    return KernelCall(k.finish(), roots, list(group.nodes))


def copy_call(src: kir.Buffer, dst: kir.Buffer, values: list[Value], index: int) -> KernelCall:
    """A kernel that copies src into dst (a graph output that is an input, a param, a
    view or a repeat of another output)."""
    k = kir.KernelBuilder(f"k{index}_copy", [src.root, dst.root])
    with k.flat(dst.numel) as i:
        k.store(dst, i, src.load_flat(i))
    return KernelCall(k.finish(), values, [])
