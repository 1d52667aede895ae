"""Winograd's F(2x2, 3x3): a 3x3 stride-1 convolution in 16 multiplications per 2x2
outputs and channel pair, where the direct one takes 36.

The pass compiler.passes.conv_winograd writes such a convolution as three nodes:

    V = winograd_input(x)        (B, 16, C + 1, S): each 4x4 input tile d, per channel, Bᵀ d B
    M = matmul(U, V)             (B, 16, O + 1, S): U = G w Gᵀ (16, O + 1, C + 1), the weights
    y = winograd_output(M, bias) (N, O, OH, OW): each tile's 2x2 outputs, Aᵀ m A + bias

Tile (n, ty, tx) covers outputs [2ty, 2ty + 2) x [2tx, 2tx + 2) and reads rows
2ty .. 2ty + 3 and columns likewise of the input padded (the conv's padding, and more
zeros to end on whole tiles); plane ξ = 4i + j holds element (i, j) of the transformed
tiles. The 16 products are one batched matmul, at the product kernels' speed; the
transforms are additions only.

The tiles are grouped in blocks of whole tile rows (block_rows: R rows of TW tiles, up
to BLOCK_TILES, whole vectors where they can be; S columns, R·TW padded to whole
vectors: block_tiles), each block's 16 planes stored together. The product then reads a
block's plane, (C + 1) x S floats, as one compact panel: with all tiles in one row of V
per channel, its 16-column strips lay a whole row of tiles apart (100 KB at 56 x 56
outputs and batch 32), one memory stream per channel, more than the prefetchers follow
(64 channels: 65 ms -> 52 ms a product, batch 32). A block is whole tile rows, so a row
of tiles, the transforms' vector, lies in one block at consecutive addresses.

V and M have one more row per plane than channels (a zero row of V, a zero row and column
of U), so that a tile's 16 values, stored to or loaded from 16 planes, do not lie a
multiple of 4 KiB apart (at 64 or more channels they would, and each store missed L1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from codegen.kir import (
    CACHE_LINE,
    ITEMSIZE,
    Buffer,
    Expr,
    KernelBuilder,
    LoopKind,
    const,
    in_range,
    minimum,
    select,
)
from ir.errors import GraphError, InternalCompilerError
from ir.ops import Fusion, Gradient, Op, register
from ir.ops.nn import MATMUL_COL_TILE, MATMUL_VECTOR, _require_float, k_const, tiled_product, whole_vectors
from ir.types import TensorType

#: Bᵀ, G and Aᵀ of F(2x2, 3x3)
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def tiles(out_hw: tuple[int, int]) -> tuple[int, int]:
    """Tile rows and columns covering an output of out_hw."""
    return -(-out_hw[0] // 2), -(-out_hw[1] // 2)


#: the most tiles a block holds (see the module docstring): 128, so that a block of whole
#: tile rows can be whole vectors of columns (112 tiles at ResNet-18's 28, 14 and 7
#: tiles a row; in blocks of 64 the rows gave 56, whose last 8 columns ran masked: its
#: 256-channel products at batch 32 took 33 ms, and 23.7 in blocks of 112)
BLOCK_TILES = 128
#: up to this many tiles in all, one block: V's rows lie at most 4 KiB apart, which the
#: product reads as fast, and its column tiles are whole vectors where blocks of whole
#: tile rows would leave ragged ones (ResNet-18 at batch 1: 14 x 14 tiles in blocks of
#: 28 halved the product's speed)
ONE_BLOCK_TILES = 1024


def block_rows(
    rows: int, row_tiles: int, most: int = BLOCK_TILES, vector: int = 1, one_block: int = ONE_BLOCK_TILES
) -> int:
    """Tile rows per block, of `rows` tile rows of `row_tiles` tiles in all images: all
    of them up to `one_block` tiles, else the most that divide `rows` and hold at
    most `most` tiles, of those whose tiles are whole vectors (of `vector` columns)
    where any are, at least one."""
    if rows * row_tiles <= one_block:
        return rows
    fit = [r for r in range(1, rows + 1) if rows % r == 0 and r * row_tiles <= most]
    whole = [r for r in fit if r * row_tiles % vector == 0]
    return max(whole or fit, default=1)


def block_tiles(n: int, th: int, tw: int) -> tuple[int, int]:
    """(tile rows, columns) of a block of V or M for n images of th x tw tiles: its tiles
    (tile rows x tw) padded to whole vectors of columns. The product computes the
    padding's columns too (V's are zeros; nothing reads M's): a block of 49 tiles (256
    channels at 14 x 14, batch 1) ran its 49th column as a masked tile of its own, whose
    four sums could not hide the FMA's latency, and took 40% more time than 64 columns."""
    rows = block_rows(n * th, tw, vector=MATMUL_VECTOR)
    return rows, -(-rows * tw // MATMUL_VECTOR) * MATMUL_VECTOR


def blocked_shape(n: int, channels: int, th: int, tw: int) -> tuple[int, int, int, int]:
    """V's (or M's) shape for n images of th x tw tiles: (blocks, 16, channels + 1, columns)."""
    rows, columns = block_tiles(n, th, tw)
    return (n * th // rows, 16, channels + 1, columns)


def transform_weights(w: np.ndarray) -> np.ndarray:
    """U = G w Gᵀ of (O, C, 3, 3) weights, as (16, O + 1, C + 1), the last row and column
    zero (see the module docstring)."""
    o, c = w.shape[:2]
    u = np.zeros((16, o + 1, c + 1), w.dtype)
    u[:, :o, :c] = np.einsum("ia,ocab,jb->ijoc", G, w.astype(np.float64), G).reshape(16, o, c)
    return u


def _input_column(d: list) -> list:
    """Bᵀ d for a column d of 4 (B_T's rows as additions)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _output_column(m: list) -> list:
    """Aᵀ m for a column m of 4."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _two_sided(tile: list, column: Callable[[list], list]) -> list:
    """X t Xᵀ of a 4x4 tile t (row-major, 16 values) where column(c) = X c: X applied to
    each column of t, then to each row of the result; row-major again."""
    left = [column([tile[4 * i + j] for i in range(4)]) for j in range(4)]  # left[j][a] = (X t)[a, j]
    return [value for a in range(len(left[0])) for value in column([left[j][a] for j in range(4)])]


@register("winograd_input", Fusion.INJECTIVE)
class WinogradInput(Op):
    """x (N, C, H, W) → V (B, 16, C + 1, S): the TH x TW tiles of each image and channel,
    transformed, in blocks of tile rows (see the module docstring). The tiles' windows
    are x with `pads` = (top, left, bottom, right) rows and columns of zeros around it
    (the conv's padding, and more to end on whole tiles), 2·TH + 2 by 2·TW + 2: the
    transform reads the zeros where it would read them, not from a padded copy of x."""

    differentiation = Gradient.NONE  # made by a compiler pass, for inference
    gpu_per_iteration = True
    pads: tuple[int, ...] = (0, 0, 0, 0)

    def infer(self, x: TensorType) -> TensorType:
        if x.rank != 4 or x.dtype not in ("float32", "float64"):
            raise GraphError(f"winograd_input: expects a float (N, C, H, W) input, got {x}")
        h, w = _padded_hw(x.shape, self.pads)
        if len(self.pads) != 4 or min(self.pads) < 0 or h < 4 or w < 4 or h % 2 or w % 2:
            raise GraphError(
                f"winograd_input: {x.shape} padded by {self.pads} must be even and at least 4 high and wide"
            )
        return x.with_shape(blocked_shape(x.shape[0], x.shape[1], *_window_tiles(x.shape, self.pads)))

    def reference(self, x):
        n, c = x.shape[:2]
        th, tw = _window_tiles(x.shape, self.pads)
        top, left, bottom, right = self.pads
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        windows = np.lib.stride_tricks.sliding_window_view(x, (4, 4), axis=(2, 3))[:, :, ::2, ::2]
        v = np.einsum("ia,ncyxab,jb->ijcnyx", B_T, windows.astype(np.float64), B_T)
        rows, columns = block_tiles(n, th, tw)
        blocks, per_block = n * th // rows, rows * tw
        out = np.zeros((blocks, 16, c + 1, columns), x.dtype)
        out[:, :, :c, :per_block] = v.reshape(16, c, blocks, per_block).transpose(2, 0, 1, 3)
        return out

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """Per parallel step one channel of one block, tile row by tile row, a row's tiles
        the vector lanes (the input read at stride 2); consecutive steps fill a block's
        planes row after row, then zero the channel's columns past the tiles. The last
        channel's step also zeroes the block's zero rows; the product reads them."""
        (x,) = ins
        n, c = x.shape[:2]
        th, tw = _window_tiles(x.shape, self.pads)
        blocks, columns = out.shape[0], out.shape[3]
        rows = block_tiles(n, th, tw)[0]
        zero = k_const(out, 0.0)
        with k.loop(blocks * c, LoopKind.PARALLEL, "channel_block") as step:
            block, ci = step // c, step % c

            def at(xi: int, channel: Expr, tile: Expr) -> Expr:
                return ((block * 16 + xi) * (c + 1) + channel) * columns + tile

            with k.loop(rows, LoopKind.SERIAL, "tile_row") as row:
                ni, ty = _image_row(block, row, rows, th)
                _transform_input_row(
                    k,
                    x,
                    (ni, ci, ty),
                    (tw, self.pads),
                    lambda xi, tx, value: k.store(out, at(xi, ci, row * tw + tx), value),
                )
            if columns > rows * tw:
                with k.loop(columns - rows * tw, LoopKind.VECTOR_MASKED, "pad") as t:
                    for xi in range(16):
                        k.store(out, at(xi, ci, rows * tw + t), zero)
            with k.when(ci.eq(c - 1)):
                with whole_vectors(k, columns, "t") as t:
                    for xi in range(16):
                        k.store(out, at(xi, const(c, "int64"), t), zero)


def _transform_input_row(
    k: KernelBuilder,
    x: Buffer,
    at: tuple[Expr, Expr, Expr],
    tiles: tuple[int, tuple[int, ...]],
    store: Callable[[int, Expr, Expr], None],
) -> None:
    """Bᵀ d B of the tw tiles of tile row ty of channel ci of image ni, at = (ni, ci,
    ty), tiles = (tw, pads): store(plane, tile, value) for each of the 16. The tiles
    whose columns lie in x are the vector lanes (x read at stride 2), their rows outside
    x zeros (one condition a row); the few at the left and right edges, whose windows
    take columns of the padding, run one at a time, each value guarded. The same rows of
    the next channel are prefetched: the transforms run channel after channel, each a
    short stream the hardware prefetchers meet too late (ResNet-18's 128-channel conv at
    batch 32, fused: 34.4 -> 32.3 ms)."""
    ni, ci, ty = at
    tw, (top, left, bottom, _) = tiles
    _, c, h, w = x.shape
    lines, inside = [], []
    for i in range(4):
        y = ty * 2 + i - top
        inside.append(in_range(y, 0, h) if top or bottom else None)
        safe = y if inside[-1] is None else select(inside[-1], y, const(0, "int64"))
        lines.append(((ni * c + ci) * h + safe) * w)

    def transform(tx: Expr, load: Callable[[int, int], Expr]) -> None:
        tile = [k.local(x.dtype, load(i, j), "d").ref for i in range(4) for j in range(4)]
        for xi, value in enumerate(_two_sided(tile, _input_column)):
            store(xi, tx, value)

    def row_value(i: int, value: Expr) -> Expr:
        return value if inside[i] is None else select(inside[i], value, k_const(x, 0.0))

    for line in lines:  # the next channel's rows, which the next channel's transform reads
        for column in range(0, w, CACHE_LINE // ITEMSIZE[x.dtype]):
            k.prefetch(x, minimum(line + h * w + column, x.numel - 1))

    first = -(-left // 2)  # the first tile whose window starts in x
    last = min(tw - 1, (w + left - 4) // 2)  # the last whose window ends in x
    if last >= first:
        with whole_vectors(k, last - first + 1, "tx") as t:
            tx = t + first
            transform(tx, lambda i, j: row_value(i, x.load_flat(lines[i] + tx * 2 + j - left)))
    for edge in [*range(min(first, tw)), *range(max(last + 1, first), tw)]:
        tx = const(edge, "int64")

        def guarded(i: int, j: int, edge: int = edge) -> Expr:
            column = edge * 2 + j - left
            if 0 <= column < w:
                return row_value(i, x.load_flat(lines[i] + column))
            return k_const(x, 0.0)

        transform(tx, guarded)


def _output_block(
    k: KernelBuilder,
    out: Buffer,
    bias: Buffer | None,
    at: tuple[Expr, Expr, int],
    th: int,
    load: Callable[[int, Expr, Expr], Expr],
    epilogue,
) -> None:
    """Aᵀ m A + bias of filter oi's tiles in a block of `rows` tile rows, at = (block,
    oi, rows), tile row by tile row, a row's tiles the vector lanes (load(plane, row,
    tile): a tile's 16 products), through the epilogue into out (N, O, OH, OW), stored
    at stride 2. An odd output height leaves an image's last tile row's second row out;
    an odd width, the last tile's second column."""
    block, oi, rows = at
    _, o, oh, ow = out.shape
    start = bias.load_flat(oi) if bias is not None else k_const(out, 0.0)
    with k.loop(rows, LoopKind.SERIAL, "tile_row") as row:
        ni, ty = _image_row(block, row, rows, th)

        def run(first: int, count: int, height: int, width: int) -> None:
            with whole_vectors(k, count, "tx") as dx:
                tx = dx + first
                y = _two_sided([load(xi, row, tx) for xi in range(16)], _output_column)
                for i in range(height):
                    for j in range(width):
                        yy, xx = ty * 2 + i, tx * 2 + j
                        flat = ((ni * o + oi) * oh + yy) * ow + xx
                        value = y[2 * i + j] + start
                        if epilogue is not None:
                            value = epilogue(value, flat, [ni, oi, yy, xx])
                        k.store(out, flat, value)

        def tile_row(height: int) -> None:
            run(0, ow // 2, height, 2)
            if ow % 2:
                run(ow // 2, 1, height, 1)

        if oh % 2 == 0:
            tile_row(2)
        else:
            with k.when(ty.lt(th - 1)):
                tile_row(2)
            with k.when(ty.eq(th - 1)):
                tile_row(1)


def _image_row(block: Expr, row: Expr, rows: int, th: int) -> tuple[Expr, Expr]:
    """The image and tile row of a block's row (blocks of `rows` tile rows, th an image)."""
    tile_row = block * rows + row
    return tile_row // th, tile_row % th


def _padded_hw(shape: tuple[int, ...], pads: tuple[int, ...]) -> tuple[int, int]:
    """The height and width of an (N, C, H, W) input with `pads` (top, left, bottom, right) around it."""
    return shape[2] + pads[0] + pads[2], shape[3] + pads[1] + pads[3]


def _window_tiles(shape: tuple[int, ...], pads: tuple[int, ...]) -> tuple[int, int]:
    """Tile rows and columns of an input whose padded windows are 2·TH + 2 x 2·TW + 2."""
    h, w = _padded_hw(shape, pads)
    return (h - 2) // 2, (w - 2) // 2


@register("winograd_output", Fusion.INJECTIVE)
class WinogradOutput(Op):
    """M (B, 16, O + 1, S) [, bias (O,)] → y (N, O, OH, OW) = out_shape: each tile's 2x2
    outputs, Aᵀ m A, plus the bias (see the module docstring)."""

    differentiation = Gradient.NONE  # made by a compiler pass, for inference
    gpu_per_iteration = True
    arity = (1, 2)
    accepts_epilogue = True
    out_shape: tuple[int, int, int] = (1, 1, 1)  # N, OH, OW

    def infer(self, m: TensorType, bias: TensorType | None = None) -> TensorType:
        n, oh, ow = self.out_shape
        th, tw = tiles((oh, ow))
        if m.rank != 4 or m.shape[2] < 2 or m.shape != blocked_shape(n, m.shape[2] - 1, th, tw):
            raise GraphError(
                f"winograd_output: expects {blocked_shape(n, max(m.shape[2:3] or (2,)) - 1, th, tw)} "
                f"(blocks, 16, O + 1, tiles a block) for output {self.out_shape}, got {m.shape}"
            )
        o = m.shape[2] - 1
        if bias is not None and (bias.shape != (o,) or bias.dtype != m.dtype):
            raise GraphError(f"winograd_output: bias {bias}, expected {m.dtype}[{o}]")
        return m.with_shape((n, o, oh, ow))

    def reference(self, m, bias=None):
        n, oh, ow = self.out_shape
        th, tw = tiles((oh, ow))
        o = m.shape[2] - 1
        per_block = block_tiles(n, th, tw)[0] * tw
        tiles_m = m[:, :, :o, :per_block].transpose(1, 2, 0, 3).reshape(4, 4, o, n, th, tw).astype(np.float64)
        y = np.einsum("ia,abonyx,jb->noyixj", A_T, tiles_m, A_T).reshape(n, o, 2 * th, 2 * tw)
        y = y[:, :, :oh, :ow]
        if bias is not None:
            y = y + bias.reshape(1, o, 1, 1)
        return y.astype(m.dtype)

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """Per parallel step one filter of one block, tile row by tile row, a row's tiles
        the vector lanes (contiguous in M's block)."""
        m = ins[0]
        bias = ins[1] if len(ins) > 1 else None
        blocks, o, columns = m.shape[0], m.shape[2] - 1, m.shape[3]
        th, tw = tiles(self.out_shape[1:])
        rows = block_tiles(self.out_shape[0], th, tw)[0]
        with k.loop(blocks * o, LoopKind.PARALLEL, "filter_block") as step:
            block, oi = step // o, step % o
            plane = (block * 16 * (o + 1) + oi) * columns

            def load(xi: int, row: Expr, tx: Expr) -> Expr:
                return m.load_flat(plane + xi * (o + 1) * columns + row * tw + tx)

            _output_block(k, out, bias, (block, oi, rows), th, load, epilogue)


#: the most floats a fused conv's block of transformed tiles (16 x (C + 1) x columns)
#: may take, in a scratch on each thread's stack: 272 KiB, so that it stays in a Zen 4
#: core's 1 MiB L2 while the transformed weights (1 MiB at 128 channels) stream past
#: (blocks of 64 columns at 128 channels, 528 KiB, ran no faster than unfused)
FUSED_TILES = 17 << 12
#: the most floats of a block's transformed tiles that one product's column tiles sweep
#: (C x a strip of columns): 16 KiB, in L1 beside the sums (128 channels: strips of
#: 32 columns, 8 x 32 register tiles)
STRIP_FLOATS = 1 << 12
#: filters whose products a fused conv keeps at once (16 x this x columns floats, in L1)
FUSED_FILTERS = 16
#: floats of V and M that stay in L2 between the unfused ops: a conv whose V and M
#: take more is fused (ResNet-18's layer1 at batch 1: 784 tiles, V and M 3.2 MB each,
#: went to memory and back; the model on one thread 18.7 -> 17.1 ms fused)
UNFUSED_CACHED_FLOATS = 1 << 19
#: blocks a thread takes from which an uneven share is small beside them (ResNet-18's
#: layer2 at batch 1: 7 blocks of 28 tiles split 4 : 3 between two threads took 0.55 ms
#: a conv against 0.47 unfused)
FUSED_STEPS_PER_THREAD = 8


def _fused_block(n: int, channels: int, th: int, tw: int) -> tuple[int, int, int] | None:
    """(tile rows, columns, strip) of a fused conv's blocks, or None where the op does
    not pay: the tile rows the most whose transformed tiles fit FUSED_TILES, the
    columns their tiles padded to whole strips (a strip of whole vectors, a power of
    two, keeps its sums in registers over all channels: 56 columns, masked, ran 25%
    slower than the unfused product). None where strips would be narrower than two
    vectors."""
    strip = min(MATMUL_COL_TILE, 1 << (STRIP_FLOATS // channels).bit_length() - 1)
    rows = block_rows(n * th, tw, FUSED_TILES // (16 * (channels + 1)) // strip * strip, one_block=0)
    columns = -(-rows * tw // strip) * strip
    if strip < 2 * MATMUL_VECTOR or 16 * (channels + 1) * columns > FUSED_TILES:
        return None
    return rows, columns, strip


def fused_pays(n: int, channels: int, th: int, tw: int, threads: int = 1) -> bool:
    """Whether winograd_conv2d takes a conv of n images of th x tw tiles of `channels`
    channels: where V and M (as many channels out as in) take more than
    UNFUSED_CACHED_FLOATS (less stays in cache between the three ops, which split the
    work finer between threads), there are blocks (_fused_block), and `threads`
    threads share them, its parallel steps, evenly: a multiple of them, or
    FUSED_STEPS_PER_THREAD each or more."""
    block = _fused_block(n, channels, th, tw)
    if block is None or 2 * 16 * (channels + 1) * n * th * tw <= UNFUSED_CACHED_FLOATS:
        return False
    blocks = n * th // block[0]
    return blocks % threads == 0 or blocks >= FUSED_STEPS_PER_THREAD * threads


@register("winograd_conv2d", Fusion.CONTRACTION)
class WinogradConv2d(Op):
    """winograd_output(matmul(u, winograd_input(x)), bias) in one kernel: x and pads as
    winograd_input takes them, u = (16, O + 1, C + 1) transformed weights. A parallel step
    takes one block of tiles (_fused_block) through all three: its transformed tiles
    (16 x (C + 1) x columns) stay in a scratch in L2, the products of FUSED_FILTERS
    filters at a time in another in L1, and only the outputs are stored. Unfused, V and M (16 values a
    tile for each channel and filter: 4x the conv's input and output) go to memory and
    back, which at batch 32 took as long as the product itself."""

    differentiation = Gradient.NONE  # made by a compiler pass, for inference
    #: a GPU thread per block (the pass makes this op for the CPU only)
    gpu_per_iteration = True
    arity = (2, 3)
    accepts_epilogue = True
    out_shape: tuple[int, int, int] = (1, 1, 1)  # N, OH, OW
    pads: tuple[int, ...] = (0, 0, 0, 0)  # as winograd_input's

    def infer(self, x: TensorType, u: TensorType, bias: TensorType | None = None) -> TensorType:
        _require_float("winograd_conv2d", x, u)
        v = WinogradInput(pads=self.pads).infer(x)
        if u.rank != 3 or u.shape[0] != 16 or u.shape[2] != x.shape[1] + 1 or u.dtype != x.dtype:
            raise GraphError(
                f"winograd_conv2d: weights {u} are not (16, O + 1, {x.shape[1] + 1}) of {x.dtype}"
            )
        m = v.with_shape((v.shape[0], 16, u.shape[1], v.shape[3]))
        return WinogradOutput(out_shape=self.out_shape).infer(m, bias)

    def reference(self, x, u, bias=None):
        m = np.matmul(u, WinogradInput(pads=self.pads).reference(x))
        return WinogradOutput(out_shape=self.out_shape).reference(m, bias)

    def lower(self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue=None) -> None:
        """Per parallel step one block: its tiles transformed into a scratch, channel by
        channel (its columns padded to whole column tiles with zeros, whose products
        nothing reads); then per group of filters the 16 products (the product kernels'
        register tiles) into a second scratch, and each filter's outputs from it. Both
        scratches hold a spare row per plane, so that a tile's 16 values do not lie a
        multiple of 4 KiB apart (see the module docstring)."""
        x, u = ins[0], ins[1]
        bias = ins[2] if len(ins) > 2 else None
        n, c = x.shape[:2]
        th, tw = _window_tiles(x.shape, self.pads)
        o = u.shape[1] - 1
        shape = _fused_block(n, c, th, tw)
        if shape is None:
            raise InternalCompilerError(f"winograd_conv2d: no fused block for {x.shape} (see fused_pays)")
        rows, columns, strip = shape
        per_block = rows * tw
        group = next(g for g in range(min(o, FUSED_FILTERS), 0, -1) if o % g == 0)
        with k.loop(n * th // rows, LoopKind.PARALLEL, "block") as block:
            v = k.scratch("tiles", x.dtype, (16 * (c + 1) * columns,))
            if columns > per_block:  # the spare rows' too: one loop
                with k.loop(16 * (c + 1), LoopKind.SERIAL, "plane_row") as pr:
                    with k.loop(columns - per_block, LoopKind.VECTOR, "pad") as j:
                        k.store(v, pr * columns + per_block + j, k_const(v, 0.0))
            with k.loop(c, LoopKind.SERIAL, "channel") as ci:
                with k.loop(rows, LoopKind.SERIAL, "tile_row") as row:

                    def store(xi: int, tx: Expr, value: Expr) -> None:
                        k.store(v, (xi * (c + 1) + ci) * columns + row * tw + tx, value)

                    ni, ty = _image_row(block, row, rows, th)
                    _transform_input_row(k, x, (ni, ci, ty), (tw, self.pads), store)
            m = k.scratch("products", out.dtype, (16 * (group + 1) * columns,))
            with k.loop(o // group, LoopKind.SERIAL, "filters") as fg:
                with (
                    k.loop(16, LoopKind.SERIAL, "plane") as xi,
                    k.loop(columns // strip, LoopKind.SERIAL, "strip") as sj,
                ):
                    first_col = sj * strip
                    tiled_product(
                        k, group, strip, c,
                        lambda f, t: u.load_flat((xi * (o + 1) + fg * group + f) * (c + 1) + t),
                        lambda t, j: v.load_flat((xi * (c + 1) + t) * columns + first_col + j),
                        m, lambda f, j: (xi * (group + 1) + f) * columns + first_col + j,
                    )  # fmt: skip
                with k.loop(group, LoopKind.SERIAL, "filter") as f:

                    def load(xi: int, row: Expr, tx: Expr) -> Expr:
                        return m.load_flat((xi * (group + 1) + f) * columns + row * tw + tx)

                    _output_block(k, out, bias, (block, fg * group + f, rows), th, load, epilogue)
