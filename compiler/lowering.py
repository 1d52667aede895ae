"""Groups of graph nodes → kernel IR, one kernel a group (see compiler.fusion).

Elementwise groups become one loop nest that computes every member at each point
from the members' `scalar` rules: a flat loop when every operand has the group's
shape, otherwise a nest where broadcast axes index element 0. An anchored group is
its anchor's own loop nest (`Op.lower`, or `Op.lower_gpu`), given a prologue (input 0
computed on the fly) and an epilogue (applied as it stores) built from the other
members. Rows kernels take each row through one pass per reduction.

Each group kind is written once against `Loops`, which says how a kernel walks its
space: on the CPU, parallel loops split across threads with vector loops inside; on
a GPU, a grid of blocks of threads (elementwise: a grid-stride loop over the output,
consecutive threads on consecutive elements; rows: a block per row, its threads
striding over the row, each reduction combined across them by warp shuffles and
shared memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod

from codegen import gpu, kir
from compiler.fusion import Group, GroupKind
from ir.graph import Node, Value
from ir.ops import Fusion, Op

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
    #: each element is computed from the inputs' elements at its index before it is
    #: stored, in one pass: an output may take the bytes of an input of its shape
    element_in_place: bool = False

    @property
    def parallel(self) -> bool:
        loop = self.kernel.split_loop
        return loop is not None and self.extent > 1 and self.kernel.work >= PARALLEL_MIN_WORK

    @property
    def extent(self) -> int:
        loop = self.kernel.split_loop
        return int(loop.extent.value) if loop is not None else 1  # type: ignore[union-attr]


def c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


class RowWalk:
    """One row of a rows kernel: its index, the passes over its columns, and how a
    pass's partial result becomes the row's (see Loops.rows)."""

    def __init__(self, index: kir.Expr):
        self.index = index

    @contextmanager
    def columns(self, k: kir.KernelBuilder, n: int) -> Iterator[kir.Expr]:
        with k.loop(n, kir.LoopKind.VECTOR, "j") as j:
            yield j

    def total(self, k: kir.KernelBuilder, acc: kir.Local, combine: Callable) -> None:
        """After a pass, acc holds the whole row's reduction (here it already does)."""

    @contextmanager
    def once(self, k: kir.KernelBuilder) -> Iterator[None]:
        """Statements for the row as a whole (storing its per-row results)."""
        yield


class Loops:
    """The CPU's loops: parallel loops (blocks of `flat_block` elements, or rows) split
    across `threads` threads, vector loops inside."""

    gpu = False

    def __init__(self, flat_block: int = 4096, unit: kir.VectorUnit = kir.AVX512, threads: int = 1):
        self.flat_block = flat_block
        self.unit = unit
        self.threads = threads

    @contextmanager
    def points(self, k: kir.KernelBuilder, shape: tuple[int, ...], full: bool) -> Iterator[Point]:
        """Every point of `shape` (full: every operand has that shape, a flat loop does)."""
        if full:
            with k.flat(prod(shape)) as i:
                yield Point(shape, flat=i)
        else:
            with k.nest(shape) as idx:
                yield Point(shape, multi=idx)

    @contextmanager
    def rows(self, k: kir.KernelBuilder, rows: int, n: int) -> Iterator[RowWalk]:
        with k.loop(rows, kir.LoopKind.PARALLEL, "row") as r:
            yield RowWalk(r)

    def lower_op(self, k: kir.KernelBuilder, op: Op, ins: list, out: kir.Buffer, epilogue=None) -> None:
        op.lower(k, ins, out, epilogue)


