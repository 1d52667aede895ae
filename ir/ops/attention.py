"""Attention as one op: out = softmax(q @ kt [+ bias]) @ v per matrix of the leading
axes, the softmax over the last axis (each query's scores over the keys); the optional
bias, one number per key, masks keys out with -inf (a sequence padded to a longer
length, see compiler.sequence).

The pass compiler.passes.attention_fused writes a matmul → softmax → matmul chain whose
scores and probabilities have no other reader as this op. On the CPU a parallel step
takes a few query rows of one matrix: their scores (rows x keys) are computed into a
scratch tile that stays in L1, softmaxed there (rows side by side), and multiplied by
v into the output, so the score matrix (batch x heads x queries x keys: 8 MB for a
transformer of 4 heads at batch 32 and 128 positions) is never written to memory nor
read back twice.
"""

from __future__ import annotations

from math import prod

import numpy as np

from codegen.kir import LoopKind, const, minimum
from ir.errors import GraphError
from ir.ops import BatchMixing, Fusion, Gradient, Op, register
from ir.ops.nn import _require_float, matmul_batch, tiled_product
from ir.ops.reduce import CpuLine, Softmax
from ir.types import TensorType

#: query rows a parallel step takes (their score tile, rows x keys, kept in a scratch)
ATTENTION_ROWS = 16
#: the most floats a step's two scratch tiles hold (scores and results: 64 KiB), for
#: long sequences
ATTENTION_TILE = 1 << 14
#: score rows softmaxed side by side (each row's max and sum end in a horizontal
#: reduction, a chain of dependent steps that rows one at a time wait on)
SOFTMAX_ROWS = 4


@register("attention", Fusion.CONTRACTION)
class Attention(Op):
    """softmax(q @ kt + bias, last axis) @ v: q (..., M, D) queries, kt (..., D, N) keys
    transposed, v (..., N, E) values, the leading axes the same in all three; bias (N,),
    added to every query's scores, is optional."""

    differentiation = Gradient.NONE  # made by a compiler pass, for inference
    arity = (3, 4)
    accepts_epilogue = True
    #: a GPU thread per step of rows (the pass makes this op for the CPU only; a GPU
    #: schedule of its own would keep the tile in shared memory)
    gpu_per_iteration = True

    def batch_axis(self, ins, out, batch):
        if len(batch) > 3 and batch[3]:
            raise BatchMixing("the key bias holds the batch")
        q, kt, v = ins[:3]
        scores = q.with_shape(q.shape[:-1] + kt.shape[-1:])
        return matmul_batch(scores, v, out, matmul_batch(q, kt, scores, batch[0], batch[1]), batch[2])

    def infer(self, q: TensorType, kt: TensorType, v: TensorType, *bias: TensorType) -> TensorType:
        _require_float("attention", q, kt, v, *bias)
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
        if bias and bias[0].shape != kt.shape[-1:]:
            raise GraphError(f"attention: the key bias is {bias[0].shape}, expected ({kt.shape[-1]},)")
        return q.with_shape(q.shape[:-1] + v.shape[-1:])

    def reference(self, q, kt, v, *bias):
        scores = np.matmul(q, kt)
        return np.matmul(Softmax(axis=-1).reference(scores + bias[0] if bias else scores), v)

    def lower(self, k, ins, out, epilogue=None):
        """Per parallel step one matrix and `rows` query rows (the last step of a matrix
        starting earlier where the rows do not divide: its overlap computed twice):
        their scores into a scratch tile, each row softmaxed there, the tile times v
        into a second scratch tile, which goes to out through the epilogue. Both tiles
        are the thread's own: two steps that overlap store the same finished values,
        never each other's partial sums."""
        q, kt, v, *bias = ins
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
            tiled_product(
                k, rows, n, d,
                lambda r, t: q.load_flat(row[r] * d + t),
                lambda t, j: kt.load_flat((mat * d + t) * n + j),
                tile, lambda r, j: r * n + j,
            )  # fmt: skip
            if bias:
                with k.loop(rows, LoopKind.SERIAL, "r") as r:
                    with k.loop(n, LoopKind.VECTOR, "j") as j:
                        k.store(tile, r * n + j, tile.load_flat(r * n + j) + bias[0].load_flat(j))
            side = next(g for g in (SOFTMAX_ROWS, 2, 1) if rows % g == 0)
            with k.loop(rows // side, LoopKind.SERIAL, "r") as r:
                lines = [lambda j, i=i: (r * side + i) * n + j for i in range(side)]
                scores._lines(k, tile, tile, lines, CpuLine(n), None)
            result = k.scratch("result", out.dtype, (rows * e,))
            tiled_product(
                k, rows, e, n,
                lambda r, t: tile.load_flat(r * n + t),
                lambda t, j: v.load_flat((mat * n + t) * e + j),
                result, lambda r, j: r * e + j,
            )  # fmt: skip
            for r in range(rows):
                with k.loop(e, LoopKind.VECTOR, "j") as j:
                    at, value = row[r] * e + j, result.load_flat(r * e + j)
                    k.store(out, at, value if epilogue is None else epilogue(value, at, None))
