"""Dynamic batch: one library for every batch size, built from programs for a few.

A model whose inputs name a batch dimension (`N`, `batch_size`) is compiled for a few
batch sizes, its tiles (32, 8 and 1 by default). A call with a batch of B runs whole
runs of the largest tile, then the rest by the cheapest tiles, a larger one padded
with zeros where that costs less (`cover_table`, from a roofline estimate of each
tile's program), each on its consecutive slice of the batch (codegen.batched_abi
writes that loop in C, as NAME_run_shaped). Each tile is an ordinary static-shape
program, so a batch of 1 or 32 runs the very kernels a library compiled for that
batch would, and the arena is sized by the tiles, not by the largest batch a caller
brings.

That is only right when every batch element's outputs come from its own inputs alone.
`batch_layout` proves it op by op (Op.batch_axis) on each tile's graph, and finds
where each output holds the batch; a model that mixes elements (a reduction over the
batch, a reshape that folds the batch into another axis) is refused, naming the node.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from ir.errors import GraphError, UnsupportedError
from ir.graph import Graph, Value
from ir.ops import Batch, BatchAxis, BatchMixing
from ir.types import TensorType

#: the batch sizes a dynamic-batch library is compiled for, largest first (1 must be
#: among them: it runs what the others leave)
DEFAULT_TILES = (32, 8, 1)
#: constants folded while proving a graph batch-separable are at most this many elements
FOLD_LIMIT = 1 << 22
#: the cost estimate of a tile's program (program_seconds): a kernel runs at this many
#: FLOP/s or moves this many bytes a second, whichever takes longer, and costs this
#: much more to start. Rough, as only the ratios between tiles matter.
FLOP_RATE, BANDWIDTH, KERNEL_START = 80e9, 20e9, 1e-6


@dataclass(frozen=True)
class BatchedTensor:
    """An input or output of a dynamic-batch library: its name, dtype, shape for a
    batch of one, and where it holds the batch (None: the same for every batch)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch: Batch

    def shape_for(self, count: int) -> tuple[int, ...]:
        """The shape for a batch of `count` elements."""
        if self.batch is None:
            return self.shape
        axis = self.batch.axis
        return self.shape[:axis] + (self.shape[axis] * count,) + self.shape[axis + 1 :]

    @property
    def outer(self) -> int:
        """How many runs of consecutive batch elements the tensor holds (one for each
        index before the batch axis and each time the axis runs through the batch): 1
        when a slice of the batch is one contiguous range of bytes."""
        return prod(self.shape[: self.batch.axis]) * self.batch.repeats if self.batch else 1

    @property
    def element_bytes(self) -> int:
        """The bytes one batch element owns in each run."""
        if self.batch is None:
            return 0
        return (
            self.batch.block * prod(self.shape[self.batch.axis + 1 :]) * TensorType(self.dtype, ()).itemsize
        )


def uniform(array: np.ndarray) -> bool:
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
            fold(node, known)
            continue
        where[node.outputs[0]] = node_batch(node, given, known, count)
    missing = [v.name for v in graph.outputs if where[v] is None]
    if missing:
        raise BatchMixing(f"outputs {missing} do not depend on the batch")
    return [where[v] for v in graph.outputs]


def fold(node, known: dict[Value, np.ndarray]) -> None:
    """Enter node's output in `known` where all its inputs are known constants and it
    is small (FOLD_LIMIT): a proof then sees the values a uniform constant holds."""
    if len(node.outputs) == 1 and all(v in known for v in node.inputs):
        if node.outputs[0].type.numel <= FOLD_LIMIT:
            known[node.outputs[0]] = node.op.reference(*(known[v] for v in node.inputs))


