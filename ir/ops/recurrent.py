"""Recurrent layers: one direction of an RNN, GRU or LSTM over a whole sequence.

The input projection x·Wᵀ (+ biases) has no recurrence, so it is not here: frontends
compute it for every step at once with one matmul, and these ops take its result
`xw` (seq, batch, gates·hidden), and `rt` = Rᵀ (hidden, gates·hidden), the layout the
per-step product reads row by row. What remains is the recurrence, h_{t-1}·Rᵀ and the
gates, one kernel per layer and direction: chunks of batch rows run in parallel, steps
in order. Each step runs over tiles of hidden units; for each gate, the chunk's blocks
of rows sum the tile over h_{t-1} as a matmul's register tile does (the sums in vector
registers, each vector of Rᵀ loaded once for the block's rows), into a small scratch
buffer, and each row's cell then turns the tile's gate sums into its new state. A
gate's columns of Rᵀ for the tile stay in L1 while every block of the chunk reads
them, so a step streams Rᵀ once per chunk, not once per block.

The output holds the state before and after every step, in seq + 1 slots (axis 0).
A forward pass starts in slot 0 and writes step t's state to slot t + 1; a reverse
pass starts in slot seq and writes step t's state to slot t. So the per-step outputs
are slots [1, seq] (forward) or [0, seq) (reverse), and the final state is slot seq
(forward) or 0 (reverse). Axis 1 is the plane: the hidden state h, and for an LSTM
also its cell state c; a GRU's second plane holds r ⊙ h_{t-1} of each step, the
scratch its linear_before_reset=0 form needs.

Each op writes its cell, one step's arithmetic, once: as `phases`, each a product
over Rᵀ (which gates, what each gate's sum starts from, which vector multiplies Rᵀ)
and the elementwise arithmetic after it, written against `Cell`. Three backends
implement Cell: numpy arrays for the reference, one element's kernel-IR expressions
for the kernel, graph values for the unrolled steps autodiff goes back through
(`decompose`). The products stay where each backend does them best: a numpy matmul,
the tiled scratch-buffer sums in the kernel, a graph matmul.

Gate activations are registered elementwise ops, named with their attributes
(("sigmoid", ()), ("hard_sigmoid", (("alpha", 0.2), ("beta", 0.5)))); `clip` bounds
the gates' inputs to [-clip, clip] as ONNX defines it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from codegen import gpu
from codegen.kir import ITEMSIZE, WARP, Buffer, Expr, KernelBuilder, LoopKind, const, muladd
from codegen.kir import ExprBuilder as e
from ir.errors import GraphError
from ir.ops import REGISTRY, BatchMixing, ElementwiseOp, Fusion, Gradient, Op, register
from ir.ops.nn import (
    MATMUL_VECTOR,
    k_sweeps,
    matmul_col_tile,
    matmul_rows,
    unpack_panels,
    vector_kind,
)
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder
    from ir.graph import Value

Activation = tuple[str, tuple[tuple[str, float], ...]]

SIGMOID: Activation = ("sigmoid", ())
TANH: Activation = ("tanh", ())

#: batch rows that share one pass over Rᵀ per step (a chunk; chunks run in parallel)
CHUNK_ROWS = 16


#: a recurrence team's members at most, and the hidden units each takes at least (a
#: step's share of work that dwarfs the barrier after it)
TEAM_MEMBERS = 8
TEAM_MIN_UNITS = 64


def _chunk_rows(batch: int) -> int:
    """Batch rows that step through time together (a parallel step): the most, up to
    CHUNK_ROWS, that divide the batch."""
    return next(r for r in range(min(batch, CHUNK_ROWS), 0, -1) if batch % r == 0)


def _unit_groups(hidden: int, chunks: int, threads: int) -> int:
    """Groups the hidden units split into, each stepping through time beside the others
    (see Recurrence.lower): the fewest that give each of `threads` threads a member
    (chunks x groups of them, up to TEAM_MEMBERS), whose groups hold whole panels of Rᵀ
    (MATMUL_VECTOR units: no two members write one cache line) of TEAM_MIN_UNITS units
    or more; 1 where the chunks already fill the threads or the units do not split.
    Fewer, larger groups keep a member's tiles whole (at batch 16 on 2 threads, 2 groups
    ran 10% faster than 8, and at batch 32 a team of 4 groups 13% slower than none)."""
    best = 1
    for groups in (2, 4, 8):
        if chunks * best >= threads:
            break
        fits = chunks * groups <= TEAM_MEMBERS and hidden % (groups * MATMUL_VECTOR) == 0
        if not fits or hidden // groups < TEAM_MIN_UNITS:
            break
        best = groups
    return best


@dataclasses.dataclass(frozen=True)
class _ChunkLayout:
    """How a recurrence kernel walks a chunk's rows: `chunk` rows in blocks of `rows`
    (and one of `rest`), tiles of `units` units, their gate sums in `sums`."""

    chunk: int
    rows: int
    rest: int
    units: int
    sums: Buffer


@functools.cache
def _activation(spec: Activation) -> ElementwiseOp:
    name, attrs = spec
    op = REGISTRY.get(name)
    if op is None or not issubclass(op, ElementwiseOp):
        raise GraphError(f"recurrent activation {name!r} is not an elementwise op")
    return op(**dict(attrs))  # type: ignore[return-value]


# --------------------------------------------------------------------------- the cell's terms


class Cell:
    """What a cell is written against, for one step. Its values (numpy arrays, kernel
    expressions or graph values) take + - * with each other and with Python floats;
    the rest is the reads and operations below."""

    def __init__(self, op: Recurrence):
        self.op = op
        self.sums: dict[int, Any] = {}
        self.fns = op.functions
        self.clip_op = (
            None if op.clip is None else _activation(("clip", (("min", -op.clip), ("max", op.clip))))
        )

    def sum(self, gate: int) -> Any:
        """The gate's sum from the current phase: its start plus the product over Rᵀ."""
        return self.sums[gate]

    def act(self, n: int, x: Any) -> Any:
        """The op's activation n (ONNX's order: f, g, h)."""
        return self.apply(self.fns[n], x)

    def clip(self, x: Any) -> Any:
        return x if self.clip_op is None else self.apply(self.clip_op, x)

    def apply(self, fn: ElementwiseOp, x: Any) -> Any:
        raise NotImplementedError

    def xw(self, gate: int) -> Any:
        """The step's input projection, the gate's columns."""
        raise NotImplementedError

    def per_unit(self, input: int, part: int = 0) -> Any:
        """Part `part` (hidden units long) of input `input`, a vector over the units."""
        raise NotImplementedError

    def prev(self, plane: int) -> Any:
        """The state before the step."""
        raise NotImplementedError

    def new(self, plane: int) -> Any:
        """The state after the step, as an earlier phase wrote it."""
        raise NotImplementedError

    def let(self, x: Any) -> Any:
        """x, computed once where it is used several times."""
        return x

    def zero(self) -> Any:
        raise NotImplementedError


