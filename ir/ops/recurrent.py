"""Recurrent layers: one direction of an RNN, GRU or LSTM over a whole sequence.

The input projection x·Wᵀ (+ biases) has no recurrence, so it is not here: frontends
compute it for every step at once with one matmul, and these ops take its result
`xw` (seq, batch, gates·hidden). What remains is the recurrence, h_{t-1}·Rᵀ and the
gates, one kernel per layer and direction: batch rows run in parallel, steps in order.

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

import numpy as np

from codegen.kir import Buffer, Expr, KernelBuilder, Var, maximum, minimum
from codegen.kir import ExprBuilder as e
from ir.errors import GraphError
from ir.ops import REGISTRY, ElementwiseOp, Fusion, Op, register
from ir.types import TensorType

Activation = tuple[str, tuple[tuple[str, float], ...]]

SIGMOID: Activation = ("sigmoid", ())
TANH: Activation = ("tanh", ())


def _activation(spec: Activation) -> ElementwiseOp:
    name, attrs = spec
    op = REGISTRY.get(name)
    if op is None or not issubclass(op, ElementwiseOp):
        raise GraphError(f"recurrent activation {name!r} is not an elementwise op")
    return op(**dict(attrs))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Recurrence(Op):
    """What RNN, GRU and LSTM share: the slots, the checks, the step loop. Inputs:
    xw, r, the initial state(s) and what else the cell takes (state_shapes)."""

    arity = (3, 3)
    gates = 1
    planes = 1
    hidden: int = 0
    reverse: bool = False
    activations: tuple[Activation, ...] = ()
    clip: float | None = None

    def default_activations(self) -> tuple[Activation, ...]:
        raise NotImplementedError

    @property
    def functions(self) -> list[ElementwiseOp]:
        specs = self.activations or self.default_activations()
        if len(specs) != len(self.default_activations()):
            raise GraphError(f"{self.name}: expects {len(self.default_activations())} activations")
        return [_activation(s) for s in specs]

    def infer(self, xw: TensorType, r: TensorType, *states: TensorType) -> TensorType:
        h = self.hidden
        if xw.rank != 3 or xw.shape[2] != self.gates * h:
            raise GraphError(f"{self.name}: xw must be (seq, batch, {self.gates}·{h}), got {xw.shape}")
        seq, batch, _ = xw.shape
        if xw.dtype not in ("float32", "float64"):
            raise GraphError(f"{self.name}: dtype {xw.dtype} is not float")
        expected = [(self.gates * h, h)] + self.state_shapes(batch)
        for pos, (t, shape) in enumerate(zip([r, *states], expected), start=1):
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

    def reference(self, xw, r, *states):
        seq, batch, _ = xw.shape
        out = np.zeros((seq + 1, self.planes, batch, self.hidden), xw.dtype)
        first = seq if self.reverse else 0
        out[first] = self.initial_np(states, batch, xw.dtype)
        fns = [lambda x, op=op: np.asarray(op.reference(x), x.dtype) for op in self.functions]
        for t, read, write in self._order(seq):
            out[write] = self.step_np(xw[t], r, out[read], states, fns)
        return out

    def initial_np(self, states, batch, dtype) -> np.ndarray:
        init = np.zeros((self.planes, batch, self.hidden), dtype)
        init[0] = states[0]
        return init

    def step_np(self, xw_t, r, prev, states, fns) -> np.ndarray:
        raise NotImplementedError

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        xw, r, *states = ins
        seq, batch, _ = xw.shape
        h = self.hidden
        fns = [lambda x, op=op: op.scalar(e, x) for op in self.functions]
        first = seq if self.reverse else 0
        with k.loop(batch, "parallel", "b") as b:
            with k.loop(h, "vector", "j") as j:
                for plane, value in enumerate(self.initial(states, b, j, xw.dtype)):
                    k.store(out, (first, plane, b, j), value)
            with k.loop(seq, "serial", "n") as n:
                t = (seq - 1 - n) if self.reverse else n
                read, write = (t + 1, t) if self.reverse else (t, t + 1)
                self.step(k, xw, r, states, out, b, t, read, write, fns)

    def initial(self, states: list[Buffer], b: Var, j: Var, dtype: str) -> list[Expr]:
        """The values of slot `first`, plane by plane."""
        return [states[0][b, j]] + [e.const(0.0, dtype)] * (self.planes - 1)

    def dots(
        self, k: KernelBuilder, r: Buffer, rows: list[int], vector: Callable[[Var], Expr], start: list[Expr]
    ) -> list[Expr]:
        """start[g] + Σ_k vector(k)·R[rows[g], k] for each g: one pass over the hidden
        vector for several rows of R at once (the gates of one unit)."""
        accs = [k.local(r.dtype, s, "dot") for s in start]
        with k.loop(self.hidden, "vector", "k") as kk:
            v = vector(kk)
            for acc, row in zip(accs, rows):
                k.assign(acc, acc.ref + v * r.load_flat(row * self.hidden + kk), reduction=True)
        return [acc.ref for acc in accs]

    def step(self, k, xw, r, states, out, b, t, read, write, fns) -> None:
        raise NotImplementedError


@register("rnn", Fusion.OPAQUE)
class Rnn(Recurrence):
    """h_t = f(xw_t + h_{t-1}·Rᵀ)."""

    def default_activations(self):
        return (TANH,)

    def step_np(self, xw_t, r, prev, states, fns):
        return fns[0](self._clip_np(xw_t + prev[0] @ r.T))[None]

    def step(self, k, xw, r, states, out, b, t, read, write, fns):
        with k.loop(self.hidden, "serial", "j") as j:
            (pre,) = self.dots(k, r, [j], lambda kk: out[read, 0, b, kk], [xw[t, b, j]])
            k.store(out, (write, 0, b, j), fns[0](self._clip(pre)))


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

    def step_np(self, xw_t, r, prev, states, fns):
        h = self.hidden
        f, g = fns
        hp = prev[0]
        rec = hp @ r.T
        z = f(self._clip_np(xw_t[:, :h] + rec[:, :h]))
        reset = f(self._clip_np(xw_t[:, h : 2 * h] + rec[:, h : 2 * h]))
        rb = states[1]
        if self.linear_before_reset:
            n = g(self._clip_np(xw_t[:, 2 * h :] + reset * (rec[:, 2 * h :] + rb)))
            scratch = np.zeros_like(hp)
        else:
            scratch = reset * hp
            n = g(self._clip_np(xw_t[:, 2 * h :] + scratch @ r[2 * h :].T + rb))
        return np.stack([(1 - z) * n + z * hp, scratch])

    def step(self, k, xw, r, states, out, b, t, read, write, fns):
        h = self.hidden
        f, g = fns
        rb = states[1]
        hp = lambda kk: out[read, 0, b, kk]  # noqa: E731
        if not self.linear_before_reset:
            # r ⊙ h_{t-1} first, for every unit: the n gate's dot product needs all of it
            with k.loop(h, "serial", "j") as j:
                (pre_r,) = self.dots(k, r, [h + j], hp, [xw[t, b, h + j]])
                k.store(out, (write, 1, b, j), f(self._clip(pre_r)) * hp(j))
        with k.loop(h, "serial", "j") as j:
            if self.linear_before_reset:
                pre_z, pre_r, rec_n = self.dots(
                    k, r, [j, h + j, 2 * h + j], hp, [xw[t, b, j], xw[t, b, h + j], rb[j]]
                )
                n = g(self._clip(xw[t, b, 2 * h + j] + f(self._clip(pre_r)) * rec_n))
                k.store(out, (write, 1, b, j), e.const(0.0, xw.dtype))
            else:
                (pre_z,) = self.dots(k, r, [j], hp, [xw[t, b, j]])
                (rec_n,) = self.dots(k, r, [2 * h + j], lambda kk: out[write, 1, b, kk], [rb[j]])
                n = g(self._clip(xw[t, b, 2 * h + j] + rec_n))
            z = k.local(xw.dtype, f(self._clip(pre_z)), "z")
            k.store(out, (write, 0, b, j), (1.0 - z.ref) * n + z.ref * hp(j))


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

    def step_np(self, xw_t, r, prev, states, fns):
        h = self.hidden
        f, g, act_h = fns
        hp, cp = prev
        p = states[2]
        pre = xw_t + hp @ r.T
        i = f(self._clip_np(pre[:, :h] + p[:h] * cp))
        forget = f(self._clip_np(pre[:, 2 * h : 3 * h] + p[2 * h :] * cp))
        c = forget * cp + i * g(self._clip_np(pre[:, 3 * h :]))
        o = f(self._clip_np(pre[:, h : 2 * h] + p[h : 2 * h] * c))
        return np.stack([o * act_h(c), c])

    def initial(self, states, b, j, dtype):
        return [states[0][b, j], states[1][b, j]]

    def step(self, k, xw, r, states, out, b, t, read, write, fns):
        h = self.hidden
        f, g, act_h = fns
        p = states[2]
        with k.loop(h, "serial", "j") as j:
            pre_i, pre_o, pre_f, pre_c = self.dots(
                k,
                r,
                [j, h + j, 2 * h + j, 3 * h + j],
                lambda kk: out[read, 0, b, kk],
                [xw[t, b, g_ * h + j] for g_ in range(4)],
            )
            cp = out[read, 1, b, j]
            i = f(self._clip(pre_i + p[j] * cp))
            forget = f(self._clip(pre_f + p[2 * h + j] * cp))
            c = k.local(xw.dtype, forget * cp + i * g(self._clip(pre_c)), "c")
            o = f(self._clip(pre_o + p[h + j] * c.ref))
            k.store(out, (write, 1, b, j), c.ref)
            k.store(out, (write, 0, b, j), o * act_h(c.ref))


def unroll(b, op: Recurrence, inputs) -> object:
    """The op's output computed with ordinary graph ops on the builder `b`, step by step
    as its reference does: what autodiff differentiates (ir/autodiff.py)."""
    xw, r, *states = inputs
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

    r_t = b.transpose(r, perm=(1, 0))
    zero = b.param("zero_state", np.zeros((batch, h), xw.type.np_dtype))
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
                b.add(b.mul(b.sub(b.param("one", np.ones((), xw.type.np_dtype)), z), n), b.mul(z, hp)),
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
