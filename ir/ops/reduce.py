"""Reductions and the ops built around one: reduce_*, softmax, log_softmax, layer_norm."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from codegen import gpu
from codegen.kir import (
    WARP,
    Expr,
    KernelBuilder,
    LoopKind,
    ShuffleMode,
    const,
    logical_and,
    logical_or,
    maximum,
    minimum,
    select,
    unravel,
)
from codegen.kir import ExprBuilder as e
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import BatchMixing, Fusion, Gradient, Grads, Op, batch_of_first, normalize_axis, register
from ir.ops.grad import constant, expand_back
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder


def _float(op: str, x: TensorType) -> None:
    if x.dtype not in ("float32", "float64"):
        raise GraphError(f"{op}: input must be float, got {x.dtype}")


def _split(shape: tuple[int, ...], axis: int, end: int | None = None) -> tuple[int, int, int]:
    """(outer, n, inner): the elements before, along [axis, end), and after."""
    end = axis + 1 if end is None else end
    return prod(shape[:axis]), prod(shape[axis:end]), prod(shape[end:])


def _along(line: Expr, n: int, inner: int) -> Callable[[Expr], Expr]:
    """The flat index of element j of a line of n elements `inner` apart (lines numbered
    with the inner index fastest, as (outer, inner) pairs)."""
    base = line // inner * (n * inner) + line % inner
    return lambda j: base + j * inner


# --------------------------------------------------------------------------- lines
# The ops here walk lines: the reduced elements behind one output, a softmax's row.
# A line's passes are written once against a walk that says how its elements are
# visited and how a pass's partial result becomes the line's: CpuLine (a vector loop,
# the result whole already) or GpuLines (threads sharing the line, combined).

Combine = Callable[[Expr, Expr], Expr]


def _pow2(n: int) -> int:
    """The least power of two at or above n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


class CpuLine:
    """A line on the CPU: one vector loop over its n elements."""

    def __init__(self, n: int):
        self.n = n

    @contextmanager
    def elements(self, k: KernelBuilder) -> Iterator[Expr]:
        with k.loop(self.n, LoopKind.VECTOR, "j") as j:
            yield j

    def total(self, k: KernelBuilder, value: Expr, combine: Combine) -> Expr:
        """The line's result of a pass (one thread ran the pass: it has it)."""
        return value


