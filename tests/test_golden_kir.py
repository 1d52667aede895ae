"""Golden kernel-IR tests: the full printed kernels of three small graphs, written out
as expected text. A change to fusion, lowering or the kernel IR that alters them shows
as a diff of the loop nests; if the new text is right, update it here."""

from __future__ import annotations

import numpy as np

from codegen.kir_print import kernel_text
from compiler.driver import lower_graph
from ir.builder import GraphBuilder


def _kernels(graph) -> str:
    """The kernels as scheduled for an AVX-512 CPU (whatever this one is: the register
    tiles are sized for the target's vector registers)."""
    calls = lower_graph(graph, graph.name, cpu_name="skylake-avx512").calls
    return "\n".join(kernel_text(c.kernel) for c in calls) + "\n"


EXPECTED_ELEMENTWISE_CHAIN = """\
kernel k0_mul_add_relu_exp(float32[4,33] x, float32[33] y, float32[4,33] exp):
  for r0 in parallel(0, 4):
    for j1 in vector(0, 33):
      float32 v2 = x[((r0 * 33) + j1)]
      float32 v3 = (v2 * v2)
      float32 v4 = y[j1]
      float32 v5 = (v3 + v4)
      float32 v6 = max(v5, 0.0f)
      float32 v7 = exp(v6)
      exp[((r0 * 33) + j1)] = v7
"""


def test_elementwise_chain_is_one_loop_nest_computing_into_locals():
    """x*x + y (y broadcast over rows), relu, exp: one kernel; every value a local
    before the one store."""
    b = GraphBuilder("chain")
    x, y = b.input("x", (4, 33)), b.input("y", (33,))
    assert _kernels(b.build(b.exp(b.relu(b.add(b.mul(x, x), y))))) == EXPECTED_ELEMENTWISE_CHAIN


EXPECTED_SOFTMAX_ROWS = """\
kernel k0_reduce_max_sub_exp_reduce_sum_div(float32[8,100] x, float32[8,100] div):
  for row0 in parallel(0, 8):
    float32 acc1 = -inff
    for j2 in vector(0, 100):
      acc1 = max(acc1, x[((row0 * 100) + j2)])
    float32 row3 = acc1
    float32 acc4 = 0.0f
    for j5 in vector(0, 100):
      float32 kept6 = exp((x[((row0 * 100) + j5)] - row3))
      div[((row0 * 100) + j5)] = kept6
      acc4 = (acc4 + kept6)
    float32 row7 = acc4
    for j8 in vector(0, 100):
      float32 out9 = (div[((row0 * 100) + j8)] / row7)
      div[((row0 * 100) + j8)] = out9
"""


def test_softmax_from_primitives_is_one_rows_kernel():
    """max, x - max, exp, sum, divide: one pass per reduction over each row, exp kept in
    the output between passes, and the last pass reading it into a local before storing."""
    b = GraphBuilder("softmax")
    x = b.input("x", (8, 100))
    e = b.exp(b.sub(x, b.reduce_max(x, axes=(-1,), keepdims=True)))
    assert _kernels(b.build(b.div(e, b.reduce_sum(e, axes=(-1,), keepdims=True)))) == EXPECTED_SOFTMAX_ROWS


