"""Dynamic batch: one library for every batch size, built from programs for a few.

A model whose inputs name a batch dimension (`N`, `batch_size`) is compiled for a few
batch sizes, its tiles (32, 8 and 1 by default). A call with a batch of B runs the
largest tile that fits as often as it fits, then the next, each on its consecutive
slice of the batch (codegen.batched_abi writes that loop in C, as NAME_run_shaped).
Each tile is an ordinary static-shape program, so a batch of 1 or 32 runs the very
kernels a library compiled for that batch would, and the arena is sized by the tiles,
not by the largest batch a caller brings.

That is only right when every batch element's outputs come from its own inputs alone.
`batch_layout` proves it op by op (Op.batch_axis) on each tile's graph, and finds
where each output holds the batch; a model that mixes elements (a reduction over the
batch, a reshape that folds the batch into another axis) is refused, naming the node.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import prod

import numpy as np

from ir.graph import Graph, Value
from ir.ops import Batch, BatchAxis, BatchMixing
from ir.types import TensorType

#: the batch sizes a dynamic-batch library is compiled for, largest first (1 must be
#: among them: it runs what the others leave)
DEFAULT_TILES = (32, 8, 1)
#: constants folded while proving a graph batch-separable are at most this many elements
FOLD_LIMIT = 1 << 22


@dataclass(frozen=True)
class BatchedTensor:
    """An input or output of a dynamic-batch library: its shape for one batch element
    (`block` indices on `axis` for each), where the batch is, and its dtype."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # the batch axis holds `block`: its size for one element
    batch: Batch

    def shape_for(self, count: int) -> tuple[int, ...]:
        """The shape for a batch of `count` elements."""
        if self.batch is None:
            return self.shape
        axis = self.batch.axis
        return self.shape[:axis] + (self.batch.block * count,) + self.shape[axis + 1 :]

    @property
    def outer(self) -> int:
        """How many runs of batch elements the tensor holds (the product of the dims
        before the batch axis): 1 when a batch slice is one contiguous range."""
        return prod(self.shape[: self.batch.axis]) if self.batch else 1

    @property
    def element_bytes(self) -> int:
        """The bytes one batch element owns in each run."""
        itemsize = TensorType(self.dtype, ()).itemsize
        return prod(self.shape[self.batch.axis :]) * itemsize if self.batch else 0


def _uniform(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    return flat.size > 1 and bool((flat == flat[0]).all())


def _spans(t: TensorType, count: int) -> list[Batch]:
    """Where a constant of equal elements may hold the batch: any axis that is a
    multiple of the batch (its slices are all the same)."""
    return [BatchAxis(a, d // count) for a, d in enumerate(t.shape) if d and d % count == 0]


def batch_layout(graph: Graph, inputs: dict[str, Batch], count: int) -> list[Batch]:
    """Where each output of `graph`, compiled for a batch of `count` (2 or more), holds
    the batch, given where its inputs do (by name); BatchMixing names the node where
    batch elements meet. A constant whose elements are all equal (the zeros an exporter
    writes for a batch of initial states) may hold the batch on any axis it spans."""
    if count < 2:
        raise ValueError("a batch layout is proved on a graph for a batch of 2 or more")
    where: dict[Value, Batch] = {v: inputs.get(v.name) for v in graph.inputs}
    known: dict[Value, np.ndarray] = dict(graph.params)
    where.update(dict.fromkeys(graph.params))
    for node in graph.nodes:
        given = [where[v] for v in node.inputs]
        if not any(given):
            where.update(dict.fromkeys(node.outputs))
            if len(node.outputs) == 1 and all(v in known for v in node.inputs):
                if node.outputs[0].type.numel <= FOLD_LIMIT:
                    known[node.outputs[0]] = node.op.reference(*(known[v] for v in node.inputs))
            continue
        where[node.outputs[0]] = _node_batch(node, given, known, count)
    missing = [v.name for v in graph.outputs if where[v] is None]
    if missing:
        raise BatchMixing(f"outputs {missing} do not depend on the batch")
    return [where[v] for v in graph.outputs]


def _node_batch(node, given: list[Batch], known: dict[Value, np.ndarray], count: int) -> Batch:
    if len(node.outputs) != 1:
        raise BatchMixing(f"node {node.name} ({node.op.name}): an op of several outputs has no batch rule")
    options = [
        [b] if b or v not in known or not _uniform(known[v]) else [None, *_spans(v.type, count)]
        for v, b in zip(node.inputs, given)
    ]
    ins, out = [v.type for v in node.inputs], node.outputs[0].type
    first: BatchMixing | None = None
    for choice in itertools.product(*options):
        try:
            return node.op.batch_axis(ins, out, list(choice))
        except BatchMixing as e:
            first = first or e
    raise BatchMixing(f"node {node.name} ({node.op.name}): {first}")
