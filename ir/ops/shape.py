"""Ops that move elements without arithmetic: reshape, transpose, concat, slice, pad, gather."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from codegen import gpu
from codegen.kir import (
    WARP,
    Buffer,
    Expr,
    KernelBuilder,
    LoopKind,
    cast,
    const,
    guarded_load,
    in_range,
    logical_and,
    maximum,
    minimum,
    select,
    unravel,
)
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Batch, BatchAxis, BatchMixing, Fusion, Gradient, Grads, Op, normalize_axis, register
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder

INJ = Fusion.INJECTIVE


def regroup_batch(src: TensorType, dst: TensorType, b: Batch) -> Batch:
    """The batch of a reshape. In row-major order, batch element i owns runs of L
    consecutive elements, one run in every count·L; a reshape keeps the runs, so the
    output's batch is on any axis whose inner elements divide L and that holds whole
    cycles of count runs (all such axes describe the same runs)."""
    if b is None:
        return None
    count = src.shape[b.axis] // (b.block * b.repeats)
    run = b.block * prod(src.shape[b.axis + 1 :])
    for axis, d in enumerate(dst.shape):
        inner = prod(dst.shape[axis + 1 :])
        if inner and run % inner == 0 and d % (run // inner * count) == 0:
            block = run // inner
            return BatchAxis(axis, block, d // (block * count))
    raise BatchMixing(f"reshaping {src.shape} to {dst.shape} splits the batch axis {b.axis} across axes")


def copy_flat(k: KernelBuilder, src: Buffer, dst: Buffer) -> None:
    with k.flat(dst.numel) as i:
        k.store(dst, i, src.load_flat(i))


@contextmanager
def grid_stride(k: KernelBuilder, shape: tuple[int, ...]) -> Iterator[tuple[Expr, list[Expr]]]:
    """A GPU grid over the elements of `shape`, one thread each by a grid-stride loop
    (consecutive threads on consecutive elements: their stores coalesce); yields the
    flat index and the multi-index of the thread's element."""
    n = prod(shape)
    blocks = gpu.blocks_for(n)
    with gpu.grid(k, (blocks,), (gpu.THREADS,)) as ((b,), (t,)):
        with gpu.stride_over(k, n, b, t, blocks) as i:
            yield i, unravel(i, shape)


class PerElement(Op):
    """An op whose output elements each come from their own multi-index (`element`): on
    the CPU a nest over the output (rows in parallel, the last axis a vector loop), on
    a GPU one element per thread (grid_stride), which writes coalesced and reads as
    coalesced as the op's indexing allows."""

    def element(self, k: KernelBuilder, ins: list[Buffer], idx: list[Expr]) -> Expr:
        """The output element at idx (statements it needs, such as a check, go to k)."""
        raise NotImplementedError

    def lower(self, k, ins, out, epilogue=None):
        with k.nest(out.shape) as idx:
            k.store(out, idx, self.element(k, ins, idx))

    def lower_gpu(self, k, ins, out, epilogue=None):
        with grid_stride(k, out.shape) as (i, idx):
            k.store(out, i, self.element(k, ins, idx))


class View(Op):
    """An op whose output is its input's bytes under another shape: no kernel, the
    memory plan gives the output its input's storage (a copy where the output is a
    graph output)."""

    view = True

    def batch_axis(self, ins, out, batch):
        return regroup_batch(ins[0], out, batch[0])

    def lower(self, k, ins, out, epilogue=None):
        copy_flat(k, ins[0], out)

    def lower_gpu(self, k, ins, out, epilogue=None):
        with grid_stride(k, (out.numel,)) as (i, _):
            k.store(out, i, ins[0].load_flat(i))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.reshape(g, shape=node.inputs[0].type.shape)]


@register("reshape", INJ)
class Reshape(View):
    shape: tuple[int, ...] = ()  # one entry may be -1: inferred

    def infer(self, x: TensorType) -> TensorType:
        shape = list(self.shape)
        if shape.count(-1) > 1 or any(d < -1 for d in shape):
            raise GraphError(f"reshape: bad target shape {self.shape}")
        if -1 in shape:
            known = prod(d for d in shape if d != -1)
            if known == 0 or x.numel % known:
                raise GraphError(f"reshape: cannot infer -1 reshaping {x.shape} to {self.shape}")
            shape[shape.index(-1)] = x.numel // known
        if prod(shape) != x.numel:
            raise GraphError(f"reshape: {x.shape} has {x.numel} elements, {tuple(shape)} has {prod(shape)}")
        return x.with_shape(tuple(shape))

    def reference(self, x):
        return x.reshape(self.shape)