EXPECTED_DENSE_RELU = """\
kernel k0_linear_packed_relu(float32[4,2] x, float32[1,2,16] w_packed, float32[16] bias, float32[4,16] relu):
  for rows0 in parallel(0, 1):
    for block1 in serial(0, 1):
      for n3 in tile(0, 16):
        sums2[n3] = bias[n3]
        sums2[(16 + n3)] = bias[n3]
        sums2[(32 + n3)] = bias[n3]
        sums2[(48 + n3)] = bias[n3]
      for n4 in tile(0, 16):
        float32 sum5 = sums2[n4]
        float32 sum6 = sums2[(16 + n4)]
        float32 sum7 = sums2[(32 + n4)]
        float32 sum8 = sums2[(48 + n4)]
        float32 b9 = w_packed[n4]
        sum5 = muladd(x[((block1 * 4) * 2)], b9, sum5)
        sum6 = muladd(x[(((block1 * 4) + 1) * 2)], b9, sum6)
        sum7 = muladd(x[(((block1 * 4) + 2) * 2)], b9, sum7)
        sum8 = muladd(x[(((block1 * 4) + 3) * 2)], b9, sum8)
        float32 b10 = w_packed[(16 + n4)]
        sum5 = muladd(x[(((block1 * 4) * 2) + 1)], b10, sum5)
        sum6 = muladd(x[((((block1 * 4) + 1) * 2) + 1)], b10, sum6)
        sum7 = muladd(x[((((block1 * 4) + 2) * 2) + 1)], b10, sum7)
        sum8 = muladd(x[((((block1 * 4) + 3) * 2) + 1)], b10, sum8)
        sums2[n4] = sum5
        sums2[(16 + n4)] = sum6
        sums2[(32 + n4)] = sum7
        sums2[(48 + n4)] = sum8
      for n11 in tile(0, 16):
        relu[((((rows0 * 4) + (block1 * 4)) * 16) + n11)] = max(sums2[n11], 0.0f)
        relu[(((((rows0 * 4) + (block1 * 4)) + 1) * 16) + n11)] = max(sums2[(16 + n11)], 0.0f)
        relu[(((((rows0 * 4) + (block1 * 4)) + 2) * 16) + n11)] = max(sums2[(32 + n11)], 0.0f)
        relu[(((((rows0 * 4) + (block1 * 4)) + 3) * 16) + n11)] = max(sums2[(48 + n11)], 0.0f)
"""


def test_linear_with_relu_epilogue():
    """The weights are packed in panels of 16 columns; the bias starts each tile of 4
    rows in a scratch tile (registers once LLVM is done), the sums are locals over each
    sweep of k, each k step meeting every row's broadcast with the panel's row (muladd),
    and the relu runs as the finished tile goes to the output."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("dense")
    x = b.input("x", (4, 2))
    w = b.param("w", rng.standard_normal((2, 16)).astype(np.float32))
    bias = b.param("bias", rng.standard_normal(16).astype(np.float32))
    assert _kernels(b.build(b.relu(b.linear(x, w, bias)))) == EXPECTED_DENSE_RELU


def test_work_estimate_counts_a_clamped_loop_at_its_bound():
    """A loop of min(n - i, 16) iterations (a block's last, shorter run) counts as 16 per
    run of its parent, not 1: the estimate decides a kernel's parallel launch."""
    from codegen import kir

    out = kir.Buffer("out", "float32", (100,))
    k = kir.KernelBuilder("clamped", [out])
    with k.loop(7) as i:
        with k.loop(kir.Binary("min", kir.lift(100, "int64") - i * 16, kir.lift(16, "int64"))):
            k.store(out, 0, kir.lift(1.0, "float32"))
    assert kir.estimate_work(k.finish().body) == 7 * 16


def test_tiled_conv_prefetches_the_next_blocks_window_rows():
    """A tiled conv2d_packed (1x1, stride 2) fetches, in each window row of its sweep,
    the line the next block reads there (clamped to x's last element): one prefetch in
    the (c, i) loop, ahead of the taps."""
    b = GraphBuilder("down")
    w = b.param("w", np.random.default_rng(0).standard_normal((16, 4, 1, 1)).astype(np.float32))
    text = _kernels(b.build(b.conv2d(b.input("x", (1, 4, 9, 9)), w, strides=(2, 2))))
    lines = text.splitlines()
    prefetches = [i for i, line in enumerate(lines) if line.strip().startswith("prefetch x[")]
    assert len(prefetches) == 1 and lines[prefetches[0]].endswith(", 323)]")
    assert lines[prefetches[0] - 1].strip().startswith("for i") and "tile(0, 16)" in lines[prefetches[0] + 1]
