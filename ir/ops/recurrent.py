"""Recurrent layers: one direction of an RNN, GRU or LSTM over a whole sequence.

The input projection x·Wᵀ (+ biases) has no recurrence, so it is not here: frontends
compute it for every step at once with one matmul, and these ops take its result
`xw` (seq, batch, gates·hidden), and `rt` = Rᵀ (hidden, gates·hidden), the layout the
per-step product reads row by row. What remains is the recurrence, h_{t-1}·Rᵀ and the
gates, one kernel per layer and direction: blocks of batch rows run in parallel, steps
in order. Each step runs over tiles of UNIT_TILE hidden units: the tile's gate sums for
the block's rows are accumulated over h_{t-1} in a small scratch buffer (which LLVM
keeps in vector registers), then turned into the new state right away.

The output holds the state before and after every step, in seq + 1 slots (axis 0).
A forward pass starts in slot 0 and writes step t's state to slot t + 1; a reverse
pass starts in slot seq and writes step t's state to slot t. So the per-step outputs
are slots [1, seq] (forward) or [0, seq) (reverse), and the final state is slot seq
(forward) or 0 (reverse). Axis 1 is the plane: the hidden state h, and for an LSTM
also its cell state c; a GRU's second plane holds r ⊙ h_{t-1} of each step, the
scratch its linear_before_reset=0 form needs.

Gate activations are registered elementwise ops, named with their attributes
(("sigmoid", ()), ("hard_sigmoid", (("alpha", 0.2), ("beta", 0.5)))); `clip` bounds
the gates' inputs to [-clip, clip] as ONNX defines it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from codegen.kir import Buffer, Expr, KernelBuilder, Var, const, maximum, minimum, muladd
from codegen.kir import ExprBuilder as e
from ir.errors import GraphError
from ir.ops import REGISTRY, ElementwiseOp, Fusion, Gradient, Op, register
from ir.ops.nn import MATMUL_VECTOR
from ir.types import TensorType

if TYPE_CHECKING:
    pass

Activation = tuple[str, tuple[tuple[str, float], ...]]

SIGMOID: Activation = ("sigmoid", ())
TANH: Activation = ("tanh", ())

#: hidden units whose gate sums are accumulated together (per batch row: gates x 32)
UNIT_TILE = 32


def _activation(spec: Activation) -> ElementwiseOp:
    name, attrs = spec
    op = REGISTRY.get(name)
    if op is None or not issubclass(op, ElementwiseOp):
        raise GraphError(f"recurrent activation {name!r} is not an elementwise op")
    return op(**dict(attrs))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Recurrence(Op):
    """What RNN, GRU and LSTM share: the slots, the checks, the step loop. Inputs:
    xw, rt, the initial state(s) and what else the cell takes (state_shapes)."""

    arity = (3, 3)
    gates = 1
    planes = 1
    differentiation = Gradient.DECOMPOSE  # through the unrolled steps (see unroll)
    hidden: int = 0
    reverse: bool = False
    activations: tuple[Activation, ...] = ()
    clip: float | None = None

    def default_activations(self) -> tuple[Activation, ...]:
        raise NotImplementedError

    def decompose(self, b, inputs):
        return unroll(b, self, inputs)

    @property
    def functions(self) -> list[ElementwiseOp]:
        specs = self.activations or self.default_activations()
        if len(specs) != len(self.default_activations()):
            raise GraphError(f"{self.name}: expects {len(self.default_activations())} activations")
        return [_activation(s) for s in specs]

    def infer(self, xw: TensorType, rt: TensorType, *states: TensorType) -> TensorType:
        h = self.hidden
        if xw.rank != 3 or xw.shape[2] != self.gates * h:
            raise GraphError(f"{self.name}: xw must be (seq, batch, {self.gates}·{h}), got {xw.shape}")
        seq, batch, _ = xw.shape
        if xw.dtype not in ("float32", "float64"):
            raise GraphError(f"{self.name}: dtype {xw.dtype} is not float")
        expected = [(h, self.gates * h)] + self.state_shapes(batch)
        for pos, (t, shape) in enumerate(zip([rt, *states], expected), start=1):
            if t.shape != shape or t.dtype != xw.dtype:
                raise GraphError(f"{self.name}: input {pos} is {t}, expected {xw.dtype}{list(shape)}")
        self.functions  # noqa: B018 - validates the activations
        return TensorType(xw.dtype, (seq + 1, self.planes, batch, h))

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """The shapes of the inputs after r: the initial states (and the LSTM's peepholes)."""
        return [(batch, self.hidden)]

    def _clip(self, x: Expr) -> Expr:
        if self.clip is None:
            return x
        return minimum(maximum(x, -self.clip), self.clip)

    def _clip_np(self, x: np.ndarray) -> np.ndarray:
        return x if self.clip is None else np.clip(x, -self.clip, self.clip)

    def _order(self, seq: int) -> list[tuple[int, int, int]]:
        """(t, slot read, slot written) for each step in the order it runs."""
        if self.reverse:
            return [(t, t + 1, t) for t in reversed(range(seq))]
        return [(t, t, t + 1) for t in range(seq)]

    def reference(self, xw, rt, *states):
        seq, batch, _ = xw.shape
        out = np.zeros((seq + 1, self.planes, batch, self.hidden), xw.dtype)
        first = seq if self.reverse else 0
        out[first] = self.initial_np(states, batch, xw.dtype)
        fns = [lambda x, op=op: np.asarray(op.reference(x), x.dtype) for op in self.functions]
        for t, read, write in self._order(seq):
            out[write] = self.step_np(xw[t], rt, out[read], states, fns)
        return out

    def initial_np(self, states, batch, dtype) -> np.ndarray:
        init = np.zeros((self.planes, batch, self.hidden), dtype)
        init[0] = states[0]
        return init

    def step_np(self, xw_t, rt, prev, states, fns) -> np.ndarray:
        raise NotImplementedError

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        xw, rt, *states = ins
        seq, batch, _ = xw.shape
        h = self.hidden
        rows = 2 if batch % 2 == 0 else 1  # batch rows per block: each row of rt serves them all
        fns = [lambda x, op=op: op.scalar(e, x) for op in self.functions]
        sums = k.scratch("gate_sums", xw.dtype, (rows, self.gates, UNIT_TILE))
        first = seq if self.reverse else 0
        with k.loop(batch // rows, "parallel", "b") as blk:
            block = [blk * rows + i for i in range(rows)]
            with k.loop(h, "vector", "j") as j:
                for b in block:
                    for plane, value in enumerate(self.initial(states, b, j, xw.dtype)):
                        k.store(out, (first, plane, b, j), value)
            with k.loop(seq, "serial", "n") as n:
                t = (seq - 1 - n) if self.reverse else n
                read, write = (t + 1, t) if self.reverse else (t, t + 1)
                self.step(k, Step(xw, rt, states, out, block, t, read, write, fns, sums))

    def initial(self, states: list[Buffer], b: Var, j: Var, dtype: str) -> list[Expr]:
        """The values of slot `first`, plane by plane."""
        return [states[0][b, j]] + [e.const(0.0, dtype)] * (self.planes - 1)

    def unit_tiles(self, k: KernelBuilder, tile: Callable[[Expr, int, str], None]) -> None:
        """tile(first unit, units, loop kind) over the hidden units: whole tiles, then the
        rest as whole vectors, then the last few units (masked)."""
        tiles, tail = divmod(self.hidden, UNIT_TILE)
        if tiles:
            with k.loop(tiles, "serial", "units") as u:
                tile(u * UNIT_TILE, UNIT_TILE, "vector")
        whole = tail - tail % MATMUL_VECTOR
        for first, units in ((tiles * UNIT_TILE, whole), (tiles * UNIT_TILE + whole, tail - whole)):
            if units:
                tile(
                    const(first, "int64"), units, "vector" if units % MATMUL_VECTOR == 0 else "vector_masked"
                )

    def gate_sums(
        self,
        k: KernelBuilder,
        s: Step,
        first: Expr,
        units: int,
        kind: str,
        columns: list[int],
        start: Callable[[int, int, Expr], Expr],
        vector: Callable[[int, Var], Expr],
    ) -> None:
        """For the tile's units j and each row r of the block and gate g:
        s.sums[r, g, j - first] = start(r, g, j) + Σ_k vector(r, k) · rt[k, columns[g] + j]."""
        width = s.rt.shape[1]
        with k.loop(units, kind, "u") as jj:
            for r in range(len(s.block)):
                for g in range(len(columns)):
                    k.store(s.sums, s.at(r, g, jj), start(r, g, first + jj))
        with k.loop(self.hidden, "serial", "k") as kk:
            hs = [vector(r, kk) for r in range(len(s.block))]
            with k.loop(units, kind, "u") as jj:
                for g, column in enumerate(columns):
                    w = s.rt.load_flat(kk * width + column + first + jj)
                    for r, h_r in enumerate(hs):
                        k.store(s.sums, s.at(r, g, jj), muladd(h_r, w, s.sums.load_flat(s.at(r, g, jj))))

    def step(self, k: KernelBuilder, s: Step) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class Step:
    """What one step of a recurrence kernel works on: a block of batch rows at time t,
    reading slot `read` and writing slot `write`; `sums` holds a tile's gate sums."""

    xw: Buffer
    rt: Buffer
    states: list[Buffer]
    out: Buffer
    block: list[Expr]
    t: Expr
    read: Expr
    write: Expr
    fns: list[Callable[[Expr], Expr]]
    sums: Buffer

    def at(self, r: int, g: int, jj: Expr) -> Expr:
        return (r * self.sums.shape[1] + g) * UNIT_TILE + jj

    def gate(self, r: int, g: int, jj: Expr) -> Expr:
        return self.sums.load_flat(self.at(r, g, jj))

    def h_prev(self, r: int, j: Expr) -> Expr:
        return self.out[[self.read, 0, self.block[r], j]]

    def xw_at(self, r: int, column: Expr) -> Expr:
        return self.xw[[self.t, self.block[r], column]]


@register("rnn", Fusion.OPAQUE)
class Rnn(Recurrence):
    """h_t = f(xw_t + h_{t-1}·Rᵀ)."""

    def default_activations(self):
        return (TANH,)

    def step_np(self, xw_t, rt, prev, states, fns):
        return fns[0](self._clip_np(xw_t + prev[0] @ rt))[None]

    def step(self, k, s):
        (f,) = s.fns

        def tile(first, units, kind):
            self.gate_sums(k, s, first, units, kind, [0], lambda r, g, j: s.xw_at(r, j), s.h_prev)
            with k.loop(units, kind, "u") as jj:
                for r, b in enumerate(s.block):
                    k.store(s.out, (s.write, 0, b, first + jj), f(self._clip(s.gate(r, 0, jj))))

        self.unit_tiles(k, tile)


@register("gru", Fusion.OPAQUE)
class Gru(Recurrence):
    """Gates z, r, n in ONNX's order (Keras and PyTorch order theirs differently; their
    frontends reorder). linear_before_reset=1 is Keras's reset_after=True and PyTorch's
    form: n = g(xw_n + r ⊙ (h·R_nᵀ + rb_n)); with 0, n = g(xw_n + (r ⊙ h)·R_nᵀ + rb_n).
    xw holds x·Wᵀ + Wb (+ Rb for z and r); the n gate's recurrent bias rb_n is input 3."""

    arity = (4, 4)
    gates = 3
    planes = 2
    linear_before_reset: bool = False

    def default_activations(self):
        return (SIGMOID, TANH)

    def state_shapes(self, batch):
        return [(batch, self.hidden), (self.hidden,)]

    def step_np(self, xw_t, rt, prev, states, fns):
        h = self.hidden
        f, g = fns
        hp = prev[0]
        rec = hp @ rt
        z = f(self._clip_np(xw_t[:, :h] + rec[:, :h]))
        reset = f(self._clip_np(xw_t[:, h : 2 * h] + rec[:, h : 2 * h]))
        rb = states[1]
        if self.linear_before_reset:
            n = g(self._clip_np(xw_t[:, 2 * h :] + reset * (rec[:, 2 * h :] + rb)))
            scratch = np.zeros_like(hp)
        else:
            scratch = reset * hp
            n = g(self._clip_np(xw_t[:, 2 * h :] + scratch @ rt[:, 2 * h :] + rb))
        return np.stack([(1 - z) * n + z * hp, scratch])

    def step(self, k, s):
        h = self.hidden
        f, g = s.fns
        rb = s.states[1]
        if self.linear_before_reset:

            def tile(first, units, kind):
                def start(r, gate, j):
                    return rb[j] if gate == 2 else s.xw_at(r, gate * h + j)

                self.gate_sums(k, s, first, units, kind, [0, h, 2 * h], start, s.h_prev)
                with k.loop(units, kind, "u") as jj:
                    j = first + jj
                    for r, b in enumerate(s.block):
                        z = f(self._clip(s.gate(r, 0, jj)))
                        n = g(
                            self._clip(
                                s.xw_at(r, 2 * h + j) + f(self._clip(s.gate(r, 1, jj))) * s.gate(r, 2, jj)
                            )
                        )
                        k.store(s.out, (s.write, 1, b, j), e.const(0.0, s.xw.dtype))
                        k.store(s.out, (s.write, 0, b, j), (1.0 - z) * n + z * s.h_prev(r, j))

            self.unit_tiles(k, tile)
            return

        # r ⊙ h_{t-1} for every unit first (into plane 1), z parked in plane 0: the n gate's
        # product needs all of r ⊙ h
        def gates_zr(first, units, kind):
            self.gate_sums(
                k, s, first, units, kind, [0, h], lambda r, gate, j: s.xw_at(r, gate * h + j), s.h_prev
            )
            with k.loop(units, kind, "u") as jj:
                j = first + jj
                for r, b in enumerate(s.block):
                    k.store(s.out, (s.write, 1, b, j), f(self._clip(s.gate(r, 1, jj))) * s.h_prev(r, j))
                    k.store(s.out, (s.write, 0, b, j), f(self._clip(s.gate(r, 0, jj))))

        def gate_n(first, units, kind):
            def reset_h(r, kk):
                return s.out[[s.write, 1, s.block[r], kk]]

            self.gate_sums(
                k, s, first, units, kind, [2 * h], lambda r, gate, j: s.xw_at(r, 2 * h + j) + rb[j], reset_h
            )
            with k.loop(units, kind, "u") as jj:
                j = first + jj
                for r, b in enumerate(s.block):
                    n = g(self._clip(s.gate(r, 0, jj)))
                    z = s.out[[s.write, 0, b, j]]
                    k.store(s.out, (s.write, 0, b, j), (1.0 - z) * n + z * s.h_prev(r, j))

        self.unit_tiles(k, gates_zr)
        self.unit_tiles(k, gate_n)


@register("lstm", Fusion.OPAQUE)
class Lstm(Recurrence):
    """Gates i, o, f, c in ONNX's order; optional peepholes p = (p_i, p_o, p_f)."""

    arity = (5, 5)
    gates = 4
    planes = 2

    def default_activations(self):
        return (SIGMOID, TANH, TANH)

    def state_shapes(self, batch):
        return [(batch, self.hidden), (batch, self.hidden), (3 * self.hidden,)]

    def initial_np(self, states, batch, dtype):
        return np.stack([states[0], states[1]]).astype(dtype)

    def step_np(self, xw_t, rt, prev, states, fns):
        h = self.hidden
        f, g, act_h = fns
        hp, cp = prev
        p = states[2]
        pre = xw_t + hp @ rt
        i = f(self._clip_np(pre[:, :h] + p[:h] * cp))
        forget = f(self._clip_np(pre[:, 2 * h : 3 * h] + p[2 * h :] * cp))
        c = forget * cp + i * g(self._clip_np(pre[:, 3 * h :]))
        o = f(self._clip_np(pre[:, h : 2 * h] + p[h : 2 * h] * c))
        return np.stack([o * act_h(c), c])

    def initial(self, states, b, j, dtype):
        return [states[0][b, j], states[1][b, j]]

    def step(self, k, s):
        h = self.hidden
        f, g, act_h = s.fns
        p = s.states[2]

        def tile(first, units, kind):
            columns = [0, h, 2 * h, 3 * h]
            self.gate_sums(
                k, s, first, units, kind, columns, lambda r, gate, j: s.xw_at(r, gate * h + j), s.h_prev
            )
            with k.loop(units, kind, "u") as jj:
                j = first + jj
                for r, b in enumerate(s.block):
                    cp = s.out[[s.read, 1, b, j]]
                    i = f(self._clip(s.gate(r, 0, jj) + p[j] * cp))
                    forget = f(self._clip(s.gate(r, 2, jj) + p[2 * h + j] * cp))
                    c = k.local(s.xw.dtype, forget * cp + i * g(self._clip(s.gate(r, 3, jj))), "c")
                    o = f(self._clip(s.gate(r, 1, jj) + p[h + j] * c.ref))
                    k.store(s.out, (s.write, 1, b, j), c.ref)
                    k.store(s.out, (s.write, 0, b, j), o * act_h(c.ref))

        self.unit_tiles(k, tile)


def unroll(b, op: Recurrence, inputs) -> object:
    """The op's output computed with ordinary graph ops on the builder `b`, step by step
    as its reference does: what autodiff differentiates (ir/autodiff.py)."""
    xw, r_t, *states = inputs
    seq, batch, _ = xw.type.shape
    h = op.hidden
    specs = op.activations or op.default_activations()

    def act(n: int, x, clipped: bool = True):
        name, attrs = specs[n]
        x = x if op.clip is None or not clipped else b.clip(x, min=-op.clip, max=op.clip)
        return b.op(name, x, **dict(attrs))

    def peephole(k: int, c):
        return b.mul(b.slice(states[2], starts=(k * h,), ends=((k + 1) * h,), axes=(0,)), c)

    def cols(x, first: int, width: int = h):
        return b.slice(x, starts=(first,), ends=(first + width,), axes=(1,))

    zero = b.param("zero_state", np.zeros((batch, h), xw.type.np_dtype))
    one = b.param("one", np.ones((), xw.type.np_dtype)) if isinstance(op, Gru) else None
    planes = [states[0], states[1] if isinstance(op, Lstm) else zero][: op.planes]
    slots = {seq if op.reverse else 0: planes}
    for t, read, write in op._order(seq):
        xw_t = b.reshape(b.slice(xw, starts=(t,), ends=(t + 1,), axes=(0,)), shape=(batch, op.gates * h))
        hp = slots[read][0]
        if isinstance(op, Rnn):
            slots[write] = [act(0, b.add(xw_t, b.matmul(hp, r_t)))]
        elif isinstance(op, Gru):
            rec = b.matmul(hp, b.slice(r_t, starts=(0,), ends=(2 * h,), axes=(1,)))
            z = act(0, b.add(cols(xw_t, 0), cols(rec, 0)))
            reset = act(0, b.add(cols(xw_t, h), cols(rec, h)))
            r_n = b.slice(r_t, starts=(2 * h,), ends=(3 * h,), axes=(1,))
            if op.linear_before_reset:
                scratch = zero
                n = act(1, b.add(cols(xw_t, 2 * h), b.mul(reset, b.add(b.matmul(hp, r_n), states[1]))))
            else:
                scratch = b.mul(reset, hp)
                n = act(1, b.add(b.add(cols(xw_t, 2 * h), b.matmul(scratch, r_n)), states[1]))
            slots[write] = [
                b.add(b.mul(b.sub(one, z), n), b.mul(z, hp)),
                scratch,
            ]
        else:
            cp = slots[read][1]
            pre = b.add(xw_t, b.matmul(hp, r_t))
            i = act(0, b.add(cols(pre, 0), peephole(0, cp)))
            forget = act(0, b.add(cols(pre, 2 * h), peephole(2, cp)))
            c = b.add(b.mul(forget, cp), b.mul(i, act(1, cols(pre, 3 * h))))
            o = act(0, b.add(cols(pre, h), peephole(1, c)))
            slots[write] = [b.mul(o, act(2, c, clipped=False)), c]
    stacked = [
        b.concat(*(b.reshape(p, shape=(1, 1, batch, h)) for p in slots[s]), axis=1) if op.planes > 1
        else b.reshape(slots[s][0], shape=(1, 1, batch, h))
        for s in range(seq + 1)
    ]  # fmt: skip
    return b.concat(*stacked, axis=0)
