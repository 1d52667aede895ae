"""Every registered op, compiled, against its numpy reference on fresh random inputs.

CASES holds each op's input shapes and attributes: sizes 1, 7 and 33 exercise the
vector loops' tails, a large size the parallel path, and mixed shapes broadcasting.
A registered op with no cases fails `test_every_op_has_cases`, so a new op is
tested the moment it is added. Each case runs on the CPU and as its GPU schedule
(the cuda-sim target: the GPU kernels run on the CPU exactly), at the same
tolerances, and the GPU kernels of all the cases go through ptxas together.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest

from codegen import cpu, kir, nvptx
from codegen.kir import AVX2, AVX512, VectorUnit
from codegen.kir_print import kernel_text
from compiler import compile_model
from compiler.driver import lower_graph
from ir.builder import GraphBuilder
from ir.graph import Graph
from ir.interpreter import interpret
from ir.ops import REGISTRY, Fusion, nn
from ir.ops.nn import matmul_col_tile, matmul_rows, packed_conv_tile
from tests.helpers import run_kernel


@dataclass
class In:
    shape: tuple[int, ...]
    kind: str = "normal"  # normal | positive | nonzero | small | wide | bool | index:N | count:N | key_mask
    dtype: str = "float32"

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(self._draw(rng))

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        s = self.shape
        if self.kind == "bool":
            return rng.random(s) < 0.5
        if self.kind.startswith("count:"):
            return rng.integers(0, int(self.kind.split(":")[1]), s).astype(self.dtype)
        if self.kind.startswith("index:"):
            n = int(self.kind.split(":")[1])
            return rng.integers(-n, n, s).astype(self.dtype)
        if self.dtype.startswith("int"):
            return rng.integers(-50, 50, s).astype(self.dtype)
        if self.kind == "halves":  # ties, where round-half-to-even matters
            return np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.0][: s[0]], self.dtype)
        if self.kind == "huge":  # exp(x) overflows float32 here
            return rng.uniform(80, 200, s).astype(self.dtype) * rng.choice([-1, 1], s)
        if self.kind == "key_mask":  # a sequence's keys: 0 for a random length, then -inf
            return np.where(np.arange(s[0]) < rng.integers(1, s[0] + 1), 0.0, -np.inf).astype(self.dtype)
        if self.kind == "specials":
            x = rng.standard_normal(s)
            x[rng.random(s) < 0.3] = np.inf
            x[rng.random(s) < 0.3] = -np.inf
            x[rng.random(s) < 0.2] = np.nan
            return x.astype(self.dtype)
        if self.kind == "positive":
            x = rng.uniform(0.05, 5.0, s)
        elif self.kind == "nonzero":
            x = rng.choice([-1.0, 1.0], s) * rng.uniform(0.3, 3.0, s)
        elif self.kind == "small":  # weights at the scale trained recurrences keep (not chaotic)
            x = rng.standard_normal(s) * 0.05
        elif self.kind == "wide":
            x = rng.standard_normal(s) * 4
        else:
            x = rng.standard_normal(s)
        return x.astype(self.dtype)


@dataclass
class Case:
    inputs: list[In]
    attrs: dict = field(default_factory=dict)
    params: tuple[int, ...] = ()  # which inputs are weights (params) rather than inputs


def unary(kind: str = "normal", **attrs) -> list[Case]:
    return [Case([In((n,), kind)], attrs) for n in (1, 7, 33, 40000)] + [Case([In((3, 5, 33), kind)], attrs)]


def binary(kind_b: str = "normal", kind_a: str = "normal", dtype: str = "float32") -> list[Case]:
    pairs = [
        ((1,), (1,)),
        ((7,), (7,)),
        ((33,), (33,)),
        ((40000,), (40000,)),
        ((7, 33), (33,)),
        ((5, 1, 33), (7, 1)),
        ((4, 7), ()),
        ((1,), (9, 33)),
    ]
    return [Case([In(a, kind_a, dtype), In(b, kind_b, dtype)]) for a, b in pairs]


CASES: dict[str, list[Case]] = {
    "add": binary() + binary(dtype="int64")[:4],
    "sub": binary(),
    "mul": binary() + binary(dtype="int64")[4:],
    "div": binary("nonzero") + [Case([In((7, 33), dtype="int64"), In((33,), dtype="int64")])],
    "pow": binary(kind_a="positive") + [Case([In((33,), "index:6", "int64"), In((33,), "count:4", "int64")])],
    "maximum": binary() + binary(dtype="int64")[:3],
    "minimum": binary(),
    "neg": unary(),
    "abs": unary(),
    "exp": unary("wide"),
    "log": unary("positive"),
    "sqrt": unary("positive"),
    "rsqrt": unary("positive"),
    "reciprocal": unary("nonzero"),
    "tanh": unary("wide"),
    "sigmoid": unary("wide"),
    "erf": unary("wide"),
    "relu": unary(),
    "leaky_relu": unary(alpha=0.2),
    "elu": unary(alpha=0.7),
    "gelu": unary("wide") + unary("wide", approximate="tanh"),
    "clip": unary(min=-0.5, max=0.8),
    "equal": [
        Case([In((7, 33), "normal", "int64"), In((33,), "normal", "int64")]),
        Case([In((40000,), "bool"), In((40000,), "bool")]),
    ],
    "less": binary(),
    "greater": binary(),
    "where": [
        Case([In((7, 33), "bool"), In((7, 33)), In((33,))]),
        Case([In((40000,), "bool"), In((40000,)), In((40000,))]),
        Case([In((5, 1), "bool"), In((1, 7)), In(())]),
    ],
    "cast": [
        Case([In((33,))], {"to": "int64"}),
        Case([In((7, 5), "normal", "int64")], {"to": "float32"}),
        Case([In((33,), "bool")], {"to": "float32"}),
        Case([In((7,))], {"to": "bool"}),
        Case([In((40000,))], {"to": "float64"}),
    ],
    "matmul": [
        Case([In((1, 1), "small"), In((1, 1), "small")]),
        Case([In((7, 33)), In((33, 7))]),
        Case([In((33, 65)), In((65, 40))]),
        Case([In((2, 3, 7, 33)), In((3, 33, 5))]),
        Case([In((33,)), In((33, 7))]),
        Case([In((4, 7, 33)), In((33,))]),
        Case([In((128, 96)), In((96, 300))]),
        # 50 rows: 8 blocks of 6 and 2 more on AVX2, in the last of each matrix's groups
        Case([In((3, 50, 120)), In((3, 120, 200))]),
        # one or two rows: the column tiles split between parallel steps (4 of 1, 2 of 2)
        Case([In((100,)), In((100, 256))]),
        # AVX-512: 65 rows (Winograd's planes) as 16 blocks of 4 and a rest row; 70 rows of
        # one vector's 16 columns as 4 blocks of 16 and a rest of 6
        Case([In((2, 65, 65)), In((2, 65, 160))]),
        Case([In((2, 70, 500)), In((500, 16))]),
        Case([In((2, 30)), In((30, 128))]),
        # b a matrix (rows of 1 KiB or more): packed at run time (pack_panels), then a
        # linear_packed; b batched: its column panels copied to a scratch in blocks of 128
        # of its 300 rows (the last 44), for 32 rows a step; 288 columns: four tiles and
        # one overlapping the last; 96 columns (384 bytes a row) read in place
        Case([In((2, 64, 300)), In((300, 288))]),
        Case([In((2, 64, 300)), In((2, 300, 288))]),
        Case([In((2, 64, 300)), In((300, 96))]),
    ],
    "linear": [
        Case([In((1, 40)), In((40, 192)), In((192,))], params=(1, 2)),  # 3 steps of one tile
        # weights as an input, rows 1152 bytes (18 lines) apart: copied in k blocks
        Case([In((64, 300)), In((300, 288)), In((288,))]),
        # rows 1040 bytes apart, not whole lines: they spread over L1's sets, read in place
        Case([In((64, 300)), In((300, 260)), In((260,))]),
        Case([In((1, 7)), In((7, 1)), In((1,))], params=(1, 2)),
        Case([In((33, 70)), In((70, 40)), In((40,))], params=(1, 2)),
        Case([In((2, 5, 33)), In((33, 7))], params=(1,)),
        Case([In((256, 128)), In((128, 200)), In((200,))], params=(1, 2)),
    ],
    "linear_packed": [  # packed weights (panels, K, 16); columns past out_features ignored
        Case([In((33, 70)), In((5, 70, 16)), In((70,))], {"out_features": 70}, params=(1, 2)),
        Case([In((1, 40)), In((12, 40, 16)), In((192,))], {"out_features": 192}, params=(1, 2)),
        Case([In((2, 5, 33)), In((1, 33, 16))], {"out_features": 7}, params=(1,)),
        Case([In((96, 64)), In((8, 64, 16)), In((128,))], {"out_features": 128}, params=(1, 2)),
        Case([In((6, 300)), In((3, 300, 16))], {"out_features": 48}, params=(1,)),
    ],
    "conv2d": [
        Case([In((1, 1, 7, 7)), In((4, 1, 3, 3)), In((4,))], params=(1, 2)),
        Case([In((2, 3, 9, 11)), In((5, 3, 3, 3))], {"pads": (1, 1, 1, 1)}, params=(1,)),
        Case(
            [In((1, 4, 12, 10)), In((6, 2, 3, 2)), In((6,))],
            {"strides": (2, 1), "pads": (1, 0, 2, 1), "dilations": (1, 2), "groups": 2},
            params=(1, 2),
        ),
        Case([In((2, 8, 9, 9)), In((8, 1, 3, 3))], {"groups": 8, "pads": (1, 1, 1, 1)}, params=(1,)),
        # few taps (3 x 3 x 3), constant weights: by output rows, 20 filters in groups of 10
        Case(
            [In((2, 3, 11, 37)), In((20, 3, 3, 3)), In((20,))],
            {"strides": (2, 1), "pads": (1, 0, 1, 2), "dilations": (1, 2)},
            params=(1, 2),
        ),
        Case(
            [In((1, 32, 33, 33)), In((16, 32, 5, 5)), In((16,))],
            {"strides": (2, 2), "pads": (2, 2, 2, 2)},
            params=(1, 2),
        ),
    ],
    "im2col": [
        Case([In((1, 1, 7, 7))], {"kernel": (3, 3)}),
        Case(
            [In((2, 3, 9, 11))],
            {"kernel": (3, 2), "strides": (2, 1), "pads": (1, 0, 2, 1), "dilations": (1, 2)},
        ),
    ],
    "conv2d_gemm": [
        Case([In((1, 9, 5, 5)), In((4, 1, 3, 3)), In((4,))], params=(1, 2)),
        Case([In((2, 32, 7, 33)), In((5, 8, 2, 2))], params=(1,)),
    ],
    "conv2d_packed": [  # packed weights (panels, C*KH*KW, NR); filters past out_channels ignored
        Case([In((1, 3, 9, 9)), In((1, 27, 16)), In((5,))], {"out_channels": 5}, params=(1, 2)),
        Case([In((2, 8, 11, 12)), In((2, 72, 32)), In((64,))], {"out_channels": 64}, params=(1, 2)),
        Case(
            [In((1, 4, 13, 12)), In((1, 24, 48))],
            {"kernel": (3, 2), "strides": (2, 1), "dilations": (1, 2), "out_channels": 40},
            params=(1,),
        ),
        Case([In((1, 16, 4, 4)), In((2, 144, 32)), In((64,))], {"out_channels": 64}, params=(1, 2)),
        Case([In((1, 7, 7, 7)), In((1, 63, 16))], {"out_channels": 3}, params=(1,)),
        # 32 of a panel's 48 filters: as AVX2 schedules it, tiles of 16 filters, the
        # third all past out_channels and not stored
        Case([In((1, 4, 9, 9)), In((1, 36, 48))], {"out_channels": 32}, params=(1,)),
        # an input over 1 MiB and weights under it: each block through its three panels
        # in turn (1x1, stride 2, 40 of 48 filters); weights over 1 MiB: each panel
        # through all the blocks, whatever the threads
        Case(
            [In((2, 40, 60, 60)), In((3, 40, 16))],
            {"kernel": (1, 1), "strides": (2, 2), "out_channels": 40},
            params=(1,),
        ),
        Case([In((1, 64, 10, 10)), In((8, 576, 64))], {"out_channels": 512}, params=(1,)),
        # weights over PACKED_CONV_SLAB_WEIGHTS: taps in slabs, blocks in groups, a tail
        # block: 196 positions as 32 blocks of 6 (3 groups of 11, the last short) and 4;
        # 500 of 512 filters. Of stride 2, batch 2, panels of 32: 16 positions, one
        # block of 10 and a tail of 6
        Case([In((1, 256, 16, 16)), In((8, 2304, 64)), In((500,))], {"out_channels": 500}, params=(1, 2)),
        Case([In((2, 128, 9, 9)), In((36, 1152, 32))], {"out_channels": 1152, "strides": (2, 2)}, (1,)),
        # max-pooled in 2x2 windows: the MNIST CNN's second conv (11x11, its last row and
        # column in no window); panels of 16 (3 windows a tile, the last run of a row
        # overlapping; 10 of 16 filters); stride 2
        Case(
            [In((2, 32, 13, 13)), In((1, 288, 64)), In((64,))], {"out_channels": 64, "pool": 2}, params=(1, 2)
        ),
        Case([In((1, 4, 12, 17)), In((1, 36, 16))], {"out_channels": 10, "pool": 2}, params=(1,)),
        Case([In((1, 8, 15, 15)), In((1, 72, 32))], {"out_channels": 32, "strides": (2, 2), "pool": 2}, (1,)),
        # max-pooled in overlapping or padded windows, through a ring of conv rows:
        # ResNet's first conv and 3x3 pool of stride 2 (7x7 stride 2, 3 channels); two
        # bands of pooled rows (16 rows, 10 of 16 filters); 2x2 windows of stride 1;
        # 3x3 windows of stride 3 padded by 1 (two panels)
        Case(
            [In((2, 3, 36, 36)), In((1, 147, 64)), In((64,))],
            {
                "kernel": (7, 7),
                "strides": (2, 2),
                "out_channels": 64,
                "pool": 3,
                "pool_stride": 2,
                "pool_pad": 1,
            },
            params=(1, 2),
        ),
        Case(
            [In((1, 4, 33, 20)), In((1, 36, 16)), In((10,))],
            {"out_channels": 10, "pool": 3, "pool_stride": 2, "pool_pad": 1},
            params=(1, 2),
        ),
        Case([In((1, 5, 9, 11)), In((1, 45, 48))], {"out_channels": 40, "pool": 2, "pool_stride": 1}, (1,)),
        Case(
            [In((2, 2, 10, 10)), In((2, 18, 32))],
            {"out_channels": 64, "pool": 3, "pool_stride": 3, "pool_pad": 1},
            params=(1,),
        ),
    ],
    # softmax(q @ kt) @ v: rows in steps of 16 (37: the last step overlapping; 3: one
    # short step), key and value widths of whole tiles, a tile and a rest, and masked;
    # a key bias masking keys past a length (a padded sequence's)
    # a run-time matrix packed into 16-column panels: one panel, several
    "pack_panels": [Case([In((7, 16))]), Case([In((33, 64))])],
    "attention": [
        Case([In((2, 3, 37, 16)), In((2, 3, 16, 50)), In((2, 3, 50, 24))]),
        Case([In((2, 3, 37, 16)), In((2, 3, 16, 50)), In((2, 3, 50, 24)), In((50,), "key_mask")]),
        Case([In((64, 128)), In((128, 80)), In((80, 70))]),
        Case([In((3, 5)), In((5, 7)), In((7, 9), "wide")]),
    ],
    # input columns dealt into `pool` planes: the MNIST CNN's first layer (26x26 conv in
    # 2x2 windows), and an 11x11 dilated conv in 3x3 windows whose last rows and columns
    # fill no window
    "conv2d_pooled": [
        Case(
            [In((2, 1, 28, 2, 14)), In((1, 9, 32)), In((32,))], {"out_channels": 32, "pool": 2}, params=(1, 2)
        ),
        Case(
            [In((1, 2, 13, 3, 5)), In((1, 18, 16))],
            {"out_channels": 7, "pool": 3, "dilations": (1, 2)},
            params=(1,),
        ),
    ],
    # Winograd F(2x2, 3x3): tile rows of 5 (a masked vector), 10 (vectors on AVX2, masked
    # on AVX-512) and 28 (whole vectors, the last one overlapping); one block each but
    # the last: 2 x 23 tile rows of 23, in 23 blocks of 2 rows
    "winograd_input": [
        Case([In((2, 3, 10, 12))]),
        Case([In((1, 4, 22, 22))]),
        Case([In((1, 5, 58, 58))]),
        Case([In((2, 2, 48, 48))]),
        # the padding read as zeros: edge tiles on both sides, rows above and below (two);
        # 28 tiles a row, 26 of them inside x (a vector and an overlapping one); no left pad
        Case([In((2, 3, 9, 11))], {"pads": (1, 1, 2, 2)}),
        Case([In((1, 2, 56, 56))], {"pads": (1, 1, 1, 1)}),
        Case([In((1, 3, 7, 7))], {"pads": (0, 0, 1, 1)}),
    ],
    # M (blocks, 16, O + 1, columns: a block's tiles padded to whole vectors); odd
    # heights and widths end mid-tile
    "winograd_output": [
        Case([In((1, 16, 6, 48)), In((5,))], {"out_shape": (2, 8, 9)}, params=(1,)),
        Case([In((1, 16, 4, 16))], {"out_shape": (1, 7, 7)}),
        Case([In((1, 16, 3, 112))], {"out_shape": (1, 19, 20)}),
        Case([In((1, 16, 3, 784)), In((2,))], {"out_shape": (1, 56, 56)}),
        Case([In((23, 16, 3, 48)), In((2,))], {"out_shape": (2, 45, 46)}),
    ],
    # the three Winograd ops as one: 4 blocks of 16 tile rows of 33 (columns padded to
    # 576), 5 filters, odd height and width; 64 blocks of one row of 32 tiles, strips of
    # 32 columns at 128 channels, filters in two groups of 10
    "winograd_conv2d": [
        Case([In((2, 4, 66, 68)), In((16, 6, 5)), In((5,))], {"out_shape": (2, 63, 65)}, params=(1, 2)),
        Case([In((2, 128, 66, 66)), In((16, 21, 129))], {"out_shape": (2, 64, 64)}, params=(1,)),
        # the first case's input unpadded: its padding read as zeros
        Case(
            [In((2, 4, 63, 65)), In((16, 6, 5)), In((5,))],
            {"out_shape": (2, 63, 65), "pads": (1, 1, 2, 2)},
            params=(1, 2),
        ),
    ],
    # Σ_n a[n] · b[n]ᵀ: rows and columns that end mid-tile, k that ends mid-vector
    # (the last vector overlaps the one before), k shorter than a vector, b with more
    # rows than a (the operands trade places), float64 (half the lanes); a's rows over
    # 512 KiB: parallel steps of 5 row tiles (AVX2: 8), the last one short
    "matmul_nt_sum": [
        Case([In((4, 50, 1000)), In((4, 7, 1000))]),
        Case([In((3, 10, 37)), In((3, 7, 37))]),
        Case([In((2, 5, 9)), In((2, 20, 9))]),
        Case([In((4, 64, 121)), In((4, 17, 121))]),
        Case([In((1, 3, 16)), In((1, 2, 16))]),
        Case([In((2, 9, 21), dtype="float64"), In((2, 11, 21), dtype="float64")]),
    ],
    "avg_pool2d_backward": [
        Case(
            [In((2, 3, 4, 4))],
            {"input_shape": (2, 3, 7, 8), "kernel": (3, 2), "strides": (2, 2), "pads": (1, 0, 1, 0)},
        ),
        Case(
            [In((1, 2, 3, 3))],
            {
                "input_shape": (1, 2, 5, 5),
                "kernel": (2, 2),
                "strides": (2, 2),
                "pads": (0, 0, 1, 1),
                "count_include_pad": True,
            },
        ),
    ],
    "max_pool2d_backward": [  # random indices: those in their window are routed, others dropped
        Case(
            [In((1, 1, 2, 2), "count:16", "int64"), In((1, 1, 2, 2))],
            {"input_shape": (1, 1, 4, 4), "kernel": (2, 2), "strides": (2, 2)},
        ),
        Case(
            [In((2, 3, 3, 4), "count:70", "int64"), In((2, 3, 3, 4))],
            {"input_shape": (2, 3, 7, 8), "kernel": (3, 2), "strides": (2, 2), "pads": (1, 0, 0, 0)},
        ),
    ],
    "col2im": [  # overlapping windows summed; strides, dilations and pads skip and crop
        Case([In((2, 3 * 9, 5, 6))], {"input_shape": (2, 3, 7, 8), "kernel": (3, 3)}),
        Case(
            [In((1, 2 * 6, 3, 4))],
            {
                "input_shape": (1, 2, 7, 8),
                "kernel": (3, 2),
                "strides": (2, 2),
                "pads": (1, 0, 0, 1),
                "dilations": (1, 2),
            },
        ),  # fmt: skip
    ],
    "max_pool2d_tiled_backward": [  # windows that do not cover the last rows/columns get 0
        Case([In((2, 3, 8, 6)), In((2, 3, 4, 3))], {"kernel": (2, 2)}),
        Case([In((1, 2, 7, 9)), In((1, 2, 2, 4))], {"kernel": (3, 2)}),
        Case([In((3, 1, 5, 5), "count:3"), In((3, 1, 2, 2))], {"kernel": (2, 2)}),  # ties: the first max
    ],
    "max_pool2d": [
        Case(
            [In((2, 3, 7, 9))],
            {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "output": "indices"},
        ),
        Case(
            [In((1, 2, 6, 5))], {"kernel": (2, 2), "strides": (1, 1), "output": "indices", "storage_order": 1}
        ),
        Case([In((1, 3, 8, 8))]),
        Case([In((2, 3, 7, 9))], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
        Case([In((1, 2, 33, 33))], {"kernel": (2, 3), "strides": (1, 2), "dilations": (2, 1)}),
    ],
    "avg_pool2d": [
        Case([In((1, 3, 8, 8))]),
        Case([In((2, 3, 7, 9))], {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}),
        Case(
            [In((2, 3, 7, 9))],
            {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "count_include_pad": True},
        ),
        Case(  # ceil_mode's extra end padding, which the divisor does not count
            [In((2, 3, 8, 8))],
            {
                "kernel": (3, 3),
                "strides": (2, 2),
                "pads": (1, 1, 2, 2),
                "count_include_pad": True,
                "uncounted_end": (1, 1),
            },
        ),
    ],
    "global_avg_pool2d": [Case([In((1, 1, 1, 1))]), Case([In((2, 7, 33, 5))])],
    "batch_norm": [
        Case(
            [In((2, 7, 5, 5)), In((7,)), In((7,)), In((7,)), In((7,), "positive")],
            {"epsilon": 1e-3},
            params=(1, 2, 3, 4),
        ),
        Case([In((33, 3)), In((3,)), In((3,)), In((3,)), In((3,), "positive")], params=(1, 2, 3, 4)),
    ],
    "softmax": [
        Case([In((1,))]),
        Case([In((7, 33))]),
        Case([In((3, 33, 5))], {"axis": 1}),
        Case([In((64, 1000), "wide")]),
    ],
    "log_softmax": [Case([In((7, 33))]), Case([In((3, 33, 5))], {"axis": 0})],
    # recurrences: (xw, rt, initial states...); hidden 33 and 1 exercise the vector tails,
    # odd batches the one-row blocks, batches 6, 12, 36 and 40 chunks of several row groups
    "rnn": [
        Case([In((3, 12, 70)), In((70, 70), "small"), In((12, 70))], {"hidden": 70, "reverse": True}),
        # constant Rᵀ of whole panels: packed by the pass (a batch of one odd chunk)
        Case([In((6, 7, 48)), In((48, 48), "small"), In((7, 48))], {"hidden": 48}, params=(1,)),
        Case([In((5, 3, 33)), In((33, 33), "small"), In((3, 33))], {"hidden": 33}, params=(1,)),
        Case(
            [In((4, 2, 1)), In((1, 1), "small"), In((2, 1))],
            {"hidden": 1, "reverse": True, "activations": (("relu", ()),), "clip": 0.5},
        ),
    ],
    "gru": [
        Case(  # Rᵀ packed in panels of 16
            [In((4, 5, 3 * 32)), In((6, 32, 16), "small"), In((5, 32)), In((32,))],
            {"hidden": 32, "rt_panel": 16, "reverse": True},
        ),
        Case([In((3, 40, 3 * 37)), In((37, 111), "small"), In((40, 37)), In((37,))], {"hidden": 37}),
        Case(
            [In((5, 3, 3 * 33)), In((33, 99), "small"), In((3, 33)), In((33,))], {"hidden": 33}, params=(1, 3)
        ),
        Case(
            [In((6, 2, 3 * 7)), In((7, 21), "small"), In((2, 7)), In((7,))],
            {"hidden": 7, "linear_before_reset": True, "reverse": True},
        ),
    ],
    "lstm": [
        Case(  # packed Rᵀ; on AVX2 a block of 6 rows and one of the 2 left (8·8·64·256 MACs)
            [In((8, 8, 4 * 64)), In((16, 64, 16), "small"), In((8, 64)), In((8, 64)), In((192,))],
            {"hidden": 64, "rt_panel": 16},
        ),
        Case(  # batch 1: a tile of one row spans several panels
            [In((3, 1, 4 * 64)), In((64, 256), "small"), In((1, 64)), In((1, 64)), In((192,))],
            {"hidden": 64},
            params=(1,),
        ),
        Case(
            [In((3, 6, 4 * 50)), In((50, 200), "small"), In((6, 50)), In((6, 50)), In((150,))],
            {"hidden": 50, "reverse": True},
        ),
        Case(
            [In((2, 36, 4 * 20)), In((20, 80), "small"), In((36, 20)), In((36, 20)), In((60,))],
            {"hidden": 20},
        ),
        Case(
            [In((5, 3, 4 * 33)), In((33, 132), "small"), In((3, 33)), In((3, 33)), In((99,))],
            {"hidden": 33},
            params=(1, 4),
        ),
        Case(
            [In((4, 2, 4 * 7)), In((7, 28), "small"), In((2, 7)), In((2, 7)), In((21,))],
            {
                "hidden": 7,
                "reverse": True,
                "clip": 1.0,
                "activations": (("sigmoid", ()), ("relu", ()), ("tanh", ())),
            },
        ),
        Case(
            [In((64, 8, 4 * 256)), In((256, 1024), "small"), In((8, 256)), In((8, 256)), In((768,))],
            {"hidden": 256},
        ),
    ],
    "conv_transpose2d": [
        Case([In((1, 3, 5, 5)), In((3, 4, 3, 3)), In((4,))], params=(1, 2)),
        Case(
            [In((2, 4, 6, 7)), In((4, 3, 3, 2))],
            {
                "strides": (2, 3),
                "pads": (1, 0, 2, 1),
                "dilations": (1, 2),
                "output_padding": (1, 2),
                "groups": 2,
            },
            params=(1,),
        ),
        Case([In((2, 8, 16, 16)), In((8, 33, 4, 4))], {"strides": (2, 2), "pads": (1, 1, 1, 1)}, params=(1,)),
    ],
    # tap tables: indices in [-1, n) (a row with -1 extrapolates), random weights
    "resample": [
        Case([In((2, 3, 5, 6)), In((9, 1), "count:5", "int64"), In((9, 1))], {"axes": (2,)}),
        Case(
            [
                In((2, 7, 33)),
                In((4, 2), "count:7", "int64"),
                In((4, 2)),
                In((65, 4), "index:1", "int64"),
                In((65, 4)),
            ],
            {"axes": (1, 2), "extrapolation_value": 2.5},
        ),
    ],
    "einsum": [
        Case([In((3, 4, 5)), In((3, 5, 33))], {"equation": "bij,bjk->bik"}),
        Case([In((4, 7, 7))], {"equation": "bii->bi"}),
        Case([In((6, 6))], {"equation": "ii->"}),
        Case([In((5,)), In((7,)), In((5, 7))], {"equation": "i,j,ij->ij"}),
        Case([In((2, 1, 4), dtype="int64"), In((2, 3, 4), dtype="int64")], {"equation": "abc,abc->ab"}),
    ],
    "topk": [
        Case([In((7, 33))], {"k": 5}),
        Case([In((6, 9, 4), "count:3", "int64")], {"k": 9, "axis": 1, "largest": False}),
        Case([In((5, 8))], {"k": 3, "axis": 0, "output": "indices"}),
        Case([In((4, 10), "count:4", "int32")], {"k": 4, "output": "indices"}),
    ],
    "layer_norm": [
        Case([In((7, 33)), In((33,)), In((33,))], params=(1, 2)),
        Case([In((2, 3, 7)), In((3, 7))], {"axis": 1}, params=(1,)),
        Case([In((128, 256)), In((256,)), In((256,))], {"epsilon": 1e-6}, params=(1, 2)),
    ],
    "reduce_sum": [
        Case([In((33,))]),
        Case([In((7, 33))], {"axes": (1,), "keepdims": False}),
        Case([In((5, 7, 33))], {"axes": (0, 2)}),
        Case([In((300, 200))], {"axes": (0,)}),
        Case([In((3, 1000, 5))], {"axes": (1,)}),
        Case([In((7, 5), "normal", "int64")], {"axes": (-1,)}),
    ],
    "reduce_mean": [
        Case([In((7, 33))], {"axes": (0,)}),
        Case([In((2, 7, 33))], {"axes": (-1, 1), "keepdims": False}),
    ],
    "reduce_max": [
        Case([In((7, 33))], {"axes": (1,)}),
        Case([In((2, 7, 33))]),
        Case([In((7, 5), "normal", "int64")], {"axes": (0,)}),
    ],
    "reshape": [Case([In((7, 33))], {"shape": (33, 7)}), Case([In((2, 3, 40))], {"shape": (-1, 40)})],
    "flatten": [
        Case([In((2, 3, 7, 5))]),
        Case([In((2, 3, 7))], {"axis": 0}),
        Case([In((40000, 2))], {"axis": 2}),
    ],
    "transpose": [
        Case([In((7, 33))]),
        Case([In((2, 3, 7, 5))], {"perm": (0, 2, 3, 1)}),
        Case([In((300, 200))], {"perm": (1, 0)}),
        Case([In((2, 40, 3, 50))], {"perm": (0, 3, 2, 1)}),  # GPU: partial tiles, other axes
    ],
    "concat": [
        Case([In((7, 3)), In((7, 33)), In((7, 1))], {"axis": 1}),
        Case([In((2, 3)), In((5, 3))], {"axis": 0}),
    ],
    "slice": [
        Case([In((7, 33))], {"starts": (1, 2), "ends": (5, 30)}),
        Case([In((7, 33))], {"starts": (-1,), "ends": (-1000,), "axes": (1,), "steps": (-3,)}),
        Case([In((5, 6, 7))], {"starts": (0, 1), "ends": (100, 5), "axes": (2, 0), "steps": (2, 1)}),
    ],
    "pad": [
        Case([In((7, 33))], {"pads": (1, 2, 3, 0), "value": 1.5}),
        Case([In((2, 3, 5, 5))], {"pads": (0, 0, 1, -1, 0, 0, -2, 2)}),
        # constant padding runs row by row: rows of padding, rows cropped at both ends,
        # a last axis cropped away entirely, the stem of a ResNet
        Case([In((4, 9))], {"pads": (0, -3, 1, -2)}),
        Case([In((3, 4))], {"pads": (1, -4, 0, 2), "value": -2.0}),
        Case([In((1, 3, 10, 12))], {"pads": (0, 0, 3, 3, 0, 0, 3, 3)}),
        Case([In((0, 5))], {"pads": (2, 1, 1, 0), "value": 0.5}),  # no input row to read
        Case([In((7, 33))], {"pads": (3, 0, 2, 9), "mode": "edge"}),
        Case([In((4, 6))], {"pads": (3, 5, 3, 12), "mode": "reflect"}),
        Case([In((5, 5))], {"pads": (-1, 2, 4, -2), "mode": "reflect"}),
        Case([In((3, 7))], {"pads": (2, 9, 4, 1), "mode": "wrap"}),
        Case([In((1, 7))], {"pads": (2, 0, 1, 0), "mode": "reflect"}),
    ],
    "gather_elements_backward": [  # repeated and negative indices sum; shorter indices leave zeros
        Case([In((4, 5), "index:6", "int64"), In((4, 5))], {"shape": (6, 5), "axis": 0}),
        Case([In((2, 3, 7), "count:4", "int32"), In((2, 3, 7))], {"shape": (3, 4, 7), "axis": 1}),
    ],
    "gather_backward": [
        Case([In((4, 5), "index:7", "int64"), In((4, 5, 3))], {"shape": (7, 3)}),
        Case([In((9,), "count:33", "int32"), In((9, 33))], {"shape": (33, 33)}),
    ],
    "gather": [
        Case([In((7, 33)), In((5,), "index:7", "int64")]),
        Case([In((7, 33)), In((2, 3), "index:33", "int64")], {"axis": 1}),
        Case([In((100, 16)), In((), "index:100", "int64")]),
    ],
}

#: (rtol, atol per unit of output scale). The absolute part scales with the largest
#: |expected| because a float32 sum or a cancelling formula (1 + erf(x) near x = -4)
#: is only accurate relative to the magnitudes that went into it.
CASES.update(
    {
        "gather_elements": [
            Case([In((4, 5)), In((3, 5), "index:4", "int64")]),
            Case([In((2, 6, 3)), In((2, 4, 3), "index:6", "int64")], {"axis": 1}),
            Case([In((7, 1, 4, 2)), In((3, 1, 2, 2), "index:7", "int64")]),  # indices narrower off the axis
        ],
        "cumsum": [
            Case([In((7, 33))], {"axis": 1}),
            Case([In((5, 4), dtype="int64")], {"axis": 0, "exclusive": True}),
            Case([In((3, 9, 2))], {"axis": -2, "reverse": True, "exclusive": True}),
            Case([In((3, 700))], {"axis": 1, "reverse": True}),  # GPU: a scan in chunks
        ],
        "mod": [
            Case([In((7, 33), dtype="int64"), In((33,), dtype="int64")]),
            Case([In((7, 33), dtype="int64"), In((33,), dtype="int64")], {"fmod": True}),
            Case([In((40000,), "wide"), In((40000,), "nonzero")], {"fmod": True}),
            Case([In((7, 33), "wide"), In((33,), "nonzero")]),
        ],
        "trilu": [Case([In((5, 7))]), Case([In((2, 6, 4))], {"upper": False, "k": -1})],
        "reduce_min": [
            Case([In((7, 33))], {"axes": (1,)}),
            Case([In((5, 3), dtype="int64")], {"keepdims": False}),
        ],
        "reduce_prod": [
            Case([In((7, 5), "positive")], {"axes": (0,)}),
            Case([In((4, 3), "count:3", "int64")]),
        ],
        "arg_reduce": [
            Case([In((7, 33))], {"axis": 1}),
            Case([In((7, 33))], {"axis": 0, "largest": False}),
            Case([In((6, 5), "count:3", "int64")], {"axis": 1, "select_last_index": True, "keepdims": False}),
            Case([In((6, 40), "specials")], {"axis": 1, "select_last_index": True}),  # NaNs tie, ±inf
            Case([In((6, 40), "specials")], {"axis": 1, "largest": False}),
        ],
        "expand": [Case([In((3, 1))], {"shape": (2, 3, 7)}), Case([In((40000,))], {"shape": (1, 40000)})],
        "tile": [Case([In((3, 4))], {"repeats": (2, 3)}), Case([In((2, 1, 5))], {"repeats": (1, 4, 1)})],
        "floor": unary("wide"),
        "ceil": unary("wide"),
        "round": unary("wide") + [Case([In((8,), "halves")])],
        "sign": unary() + [Case([In((7, 5), dtype="int64")])],
        "softplus": unary("wide") + [Case([In((33,), "huge")])],
        "softsign": unary("wide"),
        "hard_sigmoid": unary("wide", alpha=0.3, beta=0.4),
        "hard_swish": unary("wide"),
        "selu": unary("wide"),
        "celu": unary("wide", alpha=0.7),
        "mish": unary("wide"),
        "thresholded_relu": unary(alpha=0.5),
        "prelu": [Case([In((2, 3, 7, 7)), In((3, 1, 1))]), Case([In((40000,)), In((40000,))])],
        "less_equal": binary() + [Case([In((33,), dtype="int64"), In((33,), dtype="int64")])],
        "greater_equal": binary(),
        "logical_and": [Case([In((7, 33), "bool"), In((33,), "bool")])],
        "logical_or": [Case([In((7, 33), "bool"), In((7, 33), "bool")])],
        "logical_xor": [Case([In((40000,), "bool"), In((40000,), "bool")])],
        "logical_not": [Case([In((33,), "bool")])],
        "isnan": [Case([In((33,), "specials")])],
        "isinf": [Case([In((33,), "specials")]), Case([In((33,), "specials")], {"detect_negative": False})],
    }
)

TOLERANCE = {Fusion.ELEMENTWISE: (1e-5, 1e-6)}
DEFAULT_TOLERANCE = (1e-4, 1e-5)


def assert_close(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> None:
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol * scale)


def test_every_op_has_cases():
    assert sorted(REGISTRY) == sorted(CASES), "every registered op needs test cases here"


def _case_id(name: str, i: int, case: Case) -> str:
    return f"{name}-{i}-" + "_".join("x".join(map(str, c.shape)) or "scalar" for c in case.inputs)


#: ops whose CPU kernels size their register tiles for the target's vector unit
#: (codegen.kir.VectorUnit; conv2d through the products it becomes): their cases also
#: run as scheduled for AVX2 (x86-64-v3), which an AVX-512 host runs too, so both
#: schedules are checked wherever AVX-512 is
UNIT_SIZED = {
    "matmul", "linear", "linear_packed", "conv2d", "conv2d_gemm", "conv2d_packed", "conv2d_pooled", "rnn",
    "attention",
    "gru", "lstm",
    "winograd_input", "winograd_output", "winograd_conv2d", "matmul_nt_sum",
}  # fmt: skip
AVX2_CPU = "x86-64-v3"


def _params():
    for name, cases in sorted(CASES.items()):
        for i, case in enumerate(cases):
            case_id = _case_id(name, i, case)
            yield pytest.param(name, case, "cpu", id=case_id)
            yield pytest.param(name, case, "cuda-sim", id=f"{case_id}-cuda-sim")
            if name in UNIT_SIZED:
                yield pytest.param(name, case, AVX2_CPU, id=f"{case_id}-avx2")


def _graph(op_name: str, case: Case, arrays: list[np.ndarray]) -> Graph:
    b = GraphBuilder(op_name)
    values = []
    for i, a in enumerate(arrays):
        values.append(b.param(f"p{i}", a) if i in case.params else b.input(f"x{i}", a.shape, a.dtype.name))
    return b.build(b.op(op_name, *values, **case.attrs))


@pytest.mark.parametrize("op_name,case,target", list(_params()))
def test_op_compiled_matches_reference(
    op_name: str, case: Case, target: str, rng: np.random.Generator, capfd
):
    arrays = [spec.draw(rng) for spec in case.inputs]
    graph = _graph(op_name, case, arrays)
    feeds = [a for i, a in enumerate(arrays) if i not in case.params]
    expected = interpret(graph, feeds)[0]
    if target == AVX2_CPU:
        if cpu.vector_unit().lanes < 8:
            pytest.skip("this CPU cannot run AVX2 code")
        got = compile_model(graph, name=f"op_{op_name}", cpu_name=AVX2_CPU)(*feeds)
    else:
        got = compile_model(graph, name=f"op_{op_name}", target=target)(*feeds)
    assert "warning" not in capfd.readouterr().err  # e.g. LLVM's "loop not vectorized"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    rtol, atol = TOLERANCE.get(REGISTRY[op_name].fusion, DEFAULT_TOLERANCE)
    if got.dtype.kind == "f":
        assert_close(got, expected, rtol, atol)
    else:
        np.testing.assert_array_equal(got, expected)


def test_only_the_unit_sized_ops_schedule_by_vector_unit(rng: np.random.Generator):
    """Every case lowered for AVX-512 and for AVX2: the kernels differ only for the ops
    in UNIT_SIZED, so the AVX2 runs above cover every schedule that depends on the unit."""
    differ = set()
    for name, cases in sorted(CASES.items()):
        for case in cases:
            graph = _graph(name, case, [spec.draw(rng) for spec in case.inputs])
            texts = [
                [kernel_text(c.kernel) for c in lower_graph(graph, name, cpu_name=cpu_name).calls]
                for cpu_name in ("skylake-avx512", AVX2_CPU)
            ]
            if texts[0] != texts[1]:
                differ.add(name)
    assert differ == UNIT_SIZED


def test_vector_units_of_known_cpus():
    assert cpu.vector_unit("skylake-avx512") == AVX512
    assert cpu.vector_unit("x86-64-v3") == AVX2
    assert cpu.vector_unit("x86-64") == VectorUnit(4, 16)
    assert packed_conv_tile(64, AVX512) == (64, 6)  # as measured at ResNet-18's shapes
    assert packed_conv_tile(64, AVX2) == (16, 6)  # 12 sums, 2 weight vectors, a broadcast
    assert [matmul_col_tile(AVX2, rows) for rows in (6, 4, 2, 1)] == [16, 16, 32, 64]
    assert matmul_rows(AVX2, 50, 1 << 20) == (6, 2) and matmul_rows(AVX2, 5, 1 << 20) == (5, 0)
    assert matmul_rows(AVX2, 32, 1 << 19) == (4, 0)  # small: no block for the rest
    assert matmul_rows(AVX512, 48, 1 << 20) == (6, 0) and matmul_rows(AVX512, 51, 1 << 20) == (6, 3)
    assert matmul_rows(AVX512, 65, 1 << 20) == (6, 5)  # Winograd's planes: not blocks of 1 row
    assert matmul_rows(AVX512, 4096, 1 << 30) == (6, 4)  # not blocks of 4: 6 rows a vector of b
    # blocks that are parallel steps: 6 rows where they make enough of them to share evenly
    assert matmul_rows(AVX512, 4096, 1 << 30, 1024, 1) == (6, 4)
    assert matmul_rows(AVX512, 32, 1 << 24, 512, 1) == (4, 0)  # 5 blocks of 6: uneven
    assert matmul_rows(AVX512, 64, 1 << 24, 64, 16) == (6, 4)  # 16 matrices: 160 blocks
    assert matmul_rows(AVX512, 50, 1 << 20) == (6, 2) and matmul_rows(AVX512, 50, 1 << 19) == (2, 0)
    assert matmul_col_tile(AVX512, 6) == matmul_col_tile(AVX512, 1) == 64
    assert matmul_rows(AVX512, 64, 1 << 20, 32) == (8, 0) and matmul_col_tile(AVX512, 8) == 32
    assert matmul_rows(AVX512, 513, 1 << 22, 16) == (16, 1) and matmul_col_tile(AVX512, 16) == 16  # 16 sums


@pytest.mark.skipif(
    shutil.which("ptxas") is None and not os.environ.get("CI"), reason="ptxas is not installed"
)
def test_ptxas_accepts_every_op_case():
    """Every case lowered for the GPU, all the kernels in one module per architecture
    (names made unique per case), assembled by one ptxas call each."""
    kernels = []
    for name, cases in sorted(CASES.items()):
        for i, case in enumerate(cases):
            arrays = [spec.draw(np.random.default_rng(0)) for spec in case.inputs]
            prefix = re.sub(r"\W", "_", _case_id(name, i, case))
            for call in lower_graph(_graph(name, case, arrays), "ops", target="cuda", checks=False).calls:
                kernels.append(dataclasses.replace(call.kernel, name=f"{prefix}_{call.kernel.name}"))
    for arch in nvptx.ARCHS:
        report = nvptx.ptxas(nvptx.ptx_module(kernels, arch, "ops"), arch)
        assert report.count("Compiling entry function") == len(kernels)


@pytest.mark.parametrize(
    "op_name", ["exp", "log", "tanh", "sigmoid", "erf", "relu", "sqrt", "maximum", "minimum"]
)
def test_nan_and_inf_propagate_as_in_numpy(op_name: str):
    specials = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 88.0, -88.0, 100.0, -100.0], np.float32
    )
    b = GraphBuilder("special")
    x = b.input("x", specials.shape)
    inputs = [specials]
    if REGISTRY[op_name].arity[0] == 2:  # each special value as either operand
        inputs.append(np.roll(specials, 4))
        graph = b.build(b.op(op_name, x, b.input("y", specials.shape)))
    else:
        graph = b.build(b.op(op_name, x))
    with np.errstate(all="ignore"):
        expected = interpret(graph, inputs)[0]
    got = compile_model(graph, name="special")(*inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-37, equal_nan=True)


def test_a_product_in_k_blocks_applies_its_bias_and_epilogue_once(rng):
    """b not packed at compile time, 520 rows of k: copied and swept in blocks, the tile's
    start before the first and its fused add and ReLU after the last."""
    b = GraphBuilder("k_blocks")
    x, y = b.input("x", (2, 130, 520)), b.input("y", (2, 520, 264))
    bias = b.param("c", rng.standard_normal(264).astype(np.float32))
    graph = b.build(b.relu(b.add(b.matmul(x, y), bias)))
    inputs = [rng.standard_normal(s).astype(np.float32) for s in ((2, 130, 520), (2, 520, 264))]
    got = compile_model(graph, name="k_blocks")(*inputs)
    np.testing.assert_allclose(got, interpret(graph, inputs)[0], rtol=1e-4, atol=1e-4)


def test_threads_split_the_columns_of_weights_that_few_rows_meet(rng, monkeypatch):
    """32 rows by constant weights of 256 columns: compiled for two threads, the parallel
    steps run column part by column part, each thread's share one part of the weights
    (a step per row step and part: 2 parts); compiled for one, tile by tile (a step per
    row step and tile: 4 tiles); the product is right on one thread and on two."""
    b = GraphBuilder("split_columns")
    weights = (rng.standard_normal((50, 256)) / 7).astype(np.float32)
    bias = rng.standard_normal(256).astype(np.float32)
    graph = b.build(b.relu(b.linear(b.input("x", (32, 50)), b.param("w", weights), b.param("c", bias))))
    steps = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("KILN_NUM_THREADS", threads)
        (kernel,) = [c.kernel for c in lower_graph(graph, "split").cpu_calls if "linear" in c.kernel.name]
        steps[threads] = int(kernel.split_loop.extent.value)
    assert steps["2"] // 2 == steps["1"] // 4 and steps["2"] % 2 == steps["1"] % 4 == 0
    model = compile_model(graph, name="split_columns")  # for two threads
    x = rng.standard_normal((32, 50)).astype(np.float32)
    expected = interpret(graph, [x])[0]
    for threads in (1, 2):
        model.set_num_threads(threads)
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_batch_1_product_alternates_the_order_of_its_column_steps(rng):
    """A batch-1 Dense layer's parallel steps each stream their own columns of the
    weights: its launch runs them last to first on every other call (cabi.Launch's
    `alternate`), and every call gives the same values, the interpreter's, on one
    thread and on two."""
    b = GraphBuilder("alternate")
    weights = (rng.standard_normal((80, 320)) / 9).astype(np.float32)
    bias = rng.standard_normal(320).astype(np.float32)
    graph = b.build(b.relu(b.linear(b.input("x", (1, 80)), b.param("w", weights), b.param("c", bias))))
    (launch,) = [x for x in lower_graph(graph, "alternate").library.launches if "linear" in x.symbol]
    assert launch.alternate and launch.extent > 1
    model = compile_model(graph, name="alternate")
    x = rng.standard_normal((1, 80)).astype(np.float32)
    expected = interpret(graph, [x])[0]
    for threads in (1, 2):
        model.set_num_threads(threads)
        runs = [model(x) for _ in range(3)]
        for got in runs:
            np.testing.assert_array_equal(got, runs[0])
        np.testing.assert_allclose(runs[0], expected, rtol=1e-5, atol=1e-5)


def test_a_product_by_weights_runs_its_row_steps_tile_by_tile(rng, monkeypatch):
    """48 rows (a's 7.5 KB stay in cache) by constant weights of 200 columns (3 tiles and
    8 columns more): the parallel steps are (row step, column part) pairs, a part per
    tile and one for the rest, each thread's share its rows over every part (so the
    steps are those of the schedule that sweeps every tile, times the parts); right on
    one thread and on two."""
    b = GraphBuilder("tile_by_tile")
    weights = (rng.standard_normal((40, 200)) / 6).astype(np.float32)
    bias = rng.standard_normal(200).astype(np.float32)
    graph = b.build(b.relu(b.linear(b.input("x", (48, 40)), b.param("w", weights), b.param("c", bias))))
    x = rng.standard_normal((48, 40)).astype(np.float32)
    expected = interpret(graph, [x])[0]
    for threads in ("1", "2"):
        monkeypatch.setenv("KILN_NUM_THREADS", threads)
        steps = {}
        for cached in (0, nn.MATMUL_ROWS_CACHED_BYTES):
            monkeypatch.setattr(nn, "MATMUL_ROWS_CACHED_BYTES", cached)
            (kernel,) = [c.kernel for c in lower_graph(graph, "tiles").cpu_calls if "linear" in c.kernel.name]
            steps[cached] = int(kernel.split_loop.extent.value)
        assert steps[nn.MATMUL_ROWS_CACHED_BYTES] == steps[0] * (200 // 64 + 1), steps
        model = compile_model(graph, name=f"tile_by_tile{threads}")
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5, err_msg=f"{threads} threads")


def _prefetched(kernel, buf, rng) -> np.ndarray:
    """Which elements of `buf` the kernel prefetches (1) over a run on random buffers:
    each Prefetch of buf becomes a store of 1 into a probe three times buf's size, at
    the prefetched index plus buf's size; none may lie outside buf."""
    probe = kir.Buffer("probe", "float32", (3 * buf.numel,))

    def as_store(s):
        if isinstance(s, kir.Prefetch) and s.buf.root is buf.root:
            return [kir.Store(probe, s.index + buf.numel, kir.const(1.0, probe.dtype))]
        return None

    body = kir.rewrite_stmts(kernel.body, lambda e: None, as_store)
    probed = dataclasses.replace(
        kernel, name=f"{kernel.name}_probe", params=[*kernel.params, probe], body=body
    )
    marks = np.zeros(probe.numel, np.float32)
    run_kernel(probed, *[rng.standard_normal(b.numel).astype(np.float32) for b in kernel.params], marks)
    assert not marks[: buf.numel].any() and not marks[2 * buf.numel :].any()
    return marks[buf.numel : 2 * buf.numel]