@register("flatten", INJ)
class Flatten(View):
    axis: int = 1

    def infer(self, x: TensorType) -> TensorType:
        a = self.axis + x.rank if self.axis < 0 else self.axis
        if not 0 <= a <= x.rank:
            raise GraphError(f"flatten: axis {self.axis} out of range for rank {x.rank}")
        return x.with_shape((prod(x.shape[:a]), prod(x.shape[a:])))

    def reference(self, x):
        return x.reshape(self.infer(TensorType.of(x)).shape)


#: the tile of a transpose through shared memory (TILE x TILE elements, a block of
#: TILE x TILE_ROWS threads, each moving TILE / TILE_ROWS of them each way)
TILE = 32
TILE_ROWS = 8


@register("transpose", INJ)
class Transpose(PerElement):
    perm: tuple[int, ...] | None = None  # None: reverse the axes

    def batch_axis(self, ins, out, batch):
        b = batch[0]
        return b and BatchAxis(self.axes(ins[0].rank).index(b.axis), b.block, b.repeats)

    def axes(self, rank: int) -> tuple[int, ...]:
        """The permutation applied to an input of this rank (perm, or the axes reversed)."""
        perm = tuple(reversed(range(rank))) if self.perm is None else tuple(self.perm)
        if sorted(perm) != list(range(rank)):
            raise GraphError(f"transpose: perm {perm} is not a permutation of {rank} axes")
        return perm

    def infer(self, x: TensorType) -> TensorType:
        return x.with_shape(tuple(x.shape[p] for p in self.axes(x.rank)))

    def reference(self, x):
        return np.asarray(np.transpose(x, self.axes(x.ndim)), order="C")

    def element(self, k, ins, idx):
        perm = self.axes(len(idx))
        src = [0] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = idx[out_axis]
        return ins[0][src]

    def lower_gpu(self, k, ins, out, epilogue=None):
        """Where the transpose moves the input's last axis and both last axes are long,
        tiles through shared memory (_tiled: reads and writes both coalesced); else each
        output element from its input element, where the reads coalesce too (the last
        axis stays) or little would (a short axis)."""
        x = ins[0]
        perm = self.axes(len(x.shape))
        last = len(perm) - 1
        if perm and perm[-1] != last and min(x.shape[perm[-1]], x.shape[last]) >= TILE // 2:
            self._tiled(k, x, out, perm)
        else:
            super().lower_gpu(k, ins, out)

    def _tiled(self, k: KernelBuilder, x: Buffer, out: Buffer, perm: tuple[int, ...]) -> None:
        """A block per TILE x TILE tile of (r, c): r the input axis that becomes the
        output's last, c the input's last, at one point of the other axes. The block
        reads the tile row by row along c (a warp on consecutive input elements) into
        shared memory, then writes it column by column along r (a warp on consecutive
        output elements); a tile row holds TILE + 1 elements, so a warp reading a tile
        column touches 32 banks."""
        r, c = perm[-1], len(perm) - 1
        rest = [a for a in range(len(perm)) if a not in (r, c)]
        in_stride = [prod(x.shape[a + 1 :]) for a in range(len(perm))]
        out_stride = [0] * len(perm)
        for q, a in enumerate(perm):
            out_stride[a] = prod(out.shape[q + 1 :])
        tiles_r, tiles_c = -(-x.shape[r] // TILE), -(-x.shape[c] // TILE)
        blocks = tiles_r * tiles_c * prod(x.shape[a] for a in rest)
        tile = k.shared("tile", x.dtype, (TILE, TILE + 1))
        with gpu.grid(k, (blocks,), (TILE, TILE_ROWS)) as ((b,), (tx, ty)):
            at = unravel(b // (tiles_r * tiles_c), [x.shape[a] for a in rest])
            in_base = sum((i * in_stride[a] for i, a in zip(at, rest)), const(0, "int64"))
            out_base = sum((i * out_stride[a] for i, a in zip(at, rest)), const(0, "int64"))
            r0, c0 = b // tiles_c % tiles_r * TILE, b % tiles_c * TILE
            with k.loop(TILE // TILE_ROWS, LoopKind.SERIAL, "row") as row:
                i, j = r0 + ty + row * TILE_ROWS, c0 + tx
                with k.when(logical_and(i.lt(x.shape[r]), j.lt(x.shape[c]))):
                    k.store(tile, [ty + row * TILE_ROWS, tx], x.load_flat(in_base + i * in_stride[r] + j))
            k.barrier()
            with k.loop(TILE // TILE_ROWS, LoopKind.SERIAL, "row") as row:
                i, j = r0 + tx, c0 + ty + row * TILE_ROWS
                with k.when(logical_and(i.lt(x.shape[r]), j.lt(x.shape[c]))):
                    k.store(out, out_base + j * out_stride[c] + i, tile[[tx, ty + row * TILE_ROWS]])

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        perm = self.axes(g.type.rank)
        return [b.transpose(g, perm=tuple(int(i) for i in np.argsort(perm)))]


@register("concat", INJ)
class Concat(Op):
    arity = (1, 1 << 20)
    axis: int = 0

    def batch_axis(self, ins, out, batch):
        axis = normalize_axis("concat", self.axis, out.rank)
        if len(set(batch)) != 1 or (batch[0] and batch[0].axis == axis):
            raise BatchMixing(f"concat along axis {axis} of inputs holding the batch at {batch}")
        return batch[0]

    def infer(self, *xs: TensorType) -> TensorType:
        first = xs[0]
        axis = normalize_axis("concat", self.axis, first.rank)
        for pos, t in enumerate(xs):
            rest = t.shape[:axis] + t.shape[axis + 1 :]
            if (
                t.rank != first.rank
                or t.dtype != first.dtype
                or rest != first.shape[:axis] + first.shape[axis + 1 :]
            ):
                raise GraphError(
                    f"concat: input {pos} is {t}, incompatible with input 0 {first} along axis {axis}"
                )
        total = sum(t.shape[axis] for t in xs)
        return first.with_shape(first.shape[:axis] + (total,) + first.shape[axis + 1 :])

    def reference(self, *xs):
        return np.concatenate(xs, axis=self.axis)

    def lower(self, k, ins, out, epilogue=None):
        axis = normalize_axis("concat", self.axis, len(out.shape))
        start = 0
        for x in ins:
            with k.nest(x.shape) as idx:
                dst = list(idx)
                dst[axis] = idx[axis] + start
                k.store(out, dst, x[idx])
            start += x.shape[axis]

    def lower_gpu(self, k, ins, out, epilogue=None):
        """One grid; its threads stride over each input in turn, reading it in order."""
        axis = normalize_axis("concat", self.axis, len(out.shape))
        blocks = gpu.blocks_for(max(x.numel for x in ins))
        with gpu.grid(k, (blocks,), (gpu.THREADS,)) as ((b,), (t,)):
            start = 0
            for x in ins:
                with gpu.stride_over(k, x.numel, b, t, blocks) as i:
                    idx = unravel(i, x.shape)
                    dst = list(idx)
                    dst[axis] = idx[axis] + start
                    k.store(out, dst, x.load_flat(i))
                start += x.shape[axis]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        axis = normalize_axis("concat", self.axis, g.type.rank)
        grads: Grads = []
        offset = 0
        for v in node.inputs:
            size = v.type.shape[axis]
            grads.append(b.slice(g, starts=(offset,), ends=(offset + size,), axes=(axis,)))
            offset += size
        return grads


@register("slice", INJ)
class Slice(PerElement):
    """ONNX Slice semantics: out-of-range starts/ends clamp; negative ones count from the end."""

    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    axes: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None

    def batch_axis(self, ins, out, batch):
        b = batch[0]
        if b and self.ranges(ins[0].shape)[b.axis] != (0, 1, ins[0].shape[b.axis]):
            raise BatchMixing(f"slice cuts the batch axis {b.axis}")
        return b

    def ranges(self, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(start, step, count) for every axis."""
        rank = len(shape)
        axes = range(len(self.starts)) if self.axes is None else self.axes
        steps = self.steps or (1,) * len(self.starts)
        if not len(self.starts) == len(self.ends) == len(axes) == len(steps):
            raise GraphError("slice: starts, ends, axes and steps must have the same length")
        out = [(0, 1, d) for d in shape]
        for a, s, e, st in zip(axes, self.starts, self.ends, steps):
            a = normalize_axis("slice", a, rank)
            if st == 0:
                raise GraphError("slice: step 0")
            d = shape[a]
            s = s + d if s < 0 else s
            e = e + d if e < 0 else e
            if st > 0:
                s, e = min(max(s, 0), d), min(max(e, 0), d)
                count = max(0, -(-(e - s) // st))
            else:
                s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
                count = max(0, -(-(s - e) // -st))
            out[a] = (s, st, count)
        return out

    def infer(self, x: TensorType) -> TensorType:
        return x.with_shape(tuple(c for _, _, c in self.ranges(x.shape)))

    def reference(self, x):
        picks = [s + st * np.arange(c) for s, st, c in self.ranges(x.shape)]
        return np.ascontiguousarray(x[np.ix_(*picks)]) if picks else x.copy()

    def element(self, k, ins, idx):
        x = ins[0]
        return x[[i * st + s for i, (s, st, _) in zip(idx, self.ranges(x.shape))]]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The gradient of a slice is g placed back where it was read, zeros elsewhere."""
        x = node.inputs[0]
        ranges = self.ranges(x.type.shape)
        if any(step != 1 for _, step, _ in ranges):
            raise GraphError(f"node {node.name}: the slice gradient supports step 1 only")
        begins = tuple(start for start, _, _ in ranges)
        ends = tuple(d - start - count for d, (start, _, count) in zip(x.type.shape, ranges))
        return [b.pad(g, pads=begins + ends)]


def _all_in_range(idx: list[Expr], shape: tuple[int, ...]) -> Expr:
    """Whether every index lies in its axis: 0 <= idx[a] < shape[a]."""
    inside: Expr = const(True, "bool")
    for i, d in zip(idx, shape):
        inside = logical_and(inside, in_range(i, 0, d))
    return inside


@register("pad", INJ)
class Pad(PerElement):
    """Padding; pads = begins of every axis, then ends (ONNX order). Negative crops.
    `mode`: constant (`value`), edge (repeat the border), reflect (mirror, border not
    repeated) or wrap (periodic), as in ONNX and numpy."""

    pads: tuple[int, ...] = ()
    value: float = 0.0
    mode: str = "constant"

    MODES = ("constant", "edge", "reflect", "wrap")

    def infer(self, x: TensorType) -> TensorType:
        if len(self.pads) != 2 * x.rank:
            raise GraphError(f"pad: {len(self.pads)} pads for rank {x.rank}; expected {2 * x.rank}")
        if self.mode not in self.MODES:
            raise GraphError(f"pad: mode {self.mode!r} is not one of {', '.join(self.MODES)}")
        shape = tuple(d + b + e for d, b, e in zip(x.shape, self.pads[: x.rank], self.pads[x.rank :]))
        if any(d < 0 for d in shape):
            raise GraphError(f"pad: pads {self.pads} crop {x.shape} below zero")
        if self.mode != "constant" and any(d == 0 for d in x.shape) and shape != x.shape:
            raise GraphError(f"pad: mode {self.mode} cannot pad an empty axis of {x.shape}")
        return x.with_shape(shape)

    def reference(self, x):
        r = x.ndim
        crop = tuple(
            slice(max(-b, 0), d - max(-e, 0)) for d, b, e in zip(x.shape, self.pads[:r], self.pads[r:])
        )
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(self.pads[:r], self.pads[r:])]
        if self.mode == "constant":
            return np.pad(x[crop], widths, constant_values=self.value)
        return np.pad(x[crop], widths, mode=self.mode)

    def _fill(self, dtype: str) -> float | int:
        """The constant mode's value, as the input's dtype takes it."""
        return self.value if dtype.startswith("float") else int(self.value)

    def _source(self, i: Expr, d: int) -> Expr:
        """The input index an output index reads along an axis of length d (not constant mode)."""
        if self.mode == "edge":
            return minimum(maximum(i, 0), d - 1)
        if self.mode == "wrap":
            return i % d
        period = max(2 * (d - 1), 1)  # reflect: ... 2 1 | 0 1 2 ... d-1 | d-2 ...
        m = i % period
        return select(m.lt(d), m, period - m)

    def lower(self, k, ins, out, epilogue=None):
        """Constant padding of a buffer, row by row: a row's columns before the input's,
        its copy of the input row (contiguous vector loads, from row 0 where the output
        row lies in the padding: the value is selected there) and the columns after it.
        Each element checking its own index read the input by a gather: ResNet-18's
        input padding took 0.11 ms on one thread and 0.2 on two."""
        x = ins[0]
        r = len(x.shape)
        if self.mode != "constant" or r < 2 or not isinstance(x, Buffer) or x.numel == 0:
            super().lower(k, ins, out, epilogue)  # an empty input has no row 0 to read
            return
        begins, ends = self.pads[:r], self.pads[r:]
        value = const(self._fill(x.dtype), x.dtype)
        *outer, width = out.shape
        before, skip = max(begins[-1], 0), max(-begins[-1], 0)  # padded / cropped columns
        kept = max(x.shape[-1] - skip - max(-ends[-1], 0), 0)  # input columns copied
        with k.loop(prod(outer), LoopKind.PARALLEL, "r") as row:
            idx = unravel(row, outer)
            src = [i - b for i, b in zip(idx, begins[:-1])]  # the input row's index
            inside = _all_in_range(src, x.shape[:-1])
            start = select(inside, x.offset([*src, skip]), 0)  # in bounds either way
            for first, count in ((0, before), (before + kept, width - before - kept)):
                if count > 0:
                    with k.loop(count, LoopKind.VECTOR, "j") as j:
                        k.store(out, [*idx, first + j], value)
            if kept:
                with k.loop(kept, LoopKind.VECTOR, "j") as j:
                    k.store(out, [*idx, before + j], select(inside, x.load_flat(start + j), value))

    def element(self, k, ins, idx):
        x = ins[0]
        r = len(x.shape)
        begins, ends = self.pads[:r], self.pads[r:]
        if self.mode == "constant":
            src = [i - b for i, b in zip(idx, begins)]
            return guarded_load(x, src, _all_in_range(src, x.shape), self._fill(x.dtype))
        src = []  # index into the input as cropped by negative pads, then mapped back
        for i, d, b, e in zip(idx, x.shape, begins, ends):
            lo, kept = max(-b, 0), d - max(-b, 0) - max(-e, 0)
            src.append(self._source(i - max(b, 0), kept) + lo)
        return x[src]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        if self.mode != "constant" or any(p < 0 for p in self.pads):
            raise GraphError(f"node {node.name}: the pad gradient supports constant mode without cropping")
        r = x.type.rank
        return [
            b.slice(
                g,
                starts=self.pads[:r],
                ends=tuple(p + d for p, d in zip(self.pads[:r], x.type.shape)),
                axes=tuple(range(r)),
            )
        ]


@register("gather", INJ)
class Gather(PerElement):
    """data[..., indices, ...] along `axis`; negative indices count from the end.

    An index out of range fails the run with an error naming the node (the read is
    clamped meanwhile, so it never leaves the buffer); the reference raises too."""

    arity = (2, 2)
    axis: int = 0

    def batch_axis(self, ins, out, batch):
        data, indices = batch
        axis = normalize_axis("gather", self.axis, ins[0].rank)
        if data and indices or (data and data.axis == axis):
            raise BatchMixing("gather picks along the batch axis")
        if indices:
            return BatchAxis(axis + indices.axis, indices.block, indices.repeats)
        at = data.axis if data.axis < axis else data.axis + ins[1].rank - 1  # type: ignore[union-attr]
        return data and BatchAxis(at, data.block, data.repeats)

    def infer(self, data: TensorType, indices: TensorType) -> TensorType:
        if indices.dtype not in ("int64", "int32"):
            raise GraphError(f"gather: indices must be int64 or int32, got {indices.dtype}")
        a = normalize_axis("gather", self.axis, data.rank)
        return data.with_shape(data.shape[:a] + indices.shape + data.shape[a + 1 :])

    def reference(self, data, indices):
        return np.take(data, indices, axis=self.axis)

    def element(self, k, ins, idx):
        data, indices = ins
        a = normalize_axis("gather", self.axis, len(data.shape))
        d, r = data.shape[a], len(indices.shape)
        raw = cast(indices[idx[a : a + r]] if r else indices.load_flat(const(0, "int64")), "int64")
        wrapped = select(raw.lt(0), raw + d, raw)
        k.check(in_range(wrapped, 0, d), f"gather: an index is outside [-{d}, {d})")
        safe = select(wrapped.lt(0), 0, select(wrapped.ge(d), d - 1, wrapped))  # never read outside
        return data[list(idx[:a]) + [safe] + list(idx[a + r :])]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        data, indices = node.inputs
        if self.axis != 0:
            raise GraphError(f"node {node.name}: the gather gradient supports axis 0 only")
        return [b.gather_backward(indices, g, shape=data.type.shape), None]


@register("gather_backward", Fusion.OPAQUE)
class GatherBackward(PerElement):
    """The gradient of gather(data, indices) along axis 0 for data: row r sums the
    output gradient's rows whose index is r (negative indices count from the end).
    Written as a gather over the indices, so elements run in parallel without races."""

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    arity = (2, 2)
    shape: tuple[int, ...] = ()  # the data's shape

    def infer(self, indices: TensorType, g: TensorType) -> TensorType:
        if indices.dtype not in ("int64", "int32") or g.shape != indices.shape + tuple(self.shape[1:]):
            raise GraphError(
                f"gather_backward: indices {indices} and gradient {g} do not fit data {self.shape}"
            )
        return TensorType(g.dtype, tuple(self.shape))

    def reference(self, indices, g):
        rows = self.shape[0]
        out = np.zeros(self.shape, np.float64)
        np.add.at(out, np.where(indices < 0, indices + rows, indices).ravel(), g.reshape(-1, *self.shape[1:]))
        return out.astype(g.dtype)

    def lower(self, k, ins, out, epilogue=None):
        """As rows of the data's other axes flattened: rows in parallel even when data is 1-D."""
        rows = out.view((self.shape[0], prod(self.shape[1:])))
        with k.nest(rows.shape) as (r, j):
            k.store(rows, [r, j], self._sum(k, ins, r, j))

    def element(self, k, ins, idx):
        return self._sum(k, ins, idx[0], Buffer("_", "int64", tuple(self.shape[1:])).offset(idx[1:]))

    def _sum(self, k: KernelBuilder, ins: list[Buffer], r: Expr, j: Expr) -> Expr:
        """Element j of data row r: the sum of g's rows whose index names r."""
        indices, g = ins
        rows, inner = self.shape[0], prod(self.shape[1:])
        acc = k.local(g.dtype, 0.0, "acc")
        with k.loop(indices.numel, LoopKind.SERIAL, "p") as p:
            raw = cast(indices.load_flat(p), "int64")
            hit = select(raw.lt(0), raw + rows, raw).eq(r)
            k.assign(acc, acc.ref + select(hit, g.load_flat(p * inner + j), const(0.0, g.dtype)))
        return acc.ref


@register("gather_elements_backward", Fusion.OPAQUE)
class GatherElementsBackward(PerElement):
    """The gradient of gather_elements(data, indices, axis) for data: each element sums
    the output gradient's entries whose index names it (along `axis`, the other
    coordinates equal). Written as a gather over the axis, so elements run in parallel
    without races."""

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    arity = (2, 2)
    shape: tuple[int, ...] = ()  # the data's shape
    axis: int = 0

    def infer(self, indices: TensorType, g: TensorType) -> TensorType:
        a = normalize_axis("gather_elements_backward", self.axis, len(self.shape))
        fits = indices.rank == g.rank == len(self.shape) and indices.shape == g.shape
        if indices.dtype not in ("int64", "int32") or not fits:
            raise GraphError(
                f"gather_elements_backward: indices {indices} and gradient {g} do not fit data {self.shape}"
            )
        if any(i > d for n, (i, d) in enumerate(zip(indices.shape, self.shape)) if n != a):
            raise GraphError(f"gather_elements_backward: indices {indices.shape} exceed data {self.shape}")
        return TensorType(g.dtype, tuple(self.shape))

    def reference(self, indices, g):
        a = normalize_axis("gather_elements_backward", self.axis, len(self.shape))
        out = np.zeros(self.shape, np.float64)
        where = np.where(indices < 0, indices + self.shape[a], indices)
        coords = list(np.indices(indices.shape))
        coords[a] = where
        np.add.at(out, tuple(coords), g)
        return out.astype(g.dtype)

    def element(self, k, ins, idx):
        indices, g = ins
        a = normalize_axis("gather_elements_backward", self.axis, len(self.shape))
        d, count = self.shape[a], indices.shape[a]
        inside = None  # where the indices reach (they may be shorter than data off the axis)
        for n, (i, size) in enumerate(zip(idx, indices.shape)):
            if n != a and size < self.shape[n]:
                inside = i.lt(size) if inside is None else logical_and(inside, i.lt(size))
        acc = k.local(g.dtype, 0.0, "acc")
        with k.loop(count, LoopKind.SERIAL, "p") as p:
            at = [p if n == a else i for n, i in enumerate(idx)]
            raw = cast(indices[at] if inside is None else guarded_load(indices, at, inside, 0), "int64")
            hit = select(raw.lt(0), raw + d, raw).eq(idx[a])
            hit = hit if inside is None else logical_and(inside, hit)
            k.assign(acc, acc.ref + guarded_load(g, at, hit, 0.0))
        return acc.ref


@register("tile", INJ)
class Tile(PerElement):
    """x repeated `repeats[i]` times along each axis i."""

    repeats: tuple[int, ...] = ()

    def infer(self, x: TensorType) -> TensorType:
        if len(self.repeats) != x.rank or any(r < 0 for r in self.repeats):
            raise GraphError(f"tile: repeats {self.repeats} do not fit rank {x.rank}")
        return x.with_shape(tuple(d * r for d, r in zip(x.shape, self.repeats)))

    def reference(self, x):
        return np.tile(x, self.repeats)

    def element(self, k, ins, idx):
        x = ins[0]
        return x[[i % d if r != 1 else i for i, d, r in zip(idx, x.shape, self.repeats)]]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """Each copy's gradient, summed: g seen as (repeats, size) per axis, the repeats summed."""
        x, repeats = node.inputs[0], self.repeats
        split = tuple(v for r, d in zip(repeats, x.type.shape) for v in (r, d))
        summed = b.reduce_sum(
            b.reshape(g, shape=split), axes=tuple(range(0, 2 * x.type.rank, 2)), keepdims=False
        )
        return [b.reshape(summed, shape=x.type.shape)]


@register("trilu", INJ)
class Trilu(PerElement):
    """The upper (or lower) triangle of the last two axes, from diagonal k; zeros elsewhere."""

    upper: bool = True
    k: int = 0

    def infer(self, x: TensorType) -> TensorType:
        if x.rank < 2:
            raise GraphError(f"trilu: input must have rank >= 2, got {x.shape}")
        return x

    def reference(self, x):
        return np.triu(x, self.k) if self.upper else np.tril(x, self.k)

    def element(self, k, ins, idx):
        x = ins[0]
        i, j = idx[-2], idx[-1]
        keep = (j - i).ge(self.k) if self.upper else (j - i).le(self.k)
        return select(keep, x[idx], const(0.0 if x.dtype.startswith("float") else 0, x.dtype))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.trilu(g, upper=self.upper, k=self.k)]


@register("gather_elements", INJ)
class GatherElements(PerElement):
    """out[i, j, ...] = data[i, ..., indices[i, j, ...], ...] with the index on `axis`
    (ONNX GatherElements, numpy take_along_axis); negative indices count from the end."""

    arity = (2, 2)
    axis: int = 0

    def infer(self, data: TensorType, indices: TensorType) -> TensorType:
        if indices.dtype not in ("int64", "int32") or indices.rank != data.rank:
            raise GraphError(
                f"gather_elements: indices must be int64/int32 of rank {data.rank}, got {indices}"
            )
        a = normalize_axis("gather_elements", self.axis, data.rank)
        if any(i > d for n, (i, d) in enumerate(zip(indices.shape, data.shape)) if n != a):
            raise GraphError(f"gather_elements: indices {indices.shape} exceed data {data.shape}")
        return data.with_shape(indices.shape)

    def reference(self, data, indices):
        """Off the axis, indices may be shorter than data: they read its leading part."""
        a = normalize_axis("gather_elements", self.axis, data.ndim)
        idx = np.where(indices < 0, indices + data.shape[a], indices)
        window = tuple(slice(None) if n == a else slice(0, size) for n, size in enumerate(indices.shape))
        return np.take_along_axis(data[window], idx, axis=a)

    def element(self, k, ins, idx):
        data, indices = ins
        a = normalize_axis("gather_elements", self.axis, len(data.shape))
        d = data.shape[a]
        raw = cast(indices[idx], "int64")
        wrapped = select(raw.lt(0), raw + d, raw)
        k.check(in_range(wrapped, 0, d), f"gather_elements: an index is outside [-{d}, {d})")
        safe = select(wrapped.lt(0), 0, select(wrapped.ge(d), d - 1, wrapped))
        return data[list(idx[:a]) + [safe] + list(idx[a + 1 :])]

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        data, indices = node.inputs
        return [b.gather_elements_backward(indices, g, shape=data.type.shape, axis=self.axis), None]


@register("cumsum", Fusion.REDUCTION)
class CumSum(Op):
    """Running sums along `axis`; exclusive leaves each element out of its own sum,
    reverse runs from the end."""

    axis: int = 0
    exclusive: bool = False
    reverse: bool = False

    def infer(self, x: TensorType) -> TensorType:
        if x.dtype == "bool":
            raise GraphError("cumsum: bool input")
        normalize_axis("cumsum", self.axis, x.rank)
        return x

    def reference(self, x):
        a = normalize_axis("cumsum", self.axis, x.ndim)
        y = np.flip(x, a) if self.reverse else x
        c = np.cumsum(y, axis=a, dtype=x.dtype)
        if self.exclusive:
            c = c - y
        return np.flip(c, a) if self.reverse else c

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        a = normalize_axis("cumsum", self.axis, len(x.shape))
        outer, n, inner = prod(x.shape[:a]), x.shape[a], prod(x.shape[a + 1 :])
        zero = const(0.0 if x.dtype.startswith("float") else 0, x.dtype)
        with k.loop(outer * inner, LoopKind.PARALLEL, "line") as r:
            base = r // inner * (n * inner) + r % inner
            acc = k.local(x.dtype, zero, "sum")
            with k.loop(n, LoopKind.SERIAL, "j") as j:
                at = base + ((n - 1) - j if self.reverse else j) * inner
                v = x.load_flat(at)
                if self.exclusive:
                    k.store(out, at, acc.ref)
                    k.assign(acc, acc.ref + v)
                else:
                    k.assign(acc, acc.ref + v)
                    k.store(out, at, acc.ref)

    def lower_gpu(self, k, ins, out, epilogue=None):
        """Along the last axis, a block per line scanning it in chunks (_block_scan).
        Along another, a thread per line, as on the CPU (per_iteration): consecutive
        threads take consecutive lines, adjacent in memory, so every step's reads and
        writes coalesce, and a serial scan does no more additions than the sums."""
        x = ins[0]
        a = normalize_axis("cumsum", self.axis, len(x.shape))
        if a == len(x.shape) - 1 and x.shape[a] > 1:
            self._block_scan(k, x, out, prod(x.shape[:a]), x.shape[a])
            return
        cpu = KernelBuilder(k.name, [], flat_block=1)
        self.lower(cpu, ins, out)
        gpu.per_iteration(k, cpu.finish())

    def _block_scan(self, k: KernelBuilder, x: Buffer, out: Buffer, lines: int, n: int) -> None:
        """A block per line of n contiguous elements; each chunk of the block's width is
        scanned in shared memory (Hillis-Steele: at step d every thread adds the partial
        sum d places back, a barrier between the reads and the writes), and the chunk's
        total carried into the next. Consecutive threads take consecutive elements."""
        width = min(gpu.THREADS, max(WARP, 1 << (n - 1).bit_length()))
        zero = const(0.0 if x.dtype.startswith("float") else 0, x.dtype)
        scan = k.shared("scan", x.dtype, (width,))
        with gpu.grid(k, (lines,), (width,)) as ((line,), (t,)):
            carry = k.local(x.dtype, zero, "carry")
            with k.loop(-(-n // width), LoopKind.SERIAL, "chunk") as chunk:
                j = chunk * width + t
                at = line * n + ((n - 1) - j if self.reverse else j)
                v = k.local(x.dtype, zero, "v")
                with k.when(j.lt(n)):
                    k.assign(v, x.load_flat(at))
                acc = k.local(x.dtype, v.ref, "acc")
                k.store(scan, t, acc.ref)
                d = 1
                while d < width:
                    k.barrier()
                    back = k.local(x.dtype, zero, "back")
                    with k.when(t.ge(d)):
                        k.assign(back, scan.load_flat(t - d))
                    k.barrier()
                    k.assign(acc, acc.ref + back.ref)
                    k.store(scan, t, acc.ref)
                    d *= 2
                k.barrier()
                before = k.local(x.dtype, zero, "before")  # the chunk's sum before element j
                with k.when(t.gt(0)):
                    k.assign(before, scan.load_flat(t - 1))
                with k.when(j.lt(n)):
                    k.store(out, at, carry.ref + (before.ref if self.exclusive else acc.ref))
                k.assign(carry, carry.ref + scan.load_flat(const(width - 1, "int64")))
                k.barrier()  # every thread has read the chunk before the next one is written

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        return [b.cumsum(g, axis=self.axis, exclusive=self.exclusive, reverse=not self.reverse)]