class GpuRowWalk(RowWalk):
    """A GPU block per row: thread t takes columns t, t + T, ...; a pass's partial
    results are combined across the block."""

    def __init__(self, index: kir.Expr, thread: kir.Expr, threads: int):
        super().__init__(index)
        self.thread, self.threads = thread, threads

    @contextmanager
    def columns(self, k: kir.KernelBuilder, n: int) -> Iterator[kir.Expr]:
        with k.loop(-(-n // self.threads), kir.LoopKind.SERIAL, "jj") as jj:
            j = jj * self.threads + self.thread
            with k.when(j.lt(n)):
                yield j

    def total(self, k: kir.KernelBuilder, acc: kir.Local, combine: Callable) -> None:
        k.assign(acc, gpu.block_total(k, acc.ref, combine, self.threads, self.thread))

    @contextmanager
    def once(self, k: kir.KernelBuilder) -> Iterator[None]:
        with k.when(self.thread.eq(0)):
            yield


class GpuLoops(Loops):
    """A GPU's loops: grids of blocks of threads (see codegen.gpu)."""

    gpu = True

    def __init__(self) -> None:
        super().__init__(flat_block=1)

    @contextmanager
    def points(self, k: kir.KernelBuilder, shape: tuple[int, ...], full: bool) -> Iterator[Point]:
        """A grid-stride loop over the flat output: consecutive threads, consecutive
        elements (coalesced), as many blocks as fill the GPU and no more."""
        n = prod(shape)
        blocks = gpu.blocks_for(n)
        with gpu.grid(k, (blocks,), (gpu.THREADS,)) as ((b,), (t,)):
            with gpu.stride_over(k, n, b, t, blocks) as i:
                yield Point(shape, flat=i)

    @contextmanager
    def rows(self, k: kir.KernelBuilder, rows: int, n: int) -> Iterator[RowWalk]:
        """A block per row: a warp for short rows, 256 threads for long ones."""
        threads = gpu.THREADS if n >= gpu.THREADS else kir.WARP
        with gpu.grid(k, (rows,), (threads,)) as ((b,), (t,)):
            yield GpuRowWalk(b, t, threads)

    def lower_op(self, k: kir.KernelBuilder, op: Op, ins: list, out: kir.Buffer, epilogue=None) -> None:
        op.lower_gpu(k, ins, out, epilogue)


class Point:
    """One point of a loop nest over `shape`, as a flat index and/or a multi-index;
    each is derived from the other on demand."""

    def __init__(
        self, shape: tuple[int, ...], flat: kir.Expr | None = None, multi: list[kir.Expr] | None = None
    ):
        if multi is not None and len(multi) != len(shape):
            raise AssertionError(f"a multi-index of rank {len(multi)} for a point of shape {shape}")
        self.shape, self._flat, self._multi = shape, flat, multi

    def flat(self) -> kir.Expr:
        if self._flat is None:
            self._flat = kir.Buffer("_", "int64", self.shape).offset(self._multi or [])
        return self._flat

    def multi(self) -> list[kir.Expr]:
        if self._multi is None:
            self._multi = kir.unravel(self.flat(), self.shape)
        return self._multi

    def load(self, buf: kir.Buffer) -> kir.Expr:
        """buf at this point, numpy-broadcast: size-1 axes read element 0."""
        if buf.shape == self.shape:  # a chain's value by multi-index: no unravelling
            return buf[self.multi()] if isinstance(buf, Moved) else buf.load_flat(self.flat())
        if prod(buf.shape) == 1:
            return buf.load_flat(kir.const(0, "int64"))
        multi, lead = self.multi(), len(self.shape) - len(buf.shape)
        return buf[[0 if d == 1 else multi[lead + a] for a, d in enumerate(buf.shape)]]


class Values:
    """The expressions of a group's values at one point, built on demand: a value made by
    one of `nodes` from its inputs' expressions by the op's `scalar` rule, any other
    value taken from `known` or loaded. `bind(value, expr)` may make an expression a
    local (so that it is computed once, before any store)."""

    def __init__(
        self,
        nodes: list[Node],
        point: Point,
        buffer_for: BufferFor,
        known: dict[Value, kir.Expr] | None = None,
        bind: Callable[[Value, kir.Expr], kir.Expr] | None = None,
    ):
        self.producer = {n.outputs[0]: n for n in nodes}
        self.point, self.buffer_for, self.bind = point, buffer_for, bind
        self.memo: dict[Value, kir.Expr] = dict(known or {})

    def __getitem__(self, v: Value) -> kir.Expr:
        if v not in self.memo:
            node = self.producer.get(v)
            if node is None:
                expr = self.point.load(self.buffer_for(v))
            else:
                expr = node.op.scalar(_E, *(self[a] for a in node.inputs))
            self.memo[v] = self.bind(v, expr) if self.bind is not None else expr
        return self.memo[v]


class Computed:
    """A prologue: the value of an elementwise chain, shaped like the buffer it replaces.
    It offers what an op that `accepts_prologue` uses of its input 0."""

    def __init__(self, value: Value, nodes: list[Node], buffer_for: BufferFor):
        self.name = c_name(value.name)
        self.value, self.nodes, self.buffer_for = value, nodes, buffer_for
        self.dtype, self.shape = value.type.dtype, value.type.shape

    def load_flat(self, index: kir.Expr) -> kir.Expr:
        return Values(self.nodes, Point(self.shape, flat=index), self.buffer_for)[self.value]


def _elementwise(
    k: kir.KernelBuilder, group: Group, writes: list[Value], buffer_for: BufferFor, loops: Loops
) -> None:
    """Every value is computed into a local before the first store, so an output written
    in place over an input never feeds a later read."""
    shape = group.shape
    produced = group.produced()
    operands = {v for n in group.nodes for v in n.inputs if v not in produced} | set(writes)
    # a chain is read by multi-index: a flat loop's index would be unravelled per read
    flat = not group.moves and all(v.type.shape == shape for v in operands)
    computed = [n for n in group.nodes if n not in group.moves]
    with loops.points(k, shape, flat) as point:
        values = Values(computed, point, buffer_for, bind=lambda v, e: k.local(v.type.dtype, e, "v").ref)
        exprs = [values[v] for v in writes]
        for v, expr in zip(writes, exprs):
            k.store(buffer_for(v), point.flat(), expr)


class IndexChain:
    """Element-moving nodes whose values a kernel never stores (an indexed group's
    members before its last, an elementwise group's `moves`): each value is read where
    it is needed as its op's element at that index (a view's by the same element
    reindexed), down to the buffers where the chain begins."""

    def __init__(self, k: kir.KernelBuilder, nodes: list[Node], buffer_for: BufferFor):
        self.k, self.buffer_for = k, buffer_for
        self.producer = {n.outputs[0]: n for n in nodes}

    def operand(self, v: Value) -> kir.Buffer | Moved:
        return Moved(self, v) if v in self.producer else self.buffer_for(v)


class Moved:
    """A value of an IndexChain, read as a kernel reads a buffer (`x[idx]`,
    `x.load_flat(i)`)."""

    def __init__(self, chain: IndexChain, v: Value):
        self.chain, self.node = chain, chain.producer[v]
        self.name, self.dtype, self.shape = c_name(v.name), v.type.dtype, v.type.shape

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def __getitem__(self, idx) -> kir.Expr:
        idx = list(idx) if isinstance(idx, (tuple, list)) else [idx]
        ins = [self.chain.operand(u) for u in self.node.inputs]
        if self.node.op.view:
            return ins[0][kir.reshape_index(idx, self.shape, ins[0].shape)]
        return self.node.op.element(self.chain.k, ins, [kir.lift(i, "int64") for i in idx])

    def load_flat(self, index: kir.Expr) -> kir.Expr:
        return self[kir.unravel(index, self.shape)]


def _indexed(k: kir.KernelBuilder, group: Group, buffer_for: BufferFor, loops: Loops) -> None:
    """The last member's own loops, its inputs read through the chain before it."""
    *chain, last = group.nodes
    operands = IndexChain(k, chain, buffer_for)
    ins = [operands.operand(v) for v in last.inputs]
    loops.lower_op(k, last.op, ins, buffer_for(last.outputs[0]))


def _anchored(k: kir.KernelBuilder, group: Group, buffer_for: BufferFor, loops: Loops) -> None:
    anchor = group.anchor
    # the epilogue: every other member, including elementwise branches that do not
    # read the anchor (x → relu joining x → reduce → sub in `relu + sub`)
    after = [n for n in group.nodes if n is not anchor and n not in group.prologue]
    ins: list = [
        Computed(v, group.prologue, buffer_for) if i == 0 and group.prologue else buffer_for(v)
        for i, v in enumerate(anchor.inputs)
    ]
    epilogue = None
    if after:
        raw, shape = anchor.outputs[0], anchor.outputs[0].type.shape

        def epilogue(value: kir.Expr, flat: kir.Expr, multi: list[kir.Expr] | None) -> kir.Expr:
            return Values(after, Point(shape, flat=flat, multi=multi), buffer_for, {raw: value})[group.tail]

    loops.lower_op(k, anchor.op, ins, buffer_for(group.tail), epilogue)


def _row_stashes(group: Group, row_nodes: list[Node], writes: list[Value]) -> tuple[dict, list]:
    """Which row values to keep in memory between passes over a row, and where.

    A value read by several passes is recomputed in each unless it is kept: a written
    value read by a reduction pass is kept in its own output from its first pass on;
    another costly value (exp, division, ...) read by two passes borrows the buffer of
    a written value, which is free until the last pass (softmax keeps exp(x - max) in
    its output). Returns {value: buffer owner} and each pass's needed values."""
    producer = {n.outputs[0]: n for n in row_nodes}

    def closure(v: Value) -> set[Value]:
        seen, stack = set(), [v]
        while stack:
            u = stack.pop()
            if u in producer and u not in seen:
                seen.add(u)
                stack.extend(producer[u].inputs)
        return seen

    reductions = [n for n in group.nodes if n.op.row_reduction]
    row_writes = [v for v in writes if v in producer]
    needs = [closure(n.inputs[0]) for n in reductions] + [set().union(*map(closure, row_writes))]
    stash = {v: v for v in row_writes if any(v in need for need in needs[:-1])}
    free = [w for w in row_writes if w not in stash]
    for v in producer:
        uses = sum(v in need for need in needs)
        costly = any(not producer[u].op.cheap for u in closure(v))
        if v not in stash and v not in row_writes and uses >= 2 and costly:
            owner = next((w for w in free if w.type.dtype == v.type.dtype), None)
            if owner is not None:
                free.remove(owner)
                stash[v] = owner
    return stash, needs


def _rows(
    k: kir.KernelBuilder, group: Group, writes: list[Value], buffer_for: BufferFor, loops: Loops
) -> None:
    """One parallel step per row. Per-row values (reductions, and elementwise ops on them)
    become locals in node order, a reduction being one pass over the row; values over the
    row are expressions, recomputed in each pass that reads them unless _row_stashes keeps
    them; the row values read outside are stored in one last pass."""
    shape = group.row_shape
    n, rows = shape[-1], prod(shape[:-1])
    per_row_shape = shape[:-1] + (1,)
    over_row = {v for v in group.produced() if v.type.shape == shape}
    row_nodes = [node for node in group.nodes if node.outputs[0] in over_row]
    stash, needs = _row_stashes(group, row_nodes, writes)
    stored: set[Value] = set()
    with loops.rows(k, rows, n) as row:
        r = row.index
        per_row: dict[Value, kir.Expr] = {}
        row_point = Point(per_row_shape, flat=r)

        def row_pass(j: kir.Expr, need: set[Value]) -> Values:
            """Values at column j: kept ones loaded, row nodes computed, the rest loaded;
            values kept from this pass on are stored."""
            at = r * n + j
            known = {v: buffer_for(stash[v]).load_flat(at) for v in stored}
            values = Values(row_nodes, Point(shape, flat=at), buffer_for, {**per_row, **known})
            for v in need:
                if v in stash and v not in stored:
                    values.memo[v] = k.local(v.type.dtype, values[v], "kept").ref  # computed once
                    k.store(buffer_for(stash[v]), at, values.memo[v])
            return values

        reduction_pass = 0
        for node in group.nodes:
            out = node.outputs[0]
            if out in over_row:
                continue  # computed where it is read
            if node.op.row_reduction:
                x, need = node.inputs[0], needs[reduction_pass]
                acc = k.local(out.type.dtype, node.op.init(out.type.dtype), "acc")
                with row.columns(k, n) as j:
                    k.assign(acc, node.op.combine(acc.ref, row_pass(j, need)[x]), reduction=True)
                row.total(k, acc, node.op.combine)
                stored |= {v for v in need if v in stash}
                reduction_pass += 1
                result = node.op.finish(acc.ref, n)
            else:
                args = [per_row[v] if v in per_row else row_point.load(buffer_for(v)) for v in node.inputs]
                result = node.op.scalar(_E, *args)
            per_row[out] = k.local(out.type.dtype, result, "row").ref
        per_row_writes = [v for v in writes if v in per_row]
        if per_row_writes:
            with row.once(k):
                for v in per_row_writes:
                    k.store(buffer_for(v), r, per_row[v])
        row_writes = [v for v in writes if v in over_row and not (stash.get(v) is v and v in stored)]
        if row_writes:
            with row.columns(k, n) as j:
                values = row_pass(j, set())
                # every value into a local before the first store: a value kept in the
                # buffer of a written value is read before that buffer takes its own value
                results = [k.local(v.type.dtype, values[v], "out").ref for v in row_writes]
                for v, result in zip(row_writes, results):
                    k.store(buffer_for(v), r * n + j, result)


def lower_group(
    group: Group, index: int, writes: list[Value], buffer_for: BufferFor, loops: Loops | None = None
) -> KernelCall:
    """The kernel computing `group`, storing `writes` (the values read outside it), with
    the CPU's loops unless `loops` says otherwise (GpuLoops: a GPU kernel)."""
    loops = loops or Loops()
    params: dict[int, kir.Buffer] = {}
    roots: list[Value] = []

    def bound(v: Value) -> kir.Buffer:
        buf = buffer_for(v)
        if id(buf.root) not in params:
            params[id(buf.root)] = buf.root
            roots.append(v)
        return buf

    label = "_".join(dict.fromkeys(n.op.name for n in group.nodes))
    k = kir.KernelBuilder(f"k{index}_{label}"[:60], [], loops.flat_block, loops.unit, loops.threads)
    if group.anchor is not None:
        _anchored(k, group, bound, loops)
    elif group.kind is GroupKind.ROWS:
        _rows(k, group, writes, bound, loops)
    elif group.kind is GroupKind.INDEXED:
        _indexed(k, group, bound, loops)
    elif lowers_element_by_element(group):
        # an index chain's values are read through, from the buffers where it starts
        operand = IndexChain(k, group.moves, bound).operand if group.moves else bound
        _elementwise(k, group, writes, operand, loops)
    else:
        (node,) = group.nodes
        loops.lower_op(k, node.op, [bound(v) for v in node.inputs], bound(node.outputs[0]))
    k.params = list(params.values())
    return KernelCall(k.finish(), roots, list(group.nodes), writes_in_place(group))


def lowers_element_by_element(group: Group) -> bool:
    """The group becomes one pass that computes each element from the operands'
    elements at its index, into locals before it stores (see _elementwise)."""
    single_elementwise = group.kind is GroupKind.SINGLE and group.nodes[0].op.fusion == Fusion.ELEMENTWISE
    return group.kind is GroupKind.ELEMENTWISE or single_elementwise


def writes_in_place(group: Group) -> bool:
    """The group's outputs may take the bytes of inputs of their shape that die in it
    (not when it reads through index chains: their inputs are read elsewhere)."""
    return lowers_element_by_element(group) and not group.moves and all(n.op.in_place for n in group.nodes)


def copy_call(
    src: kir.Buffer, dst: kir.Buffer, values: list[Value], index: int, loops: Loops | None = None
) -> KernelCall:
    """A kernel that copies src into dst (a graph output that is an input, a param, a
    view or a repeat of another output)."""
    loops = loops or Loops()
    k = kir.KernelBuilder(f"k{index}_copy", [src.root, dst.root], loops.flat_block, loops.unit, loops.threads)
    with loops.points(k, dst.shape, True) as point:
        k.store(dst, point.flat(), src.load_flat(point.flat()))
    return KernelCall(k.finish(), values, [], element_in_place=True)