class GpuLines:
    """`count` lines of `n` elements over a GPU grid (laid out by gpu_lines): `per_line`
    threads share a line, thread `lane` taking its elements lane, lane + per_line, ...,
    and a block holds `per_block` lines, `slot` being the thread's. `line` is the
    thread's line; past `count` (in the last block) a thread loads and stores nothing
    but joins the block's shuffles and barriers."""

    def __init__(self, count: int, n: int, contiguous: bool, per_line: int, block: Expr, threads: list[Expr]):
        self.count, self.n, self.contiguous, self.per_line = count, n, contiguous, per_line
        self.per_block = gpu.THREADS // per_line
        given = iter(threads)
        x, y = (next(given) if d > 1 else const(0, "int64") for d in _block_dims(contiguous, per_line))
        self.lane, self.slot = (x, y) if contiguous else (y, x)
        self.line = block * self.per_block + self.slot
        self.valid = self.line.lt(count) if count % self.per_block else None

    @contextmanager
    def elements(self, k: KernelBuilder) -> Iterator[Expr]:
        with k.loop(-(-self.n // self.per_line), LoopKind.SERIAL, "jj") as jj:
            j = jj * self.per_line + self.lane
            with _when(k, _all(j.lt(self.n) if self.n % self.per_line else None, self.valid)):
                yield j

    @contextmanager
    def once(self, k: KernelBuilder) -> Iterator[None]:
        """Statements for the line as a whole (storing its result): its first thread's."""
        with _when(k, _all(self.lane.eq(0) if self.per_line > 1 else None, self.valid)):
            yield

    def total(self, k: KernelBuilder, value: Expr, combine: Combine) -> Expr:
        """value combined over the line's threads; every one of them gets it. All the
        block's threads must call it together."""
        if self.per_line == 1:
            return value
        if self.contiguous:
            return gpu.block_total(k, value, combine, self.per_line, self.lane)
        return self._strided_total(k, value, combine)

    def _strided_total(self, k: KernelBuilder, value: Expr, combine: Combine) -> Expr:
        """A line's threads are `per_block` lanes apart: butterfly shuffles over the lane
        bits above the line's (those inside a warp), then one slot per warp (or per
        thread, for a warp of lines) through shared memory."""
        lines = self.per_block
        total = k.local(value.dtype, value, "part")
        offset = lines
        while offset < min(WARP, lines * self.per_line):
            k.assign(total, combine(total.ref, k.shuffle(total.ref, ShuffleMode.XOR, offset)))
            offset *= 2
        members = max(WARP // lines, 1)  # a line's threads in one warp
        slots = self.per_line // members
        if slots == 1:
            return total.ref
        partial = k.shared("line_totals", value.dtype, (slots * lines,))
        with _when(k, (self.lane % members).eq(0) if members > 1 else None):
            k.store(partial, self.lane // members * lines + self.slot, total.ref)
        k.barrier()
        k.assign(total, partial.load_flat(self.slot))
        for s in range(1, slots):
            k.assign(total, combine(total.ref, partial.load_flat(self.slot + s * lines)))
        k.barrier()  # every thread has read the totals before any reuses the buffer
        return total.ref


def _all(*conds: Expr | None) -> Expr | None:
    """The conjunction of the conditions given (None: no condition)."""
    given = [c for c in conds if c is not None]
    return functools.reduce(logical_and, given) if given else None


@contextmanager
def _when(k: KernelBuilder, cond: Expr | None) -> Iterator[None]:
    """Statements that run where cond holds (everywhere for None)."""
    if cond is None:
        yield
    else:
        with k.when(cond):
            yield


def _block_dims(contiguous: bool, per_line: int) -> tuple[int, int]:
    """(x, y) of a block of lines: a line's threads along x when contiguous, else along y."""
    per_block = gpu.THREADS // per_line
    return (per_line, per_block) if contiguous else (per_block, per_line)


@contextmanager
def gpu_lines(k: KernelBuilder, count: int, n: int, inner: int) -> Iterator[GpuLines]:
    """A GPU grid over `count` lines of n elements `inner` apart (lines numbered with
    the inner index fastest); the body written inside is one thread's.

    The layout keeps a warp's reads consecutive. Contiguous lines (inner 1) put a
    line's threads on consecutive lanes: 256 threads for lines of 256 elements and
    more, else a warp, or for lines shorter than a warp fewer lanes and more lines a
    block. Strided lines (`inner` consecutive lines adjacent in memory) put consecutive
    lines on consecutive lanes, up to a warp of them, and the block's other threads
    along the lines (no more than a line has elements)."""
    contiguous = inner == 1 and n > 1
    if contiguous:
        per_line = gpu.THREADS if n >= gpu.THREADS else min(_pow2(n), WARP)
    else:
        per_line = min(gpu.THREADS // min(_pow2(inner), WARP), _pow2(n))
    blocks = max(1, -(-count // (gpu.THREADS // per_line)))
    dims = _block_dims(contiguous, per_line)
    with gpu.grid(k, (blocks,), tuple(d for d in dims if d > 1)) as ((b,), threads):
        yield GpuLines(count, n, contiguous, per_line, b, threads)


def _runs(shape: tuple[int, ...], axes: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """shape's axes merged into runs of adjacent kept or reduced axes, size-1 axes
    dropped: (size, stride, reduced), outermost first."""
    runs: list[list] = []
    for i, d in enumerate(shape):
        if d == 1:
            continue
        if runs and runs[-1][1] == (i in axes):
            runs[-1][0] *= d
        else:
            runs.append([d, i in axes])
    sizes = [size for size, _ in runs]
    return [(size, prod(sizes[i + 1 :]), red) for i, (size, red) in enumerate(runs)]


def _offset(flat: Expr, runs: list[tuple[int, int, bool]]) -> Expr:
    """The offset of the flat index over these runs' sizes, at their strides."""
    offset: Expr = const(0, "int64")
    for i, (_, stride, _) in zip(unravel(flat, [size for size, _, _ in runs]), runs):
        offset = i * stride + offset
    return offset


@dataclasses.dataclass(frozen=True)
class Reduce(Op):
    axes: tuple[int, ...] | None = None  # None: all axes
    keepdims: bool = True
    accepts = ("float32", "float64", "int64", "int32")
    accepts_epilogue = True
    accepts_prologue = True

    def _axes(self, rank: int) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(range(rank))
        axes = tuple(sorted({normalize_axis(self.name, a, rank) for a in self.axes}))
        if len(axes) != len(self.axes):
            raise GraphError(f"{self.name}: repeated axis in {self.axes}")
        return axes

    def batch_axis(self, ins, out, batch):
        b, axes = batch[0], self._axes(ins[0].rank)
        if b is None:
            return None
        if b.axis in axes:
            raise BatchMixing(f"it reduces the batch axis {b.axis}")
        return dataclasses.replace(b, axis=b.axis - (0 if self.keepdims else sum(a < b.axis for a in axes)))

    def infer(self, x: TensorType) -> TensorType:
        if x.dtype not in self.accepts:
            raise GraphError(f"{self.name}: dtype {x.dtype} not accepted")
        axes = self._axes(x.rank)
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if self.keepdims or i not in axes)
        return x.with_shape(shape)

    def lower(self, k: KernelBuilder, ins, out, epilogue=None) -> None:
        """One accumulator per output element; the reduced axes are loops inside it."""
        x = ins[0]
        axes = self._axes(len(x.shape))
        kept = [i for i in range(len(x.shape)) if i not in axes]
        strides = [prod(x.shape[i + 1 :]) for i in range(len(x.shape))]
        kept_view = out.view(tuple(x.shape[i] for i in kept) or (1,))
        with k.nest(kept_view.shape) as idx:
            offset: Expr = const(0, "int64")
            for axis, v in zip(kept, idx):
                offset = v * strides[axis] + offset
            acc = k.local(x.dtype, self.init(x.dtype))
            with ExitStack() as loops:
                for a in axes:
                    kind = LoopKind.VECTOR if a == axes[-1] else LoopKind.SERIAL
                    offset = loops.enter_context(k.loop(x.shape[a], kind, "red")) * strides[a] + offset
                k.assign(acc, self.combine(acc.ref, x.load_flat(offset)), reduction=True)
            result = self.finish(acc.ref, prod(x.shape[a] for a in axes))
            if epilogue is not None:
                result = epilogue(result, kept_view.offset(idx), None)
            k.store(kept_view, idx, result)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """A line of threads per output element over the elements it reduces (GpuLines:
        with the innermost axis reduced, a warp or a block per output, or several
        outputs a warp when few elements each; with it kept, consecutive outputs on
        consecutive lanes and the reduced elements down the block, so that reads stay
        coalesced either way), combined by shuffles and shared memory."""
        x = ins[0]
        runs = _runs(x.shape, self._axes(len(x.shape)))
        kept = [r for r in runs if not r[2]]
        reduced = [r for r in runs if r[2]]
        n = prod(size for size, _, _ in reduced)
        inner = kept[-1][0] if runs and not runs[-1][2] else 1
        with gpu_lines(k, prod(size for size, _, _ in kept), n, inner) as lines:
            base = _offset(lines.line, kept)
            acc = k.local(x.dtype, self.init(x.dtype))
            with lines.elements(k) as j:
                k.assign(acc, self.combine(acc.ref, x.load_flat(base + _offset(j, reduced))), reduction=True)
            result = self.finish(lines.total(k, acc.ref, self.combine), n)
            with lines.once(k):
                k.store(out, lines.line, result if epilogue is None else epilogue(result, lines.line, None))

    def init(self, dtype: str) -> float:
        return 0.0

    def finish(self, acc: Expr, count: int) -> Expr:
        return acc


@register("reduce_sum", Fusion.REDUCTION)
class ReduceSum(Reduce):
    row_reduction = True

    def reference(self, x):
        return np.sum(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def combine(self, acc, v):
        return acc + v

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        return [expand_back(b, g, x, self.axes, self.keepdims)]


@register("reduce_mean", Fusion.REDUCTION)
class ReduceMean(Reduce):
    row_reduction = True
    accepts = ("float32", "float64")

    def reference(self, x):
        return np.mean(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def combine(self, acc, v):
        return acc + v

    def finish(self, acc, count):
        return acc / float(count)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        count = x.type.numel // max(node.outputs[0].type.numel, 1)
        scaled = b.mul(g, constant(b, 1.0 / count, g))
        return [expand_back(b, scaled, x, self.axes, self.keepdims)]


class ReduceExtremum(Reduce):
    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The gradient goes to the elements equal to the result, shared among ties."""
        x, axes, keep = node.inputs[0], self.axes, self.keepdims
        y = expand_back(b, node.outputs[0], x, axes, keep)
        hit = b.cast(b.equal(x, y), to=x.type.dtype)
        ties = expand_back(b, b.reduce_sum(hit, axes=axes, keepdims=keep), x, axes, keep)
        return [b.div(b.mul(expand_back(b, g, x, axes, keep), hit), ties)]


@register("reduce_max", Fusion.REDUCTION)
class ReduceMax(ReduceExtremum):
    row_reduction = True
    accepts = (*Reduce.accepts, "bool")  # bool: any

    def reference(self, x):
        return np.max(x, axis=self._axes(x.ndim), keepdims=self.keepdims, initial=self.init(x.dtype.name))

    def init(self, dtype):
        if dtype == "bool":
            return False
        return -np.inf if dtype.startswith("float") else int(np.iinfo(dtype).min)

    def combine(self, acc, v):
        return logical_or(acc, v) if v.dtype == "bool" else maximum(acc, v)


@register("reduce_min", Fusion.REDUCTION)
class ReduceMin(ReduceExtremum):
    accepts = (*Reduce.accepts, "bool")  # bool: all

    def reference(self, x):
        return np.min(x, axis=self._axes(x.ndim), keepdims=self.keepdims, initial=self.init(x.dtype.name))

    def init(self, dtype):
        if dtype == "bool":
            return True
        return np.inf if dtype.startswith("float") else int(np.iinfo(dtype).max)

    def combine(self, acc, v):
        return logical_and(acc, v) if v.dtype == "bool" else minimum(acc, v)


@register("reduce_prod", Fusion.REDUCTION)
class ReduceProd(Reduce):
    def reference(self, x):
        return np.prod(x, axis=self._axes(x.ndim), keepdims=self.keepdims, dtype=x.dtype)

    def init(self, dtype):
        return 1.0 if dtype.startswith("float") else 1

    def combine(self, acc, v):
        return acc * v

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """∂(∏x)/∂x_i = ∏x / x_i (for x_i ≠ 0)."""
        x = node.inputs[0]
        y = expand_back(b, node.outputs[0], x, self.axes, self.keepdims)
        return [b.div(b.mul(expand_back(b, g, x, self.axes, self.keepdims), y), x)]


@register("arg_reduce", Fusion.REDUCTION)
class ArgReduce(Op):
    """The index (int64) of the largest (`largest`) or smallest value along `axis`; ties
    go to the first index, or the last with select_last_index; NaN counts as largest."""

    differentiation = Gradient.ZERO
    axis: int = 0
    keepdims: bool = True
    largest: bool = True
    select_last_index: bool = False

    def infer(self, x: TensorType) -> TensorType:
        a = normalize_axis("arg_reduce", self.axis, x.rank)
        if x.shape[a] == 0:
            raise GraphError(f"arg_reduce: axis {self.axis} is empty in {x.shape}")
        shape = tuple(1 if i == a else d for i, d in enumerate(x.shape) if self.keepdims or i != a)
        return TensorType("int64", shape)

    def reference(self, x):
        a = normalize_axis("arg_reduce", self.axis, x.ndim)
        y = x if self.largest else -x if x.dtype.kind == "f" else -x.astype(np.int64)
        if self.select_last_index:
            idx = y.shape[a] - 1 - np.argmax(np.flip(y, axis=a), axis=a)
        else:
            idx = np.argmax(y, axis=a)
        return np.expand_dims(idx, a).astype(np.int64) if self.keepdims else idx.astype(np.int64)

    def _better(self, v: Expr, best: Expr) -> Expr:
        """Whether v, met after best along the axis, takes its place: larger (smaller), or
        equal with select_last_index; a NaN beats any number, and a later NaN an earlier
        one with select_last_index (NaNs tie)."""
        wins = v.ge(best) if self.select_last_index else v.gt(best)
        loses = v.le(best) if self.select_last_index else v.lt(best)
        better = wins if self.largest else loses
        if not v.dtype.startswith("float"):
            return better
        nan = v.ne(v) if self.select_last_index else logical_and(v.ne(v), best.eq(best))
        return logical_or(better, nan)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        a = normalize_axis("arg_reduce", self.axis, len(x.shape))
        outer, n, inner = _split(x.shape, a)
        with k.loop(outer * inner, LoopKind.PARALLEL, "r") as r:
            at = _along(r, n, inner)
            best = k.local(x.dtype, x.load_flat(at(0)), "best")
            where = k.local("int64", 0, "at")
            with k.loop(n, LoopKind.SERIAL, "j") as j:
                v = x.load_flat(at(j))
                wins = k.local("bool", self._better(v, best.ref), "wins")  # decided before best changes
                k.assign(best, select(wins.ref, v, best.ref))
                k.assign(where, select(wins.ref, j, where.ref))
            k.store(out.view((outer * inner,)), [r], where.ref)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """Threads sharing a line (GpuLines), each picking among its own elements; then
        the line's best value (max or min, a NaN winning either way) and, among the
        threads holding it, the first (or last) index: two combines, no pairs."""
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis("arg_reduce", self.axis, len(x.shape)))
        unset = -1 if self.select_last_index else n  # an index that loses to any other
        pick = maximum if self.largest else minimum
        with gpu_lines(k, outer * inner, n, inner) as lines:
            at = _along(lines.line, n, inner)
            best = k.local(x.dtype, self._worst(x.dtype), "best")
            where = k.local("int64", unset, "at")
            with lines.elements(k) as j:
                v = x.load_flat(at(j))
                wins = k.local("bool", logical_or(where.ref.eq(unset), self._better(v, best.ref)), "wins")
                k.assign(best, select(wins.ref, v, best.ref))
                k.assign(where, select(wins.ref, j, where.ref))
            top = lines.total(k, best.ref, pick)
            holds = best.ref.eq(top)
            if x.dtype.startswith("float"):
                holds = logical_or(holds, logical_and(best.ref.ne(best.ref), top.ne(top)))
            first = maximum if self.select_last_index else minimum
            index = lines.total(k, select(holds, where.ref, unset), first)
            with lines.once(k):
                k.store(out, lines.line, index)

    def _worst(self, dtype: str) -> float | int:
        """A value every element beats or ties (the start of a thread with no elements)."""
        if dtype.startswith("float"):
            return -np.inf if self.largest else np.inf
        info = np.iinfo(dtype)
        return int(info.min if self.largest else info.max)


@register("topk", Fusion.REDUCTION)
class TopK(Op):
    """The k largest (or smallest) values along `axis`, in order, or (output="indices")
    their int64 indices. Equal values keep their order (the lower index first), as ONNX
    TopK defines; NaN is not ordered."""

    k: int = 1
    axis: int = -1
    largest: bool = True
    output: str = "values"

    def infer(self, x: TensorType) -> TensorType:
        a = normalize_axis("topk", self.axis, x.rank)
        if not 0 <= self.k <= x.shape[a]:
            raise GraphError(f"topk: k={self.k} is outside [0, {x.shape[a]}] for axis {self.axis} of {x}")
        if self.output not in ("values", "indices"):
            raise GraphError(f"topk: output must be 'values' or 'indices', got {self.output!r}")
        shape = tuple(self.k if i == a else d for i, d in enumerate(x.shape))
        return TensorType(x.dtype if self.output == "values" else "int64", shape)

    def reference(self, x):
        a = normalize_axis("topk", self.axis, x.ndim)
        key = x if not self.largest else -x if x.dtype.kind == "f" else -x.astype(np.int64)
        order = np.take(np.argsort(key, axis=a, kind="stable"), np.arange(self.k), axis=a)
        return np.take_along_axis(x, order, axis=a) if self.output == "values" else order.astype(np.int64)

    def _place(self, k: KernelBuilder, x, out, n: int, at, out_at, j: Expr) -> None:
        """Element j's rank is the number of elements that come before it; the k ranked
        first are stored at their rank. O(n) per element, branch-free inner loop."""
        v = k.local(x.dtype, x.load_flat(at(j)), "v")
        rank = k.local("int64", 0, "rank")
        with k.loop(n, LoopKind.VECTOR, "m") as m:
            other = x.load_flat(at(m))
            ahead = other.gt(v.ref) if self.largest else other.lt(v.ref)
            before = logical_or(ahead, logical_and(other.eq(v.ref), m.lt(j)))
            k.assign(rank, rank.ref + select(before, const(1, "int64"), 0), reduction=True)
        with k.when(rank.ref.lt(self.k)):
            k.store(out, out_at(rank.ref), v.ref if self.output == "values" else j)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis("topk", self.axis, len(x.shape)))
        with k.loop(outer * inner, LoopKind.PARALLEL, "r") as r:
            at, out_at = _along(r, n, inner), _along(r, self.k, inner)
            with k.loop(n, LoopKind.SERIAL, "j") as j:
                self._place(k, x, out, n, at, out_at, j)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """Threads sharing a line (GpuLines), each placing its own elements: no thread
        waits on another, and a warp's reads of the line are broadcasts."""
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis("topk", self.axis, len(x.shape)))
        with gpu_lines(k, outer * inner, n, inner) as lines:
            at, out_at = _along(lines.line, n, inner), _along(lines.line, self.k, inner)
            with lines.elements(k) as j:
                self._place(k, x, out, n, at, out_at, j)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The values are x gathered at the indices: their gradient goes back to those places."""
        if self.output != "values":
            return [None]
        x = node.inputs[0]
        indices = b.topk(x, k=self.k, axis=self.axis, largest=self.largest, output="indices")
        return [b.gather_elements_backward(indices, g, shape=x.type.shape, axis=self.axis)]


@dataclasses.dataclass(frozen=True)
class AxisSoftmax(Op):
    axis: int = -1
    accepts_epilogue = True
    accepts_prologue = True

    def batch_axis(self, ins, out, batch):
        axis = normalize_axis(self.name, self.axis, out.rank)
        return batch_of_first(batch, lambda a: a != axis, "the softmax normalizes")

    def infer(self, x: TensorType) -> TensorType:
        _float(self.name, x)
        normalize_axis(self.name, self.axis, x.rank)
        return x

    def _lines(self, k: KernelBuilder, x, out, ats: list, line: CpuLine | GpuLines, epilogue) -> None:
        """Each line's max, then its sum of exp(x - max) (written to out on the way where
        the output is made of them), then its output: the lines side by side in each
        pass, since a line's max and sum each end in a chain through a horizontal
        reduction that one line at a time leaves the vector ports waiting on."""
        maxes = [k.local(x.dtype, -np.inf, "max") for _ in ats]
        with line.elements(k) as j:
            for m, at in zip(maxes, ats):
                k.assign(m, maximum(m.ref, x.load_flat(at(j))), reduction=True)
        row_maxes = [line.total(k, m.ref, maximum) for m in maxes]
        sums = [k.local(x.dtype, 0.0, "sum") for _ in ats]
        with line.elements(k) as j:
            for s, at, row_max in zip(sums, ats, row_maxes):
                ex = k.local(x.dtype, e.exp(x.load_flat(at(j)) - row_max), "exp")
                if self.stores_exp:
                    k.store(out, at(j), ex.ref)
                k.assign(s, s.ref + ex.ref, reduction=True)
        row_sums = [line.total(k, s.ref, operator.add) for s in sums]
        self.normalize(k, x, out, ats, line, row_maxes, row_sums, epilogue or (lambda v, _flat, _multi: v))

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis(self.name, self.axis, len(x.shape)))
        with k.loop(outer * inner, LoopKind.PARALLEL, "row") as r:
            self._lines(k, x, out, [_along(r, n, inner)], CpuLine(n), epilogue)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """Threads sharing a row (GpuLines: a warp or a block per row along the last axis;
        along another, consecutive rows on consecutive lanes), each pass's max and sum
        combined across them."""
        x = ins[0]
        outer, n, inner = _split(x.shape, normalize_axis(self.name, self.axis, len(x.shape)))
        with gpu_lines(k, outer * inner, n, inner) as lines:
            self._lines(k, x, out, [_along(lines.line, n, inner)], lines, epilogue)


@register("softmax", Fusion.REDUCTION)
class Softmax(AxisSoftmax):
    stores_exp = True

    def reference(self, x):
        ex = np.exp(x - x.max(axis=self.axis, keepdims=True))
        return ex / ex.sum(axis=self.axis, keepdims=True)

    def normalize(self, k, x, out, ats, line, maxes, sums, epilogue):
        invs = [1.0 / s for s in sums]
        with line.elements(k) as j:
            for at, inv in zip(ats, invs):
                k.store(out, at(j), epilogue(out.load_flat(at(j)) * inv, at(j), None))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        axis = normalize_axis("softmax", self.axis, y.type.rank)
        dot = b.reduce_sum(b.mul(g, y), axes=(axis,), keepdims=True)
        return [b.mul(y, b.sub(g, dot))]


@register("log_softmax", Fusion.REDUCTION)
class LogSoftmax(AxisSoftmax):
    stores_exp = False

    def reference(self, x):
        shifted = x - x.max(axis=self.axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=self.axis, keepdims=True))

    def normalize(self, k, x, out, ats, line, maxes, sums, epilogue):
        lses = [m + e.log(s) for m, s in zip(maxes, sums)]
        with line.elements(k) as j:
            for at, lse in zip(ats, lses):
                k.store(out, at(j), epilogue(x.load_flat(at(j)) - lse, at(j), None))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        y = node.outputs[0]
        axis = normalize_axis("log_softmax", self.axis, y.type.rank)
        total = b.reduce_sum(g, axes=(axis,), keepdims=True)
        return [b.sub(g, b.mul(b.exp(y), total))]


@register("layer_norm", Fusion.REDUCTION)
class LayerNorm(Op):
    """Normalize over axes [axis, rank): (x - mean) / sqrt(var + eps) * scale + bias."""

    arity = (2, 3)
    accepts_epilogue = True
    accepts_prologue = True
    axis: int = -1
    epsilon: float = 1e-5

    def batch_axis(self, ins, out, batch):
        axis = normalize_axis("layer_norm", self.axis, out.rank)
        return batch_of_first(batch, lambda a: a < axis, "the norm normalizes")

    def infer(self, x: TensorType, scale: TensorType, bias: TensorType | None = None):
        _float("layer_norm", x)
        axis = normalize_axis("layer_norm", self.axis, x.rank)
        for name, t in (("scale", scale), ("bias", bias)):
            if t is not None and (t.shape != x.shape[axis:] or t.dtype != x.dtype):
                raise GraphError(f"layer_norm: {name} is {t}, expected {x.dtype} of shape {x.shape[axis:]}")
        return x

    def reference(self, x, scale, bias=None):
        axes = tuple(range(normalize_axis("layer_norm", self.axis, x.ndim), x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mean) / np.sqrt(var + x.dtype.type(self.epsilon)) * scale
        return y + bias if bias is not None else y

    def _line(self, k: KernelBuilder, ins, out, r: Expr, n: int, line: CpuLine | GpuLines, epilogue) -> None:
        """Mean, then variance (a second pass over x - mean, as the reference), then the output."""
        x, scale = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        s = k.local(x.dtype, 0.0, "sum")
        with line.elements(k) as j:
            k.assign(s, s.ref + x.load_flat(r * n + j), reduction=True)
        mean = k.local(x.dtype, line.total(k, s.ref, operator.add) / float(n), "mean")
        v = k.local(x.dtype, 0.0, "var")
        with line.elements(k) as j:
            d = x.load_flat(r * n + j) - mean.ref
            k.assign(v, v.ref + d * d, reduction=True)
        var = line.total(k, v.ref, operator.add)
        rstd = k.local(x.dtype, 1.0 / e.sqrt(var / float(n) + self.epsilon), "rstd")
        with line.elements(k) as j:
            y = (x.load_flat(r * n + j) - mean.ref) * rstd.ref * scale.load_flat(j)
            y = y + bias.load_flat(j) if bias is not None else y
            k.store(out, r * n + j, epilogue(y, r * n + j, None) if epilogue is not None else y)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        outer, n, _ = _split(x.shape, normalize_axis("layer_norm", self.axis, len(x.shape)), len(x.shape))
        with k.loop(outer, LoopKind.PARALLEL, "row") as r:
            self._line(k, ins, out, r, n, CpuLine(n), epilogue)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """A warp or a block per row (GpuLines), each pass's sum combined across it."""
        x = ins[0]
        outer, n, _ = _split(x.shape, normalize_axis("layer_norm", self.axis, len(x.shape)), len(x.shape))
        with gpu_lines(k, outer, n, 1) as lines:
            self._line(k, ins, out, lines.line, n, lines, epilogue)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """With x̂ = (x - mean)·rstd over axes [axis, rank): dx = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)),
        ĝ = g·scale; dscale = Σ g·x̂ and dbias = Σ g over the leading axes."""
        x, scale = node.inputs[0], node.inputs[1]
        rank = x.type.rank
        axis = normalize_axis("layer_norm", self.axis, rank)
        axes, lead = tuple(range(axis, rank)), tuple(range(axis))
        mean = b.reduce_mean(x, axes=axes, keepdims=True)
        centered = b.sub(x, mean)
        var = b.reduce_mean(b.mul(centered, centered), axes=axes, keepdims=True)
        rstd = b.rsqrt(b.add(var, constant(b, self.epsilon, x)))
        xhat = b.mul(centered, rstd)
        gh = b.mul(g, scale)
        inner = b.sub(
            b.sub(gh, b.reduce_mean(gh, axes=axes, keepdims=True)),
            b.mul(xhat, b.reduce_mean(b.mul(gh, xhat), axes=axes, keepdims=True)),
        )
        grads: Grads = [
            b.mul(rstd, inner),
            b.reduce_sum(b.mul(g, xhat), axes=lead, keepdims=False) if lead else b.mul(g, xhat),
        ]
        if len(node.inputs) > 2:
            grads.append(b.reduce_sum(g, axes=lead, keepdims=False) if lead else g)
        return grads
