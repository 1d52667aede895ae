"""Contractions (matmul, linear, conv2d) and the other layers of a CNN: pooling, batch norm."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from math import prod
from typing import TYPE_CHECKING

import numpy as np

from codegen import gpu
from codegen.kir import (
    AVX512,
    CACHE_LINE,
    ITEMSIZE,
    Buffer,
    Expr,
    ExprBuilder,
    KernelBuilder,
    Local,
    LoopKind,
    VectorUnit,
    cast,
    const,
    guarded_load,
    in_range,
    logical_and,
    maximum,
    minimum,
    muladd,
    select,
    unravel,
)
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import (
    Batch,
    BatchMixing,
    Epilogue,
    Fusion,
    Gradient,
    Grads,
    Op,
    batch_of_first,
    broadcast_batch,
    broadcast_shapes,
    register,
)
from ir.ops.grad import constant, swap_last, unbroadcast
from ir.ops.shape import PerElement
from ir.types import TensorType

if TYPE_CHECKING:
    from ir.builder import GraphBuilder


def _require_float(op: str, *types: TensorType) -> None:
    for pos, t in enumerate(types):
        if t.dtype not in ("float32", "float64"):
            raise GraphError(f"{op}: input {pos} must be float, got {t.dtype}")
    if len({t.dtype for t in types}) > 1:
        raise GraphError(f"{op}: input dtypes differ: {[t.dtype for t in types]}")


# --------------------------------------------------------------------------- matmul


def _matmul_shapes(a: tuple[int, ...], b: tuple[int, ...]):
    """numpy matmul shape rule. Returns (batch, M, K, N, out_shape, a_batch, b_batch)."""
    if not a or not b:
        raise GraphError(f"matmul: operands must have rank >= 1, got {a} and {b}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    (m, k), (k2, n) = a2[-2:], b2[-2:]
    if k != k2:
        raise GraphError(f"matmul: inner dimensions differ: {a} @ {b} ({k} vs {k2})")
    batch = broadcast_shapes("matmul", [a2[:-2], b2[:-2]])
    out = batch + ((m,) if len(a) > 1 else ()) + ((n,) if len(b) > 1 else ())
    return batch, m, k, n, out, a2[:-2], b2[:-2]


def matmul_batch(a: TensorType, b: TensorType, out: TensorType, ba: Batch, bb: Batch) -> Batch:
    """The batch of a (batched) matrix product: in a's rows, in b's columns, or in the
    broadcast batch dims (where it follows numpy broadcasting); never contracted."""
    if (ba and a.rank < 2) or (bb and b.rank < 2):
        raise BatchMixing("a 1-D operand of matmul holds the batch: it is contracted")
    if (ba and ba.axis == a.rank - 1) or (bb and bb.axis == b.rank - 2):
        raise BatchMixing("matmul contracts the batch axis")
    rows = ba is not None and ba.axis == a.rank - 2
    cols = bb is not None and bb.axis == b.rank - 1
    if rows or cols:
        if (rows and bb) or (cols and ba):
            raise BatchMixing("both matmul operands hold the batch, one of them in its matrix")
        at = out.rank - 1 if cols or b.rank == 1 else out.rank - 2
        return dataclasses.replace(bb if cols else ba, axis=at)  # type: ignore[arg-type]
    if not (ba or bb):
        return None
    dims = max(a.rank, b.rank) - 2
    return broadcast_batch(
        [a.with_shape(a.shape[:-2]), b.with_shape(b.shape[:-2])], out.with_shape(out.shape[:dims]), [ba, bb]
    )


def _batch_offset(p: Expr, batch: tuple[int, ...], operand: tuple[int, ...], per: int) -> Expr:
    """Element offset of `operand`'s matrix for flat batch index p (broadcast dims step 0)."""
    operand = (1,) * (len(batch) - len(operand)) + operand
    offset: Expr | int = 0
    stride, inner = per, 1
    for d, od in zip(reversed(batch), reversed(operand)):
        if od != 1:
            offset = (p // inner) % d * stride + offset
            stride *= od
        inner *= d
    return offset if isinstance(offset, Expr) else p * 0


#: k steps of a product's loop body (a sweep), whose sums LLVM keeps in registers
#: across sweeps; AVX512_MATMUL_K_UNROLL on AVX-512 (see matmul_k_unroll)
MATMUL_K_UNROLL = 8
AVX512_MATMUL_K_UNROLL = 4
#: output columns computed together on AVX-512 (see matmul_col_tile)
MATMUL_COL_TILE = 64
#: output rows computed together, so each loaded vector of b serves that many rows
MATMUL_ROW_BLOCKS = (4, 3, 2, 1)
#: vectors of sums in an AVX-512 product tile narrower than MATMUL_COL_TILE (half its
#: 32 registers)
AVX512_MATMUL_SUMS = 16
#: rows of an AVX-512 product tile MATMUL_COL_TILE wide: 6 x 4 sums, 4 vectors of b and
#: a's broadcasts as FMA operands fill its 32 registers, and each vector of b loaded
#: serves 6 FMAs (4 rows: 4, and b's panel streams from L2 at 32 bytes a cycle)
AVX512_WIDE_ROWS = 6
#: blocks of AVX512_WIDE_ROWS (all matrices) from which a product takes them: fewer
#: make few parallel steps, and the threads' shares of them uneven (the MLP's 32 rows
#: as 5 blocks of 6 and one of 2 split 3 : 2 between two threads, as 8 of 4 split even)
AVX512_WIDE_MIN_BLOCKS = 32
#: output rows computed together on a smaller unit than AVX-512's (see matmul_rows)
AVX2_MATMUL_ROWS = 6
#: multiply-adds from which a product's rows past its last whole block get their own block
MATMUL_REST_MACS = 1 << 20
#: row blocks per parallel step, sharing each column panel of b from cache
MATMUL_ROW_GROUP = 16
#: rows of a's a parallel step takes from which a product copies b's column panel (when
#: b is not packed at compile time) to consecutive rows of a scratch, and the most bytes
#: a copy takes: its k rows then come in blocks that stay in L1 while the step's row
#: blocks sweep them
MATMUL_PACK_ROWS = 32
MATMUL_PACK_BYTES = 32 << 10
#: bytes between b's rows from which that copy pays: closer rows already spread a panel
#: over L1's sets, and the copy is only more traffic (Winograd's products, whose blocks
#: of 112 tiles lie 448 bytes a row: 29.5 against 33 ms at 256 channels and batch 32)
MATMUL_PACK_ROW_BYTES = 1 << 10


def rows_alias(row_bytes: int) -> bool:
    """Whether a panel of b's rows, row_bytes apart, meets in few of L1's sets, so that
    a product copies it: rows MATMUL_PACK_ROW_BYTES or more apart and an even number of
    cache lines (at most half the sets; 512 columns: 32 lines, 2 sets of 64). Rows an
    odd number of lines apart, or not whole lines, spread over every set: ResNet-18's
    layer1 Winograd products at batch 1 (784 columns, 49 lines) ran 12% faster read in
    place, 448-byte rows (7 lines) 10% faster."""
    return row_bytes >= MATMUL_PACK_ROW_BYTES and row_bytes % (2 * CACHE_LINE) == 0


#: parallel steps a matmul keeps (for the threads) before it groups row blocks
MATMUL_MIN_STEPS = 4
#: rows of a product up to which its packed b (constant weights, or an operand packed
#: once a call), each of whose values meets this few rows, costs more to stream than to
#: multiply: there the threads split b's columns rather than the rows (see
#: _column_split). The transformer at batch 1 (products of 128 rows) ran 6% slower on
#: two threads with its columns split.
MATMUL_STREAM_ROWS = 32
#: bytes of a's rows that one thread's row steps may read, for each column tile again,
#: from its core's L2 (see _column_split)
MATMUL_ROWS_CACHED_BYTES = 1 << 20
#: lanes of the widest float32 vector (AVX-512), which graph passes size for (packed
#: conv panels are multiples of it); kernels use their target's (KernelBuilder.unit)
MATMUL_VECTOR = 16


@dataclasses.dataclass
class Product:
    """out[p] = bias + a[p] @ b[p] for each matrix p of a batch (broadcast as numpy's
    matmul): what a contraction op hands its CPU and GPU lowerings.

    The bias is one value per column (a Dense layer's), or with bias_per_row one per
    row (a convolution's, computed as weights @ im2col). out_shape is the shape the
    epilogue sees (out may be a view of it): out's rows span its leading axes and out's
    columns its trailing ones (a linear's (..., N) over rows of N; a convolution's
    (N, C, H, W) over rows of H*W), and the epilogue gets its multi-index there, unless
    flat_epilogue (a matmul with a squeezed operand: flat indices only).

    With b_panel, b is a constant packed by pack_panels, (panels, K, b_panel): a column
    tile reads its panels' contiguous rows rather than a strided column block of b
    (whose rows, 2 or 4 KiB apart, meet in the same few L1 sets)."""

    a: Buffer
    b: Buffer
    out: Buffer
    bias: Buffer | None = None
    bias_per_row: bool = False
    out_shape: tuple[int, ...] | None = None
    flat_epilogue: bool = False
    b_panel: int | None = None

    @property
    def b_shape(self) -> tuple[int, ...]:
        """b's shape as a matrix (K, N), whichever way it is stored."""
        if self.b_panel is None:
            return self.b.shape
        return (self.b.shape[1], self.out.shape[-1])

    def b_index(self, matrix: Expr, k: Expr, col: Expr) -> Expr:
        """Where b[k, col] of the matrix starting at `matrix` is stored."""
        if self.b_panel is None:
            return matrix + k * self.out.shape[-1] + col
        return (col // self.b_panel * self.b.shape[1] + k) * self.b_panel + col % self.b_panel

    def epilogue_index(self, row: Expr, col: Expr) -> list[Expr] | None:
        """The multi-index the epilogue sees for out row `row` (counted over the whole
        batch) and column `col`."""
        if self.flat_epilogue:
            return None
        shape = self.out_shape or self.out.shape
        col_axes = _trailing_axes(shape, self.out.shape[-1])
        return [*unravel(row, shape[:-col_axes]), *unravel(col, shape[-col_axes:])]

    def initial(self, row: Expr, col: Expr) -> Expr:
        """What the sum of out[row, col] (row within its matrix) starts from: the bias."""
        if self.bias is None:
            return k_const(self.out, 0.0)
        return self.bias.load_flat(row if self.bias_per_row else col)


class ProductOp(Op):
    """A contraction computed as a Product: its CPU and GPU lowerings are the product's."""

    accepts_epilogue = True

    def product(self, ins: list[Buffer], out: Buffer) -> Product:
        raise NotImplementedError

    def lower(self, k, ins, out, epilogue=None):
        lower_matmul(k, self.product(ins, out), epilogue)

    def lower_gpu(self, k, ins, out, epilogue=None):
        lower_matmul_gpu(k, self.product(ins, out), epilogue)


def lower_matmul(k: KernelBuilder, p: Product, epilogue: Epilogue | None) -> None:
    """out[p, m, :] = bias + sum_k a[p, m, k] * b[p, k, :], a group of row blocks per parallel step.

    The output is computed in tiles of R rows x matmul_col_tile columns, small enough
    for LLVM to keep in vector registers over the whole k loop: per step of k, the
    tile's vectors of b are loaded once and each row's broadcast of a meets all of them
    (the BLIS order: a broadcast dies after its row, so the registers hold the sums,
    b's vectors and one broadcast). A parallel step takes a group of row blocks and,
    column tile by column tile, runs every block of the group over it, so the tile's
    panel of b (k x 64) is read from cache by all of them rather than streamed from
    memory once per block; rows that do not fill a block (matmul_rows) are one more,
    shorter block in the last group of their matrix. Sums run in k order. The epilogue
    is applied to each finished tile while it is in L1 (one more loop over the tile,
    rather than a copy of the k sweep's code: compile time). When the rows give the
    threads too few steps (a batch-1 Dense layer), or few rows meet each of b's packed
    columns (a Dense layer at batch 32), the column tiles are split between steps as
    well (_column_split).
    """
    a, b, out = p.a, p.b, p.out
    batch, m, kk, n, _, a_batch, b_batch = _matmul_shapes(a.shape, p.b_shape)
    shared = prod(batch) if k.threads > 1 else None  # the blocks shared between threads
    rows_per_block, tail_rows = matmul_rows(k.unit, m, prod(batch) * m * kk * n, n, shared)
    lanes, col_tile = k.unit.lanes, matmul_col_tile(k.unit, rows_per_block)
    blocks_per_matrix = m // rows_per_block
    group = _row_group(blocks_per_matrix, prod(batch))
    groups_per_matrix = blocks_per_matrix // group
    row_steps = prod(batch) * groups_per_matrix
    rows = prod(batch) * m
    streamed = p.b_panel is not None and rows <= MATMUL_STREAM_ROWS and n > rows
    a_bytes = prod(batch) * m * kk * ITEMSIZE[a.dtype]
    split = _column_split(row_steps, n, col_tile, k.threads, streamed, p.b_panel is not None, a_bytes)
    chunks, row_parts = split.chunks, split.row_parts
    tiles, tail = divmod(n, col_tile)
    tail_part = chunks > 1 and tail > 0  # the columns past the last whole tile: one more part
    # one column tile takes all of b: each of a's rows is read once a call, from memory
    # where a outgrows L2 (Winograd's products at few tiles, whose transformed weights
    # are a). Each block then fetches the next block's rows (which follow its own) over
    # its k steps: ResNet-18's layer4 products at batch 1, 16.8 MB of weights each, 2.3
    # -> 1.2 ms (14 GB/s), its layer3's 0.95 -> 0.84 ms
    rows_ahead = tiles + (tail > 0) <= 1 and a_bytes > MATMUL_ROWS_CACHED_BYTES
    column_parts = chunks + tail_part
    # where the steps are column parts (few row steps), each streams its own columns of
    # a packed b: every other call runs them last to first (Kernel.alternate_steps), so
    # a call starts on what the last one left in cache. A streamed product's thread runs
    # row groups that each sweep all of its columns: reversing them would change nothing.
    k.alternate_steps |= chunks > 1 and row_steps < MATMUL_MIN_STEPS and p.b_panel is not None
    # b read in place has its rows n floats apart (2 KiB at 512 columns: a panel of 64
    # columns used 8 of L1's 64 sets): a column tile's panel of it is copied, a block of
    # k rows at a time, to consecutive rows, which the group's row blocks then read
    pack = (
        p.b_panel is None and group * rows_per_block >= MATMUL_PACK_ROWS and rows_alias(n * ITEMSIZE[b.dtype])
    )
    unroll = matmul_k_unroll(k.unit)  # k rows a copy holds: whole sweeps
    k_block = max(unroll, MATMUL_PACK_BYTES // (col_tile * ITEMSIZE[b.dtype]) // unroll * unroll)
    with k.loop(row_steps * column_parts, LoopKind.PARALLEL, "rows") as step:
        grp, chunk = _step_at(step, row_steps, column_parts, row_parts) if chunks > 1 else (step, None)
        matrix = grp // groups_per_matrix
        b_mat = _batch_offset(matrix, batch, b_batch, kk * n)
        a_mat = _batch_offset(matrix, batch, a_batch, m * kk)
        b_copy = k.scratch("b_panel", b.dtype, (min(kk, k_block) * col_tile,)) if pack else None
        b_source = b_copy if b_copy is not None else b

        def block(
            first_row: Expr,
            rows: int,
            first_col: Expr,
            cols: int,
            ks: tuple[Expr, int],
            stage: str,
            ordinal: Expr,
        ) -> None:
            """out[first_row : first_row + rows, first_col : first_col + cols] of this
            step's matrix (rows counted within it): the tile's start, its sums over ks =
            (first k, steps) and its epilogue for stage "whole"; the start alone, the sums
            alone or the epilogue alone for "start", "sums" and "finish", as a product
            whose k runs in blocks calls them. A packed b's last panel, when the columns
            end inside it, is summed at the panel's whole width (its columns past n are
            zeros) in a scratch tile, and only its first columns are stored: a loop of
            the few columns would run masked, its sums stored and reloaded at every
            sweep. `ordinal`: the block's place among those its thread runs over the
            tile, which says what it fetches ahead (_panels_ahead)."""
            start, finish = stage in ("whole", "start"), stage in ("whole", "finish")
            parts = _column_parts(cols, p.b_panel)
            ragged = [(first, width) for first, width in parts if p.b_panel and width < p.b_panel]
            parts = [part for part in parts if part not in ragged]
            a_rows = [a_mat + (first_row + i) * kk for i in range(rows)]
            out_rows = [matrix * m + first_row + i for i in range(rows)]  # among all matrices' rows
            panel = p.b_panel or 0
            tails = {first: k.scratch("panel_tail", out.dtype, (rows * panel,)) for first, _ in ragged}
            # the whole panels' sums, in a scratch tile indexed by constants, which LLVM
            # keeps in registers over the k loop (as a convolution's tile): summed in
            # `out`, they stayed in registers only where LLVM proved out's tile apart
            # from a and b, and in some step orders it did not (each sweep reloaded and
            # stored them: 1.3x slower)
            summing = stage in ("whole", "sums")
            sums = k.scratch("sums", out.dtype, (rows * cols,)) if summing and parts else None
            for first, width in parts if start or summing else ():
                with k.loop(width, vector_kind(width, lanes), "n") as jj:
                    j = first_col + first + jj
                    for i, row in enumerate(out_rows):
                        value = p.initial(first_row + i, j) if start else out.load_flat(row * n + j)
                        if sums is None:
                            k.store(out, row * n + j, value)
                        else:
                            k.store(sums, i * cols + first + jj, value)
            for acc in tails.values():
                with k.loop(panel, LoopKind.TILE, "n") as jj:
                    for i in range(rows):
                        k.store(acc, i * panel + jj, k_const(out, 0.0))

            def b_start(at_k: Expr, first: int) -> Expr:
                """Where the tile's columns from `first` on start in b's row at_k."""
                if b_copy is not None:
                    return (at_k - ks[0]) * col_tile + first  # the copy starts at the sweep's first k
                return p.b_index(b_mat, at_k, first_col + first)

            def sweep(first_k: Expr, steps: int) -> None:
                coeffs = [[a.load_flat(a_row + first_k + u) for u in range(steps)] for a_row in a_rows]
                for first, width in parts:
                    b_rows = [b_start(first_k + u, first) for u in range(steps)]
                    with k.loop(width, vector_kind(width, lanes), "n") as jj:
                        at_sums = [i * cols + first + jj for i in range(rows)]
                        held = [k.local(out.dtype, sums.load_flat(at), "sum") for at in at_sums]
                        for u, at in enumerate(b_rows):  # per k step, b's vector meets every row
                            bv = k.local(b.dtype, b_source.load_flat(at + jj), "b").ref
                            for row_coeffs, acc in zip(coeffs, held):
                                k.assign(acc, muladd(row_coeffs[u], bv, acc.ref))
                        for at, acc in zip(at_sums, held):
                            k.store(sums, at, acc.ref)
                if rows_ahead:  # the next block's rows, as many floats a k step as its rows
                    for u in range(steps):
                        upcoming = a_mat + (first_row + rows) * kk + (first_k + u) * rows
                        k.prefetch(a, minimum(upcoming, a.numel - 1))
                for offset in ahead:  # lines of the next tile's panels, one a k step each
                    for u in range(steps):
                        k.prefetch(b, b_start(first_k + u, 0) + offset.ref)
                for first, acc in tails.items():
                    b_rows = [p.b_index(b_mat, first_k + u, first_col + first) for u in range(steps)]
                    with k.loop(panel, LoopKind.TILE, "n") as jj:
                        for u, b_row in enumerate(b_rows):
                            bv = k.local(b.dtype, b.load_flat(b_row + jj), "b").ref
                            for i, row_coeffs in enumerate(coeffs):
                                at = i * panel + jj
                                k.store(acc, at, muladd(row_coeffs[u], bv, acc.load_flat(at)))

            ahead = (
                _panels_ahead(k, p, first_col, col_tile, ordinal, row_steps * group)
                if (split.fetch_ahead and summing)
                else []
            )
            if summing:
                first_k, steps = ks
                k_sweeps(k, steps, lambda at, count: sweep(first_k + at, count))
            if sums is not None or (epilogue is not None and finish):  # the finished tile, in L1
                for first, width in parts:
                    with k.loop(width, vector_kind(width, lanes), "n") as jj:
                        j = first_col + first + jj
                        for i, row in enumerate(out_rows):
                            at = row * n + j
                            source, index = (out, at) if sums is None else (sums, i * cols + first + jj)
                            value = source.load_flat(index)
                            if epilogue is not None and finish:
                                value = epilogue(value, at, p.epilogue_index(row, j))
                            k.store(out, at, value)
            for first, width in ragged:
                with k.loop(width, vector_kind(width, lanes), "n") as jj:
                    j = first_col + first + jj
                    for i, row in enumerate(out_rows):
                        at = row * n + j
                        value = p.initial(first_row + i, j) + tails[first].load_flat(i * panel + jj)
                        if epilogue is not None:
                            value = epilogue(value, at, p.epilogue_index(row, j))
                        k.store(out, at, value)

        def each_block(first_col: Expr, cols: int, ks: tuple[Expr, int], stage: str) -> None:
            """block(...) for every block in the group (and the rows past the last whole
            block, in the matrix's last group)."""
            with k.loop(group, LoopKind.SERIAL, "block") as q:
                first_row = (grp % groups_per_matrix * group + q) * rows_per_block
                block(first_row, rows_per_block, first_col, cols, ks, stage, grp * group + q)
            if tail_rows:
                last_group = (
                    nullcontext()
                    if groups_per_matrix == 1
                    else k.when((grp % groups_per_matrix).eq(groups_per_matrix - 1))
                )
                with last_group:
                    rest_row = const(blocks_per_matrix * rows_per_block, "int64")
                    block(rest_row, tail_rows, first_col, cols, ks, stage, const(row_steps * group, "int64"))

        def copy(first_col: Expr, cols: int, first_k: Expr, steps: int) -> None:
            """b's rows first_k .. first_k + steps of the tile's columns to b_copy."""
            with k.loop(steps, LoopKind.SERIAL, "k") as t, k.loop(cols, vector_kind(cols, lanes), "n") as jj:
                k.store(b_copy, t * col_tile + jj, b.load_flat(p.b_index(b_mat, first_k + t, first_col) + jj))

        def tile(first_col: Expr, cols: int) -> None:
            """Columns first_col : first_col + cols of every block in the group. Where b
            is copied and its k rows are more than a copy holds, k runs in blocks of
            them: each copied once, then swept by every block of the group from L1."""
            zero = const(0, "int64")
            if b_copy is None or kk <= k_block:
                if b_copy is not None:
                    copy(first_col, cols, zero, kk)
                each_block(first_col, cols, (zero, kk), "whole")
                return
            each_block(first_col, cols, (zero, 0), "start")
            full, rest = divmod(kk, k_block)
            with k.loop(full, LoopKind.SERIAL, "k_block") as kb:
                copy(first_col, cols, kb * k_block, k_block)
                each_block(first_col, cols, (kb * k_block, k_block), "sums")
            if rest:
                copy(first_col, cols, const(full * k_block, "int64"), rest)
                each_block(first_col, cols, (const(full * k_block, "int64"), rest), "sums")
            each_block(first_col, cols, (zero, 0), "finish")

        if chunk is not None:  # this step's share of the column tiles, or the columns after them
            with k.when(chunk.lt(chunks)) if tail_part else nullcontext():
                with k.loop(tiles // chunks, LoopKind.SERIAL, "cols") as t:
                    tile((chunk * (tiles // chunks) + t) * col_tile, col_tile)
            if tail_part:
                with k.when(chunk.eq(chunks)):
                    tile(const(tiles * col_tile, "int64"), tail)
            return
        if tiles:
            with k.loop(tiles, LoopKind.SERIAL, "cols") as t:
                tile(t * col_tile, col_tile)
        if tail and p.b_panel is not None:  # the last panels' columns, in their own parts
            tile(const(tiles * col_tile, "int64"), tail)
        elif tiles and tail:
            # one more whole tile, ending at the last column: it computes a few columns
            # again (the same sums, the same values), which costs less than a masked tile
            tile(const(n - col_tile, "int64"), col_tile)
        elif tail:  # narrower than a tile: whole vectors (in registers), then the rest masked
            whole = tail - tail % lanes
            for first, cols in ((0, whole), (whole, tail - whole)):
                if cols:
                    tile(const(first, "int64"), cols)


#: GPU product tiles (rows, columns, k step, rows per thread, columns per thread): large
#: products, middling ones, and products of a few rows (a batch-1 Dense layer)
GEMM_TILES = {"large": (128, 128, 8, 8, 8), "middle": (64, 64, 16, 4, 4), "few_rows": (16, 128, 16, 1, 8)}


def _gemm_tile(m: int, n: int) -> tuple[int, int, int, int, int]:
    if m <= 16:
        return GEMM_TILES["few_rows"]
    return GEMM_TILES["large" if m >= 128 and n >= 128 else "middle"]


def lower_matmul_gpu(k: KernelBuilder, p: Product, epilogue: Epilogue | None) -> None:
    """The product as a GPU kernel, tiled through shared memory with register blocking.

    A block computes a BM x BN tile of one matrix of the batch (grid x: column tiles,
    y: row tiles, z: the batch) with (BM/TM) x (BN/TN) threads. It steps over k in
    slices of BK: the block copies the slice of a (BM x BK, stored transposed with a
    padding column so the copy's writes and the reads below hit distinct banks) and of
    b (BK x BN) into shared memory, consecutive threads reading consecutive elements
    of a row (coalesced), waits, and each thread accumulates its TM x TN sums, in
    registers, from them; it waits again before the next slice overwrites the tiles.
    A thread owns rows ty + i·BM/TM and columns tx + j·BN/TN, so neighbouring threads
    read neighbouring elements of the b tile and store neighbouring columns. Tiles at
    the edges load zeros outside a and b and store only inside out. The bias is added
    to the finished sums, then the epilogue, as they are stored."""
    a, b, out = p.a, p.b, p.out
    batch, m, kk, n, _, a_batch, b_batch = _matmul_shapes(a.shape, p.b_shape)
    bm, bn, bk, tm, tn = _gemm_tile(m, n)
    rows_t, cols_t = bm // tm, bn // tn  # threads along the tile's rows and columns
    threads = rows_t * cols_t
    a_tile = k.shared("a_tile", a.dtype, (bk * (bm + 1),))  # [k][row], one column of padding
    b_tile = k.shared("b_tile", b.dtype, (bk * bn,))  # [k][column]
    grid = (-(-n // bn), -(-m // bm), prod(batch))
    with gpu.grid(k, grid, (threads,)) as ((bx, by, bz), (t,)):
        tx, ty = t % cols_t, t // cols_t
        row0, col0 = by * bm, bx * bn
        a_mat = _batch_offset(bz, batch, a_batch, m * kk)
        b_mat = _batch_offset(bz, batch, b_batch, kk * n)
        rows = [row0 + ty + i * rows_t for i in range(tm)]
        cols = [col0 + tx + j * cols_t for j in range(tn)]
        acc = [[k.local(out.dtype, 0.0, "acc") for _ in cols] for _ in rows]
        with k.loop(-(-kk // bk), LoopKind.SERIAL, "kt") as kt:
            k0 = kt * bk
            for first in range(0, bm * bk, threads):  # the a slice, k fastest
                e = t + first
                r, q = e // bk, e % bk
                inside = logical_and(logical_and(e.lt(bm * bk), (row0 + r).lt(m)), (k0 + q).lt(kk))
                with k.when(e.lt(bm * bk)):
                    value = masked_load(a, a_mat + (row0 + r) * kk + k0 + q, inside)
                    k.store(a_tile, q * (bm + 1) + r, value)
            for first in range(0, bk * bn, threads):  # the b slice, columns fastest
                e = t + first
                q, c = e // bn, e % bn
                inside = logical_and(logical_and(e.lt(bk * bn), (k0 + q).lt(kk)), (col0 + c).lt(n))
                with k.when(e.lt(bk * bn)):
                    k.store(b_tile, q * bn + c, masked_load(b, p.b_index(b_mat, k0 + q, col0 + c), inside))
            k.barrier()
            with k.loop(bk, LoopKind.SERIAL, "kk") as q:
                a_frag = [
                    k.local(a.dtype, a_tile.load_flat(q * (bm + 1) + ty + i * rows_t), "a") for i in range(tm)
                ]
                b_frag = [
                    k.local(b.dtype, b_tile.load_flat(q * bn + tx + j * cols_t), "b") for j in range(tn)
                ]
                for i in range(tm):
                    for j in range(tn):
                        k.assign(acc[i][j], muladd(a_frag[i].ref, b_frag[j].ref, acc[i][j].ref))
            k.barrier()
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                with k.when(logical_and(r.lt(m), c.lt(n))):
                    at = (bz * m + r) * n + c
                    value = acc[i][j].ref + p.initial(r, c) if p.bias is not None else acc[i][j].ref
                    if epilogue is not None:
                        value = epilogue(value, at, p.epilogue_index(bz * m + r, c))
                    k.store(out, at, value)


@contextmanager
def whole_vectors(k: KernelBuilder, n: int, name: str) -> Iterator[Expr]:
    """Indices 0 .. n-1 in vector loops of whole registers, for a body whose stores may
    be repeated (it computes each index from operands it does not write): n longer
    than a vector and not a multiple of its lanes ends with one more vector that ends
    at n - 1 (a few indices computed twice, the same values) instead of a masked loop,
    whose masked stores are slow on AVX2; n shorter than a vector is masked."""
    lanes = k.unit.lanes
    if n % lanes == 0 or n < lanes:
        with k.loop(n, LoopKind.VECTOR if n % lanes == 0 else LoopKind.VECTOR_MASKED, name) as i:
            yield i
        return
    with k.loop(-(-n // lanes), LoopKind.SERIAL, f"{name}_run") as run:
        first = minimum(run * lanes, const(n - lanes, "int64"))
        with k.loop(lanes, LoopKind.VECTOR, name) as lane:
            yield first + lane


def matmul_rows(
    unit: VectorUnit, m: int, macs: int, n: int = MATMUL_COL_TILE, matrices: int | None = None
) -> tuple[int, int]:
    """(R, rest): a product's m rows (of n columns) as blocks of R rows and `rest` more.
    On AVX-512, AVX512_WIDE_ROWS rows of a 64-column tile, or AVX512_MATMUL_SUMS sums
    where n is narrower (16 rows of one vector: ResNet-18's layer4 at batch 1, Winograd
    planes of 16 columns); R the widest of those that divides m, or where it does not,
    blocks of R and the rest (Winograd's 65 rows per plane as blocks of one row, each
    vector of b loaded for 4 FMAs, ran at 21% of the FMA peak; 4096 rows as blocks of 4
    rather than 6 and a rest of 4, the transformer's products at batch 32 3-10% slower).
    On a smaller unit AVX2_MATMUL_ROWS: 6 x 16 sums are 12 of AVX2's 16
    registers, two of b's vectors and a broadcast the rest, and 12 chains of FMAs hide
    the FMA's latency (4 x 16, 8 chains, ran at 55% of the peak: the latency bound).
    The rows past the last block are a block of their own, whose code costs compile
    time (a third more LLVM time in a small model's training step), so a product of
    fewer than MATMUL_REST_MACS multiply-adds takes the largest block that divides its
    rows. Where the blocks of `matrices` such products are parallel steps that threads
    share, blocks of AVX512_WIDE_ROWS need AVX512_WIDE_MIN_BLOCKS of them (else 4 rows;
    on one thread the MLP at batch 32 ran 5% faster in blocks of 6, on two 7% slower);
    blocks of one thread (matrices None) take them wherever they fit."""
    if unit == AVX512:
        vectors = min(MATMUL_COL_TILE // unit.lanes, -(-max(n, 1) // unit.lanes))  # of a row
        wide = vectors * unit.lanes == MATMUL_COL_TILE
        if wide and (matrices is None or matrices * (m // AVX512_WIDE_ROWS) >= AVX512_WIDE_MIN_BLOCKS):
            widest = AVX512_WIDE_ROWS
        else:
            widest = AVX512_MATMUL_SUMS // vectors
        dividing = next(r for r in (widest, *MATMUL_ROW_BLOCKS) if r <= widest and m % r == 0)
        if dividing < widest and m > widest and macs >= MATMUL_REST_MACS:
            return widest, m % widest
        return dividing, 0
    if m < AVX2_MATMUL_ROWS:
        return m, 0
    if macs < MATMUL_REST_MACS:
        return next(r for r in (AVX2_MATMUL_ROWS, *MATMUL_ROW_BLOCKS) if m % r == 0), 0
    return AVX2_MATMUL_ROWS, m % AVX2_MATMUL_ROWS


def matmul_k_unroll(unit: VectorUnit) -> int:
    """k steps a product's sweep unrolls. LLVM's scheduler loads a sweep's broadcasts at
    its top, and on AVX-512 sweeps of 8 (32 broadcasts beside 16 sums and 4 vectors of
    b) spilled some; sweeps of 4 ran 2-5% faster there (the MLP, the transformer and
    ResNet-18 at batch 1 and the LSTM at batch 32), and the same as 8 on AVX2."""
    return AVX512_MATMUL_K_UNROLL if unit == AVX512 else MATMUL_K_UNROLL


def k_sweeps(k: KernelBuilder, steps: int, sweep: Callable[[Expr, int], None]) -> None:
    """sweep(first k, steps) over k in [0, steps): a loop of sweeps of matmul_k_unroll
    steps, then one of the rest."""
    unroll = matmul_k_unroll(k.unit)
    full, rest = divmod(steps, unroll)
    if full:
        with k.loop(full, LoopKind.SERIAL, "k") as ks:
            sweep(ks * unroll, unroll)
    if rest:
        sweep(const(full * unroll, "int64"), rest)


def matmul_col_tile(unit: VectorUnit, rows: int) -> int:
    """Output columns a block of `rows` rows computes together: a tile small enough for
    LLVM to keep in vector registers over the whole k loop (loaded and stored once).
    On AVX-512, MATMUL_COL_TILE columns for up to AVX512_WIDE_ROWS rows (a's broadcasts
    are FMA operands there), for more rows AVX512_MATMUL_SUMS sums. On a smaller unit the sums
    take half the registers, as b's vectors and a broadcast take the rest, and at least
    a panel (MATMUL_VECTOR columns): on AVX2 6 x 16 (and 5, 4, 3 rows), 2 x 32, 1 x 64
    (a batch-1 row needs 8 sums in flight to hide the FMA latency; 1 x 16 ran 2x
    slower)."""
    if unit == AVX512:
        if rows <= AVX512_WIDE_ROWS:
            return MATMUL_COL_TILE
        return max(1, AVX512_MATMUL_SUMS // rows) * unit.lanes
    return max(MATMUL_VECTOR, unit.lanes * (unit.registers // 2 // rows))


def vector_kind(width: int, lanes: int) -> LoopKind:
    """A product tile's column loop: whole vectors are a `tile` loop (one wide vector,
    its registers side by side) where LLVM takes the width (a power of two)."""
    if width % lanes:
        return LoopKind.VECTOR_MASKED
    return LoopKind.TILE if width & (width - 1) == 0 else LoopKind.VECTOR


def tiled_product(
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


def _column_parts(cols: int, panel: int | None) -> list[tuple[int, int]]:
    """(first, width) of each vector loop a column tile of `cols` columns runs: one, or
    one per panel of a packed b (each reads its panel's contiguous row)."""
    if panel is None:
        return [(0, cols)]
    return [(first, min(panel, cols - first)) for first in range(0, cols, panel)]


def masked_load(buf: Buffer, index: Expr, inside: Expr) -> Expr:
    """buf at index where `inside` holds, else 0, never reading outside buf."""
    return select(inside, buf.load_flat(select(inside, index, const(0, "int64"))), k_const(buf, 0.0))


@dataclasses.dataclass(frozen=True)
class _ColumnSplit:
    """How a product's parallel steps split b's column tiles: `chunks` parts of the
    tiles (1: every step sweeps all of them), and `row_parts` shares of the row steps,
    one per thread, each running its rows over every part in turn (1: the steps go part
    by part, so a thread's contiguous share of them holds its own columns of b)."""

    chunks: int = 1
    row_parts: int = 1
    #: tile by tile on one thread, the next tile's panels fetched while a tile's row
    #: steps run (_panels_ahead)
    fetch_ahead: bool = False


def _column_split(
    row_steps: int,
    n: int,
    col_tile: int,
    threads: int = 1,
    streamed: bool = False,
    packed: bool = False,
    a_bytes: int = 0,
) -> _ColumnSplit:
    """Where the columns end inside a tile, only a packed b's split (the columns after
    the whole tiles are one more part, lower_matmul's). Otherwise:
    - where the rows give fewer than MATMUL_MIN_STEPS steps (a batch-1 Dense layer: one
      row), the fewest equal parts that make MATMUL_MIN_STEPS steps, so every thread
      streams its own columns of b once; on one thread, or where the columns end inside
      a tile, a part per tile, the finest steps for their alternating order
      (kir.Kernel.alternate_steps: the MLP at batch 1 on one thread 0.084-0.087 -> 0.069
      ms with the order alternating in parts of 2 tiles, 0.070 -> 0.068 in parts of 1;
      a classifier of 1000 classes at batch 1 had run on one thread of two);
    - where b is packed and `streamed` (few rows meet each of its values: see
      MATMUL_STREAM_ROWS) and its tiles split evenly between the threads, one part per
      thread: each thread reads its part of b and all of the few rows of a, rather than
      all of b and its part of a, and constant weights' part stays in its core's L2
      across calls (the MLP at batch 32 on two threads, whose 2.7 MB of weights no one
      core's 2 MB L2 holds but each half does: 0.172 -> 0.152 ms);
    - where b is packed, the threads share the row steps evenly and each share of a's
      rows stays in L2 (MATMUL_ROWS_CACHED_BYTES; `a_bytes` all of them), a part per
      tile and a share of the rows per thread: each thread runs its rows tile by tile,
      so a tile's panel of b comes from memory once and from cache for each of its row
      groups after, which read a's rows from L2 (row groups sweeping every tile read a
      model's weights, which no core's L2 holds across its layers, from L3 as they
      went: the LSTM at batch 32 12.70-12.99 -> 12.41-12.52 ms and the transformer at
      batch 1 6.36-6.42 -> 6.28-6.33 on one thread, the same on two). `streamed`
      products only on one thread, where the next tile's panels are fetched while a
      tile's row blocks run (`fetch_ahead`, _panels_ahead: the MLP at batch 32 on one
      thread 0.292-0.297 -> 0.278-0.282 ms, 3% slower tile by tile without it; the
      transformer at batch 1 6.06-6.12 -> 5.84-5.87). Not on two threads: there the
      fetches' index arithmetic made LLVM leave one product's sums in memory (the
      transformer's 256 -> 768 product at batch 1, 10% slower);
    - else 1."""
    tiles, tail = divmod(n, col_tile)
    if tiles < 2 or (tail and not packed):
        return _ColumnSplit()
    if row_steps < MATMUL_MIN_STEPS:
        if threads == 1 or tail:
            return _ColumnSplit(tiles)
        divisors = [d for d in range(2, tiles + 1) if tiles % d == 0]
        return _ColumnSplit(next((d for d in divisors if row_steps * d >= MATMUL_MIN_STEPS), tiles))
    if streamed and threads > 1 and tiles % threads == 0 and not tail:
        return _ColumnSplit(threads)
    rows_cached = a_bytes <= MATMUL_ROWS_CACHED_BYTES * threads
    if packed and (threads == 1 or not streamed) and row_steps % threads == 0 and rows_cached:
        return _ColumnSplit(tiles, threads, fetch_ahead=threads == 1)
    return _ColumnSplit()


def _panels_ahead(
    k: KernelBuilder, p: Product, first_col: Expr, col_tile: int, ordinal: Expr, blocks: int
) -> list[Local]:
    """What block `ordinal` of the `blocks` a thread runs over a tile (tile by tile)
    fetches ahead, as offsets in a packed b from the tile's first panel at each k step
    of its sweeps, a line a k step for each: its share of the next tile's panels (block
    j panels j, j + blocks, ...), so that they are in cache when the next tile's first
    block starts; without it that block read them from L3 at the speed of its few FMAs
    a line. Blocks past the panels, and a tile with none after it, fetch their own
    tile's line (in cache: no traffic)."""
    panels, kk, panel = p.b.shape  # packed by pack_panels
    offsets = []
    for first in range(0, col_tile // panel, blocks):
        which = ordinal + first
        ahead = col_tile + which * panel  # columns from the tile's first to the panel's
        inside = logical_and(which.lt(col_tile // panel), (first_col + ahead + panel).le(panels * panel))
        offsets.append(k.local("int64", select(inside, ahead * kk, const(0, "int64")), "ahead"))
    return offsets


def _step_at(step: Expr, row_steps: int, parts: int, row_parts: int) -> tuple[Expr, Expr]:
    """(row step, column part) of a parallel step: part by part, each part's row steps
    in turn, within each of row_parts shares of the row steps."""
    per = row_steps // row_parts
    share, within = step // (parts * per), step % (parts * per)
    return share * per + within % per, within // per


def _row_group(blocks: int, matrices: int) -> int:
    """Row blocks per parallel step: as many as share a column panel of b well (up to
    MATMUL_ROW_GROUP), while leaving at least MATMUL_MIN_STEPS parallel steps where the
    product is big enough to have them."""
    divisors = [g for g in range(1, min(blocks, MATMUL_ROW_GROUP) + 1) if blocks % g == 0]
    enough = [g for g in divisors if matrices * blocks // g >= MATMUL_MIN_STEPS]
    return max(enough) if enough else 1


def _trailing_axes(shape: tuple[int, ...], size: int) -> int:
    """How many trailing axes of shape hold `size` elements (a row of a product's output)."""
    for count in range(1, len(shape) + 1):
        if prod(shape[-count:]) == size:
            return count
    raise ValueError(f"no trailing axes of {shape} hold {size} elements")


def k_const(buf: Buffer, value: float) -> Expr:
    return const(value, buf.dtype)


@register("matmul", Fusion.CONTRACTION)
class MatMul(ProductOp):
    arity = (2, 2)

    def batch_axis(self, ins, out, batch):
        return matmul_batch(ins[0], ins[1], out, batch[0], batch[1])

    def infer(self, a: TensorType, b: TensorType) -> TensorType:
        _require_float("matmul", a, b)
        return TensorType(a.dtype, _matmul_shapes(a.shape, b.shape)[4])

    def reference(self, a, b):
        return np.matmul(a, b)

    def product(self, ins, out):
        a, b = ins[0], ins[1]
        if len(a.shape) >= 2 and len(b.shape) >= 2:
            return Product(a, b, out)
        batch, m, _, n, _, _, _ = _matmul_shapes(a.shape, b.shape)  # a squeezed operand
        return Product(a, b, out.view((*batch, m, n)), flat_epilogue=True)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, y = node.inputs
        if x.type.rank < 2 or y.type.rank < 2:
            raise GraphError(f"node {node.name}: the matmul gradient needs operands of rank >= 2")
        gx = b.matmul(g, swap_last(b, y))
        gy = b.matmul(swap_last(b, x), g)
        return [unbroadcast(b, gx, x.type.shape), unbroadcast(b, gy, y.type.shape)]


@register("linear", Fusion.CONTRACTION)
class Linear(ProductOp):
    """x @ w + bias, w of shape (in, out) as in a Keras Dense kernel."""

    arity = (2, 3)

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis != ins[0].rank - 1, "the product contracts")

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("linear", x, w, *([bias] if bias else []))
        if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[0]:
            raise GraphError(f"linear: x {x.shape} @ w {w.shape}: w must be (in={x.shape[-1:]}, out)")
        if bias is not None and bias.shape != (w.shape[1],):
            raise GraphError(f"linear: bias shape {bias.shape}, expected ({w.shape[1]},)")
        return TensorType(x.dtype, x.shape[:-1] + (w.shape[1],))

    def reference(self, x, w, bias=None):
        y = np.matmul(x, w)
        return y + bias if bias is not None else y

    def product(self, ins, out):
        x, w = ins[0], ins[1]
        rows = prod(x.shape[:-1])
        bias = ins[2] if len(ins) > 2 else None
        return Product(
            x.view((rows, x.shape[-1])), w, out.view((rows, out.shape[-1])), bias, out_shape=out.shape
        )

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x, w = node.inputs[0], node.inputs[1]
        rows = x.type.numel // x.type.shape[-1]
        gx = b.matmul(g, b.transpose(w, perm=(1, 0)))
        x2 = b.reshape(x, shape=(rows, x.type.shape[-1]))
        g2 = b.reshape(g, shape=(rows, g.type.shape[-1]))
        gw = b.matmul(b.transpose(x2, perm=(1, 0)), g2)
        grads: Grads = [gx, gw]
        if len(node.inputs) > 2:
            grads.append(b.reduce_sum(g2, axes=(0,), keepdims=False))
        return grads


@register("linear_packed", Fusion.CONTRACTION)
class LinearPacked(ProductOp):
    """x @ w + bias for a constant w packed by pack_panels into panels of MATMUL_VECTOR
    columns, (panels, in, MATMUL_VECTOR): the CPU's linear of constant weights (a
    compiler pass makes it), whose column tiles stream contiguous panel rows."""

    differentiation = Gradient.NONE  # made by a compiler pass, for constant weights only
    arity = (2, 3)
    out_features: int = 1

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("linear_packed", x, w, *([bias] if bias else []))
        n = self.out_features
        if w.rank != 3 or x.rank < 1 or x.shape[-1] != w.shape[1] or w.shape[2] != MATMUL_VECTOR:
            raise GraphError(
                f"linear_packed: x {x.shape} against packed w {w.shape}: "
                f"w must be (panels, {x.shape[-1:]}, {MATMUL_VECTOR})"
            )
        if not (w.shape[0] - 1) * MATMUL_VECTOR < n <= w.shape[0] * MATMUL_VECTOR:
            raise GraphError(f"linear_packed: panels {w.shape} do not hold {n} columns")
        if bias is not None and bias.shape != (n,):
            raise GraphError(f"linear_packed: bias shape {bias.shape}, expected ({n},)")
        return TensorType(x.dtype, x.shape[:-1] + (n,))

    def reference(self, x, w, bias=None):
        return Linear().reference(x, unpack_panels(w, self.out_features).T, bias)

    def product(self, ins, out):
        return dataclasses.replace(Linear().product(ins, out), b_panel=MATMUL_VECTOR)


@register("pack_panels", Fusion.INJECTIVE)
class PackPanels(PerElement):
    """A matrix (K, N) computed at run time, packed as pack_panels packs constant
    weights: (N / MATMUL_VECTOR, K, MATMUL_VECTOR), N a multiple of MATMUL_VECTOR. A
    large product whose b is an activation (a gradient's, a matmul of two inputs) reads
    it packed once, through linear_packed, rather than copying a panel of it per step."""

    differentiation = Gradient.NONE  # made by a compiler pass, for products it speeds

    def infer(self, x: TensorType) -> TensorType:
        if x.rank != 2 or x.shape[1] % MATMUL_VECTOR:
            raise GraphError(f"pack_panels: {x.shape} is not a matrix of whole {MATMUL_VECTOR}-column panels")
        return x.with_shape((x.shape[1] // MATMUL_VECTOR, x.shape[0], MATMUL_VECTOR))

    def reference(self, x):
        return pack_panels(np.ascontiguousarray(x.T), MATMUL_VECTOR)

    def element(self, k, ins, idx):
        panel, row, lane = idx
        return ins[0][[row, panel * MATMUL_VECTOR + lane]]


# --------------------------------------------------------------------------- conv and pooling


def _pair(op: str, name: str, v: tuple[int, ...], n: int = 2) -> tuple[int, ...]:
    if len(v) != n or any(int(x) != x for x in v):
        raise GraphError(f"{op}: {name} must be {n} integers, got {v}")
    return tuple(int(x) for x in v)


def _window_out(op, size, k, s, d, p0, p1):
    span = d * (k - 1) + 1
    out = (size + p0 + p1 - span) // s + 1
    if out < 1:
        raise GraphError(f"{op}: window {span} larger than padded input {size + p0 + p1}")
    return out


def _valid_range(k_off: int, stride: int, pad: int, size: int, out: int) -> tuple[int, int]:
    """The output positions o for which o*stride + k_off - pad lies inside [0, size)."""
    lo = max(0, -((k_off - pad) // stride))  # ceil((pad - k_off) / stride)
    hi = min(out, (size - 1 + pad - k_off) // stride + 1)
    return lo, max(lo, hi)


def _conv_weight_gradient(
    b: GraphBuilder, windowed: Value, other: Value, kernel, strides, pads, dilations, w_shape
) -> Value:
    """A convolution's weight gradient, w[other channel, windowed channel, i, j]: Σ over
    images and positions of `other` times `windowed`'s windows (im2col, as the forward
    conv reads them), one matmul_nt_sum over the positions both hold innermost. For
    conv2d, windowed = x and other = g; for its adjoint conv_transpose2d, the two trade
    places."""
    n, c = windowed.type.shape[:2]
    o = other.type.shape[1]
    positions = other.type.numel // (n * o)
    cols = b.im2col(windowed, kernel=tuple(kernel), strides=strides, pads=pads, dilations=dilations)
    cols = b.reshape(cols, shape=(n, c * kernel[0] * kernel[1], positions))
    summed = b.op("matmul_nt_sum", b.reshape(other, shape=(n, o, positions)), cols)  # (o, c·kh·kw)
    return b.reshape(summed, shape=w_shape)


@register("conv2d", Fusion.CONTRACTION)
class Conv2d(Op):
    """NCHW convolution; w is (out_channels, in_channels / groups, kh, kw)."""

    gpu_per_iteration = True

    arity = (2, 3)
    accepts_epilogue = True
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, ...] = (1, 1)
    groups: int = 1

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis == 0, "is not N of NCHW")

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("conv2d", x, w, *([bias] if bias else []))
        if x.rank != 4 or w.rank != 4:
            raise GraphError(f"conv2d: x and w must be rank 4 (NCHW, OIHW), got {x.shape}, {w.shape}")
        s, d = _pair("conv2d", "strides", self.strides), _pair("conv2d", "dilations", self.dilations)
        p = _pair("conv2d", "pads", self.pads, 4)
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        if self.groups < 1 or c % self.groups or o % self.groups or cg != c // self.groups:
            raise GraphError(
                f"conv2d: {c} input channels, {o} filters of {cg} channels, groups={self.groups} disagree"
            )
        if bias is not None and bias.shape != (o,):
            raise GraphError(f"conv2d: bias shape {bias.shape}, expected ({o},)")
        oh = _window_out("conv2d", h, kh, s[0], d[0], p[0], p[2])
        ow = _window_out("conv2d", wd, kw, s[1], d[1], p[1], p[3])
        return TensorType(x.dtype, (n, o, oh, ow))

    def reference(self, x, w, bias=None):
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilations, self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
        out = np.zeros((n, o, oh, ow), dtype=np.float64)
        og = o // self.groups
        for g in range(self.groups):
            xg = xp[:, g * cg : (g + 1) * cg].astype(np.float64)
            wg = w[g * og : (g + 1) * og].astype(np.float64)
            for i in range(kh):
                for j in range(kw):
                    patch = xg[
                        :,
                        :,
                        i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                        j * dw : j * dw + sw * (ow - 1) + 1 : sw,
                    ]
                    out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
        if bias is not None:
            out += bias.reshape(1, -1, 1, 1)
        return out.astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        """Per (image, filter): start from the bias, then for each input channel and tap
        add w * the shifted input plane over the output positions whose input is inside
        (computed at compile time), so padding costs no test in the inner loop."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        _, _, oh, ow = out.shape
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.strides, self.dilations, self.pads
        per_group = o // self.groups
        with k.loop(n * o, LoopKind.PARALLEL, "no") as p:
            ni, oi = p // o, p % o
            with k.loop(oh * ow, LoopKind.VECTOR, "s") as s:
                init = bias.load_flat(oi) if bias is not None else k_const(out, 0.0)
                k.store(out, p * (oh * ow) + s, init)
            with k.loop(cg, LoopKind.SERIAL, "c") as ci:
                channel = (ni * c + oi // per_group * cg + ci) * (h * wd)
                for i in range(kh):
                    oh_lo, oh_hi = _valid_range(i * dh, sh, pt, h, oh)
                    for j in range(kw):
                        ow_lo, ow_hi = _valid_range(j * dw, sw, pl, wd, ow)
                        if oh_lo >= oh_hi or ow_lo >= ow_hi:
                            continue
                        tap = w.load_flat(((oi * cg + ci) * kh + i) * kw + j)
                        with k.loop(oh_hi - oh_lo, LoopKind.SERIAL, "y") as y:
                            row_out = p * (oh * ow) + (y + oh_lo) * ow
                            row_in = channel + ((y + oh_lo) * sh + i * dh - pt) * wd
                            with k.loop(ow_hi - ow_lo, LoopKind.VECTOR, "x") as xx:
                                at = row_out + ow_lo + xx
                                src = x.load_flat(row_in + (xx + ow_lo) * sw + j * dw - pl)
                                k.store(out, at, muladd(tap, src, out.load_flat(at)))
            if epilogue is not None:  # one more pass over the plane, while it is in L1
                with k.loop(oh * ow, LoopKind.VECTOR, "s") as s:
                    at = p * (oh * ow) + s
                    k.store(out, at, epilogue(out.load_flat(at), at, None))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """dx: w^T @ g at every position, each product added back where its window read x
        (col2im): one matmul of the weights' shape, at any stride; dw: the forward pass's
        windows (im2col) times g; dbias: g summed over batch and positions."""
        x, w = node.inputs[0], node.inputs[1]
        if self.groups != 1:
            raise GraphError(f"node {node.name}: the conv2d gradient supports groups=1 only")
        pads = self.pads
        n, o, oh, ow = g.type.shape
        _, c, kh, kw = w.type.shape
        w_t = b.transpose(b.reshape(w, shape=(o, c * kh * kw)), perm=(1, 0))
        cols = b.matmul(w_t, b.reshape(g, shape=(n, o, oh * ow)))
        gx = b.col2im(
            b.reshape(cols, shape=(n, c * kh * kw, oh, ow)),
            input_shape=x.type.shape,
            kernel=(kh, kw),
            strides=self.strides,
            pads=pads,
            dilations=self.dilations,
        )
        gw = _conv_weight_gradient(b, x, g, (kh, kw), self.strides, pads, self.dilations, w.type.shape)
        grads: Grads = [gx, gw]
        if len(node.inputs) > 2:
            grads.append(b.reduce_sum(g, axes=(0, 2, 3), keepdims=False))
        return grads


def _im2col_ranges(op: Op, x_shape, out_hw):
    """For each (kh, kw) tap: the output rows and columns whose input lies inside."""
    (sh, sw), (dh, dw), (pt, pl, _, _) = op.strides, op.dilations, op.pads
    _, _, h, wd = x_shape
    oh, ow = out_hw
    kh, kw = op.kernel
    return {
        (i, j): (_valid_range(i * dh, sh, pt, h, oh), _valid_range(j * dw, sw, pl, wd, ow))
        for i in range(kh)
        for j in range(kw)
    }


@register("conv_transpose2d", Fusion.CONTRACTION)
class ConvTranspose2d(Op):
    """The gradient of conv2d with respect to its input, used as an upsampling layer:
    each input pixel adds w times itself to a (kh, kw) window of the output, windows
    `strides` apart. w is (in_channels, out_channels / groups, kh, kw), as in ONNX and
    PyTorch; `pads` crop the full result, `output_padding` extends its end."""

    gpu_per_iteration = True

    arity = (2, 3)
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, ...] = (1, 1)
    output_padding: tuple[int, ...] = (0, 0)
    groups: int = 1

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("conv_transpose2d", x, w, *([bias] if bias else []))
        if x.rank != 4 or w.rank != 4:
            raise GraphError(f"conv_transpose2d: x and w must be rank 4, got {x.shape}, {w.shape}")
        s, d = (
            _pair("conv_transpose2d", "strides", self.strides),
            _pair("conv_transpose2d", "dilations", self.dilations),
        )
        p = _pair("conv_transpose2d", "pads", self.pads, 4)
        extra = _pair("conv_transpose2d", "output_padding", self.output_padding)
        c, og, kh, kw = w.shape
        if self.groups < 1 or c != x.shape[1] or c % self.groups:
            raise GraphError(
                f"conv_transpose2d: input has {x.shape[1]} channels, w {c} (groups={self.groups})"
            )
        o = og * self.groups
        if bias is not None and bias.shape != (o,):
            raise GraphError(f"conv_transpose2d: bias shape {bias.shape}, expected ({o},)")
        size = [
            s[a] * (x.shape[2 + a] - 1) + extra[a] + d[a] * (k - 1) + 1 - p[a] - p[a + 2]
            for a, k in enumerate((kh, kw))
        ]
        if min(size) < 1:
            raise GraphError(f"conv_transpose2d: pads {p} leave no output for input {x.shape}")
        return TensorType(x.dtype, (x.shape[0], o, *size))

    def reference(self, x, w, bias=None):
        n, c, h, wd = x.shape
        _, og, kh, kw = w.shape
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilations, self.pads
        cg = c // self.groups
        full = np.zeros(
            (n, og * self.groups, sh * (h - 1) + dh * (kh - 1) + 1 + self.output_padding[0],
             sw * (wd - 1) + dw * (kw - 1) + 1 + self.output_padding[1]),
            np.float64,
        )  # fmt: skip
        for g in range(self.groups):
            xg = x[:, g * cg : (g + 1) * cg].astype(np.float64)
            wg = w[g * cg : (g + 1) * cg].astype(np.float64)
            for i in range(kh):
                for j in range(kw):
                    contribution = np.einsum("nchw,co->nohw", xg, wg[:, :, i, j])
                    full[
                        :, g * og : (g + 1) * og, i * dh : i * dh + sh * (h - 1) + 1 : sh,
                        j * dw : j * dw + sw * (wd - 1) + 1 : sw,
                    ] += contribution  # fmt: skip
        out = full[:, :, pt : full.shape[2] - pb, pl : full.shape[3] - pr]
        if bias is not None:
            out = out + bias.reshape(1, -1, 1, 1)
        return out.astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        """Per output row: start from the bias, then for each input channel and tap add
        w times the input pixel that lands there, where one does (the output position
        minus the tap's offset must fall on the stride grid inside the input)."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c, h, wd = x.shape
        _, og, kh, kw = w.shape
        _, o, oh, ow = out.shape
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.strides, self.dilations, self.pads
        cg = c // self.groups
        with k.loop(n * o * oh, LoopKind.PARALLEL, "row") as r:
            img, oc, y = r // (o * oh), r // oh % o, r % oh
            group, oc_in_group = oc // og, oc % og
            with k.loop(ow, LoopKind.VECTOR, "j") as j:
                k.store(out, [img, oc, y, j], bias[oc] if bias is not None else const(0.0, out.dtype))
            with k.loop(cg, LoopKind.SERIAL, "ic") as ic:
                channel = group * cg + ic
                with k.loop(kh, LoopKind.SERIAL, "ki") as ki:
                    top = y + pt - ki * dh
                    iy = top // sh
                    row_ok = logical_and(logical_and(top.ge(0), (top % sh).eq(0)), iy.lt(h))
                    with k.loop(kw, LoopKind.SERIAL, "kj") as kj:
                        weight = w[[channel, oc_in_group, ki, kj]]
                        with k.loop(ow, LoopKind.VECTOR, "j") as j:
                            left = j + pl - kj * dw
                            ix = left // sw
                            ok = logical_and(
                                row_ok, logical_and(logical_and(left.ge(0), (left % sw).eq(0)), ix.lt(wd))
                            )
                            v = guarded_load(x, [img, channel, iy, ix], ok, 0.0)
                            k.store(out, [img, oc, y, j], muladd(v, weight, out[[img, oc, y, j]]))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """The adjoint of conv2d: dx is the conv2d of g with the same weights; dw pairs g's
        windows (im2col with the same geometry) with x, per image, as conv2d's rule does."""
        x, w = node.inputs[0], node.inputs[1]
        if self.groups != 1:
            raise GraphError(f"node {node.name}: the conv_transpose2d gradient supports groups=1 only")
        gx = b.conv2d(g, w, strides=self.strides, pads=self.pads, dilations=self.dilations)
        gw = _conv_weight_gradient(
            b, g, x, w.type.shape[2:], self.strides, self.pads, self.dilations, w.type.shape
        )
        grads: Grads = [gx, gw]
        if len(node.inputs) > 2:
            grads.append(b.reduce_sum(g, axes=(0, 2, 3), keepdims=False))
        return grads


@register("im2col", Fusion.INJECTIVE)
class Im2Col(Op):
    """Every conv window as a column: out[n, (c, i, j), y, x] = x[n, c, y*s + i*d - p, x*s + j*d - p]
    (zero outside). Turns a convolution into one matrix product (see conv2d_gemm)."""

    gpu_per_iteration = True

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    kernel: tuple[int, ...] = (3, 3)
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    dilations: tuple[int, ...] = (1, 1)

    def infer(self, x: TensorType) -> TensorType:
        _require_float("im2col", x)
        if x.rank != 4:
            raise GraphError(f"im2col: input must be NCHW (rank 4), got {x.shape}")
        kh, kw = _pair("im2col", "kernel", self.kernel)
        s, d = _pair("im2col", "strides", self.strides), _pair("im2col", "dilations", self.dilations)
        p = _pair("im2col", "pads", self.pads, 4)
        oh = _window_out("im2col", x.shape[2], kh, s[0], d[0], p[0], p[2])
        ow = _window_out("im2col", x.shape[3], kw, s[1], d[1], p[1], p[3])
        return x.with_shape((x.shape[0], x.shape[1] * kh * kw, oh, ow))

    def reference(self, x):
        n, c, h, w = x.shape
        kh, kw = self.kernel
        out = self.infer(TensorType.of(x)).shape
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilations, self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        cols = np.empty((n, c, kh, kw, out[2], out[3]), x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[:, :, i, j] = xp[
                    :,
                    :,
                    i * dh : i * dh + sh * (out[2] - 1) + 1 : sh,
                    j * dw : j * dw + sw * (out[3] - 1) + 1 : sw,
                ]
        return cols.reshape(out)

    def lower(self, k, ins, out, epilogue=None):
        """Per (image, channel, tap) a plane: zeros, then the valid rectangle copied."""
        x = ins[0]
        n, c, h, wd = x.shape
        _, _, oh, ow = out.shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.strides, self.dilations, self.pads
        ranges = _im2col_ranges(self, x.shape, (oh, ow))
        with k.loop(n * c, LoopKind.PARALLEL, "plane") as p:
            for (i, j), ((y0, y1), (x0, x1)) in ranges.items():
                dst = (p * (kh * kw) + i * kw + j) * (oh * ow)
                if (y0, y1, x0, x1) != (0, oh, 0, ow):
                    with k.loop(oh * ow, LoopKind.VECTOR, "z") as z:
                        k.store(out, dst + z, k_const(out, 0.0))
                with k.loop(y1 - y0, LoopKind.SERIAL, "y") as y:
                    src_row = p * (h * wd) + ((y + y0) * sh + i * dh - pt) * wd
                    with k.loop(x1 - x0, LoopKind.VECTOR, "x") as xx:
                        src = x.load_flat(src_row + (xx + x0) * sw + j * dw - pl)
                        k.store(out, dst + (y + y0) * ow + x0 + xx, src)


@register("col2im", Fusion.OPAQUE)
class Col2Im(Op):
    """The adjoint of im2col: every column entry added back onto the pixel it was copied
    from, summed where windows overlap. With a matmul before it, the gradient of a
    convolution for its input (w^T @ g, then col2im) at any stride."""

    gpu_per_iteration = True

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    input_shape: tuple[int, ...] = ()  # (N, C, H, W) of the image im2col read
    kernel: tuple[int, ...] = (3, 3)
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    dilations: tuple[int, ...] = (1, 1)

    def _im2col(self) -> Im2Col:
        return Im2Col(kernel=self.kernel, strides=self.strides, pads=self.pads, dilations=self.dilations)

    def infer(self, cols: TensorType) -> TensorType:
        _require_float("col2im", cols)
        if len(self.input_shape) != 4:
            raise GraphError(f"col2im: input_shape must be (N, C, H, W), got {self.input_shape}")
        image = cols.with_shape(tuple(self.input_shape))
        if self._im2col().infer(image).shape != cols.shape:
            raise GraphError(f"col2im: columns {cols.shape} are not im2col's of an image {self.input_shape}")
        return image

    def reference(self, cols):
        n, c, h, w = self.input_shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilations, self.pads
        oh, ow = cols.shape[2:]
        image = np.zeros((n, c, h + pt + pb, w + pl + pr), np.float64)
        taps = cols.reshape(n, c, kh, kw, oh, ow)
        for i in range(kh):
            for j in range(kw):
                image[
                    :, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw
                ] += taps[:, :, i, j]
        return image[:, :, pt : pt + h, pl : pl + w].astype(cols.dtype)

    def lower(self, k, ins, out, epilogue=None):
        """Per image row: zeros, then for each tap whose window row lands on it, the run of
        column entries that lands inside the row added on (contiguous at stride 1)."""
        cols = ins[0]
        _, c, h, w = self.input_shape
        _, _, oh, ow = cols.shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.strides, self.dilations, self.pads
        ranges = _im2col_ranges(self._im2col(), self.input_shape, (oh, ow))
        with k.loop(out.numel // w, LoopKind.PARALLEL, "row") as r:
            plane, y = r // h, r % h
            with k.loop(w, LoopKind.VECTOR, "x") as x:
                k.store(out, r * w + x, k_const(out, 0.0))
            for (i, j), ((y0, y1), (x0, x1)) in ranges.items():
                top = y + (pt - i * dh)
                oy = top // sh
                with k.when(logical_and((top % sh).eq(0), logical_and(oy.ge(y0), oy.lt(y1)))):
                    tap = (plane * (kh * kw) + i * kw + j) * (oh * ow) + oy * ow
                    with k.loop(x1 - x0, LoopKind.VECTOR, "ox") as q:
                        at = r * w + (q + x0) * sw + (j * dw - pl)
                        k.store(out, at, out.load_flat(at) + cols.load_flat(tap + q + x0))


@register("conv2d_gemm", Fusion.CONTRACTION)
class Conv2dGemm(ProductOp):
    """A convolution as weights (O, C*KH*KW) @ im2col columns (N, C*KH*KW, OH*OW) + bias,
    writing NCHW directly: the fast matmul loops, with the conv's epilogue."""

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    arity = (2, 3)

    def infer(self, cols: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("conv2d_gemm", cols, w, *([bias] if bias else []))
        if cols.rank != 4 or w.rank != 4 or cols.shape[1] != prod(w.shape[1:]):
            raise GraphError(f"conv2d_gemm: columns {cols.shape} do not match weights {w.shape}")
        if bias is not None and bias.shape != (w.shape[0],):
            raise GraphError(f"conv2d_gemm: bias shape {bias.shape}, expected ({w.shape[0]},)")
        return cols.with_shape((cols.shape[0], w.shape[0], *cols.shape[2:]))

    def reference(self, cols, w, bias=None):
        n, kk, oh, ow = cols.shape
        y = np.einsum(
            "ok,nks->nos",
            w.reshape(w.shape[0], kk).astype(np.float64),
            cols.reshape(n, kk, oh * ow).astype(np.float64),
        )
        if bias is not None:
            y += bias.reshape(1, -1, 1)
        return y.reshape(n, w.shape[0], oh, ow).astype(cols.dtype)

    def product(self, ins, out):
        cols, w = ins[0], ins[1]
        n, kk, oh, ow = cols.shape
        o = w.shape[0]
        bias = ins[2] if len(ins) > 2 else None
        return Product(
            w.view((o, kk)), cols.view((n, kk, oh * ow)), out.view((n, o, oh * ow)), bias, True, out.shape
        )


#: output positions per register tile of conv2d_packed on AVX-512, by panel width NR:
#: MR x NR/16 accumulators, MR broadcast inputs and a weight vector fit its 32 registers
#: (measured at ResNet-18's shapes: 7 x 64 spills, 6 x 64 and 4 x 64 run at 88-95%
#: of the FMA peak, 12 x 32 spills)
PACKED_CONV_ROWS = {64: 6, 48: 7, 32: 10, 16: 14}
#: output channels per panel of packed weights, by preference (a multiple of 16 lanes,
#: so that the panels suit every vector unit up to AVX-512)
PACKED_CONV_PANELS = (64, 48, 32, 16)
#: taps (C*KH*KW) up to which conv2d_packed runs by output rows, not register tiles
PACKED_CONV_SMALL_K = 32
#: bytes of packed weights up to which (and of input over which, or on several threads)
#: conv2d_packed runs each block of positions through all its panels in turn: the weights
#: stay in L2, the block's windows in L1
PACKED_CONV_SHARED_WEIGHTS = 1 << 20
#: bytes of weights from which conv2d_packed takes its taps in slabs (_lower_slabs):
#: an L2's, weights that a model's other layers evict between calls. Measured on
#: ResNet-18's convs alone, one thread: 512 -> 512 channels at 7² (9.4 MB) 150 -> 183
#: GFLOP/s at batch 1, 143 -> 173 at batch 32; 256 -> 512 of stride 2 (4.7 MB) 142 ->
#: 173 and 136 -> 161; 256 -> 256 at 14² (2.4 MB) 189 -> 176 where its weights stay in
#: cache between calls, but in the model, where they do not, the model 21.9 -> 21.3 ms
#: at batch 1 and 646 -> 618 at 32 (slabs from 4 MB against from 2); 64 -> 64 at 56²
#: (0.14 MB) 174 -> 148
PACKED_CONV_SLAB_WEIGHTS = 2 << 20
#: bytes of a slab's weights (they stay in L1 while a group of blocks reads them), and
#: of the sums a group keeps in its scratch
PACKED_CONV_SLAB_BYTES = 32 << 10
PACKED_CONV_GROUP_BYTES = 16 << 10
#: pooled rows a parallel step of conv2d_packed's overlapping pool computes: a band's
#: first window recomputes rows of the band before it (1 of 29 conv rows for ResNet's
#: 3x3 pool of stride 2 in bands of 14), and an image's bands are its parallel steps
POOL_BAND_ROWS = 14


def _clamp(i: Expr, size: int) -> Expr:
    """i moved into [0, size): a window position past an edge onto the edge."""
    return minimum(maximum(i, 0), size - 1)


def packed_conv_tile(nr: int, unit: VectorUnit) -> tuple[int, int]:
    """(filters, positions) of conv2d_packed's register tile for panels of nr filters:
    on AVX-512 the whole panel, PACKED_CONV_ROWS positions; on a smaller unit (AVX2's
    16 registers of 8 lanes) two vectors of a panel's filters (the panel taken a part
    at a time) and as many positions as leave every value of a tap in registers: the
    sums, the tap's weight vectors, and one broadcast input at a time (a `tile` loop
    meets it with all the weight vectors at once; AVX2 has no broadcast operand, as
    AVX-512 has): 6 x 16 on AVX2, 12 sums, as a product's tile (matmul_rows)."""
    if unit == AVX512:
        return nr, PACKED_CONV_ROWS[nr]
    filters = min(nr, 2 * unit.lanes)
    vectors = filters // unit.lanes
    return filters, max(1, (unit.registers - 1 - vectors) // vectors)


def packed_conv_panel(out_channels: int) -> int:
    """The channel panel width NR for a conv of out_channels filters: the widest that
    divides them (none is padded), else 16 (the last panel padded with zero filters)."""
    return next((nr for nr in PACKED_CONV_PANELS if out_channels % nr == 0), 16)


def packed_conv_slab(channels: int, channel_bytes: int) -> int:
    """Input channels per slab of conv2d_packed's taps: the most that divide `channels`
    whose weights (channel_bytes each, a channel's KH x KW taps of a register tile's
    filters) fit PACKED_CONV_SLAB_BYTES; at least one."""
    return _filter_group(channels, max(1, PACKED_CONV_SLAB_BYTES // channel_bytes))


def pack_panels(w: np.ndarray, nr: int) -> np.ndarray:
    """Weights as a packed product reads them: w holds one output column per row (a
    conv's OIHW filters, a linear's transposed kernel), packed as (panels, K, nr), panel p
    holding columns p*nr .. p*nr + nr - 1 for each k, so one k step reads nr contiguous
    floats; columns past w's are zero."""
    o = w.shape[0]
    panels = -(-o // nr)
    flat = np.zeros((panels * nr, w[0].size), w.dtype)
    flat[:o] = w.reshape(o, -1)
    return np.ascontiguousarray(flat.reshape(panels, nr, -1).transpose(0, 2, 1))


def packed_weight(w: Buffer, column: Expr | int, k: Expr | int) -> Expr:
    """w[k, column] of weights packed by pack_panels, (panels, K, nr): a conv's filter
    `column` at tap k."""
    _, kk, nr = w.shape
    return w.load_flat((column // nr * kk + k) * nr + column % nr)


def _filter_group(filters: int, most: int) -> int:
    """The filters a row schedule's step computes together: the most, up to `most`
    (whose sums fit in registers), that divide `filters`."""
    return next(f for f in range(min(filters, most), 0, -1) if filters % f == 0)


def unpack_panels(w: np.ndarray, columns: int) -> np.ndarray:
    """pack_panels undone: the first `columns` columns, one per row, (columns, K)."""
    panels, kk, nr = w.shape
    return w.transpose(0, 2, 1).reshape(panels * nr, kk)[:columns]


@register("conv2d_packed", Fusion.CONTRACTION)
class Conv2dPacked(Op):
    """A convolution of constant weights on the CPU, with no im2col: out[n, o, y, x] =
    bias[o] + sum over (c, i, j) of x[n, c, y*sh + i*dh, x*sw + j*dw] * w[o, c, i, j],
    x already padded, w packed by pack_panels into panels of `panel` filters.

    An implicit GEMM: positions (y, x) are the rows, filters the columns (vector
    lanes), the windows of x are read in place as the broadcast operand and the packed
    weights are the streamed one. See lower for the register tile.

    With pool = p > 1 the conv is max-pooled over p x p windows, as compiler.passes.conv_pool
    makes of a conv followed by such a pool, so the conv's output is never stored. Of
    stride p (pool_stride 0: windows that tile the output, the rows and columns that fill
    none dropped), only the positions inside windows are computed and each window's
    maximum is stored; of a smaller stride pool_stride, with pool_pad rows and columns of
    padding (ResNet's 3x3 pool of stride 2 after its first conv), the windows overlap,
    and the conv's rows are computed once each into a ring of p rows (see
    _lower_overlapping_pool)."""

    differentiation = Gradient.NONE  # made by a compiler pass, for constant weights only
    arity = (2, 3)
    accepts_epilogue = True
    kernel: tuple[int, ...] = (3, 3)
    strides: tuple[int, ...] = (1, 1)
    dilations: tuple[int, ...] = (1, 1)
    out_channels: int = 1
    pool: int = 1
    pool_stride: int = 0
    pool_pad: int = 0

    @property
    def pool_step(self) -> int:
        """The stride of the pool's windows (pool where pool_stride is 0)."""
        return self.pool_stride or self.pool

    def _conv_geometry(self, x: tuple[int, ...]) -> tuple[int, int]:
        """The conv's output rows and columns, before any pooling."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        oh = _window_out("conv2d_packed", x[2], kh, sh, dh, 0, 0)
        ow = _window_out("conv2d_packed", x[3], kw, sw, dw, 0, 0)
        return oh, ow

    def _geometry(self, x: tuple[int, ...]) -> tuple[int, int]:
        oh, ow = self._conv_geometry(x)
        p, s, q = self.pool, self.pool_step, self.pool_pad
        if not 0 <= q < p or s > p:
            raise GraphError(f"conv2d_packed: pool {p} with stride {s} and padding {q}")
        if min(oh, ow) + 2 * q < p:
            raise GraphError(f"conv2d_packed: a {oh}x{ow} conv output fills no window of {p}")
        return (oh + 2 * q - p) // s + 1, (ow + 2 * q - p) // s + 1

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("conv2d_packed", x, w, *([bias] if bias else []))
        _pair("conv2d_packed", "kernel", self.kernel)
        _pair("conv2d_packed", "strides", self.strides)
        _pair("conv2d_packed", "dilations", self.dilations)
        if x.rank != 4 or w.rank != 3 or w.shape[1] != x.shape[1] * prod(self.kernel):
            raise GraphError(f"conv2d_packed: packed weights {w.shape} do not match input {x.shape}")
        if w.shape[0] * w.shape[2] < self.out_channels or w.shape[2] % MATMUL_VECTOR:
            raise GraphError(f"conv2d_packed: panels {w.shape} cannot hold {self.out_channels} filters")
        if bias is not None and bias.shape != (self.out_channels,):
            raise GraphError(f"conv2d_packed: bias shape {bias.shape}, expected ({self.out_channels},)")
        return x.with_shape((x.shape[0], self.out_channels, *self._geometry(x.shape)))

    def reference(self, x, w, bias=None):
        o, (kh, kw), p = self.out_channels, self.kernel, self.pool
        unpacked = unpack_panels(w, o).reshape(o, x.shape[1], kh, kw)
        y = Conv2d(strides=self.strides, dilations=self.dilations).reference(x, unpacked, bias)
        if p == 1:
            return y
        s, q = self.pool_step, self.pool_pad
        return MaxPool2d(kernel=(p, p), strides=(s, s), pads=(q,) * 4).reference(y)

    def lower(self, k, ins, out, epilogue=None):
        kk = ins[1].shape[1]
        if self.pool > 1 and (self.pool_step < self.pool or self.pool_pad):
            self._lower_overlapping_pool(k, ins, out, epilogue)
        elif self.pool > 1:
            self._lower_pooled_tiles(k, ins, out, epilogue)
        elif kk <= PACKED_CONV_SMALL_K and self.strides[1] == 1:
            self._lower_rows(k, ins, out, epilogue)
        elif ins[1].numel * ITEMSIZE[ins[1].dtype] > PACKED_CONV_SLAB_WEIGHTS:
            self._lower_slabs(k, ins, out, epilogue)
        else:
            self._lower_tiles(k, ins, out, epilogue)

    def _lower_rows(self, k, ins, out, epilogue=None):
        """A convolution with few taps (C*KH*KW up to PACKED_CONV_SMALL_K: a first layer
        on one or three channels) and stride 1 along the width, by output rows: per
        parallel step one image, one output row and a group of filters (up to half the
        vector registers: 16 on AVX-512). The positions of the row are the vector lanes
        (whole_vectors): per tap, one contiguous run of the input row, times each
        filter's weight (broadcast), into the filter's sums, which stay in registers over
        all the taps; the finished sums are stored as they lie in NCHW (a contiguous run
        per filter). The tiled schedule, whose sums per filter are stored one position
        at a time, spends most of its time storing when there are this few taps."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c, hp, wp = x.shape
        kk = w.shape[1]
        o, (kh, kw), (sh, _), (dh, dw) = self.out_channels, self.kernel, self.strides, self.dilations
        _, _, oh, ow = out.shape
        most = k.unit.registers // 2  # filters whose sums stay in registers (a vector each)
        group = _filter_group(o, most)
        groups = o // group
        with k.loop(n * oh * groups, LoopKind.PARALLEL, "row") as step:
            ni, y, g = step // (oh * groups), step // groups % oh, step % groups
            filters = [g * group + f for f in range(group)]
            with whole_vectors(k, ow, "x") as xx:
                sums = [bias.load_flat(oi) if bias is not None else k_const(out, 0.0) for oi in filters]
                for tap in range(kk):
                    ci, i, j = tap // (kh * kw), tap // kw % kh, tap % kw
                    xv = x.load_flat(((ni * c + ci) * hp + y * sh + i * dh) * wp + xx + j * dw)
                    for f, oi in enumerate(filters):
                        wv = packed_weight(w, oi, tap)
                        sums[f] = muladd(xv, wv, sums[f])
                for f, oi in enumerate(filters):
                    at = ((ni * o + oi) * oh + y) * ow + xx
                    value = sums[f] if epilogue is None else epilogue(sums[f], at, [ni, oi, y, xx])
                    k.store(out, at, value)

    def _window_start(self, x: Buffer, ni, y, col) -> Expr:
        """The index in x of the first input of conv output (y, col)'s window, image ni."""
        _, c, hp, wp = x.shape
        sh, sw = self.strides
        return ni * (c * hp * wp) + y * (sh * wp) + col * sw

    def _window_end(self, x: Buffer, ni, y, col) -> Expr:
        """The index in x of the last input of the first row of output (y, col)'s window."""
        (_, kw), (_, dw) = self.kernel, self.dilations
        return self._window_start(x, ni, y, col) + (kw - 1) * dw

    def _sweep_taps(
        self,
        k,
        x: Buffer,
        w: Buffer,
        acc: Buffer,
        bases,
        first_tap,
        first_filter,
        tc: int,
        ahead=None,
        channels: tuple[Expr, int] | None = None,
        weights_ahead: tuple[Expr, int] | None = None,
    ) -> None:
        """acc[r * tc + f] = sum over taps of x at window r (from bases[r]) times filter
        first_filter + f of the panel whose taps start at first_tap: per tap, tc/lanes
        vectors of packed weights meet one broadcast input per window. Taps in (c, i, j)
        order, a window row's kw taps in one loop body: their addresses are constant
        offsets from the row's (no per-tap index arithmetic). With `channels` = (first,
        count), only those input channels' taps are added to acc as it stands; with
        `weights_ahead` = (start, lines), step s of the (channel, kernel row) steps
        prefetches `lines` lines of w from start + s * lines lines.

        `ahead`, where given, is the index in x of the last input the next block reads in
        its first window row (see _window_end): each window row prefetches the next
        block's line there, so its windows arrive while this block computes. The windows
        lie in C x KH rows of separate planes, more streams than the hardware prefetchers
        follow: a 1x1 conv of stride 2 over ResNet-18's 56x56 planes at batch 32, 13.5 ->
        4.7 ms; its 3x3 of stride 2 there 33.8 -> 26.5 ms."""
        _, c, hp, wp = x.shape
        _, _, nr = w.shape
        (kh, kw), (dh, dw), mr = self.kernel, self.dilations, len(bases)
        if channels is None:
            channels = (0, c)
            with k.loop(tc, LoopKind.VECTOR, "o") as jj:
                for r in range(mr):
                    k.store(acc, r * tc + jj, k_const(acc, 0.0))
        first_channel, count = channels
        with k.loop(count, LoopKind.SERIAL, "c") as cl, k.loop(kh, LoopKind.SERIAL, "i") as i:
            ci = first_channel + cl
            row = ci * (hp * wp) + i * (dh * wp)
            taps = (ci * kh + i) * kw
            if ahead is not None:
                k.prefetch(x, minimum(ahead + row, x.numel - 1))
            if weights_ahead is not None:
                start, lines = weights_ahead
                line = CACHE_LINE // ITEMSIZE[w.dtype]
                for q in range(lines):
                    k.prefetch(w, minimum(start + ((cl * kh + i) * lines + q) * line, w.numel - 1))
            with k.loop(tc, vector_kind(tc, k.unit.lanes), "o") as jj:
                for j in range(kw):
                    wv = w.load_flat((first_tap + taps + j) * nr + first_filter + jj)
                    for r in range(mr):
                        xv = x.load_flat(bases[r].ref + row + j * dw)
                        k.store(acc, r * tc + jj, muladd(xv, wv, acc.load_flat(r * tc + jj)))

    def _lower_tiles(self, k, ins, out, epilogue=None):
        """Per parallel step: one image, TC filters of a panel of NR (packed_conv_tile:
        the whole panel on AVX-512), a block of MR consecutive output positions. A
        block's MR x TC sums live in registers (a scratch tile LLVM promotes) over all of
        k = (c, i, j): per tap, TC/lanes vectors of packed weights and, per position, one
        input value broadcast, MR x TC/lanes FMAs. The panel's weights (K x NR floats)
        stay in L2 across a thread's blocks; the input windows are read where they lie
        (no im2col). A last block that would run past the positions starts earlier
        instead (its overlap computed twice, the same sums). The finished tile gets the
        bias and the epilogue and is stored NCHW."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n = x.shape[0]
        panels, kk, nr = w.shape
        _, _, oh, ow = out.shape
        positions = oh * ow
        tc, mr = packed_conv_tile(nr, k.unit)
        mr = min(mr, positions)
        parts = nr // tc  # register tiles across a panel
        blocks = -(-positions // mr)
        # one block a parallel step. Where all the panels' weights stay in L2 and the
        # input does not, or threads share the steps, a block's panels are consecutive,
        # so its windows are read from memory once, and each thread reads only its
        # blocks' windows (ResNet-18 at batch 32, one thread: its 1x1 stride-2 convs 6.6
        # -> 5.1 ms at 128 -> 256 channels, the 3x3 ones 26.5 -> 23.7 at 64 -> 128; at
        # batch 1 on two threads the model 16.7 -> 15.5 ms); else the blocks of a panel
        # are, and a thread's range of steps shares its weights (at batch 1 on one
        # thread, 3% faster for those convs)
        size = ITEMSIZE[w.dtype]
        shared = PACKED_CONV_SHARED_WEIGHTS < x.numel * size or k.threads > 1
        block_major = w.numel * size <= PACKED_CONV_SHARED_WEIGHTS and shared
        with k.loop(n * panels * parts * blocks, LoopKind.PARALLEL, "block") as step:
            ni = step // (panels * parts * blocks)
            if block_major:
                block, panel, part = step // (panels * parts) % blocks, step // parts % panels, step % parts
            else:
                block, panel, part = step % blocks, step // (parts * blocks) % panels, step // blocks % parts
            acc = k.scratch("tile", out.dtype, (mr * tc,))
            first = minimum(block * mr, positions - mr)
            bases = self._block_bases(k, x, ni, first, mr, ow)
            following = minimum(first + 2 * mr - 1, positions - 1)  # the next block's last position
            ahead = self._window_end(x, ni, following // ow, following % ow)
            self._sweep_taps(k, x, w, acc, bases, panel * kk, part * tc, tc, ahead)
            first_filter, padded = panel * nr + part * tc, panels * nr > self.out_channels
            self._store_tile(k, out, bias, epilogue, (acc, 0), ni, first_filter, first, (mr, tc), padded)

    def _block_bases(self, k, x: Buffer, ni, first, mr: int, ow: int) -> list[Local]:
        """The window starts in x of output positions first .. first + mr - 1."""
        return [
            k.local("int64", self._window_start(x, ni, (first + r) // ow, (first + r) % ow), "win")
            for r in range(mr)
        ]

    def _store_tile(
        self,
        k,
        out: Buffer,
        bias,
        epilogue,
        sums: tuple[Buffer, Expr | int],
        ni,
        first_filter,
        first,
        tile: tuple[int, int],
        padded: bool,
    ) -> None:
        """A finished tile of sums (sums[0] from offset sums[1], mr positions x tc filters,
        a position's filters contiguous) to out, NCHW: per filter a run of mr positions
        from `first`, biased and through the epilogue. Where the panels hold filters past
        out_channels (`padded`), those are not stored."""
        acc, offset = sums
        mr, tc = tile
        o, (_, _, oh, ow) = self.out_channels, out.shape
        positions = oh * ow
        with k.loop(tc, LoopKind.SERIAL, "o") as jj:
            oi = first_filter + jj
            guard = oi.lt(o) if padded else None
            with k.when(guard) if guard is not None else nullcontext():
                start = bias.load_flat(oi) if bias is not None else k_const(out, 0.0)
                for r in range(mr):
                    pos = first + r
                    at = (ni * o + oi) * positions + pos
                    value = acc.load_flat(offset + r * tc + jj) + start
                    if epilogue is not None:
                        value = epilogue(value, at, [ni, oi, pos // ow, pos % ow])
                    k.store(out, at, value)

    def _lower_slabs(self, k, ins, out, epilogue=None):
        """_lower_tiles' register tiles with the taps in slabs, for weights that do not
        stay in cache between calls: per parallel step one image, TC filters of a panel
        and a group of blocks of MR positions, whose sums wait in a scratch; the panel's
        taps in slabs of `slab` input channels (packed_conv_slab: weights that stay in
        L1), and per slab each block's sums to the register tile, the slab's taps, and
        back. A weight then comes from memory once per group, and the next slab's lines
        are prefetched while the group computes (each block its share); block by block,
        the first block of each panel waits on memory (6 positions meet each weight) and
        the rest read the panel from L2. The positions past the last whole block are the
        last group's tail block of fewer rows, where _lower_tiles recomputes an
        overlapping block (49 positions: 8 blocks of 6 and 1, not 9 of 6)."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c = x.shape[:2]
        panels, kk, nr = w.shape
        _, _, oh, ow = out.shape
        positions = oh * ow
        tc, mr = packed_conv_tile(nr, k.unit)
        mr = min(mr, positions)
        parts, blocks, tail = nr // tc, positions // mr, positions % mr
        groups = -(-blocks * mr * tc * ITEMSIZE[out.dtype] // PACKED_CONV_GROUP_BYTES)
        group = -(-blocks // groups)
        size, kh = ITEMSIZE[w.dtype], self.kernel[0]
        slab = packed_conv_slab(c, kk // c * tc * size)
        # each block's rows (its (channel, kernel row) steps of a slab) prefetch its share
        # of the next slab's weights, whole panel rows of nr filters, a line at a time
        line = CACHE_LINE // size
        slab_floats = slab * (kk // c) * nr
        lines = -(-slab_floats // line // ((group + bool(tail)) * slab * kh))
        with k.loop(n * panels * parts * groups, LoopKind.PARALLEL, "group") as step:
            ni = step // (panels * parts * groups)
            panel, part, g = step // (parts * groups) % panels, step // groups % parts, step % groups
            sums = k.scratch("sums", out.dtype, ((group * mr + tail) * tc,))
            with k.loop((group * mr + tail) * tc, LoopKind.VECTOR, "s") as e:
                k.store(sums, e, k_const(sums, 0.0))

            def each_block(body: Callable[[Expr | int, Expr | int, int], None]) -> None:
                """body(slot, first position, rows) for each block of the group, its sums
                at sums[slot * mr * tc:] (the tail's slot is the group's last)."""
                with k.loop(group, LoopKind.SERIAL, "b") as b:
                    block = g * group + b
                    with k.when(block.lt(blocks)) if groups * group > blocks else nullcontext():
                        body(b, block * mr, mr)
                if tail:
                    with k.when(g.eq(groups - 1)):
                        body(group, const(blocks * mr, "int64"), tail)

            def sweep(first_channel: Expr, slot: Expr | int, first: Expr, rows: int) -> None:
                """One block's sums over one slab's taps, through the register tile."""
                offset = slot * (mr * tc)
                acc = k.scratch("tile", out.dtype, (rows * tc,))
                with k.loop(rows * tc, LoopKind.VECTOR, "t") as e:
                    k.store(acc, e, sums.load_flat(offset + e))
                following = minimum(first + 2 * rows - 1, positions - 1)
                ahead = self._window_end(x, ni, following // ow, following % ow)
                bases = self._block_bases(k, x, ni, first, rows, ow)
                next_slab = (panel * kk + (first_channel + slab) * (kk // c)) * nr
                share = slot * (slab * kh * lines * line)
                self._sweep_taps(
                    k,
                    x,
                    w,
                    acc,
                    bases,
                    panel * kk,
                    part * tc,
                    tc,
                    ahead,
                    channels=(first_channel, slab),
                    weights_ahead=(next_slab + share, lines),
                )
                with k.loop(rows * tc, LoopKind.VECTOR, "t") as e:
                    k.store(sums, offset + e, acc.load_flat(e))

            with k.loop(c // slab, LoopKind.SERIAL, "slab") as s:
                each_block(functools.partial(sweep, s * slab))
            first_filter, padded = panel * nr + part * tc, panels * nr > self.out_channels
            each_block(
                lambda slot, first, rows: self._store_tile(
                    k,
                    out,
                    bias,
                    epilogue,
                    (sums, slot * (mr * tc)),
                    ni,
                    first_filter,
                    first,
                    (rows, tc),
                    padded,
                )
            )

    def _lower_pooled_tiles(self, k, ins, out, epilogue=None):
        """_lower_tiles' register tile over the positions of `windows` consecutive
        pooled outputs of one pooled row (p² conv positions each, as many windows as
        fill packed_conv_tile's positions; the last run of a row starting earlier where
        they do not divide it): the finished tile's maximum over each window, biased,
        goes to the epilogue and is stored, one value per window and filter."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n = x.shape[0]
        panels, kk, nr = w.shape
        o, p = self.out_channels, self.pool
        _, _, ph, pw = out.shape
        tc, mr = packed_conv_tile(nr, k.unit)
        windows = max(1, min(mr // (p * p), pw))
        runs, parts = -(-pw // windows), nr // tc
        spots = [(win, a, b) for win in range(windows) for a in range(p) for b in range(p)]
        with k.loop(n * panels * parts * ph * runs, LoopKind.PARALLEL, "block") as step:
            ni = step // (panels * parts * ph * runs)
            panel = step // (parts * ph * runs) % panels
            part = step // (ph * runs) % parts
            py = step // runs % ph
            first = minimum(step % runs * windows, pw - windows)
            acc = k.scratch("tile", out.dtype, (len(spots) * tc,))
            bases = [
                k.local("int64", self._window_start(x, ni, py * p + a, (first + win) * p + b), "win")
                for win, a, b in spots
            ]
            self._sweep_taps(k, x, w, acc, bases, panel * kk, part * tc, tc)
            with k.loop(tc, LoopKind.SERIAL, "o") as jj:
                oi = panel * nr + part * tc + jj
                guard = None if o % nr == 0 else oi.lt(o)
                with k.when(guard) if guard is not None else nullcontext():
                    for win in range(windows):
                        sums = [acc.load_flat((win * p * p + q) * tc + jj) for q in range(p * p)]
                        value = functools.reduce(maximum, sums)
                        if bias is not None:
                            value = value + bias.load_flat(oi)
                        px = first + win
                        at = ((ni * o + oi) * ph + py) * pw + px
                        if epilogue is not None:
                            value = epilogue(value, at, [ni, oi, py, px])
                        k.store(out, at, value)

    def _lower_overlapping_pool(self, k, ins, out, epilogue=None):
        """A max pool of overlapping windows (stride s < p, pool_pad q) inside the conv. Per
        parallel step: one image, a band of POOL_BAND_ROWS pooled rows, a register tile's
        filters (TC of a panel). Before each pooled row, the conv rows its window needs
        that are not yet computed (all of them for the band's first, then s a row), by
        _lower_tiles' register tiles over runs of MR positions, are stored biased, each
        position's TC sums contiguous, into a ring of p rows (row r in slot r mod p), which
        stays in L2; the pooled row is then the maximum over its windows' valid positions,
        to the epilogue and out (NCHW). A band's first window recomputes at most p - s
        rows of the band before it. A window's positions past the conv's edges read the
        edge's row or column instead, which the window also covers: the maximum is the
        same, with no mask."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n = x.shape[0]
        panels, kk, nr = w.shape
        o, p, s, q = self.out_channels, self.pool, self.pool_step, self.pool_pad
        oh, ow = self._conv_geometry(x.shape)
        _, _, ph, pw = out.shape
        tc, mr = packed_conv_tile(nr, k.unit)
        mr = min(mr, ow)
        parts, runs = nr // tc, -(-ow // mr)
        bands = -(-ph // POOL_BAND_ROWS)
        with k.loop(n * panels * parts * bands, LoopKind.PARALLEL, "band") as step:
            ni = step // (panels * parts * bands)
            panel, part, band = step // (parts * bands) % panels, step // bands % parts, step % bands
            ring = k.scratch("rows", out.dtype, (p * ow * tc,))
            first_row = band * POOL_BAND_ROWS
            with k.loop(minimum(ph - first_row, POOL_BAND_ROWS), LoopKind.SERIAL, "py") as t:
                py = first_row + t
                top, last = maximum(py * s - q, 0), minimum(py * s - q + p - 1, oh - 1)
                new = select(t.eq(0), top, minimum(py * s - q - s + p - 1, oh - 1) + 1)
                with k.loop(last - new + 1, LoopKind.SERIAL, "cy") as r:
                    cy = new + r
                    with k.loop(runs, LoopKind.SERIAL, "run") as run:
                        first = minimum(run * mr, ow - mr)
                        bases = [
                            k.local("int64", self._window_start(x, ni, cy, first + rr), "win")
                            for rr in range(mr)
                        ]
                        acc = k.scratch("tile", out.dtype, (mr * tc,))
                        ahead = self._window_end(x, ni, cy, minimum(first + 2 * mr - 1, ow - 1))
                        self._sweep_taps(k, x, w, acc, bases, panel * kk, part * tc, tc, ahead)
                        with k.loop(tc, vector_kind(tc, k.unit.lanes), "o") as jj:
                            oi = minimum(panel * nr + part * tc + jj, o - 1)  # a padded filter's: any
                            start = bias.load_flat(oi) if bias is not None else k_const(out, 0.0)
                            for rr in range(mr):
                                at = (cy % p * ow + first + rr) * tc + jj
                                k.store(ring, at, acc.load_flat(rr * tc + jj) + start)
                with k.loop(pw, LoopKind.SERIAL, "px") as px, k.loop(tc, LoopKind.VECTOR, "o") as jj:
                    spots = itertools.product(range(p), repeat=2)
                    slots = [(_clamp(py * s - q + a, oh) % p, _clamp(px * s - q + b, ow)) for a, b in spots]
                    values = [ring.load_flat((slot * ow + col) * tc + jj) for slot, col in slots]
                    best = functools.reduce(maximum, values)
                    oi = panel * nr + part * tc + jj
                    at = ((ni * o + oi) * ph + py) * pw + px
                    guard = None if o % nr == 0 else oi.lt(o)
                    with k.when(guard) if guard is not None else nullcontext():
                        k.store(out, at, best if epilogue is None else epilogue(best, at, [ni, oi, py, px]))

    def lower_gpu(self, k, ins, out, epilogue=None):
        """One GPU thread per output element, summing over (c, i, j), the maximum of its
        window's sums where pooled (the GPU targets keep convolutions as im2col +
        conv2d_gemm; this schedule exists for completeness)."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        _, c, hp, wp = x.shape
        kk = w.shape[1]
        (kh, kw), (sh, sw), (dh, dw), p = self.kernel, self.strides, self.dilations, self.pool
        step, pad = self.pool_step, self.pool_pad
        oh, ow = self._conv_geometry(x.shape)
        cpu = KernelBuilder(k.name, [], flat_block=1)
        with cpu.loop(out.numel, LoopKind.PARALLEL, "e") as e:
            ni, oi, py, px = unravel(e, out.shape)
            sums = []
            for a, b in itertools.product(range(p), repeat=2):
                # past the conv's edges, the edge (in the window too: the same maximum)
                y, xx = _clamp(py * step - pad + a, oh), _clamp(px * step - pad + b, ow)
                acc = cpu.local(out.dtype, bias.load_flat(oi) if bias is not None else k_const(out, 0.0))
                with cpu.loop(kk, LoopKind.SERIAL, "k") as t:
                    ci, i, j = t // (kh * kw), t // kw % kh, t % kw
                    xv = x.load_flat(((ni * c + ci) * hp + y * sh + i * dh) * wp + xx * sw + j * dw)
                    cpu.assign(acc, muladd(xv, packed_weight(w, oi, t), acc.ref))
                sums.append(acc.ref)
            best = functools.reduce(maximum, sums)
            cpu.store(out, e, best if epilogue is None else epilogue(best, e, [ni, oi, py, px]))
        gpu.per_iteration(k, cpu.finish())


@register("conv2d_pooled", Fusion.CONTRACTION)
class Conv2dPooled(Op):
    """A convolution of few taps (a first layer) and stride 1, of packed weights,
    max-pooled over p x p windows of stride p (`pool`; the conv's last rows and columns
    that fill no window dropped): what compiler.passes.conv_pool makes of a conv2d_packed
    followed by a max pool, so that the conv's output, p² times the pooled one, is never
    stored, nor read back by a pooling kernel.

    Its input is x with each row's columns dealt into p planes, (N, C, H, p, W/p):
    x[n, c, y, b, i] is column p·i + b. The conv's columns p·px + b (one per pooled
    column px and window column b) then read a contiguous run of a plane for every tap,
    so the pooled columns are the vector lanes and the window's p² positions are sums
    side by side in registers, their maximum stored once."""

    differentiation = Gradient.NONE  # made by a compiler pass, for constant weights only
    arity = (2, 3)
    accepts_epilogue = True
    kernel: tuple[int, ...] = (3, 3)
    dilations: tuple[int, ...] = (1, 1)
    out_channels: int = 1
    pool: int = 2

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis == 0, "is not N of NCHW")

    def _conv_geometry(self, x: tuple[int, ...]) -> tuple[int, int]:
        """The conv's output rows and columns, before pooling."""
        (kh, kw), (dh, dw) = self.kernel, self.dilations
        oh = _window_out("conv2d_pooled", x[2], kh, 1, dh, 0, 0)
        ow = _window_out("conv2d_pooled", x[3] * x[4], kw, 1, dw, 0, 0)
        return oh, ow

    def infer(self, x: TensorType, w: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("conv2d_pooled", x, w, *([bias] if bias else []))
        _pair("conv2d_pooled", "kernel", self.kernel)
        _pair("conv2d_pooled", "dilations", self.dilations)
        taps = x.shape[1] * prod(self.kernel) if x.rank == 5 else -1
        if x.rank != 5 or x.shape[3] != self.pool or w.rank != 3 or w.shape[1] != taps:
            raise GraphError(
                f"conv2d_pooled: input {x.shape} must be (N, C, H, {self.pool}, W/{self.pool}) "
                f"for packed weights {w.shape}"
            )
        if w.shape[0] * w.shape[2] < self.out_channels:
            raise GraphError(f"conv2d_pooled: panels {w.shape} cannot hold {self.out_channels} filters")
        if bias is not None and bias.shape != (self.out_channels,):
            raise GraphError(f"conv2d_pooled: bias shape {bias.shape}, expected ({self.out_channels},)")
        oh, ow = self._conv_geometry(x.shape)
        if min(oh, ow) < self.pool:
            raise GraphError(f"conv2d_pooled: a {oh}x{ow} conv output fills no window of {self.pool}")
        return TensorType(x.dtype, (x.shape[0], self.out_channels, oh // self.pool, ow // self.pool))

    def reference(self, x, w, bias=None):
        n, c, h, p, q = x.shape
        columns = x.transpose(0, 1, 2, 4, 3).reshape(n, c, h, q * p)
        conv = Conv2dPacked(kernel=self.kernel, dilations=self.dilations, out_channels=self.out_channels)
        pool = MaxPool2d(kernel=(p, p), strides=(p, p))
        return pool.reference(conv.reference(columns, w, bias))

    def _tap(self, x: Buffer, ni: Expr, ci: Expr | int, row: Expr, px: Expr, offset: Expr | int) -> Expr:
        """x at input column p·px + offset: plane offset % p, contiguous in px."""
        p = self.pool
        plane = ((ni * x.shape[1] + ci) * x.shape[2] + row) * p + offset % p
        return x.load_flat(plane * x.shape[4] + px + offset // p)

    def lower(self, k, ins, out, epilogue=None):
        """Per parallel step one image, one pooled row and a group of filters (as many
        as keep their p² sums each in half the vector registers: 2 on AVX2, 4 on
        AVX-512 for 2x2 windows). The pooled columns are the lanes (whole_vectors); per
        tap and window position, a contiguous run of one plane of an input row times the
        filter's weight (broadcast); the window's maximum, biased, goes to the epilogue
        and is stored as it lies in NCHW."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        _, c, _, p, _ = x.shape
        kk = w.shape[1]
        o, (kh, kw), (dh, dw) = self.out_channels, self.kernel, self.dilations
        n, _, ph, pw = out.shape
        most = max(1, k.unit.registers // 2 // (p * p))
        group = _filter_group(o, most)
        groups = o // group
        window = list(itertools.product(range(p), repeat=2))
        with k.loop(n * ph * groups, LoopKind.PARALLEL, "row") as step:
            ni, py, g = step // (ph * groups), step // groups % ph, step % groups
            filters = [g * group + f for f in range(group)]
            with whole_vectors(k, pw, "px") as px:
                sums = [[k_const(out, 0.0)] * len(window) for _ in filters]
                for tap in range(kk):
                    ci, i, j = tap // (kh * kw), tap // kw % kh, tap % kw
                    xs = [self._tap(x, ni, ci, py * p + a + i * dh, px, b + j * dw) for a, b in window]
                    for f, oi in enumerate(filters):
                        wv = packed_weight(w, oi, tap)
                        sums[f] = [muladd(xv, wv, s) for xv, s in zip(xs, sums[f])]
                for f, oi in enumerate(filters):
                    best = functools.reduce(maximum, sums[f])
                    if bias is not None:
                        best = best + bias.load_flat(oi)
                    at = ((ni * o + oi) * ph + py) * pw + px
                    k.store(out, at, best if epilogue is None else epilogue(best, at, [ni, oi, py, px]))

    def lower_gpu(self, k, ins, out, epilogue=None):
        """One GPU thread per pooled output, the maximum of its window's sums (the GPU
        targets keep convolutions as im2col + conv2d_gemm: this exists for completeness)."""
        x, w = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        _, _, _, p, _ = x.shape
        kk = w.shape[1]
        (kh, kw), (dh, dw) = self.kernel, self.dilations
        cpu = KernelBuilder(k.name, [], flat_block=1)
        with cpu.loop(out.numel, LoopKind.PARALLEL, "e") as e:
            ni, oi, py, px = unravel(e, out.shape)
            sums = []
            for a, b in itertools.product(range(p), repeat=2):
                acc = cpu.local(out.dtype, k_const(out, 0.0))
                with cpu.loop(kk, LoopKind.SERIAL, "k") as q:
                    ci, i, j = q // (kh * kw), q // kw % kh, q % kw
                    xv = self._tap(x, ni, ci, py * p + a + i * dh, px, b + j * dw)
                    cpu.assign(acc, muladd(xv, packed_weight(w, oi, q), acc.ref))
                sums.append(acc.ref)
            best = functools.reduce(maximum, sums)
            if bias is not None:
                best = best + bias.load_flat(oi)
            cpu.store(out, e, best if epilogue is None else epilogue(best, e, [ni, oi, py, px]))
        gpu.per_iteration(k, cpu.finish())


@dataclasses.dataclass(frozen=True)
class Pool2d(Op):
    kernel: tuple[int, ...] = (2, 2)
    strides: tuple[int, ...] = (2, 2)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    dilations: tuple[int, ...] = (1, 1)

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis == 0, "is not N of NCHW")

    def infer(self, x: TensorType) -> TensorType:
        _require_float(self.name, x)
        if x.rank != 4:
            raise GraphError(f"{self.name}: input must be NCHW (rank 4), got {x.shape}")
        kh, kw = _pair(self.name, "kernel", self.kernel)
        s, d = _pair(self.name, "strides", self.strides), _pair(self.name, "dilations", self.dilations)
        p = _pair(self.name, "pads", self.pads, 4)
        oh = _window_out(self.name, x.shape[2], kh, s[0], d[0], p[0], p[2])
        ow = _window_out(self.name, x.shape[3], kw, s[1], d[1], p[1], p[3])
        return x.with_shape(x.shape[:2] + (oh, ow))

    def _windows(self, x: np.ndarray, fill: float):
        """Every window tap as a strided view over the padded input, and the pad mask."""
        (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = (
            self.kernel,
            self.strides,
            self.dilations,
            self.pads,
        )
        n, c, h, w = x.shape
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
        inside = np.pad(np.ones((h, w), bool), ((pt, pb), (pl, pr)))
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                yield xp[:, :, rows, cols], inside[rows, cols]

    def _taps(self, k: KernelBuilder, x: Buffer, out: Buffer, visit) -> None:
        n, c, h, w = x.shape
        _, _, oh, ow = out.shape
        (kh, kw), (sh, sw), (dh, dw), (pt, pl, _, _) = (self.kernel, self.strides, self.dilations, self.pads)
        with k.loop(n * c * oh, LoopKind.PARALLEL, "row") as r:
            plane, y = r // oh, r % oh
            with k.loop(ow, LoopKind.VECTOR, "x") as xx:
                taps = []
                for i in range(kh):
                    for j in range(kw):
                        iy, ix = y * sh + (i * dh - pt), xx * sw + (j * dw - pl)
                        # only the bounds a window of this tap can cross are checked: a tap
                        # that stays inside in every window loads plainly (vectorizable)
                        checks = [
                            in_range(at, 0, size)
                            for at, first, stride, last, size in (
                                (iy, i * dh - pt, sh, oh, h),
                                (ix, j * dw - pl, sw, ow, w),
                            )
                            if first < 0 or first + stride * (last - 1) >= size
                        ]
                        inside = const(True, "bool") if not checks else functools.reduce(logical_and, checks)
                        taps.append((inside, (plane // c, plane % c, iy, ix)))
                k.store(out, r * ow + xx, visit(taps))


@register("max_pool2d", Fusion.REDUCTION)
class MaxPool2d(Pool2d):
    """The window maximum, or (output="indices") where it is: the flat int64 index into
    x, row-major over (n, c, h, w), or with storage_order=1 column-major over (h, w);
    the first maximum in window order on ties, as onnxruntime picks."""

    gpu_per_iteration = True

    output: str = "values"
    storage_order: int = 0

    def infer(self, x: TensorType) -> TensorType:
        t = super().infer(x)
        if self.output not in ("values", "indices"):
            raise GraphError(f"max_pool2d: output must be 'values' or 'indices', got {self.output!r}")
        return t if self.output == "values" else TensorType("int64", t.shape)

    def _flat(self, n, c, y, x, shape) -> object:
        _, channels, h, w = shape
        within = y * w + x if self.storage_order == 0 else x * h + y
        return (n * channels + c) * (h * w) + within

    def reference(self, x):
        best, where = None, None
        (sh, sw), (dh, dw), (pt, pl, _, _) = self.strides, self.dilations, self.pads
        for t, (v, _) in enumerate(self._windows(x, -np.inf)):
            i, j = divmod(t, self.kernel[1])
            n, c, y, xx = np.indices(v.shape)
            flat = self._flat(n, c, y * sh + i * dh - pt, xx * sw + j * dw - pl, x.shape)
            if best is None:
                best, where = v.copy(), flat
            else:
                better = v > best
                best, where = np.where(better, v, best), np.where(better, flat, where)
        return best.astype(x.dtype) if self.output == "values" else where.astype(np.int64)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]

        def visit(taps):
            acc = k_const(x, -np.inf)
            row: Expr = const(0, "int64")  # where the maximum is so far (indices output)
            col: Expr = const(0, "int64")
            for inside, idx in taps:
                v = guarded_load(x, idx, inside, -np.inf)
                if self.output == "indices":
                    better = v.gt(acc)
                    row, col = select(better, idx[2], row), select(better, idx[3], col)
                acc = maximum(acc, v)
            if self.output == "values":
                return acc
            return self._flat(idx[0], idx[1], row, col, x.shape)  # the flat index, once per window

        self._taps(k, x, out, visit)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        if tuple(self.dilations) != (1, 1) or self.output != "values":
            raise GraphError(f"node {node.name}: the max_pool2d gradient needs dilation 1 and values output")
        x = node.inputs[0]
        if tuple(self.strides) == tuple(self.kernel) and not any(self.pads):  # windows tile x: one fused pass
            return [b.max_pool2d_tiled_backward(x, g, kernel=self.kernel)]
        window = dict(kernel=self.kernel, strides=self.strides, pads=self.pads)
        indices = b.max_pool2d(x, output="indices", **window)
        return [b.max_pool2d_backward(indices, g, input_shape=x.type.shape, **window)]


@register("max_pool2d_backward", Fusion.OPAQUE)
class MaxPool2dBackward(Op):
    """The gradient of max_pool2d (dilation 1) for its input: each window's output
    gradient goes to the element the window took (`indices`, max_pool2d's
    output="indices"), summed where windows overlap. Written as a gather: each input
    element visits the few windows that can cover it, so rows run in parallel."""

    gpu_per_iteration = True

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    arity = (2, 2)
    input_shape: tuple[int, ...] = ()  # (N, C, H, W) of the pooled input
    kernel: tuple[int, ...] = (2, 2)
    strides: tuple[int, ...] = (2, 2)
    pads: tuple[int, ...] = (0, 0, 0, 0)

    def infer(self, indices: TensorType, g: TensorType) -> TensorType:
        if indices.dtype != "int64" or indices.shape != g.shape or g.rank != 4 or len(self.input_shape) != 4:
            raise GraphError(
                f"max_pool2d_backward: indices {indices} and gradient {g} must match (N, C, OH, OW)"
            )
        _require_float("max_pool2d_backward", g)
        return TensorType(g.dtype, tuple(self.input_shape))

    def reference(self, indices, g):
        """Scatter-add; an index outside its own window (never one max_pool2d gives) is dropped."""
        n, c, h, w = self.input_shape
        (kh, kw), (sh, sw), (pt, pl, _, _) = self.kernel, self.strides, self.pads
        dx = np.zeros(n * c * h * w, np.float64)
        for (i, ch, oy, ox), at in np.ndenumerate(indices):
            y, x = divmod(int(at) - (i * c + ch) * h * w, w)
            plane_ok = (i * c + ch) * h * w <= at < (i * c + ch + 1) * h * w
            if plane_ok and oy * sh - pt <= y < oy * sh - pt + kh and ox * sw - pl <= x < ox * sw - pl + kw:
                dx[at] += g[i, ch, oy, ox]
        return dx.reshape(self.input_shape).astype(g.dtype)

    def lower(self, k, ins, out, epilogue=None):
        indices, g = ins
        n, c, h, w = self.input_shape
        with k.loop(n * c * h, LoopKind.PARALLEL, "row") as r:
            plane, y = r // h, r % h
            with k.loop(w, LoopKind.VECTOR, "x") as x:
                total = k_const(out, 0.0)
                flat = r * w + x
                for wy, wx, ok in _covering_windows(y, x, self.kernel, self.strides, self.pads, g.shape[2:]):
                    at = [plane // c, plane % c, wy, wx]
                    took = logical_and(ok, guarded_load(indices, at, ok, -1).eq(flat))
                    total = total + guarded_load(g, at, took, 0.0)
                k.store(out, flat, total)


def _covering_windows(y: Expr, x: Expr, kernel, strides, pads, windows_hw):
    """The pooling windows that may cover input pixel (y, x) (dilation 1): (wy, wx, ok)
    for each, ok where that window exists and reaches the pixel. A gradient written as a
    gather visits these instead of scattering from every window."""
    (kh, kw), (sh, sw), (pt, pl, _, _) = kernel, strides, pads
    oh, ow = windows_hw
    for a in range(-(-kh // sh)):
        wy = (y + pt) // sh - a
        y_ok = logical_and(in_range(wy, 0, oh), (wy * sh - pt + (kh - 1)).ge(y))
        for b_ in range(-(-kw // sw)):
            wx = (x + pl) // sw - b_
            yield wy, wx, logical_and(y_ok, logical_and(in_range(wx, 0, ow), (wx * sw - pl + (kw - 1)).ge(x)))


@register("max_pool2d_tiled_backward", Fusion.OPAQUE)
class MaxPool2dTiledBackward(Op):
    """The gradient of max_pool2d for its input x when the windows tile x without
    overlap or padding (strides == kernel, as Keras's MaxPooling2D has by default):
    each window's output gradient goes to its first maximum (the element
    max_pool2d(output="indices") names), every other element gets 0. One pass over the
    windows finds the maximum and writes all of its elements, so no index tensor is
    stored or read back."""

    gpu_per_iteration = True

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    arity = (2, 2)
    accepts_epilogue = True  # a ReLU's gradient mask, applied to every stored element
    kernel: tuple[int, ...] = (2, 2)

    def _windows(self, x: TensorType) -> tuple[int, int]:
        kh, kw = self.kernel
        return x.shape[2] // kh, x.shape[3] // kw

    def infer(self, x: TensorType, g: TensorType) -> TensorType:
        _require_float("max_pool2d_tiled_backward", x, g)
        if x.rank != 4 or g.shape != (*x.shape[:2], *self._windows(x)):
            raise GraphError(
                f"max_pool2d_tiled_backward: gradient {g.shape} is not x {x.shape} pooled by {self.kernel}"
            )
        return x

    def reference(self, x, g):
        n, c, h, w = x.shape
        (kh, kw), (oh, ow) = self.kernel, g.shape[2:]
        windows = x[:, :, : oh * kh, : ow * kw].reshape(n, c, oh, kh, ow, kw).transpose(0, 1, 2, 4, 3, 5)
        taps = windows.reshape(n, c, oh, ow, kh * kw)
        best, where = np.full(taps.shape[:-1], -np.inf), np.zeros(taps.shape[:-1], np.int64)
        for t in range(kh * kw):  # the first strictly greater value, as max_pool2d's indices
            better = taps[..., t] > best
            best, where = np.where(better, taps[..., t], best), np.where(better, t, where)
        routed = (np.arange(kh * kw) == where[..., None]) * g[..., None].astype(np.float64)
        dx = np.zeros(x.shape, np.float64)
        dx[:, :, : oh * kh, : ow * kw] = (
            routed.reshape(n, c, oh, ow, kh, kw).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh * kh, ow * kw)
        )
        return dx.astype(g.dtype)

    def lower(self, k, ins, out, epilogue=None):
        x, g = ins
        _, _, h, w = x.shape
        _, _, oh, ow = g.shape
        kh, kw = self.kernel
        zero = k_const(out, 0.0)

        def store(at: Expr, value: Expr) -> None:
            k.store(out, at, value if epilogue is None else epilogue(value, at, None))

        with k.loop(g.numel // ow, LoopKind.PARALLEL, "rows") as r:  # one row of windows: kh rows of x
            first_row = r // oh * (h * w) + r % oh * kh * w
            # serial: over windows the taps are kw apart, and LLVM vectorizes that with gathers
            # and scatters, measured 2-3x slower than this scalar loop (which runs at memory speed)
            with k.loop(ow, LoopKind.SERIAL, "x") as ox:
                best, where = k_const(x, -np.inf), const(0, "int32")
                for t in range(kh * kw):
                    v = x.load_flat(first_row + t // kw * w + ox * kw + t % kw)
                    better = v.gt(best)
                    best, where = select(better, v, best), select(better, const(t, "int32"), where)
                gv = g.load_flat(r * ow + ox)
                for t in range(kh * kw):
                    store(first_row + t // kw * w + ox * kw + t % kw, select(where.eq(t), gv, zero))
            if w > ow * kw:  # columns no window covers
                for i in range(kh):
                    with k.loop(w - ow * kw, LoopKind.SERIAL, "rest") as xx:
                        store(first_row + i * w + ow * kw + xx, zero)
            if h > oh * kh:  # rows no window covers, after each plane's last row of windows
                with k.when((r % oh).eq(oh - 1)):
                    with k.loop((h - oh * kh) * w, LoopKind.SERIAL, "rest") as e:
                        store(first_row + kh * w + e, zero)


@register("avg_pool2d_backward", Fusion.OPAQUE)
class AvgPool2dBackward(Op):
    """The gradient of avg_pool2d (dilation 1) for its input: each window's output
    gradient, divided by the window's count, to every input element in the window.
    A gather, like max_pool2d_backward: each element visits the windows covering it."""

    gpu_per_iteration = True

    differentiation = Gradient.NONE  # made by compiler passes and gradient rules only
    input_shape: tuple[int, ...] = ()  # (N, C, H, W)
    kernel: tuple[int, ...] = (2, 2)
    strides: tuple[int, ...] = (2, 2)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    count_include_pad: bool = False

    def infer(self, g: TensorType) -> TensorType:
        _require_float("avg_pool2d_backward", g)
        if g.rank != 4 or len(self.input_shape) != 4:
            raise GraphError(f"avg_pool2d_backward: gradient {g} must be (N, C, OH, OW)")
        return TensorType(g.dtype, tuple(self.input_shape))

    def _count(self, wy, wx, h: int, w: int):
        """How many elements window (wy, wx) averages (exprs or ints alike)."""
        (kh, kw), (sh, sw), (pt, pl, _, _) = self.kernel, self.strides, self.pads
        if self.count_include_pad:
            return kh * kw
        rows = minimum(wy * sh - pt + kh, h) - maximum(wy * sh - pt, 0)
        cols = minimum(wx * sw - pl + kw, w) - maximum(wx * sw - pl, 0)
        return rows * cols

    def reference(self, g):
        n, c, h, w = self.input_shape
        (kh, kw), (sh, sw), (pt, pl, _, _) = self.kernel, self.strides, self.pads
        dx = np.zeros(self.input_shape, np.float64)
        for wy in range(g.shape[2]):
            for wx in range(g.shape[3]):
                y0, x0 = wy * sh - pt, wx * sw - pl
                ys, xs = slice(max(y0, 0), min(y0 + kh, h)), slice(max(x0, 0), min(x0 + kw, w))
                count = kh * kw if self.count_include_pad else (ys.stop - ys.start) * (xs.stop - xs.start)
                dx[:, :, ys, xs] += g[:, :, wy : wy + 1, wx : wx + 1] / count
        return dx.astype(g.dtype)

    def lower(self, k, ins, out, epilogue=None):
        (g,) = ins
        n, c, h, w = self.input_shape
        with k.loop(n * c * h, LoopKind.PARALLEL, "row") as r:
            plane, y = r // h, r % h
            with k.loop(w, LoopKind.VECTOR, "x") as x:
                total = k_const(out, 0.0)
                for wy, wx, ok in _covering_windows(y, x, self.kernel, self.strides, self.pads, g.shape[2:]):
                    count = self._count(wy, wx, h, w)  # ≥ 1 where ok; never divide by 0 elsewhere
                    divisor = float(count) if isinstance(count, int) else cast(maximum(count, 1), out.dtype)
                    total = total + guarded_load(g, [plane // c, plane % c, wy, wx], ok, 0.0) / divisor
                k.store(out, r * w + x, total)


@register("avg_pool2d", Fusion.REDUCTION)
class AvgPool2d(Pool2d):
    """With count_include_pad the divisor counts padding too, but not `uncounted_end`:
    the end rows and columns ceil_mode adds, which ONNX never counts. A window with
    nothing counted (wholly in padding, which dilation allows) averages to 0, as
    onnxruntime gives."""

    gpu_per_iteration = True

    count_include_pad: bool = False
    uncounted_end: tuple[int, ...] = (0, 0)

    def _counted(self, h: int, w: int) -> np.ndarray:
        """Which positions of the padded input the divisor counts."""
        pt, pl, pb, pr = self.pads
        if not self.count_include_pad:
            return np.pad(np.ones((h, w), bool), ((pt, pb), (pl, pr)))
        eh, ew = self.uncounted_end
        return np.pad(np.ones((h + pt + pb - eh, w + pl + pr - ew), bool), ((0, eh), (0, ew)))

    def reference(self, x):
        windows = list(self._windows(x, 0.0))
        total = np.sum([v.astype(np.float64) for v, _ in windows], axis=0)
        counted = self._counted(*x.shape[2:])
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        oh, ow = total.shape[2:]
        count = sum(
            counted[
                i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw
            ].astype(float)
            for i in range(kh)
            for j in range(kw)
        )
        # a window wholly in uncounted padding averages to 0
        return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        _, _, h, w = x.shape
        _, _, pb, pr = self.pads
        eh, ew = self.uncounted_end

        def visit(taps):
            total, count = k_const(out, 0.0), k_const(out, 0.0)
            for inside, idx in taps:
                total = total + guarded_load(x, idx, inside, 0.0)
                if self.count_include_pad:
                    counted = logical_and(idx[2].lt(h + pb - eh), idx[3].lt(w + pr - ew))
                else:
                    counted = inside
                count = count + select(counted, k_const(out, 1.0), k_const(out, 0.0))
            return select(count.gt(0.0), total / maximum(count, k_const(out, 1.0)), k_const(out, 0.0))

        self._taps(k, x, out, visit)

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        if tuple(self.dilations) != (1, 1) or tuple(self.uncounted_end) != (0, 0):
            raise GraphError(f"node {node.name}: the avg_pool2d gradient needs dilation 1 and no ceil_mode")
        return [
            b.avg_pool2d_backward(
                g,
                input_shape=node.inputs[0].type.shape,
                kernel=self.kernel,
                strides=self.strides,
                pads=self.pads,
                count_include_pad=self.count_include_pad,
            )
        ]


@register("global_avg_pool2d", Fusion.REDUCTION)
class GlobalAvgPool2d(Op):
    gpu_per_iteration = True

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis == 0, "is not N of NCHW")

    def infer(self, x: TensorType) -> TensorType:
        _require_float("global_avg_pool2d", x)
        if x.rank != 4:
            raise GraphError(f"global_avg_pool2d: input must be NCHW (rank 4), got {x.shape}")
        return x.with_shape(x.shape[:2] + (1, 1))

    def reference(self, x):
        return x.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        x = ins[0]
        n, c, h, w = x.shape
        with k.loop(n * c, LoopKind.PARALLEL, "plane") as p:
            acc = k.local(x.dtype, 0.0)
            with k.loop(h * w, LoopKind.VECTOR, "s") as s:
                k.assign(acc, acc.ref + x.load_flat(p * (h * w) + s), reduction=True)
            k.store(out, p, acc.ref / float(h * w))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        x = node.inputs[0]
        h, w = x.type.shape[2:]
        return [b.expand(b.mul(g, constant(b, 1.0 / (h * w), x)), shape=x.type.shape)]


@register("batch_norm", Fusion.INJECTIVE)
class BatchNorm(Op):
    """Inference batch norm over axis 1: (x - mean) / sqrt(var + eps) * scale + bias."""

    gpu_per_iteration = True

    arity = (5, 5)
    epsilon: float = 1e-5

    def batch_axis(self, ins, out, batch):
        return batch_of_first(batch, lambda axis: axis != 1, "is the channels'")

    def infer(self, x, scale, bias, mean, var) -> TensorType:
        _require_float("batch_norm", x, scale, bias, mean, var)
        if x.rank < 2:
            raise GraphError(f"batch_norm: input must have a channel axis, got {x.shape}")
        for name, t in zip(("scale", "bias", "mean", "var"), (scale, bias, mean, var)):
            if t.shape != (x.shape[1],):
                raise GraphError(f"batch_norm: {name} shape {t.shape}, expected ({x.shape[1]},)")
        return x

    def reference(self, x, scale, bias, mean, var):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        inv = (scale / np.sqrt(var + x.dtype.type(self.epsilon))).reshape(shape)
        return ((x - mean.reshape(shape)) * inv + bias.reshape(shape)).astype(x.dtype)

    def lower(self, k, ins, out, epilogue=None):
        e = ExprBuilder
        x, scale, bias, mean, var = ins
        c = x.shape[1]
        inner = prod(x.shape[2:])
        with k.loop(x.shape[0] * c, LoopKind.PARALLEL, "plane") as p:
            ch = p % c
            inv = scale.load_flat(ch) / e.sqrt(var.load_flat(ch) + self.epsilon)
            with k.loop(inner, LoopKind.VECTOR, "s") as s:
                at = p * inner + s
                k.store(out, at, (x.load_flat(at) - mean.load_flat(ch)) * inv + bias.load_flat(ch))

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """Inference batch norm y = (x - mean)·s + bias, s = scale / sqrt(var + eps), per channel."""
        x, scale, bias, mean, var = node.inputs
        rank = x.type.rank
        channel = (1, -1) + (1,) * (rank - 2)
        others = (0, *range(2, rank))
        inv = b.rsqrt(b.add(var, constant(b, self.epsilon, x)))
        centered = b.sub(x, b.reshape(mean, shape=channel))
        g_sum = b.reduce_sum(g, axes=others, keepdims=False)
        g_centered = b.reduce_sum(b.mul(g, centered), axes=others, keepdims=False)
        return [
            b.mul(g, b.reshape(b.mul(scale, inv), shape=channel)),
            b.mul(g_centered, inv),
            g_sum,
            b.neg(b.mul(g_sum, b.mul(scale, inv))),
            b.mul(b.mul(g_centered, scale), b.mul(constant(b, -0.5, x), b.mul(inv, b.mul(inv, inv)))),
        ]