def node_batch(node, given: list[Batch], known: dict[Value, np.ndarray], count: int) -> Batch:
    """Where node's output holds the batch, given where its inputs do (a uniform
    constant tried on each axis it may span), or BatchMixing naming the node."""
    if len(node.outputs) != 1:
        raise BatchMixing(f"node {node.name} ({node.op.name}): an op of several outputs has no batch rule")
    options = [
        [b] if b or v not in known or not uniform(known[v]) else [None, *_spans(v.type, count)]
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


def batch_dim(inputs: list) -> str | None:
    """The one named dimension of these declared inputs (TensorInfo, a named dim as
    its name), at most once in each: the batch a library may take in slices; None
    when the inputs name no dimension, or several."""
    names = [[d for d in info.shape if isinstance(d, str)] for info in inputs]
    found = {d for dims in names for d in dims}
    if len(found) != 1 or any(len(dims) > 1 for dims in names) or "?" in found:
        return None
    return found.pop()


def compile_batched(
    model: object,
    dim: str,
    name: str = "model",
    tiles: tuple[int, ...] = DEFAULT_TILES,
    max_batch: int = 0,
    fuse: bool = True,
    cpu_name: str | None = None,
    constant_inputs: dict[str, object] | None = None,
):
    """Compile an ONNX model whose inputs name the batch dimension `dim` into one CPU
    library for every batch size (a BatchedModel, see compile_tiles)."""
    import onnx

    from compiler.driver import to_graph
    from compiler.specialize import declared_inputs
    from frontends.onnx import OnnxImportError, load_model

    proto = load_model(model)
    fixed = set(constant_inputs or ())
    inits = {t.name for t in proto.graph.initializer}
    declared = [i for i in declared_inputs(proto.graph.input, onnx) if i.name not in inits | fixed]
    if not any(dim in info.shape for info in declared):
        raise ValueError(f"no input of {name} has the dimension {dim!r}")

    def graph_for(count: int) -> Graph:
        shapes = {i.name: tuple(count if d == dim else d for d in i.shape) for i in declared}
        try:
            return to_graph(proto, shapes, constant_inputs)
        except UnsupportedError:
            raise
        except (OnnxImportError, GraphError) as e:  # a fixed Reshape target, say
            raise BatchMixing(f"the model does not take a batch of {count}: {e}") from None

    axes = {i.name: BatchAxis(i.shape.index(dim)) if dim in i.shape else None for i in declared}
    return compile_tiles(graph_for, axes, dim, name, tiles, max_batch, fuse, cpu_name)


@dataclass(frozen=True)
class TileSet:
    """A model's programs for a few batch sizes (its tiles, largest first, 1 last), each
    graph proved to run its batch elements apart: what a dynamic-batch library links,
    each program under the prefix PREFIX_bT and the C API over them under PREFIX."""

    prefix: str
    dim: str
    max_batch: int
    graphs: dict[int, Graph]
    inputs: list[BatchedTensor]
    outputs: list[BatchedTensor]

    @property
    def programs(self) -> list[tuple[int, str]]:
        """(batch size, program prefix) of each tile, largest first."""
        return [(t, f"{self.prefix}_b{t}") for t in self.graphs]

    def key(self, fuse: bool, cpu_name: str | None) -> str:
        """What the build cache tells this library by."""
        from compiler.driver import _cache_key

        keys = "".join(_cache_key(self.graphs[t], p, "cpu", fuse, cpu_name) for t, p in self.programs)
        return hashlib.sha256(f"{keys} {self.dim} {self.max_batch}".encode()).hexdigest()[:32]

    def lower(self, fuse: bool, cpu_name: str | None) -> tuple[list, str]:
        """Each tile's lowered program, and the C of the API that runs a batch through them."""
        from codegen import batched_abi
        from compiler.driver import lower_graph

        programs = [lower_graph(self.graphs[t], p, fuse, "cpu", cpu_name=cpu_name) for t, p in self.programs]
        table = cover_table(list(self.graphs), [program_seconds(p) for p in programs])
        wrapper = batched_abi.source(
            self.prefix, self.programs, self.inputs, self.outputs, self.dim, self.max_batch, table
        )
        return programs, wrapper


def prove_tiles(
    graph_for: Callable[[int], Graph],
    axes: dict[str, Batch],
    dim: str,
    prefix: str = "model",
    tiles: tuple[int, ...] = DEFAULT_TILES,
    max_batch: int = 0,
) -> TileSet:
    """The TileSet of `graph_for(count)`, the model's graph for a batch of `count`,
    whose inputs hold the batch where `axes` says (by name; None: not at all): a graph
    for each tile (those up to `max_batch` when it is set, and 1), proved to run batch
    elements apart. BatchMixing where the model mixes batch elements."""
    sizes = sorted({t for t in tiles if t >= 1 and (not max_batch or t <= max_batch)} | {1}, reverse=True)
    graphs = {t: graph_for(t) for t in sizes}
    proofs = {t: graphs[t] if t in graphs else graph_for(t) for t in [t for t in sizes if t > 1] or [2]}
    layouts = {t: batch_layout(g, axes, t) for t, g in proofs.items()}
    layout = next(iter(layouts.values()))
    if any(other != layout for other in layouts.values()):
        raise BatchMixing(f"the outputs hold the batch differently at different batch sizes: {layouts}")
    one = graphs[1]
    inputs = [BatchedTensor(v.name, v.type.dtype, v.type.shape, axes.get(v.name)) for v in one.inputs]
    outputs = [BatchedTensor(v.name, v.type.dtype, v.type.shape, b) for v, b in zip(one.outputs, layout)]
    for t, g in graphs.items():
        for tensor, v in zip(inputs + outputs, g.inputs + g.outputs):
            if v.type.shape != tensor.shape_for(t):
                raise BatchMixing(f"{v.name} is {v.type.shape} at batch {t}, expected {tensor.shape_for(t)}")
    return TileSet(prefix, dim, max_batch, graphs, inputs, outputs)


def compile_tiles(
    graph_for: Callable[[int], Graph],
    axes: dict[str, Batch],
    dim: str,
    name: str = "model",
    tiles: tuple[int, ...] = DEFAULT_TILES,
    max_batch: int = 0,
    fuse: bool = True,
    cpu_name: str | None = None,
):
    """One CPU library for every batch size (a BatchedModel) from the tiles prove_tiles
    finds: a program for each, and the C API that runs a call's batch through them."""
    from codegen import batched_abi
    from compiler.driver import build_several, cached_build
    from runtime.batched import BatchedModel

    tile_set = prove_tiles(graph_for, axes, dim, name, tiles, max_batch)

    def make(dest: Path) -> None:
        programs, wrapper = tile_set.lower(fuse, cpu_name)
        build_several(programs, dest, name, extra_c=wrapper)
        header = batched_abi.header(name, tile_set.inputs, tile_set.outputs, dim, max_batch)
        (dest / f"{name}.h").write_text(header)

    return BatchedModel(cached_build(tile_set.key(fuse, cpu_name), name, make), name)


def program_seconds(program) -> float:
    """A lowered program's run time, estimated kernel by kernel as the larger of its
    arithmetic and its bytes (a roofline), plus a start-up each: what a batch tile
    costs, so that a rest is run by the cheapest tiles (a batch-1 Dense layer costs
    nearly what a batch-8 one does: both stream the weights once)."""
    kernels = [c.kernel for c in program.cpu_calls]
    return sum(max(k.flops / FLOP_RATE, k.bytes / BANDWIDTH) + KERNEL_START for k in kernels)


def cover_table(sizes: list[int], seconds: list[float]) -> list[int]:
    """For each rest r below the largest tile, the index of the tile to run next in the
    cheapest cover of r elements by tiles (a tile larger than what is left runs padded)."""
    best, first = [0.0], [0]
    for rest in range(1, sizes[0]):
        cost, t = min((s + best[max(rest - size, 0)], t) for t, (size, s) in enumerate(zip(sizes, seconds)))
        best.append(cost)
        first.append(t)
    return first
