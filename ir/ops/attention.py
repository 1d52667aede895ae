"""Attention as one op: out = softmax(q @ kt) @ v per matrix of the leading axes, the
softmax over the last axis (each query's scores over the keys).

The pass compiler.passes.attention_fused writes a matmul → softmax → matmul chain whose
scores and probabilities have no other reader as this op. On the CPU a parallel step
takes a few query rows of one matrix: their scores (rows x keys) are computed into a
scratch tile that stays in L1, softmaxed there row by row, and multiplied by v into the
output, so the score matrix (batch x heads x queries x keys: 8 MB for a transformer of
4 heads at batch 32 and 128 positions) is never written to memory nor read back twice.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import numpy as np

from codegen.kir import Buffer, Expr, KernelBuilder, LoopKind, const, minimum, muladd
from ir.errors import GraphError
from ir.ops import Fusion, Gradient, Op, register
from ir.ops.nn import (
    _require_float,
    k_const,
    k_sweeps,
    matmul_batch,
    matmul_col_tile,
    matmul_rows,
    vector_kind,
)
from ir.ops.reduce import CpuLine, Softmax
from ir.types import TensorType

#: query rows a parallel step takes (their score tile, rows x keys, kept in a scratch)
ATTENTION_ROWS = 16
#: the most floats a step's two scratch tiles hold (scores and results: 64 KiB), for
#: long sequences
ATTENTION_TILE = 1 << 14


def _product(
    k: KernelBuilder,
    rows: int,
    cols: int,
    depth: int,
    a_at: Callable[[int, Expr], Expr],
    b_at: Callable[[Expr, Expr], Expr],
    out: Buffer,
    out_at: Callable[[int, Expr], Expr],
) -> None:
    """out[out_at(r, j)] = sum over t < depth of a_at(r, t) * b_at(t, j), for r < rows and
    j < cols, in register tiles as the product kernels take them (matmul_rows rows by
    matmul_col_tile columns, the sums in registers over all of t, a's values broadcast).
    A last column tile that would run past `cols` starts earlier instead (its overlap
    computed twice, the same sums); fewer columns than a tile are one masked tile."""
    per_block, rest = matmul_rows(k.unit, rows, rows * cols * depth, cols)
    firsts = [(r, per_block) for r in range(0, rows - rest, per_block)]
    firsts += [(rows - rest, rest)] if rest else []
    width = min(matmul_col_tile(k.unit, per_block), cols)
    tiles, tail = divmod(cols, width)

    def block(first_col: Expr, rs: range) -> None:
        """Rows rs of the column tile at first_col, over all of t."""
        with k.loop(width, vector_kind(width, k.unit.lanes), "n") as jj:
            for r in rs:
                k.store(out, out_at(r, first_col + jj), k_const(out, 0.0))

        def sweep(first_t: Expr, steps: int) -> None:
            coeffs = [[a_at(r, first_t + u) for u in range(steps)] for r in rs]
            with k.loop(width, vector_kind(width, k.unit.lanes), "n") as jj:
                j = first_col + jj
                sums = [k.local(out.dtype, out.load_flat(out_at(r, j)), "sum") for r in rs]
                for u in range(steps):
                    bv = k.local(out.dtype, b_at(first_t + u, j), "b").ref
                    for row_coeffs, acc in zip(coeffs, sums):
                        k.assign(acc, muladd(row_coeffs[u], bv, acc.ref))
                for r, acc in zip(rs, sums):
                    k.store(out, out_at(r, j), acc.ref)

        k_sweeps(k, depth, sweep)

    def tile(first_col: Expr) -> None:
        for first_row, count in firsts:
            block(first_col, range(first_row, first_row + count))

    with k.loop(tiles, LoopKind.SERIAL, "cols") as t:
        tile(t * width)
    if tail:
        tile(const(cols - width, "int64"))


@register("attention", Fusion.CONTRACTION)
class Attention(Op):
    """softmax(q @ kt, last axis) @ v: q (..., M, D) queries, kt (..., D, N) keys
    transposed, v (..., N, E) values, the leading axes the same in all three."""

    differentiation = Gradient.NONE  # made by a compiler pass, for inference
    arity = (3, 3)
    accepts_epilogue = True
    #: a GPU thread per step of rows (the pass makes this op for the CPU only; a GPU
    #: schedule of its own would keep the tile in shared memory)
    gpu_per_iteration = True

    def batch_axis(self, ins, out, batch):
        q, kt, v = ins
        scores = q.with_shape(q.shape[:-1] + kt.shape[-1:])
        return matmul_batch(scores, v, out, matmul_batch(q, kt, scores, batch[0], batch[1]), batch[2])

    def infer(self, q: TensorType, kt: TensorType, v: TensorType) -> TensorType:
        _require_float("attention", q, kt, v)
        lead = q.shape[:-2]
        if (
            q.rank < 2
            or kt.rank != q.rank
            or v.rank != q.rank
            or kt.shape[:-2] != lead
            or v.shape[:-2] != lead
            or kt.shape[-2] != q.shape[-1]
            or v.shape[-2] != kt.shape[-1]
        ):
            raise GraphError(f"attention: q {q.shape}, kt {kt.shape} and v {v.shape} do not chain")
        return q.with_shape(q.shape[:-1] + v.shape[-1:])

    def reference(self, q, kt, v):
        return np.matmul(Softmax(axis=-1).reference(np.matmul(q, kt)), v)

    def lower(self, k, ins, out, epilogue=None):
        """Per parallel step one matrix and `rows` query rows (the last step of a matrix
        starting earlier where the rows do not divide: its overlap computed twice):
        their scores into a scratch tile, each row softmaxed there, the tile times v
        into a second scratch tile, which goes to out through the epilogue. Both tiles
        are the thread's own: two steps that overlap store the same finished values,
        never each other's partial sums."""
        q, kt, v = ins
        *lead, m, d = q.shape
        n, e = kt.shape[-1], v.shape[-1]
        rows = min(m, ATTENTION_ROWS, max(1, ATTENTION_TILE // (n + e)))
        steps = -(-m // rows)
        scores = Softmax(axis=-1)
        with k.loop(prod(lead) * steps, LoopKind.PARALLEL, "rows") as step:
            mat = step // steps
            first = minimum(step % steps * rows, const(m - rows, "int64"))
            tile = k.scratch("scores", out.dtype, (rows * n,))
            row = [k.local("int64", mat * m + first + r, "row").ref for r in range(rows)]
            _product(
                k, rows, n, d,
                lambda r, t: q.load_flat(row[r] * d + t),
                lambda t, j: kt.load_flat((mat * d + t) * n + j),
                tile, lambda r, j: r * n + j,
            )  # fmt: skip
            with k.loop(rows, LoopKind.SERIAL, "r") as r:
                scores._line(k, tile, tile, lambda j: r * n + j, CpuLine(n), None)
            result = k.scratch("result", out.dtype, (rows * e,))
            _product(
                k, rows, e, n,
                lambda r, t: tile.load_flat(r * n + t),
                lambda t, j: v.load_flat((mat * n + t) * e + j),
                result, lambda r, j: r * e + j,
            )  # fmt: skip
            for r in range(rows):
                with k.loop(e, LoopKind.VECTOR, "j") as j:
                    at, value = row[r] * e + j, result.load_flat(r * e + j)
                    k.store(out, at, value if epilogue is None else epilogue(value, at, None))
