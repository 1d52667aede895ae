"""Graph simplification before fusion. Each pass is Graph → Graph and keeps meaning:
tests run the interpreter before and after every one.

`simplify` runs PIPELINE, in the order that lets each feed the next: batch norm
folds into a conv's weights, convs become products (on the CPU, a conv of constant
weights one implicit GEMM over its input; elsewhere im2col and a product), constants fold (a transposed
constant weight becomes a stored weight), equal nodes merge, and what no output
needs is dropped. Dropout and Identity never reach the graph: the ONNX importer
removes them as it reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from codegen import cpu
from compiler.fusion import moves_elements, reads_through
from ir.errors import GraphError, InternalCompilerError
from ir.graph import Graph, Node, Value
from ir.ops import make_op
from ir.ops.nn import (
    MATMUL_PACK_ROW_BYTES,
    MATMUL_PACK_ROWS,
    MATMUL_VECTOR,
    PACKED_CONV_ROWS,
    PACKED_CONV_SMALL_K,
    PackPanels,
    pack_panels,
    packed_conv_panel,
)
from ir.ops.recurrent import Recurrence
from ir.ops.winograd import fused_pays as winograd_fused_pays
from ir.ops.winograd import tiles as winograd_tiles
from ir.ops.winograd import transform_weights
from ir.verify import verify

#: constants are folded only up to this many elements, so weights do not balloon
FOLD_MAX_ELEMENTS = 1 << 24


def _rewire(
    graph: Graph, nodes: list[Node], params: dict[Value, np.ndarray], replace: dict[Value, Value]
) -> Graph:
    """A new graph with `nodes`, every use of a key of `replace` pointing at its value."""

    def sub(v: Value) -> Value:
        while v in replace:
            v = replace[v]
        return v

    new_nodes = [Node(n.op, [sub(v) for v in n.inputs], n.outputs, n.name) for n in nodes]
    return Graph(graph.inputs, [sub(v) for v in graph.outputs], new_nodes, params, graph.name)


def fold_constants(graph: Graph) -> Graph:
    """A node whose inputs are all params is evaluated now; its output becomes a param.

    Safe: the reference implementation defines the op. Left alone: results larger
    than FOLD_MAX_ELEMENTS. This is also what folds a transpose (or any reshaping) of
    a constant weight into the stored weight, so a MatMul reads it directly.
    """
    params = dict(graph.params)
    nodes = []
    for node in graph.nodes:
        out = node.outputs[0]
        if all(v in params for v in node.inputs) and out.type.numel <= FOLD_MAX_ELEMENTS:
            with np.errstate(all="ignore"):
                result = node.op.reference(*(params[v] for v in node.inputs))
            params[out] = np.asarray(result, out.type.np_dtype, order="C").reshape(out.type.shape)
        else:
            nodes.append(node)
    return Graph(graph.inputs, graph.outputs, nodes, params, graph.name)


def fold_batchnorm(graph: Graph) -> Graph:
    """conv2d / linear → batch_norm (inference) becomes one conv2d / linear.

    BN at inference is a per-channel affine map y * s + t with s = scale / sqrt(var +
    eps) and t = bias - mean * s, so it folds into the weights (scaled per output
    channel) and the bias (b * s + t): one pass over the output less. Left alone:
    a BN whose input has another consumer or is a graph output, non-constant BN or
    conv parameters, and BN after linear unless the channel axis is the last one.
    """
    users = graph.consumers()
    producers = graph.producers()
    outputs = set(graph.outputs)
    params = dict(graph.params)
    replaced: dict[Node, Node] = {}
    dropped: set[Node] = set()
    for bn in graph.nodes:
        if bn.op.name != "batch_norm":
            continue
        y, *stats = bn.inputs
        conv = producers.get(y)
        if conv is None or conv.op.name not in ("conv2d", "linear") or conv in replaced:
            continue
        if len(users[y]) != 1 or y in outputs or not all(v in params for v in stats + conv.inputs[1:]):
            continue
        if conv.op.name == "linear" and y.type.rank != 2:
            continue
        scale, bias, mean, var = (params[v].astype(np.float64) for v in stats)
        s = scale / np.sqrt(var + bn.op.epsilon)
        t = bias - mean * s
        w = params[conv.inputs[1]].astype(np.float64)
        w = w * s.reshape(-1, 1, 1, 1) if conv.op.name == "conv2d" else w * s.reshape(1, -1)
        b = params[conv.inputs[2]].astype(np.float64) * s + t if len(conv.inputs) > 2 else t
        dtype = y.type.np_dtype
        w_v = Value(f"{conv.inputs[1].name}.bnfold", conv.inputs[1].type)
        b_v = Value(f"{bn.name}.bnfold_bias", y.type.with_shape((y.type.shape[1],)))
        params[w_v], params[b_v] = w.astype(dtype), b.astype(dtype)
        replaced[bn] = Node(conv.op, [conv.inputs[0], w_v, b_v], bn.outputs, conv.name)
        dropped.add(conv)
    nodes = [replaced.get(n, n) for n in graph.nodes if n not in dropped]
    return dead_code(Graph(graph.inputs, graph.outputs, nodes, params, graph.name))


#: input and output channels a conv needs for Winograd: with fewer, the transforms (per
#: tile and channel) cost more than the multiplications save (32 -> 64 channels, the MNIST
#: CNN's conv2 at batch 32, ran 10% slower than direct)
WINOGRAD_MIN_CHANNELS = 64
#: the most multiply-adds Winograd may take, as a share of the direct conv's: its product
#: computes whole 2x2 tiles, padded columns and the zero rows too (a 3x3 output of 4
#: tiles padded to 16 columns takes 3x the direct conv's), and its transforms cost
#: memory traffic besides
WINOGRAD_MAX_WORK = 0.65
#: the fewest tiles (the product's columns, all images) for Winograd: its transformed
#: weights, 1.8x the conv's, are read once a call and each meets every tile, so with
#: few tiles the product streams the weights for a few FMAs each (the direct conv meets
#: each weight at 4x as many positions), and below a vector of columns it computes
#: padding. It streams them at memory's speed, each row block fetching the next one's
#: rows (lower_matmul's rows_ahead). On a Xeon with two FMA ports, ResNet-18 at batch 1
#: by Winograd: its layer3 (49 tiles) 22.9 -> 21.5 ms on one thread and 11.9 -> 11.3 on
#: two (the conv alone 1.55 -> 0.91 ms), then its layer4 (16 tiles) 20.9 -> 20.5 and
#: 10.9 -> 10.5 (its products 2.3 ms each, 1.2 with the rows fetched ahead).
WINOGRAD_MIN_TILES = MATMUL_VECTOR


def _winograd_pays(conv: Node) -> bool:
    """A conv2d Winograd's F(2x2, 3x3) computes, in less work (see WINOGRAD_MIN_CHANNELS
    and WINOGRAD_MAX_WORK)."""
    op, (n, o, oh, ow), c = conv.op, conv.outputs[0].type.shape, conv.inputs[0].type.shape[1]
    if conv.inputs[1].type.shape[2:] != (3, 3) or (op.groups, op.strides, op.dilations) != (
        1,
        (1, 1),
        (1, 1),
    ):
        return False
    th, tw = winograd_tiles((oh, ow))
    work = 16 * (o + 1) * (c + 1) * n * th * tw
    return (
        min(o, c) >= WINOGRAD_MIN_CHANNELS
        and n * th * tw >= WINOGRAD_MIN_TILES
        and work <= WINOGRAD_MAX_WORK * o * c * 9 * n * oh * ow
    )


def conv_winograd(graph: Graph) -> Graph:
    """A 3x3 conv2d of stride 1 (one group, no dilation) of constant weights, with at least
    WINOGRAD_MIN_CHANNELS input and output channels and an output large enough for
    whole tiles to pay (WINOGRAD_MIN_TILES, WINOGRAD_MAX_WORK), becomes Winograd's F(2x2, 3x3)
    (ir.ops.winograd): winograd_input (which reads the conv's padding as zeros: no pad
    kernel copies x), a batched matmul by the transformed weights, and
    winograd_output with the bias (which takes the conv's epilogue); or, where V and M
    would outgrow L2 and a block of tiles fits a thread's scratch (fused_pays: blocks
    that the library's default threads share evenly), the three as one winograd_conv2d. 16
    multiplications per 2x2 outputs instead of 36. CPU only, before conv_packed."""
    nodes = []
    params = dict(graph.params)
    for node in graph.nodes:
        op = node.op
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not (op.name == "conv2d" and w in params and _winograd_pays(node)):
            nodes.append(node)
            continue
        x, _, *bias = node.inputs
        n, _, oh, ow = node.outputs[0].type.shape
        th, tw = winograd_tiles((oh, ow))
        # the conv's padding, and the bottom and right to whole tiles: zeros the input
        # transform reads where its windows fall outside x
        pt, pl = op.pads[:2]
        pads = (pt, pl, 2 * th + 2 - pt - x.type.shape[2], 2 * tw + 2 - pl - x.type.shape[3])
        weights = transform_weights(params[w])
        u = Value(f"{w.name}.winograd", w.type.with_shape(weights.shape))
        params[u] = weights
        if winograd_fused_pays(n, x.type.shape[1], th, tw, cpu.default_threads()):
            fused = make_op("winograd_conv2d", out_shape=(n, oh, ow), pads=pads)
            nodes.append(Node(fused, [x, u, *bias], node.outputs, node.name))
            continue
        to_tiles = make_op("winograd_input", pads=pads)
        tiles = Value(f"{node.name}.tiles", to_tiles.infer(x.type))
        product = make_op("matmul")
        sums = Value(f"{node.name}.products", product.infer(u.type, tiles.type))
        from_tiles = make_op("winograd_output", out_shape=(n, oh, ow))
        nodes += [
            Node(to_tiles, [x], [tiles], f"{node.name}.winograd_input"),
            Node(product, [u, tiles], [sums], f"{node.name}.products"),
            Node(from_tiles, [sums, *bias], node.outputs, node.name),
        ]
    return dead_code(Graph(graph.inputs, graph.outputs, nodes, params, graph.name))


def conv_packed(graph: Graph) -> Graph:
    """conv2d (one group) of constant weights becomes pad + conv2d_packed: an implicit
    GEMM that reads the windows of the (padded) input where they lie, against weights
    packed now into the kernel's panel layout (pack_panels). No im2col: its
    columns were KH*KW times the input, written out and read back for every conv.

    CPU only (the GPU schedules keep im2col + conv2d_gemm). Left alone: grouped convs,
    and weights that are not params (a train step's, which change every step): those
    go on to conv_to_gemm."""
    nodes = []
    params = dict(graph.params)
    for node in graph.nodes:
        if node.op.name != "conv2d" or node.op.groups != 1 or node.inputs[1] not in params:
            nodes.append(node)
            continue
        x, w, *bias = node.inputs
        op = node.op
        o, kh, kw = w.type.shape[0], *w.type.shape[2:]
        pt, pl, pb, pr = op.pads
        if any(op.pads):
            pad = make_op("pad", pads=(0, 0, pt, pl, 0, 0, pb, pr))
            padded = Value(f"{node.name}.padded", pad.infer(x.type))
            nodes.append(Node(pad, [x], [padded], f"{node.name}.pad"))
            x = padded
        packed = pack_panels(params[w], packed_conv_panel(o))
        w_v = Value(f"{w.name}.packed", w.type.with_shape(packed.shape))
        params[w_v] = packed
        conv = make_op(
            "conv2d_packed", kernel=(kh, kw), strides=op.strides, dilations=op.dilations, out_channels=o
        )
        nodes.append(Node(conv, [x, w_v, *bias], node.outputs, node.name))
    return dead_code(Graph(graph.inputs, graph.outputs, nodes, params, graph.name))


#: bytes of the ring of conv rows a max pool of overlapping windows inside a conv keeps
#: (p rows of the conv's width, a panel's filters each): within L2, beside the weights
POOL_RING_BYTES = 256 << 10


def conv_pool(graph: Graph) -> Graph:
    """A max pool of p x p windows (no dilation) after a conv2d_packed, directly or
    through a ReLU, runs inside the conv, so the conv's output, up to p² times the pooled
    one, is never stored, nor read back by a pooling kernel. Windows of stride p with no
    padding: the positions no window covers are not computed; a conv of few taps and
    stride 1 (a first layer) becomes conv2d_pooled, on its input with each row's columns
    dealt into p planes (a reshape and a transpose, over the small input); any other, the
    conv2d_packed with pool = p, whose register tile holds whole windows (p = 2).
    Overlapping or padded windows (ResNet's 3x3 of stride 2 after its first conv): the
    conv2d_packed with pool, pool_stride and pool_pad, which keeps a ring of conv rows
    (within POOL_RING_BYTES).
    max(relu(a), relu(b)) = relu(max(a, b)): the ReLU goes after the pooled conv, where
    fusion makes it the conv's epilogue. CPU only, after conv_packed."""
    producer = {v: n for n in graph.nodes for v in n.outputs}
    uses = Counter(v for n in graph.nodes for v in n.inputs) + Counter(graph.outputs)
    replaced: dict[Node, list[Node]] = {}
    dropped: set[Node] = set()
    for pool in graph.nodes:
        op = pool.op
        if op.name != "max_pool2d" or op.output != "values":
            continue
        p, s, q = op.kernel[0], op.strides[0], op.pads[0]
        square = (tuple(op.kernel), tuple(op.strides), tuple(op.pads)) == ((p, p), (s, s), (q,) * 4)
        if p < 2 or s > p or not square or tuple(op.dilations) != (1, 1):
            continue
        x = pool.inputs[0]
        relu = producer.get(x) if x in producer and producer[x].op.name == "relu" else None
        conv = producer.get(relu.inputs[0] if relu is not None else x)
        if conv is None or conv.op.name != "conv2d_packed" or uses[conv.outputs[0]] != 1 or uses[x] != 1:
            continue
        columns, w, *bias = conv.inputs
        n, c, h, width = columns.type.shape
        if s < p or q:
            ring = p * conv.outputs[0].type.shape[3] * w.type.shape[2] * w.type.itemsize
            if ring > POOL_RING_BYTES:
                continue
            pooled_op, new, pooled_ins = replace(conv.op, pool=p, pool_stride=s, pool_pad=q), [], conv.inputs
        elif conv.op.strides == (1, 1) and w.type.shape[1] <= PACKED_CONV_SMALL_K and width % p == 0:
            split = make_op("reshape", shape=(n, c, h, width // p, p))
            deal = make_op("transpose", perm=(0, 1, 2, 4, 3))
            pairs = Value(f"{conv.name}.column_pairs", split.infer(columns.type))
            planes = Value(f"{conv.name}.column_planes", deal.infer(pairs.type))
            pooled_op = make_op(
                "conv2d_pooled", kernel=conv.op.kernel, dilations=conv.op.dilations,
                out_channels=conv.op.out_channels, pool=p,
            )  # fmt: skip
            new = [
                Node(split, [columns], [pairs], f"{conv.name}.column_pairs"),
                Node(deal, [pairs], [planes], f"{conv.name}.column_planes"),
            ]
            pooled_ins = [planes, w, *bias]
        elif p * p <= min(PACKED_CONV_ROWS.values()):
            pooled_op, new, pooled_ins = replace(conv.op, pool=p), [], conv.inputs
        else:  # the windows' positions would not fit a register tile
            continue
        if relu is None:
            new.append(Node(pooled_op, pooled_ins, pool.outputs, conv.name))
        else:
            pooled = Value(f"{conv.name}.pooled", pooled_op.infer(*(v.type for v in pooled_ins)))
            new.append(Node(pooled_op, pooled_ins, [pooled], conv.name))
            new.append(Node(relu.op, [pooled], pool.outputs, relu.name))
        replaced[pool] = new
        dropped |= {conv} | ({relu} if relu is not None else set())
    nodes = [m for n in graph.nodes if n not in dropped for m in replaced.get(n, [n])]
    return Graph(graph.inputs, graph.outputs, nodes, graph.params, graph.name)


def linear_packed(graph: Graph) -> Graph:
    """A linear, or a matmul by a matrix, of constant weights becomes linear_packed, its
    weights packed now into panels of MATMUL_VECTOR columns (pack_panels): each column
    tile of the product then streams contiguous memory instead of a column block of
    the weights, whose rows lie N floats apart (at N = 512 or 1024, 2 or 4 KiB: the
    same few L1 sets, which evict one another). A large matmul by a matrix computed at
    run time (runtime_panels) reads it packed too, by a pack_panels node. CPU only,
    after fold_constants (an ONNX Gemm's transposed weights are folded by then)."""
    nodes = []
    params = dict(graph.params)
    packed: dict[Value, Value] = {}  # each weight packed once, however many products read it
    for node in graph.nodes:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if not (
            node.op.name in ("linear", "matmul")
            and w is not None
            and w.type.rank == 2
            and (w in params or runtime_panels(node))
        ):
            nodes.append(node)
            continue
        if w not in packed and w in params:
            panels = pack_panels(params[w].T, MATMUL_VECTOR)
            packed[w] = Value(f"{w.name}.packed", w.type.with_shape(panels.shape))
            params[packed[w]] = panels
        elif w not in packed:
            packed[w] = Value(f"{w.name}.packed", PackPanels().infer(w.type))
            nodes.append(Node(PackPanels(), [w], [packed[w]], packed[w].name))
        op = make_op("linear_packed", out_features=w.type.shape[1])
        nodes.append(Node(op, [node.inputs[0], packed[w], *node.inputs[2:]], node.outputs, node.name))
    return dead_code(Graph(graph.inputs, graph.outputs, nodes, params, graph.name))


def runtime_panels(node: Node) -> bool:
    """Whether a matmul by a matrix b computed at run time reads b packed: where b's
    rows are MATMUL_PACK_ROW_BYTES or more apart, a has MATMUL_PACK_ROWS rows or more
    (the product would stream b's column panels from L2 or copy them once per parallel
    step of rows) and b's columns fill whole panels. Packing reads and writes b once; a 512^3
    product then runs at the packed weights' speed (152 against 118 GFLOP/s)."""
    a, b = node.inputs[0].type, node.inputs[1].type
    rows, n = a.numel // max(a.shape[-1], 1), b.shape[1]
    wide = n * b.itemsize >= MATMUL_PACK_ROW_BYTES
    return (
        node.op.name == "matmul"
        and a.rank >= 2
        and rows >= MATMUL_PACK_ROWS
        and wide
        and n % MATMUL_VECTOR == 0
    )


def recurrence_packed(graph: Graph) -> Graph:
    """An RNN, GRU or LSTM of constant recurrent weights reads Rᵀ packed into panels of
    MATMUL_VECTOR columns (the op's rt_panel): a tile of a gate's units then sweeps
    contiguous rows instead of a column block of Rᵀ whose rows lie gates·hidden floats
    apart (4 KiB for an LSTM of 256 units: one L1 set). Units must fill whole panels
    (hidden a multiple of MATMUL_VECTOR), so that no panel spans two gates."""
    nodes = []
    params = dict(graph.params)
    for node in graph.nodes:
        rt = node.inputs[1] if len(node.inputs) > 1 else None
        op = node.op
        packable = isinstance(op, Recurrence) and op.rt_panel is None and op.hidden % MATMUL_VECTOR == 0
        if not (packable and rt in params):
            nodes.append(node)
            continue
        panels = pack_panels(params[rt].T, MATMUL_VECTOR)
        packed = Value(f"{rt.name}.packed", rt.type.with_shape(panels.shape))
        params[packed] = panels
        inputs = [node.inputs[0], packed, *node.inputs[2:]]
        nodes.append(Node(replace(op, rt_panel=MATMUL_VECTOR), inputs, node.outputs, node.name))
    return dead_code(Graph(graph.inputs, graph.outputs, nodes, params, graph.name))


def conv_to_gemm(graph: Graph) -> Graph:
    """conv2d (one group) becomes im2col + conv2d_gemm: a matrix product over the
    windows, which runs at matmul speed (weights reused across a block of output
    channels) for the price of writing the windows out once (KH*KW times the input).
    A 1x1 conv with stride 1 and no padding needs no im2col: its input already is the
    columns. Where the output has fewer positions than a vector has lanes (a late
    conv of a small network), the product is taken the other way round (see
    _conv_as_linear). Left alone: grouped (depthwise) convolutions."""
    nodes = []
    for node in graph.nodes:
        if node.op.name != "conv2d" or node.op.groups != 1:
            nodes.append(node)
            continue
        x, w, *bias = node.inputs
        op = node.op
        kh, kw = w.type.shape[2:]
        if (kh, kw) == (1, 1) and op.strides == (1, 1) and op.pads == (0, 0, 0, 0):
            cols = x
        else:
            im2col = make_op(
                "im2col", kernel=(kh, kw), strides=op.strides, pads=op.pads, dilations=op.dilations
            )
            cols = Value(f"{node.name}.cols", im2col.infer(x.type))
            nodes.append(Node(im2col, [x], [cols], f"{node.name}.im2col"))
        n, o, oh, ow = node.outputs[0].type.shape
        if oh * ow < MATMUL_VECTOR <= o:
            nodes += _conv_as_linear(node, cols, w, bias)
        else:
            nodes.append(Node(make_op("conv2d_gemm"), [cols, w, *bias], node.outputs, node.name))
    return Graph(graph.inputs, graph.outputs, nodes, graph.params, graph.name)


def _conv_as_linear(node: Node, cols: Value, w: Value, bias: list[Value]) -> list[Node]:
    """The conv as (windows as rows) @ wᵀ: rows are (image, position) pairs and columns
    the output channels, so the matrix product's column tiles run over the channels
    rather than over a handful of positions. The transposes around it are small (few
    positions), and wᵀ of constant weights is folded."""
    n, o, oh, ow = node.outputs[0].type.shape
    k = cols.type.shape[1]
    nodes: list[Node] = []

    def add(op_name: str, inputs: list[Value], suffix: str, out: Value | None = None, **attrs) -> Value:
        op = make_op(op_name, **attrs)
        out = out or Value(f"{node.name}.{suffix}", op.infer(*(v.type for v in inputs)))
        nodes.append(Node(op, inputs, [out], f"{node.name}.{suffix}"))
        return out

    rows = add("transpose", [add("reshape", [cols], "cols3", shape=(n, k, oh * ow))], "rows", perm=(0, 2, 1))
    rows = add("reshape", [rows], "rows2", shape=(n * oh * ow, k))
    w_t = add("transpose", [add("reshape", [w], "w2", shape=(o, k))], "wt", perm=(1, 0))
    y = add("linear", [rows, w_t, *bias], "linear")
    y = add("transpose", [add("reshape", [y], "y3", shape=(n, oh * ow, o))], "nchw", perm=(0, 2, 1))
    add("reshape", [y], "out", out=node.outputs[0], shape=(n, o, oh, ow))
    return nodes


def attention_fused(graph: Graph) -> Graph:
    """matmul(softmax(matmul(q, kt) [+ bias]), v), the softmax over the last axis, the
    bias one number per key, and the scores and probabilities read by nothing else, is
    one attention op (ir.ops.attention), which keeps each step's scores in cache. The
    leading axes of q, kt and v must be the same (no broadcasting)."""
    users, producers = graph.consumers(), graph.producers()
    outputs = set(graph.outputs)

    def only_reader(v: Value) -> Node | None:
        readers = users[v]
        return readers[0] if len(readers) == 1 and v not in outputs else None

    def key_bias(node: Node | None) -> tuple[Node, Value] | None:
        """(the product, the bias) where node adds a vector of one number per key to it."""
        if node is None or node.op.name != "add":
            return None
        for scores, bias in (node.inputs, node.inputs[::-1]):
            product = producers.get(scores)
            if product and product.op.name == "matmul" and bias.type.shape == scores.type.shape[-1:]:
                return product, bias
        return None

    fused: dict[Node, Node] = {}  # the second matmul -> the attention node
    dropped: set[Node] = set()
    for node in graph.nodes:
        if node.op.name != "softmax" or node.op.axis not in (-1, node.inputs[0].type.rank - 1):
            continue
        first, second = producers.get(node.inputs[0]), only_reader(node.outputs[0])
        biased = key_bias(first)
        adder, bias = node, []
        if biased is not None and only_reader(first.outputs[0]) is node:
            adder, first, bias = first, biased[0], [biased[1]]
        if (
            first is None
            or first.op.name != "matmul"
            or only_reader(first.outputs[0]) is not adder
            or second is None
            or second.op.name != "matmul"
            or second.inputs[0] is not node.outputs[0]
        ):
            continue
        q, kt, v = first.inputs[0], first.inputs[1], second.inputs[1]
        ranks = {x.type.rank for x in (q, kt, v)}
        if len(ranks) > 1 or min(ranks) < 2 or len({x.type.shape[:-2] for x in (q, kt, v)}) > 1:
            continue
        fused[second] = Node(make_op("attention"), [q, kt, v, *bias], second.outputs, second.name)
        dropped |= {first, adder, node}
    if not fused:
        return graph
    nodes = [fused.get(n, n) for n in graph.nodes if n not in dropped]
    return Graph(graph.inputs, graph.outputs, nodes, graph.params, graph.name)


def cancel_transposes(graph: Graph) -> Graph:
    """transpose(transpose(x, p), q) is one transpose by p∘q, or x itself when that is
    the identity: the NHWC ↔ NCHW pairs around consecutive channels-last layers (and
    their gradients) disappear. The inner transpose stays for its other readers, if any."""
    producers = graph.producers()
    replace: dict[Value, Value] = {}
    nodes = []
    for node in graph.nodes:
        inner = producers.get(node.inputs[0]) if node.op.name == "transpose" else None
        if inner is None or inner.op.name != "transpose":
            nodes.append(node)
            continue
        x = inner.inputs[0]
        rank = x.type.rank
        p, q = inner.op.axes(rank), node.op.axes(rank)
        combined = tuple(p[i] for i in q)
        if combined == tuple(range(rank)):
            replace[node.outputs[0]] = x
        else:
            nodes.append(Node(make_op("transpose", perm=combined), [x], node.outputs, node.name))
    return _rewire(graph, nodes, graph.params, replace)


def gather_as_slice(graph: Graph) -> Graph:
    """A gather of one constant index, in range, is a slice of that index (reshaped to
    drop the axis where the index is a scalar): an attention head's Q, K and V picked
    out of one projection. A slice's kernel needs no run-time check of the index, so it
    vectorizes, and the fusion reads through it (compiler.fusion's index chains)."""
    nodes: list[Node] = []
    for node in graph.nodes:
        index = graph.params.get(node.inputs[1]) if node.op.name == "gather" else None
        data = node.inputs[0].type
        axis = node.op.axis % data.rank if index is not None else 0
        if index is None or index.size != 1 or not -data.shape[axis] <= int(index.flat[0]) < data.shape[axis]:
            nodes.append(node)
            continue
        at = int(index.flat[0]) % data.shape[axis]
        picked = Value(
            f"{node.outputs[0].name}.slice",
            data.with_shape(data.shape[:axis] + (1,) + data.shape[axis + 1 :]),
        )
        nodes.append(
            Node(
                make_op("slice", starts=(at,), ends=(at + 1,), axes=(axis,)),
                node.inputs[:1],
                [picked],
                f"{node.name}.slice",
            )
        )
        shape = node.outputs[0].type.shape
        nodes.append(Node(make_op("reshape", shape=shape), [picked], node.outputs, node.name))
    return Graph(graph.inputs, graph.outputs, nodes, graph.params, graph.name)


def copy_shared_moves(graph: Graph) -> Graph:
    """An element-moving node (compiler.fusion.moves_elements) whose readers all read
    through their inputs (compiler.fusion.reads_through) gets a copy for each read, and
    so on up the chain, so each reader's index chain is its own: three slices of one
    transposed projection read the projection, and the whole transpose is never
    stored. Never more traffic: each copy reads what its reader needs, where the shared
    node read and wrote it all. Runs after merge_common, which would merge the copies.

    Nodes are visited last first, so a node's readers, copies included, are final
    when it is decided."""
    outputs = set(graph.outputs)
    built: list[Node] = []  # last first
    reads: dict[Value, list[tuple[int, int]]] = {}  # value -> (reader's place in built, input slot)

    def add(node: Node) -> None:
        for i, v in enumerate(node.inputs):
            reads.setdefault(v, []).append((len(built), i))
        built.append(node)

    for node in reversed(graph.nodes):
        out = node.outputs[0]
        slots = reads.pop(out, [])
        readers = [built[r] for r in dict.fromkeys(r for r, _ in slots)]
        shared = len(slots) > 1 and out not in outputs and moves_elements(node)
        if not shared or not all(map(reads_through, readers)):
            add(node)
            continue
        for j, (r, i) in enumerate(slots):
            copy = Value(f"{out.name}.{j}", out.type)
            reader = built[r]
            inputs = [copy if k == i else v for k, v in enumerate(reader.inputs)]
            built[r] = Node(reader.op, inputs, reader.outputs, reader.name)
            add(Node(node.op, node.inputs, [copy], f"{node.name}.{j}"))
    if len(built) == len(graph.nodes):
        return graph
    return Graph(graph.inputs, graph.outputs, built[::-1], graph.params, graph.name)


def merge_common(graph: Graph) -> Graph:
    """Nodes applying the same op (same attributes) to the same inputs become one.

    Safe: ops are pure. The later node's output is replaced by the earlier one's.
    """
    seen: dict[tuple, Value] = {}
    replace: dict[Value, Value] = {}
    nodes = []
    for node in graph.nodes:
        inputs = tuple(id(replace.get(v, v)) for v in node.inputs)
        key = (node.op, inputs)
        if key in seen:
            replace[node.outputs[0]] = seen[key]
            continue
        seen[key] = node.outputs[0]
        nodes.append(node)
    return _rewire(graph, nodes, graph.params, replace)


def dead_code(graph: Graph) -> Graph:
    """Drop nodes and params that no graph output depends on. Inputs stay (the ABI)."""
    producers = graph.producers()
    live: set[Value] = set()
    stack = list(graph.outputs)
    while stack:
        v = stack.pop()
        if v in live:
            continue
        live.add(v)
        if v in producers:
            stack.extend(producers[v].inputs)
    nodes = [n for n in graph.nodes if n.outputs[0] in live]
    params = {v: a for v, a in graph.params.items() if v in live}
    return Graph(graph.inputs, graph.outputs, nodes, params, graph.name)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]
    purpose: str
    #: the targets it runs for (None: every target)
    targets: tuple[str, ...] | None = None


#: the passes in the order that lets each feed the next
PIPELINE = (
    Pass("fold_batchnorm", fold_batchnorm, "batch norm after a conv or linear folds into its weights"),
    Pass("conv_winograd", conv_winograd, "a 3x3 stride-1 conv becomes Winograd's F(2x2, 3x3)", ("cpu",)),
    Pass("conv_packed", conv_packed, "a conv of constant weights reads its windows in place", ("cpu",)),
    Pass("conv_pool", conv_pool, "a max pool after a first-layer conv runs inside it", ("cpu",)),
    Pass("conv_to_gemm", conv_to_gemm, "each conv becomes im2col windows and one product"),
    Pass("fold_constants", fold_constants, "nodes whose inputs are all constants are evaluated now"),
    Pass("linear_packed", linear_packed, "a product by constant weights reads them in panels", ("cpu",)),
    Pass("recurrence_packed", recurrence_packed, "a recurrence reads constant Rᵀ in panels", ("cpu",)),
    Pass("attention_fused", attention_fused, "matmul, softmax, matmul is one attention op", ("cpu",)),
    Pass("cancel_transposes", cancel_transposes, "a transpose undone by the next one goes"),
    Pass("merge_common", merge_common, "equal nodes on equal inputs become one"),
    Pass("gather_as_slice", gather_as_slice, "a gather of one constant index is a slice"),
    Pass(
        "copy_shared_moves", copy_shared_moves, "an element-moving node read by such nodes is copied for each"
    ),
    Pass("dead_code", dead_code, "nodes and params no output needs are dropped"),
)


def simplify(
    graph: Graph,
    verify_each: bool = False,
    after: Callable[[Pass, Graph], None] | None = None,
    target: str = "cpu",
) -> Graph:
    """Run PIPELINE's passes for `target`; `verify_each` runs the graph verifier after
    every pass (the tests do), `after` sees the graph each pass leaves (`kiln inspect
    --print-after-all`)."""
    for p in PIPELINE:
        if p.targets is not None and target not in p.targets:
            continue
        graph = p.run(graph)
        if verify_each:
            try:
                verify(graph)
            except GraphError as e:
                raise InternalCompilerError(f"the graph after pass {p.name} does not verify: {e}") from e
        if after is not None:
            after(p, graph)
    return graph
