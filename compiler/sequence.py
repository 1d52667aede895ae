"""Dynamic sequence length: one library for every length up to a bound.

Attention meets a sequence's positions, so they cannot run in pieces as a batch's
elements do (compiler.batching). They can run padded. The library holds the model's
programs for a few bucket lengths (16, 32, 64, ... and the bound); a sequence of L
positions runs through the smallest bucket B >= L, its positions L..B-1 filled with
copies of position L-1 and every attention's padded keys masked out: the softmax over
key positions gets a vector added, 0 for the first L keys and -inf for the rest (the
program input KEY_MASK, which the library fills per call), so a padded key weighs
exactly 0. Positions below L then get what a program for L computes, up to rounding:

- an op that keeps positions apart (Op.batch_axis, the batch's rule) computes
  position p from position p alone;
- the product of queries (positions on the rows) and transposed keys (positions on the
  columns) makes scores with a query axis and a key axis;
- the masked softmax over the key axis gives the padded keys weight 0, and its product
  with the values (positions on the rows) sums them away: 0 times a finite number, as
  the padded positions are computed from copies of a real one.

`sequence_layout` proves this op by op and finds the softmaxes to mask; anything else
that meets positions (a reduction over the sequence, a convolution along it, a
recurrence) is refused, naming the node. Each bucket is a dynamic-batch tile set, so
the library takes any batch too; codegen.sequence_abi writes its C API.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compiler.batching import DEFAULT_TILES, TileSet, fold, node_batch, prove_tiles, uniform
from ir.errors import UnsupportedError
from ir.graph import Graph, Node, Value
from ir.ops import BatchAxis, BatchMixing, ElementwiseOp, broadcast_batch, make_op
from ir.types import TensorType

#: the program input that masks padded keys: 0 for a call's positions, -inf beyond
KEY_MASK = "kiln_key_mask"
#: the shortest bucket; the next ones double up to the bound
FIRST_BUCKET = 16


class SequenceMixing(UnsupportedError):
    """An op that meets sequence positions other than attention's masked softmax and
    its product with the values: the model cannot run a sequence padded."""


@dataclasses.dataclass(frozen=True)
class Positions:
    """Where a value holds sequence positions: `rows`, an axis whose indices each belong
    to one position (as a batch axis does to one element); for attention's scores and
    probabilities also `keys`, the axis of key positions; `masked`: the padded keys
    hold exact zeros there (softmax's weights)."""

    rows: BatchAxis | None
    keys: int | None = None
    masked: bool = False


def bucket_lengths(bound: int) -> tuple[int, ...]:
    """The lengths a library for sequences of 1..bound is compiled for: FIRST_BUCKET,
    doubling, and the bound itself."""
    if bound < 1:
        raise ValueError(f"a sequence bound is at least 1, got {bound}")
    lengths, length = [], FIRST_BUCKET
    while length < bound:
        lengths.append(length)
        length *= 2
    return (*lengths, bound)


def sequence_layout(
    graph: Graph, inputs: dict[str, BatchAxis], length: int
) -> tuple[list[BatchAxis], list[Node]]:
    """Where each output of `graph` (compiled for sequences of `length`) holds the
    positions, given where its inputs do (by name), and the softmaxes over key
    positions to mask; SequenceMixing names the node where positions meet otherwise."""
    where: dict[Value, Positions | None] = {
        v: Positions(inputs[v.name]) if v.name in inputs else None for v in graph.inputs
    }
    known: dict[Value, np.ndarray] = dict(graph.params)
    where.update(dict.fromkeys(graph.params))
    masked: list[Node] = []
    for node in graph.nodes:
        given = [where[v] for v in node.inputs]
        if not any(given):
            where.update(dict.fromkeys(node.outputs))
            fold(node, known)
            continue
        if len(node.outputs) != 1:
            raise SequenceMixing(f"node {node.name} ({node.op.name}): an op of several outputs has no rule")
        where[node.outputs[0]] = _node_positions(node, given, known, length, masked)
    layout = []
    for v in graph.outputs:
        p = where[v]
        if p is None or p.keys is not None or p.rows is None:
            raise SequenceMixing(f"output {v.name} does not hold one row per position")
        if (p.rows.block, p.rows.repeats) != (1, 1):
            raise SequenceMixing(f"output {v.name} holds the positions interleaved ({p.rows})")
        layout.append(p.rows)
    return layout, masked


def _plain(b: BatchAxis | None) -> bool:
    return b is not None and (b.block, b.repeats) == (1, 1)


def _node_positions(
    node: Node, given: list[Positions | None], known: dict[Value, np.ndarray], length: int, masked: list[Node]
) -> Positions:
    ins, out = [v.type for v in node.inputs], node.outputs[0].type
    op = node.op
    where = f"node {node.name} ({op.name})"
    if not any(p and p.keys is not None for p in given):
        if op.name == "matmul" and all(given):
            a, b = given
            if (
                _plain(a.rows)
                and _plain(b.rows)
                and (a.rows.axis, b.rows.axis) == (ins[0].rank - 2, ins[1].rank - 1)
            ):
                return Positions(BatchAxis(out.rank - 2), out.rank - 1)  # queries x keys
        try:
            return Positions(node_batch(node, [p.rows if p else None for p in given], known, length))
        except BatchMixing as e:
            raise SequenceMixing(f"{e}: positions meet outside attention") from None
    scores = given[0]
    if scores is None or any(p and p.keys is not None for p in given[1:]):
        raise SequenceMixing(f"{where}: attention scores meet outside a product with the values")
    if op.name == "softmax" and len(given) == 1 and op.axis % out.rank == scores.keys and not scores.masked:
        masked.append(node)
        return dataclasses.replace(scores, masked=True)
    values = given[1] if len(given) == 2 else None
    if (
        op.name == "matmul"
        and scores.masked
        and values is not None
        and (scores.rows.axis, scores.keys) == (ins[0].rank - 2, ins[0].rank - 1)
        and _plain(values.rows)
        and values.rows.axis == ins[1].rank - 2
    ):
        return Positions(BatchAxis(out.rank - 2))  # the padded keys' zero weights sum away
    if isinstance(op, ElementwiseOp) and not scores.masked:  # a scale, a mask of the model's
        try:
            rows = broadcast_batch(ins, out, [p.rows if p else None for p in given])
            keys = broadcast_batch(ins, out, [BatchAxis(p.keys) if p else None for p in given])
        except BatchMixing as e:
            raise SequenceMixing(f"{where}: {e}") from None
        return Positions(rows, keys.axis if keys else None)
    raise SequenceMixing(f"{where}: attention's probabilities meet the keys otherwise than times the values")


def with_key_mask(graph: Graph, softmaxes: list[Node], length: int) -> Graph:
    """The graph with input KEY_MASK (float32[length]) added to the scores of each of
    these softmaxes over key positions (their last axis: the rules of sequence_layout
    keep the keys where the product with the queries puts them)."""
    mask = Value(KEY_MASK, TensorType("float32", (length,)))
    nodes = []
    for node in graph.nodes:
        if node not in softmaxes:
            nodes.append(node)
            continue
        scores = node.inputs[0]
        assert node.op.axis % scores.type.rank == scores.type.rank - 1, "keys are the scores' last axis"
        biased = Value(f"{node.name}_masked", scores.type)
        nodes.append(Node(make_op("add"), [scores, mask], [biased], biased.name))
        nodes.append(Node(node.op, [biased], node.outputs, node.name))
    return Graph([*graph.inputs, mask], graph.outputs, nodes, dict(graph.params), graph.name)


def same_constants(short: Graph, long: Graph) -> None:
    """SequenceMixing unless the constants the model's nodes read are the same at two
    lengths (one that depends on the length, a table of positions, is not yet taken)."""
    first = {v.name: a for v, a in short.params.items()}
    read = {v for node in long.nodes for v in node.inputs}
    for v, a in long.params.items():
        other = first.get(v.name)
        if v not in read or (other is None and uniform(a)):
            continue
        if other is None or other.shape != a.shape or not np.array_equal(other, a):
            raise SequenceMixing(f"constant {v.name} {a.shape} depends on the sequence length")


@dataclasses.dataclass(frozen=True)
class SequenceTensor:
    """An input or output of a library for every length: its name, dtype, shape for a
    batch of one at the first bucket, and its batch and position axes (None: none)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch: int | None
    positions: int | None


def prove_sequences(
    graph_at: Callable[[int, int], Graph],
    batch_axes: dict[str, int],
    position_axes: dict[str, int],
    batch: str,
    bound: int,
    prefix: str,
    tiles: tuple[int, ...] = DEFAULT_TILES,
    max_batch: int = 0,
) -> tuple[list[tuple[int, TileSet]], list[BatchAxis]]:
    """(length, tile set) of each bucket, and where each output holds the positions:
    `graph_at(count, length)` is the model's graph for a batch of `count` and sequences
    of `length`, its inputs holding the batch and the positions on the axes these say
    (by name). Each bucket's graphs are proved to run positions padded
    (sequence_layout) and batch elements apart (prove_tiles)."""
    lengths = bucket_lengths(bound)
    if len(lengths) > 1:
        same_constants(graph_at(1, lengths[0]), graph_at(1, lengths[-1]))
    positions = {name: BatchAxis(axis) for name, axis in position_axes.items()}
    axes = {name: BatchAxis(axis) for name, axis in batch_axes.items()} | {KEY_MASK: None}
    layouts: set[tuple[BatchAxis, ...]] = set()
    buckets = []
    for length in lengths:

        def graph_for(count: int, length: int = length) -> Graph:
            graph = graph_at(count, length)
            layout, softmaxes = sequence_layout(graph, positions, length)
            layouts.add(tuple(layout))
            return with_key_mask(graph, softmaxes, length)

        buckets.append((length, prove_tiles(graph_for, axes, batch, f"{prefix}_s{length}", tiles, max_batch)))
    if len(layouts) != 1:
        raise SequenceMixing(f"the outputs hold the positions differently at different sizes: {layouts}")
    return buckets, list(layouts.pop())


def compile_sequences(
    model: object,
    batch: str,
    sequence: str,
    bound: int,
    name: str = "model",
    max_batch: int = 0,
    fuse: bool = True,
    cpu_name: str | None = None,
    constant_inputs: dict[str, object] | None = None,
    tiles: tuple[int, ...] = DEFAULT_TILES,
):
    """One CPU library (a BatchedModel) for an ONNX model whose inputs name a batch
    dimension and a sequence dimension: any batch, any length from 1 to `bound`."""
    import onnx

    from codegen import sequence_abi
    from compiler.driver import build_several, cached_build, to_graph
    from compiler.specialize import declared_inputs
    from frontends.onnx import load_model
    from runtime.batched import BatchedModel

    proto = load_model(model)
    fixed = set(constant_inputs or ()) | {t.name for t in proto.graph.initializer}
    declared = [i for i in declared_inputs(proto.graph.input, onnx) if i.name not in fixed]
    if not any(sequence in i.shape for i in declared):
        raise ValueError(f"no input of {name} has the dimension {sequence!r}")

    def graph_at(count: int, length: int) -> Graph:
        sizes = {batch: count, sequence: length}
        shapes = {i.name: tuple(sizes.get(d, d) for d in i.shape) for i in declared}
        return to_graph(proto, shapes, constant_inputs)

    batch_axes = {i.name: i.shape.index(batch) for i in declared if batch in i.shape}
    position_axes = {i.name: i.shape.index(sequence) for i in declared if sequence in i.shape}
    buckets, positions = prove_sequences(
        graph_at, batch_axes, position_axes, batch, bound, name, tiles, max_batch
    )
    first = buckets[0][1]
    if any(t.batch and (t.batch.block, t.batch.repeats) != (1, 1) for t in first.outputs):
        raise SequenceMixing(f"an output holds the batch interleaved: {[t.batch for t in first.outputs]}")
    inputs = [
        SequenceTensor(t.name, t.dtype, t.shape, batch_axes.get(t.name), position_axes.get(t.name))
        for t in first.inputs
        if t.name != KEY_MASK
    ]
    outputs = [
        SequenceTensor(t.name, t.dtype, t.shape, t.batch.axis if t.batch else None, rows.axis)
        for t, rows in zip(first.outputs, positions)
    ]
    keys = "".join(tile_set.key(fuse, cpu_name) for _, tile_set in buckets)
    key = hashlib.sha256(f"{keys} {batch} {sequence} {bound}".encode()).hexdigest()[:32]

    def make(dest: Path) -> None:
        programs, wrappers = [], []
        for _, tile_set in buckets:
            lowered, wrapper = tile_set.lower(fuse, cpu_name)
            programs += lowered
            wrappers.append(wrapper)
        layout = sequence_abi.Layout(
            name, batch, sequence, max_batch, [b for b, _ in buckets], inputs, outputs
        )
        build_several(programs, dest, name, extra_c=[*wrappers, sequence_abi.source(layout)])
        (dest / f"{name}.h").write_text(sequence_abi.header(layout))

    return BatchedModel(cached_build(key, name, make), name)
