"""matmul_nt_sum: out[i, j] = Σ over n and k of a[n, i, k] · b[n, j, k].

A convolution's weight gradient pairs the output gradient g (N, O, P) with the input's
windows (im2col, (N, C·kh·kw, P)), summed over images and positions P. Both operands
hold the summed axis innermost, so a matmul needs one of them transposed first (per
image, as a gather across rows: in the MNIST CNN's train step those transposes took
1.4 ms beside the products' 2.3), and then a sum over the batch. Here the sums run
along that shared contiguous axis instead: each of a register tile's sums is a vector
of partial sums over consecutive k, both operands are read as whole vectors where they
lie, and a tile's vectors are added up across their lanes once, at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from codegen import gpu
from codegen.kir import ITEMSIZE, Buffer, Expr, KernelBuilder, LoopKind, const, logical_and, muladd, select
from ir.errors import GraphError
from ir.ops import Fusion, Gradient, Op, register
from ir.ops.nn import masked_load
from ir.types import TensorType

#: register tiles, rows of a x rows of b, of 24 vector sums (of AVX-512's 32 registers;
#: the tile's vectors of b and one of a the rest): each step loads rows + cols vectors
#: for rows x cols FMAs. The one that wastes least at the edges is taken (a weight
#: gradient's 288 x 64: 6 x 4, 2.04 ms where 8 x 3, computing 66 columns, took 2.24;
#: 3 x 8 took 3.4).
TILES = ((6, 4), (8, 3), (4, 6))
#: a smaller vector unit's tile (AVX2: 8 of 16 registers)
SMALL_TILE = (4, 2)
#: a's rows that a parallel step keeps in cache (half of a Zen 4 or Skylake-SP core's L2)
CACHED_BYTES = 512 << 10
#: a GPU block's outputs per side (a thread each) and k per slice through shared memory
GPU_TILE = 16

Lanes = Callable[[Expr], Expr]  # a vector's lanes (an index) -> whether each counts


@register("matmul_nt_sum", Fusion.OPAQUE)
class MatmulNtSum(Op):
    """out = Σ_n a[n] · b[n]ᵀ for a (N, M, K) and b (N, J, K): (M, J)."""

    arity = (2, 2)
    differentiation = Gradient.NONE  # made by gradient rules only

    def infer(self, a: TensorType, b: TensorType) -> TensorType:
        if a.rank != 3 or b.rank != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
            raise GraphError(f"matmul_nt_sum: expects (N, M, K) and (N, J, K), got {a.shape} and {b.shape}")
        if a.dtype != b.dtype or a.dtype not in ("float32", "float64"):
            raise GraphError(f"matmul_nt_sum: operands must be one float dtype, got {a.dtype} and {b.dtype}")
        return a.with_shape((a.shape[1], b.shape[1]))

    def reference(self, a, b):
        return np.einsum("nik,njk->ij", a, b).astype(a.dtype)

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """Tiles of rows x cols outputs. The operand with more rows gives the tiles'
        rows (so the larger, a weight gradient's windows, is read from memory once: in
        the MNIST CNN's train step 2.5 ms where the other way round took 3.0-3.6). A
        parallel step takes a group of row tiles whose rows fit CACHED_BYTES and runs
        each column tile of the other operand over all of them, so that one is streamed
        once per group (288 x 64 over 32 x 121: 1.91 -> 1.74 ms on one thread
        standalone, 1.52 -> 1.37 in the train step on two, the same on one). A tile's
        sums are rows x cols vectors of `lanes` partial sums over k, in a scratch
        indexed by constants that LLVM keeps in registers; each image's k runs as whole
        vectors and, where a vector does not divide it, one more ending at k's end,
        whose lanes already summed are zeroed. Tiles at the edges read the last row
        again and do not store it."""
        a, b = ins
        n, m, depth = a.shape
        j = b.shape[1]
        swap = j > m  # b's rows are the tiles' rows: out[i, jj] is the tile's (jj, i)
        if swap:
            a, b, m, j = b, a, j, m
        lanes = k.unit.lanes * 4 // ITEMSIZE[a.dtype]
        rows, cols = _tile(m, j) if k.unit.registers >= 32 else SMALL_TILE
        rows, cols = min(rows, m), min(cols, j)
        acc = k.scratch("acc", a.dtype, (rows * cols * lanes,))
        whole, tail = divmod(depth, lanes)

        def vectors(base_a: list[Expr], base_b: list[Expr], first: Expr, counts: Lanes | None) -> None:
            """Add one vector of k, from `first`, to the sums; where `counts` is given, only
            the lanes it holds for."""
            with k.loop(lanes, LoopKind.TILE, "lane") as lane:
                at = first + lane if depth >= lanes else _clamp(lane, depth)
                bs = [k.local(a.dtype, b.load_flat(base + at), "b") for base in base_b]
                for r, base in enumerate(base_a):
                    value = a.load_flat(base + at)
                    if counts is not None:
                        value = select(counts(lane), value, const(0.0, a.dtype))
                    av = k.local(a.dtype, value, "a")
                    for c, bv in enumerate(bs):
                        slot = (r * cols + c) * lanes + lane
                        k.store(acc, slot, muladd(av.ref, bv.ref, acc.load_flat(slot)))

        row_tiles = -(-m // rows)
        group = _row_tiles_cached(rows * n * depth * ITEMSIZE[a.dtype], row_tiles)
        with k.loop(-(-row_tiles // group), LoopKind.PARALLEL, "group") as grp:
            with k.loop(-(-j // cols), LoopKind.SERIAL, "cols") as ct:
                with k.loop(group, LoopKind.SERIAL, "rows") as q:
                    rt = grp * group + q
                    with k.when(rt.lt(row_tiles)) if row_tiles % group else contextlib.nullcontext():
                        row_at = [_clamp(rt * rows + r, m) for r in range(rows)]
                        col_at = [_clamp(ct * cols + c, j) for c in range(cols)]
                        with k.loop(rows * cols * lanes, LoopKind.VECTOR, "z") as z:
                            k.store(acc, z, const(0.0, a.dtype))
                        with k.loop(n, LoopKind.SERIAL, "n") as img:
                            base_a = [(img * m + i) * depth for i in row_at]
                            base_b = [(img * j + i) * depth for i in col_at]
                            if whole:
                                with k.loop(whole, LoopKind.SERIAL, "k") as kv:
                                    vectors(base_a, base_b, kv * lanes, None)
                            if tail and whole:  # the last vector of k, overlapping the one before
                                last = const(depth - lanes, "int64")
                                vectors(base_a, base_b, last, lambda lane: lane.ge(lanes - tail))
                            elif tail:  # k shorter than a vector: its index clamped, lanes past it zero
                                vectors(base_a, base_b, const(0, "int64"), lambda lane: lane.lt(depth))
                        for r in range(rows):
                            for c in range(cols):
                                total = k.local(a.dtype, 0.0, "total")
                                with k.loop(lanes, LoopKind.VECTOR, "s") as s:
                                    lane_sum = acc.load_flat((r * cols + c) * lanes + s)
                                    k.assign(total, total.ref + lane_sum, reduction=True)
                                i, jj = rt * rows + r, ct * cols + c
                                with k.when(logical_and(i.lt(m), jj.lt(j))):
                                    k.store(out, jj * m + i if swap else i * j + jj, total.ref)

    def lower_gpu(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """A block per GPU_TILE x GPU_TILE outputs, a thread per output. For each image
        and slice of GPU_TILE k, the block copies the slice of its rows of a and of b
        into shared memory (consecutive threads, consecutive k: coalesced), waits, and
        each thread adds its row of a's slice times its row of b's; rows past the edges
        are copied as zeros."""
        a, b = ins
        n, m, depth = a.shape
        j = b.shape[1]
        size = GPU_TILE
        a_tile = k.shared("a_tile", a.dtype, (size * (size + 1),))  # a padding column: no bank conflicts
        b_tile = k.shared("b_tile", b.dtype, (size * (size + 1),))
        with gpu.grid(k, (-(-j // size), -(-m // size)), (size, size)) as ((bx, by), (tx, ty)):
            total = k.local(a.dtype, 0.0, "total")
            with k.loop(n, LoopKind.SERIAL, "n") as img:
                with k.loop(-(-depth // size), LoopKind.SERIAL, "kt") as kt:
                    at = kt * size + tx
                    for tile, src, rows, first in ((a_tile, a, m, by), (b_tile, b, j, bx)):
                        row = first * size + ty
                        inside = logical_and(row.lt(rows), at.lt(depth))
                        value = masked_load(src, (img * rows + row) * depth + at, inside)
                        k.store(tile, ty * (size + 1) + tx, value)
                    k.barrier()
                    with k.loop(size, LoopKind.SERIAL, "q") as q:
                        a_q = a_tile.load_flat(ty * (size + 1) + q)
                        k.assign(total, total.ref + a_q * b_tile.load_flat(tx * (size + 1) + q))
                    k.barrier()
            i, jj = by * size + ty, bx * size + tx
            with k.when(logical_and(i.lt(m), jj.lt(j))):
                k.store(out, i * j + jj, total.ref)


def _row_tiles_cached(tile_bytes: int, row_tiles: int) -> int:
    """Row tiles a parallel step takes together, each column tile of b then read once
    for all of them: as many as keep their rows of a within CACHED_BYTES."""
    return max(1, min(row_tiles, CACHED_BYTES // max(tile_bytes, 1)))


def _tile(m: int, j: int) -> tuple[int, int]:
    """The tile of TILES that computes the fewest outputs past m x j (the first of equals)."""
    return min(TILES, key=lambda t: -(-m // t[0]) * t[0] * -(-j // t[1]) * t[1])


def _clamp(index: Expr, size: int) -> Expr:
    """index, or size - 1 past it: a tile's rows beyond the edge read the last one."""
    return select(index.lt(size), index, const(size - 1, "int64"))