def test_a_tile_by_tile_product_fetches_every_later_tile_ahead_inside_b(rng, monkeypatch):
    """On one thread, a product by packed weights run tile by tile fetches each next
    tile's panels while the row blocks of a tile run: with its prefetches turned into
    stores to a probe, every line of every panel after the first tile's (3 tiles of 4
    panels and a last panel for the 8 columns past them) is fetched, and none outside
    the weights; values unchanged, against the interpreter."""
    b = GraphBuilder("fetch_ahead")
    weights = (rng.standard_normal((40, 200)) / 6).astype(np.float32)
    graph = b.build(
        b.linear(
            b.input("x", (48, 40)),
            b.param("w", weights),
            b.param("c", rng.standard_normal(200).astype(np.float32)),
        )
    )
    monkeypatch.setenv("KILN_NUM_THREADS", "1")
    (kernel,) = [c.kernel for c in lower_graph(graph, "fetch").cpu_calls if "linear" in c.kernel.name]
    (packed,) = [buf for buf in kernel.params if len(buf.shape) == 3]  # (panels, K, 16)
    fetched = _prefetched(kernel, packed, rng).reshape(packed.shape)[:, :, 0]  # a line per (panel, k)
    panels, depth, _ = packed.shape
    assert (panels, depth) == (13, 40) and fetched[4:].all(), np.argwhere(fetched[4:] == 0)
    x = rng.standard_normal((48, 40)).astype(np.float32)
    np.testing.assert_allclose(
        compile_model(graph, name="fetch_ahead")(x), interpret(graph, [x])[0], rtol=1e-5, atol=1e-5
    )


