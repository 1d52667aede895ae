"""resample: separable interpolation from per-axis tap tables (what Resize becomes).

For each resized axis a, input pair (indices_a, weights_a), both (out_len_a, taps_a):
output position o along a reads input positions indices_a[o, :] with weights
weights_a[o, :]; the output is the sum over all tap combinations of the weights'
product times the input there. An indices row of -1 marks a position outside the
input (tf_crop_and_resize): the output there is `extrapolation_value`.

Frontends compute the tables at compile time, so every ONNX coordinate mode,
nearest rounding, cubic coefficient and antialias filter is numpy in one place
(frontends/onnx/ops/resample.py), and the kernel is one loop nest for all of them.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

import numpy as np

from codegen.kir import Expr, LoopKind, const, logical_and, maximum, select
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Fusion, Grads, Op, normalize_axis, register
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder


@register("resample", Fusion.OPAQUE)
class Resample(Op):
    gpu_per_iteration = True
    arity = (1, 1 + 2 * 8)
    axes: tuple[int, ...] = ()
    extrapolation_value: float = 0.0

    def _axes(self, rank: int) -> list[int]:
        return [normalize_axis("resample", a, rank) for a in self.axes]

    def infer(self, x: TensorType, *tables: TensorType) -> TensorType:
        axes = self._axes(x.rank)
        if len(tables) != 2 * len(axes) or len(set(axes)) != len(axes):
            raise GraphError(f"resample: axes {self.axes} need {2 * len(axes)} tables, got {len(tables)}")
        shape = list(x.shape)
        for a, indices, weights in zip(axes, tables[::2], tables[1::2]):
            if indices.dtype != "int64" or indices.rank != 2 or weights.shape != indices.shape:
                raise GraphError(
                    f"resample: axis {a} tables must be int64 and float (n, taps), got {indices}, {weights}"
                )
            if weights.dtype != x.dtype:
                raise GraphError(f"resample: weights are {weights.dtype}, x is {x.dtype}")
            shape[a] = indices.shape[0]
        return x.with_shape(tuple(shape))

    def reference(self, x, *tables):
        result = x
        outside = np.zeros(self.infer(TensorType.of(x), *map(TensorType.of, tables)).shape, bool)
        for a, indices, weights in zip(self._axes(x.ndim), tables[::2], tables[1::2]):
            gathered = np.take(result, np.clip(indices, 0, x.shape[a] - 1), axis=a)  # (.., n, taps, ..)
            w = weights.reshape((1,) * a + weights.shape + (1,) * (x.ndim - a - 1))
            result = (gathered * w).sum(axis=a + 1)
            mark = (indices[:, 0] < 0).reshape((1,) * a + (-1,) + (1,) * (x.ndim - a - 1))
            outside = outside | mark
        return np.where(outside, x.dtype.type(self.extrapolation_value), result).astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        x, tables = ins[0], ins[1:]
        axes = self._axes(len(x.shape))
        with k.nest(out.shape) as idx:
            source: list[Expr] = list(idx)
            weight: Expr | None = None
            acc = k.local(x.dtype, 0.0, "acc")
            with ExitStack() as loops:
                for a, indices, weights in zip(axes, tables[::2], tables[1::2]):
                    taps = indices.shape[1]
                    t = (
                        loops.enter_context(k.loop(taps, LoopKind.SERIAL, "t"))
                        if taps > 1
                        else const(0, "int64")
                    )
                    source[a] = maximum(indices[[idx[a], t]], 0)
                    w = weights[[idx[a], t]]
                    weight = w if weight is None else weight * w
                k.assign(acc, acc.ref + weight * x[source])
            # a row of -1 (outside) is -1 in every tap: tap 0 tells
            ok: Expr = const(True, "bool")
            for a, indices in zip(axes, tables[::2]):
                ok = logical_and(ok, indices[[idx[a], const(0, "int64")]].ge(0))
            k.store(out, idx, select(ok, acc.ref, self.extrapolation_value))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """Resampling is linear in x: per axis a matrix A (out × in) from the tap tables
        (rows of extrapolated points zero), so x's gradient is Aᵀ g along each axis."""
        x, tables = node.inputs[0], node.inputs[1:]
        if any(t not in b.params for t in tables):
            raise GraphError(f"node {node.name}: the resample gradient needs constant tap tables")
        axes = self._axes(x.type.rank)
        gx = g
        for a, indices, weights in zip(axes, tables[::2], tables[1::2]):
            idx, w = b.params[indices], b.params[weights]
            n_in = x.type.shape[a]
            dense = np.zeros((idx.shape[0], n_in), np.float64)
            rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
            np.add.at(dense, (rows, np.clip(idx, 0, n_in - 1).ravel()), w.astype(np.float64).ravel())
            dense[idx[:, 0] < 0] = 0.0  # extrapolated: a constant, no gradient
            last = tuple(d for d in range(x.type.rank) if d != a) + (a,)
            moved = b.matmul(
                b.transpose(gx, perm=last), b.param("interpolation", dense.astype(x.type.np_dtype))
            )
            gx = b.transpose(moved, perm=tuple(int(p) for p in np.argsort(last)))
        return [gx, *[None] * len(tables)]