def _h_prev(c: Cell) -> Any:
    return c.prev(0)


def _reset_h(c: Cell) -> Any:
    """r ⊙ h_{t-1}, which a GRU's first phase leaves in plane 1."""
    return c.new(1)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One product over Rᵀ and the arithmetic after it. Gate g's sum is start(c, g) +
    over(c)·Rᵀ[:, g·hidden : (g + 1)·hidden] for g in `gates` (start None: the step's xw
    columns of the gate); cell(c) then gives the planes of the new state this phase
    writes, {plane: value}, in the order they are stored."""

    gates: range
    cell: Callable[[Cell], dict[int, Any]]
    over: Callable[[Cell], Any] = _h_prev
    start: Callable[[Cell, int], Any] | None = None

    def start_of(self, c: Cell, gate: int) -> Any:
        return c.xw(gate) if self.start is None else self.start(c, gate)


# --------------------------------------------------------------------------- the ops


@dataclasses.dataclass(frozen=True)
class Recurrence(Op):
    """What RNN, GRU and LSTM share: the slots, the checks, the three backends of the
    cell. Inputs: xw, rt, the initial state(s) and what else the cell takes (state_shapes)."""

    arity = (3, 3)
    gates: ClassVar[int] = 1
    #: per plane of the state, the input that holds its initial value (None: zeros)
    state_planes: ClassVar[tuple[int | None, ...]] = (2,)
    differentiation = Gradient.DECOMPOSE  # through the unrolled steps
    hidden: int = 0
    reverse: bool = False
    activations: tuple[Activation, ...] = ()
    clip: float | None = None
    #: Rᵀ packed by pack_panels in panels of this many columns, (gates·hidden / panel,
    #: hidden, panel), so that a tile reads each gate's columns as contiguous rows
    #: (compiler.passes.recurrence_packed); None: Rᵀ as a matrix
    rt_panel: int | None = None

    def default_activations(self) -> tuple[Activation, ...]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    @property
    def planes(self) -> int:
        return len(self.state_planes)

    @property
    def functions(self) -> list[ElementwiseOp]:
        specs = self.activations or self.default_activations()
        if len(specs) != len(self.default_activations()):
            raise GraphError(f"{self.name}: expects {len(self.default_activations())} activations")
        return [_activation(s) for s in specs]

    def batch_axis(self, ins, out, batch):
        """The batch is xw's axis 1, the states' axis 0 (those with a batch) and the
        output's axis 2: the recurrence runs each batch row apart."""
        xw, states = batch[0], batch[2:]
        row = xw and dataclasses.replace(xw, axis=0)
        batched = [len(t.shape) == 2 for t in ins[2:]]  # (batch, hidden), not a peephole
        wrong_state = any(b != (row if has else None) for b, has in zip(states, batched))
        if batch[1] or (xw and xw.axis != 1) or wrong_state:
            raise BatchMixing(f"it takes the batch on xw's axis 1, the states' axis 0: got {batch}")
        return xw and dataclasses.replace(xw, axis=2)

    def infer(self, xw: TensorType, rt: TensorType, *states: TensorType) -> TensorType:
        h = self.hidden
        if xw.rank != 3 or xw.shape[2] != self.gates * h:
            raise GraphError(f"{self.name}: xw must be (seq, batch, {self.gates}·{h}), got {xw.shape}")
        seq, batch, _ = xw.shape
        if xw.dtype not in ("float32", "float64"):
            raise GraphError(f"{self.name}: dtype {xw.dtype} is not float")
        expected = [self._rt_shape()] + self.state_shapes(batch)
        for pos, (t, shape) in enumerate(zip([rt, *states], expected), start=1):
            if t.shape != shape or t.dtype != xw.dtype:
                raise GraphError(f"{self.name}: input {pos} is {t}, expected {xw.dtype}{list(shape)}")
        self.functions  # noqa: B018 - validates the activations
        return TensorType(xw.dtype, (seq + 1, self.planes, batch, h))

    def _rt_shape(self) -> tuple[int, ...]:
        h, width = self.hidden, self.gates * self.hidden
        return (h, width) if self.rt_panel is None else (width // self.rt_panel, h, self.rt_panel)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """The shapes of the inputs after rt: the initial states (and the GRU's n-gate
        bias, the LSTM's peepholes)."""
        return [(batch, self.hidden)]

    def _order(self, seq: int) -> list[tuple[int, int, int]]:
        """(t, slot read, slot written) for each step in the order it runs."""
        if self.reverse:
            return [(t, t + 1, t) for t in reversed(range(seq))]
        return [(t, t, t + 1) for t in range(seq)]

    def _columns(self, gates: range) -> tuple[int, int]:
        """The columns of Rᵀ (and of xw) that `gates` span: (first, width)."""
        return gates[0] * self.hidden, len(gates) * self.hidden

    # ---------------------------------------------------------------- numpy

    def reference(self, xw, rt, *states):
        seq, batch, _ = xw.shape
        if self.rt_panel is not None:
            rt = unpack_panels(rt, self.gates * self.hidden).T
        ins = [xw, rt, *states]
        out = np.zeros((seq + 1, self.planes, batch, self.hidden), xw.dtype)
        first = seq if self.reverse else 0
        for plane, source in enumerate(self.state_planes):
            if source is not None:
                out[first, plane] = ins[source]
        for t, read, write in self._order(seq):
            c = _NumpyCell(self, ins, xw[t], out[read], out[write])
            for phase in self.phases():
                for plane, value in c.run(phase).items():
                    out[write, plane] = value
        return out

    # ---------------------------------------------------------------- kernel

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """Chunks of batch rows in parallel, each stepping through time. A step's product
        runs per phase over tiles of hidden units: for each gate, the chunk's blocks of
        rows sum the tile (a matmul register tile: rows x units, sized by matmul_rows and
        matmul_col_tile) over h_{t-1} into the scratch `sums`; then each row's cell turns
        the tile's gate sums into its new state. One gate's columns of Rᵀ for the tile
        (hidden x units) stay in L1 while every block of the chunk reads them.

        Where the units split into groups (_unit_groups), a team runs a member per chunk
        and group, and the members meet at a barrier after every phase, since the next
        reads the state every unit wrote: each core then streams its own part of Rᵀ at
        every step, which stays in its cache, and a batch of one row runs on every core."""
        xw = ins[0]
        seq, batch, _ = xw.shape
        chunk = _chunk_rows(batch)
        chunks = batch // chunk
        macs = seq * batch * self.hidden * self.gates * self.hidden
        rows, rest = matmul_rows(k.unit, chunk, macs)
        units = matmul_col_tile(k.unit, rows)
        rt = ins[1]
        k.reread_bytes = (chunks * seq - 1) * rt.numel * ITEMSIZE[rt.dtype]  # Rᵀ per chunk and step
        sums = k.scratch("gate_sums", xw.dtype, (chunk, self.gates, units))
        lay = _ChunkLayout(chunk, rows, rest, units, sums)
        groups = _unit_groups(self.hidden, chunks, k.threads)
        if groups == 1:
            with k.loop(chunks, LoopKind.PARALLEL, "chunk") as c:
                self._steps(k, ins, out, lay, c, const(0, "int64"), self.hidden, team=False)
            return
        per = self.hidden // groups
        with k.team(chunks * groups) as m:
            self._steps(k, ins, out, lay, m % chunks, m // chunks * per, per, team=True)

    def _steps(
        self, k: KernelBuilder, ins: list[Buffer], out: Buffer, lay: _ChunkLayout, c: Expr, first_unit: Expr,
        count: int, team: bool,
    ) -> None:  # fmt: skip
        """Chunk c's rows through every step, over units [first_unit, first_unit + count);
        a team's members wait for each other after the initial state and every phase."""
        seq = ins[0].shape[0]
        chunk = lay.chunk
        first = seq if self.reverse else 0

        def each_block(body: Callable[[Expr, int], None]) -> None:
            """body(first row within the chunk, rows) for each block of the chunk."""
            full = chunk // lay.rows
            with k.loop(full, LoopKind.SERIAL, "block") as q:
                body(q * lay.rows, lay.rows)
            if lay.rest:
                body(const(full * lay.rows, "int64"), lay.rest)

        with k.loop(chunk, LoopKind.SERIAL, "r") as r:
            with k.loop(count, LoopKind.VECTOR, "j") as j:
                row, unit = c * chunk + r, first_unit + j
                for plane, source in enumerate(self.state_planes):
                    value = ins[source][row, unit] if source is not None else e.const(0.0, out.dtype)
                    k.store(out, (first, plane, row, unit), value)
        if team:
            k.barrier()
        with k.loop(seq, LoopKind.SERIAL, "n") as n:
            t = (seq - 1 - n) if self.reverse else n
            read, write = (t + 1, t) if self.reverse else (t, t + 1)

            def step(first_row: Expr, rows: int) -> Step:
                block = [c * chunk + first_row + i for i in range(rows)]
                return Step(k, ins, out, block, t, read, write, lay.sums, first_row)

            for phase in self.phases():

                def tile(first: Expr, width: int, phase: Phase = phase) -> None:
                    for i, g in enumerate(phase.gates):

                        def gate_sums(row: Expr, rows: int, i: int = i, g: int = g) -> None:
                            self._gate_sums(step(row, rows), phase, i, g, first, width)

                        each_block(gate_sums)
                    with k.loop(chunk, LoopKind.SERIAL, "r") as row:
                        self._cell(step(row, 1), phase, first, width)

                self.unit_tiles(k, tile, lay.units, first_unit, count)
                if team:
                    k.barrier()

    def lower_gpu(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """One kernel for the whole sequence: a block per group of batch rows, which steps
        through time in order; its threads take the hidden units (thread t: units t,
        t + T, ...), each summing its gates' products over h_{t-1} and the column of Rᵀ
        it reads (consecutive threads, consecutive columns) before the cell's arithmetic.
        A barrier after every phase: the next one reads the state every unit wrote."""
        xw = ins[0]
        seq, batch, _ = xw.shape
        rows = 2 if batch % 2 == 0 else 1
        threads = min(-(-self.hidden // WARP) * WARP, gpu.THREADS)
        first = seq if self.reverse else 0
        with gpu.grid(k, (batch // rows,), (threads,)) as ((blk,), (t,)):
            block = [blk * rows + i for i in range(rows)]
            with self._units(k, t, threads) as j:
                for b in block:
                    for plane, source in enumerate(self.state_planes):
                        value = ins[source][b, j] if source is not None else e.const(0.0, xw.dtype)
                        k.store(out, (first, plane, b, j), value)
            k.barrier()
            with k.loop(seq, LoopKind.SERIAL, "n") as n:
                t_ = (seq - 1 - n) if self.reverse else n
                read, write = (t_ + 1, t_) if self.reverse else (t_, t_ + 1)
                step = Step(k, ins, out, block, t_, read, write, None)
                for phase in self.phases():
                    with self._units(k, t, threads) as j:
                        self._unit_gpu(step, phase, j)
                    k.barrier()

    @contextlib.contextmanager
    def _units(self, k: KernelBuilder, thread: Expr, threads: int):
        """The hidden units this thread takes: thread, thread + threads, ..."""
        with k.loop(-(-self.hidden // threads), LoopKind.SERIAL, "units") as ub:
            j = ub * threads + thread
            with k.when(j.lt(self.hidden)):
                yield j

    def _unit_gpu(self, s: Step, phase: Phase, j: Expr) -> None:
        """One phase at unit j for the block's rows: the gate sums in locals, then the cell."""
        k, h = s.k, self.hidden
        cells = [_KernelCell(self, s, r, j) for r in range(len(s.block))]
        sums = [[k.local(s.out.dtype, phase.start_of(c, g), "sum") for g in phase.gates] for c in cells]
        with k.loop(h, LoopKind.SERIAL, "k") as kk:
            vectors = [
                k.local(s.out.dtype, phase.over(_KernelCell(self, s, r, kk)), "h") for r in range(len(cells))
            ]
            for i, g in enumerate(phase.gates):
                w = k.local(s.out.dtype, s.rt.load_flat(self._rt_at(s.rt, kk, g * h + j)), "w")
                for r, v in enumerate(vectors):
                    k.assign(sums[r][i], muladd(v.ref, w.ref, sums[r][i].ref))
        for r, (c, b) in enumerate(zip(cells, s.block)):
            c.sums = {g: sums[r][i].ref for i, g in enumerate(phase.gates)}
            for plane, value in phase.cell(c).items():
                k.store(s.out, (s.write, plane, b, j), value)

    @staticmethod
    def unit_tiles(
        k: KernelBuilder, tile: Callable[[Expr, int], None], size: int, first: Expr, count: int
    ) -> None:
        """tile(first unit, units) over units [first, first + count): whole tiles of
        `size` units, then the rest as whole vectors, then the last few units."""
        tiles, tail = divmod(count, size)
        if tiles:
            with k.loop(tiles, LoopKind.SERIAL, "units") as u:
                tile(first + u * size, size)
        whole = tail - tail % k.unit.lanes
        for offset, units in ((tiles * size, whole), (tiles * size + whole, tail - whole)):
            if units:
                tile(first + offset, units)

    def _gate_sums(self, s: Step, phase: Phase, i: int, gate: int, first: Expr, units: int) -> None:
        """The sums of the phase's i-th gate over units [first, first + units) for the
        step's block of rows, into s.sums. The tile's units run as parts of MATMUL_VECTOR
        (a panel of a packed Rᵀ), those of one width side by side in one loop
        (_gate_parts), so a block of one row still has sums enough to hide the FMA's
        latency."""
        parts = [(p, min(MATMUL_VECTOR, units - p)) for p in range(0, units, MATMUL_VECTOR)]
        for width in sorted({w for _, w in parts}, reverse=True):
            self._gate_parts(s, phase, i, gate, first, [p for p, w in parts if w == width], width)

    def _gate_parts(
        self, s: Step, phase: Phase, i: int, gate: int, first: Expr, offsets: list[int], width: int
    ) -> None:
        """The gate's sums for the tile's parts of `width` units at `offsets` from its
        first unit. They stay in registers over the whole of h_{t-1} (a scratch tile
        indexed by constants, which LLVM promotes, as a convolution's), each vector of
        Rᵀ loaded once for all the rows, in sweeps (k_sweeps); then they
        go to s.sums for the cells."""
        k, h = s.k, self.hidden
        rows = range(len(s.block))
        kind = vector_kind(width, k.unit.lanes)
        acc = k.scratch("acc", s.out.dtype, (len(rows) * len(offsets) * width,))

        def at(r: int, n: int, jj: Expr) -> Expr:
            return (r * len(offsets) + n) * width + jj

        with k.loop(width, kind, "u") as jj:
            for r in rows:
                for n, p in enumerate(offsets):
                    k.store(acc, at(r, n, jj), phase.start_of(_KernelCell(self, s, r, first + p + jj), gate))

        def sweep(first_k: Expr, steps: int) -> None:
            coeffs = [[phase.over(_KernelCell(self, s, r, first_k + u)) for u in range(steps)] for r in rows]
            with k.loop(width, kind, "u") as jj:
                for u in range(steps):
                    for n, p in enumerate(offsets):
                        column = self._rt_at(s.rt, first_k + u, gate * h + first + p) + jj
                        w = k.local(s.out.dtype, s.rt.load_flat(column), "w")
                        for r in rows:
                            sum_ = acc.load_flat(at(r, n, jj))
                            k.store(acc, at(r, n, jj), muladd(coeffs[r][u], w.ref, sum_))

        k_sweeps(k, h, sweep)
        with k.loop(width, kind, "u") as jj:
            for r in rows:
                for n, p in enumerate(offsets):
                    k.store(s.sums, s.at(r, i, p + jj), acc.load_flat(at(r, n, jj)))

    def _cell(self, s: Step, phase: Phase, first: Expr, units: int) -> None:
        """The cell's arithmetic for the step's row over units [first, first + units),
        from the gate sums of the tile. A cell is a long chain of dependent operations
        (exponentials, divisions): one vector's chain at a time leaves the vector ports
        waiting on latency, so whole vectors run several side by side (a tile loop, its
        instructions interleaved): 3-4% of an LSTM at batch 1 and 32."""
        k, lanes = s.k, s.k.unit.lanes
        side_by_side = (4, 2) if k.unit.registers >= 32 else (2,)
        group = next((v * lanes for v in side_by_side if units % (v * lanes) == 0), 0)
        if group:
            with k.loop(units // group, LoopKind.SERIAL, "units") as q:
                with k.loop(group, LoopKind.TILE, "u") as jj:
                    self._cell_at(s, phase, first, q * group + jj)
            return
        kind = LoopKind.VECTOR if units % lanes == 0 else LoopKind.VECTOR_MASKED
        with k.loop(units, kind, "u") as jj:
            self._cell_at(s, phase, first, jj)

    def _cell_at(self, s: Step, phase: Phase, first: Expr, jj: Expr) -> None:
        """The cell at unit first + jj, whose gate sums are the tile's column jj."""
        c = _KernelCell(self, s, 0, first + jj)
        c.sums = {g: s.sums.load_flat(s.at(0, i, jj)) for i, g in enumerate(phase.gates)}
        for plane, value in phase.cell(c).items():
            s.k.store(s.out, (s.write, plane, s.block[0], first + jj), value)

    def _rt_at(self, rt: Buffer, row: Expr, column: Expr | int) -> Expr:
        """Where Rᵀ[row, column] is stored; the columns after it, to the end of its panel
        when Rᵀ is packed, follow it."""
        if self.rt_panel is None:
            return row * rt.shape[1] + column
        panel = self.rt_panel
        return (column // panel * self.hidden + row) * panel + column % panel

    # ---------------------------------------------------------------- graph

    def decompose(self, b: GraphBuilder, inputs: list[Value]) -> Value:
        """The output computed with graph ops, step by step as the reference computes it."""
        seq, batch, _ = inputs[0].type.shape
        c = _GraphCell(self, b, inputs)
        first = seq if self.reverse else 0
        slots = {first: [c.zero() if i is None else c.ins[i] for i in self.state_planes]}
        for t, read, write in self._order(seq):
            c.begin(t, slots[read])
            for phase in self.phases():
                c.new_planes.update(c.run(phase))
            slots[write] = [c.new_planes[p] for p in range(self.planes)]
        stacked = [
            b.concat(*(b.reshape(p.value, shape=(1, 1, batch, self.hidden)) for p in slots[s]), axis=1)
            if self.planes > 1
            else b.reshape(slots[s][0].value, shape=(1, 1, batch, self.hidden))
            for s in range(seq + 1)
        ]
        return b.concat(*stacked, axis=0)


@register("rnn", Fusion.OPAQUE)
class Rnn(Recurrence):
    """h_t = f(xw_t + h_{t-1}·Rᵀ)."""

    def default_activations(self):
        return (TANH,)

    def phases(self):
        return [Phase(range(1), self.cell)]

    def cell(self, c: Cell) -> dict[int, Any]:
        return {0: c.act(0, c.clip(c.sum(0)))}


@register("gru", Fusion.OPAQUE)
class Gru(Recurrence):
    """Gates z, r, n in ONNX's order (Keras and PyTorch order theirs differently; their
    frontends reorder). linear_before_reset=1 is Keras's reset_after=True and PyTorch's
    form: n = g(xw_n + r ⊙ (h·R_nᵀ + rb_n)); with 0, n = g(xw_n + (r ⊙ h)·R_nᵀ + rb_n).
    xw holds x·Wᵀ + Wb (+ Rb for z and r); the n gate's recurrent bias rb_n is input 3."""

    arity = (4, 4)
    gates = 3
    state_planes = (2, None)
    linear_before_reset: bool = False

    def default_activations(self):
        return (SIGMOID, TANH)

    def state_shapes(self, batch):
        return [(batch, self.hidden), (self.hidden,)]

    def phases(self):
        if self.linear_before_reset:
            return [Phase(range(3), self.cell_after, start=self.start_after)]
        # the n gate's product reads r ⊙ h_{t-1} of every unit: a phase of its own, after z
        # and r (z waits in plane 0)
        return [
            Phase(range(2), self.cell_zr),
            Phase(range(2, 3), self.cell_n, over=_reset_h, start=self.start_n),
        ]

    @staticmethod
    def start_after(c: Cell, gate: int) -> Any:
        """The n gate's sum is h·R_nᵀ + rb_n alone: r multiplies it before xw_n is added."""
        return c.per_unit(3) if gate == 2 else c.xw(gate)

    def cell_after(self, c: Cell) -> dict[int, Any]:
        z = c.act(0, c.clip(c.sum(0)))
        n = c.act(1, c.clip(c.xw(2) + c.act(0, c.clip(c.sum(1))) * c.sum(2)))
        return {1: c.zero(), 0: (1.0 - z) * n + z * c.prev(0)}

    def cell_zr(self, c: Cell) -> dict[int, Any]:
        return {1: c.act(0, c.clip(c.sum(1))) * c.prev(0), 0: c.act(0, c.clip(c.sum(0)))}

    @staticmethod
    def start_n(c: Cell, gate: int) -> Any:
        return c.xw(2) + c.per_unit(3)

    def cell_n(self, c: Cell) -> dict[int, Any]:
        z = c.new(0)
        return {0: (1.0 - z) * c.act(1, c.clip(c.sum(2))) + z * c.prev(0)}


@register("lstm", Fusion.OPAQUE)
class Lstm(Recurrence):
    """Gates i, o, f, c in ONNX's order; optional peepholes p = (p_i, p_o, p_f)."""

    arity = (5, 5)
    gates = 4
    state_planes = (2, 3)

    def default_activations(self):
        return (SIGMOID, TANH, TANH)

    def state_shapes(self, batch):
        return [(batch, self.hidden), (batch, self.hidden), (3 * self.hidden,)]

    def phases(self):
        return [Phase(range(4), self.cell)]

    def cell(self, c: Cell) -> dict[int, Any]:
        cp = c.prev(1)
        i = c.act(0, c.clip(c.sum(0) + c.per_unit(4, 0) * cp))
        forget = c.act(0, c.clip(c.sum(2) + c.per_unit(4, 2) * cp))
        cell = c.let(forget * cp + i * c.act(1, c.clip(c.sum(3))))
        o = c.act(0, c.clip(c.sum(1) + c.per_unit(4, 1) * cell))
        return {1: cell, 0: o * c.act(2, cell)}


# --------------------------------------------------------------------------- backends


class _BatchCell(Cell):
    """A step over all batch rows at once (numpy, graph values): a phase's product is one
    matrix product, to which gates that start from xw are added in one addition."""

    xw_t: Any  # the step's xw, (batch, gates·hidden)
    ins: list[Any]
    prev_planes: list[Any]
    new_planes: Any  # indexed by plane

    def columns(self, x: Any, first: int, width: int) -> Any:
        """x's columns [first, first + width) (its last axis)."""
        raise NotImplementedError

    def product(self, v: Any, first: int, width: int) -> Any:
        """v · Rᵀ[:, first : first + width]."""
        raise NotImplementedError

    def run(self, phase: Phase) -> dict[int, Any]:
        first, width = self.op._columns(phase.gates)
        product = self.product(phase.over(self), first, width)
        if phase.start is None:
            product = self.columns(self.xw_t, first, width) + product
        h = self.op.hidden
        self.sums = {}
        for i, g in enumerate(phase.gates):
            part = self.columns(product, i * h, h)
            self.sums[g] = part if phase.start is None else phase.start(self, g) + part
        return phase.cell(self)

    def xw(self, gate):
        return self.columns(self.xw_t, gate * self.op.hidden, self.op.hidden)

    def per_unit(self, input, part=0):
        return self.columns(self.ins[input], part * self.op.hidden, self.op.hidden)

    def prev(self, plane):
        return self.prev_planes[plane]

    def new(self, plane):
        return self.new_planes[plane]


class _NumpyCell(_BatchCell):
    """The reference: numpy arrays; `new` is the slot the step writes."""

    def __init__(self, op: Recurrence, ins: list[np.ndarray], xw_t: np.ndarray, prev, new):
        super().__init__(op)
        self.ins, self.xw_t, self.prev_planes, self.new_planes = ins, xw_t, prev, new

    def columns(self, x, first, width):
        return x[..., first : first + width]

    def product(self, v, first, width):
        return v @ self.ins[1][:, first : first + width]

    def apply(self, fn, x):
        return np.asarray(fn.reference(x), x.dtype)

    def zero(self):
        return np.zeros_like(self.prev_planes[0])


@dataclasses.dataclass
class Step:
    """What one step of a recurrence kernel works on: a block of batch rows at time t,
    reading slot `read` and writing slot `write`; `sums` holds a tile's gate sums."""

    k: KernelBuilder
    ins: list[Buffer]
    out: Buffer
    block: list[Expr]
    t: Expr
    read: Expr
    write: Expr
    sums: Buffer | None  # the CPU kernel's tile of gate sums (the GPU's are locals)
    first_row: Expr | int = 0  # the block's first row among the rows of `sums`

    @property
    def rt(self) -> Buffer:
        return self.ins[1]

    def at(self, r: int, i: int, jj: Expr) -> Expr:
        """The flat index of block row r's sum for the phase's i-th gate, unit jj of the tile."""
        return ((self.first_row + r) * self.sums.shape[1] + i) * self.sums.shape[2] + jj


class _KernelCell(Cell):
    """One element of a step in the kernel: block row r, unit j."""

    def __init__(self, op: Recurrence, s: Step, r: int, j: Expr):
        super().__init__(op)
        self.s, self.r, self.j = s, r, j

    def apply(self, fn, x):
        return fn.scalar(e, x)

    def xw(self, gate):
        return self.s.ins[0][[self.s.t, self.s.block[self.r], gate * self.op.hidden + self.j]]

    def per_unit(self, input, part=0):
        return self.s.ins[input][part * self.op.hidden + self.j]

    def prev(self, plane):
        return self.s.out[[self.s.read, plane, self.s.block[self.r], self.j]]

    def new(self, plane):
        return self.s.out[[self.s.write, plane, self.s.block[self.r], self.j]]

    def let(self, x):
        return self.s.k.local(x.dtype, x, "v").ref

    def zero(self):
        return e.const(0.0, self.s.ins[0].dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class _Sym:
    """A graph value whose + - * build graph ops, so the cell reads the same here."""

    cell: _GraphCell
    value: Value

    def __add__(self, o):
        return self.cell.binary("add", self, o)

    def __radd__(self, o):
        return self.cell.binary("add", o, self)

    def __sub__(self, o):
        return self.cell.binary("sub", self, o)

    def __rsub__(self, o):
        return self.cell.binary("sub", o, self)

    def __mul__(self, o):
        return self.cell.binary("mul", self, o)

    def __rmul__(self, o):
        return self.cell.binary("mul", o, self)


class _GraphCell(_BatchCell):
    """Steps as graph ops on a builder. Constants, Rᵀ's column blocks and the per-unit
    inputs' parts are made once for all steps."""

    def __init__(self, op: Recurrence, b: GraphBuilder, inputs: list[Value]):
        super().__init__(op)
        self.b = b
        self.ins = [self.sym(v) for v in inputs]
        self.dtype = inputs[0].type.np_dtype
        self.batch = inputs[0].type.shape[1]
        self._made: dict[tuple, _Sym] = {}
        self.steps = self._halves(inputs[0])

    def _halves(self, xw: Value) -> list[Value]:
        """xw's steps, (batch, gates·hidden) each, taken by halving: a slice's gradient is
        its input's size, so a step's pads into its half, the half's into the whole, and the
        backward pass moves seq·log2(seq) of xw's elements rather than seq² (with one slice
        per step, a 64-step LSTM's train step took 1.5x as long)."""
        count = xw.type.shape[0]
        if count == 1:
            return [self.b.reshape(xw, shape=(self.batch, self.op.gates * self.op.hidden))]
        halves = [
            self.b.slice(xw, starts=(a,), ends=(e,), axes=(0,))
            for a, e in ((0, count // 2), (count // 2, count))
        ]
        return [step for half in halves for step in self._halves(half)]

    def _once(self, key: tuple, make: Callable[[], _Sym]) -> _Sym:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def sym(self, v: Value) -> _Sym:
        return _Sym(self, v)

    def _value(self, x: _Sym | float) -> Value:
        if isinstance(x, _Sym):
            return x.value
        return self._once(
            ("const", float(x)), lambda: self.sym(self.b.param("k", np.array(x, self.dtype)))
        ).value

    def binary(self, name: str, x: _Sym | float, y: _Sym | float) -> _Sym:
        return self.sym(self.b.op(name, self._value(x), self._value(y)))

    def begin(self, t: int, prev: list[_Sym]) -> None:
        """Step t, from the state `prev`."""
        self.xw_t = self.sym(self.steps[t])
        self.prev_planes, self.new_planes = prev, {}

    def columns(self, x, first, width):
        axis = x.value.type.rank - 1
        if first == 0 and width == x.value.type.shape[axis]:
            return x
        return self.sym(self.b.slice(x.value, starts=(first,), ends=(first + width,), axes=(axis,)))

    def product(self, v, first, width):
        rt = self._once(("rt", first, width), lambda: self.columns(self.ins[1], first, width))
        return self.sym(self.b.matmul(v.value, rt.value))

    def per_unit(self, input, part=0):
        return self._once(("part", input, part), lambda: _BatchCell.per_unit(self, input, part))

    def apply(self, fn, x):
        attrs = {f.name: getattr(fn, f.name) for f in dataclasses.fields(fn)}
        return self.sym(self.b.op(fn.name, x.value, **attrs))

    def zero(self):
        shape = (self.batch, self.op.hidden)
        return self._once(
            ("zero",), lambda: self.sym(self.b.param("zero_state", np.zeros(shape, self.dtype)))
        )