def test_a_product_of_one_column_tile_fetches_the_next_blocks_rows_of_a_inside_a(rng):
    """A product whose one column tile reads each of a's rows once (a 1.2 MB constant a,
    as Winograd's products at few tiles) fetches the rows of the next row block while a
    block runs: with the prefetches turned into stores to a probe, a line in every 16
    floats of a past the first block's rows (which no block fetches: none runs before
    it), none outside a; values unchanged, against the interpreter."""
    b = GraphBuilder("rows_ahead")
    weights = (rng.standard_normal((520, 600)) / 20).astype(np.float32)
    graph = b.build(b.matmul(b.param("a", weights), b.input("x", (600, 16))))
    (kernel,) = [c.kernel for c in lower_graph(graph, "rows").cpu_calls if "matmul" in c.kernel.name]
    (a,) = [buf for buf in kernel.params if buf.shape == (520, 600)]
    fetched = _prefetched(kernel, a, rng)
    first_block = 16 * 600  # 16 rows of one vector of columns
    lines = fetched[first_block:].reshape(-1, 16).any(axis=1)
    assert lines.all() and not fetched[:first_block].any(), np.flatnonzero(~lines)[:10]
    x = rng.standard_normal((600, 16)).astype(np.float32)
    np.testing.assert_allclose(
        compile_model(graph, name="rows_ahead")(x), interpret(graph, [x])[0], rtol=1e-5, atol=1e-5
    )


