"""Each simplification pass: the graph expected after (as printed IR) and the
interpreter's results unchanged."""

from __future__ import annotations

import numpy as np

from compiler import passes
from compiler.passes import (
    attention_fused,
    cancel_transposes,
    conv_packed,
    conv_pool,
    conv_winograd,
    copy_shared_moves,
    dead_code,
    fold_batchnorm,
    fold_constants,
    gather_as_slice,
    linear_packed,
    merge_common,
    recurrence_packed,
    simplify,
)
from ir.builder import GraphBuilder
from ir.interpreter import interpret


def _same_results(before, after, rng, rtol=1e-5):
    feeds = [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in before.inputs]
    for a, b in zip(interpret(before, feeds), interpret(after, feeds)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5)


def _body(graph) -> list[str]:
    return [line.strip() for line in str(graph).splitlines()[1:-1] if not line.strip().startswith("param")]


def test_fold_batchnorm_into_conv(rng):
    b = GraphBuilder("g")
    x = b.input("x", (2, 3, 8, 8))
    y = b.conv2d(
        x,
        b.param("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        b.param("cb", rng.standard_normal(4).astype(np.float32)),
        pads=(1, 1, 1, 1),
    )
    stats = [
        b.param(n, a.astype(np.float32))
        for n, a in (
            ("s", rng.standard_normal(4)),
            ("t", rng.standard_normal(4)),
            ("m", rng.standard_normal(4)),
            ("v", rng.uniform(0.5, 2, 4)),
        )
    ]
    before = b.build(b.relu(b.batch_norm(y, *stats, epsilon=1e-3)))
    after = fold_batchnorm(before)
    assert _body(after) == [
        "%batch_norm = conv2d(%x, %w.bnfold, %batch_norm.bnfold_bias) {pads=(1, 1, 1, 1)} : f32[2,4,8,8]",
        "%relu = relu(%batch_norm) : f32[2,4,8,8]",
        "return %relu",
    ]
    _same_results(before, after, rng, rtol=1e-4)


def test_batchnorm_stays_when_conv_output_has_another_reader(rng):
    b = GraphBuilder("g")
    y = b.conv2d(
        b.input("x", (1, 2, 5, 5)), b.param("w", rng.standard_normal((2, 2, 1, 1)).astype(np.float32))
    )
    stats = [b.param(n, np.ones(2, np.float32)) for n in "stmv"]
    graph = b.build(b.batch_norm(y, *stats), y)
    assert fold_batchnorm(graph).nodes[1].op.name == "batch_norm"


def test_fold_constants_folds_transposed_weight(rng):
    b = GraphBuilder("g")
    w = b.transpose(b.param("w", rng.standard_normal((5, 4)).astype(np.float32)))
    before = b.build(b.matmul(b.input("x", (3, 4)), w))
    after = fold_constants(before)
    assert _body(after) == ["%matmul = matmul(%x, %transpose) : f32[3,5]", "return %matmul"]
    assert after.params[w].flags.c_contiguous
    _same_results(before, after, rng)


def test_linear_packed_packs_constant_weights_once(rng):
    b = GraphBuilder("g")
    w = b.param("w", rng.standard_normal((20, 37)).astype(np.float32))
    x = b.input("x", (3, 20))
    y = b.linear(x, w, b.param("bias", rng.standard_normal(37).astype(np.float32)))
    before = b.build(b.add(y, b.matmul(x, w)), b.matmul(b.input("v", (5, 3)), x))
    after = linear_packed(before)
    assert _body(after) == [
        "%linear = linear_packed(%x, %w.packed, %bias) {out_features=37} : f32[3,37]",
        "%matmul = linear_packed(%x, %w.packed) {out_features=37} : f32[3,37]",
        "%add = add(%linear, %matmul) : f32[3,37]",
        "%matmul_0 = matmul(%v, %x) : f32[5,20]",  # b is an input: left alone
        "return %add, %matmul_0",
    ]
    assert [v.name for v in after.params] == ["bias", "w.packed"]
    assert after.params[next(v for v in after.params if v.name == "w.packed")].shape == (3, 20, 16)
    _same_results(before, after, rng)


def test_linear_packed_packs_a_large_product_of_a_matrix_computed_at_run_time(rng):
    """b an input: packed by a pack_panels node where the product is large (its rows 1
    KiB apart, 32 rows of a or more, whole panels); a small one is left alone."""
    b = GraphBuilder("g")
    x, y = b.input("x", (2, 40, 24)), b.input("y", (24, 256))
    before = b.build(b.matmul(x, y), b.matmul(b.input("v", (31, 24)), y), b.matmul(x, b.input("z", (24, 48))))
    after = linear_packed(before)
    assert _body(after) == [
        "%y.packed = pack_panels(%y) : f32[16,24,16]",
        "%matmul = linear_packed(%x, %y.packed) {out_features=256} : f32[2,40,256]",
        "%matmul_0 = matmul(%v, %y) : f32[31,256]",  # 31 rows: the copy would not run
        "%matmul_1 = matmul(%x, %z) : f32[2,40,48]",  # rows of 192 bytes: in L1 as they are
        "return %matmul, %matmul_0, %matmul_1",
    ]
    _same_results(before, after, rng)


def test_recurrence_packed_packs_constant_rt_of_whole_panels(rng):
    b = GraphBuilder("g")
    xw = b.input("xw", (3, 2, 4 * 32))
    states = [b.input(n, (2, 32)) for n in ("h", "c")]
    peep = b.input("p", (96,))
    rt = b.param("rt", (0.1 * rng.standard_normal((32, 128))).astype(np.float32))
    narrow = b.param("rt7", (0.1 * rng.standard_normal((7, 28))).astype(np.float32))
    xw7 = b.input("xw7", (3, 2, 28))
    states7 = [b.input(n, (2, 7)) for n in ("h7", "c7")]
    packed = b.op("lstm", xw, rt, *states, peep, hidden=32)
    left = b.op("lstm", xw7, narrow, *states7, b.input("p7", (21,)), hidden=7)  # 7 units: no panels
    before = b.build(packed, left)
    after = recurrence_packed(before)
    assert [n.op.rt_panel for n in after.nodes] == [16, None]
    assert [v.name for v in after.params] == ["rt7", "rt.packed"]
    assert after.params[next(v for v in after.params if v.name == "rt.packed")].shape == (8, 32, 16)
    _same_results(before, after, rng)


def test_conv_winograd_takes_3x3_stride_1_convs_of_enough_channels_and_tiles(rng):
    b = GraphBuilder("g")
    x = b.input("x", (2, 64, 11, 13))

    def weights(o, c, k=3):
        return b.param("w", (0.05 * rng.standard_normal((o, c, k, k))).astype(np.float32))

    bias = b.param("bias", rng.standard_normal(70).astype(np.float32))
    y = b.conv2d(x, weights(70, 64), bias, pads=(1, 1, 1, 1))
    narrow = b.conv2d(x, weights(32, 64))  # 32 filters: direct
    strided = b.conv2d(x, weights(64, 64), strides=(2, 2))
    small = b.conv2d(b.input("s", (1, 64, 5, 5)), weights(64, 64))  # 3x3 output: 4 tiles
    # 6x6 output: 9 tiles, within the work bound (0.46) but under a vector of product columns
    few = b.conv2d(b.input("f", (1, 64, 6, 6)), weights(64, 64), pads=(1, 1, 1, 1))
    # 7x7 output (ResNet-18's layer4 at batch 1): 16 tiles, Winograd
    enough = b.conv2d(b.input("e", (1, 64, 7, 7)), weights(64, 64), pads=(1, 1, 1, 1))
    before = b.build(b.relu(y), narrow, strided, small, few, enough)
    after = conv_winograd(before)
    assert [n.op.name for n in after.nodes] == [
        "winograd_input", "matmul", "winograd_output", "conv2d", "conv2d", "conv2d", "conv2d",
        "winograd_input", "matmul", "winograd_output", "relu",
    ]  # fmt: skip
    tiles, product, out = after.nodes[:3]
    assert tiles.op.pads == (1, 1, 2, 2)  # to 14 x 16: 6 x 7 tiles of the 11 x 13 output
    assert tiles.outputs[0].type.shape == (1, 16, 65, 96)  # one block of 84 tiles in 96 columns; a zero row
    assert product.inputs[0].type.shape == (16, 71, 65) and out.op.out_shape == (2, 11, 13)
    _same_results(before, after, rng, rtol=1e-4)


def test_conv_winograd_fuses_its_three_ops_where_the_tiles_make_several_blocks(rng):
    b = GraphBuilder("g")
    x = b.input("x", (2, 64, 49, 47))  # 2 x 25 x 24 tiles: over one block's 1024
    w = b.param("w", (0.05 * rng.standard_normal((64, 64, 3, 3))).astype(np.float32))
    before = b.build(b.relu(b.conv2d(x, w, pads=(1, 1, 1, 1))))
    after = conv_winograd(before)
    assert [n.op.name for n in after.nodes] == ["winograd_conv2d", "relu"]
    assert after.nodes[0].op.pads == (1, 1, 2, 2) and after.nodes[0].inputs[1].type.shape == (16, 65, 65)
    _same_results(before, after, rng, rtol=1e-4)


def test_conv_pool_moves_a_max_pool_into_a_first_layer_conv(rng):
    b = GraphBuilder("g")
    x = b.input("x", (2, 1, 28, 28))

    def conv(o, c=1, pads=(0, 0, 0, 0)):
        w = b.param("w", rng.standard_normal((o, c, 3, 3)).astype(np.float32))
        return b.conv2d(x, w, b.param("bias", rng.standard_normal(o).astype(np.float32)), pads=pads)

    def pool(v, size, stride=None):
        return b.op("max_pool2d", v, kernel=(size, size), strides=(stride or size,) * 2)

    pooled = pool(b.relu(conv(32)), 2)
    bare = pool(conv(8, pads=(1, 1, 1, 1)), 3)  # padded to 30 columns, 10 planes of 3
    kept = b.relu(conv(4))  # the ReLU's output is also read whole: the conv stays
    overlapping = pool(conv(4), 3, 2)
    odd = pool(conv(4), 3)  # 28 columns do not deal into 3 planes
    before = b.build(pooled, bare, kept, pool(kept, 2), overlapping, odd)
    after = conv_pool(conv_packed(before))
    names = [n.op.name for n in after.nodes]
    assert names.count("conv2d_pooled") == 2 and names.count("conv2d_packed") == 3, names
    assert names[:4] == ["reshape", "transpose", "conv2d_pooled", "relu"]
    assert after.nodes[1].outputs[0].type.shape == (2, 1, 28, 2, 14)
    assert after.nodes[2].outputs[0].type.shape == (2, 32, 13, 13)
    _same_results(before, after, rng, rtol=1e-4)


def test_merge_common_and_dead_code(rng):
    b = GraphBuilder("g")
    x = b.input("x", (4,))
    e1, e2 = b.exp(x), b.exp(x)
    unused = b.tanh(x)  # noqa: F841
    before = b.build(b.add(e1, e2))
    after = dead_code(merge_common(before))
    assert _body(after) == ["%exp = exp(%x) : f32[4]", "%add = add(%exp, %exp) : f32[4]", "return %add"]
    _same_results(before, after, rng)
    assert len(simplify(before).nodes) == 2


def test_conv_to_gemm(rng):
    b = GraphBuilder("g")
    x = b.input("x", (2, 3, 9, 9))
    y = b.conv2d(
        x,
        b.param("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        b.param("cb", rng.standard_normal(4).astype(np.float32)),
        strides=(2, 2),
        pads=(1, 1, 1, 1),
    )
    z = b.conv2d(y, b.param("w1", rng.standard_normal((5, 4, 1, 1)).astype(np.float32)))
    dw = b.conv2d(z, b.param("wd", rng.standard_normal((5, 1, 3, 3)).astype(np.float32)), groups=5)
    before = b.build(dw)
    from compiler.passes import conv_to_gemm

    after = conv_to_gemm(before)
    assert _body(after) == [
        "%conv2d.cols = im2col(%x) {strides=(2, 2), pads=(1, 1, 1, 1)} : f32[2,27,5,5]",
        "%conv2d = conv2d_gemm(%conv2d.cols, %w, %cb) : f32[2,4,5,5]",
        "%conv2d_0 = conv2d_gemm(%conv2d, %w1) : f32[2,5,5,5]",  # 1x1: no im2col
        "%conv2d_1 = conv2d(%conv2d_0, %wd) {groups=5} : f32[2,5,3,3]",  # depthwise stays
        "return %conv2d_1",
    ]
    _same_results(before, after, rng, rtol=1e-4)


def test_conv_with_few_output_positions_becomes_a_linear(rng):
    """3x3 positions, 32 channels: windows as rows @ wᵀ, so the product's vectors run
    over the channels (compiled and interpreted, against the plain conv)."""
    from compiler import compile_model
    from compiler.passes import conv_to_gemm

    b = GraphBuilder("g")
    x = b.input("x", (2, 8, 5, 5))
    w = b.param("w", rng.standard_normal((32, 8, 3, 3)).astype(np.float32))
    before = b.build(b.relu(b.conv2d(x, w, b.param("cb", rng.standard_normal(32).astype(np.float32)))))
    after = conv_to_gemm(before)
    assert [line.split(" = ")[1].split("(")[0] for line in _body(after)[:-1]] == [
        "im2col", "reshape", "transpose", "reshape", "reshape", "transpose", "linear", "reshape", "transpose",
        "reshape", "relu",
    ]  # fmt: skip
    _same_results(before, after, rng, rtol=1e-4)
    xs = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(compile_model(before)(xs), interpret(before, [xs])[0], rtol=1e-4, atol=1e-5)


def test_cancel_transposes(rng):
    """NHWC → NCHW → relu → NHWC → NCHW: the middle pair cancels; the outer pair composes."""
    b = GraphBuilder("g")
    x = b.input("x", (2, 5, 6, 3))
    nchw = b.relu(b.transpose(x, perm=(0, 3, 1, 2)))
    back = b.transpose(nchw, perm=(0, 2, 3, 1))
    again = b.transpose(back, perm=(0, 3, 1, 2))
    swapped = b.transpose(b.transpose(again, perm=(1, 0, 2, 3)), perm=(0, 1, 3, 2))
    before = b.build(b.exp(again), swapped)
    after = dead_code(cancel_transposes(before))
    assert [line.split(" = ")[1].split(" :")[0] for line in _body(after)[:-1]] == [
        "transpose(%x) {perm=(0, 3, 1, 2)}",
        "relu(%transpose)",
        "transpose(%relu) {perm=(1, 0, 3, 2)}",
        "exp(%relu)",
    ]
    _same_results(before, after, rng)


def test_gather_of_one_constant_index_becomes_a_slice(rng):
    b = GraphBuilder()
    x = b.input("x", (3, 4, 5))
    picked = b.gather(x, b.param("i", np.array(-2, np.int64)), axis=1)
    kept = b.gather(x, b.param("j", np.array([1], np.int64)), axis=2)
    graph = b.build(picked, kept)
    after = gather_as_slice(graph)
    assert [n.op.name for n in after.nodes] == ["slice", "reshape", "slice", "reshape"]
    assert after.nodes[0].op.starts == (2,) and after.nodes[0].op.axes == (1,)
    _same_results(graph, after, rng)


def test_gather_of_an_index_out_of_range_stays_a_gather():
    b = GraphBuilder()
    x = b.input("x", (3, 4))
    graph = b.build(b.gather(x, b.param("i", np.array(4, np.int64)), axis=1))
    assert [n.op.name for n in gather_as_slice(graph).nodes] == ["gather"]


def test_shared_element_moves_are_copied_for_each_reader(rng):
    b = GraphBuilder()
    x = b.input("x", (6, 8))
    t = b.reshape(b.transpose(x, perm=(1, 0)), shape=(2, 4, 6))
    first, second = (b.slice(t, starts=(i,), ends=(i + 1,), axes=(0,)) for i in range(2))
    graph = b.build(first, second)
    after = copy_shared_moves(graph)
    assert [n.op.name for n in after.nodes] == ["transpose"] * 2 + ["reshape"] * 2 + ["slice"] * 2
    assert len({n.outputs[0] for n in after.nodes}) == 6  # every copy its own value
    _same_results(graph, after, rng)


def test_shared_move_read_by_an_elementwise_op_is_not_copied():
    b = GraphBuilder()
    x = b.input("x", (6, 8))
    t = b.transpose(x, perm=(1, 0))
    graph = b.build(b.relu(t), b.slice(t, starts=(1,), ends=(2,), axes=(0,)))
    assert copy_shared_moves(graph) is graph


def _attention_graph(extra_reader: bool = False, key_bias: bool = False):
    b = GraphBuilder()
    q, kt, v = b.input("q", (2, 4, 9, 8)), b.input("kt", (2, 4, 8, 12)), b.input("v", (2, 4, 12, 8))
    scores = b.matmul(q, kt)
    if key_bias:
        scores = b.add(b.input("bias", (12,)), scores)
    out = b.matmul(b.softmax(scores), v)
    return b.build(out, b.relu(scores)) if extra_reader else b.build(out)


def test_conv_pool_keeps_a_ring_of_rows_for_overlapping_windows(rng, monkeypatch):
    """ResNet's stem: a 3x3 max pool of stride 2 padded by 1 after a conv and its ReLU
    runs inside the conv (pool_stride, pool_pad; the ReLU after it); where the ring of
    conv rows would pass POOL_RING_BYTES the pool stays."""
    b = GraphBuilder("g")
    x = b.input("x", (2, 3, 30, 30))
    w = b.param("w", (rng.standard_normal((64, 3, 7, 7)) / 11).astype(np.float32))
    conv = b.relu(b.conv2d(x, w, pads=(3, 3, 3, 3), strides=(2, 2)))
    before = b.build(b.op("max_pool2d", conv, kernel=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)))
    after = conv_pool(conv_packed(before))
    assert [n.op.name for n in after.nodes] == ["pad", "conv2d_packed", "relu"]
    op = after.nodes[1].op
    assert (op.pool, op.pool_stride, op.pool_pad) == (3, 2, 1)
    assert after.nodes[1].outputs[0].type.shape == (2, 64, 8, 8)
    _same_results(before, after, rng, rtol=1e-4)
    monkeypatch.setattr(passes, "POOL_RING_BYTES", 3 * 15 * 64 * 4 - 1)
    assert [n.op.name for n in conv_pool(conv_packed(before)).nodes][-1] == "max_pool2d"


def test_attention_fused_takes_matmul_softmax_matmul(rng):
    graph = _attention_graph()
    after = attention_fused(graph)
    assert _body(after) == ["%matmul_0 = attention(%q, %kt, %v) : f32[2,4,9,8]", "return %matmul_0"]
    _same_results(graph, after, rng)


def test_attention_fused_takes_a_bias_per_key(rng):
    graph = _attention_graph(key_bias=True)
    after = attention_fused(graph)
    assert _body(after) == ["%matmul_0 = attention(%q, %kt, %v, %bias) : f32[2,4,9,8]", "return %matmul_0"]
    _same_results(graph, after, rng)


def test_attention_fused_leaves_scores_another_node_reads():
    graph = _attention_graph(extra_reader=True)
    assert attention_fused(graph) is graph


def test_conv_pool_pools_a_tiled_conv_in_its_register_tile(rng):
    """A conv of many taps (the MNIST CNN's second, 11x11: its last row and column fill
    no 2x2 window) keeps its schedule and pools in it: conv2d_packed with pool=2, the
    ReLU after it; 3x3 windows (9 positions) would not fit a tile and stay a pool."""
    b = GraphBuilder("g")
    x = b.input("x", (2, 32, 13, 13))

    def conv(o):
        w = b.param("w", (rng.standard_normal((o, 32, 3, 3)) / 17).astype(np.float32))
        return b.conv2d(x, w, b.param("bias", rng.standard_normal(o).astype(np.float32)))

    def pool(v, size):
        return b.op("max_pool2d", v, kernel=(size, size), strides=(size, size))

    before = b.build(pool(b.relu(conv(64)), 2), pool(conv(16), 3))
    after = conv_pool(conv_packed(before))
    assert [n.op.name for n in after.nodes] == ["conv2d_packed", "relu", "conv2d_packed", "max_pool2d"]
    assert after.nodes[0].op.pool == 2 and after.nodes[0].outputs[0].type.shape == (2, 64, 5, 5)
    assert after.nodes[2].op.pool == 1
    _same_results(before, after, rng, rtol=1e-4)