def test_a_batch_1_product_splits_columns_that_end_inside_a_tile(rng, monkeypatch):
    """A batch-1 Dense layer whose columns end inside a tile (200 = 3 x 64 + 8, a
    classifier's shape) still splits them between the parallel steps: a step per whole
    tile and one for the rest, on one thread and on two, its order alternating; every
    call gives the interpreter's values."""
    b = GraphBuilder("ragged_columns")
    weights = (rng.standard_normal((70, 200)) / 8).astype(np.float32)
    bias = rng.standard_normal(200).astype(np.float32)
    graph = b.build(b.linear(b.input("x", (1, 70)), b.param("w", weights), b.param("c", bias)))
    x = rng.standard_normal((1, 70)).astype(np.float32)
    expected = interpret(graph, [x])[0]
    for threads in ("1", "2"):
        monkeypatch.setenv("KILN_NUM_THREADS", threads)
        (launch,) = [c for c in lower_graph(graph, "ragged").library.launches if "linear" in c.symbol]
        assert launch.alternate and launch.extent == 200 // 64 + 1
        model = compile_model(graph, name=f"ragged_columns{threads}")
        for run in range(3):
            np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5, err_msg=f"call {run}")


def test_gelu_forms_differ():
    """The two gelu forms are different functions; both lowerings must keep them apart."""
    x = np.linspace(-3, 3, 33, dtype=np.float32)
    outs = []
    for form in ("none", "tanh"):
        b = GraphBuilder("gelu")
        graph = b.build(b.gelu(b.input("x", x.shape), approximate=form))
        outs.append(compile_model(graph, name="gelu")(x))
    assert 1e-5 < np.max(np.abs(outs[0] - outs[1])) < 1e-2
    np.testing.assert_allclose(
        outs[0], 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))), rtol=1e-5, atol=1e-6
    )
