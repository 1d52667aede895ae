"""The op registry: every op Kiln knows, each declared once, in one class.

An op class holds, in one screen: its attributes (dataclass fields with defaults),
its type rule (`infer`), its meaning in numpy (`reference`, the oracle of every
test), its gradient rule (`gradient`, or how it says it has none), its fusion class
and the properties the compiler's passes read, and its lowering: elementwise ops
give `scalar`, the computation of one element, and the compiler builds the loops;
every other op gives `lower`, which writes its loop nest in the kernel IR.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from codegen import gpu, kir
from ir.errors import GraphError, UnsupportedError
from ir.types import TensorType

if TYPE_CHECKING:
    from codegen.kir import Buffer, Expr, ExprBuilder, KernelBuilder
    from ir.builder import GraphBuilder
    from ir.graph import Node, Value


class Fusion(enum.Enum):
    ELEMENTWISE = "elementwise"  # out[i] = f(in[i]) with numpy broadcasting
    INJECTIVE = "injective"  # each output element reads a few known inputs (transpose, pad)
    REDUCTION = "reduction"  # reads many inputs per output (reduce, softmax, norms)
    CONTRACTION = "contraction"  # matmul, conv: a reduction with reuse, tiled
    OPAQUE = "opaque"


class Gradient(enum.Enum):
    """How reverse-mode autodiff goes back through an op."""

    RULE = "rule"  # the op's gradient() builds its inputs' gradients from graph ops
    DECOMPOSE = "decompose"  # through decompose(): the op written with simpler registry ops
    ZERO = "zero"  # nothing flows back: boolean or index results, or piecewise constant
    NONE = "none"  # no rule: the op only appears after compiler passes or inside gradients


REGISTRY: dict[str, type[Op]] = {}


@dataclasses.dataclass(frozen=True)
class BatchAxis:
    """Where a tensor holds the batch: along `axis`, index x belongs to batch element
    (x // block) % count. The axis runs through the batch `repeats` times, each element
    owning `block` consecutive indices each time: (N, C) has the batch on axis 0, block
    1; its reshape (N·C,) block C; (S, N, E) reshaped to (S·N, E) has it on axis 0,
    block 1, repeats S."""

    axis: int
    block: int = 1
    repeats: int = 1


#: where a value holds the batch; None: it is the same for every batch element
Batch = BatchAxis | None


class BatchMixing(UnsupportedError):
    """An op whose output for one batch element reads other elements (or that has no
    rule saying it does not): the model cannot run its batch in pieces."""


#: one gradient per input of a node, None where nothing flows back
Grads = list["Value | None"]

#: An epilogue fused into an op's lowering: (the value about to be stored, its flat
#: index in the output, and its multi-index there when the loops know it, else None)
#: → the value to store instead. The multi-index spares broadcast operands (a bias)
#: a division per element.
Epilogue = Callable[["Expr", "Expr", "list[Expr] | None"], "Expr"]


def register(name: str, fusion: Fusion):
    """Class decorator: make `cls` a frozen dataclass op and enter it in the registry."""

    def wrap(cls: type[Op]) -> type[Op]:
        if name in REGISTRY:
            raise ValueError(f"op {name!r} registered twice")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.name = name
        cls.fusion = fusion
        REGISTRY[name] = cls
        return cls

    return wrap


def make_op(name: str, **attrs: Any) -> Op:
    """An op instance by registry name; unknown ops and attributes are errors."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(attrs) - fields
    if unknown:
        raise GraphError(f"op {name}: unknown attribute(s) {sorted(unknown)}; has {sorted(fields)}")
    return cls(**attrs)


class Op:
    name: ClassVar[str]
    fusion: ClassVar[Fusion]
    #: how many inputs the op takes: (fewest, most)
    arity: ClassVar[tuple[int, int]] = (1, 1)
    #: lower() applies an elementwise epilogue at its final store (fusion may use it)
    accepts_epilogue: ClassVar[bool] = False
    #: lower() only calls shape, dtype and load_flat on input 0, so fusion may pass an
    #: elementwise computation (a prologue) in place of a buffer
    accepts_prologue: ClassVar[bool] = False
    #: the output is the input's bytes under another shape: no kernel, shared storage
    view: ClassVar[bool] = False
    #: each output element is computed from the inputs' elements at its own index, read
    #: once before it is written: the output may take the bytes of an input of its shape
    in_place: ClassVar[bool] = False
    #: a reduction that one pass over a row can run (init, combine, finish): it seeds
    #: a rows kernel with the elementwise ops around it (a softmax or a layer norm
    #: written out of primitive ops)
    row_reduction: ClassVar[bool] = False
    differentiation: ClassVar[Gradient] = Gradient.RULE
    #: the op's GPU kernel is its CPU loop nest with each iteration of the parallel loop
    #: one GPU thread (independent, small iterations: a row of a pooling, a gather)
    gpu_per_iteration: ClassVar[bool] = False

    def infer(self, *inputs: TensorType) -> TensorType:
        raise NotImplementedError

    def reference(self, *inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lower(
        self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue: Epilogue | None = None
    ) -> None:
        """Write this op's loop nest; only non-elementwise ops define it."""
        raise NotImplementedError(f"op {self.name} has no lowering")

    def lower_gpu(
        self, k: KernelBuilder, ins: list[Buffer], out: Buffer, epilogue: Epilogue | None = None
    ) -> None:
        """Write this op's GPU kernel (a grid of blocks of threads, see codegen.gpu); only
        non-elementwise ops define it, or declare gpu_per_iteration."""
        if not self.gpu_per_iteration:
            raise UnsupportedError(f"op {self.name} has no GPU schedule")
        cpu = kir.KernelBuilder(k.name, [], flat_block=1)
        self.lower(cpu, ins, out, epilogue)
        gpu.per_iteration(k, cpu.finish())

    def batch_axis(self, ins: list[TensorType], out: TensorType, batch: list[Batch]) -> Batch:
        """Where the output holds the batch, given where each input does, when every
        batch element's slice of the output is computed from its own slices of the
        inputs alone, so that a batch may run in pieces (see compiler.batching); else
        BatchMixing. An input with no batch (None) must not span the batch axis."""
        if any(batch):
            raise BatchMixing("the op has no rule for running batch elements apart")
        return None

    def gradient(self, b: GraphBuilder, node: Node, g: Value) -> Grads:
        """Each input's gradient, given g (the output's), built with graph ops on `b`,
        so the backward pass is fused and compiled like any graph; None where nothing
        flows back. Ops with differentiation RULE define it."""
        if self.differentiation is Gradient.ZERO:
            return [None] * len(node.inputs)
        raise GraphError(f"node {node.name} ({self.name}): no gradient rule for this op")

    def decompose(self, b: GraphBuilder, inputs: list[Value]) -> Value:
        """The op's output computed with simpler registry ops on `b` (differentiation
        DECOMPOSE: autodiff goes back through these)."""
        raise NotImplementedError(f"op {self.name} has no decomposition")


class ElementwiseOp(Op):
    """out[i] = scalar(in_0[i], in_1[i], ...), inputs broadcast as in numpy."""

    #: the dtypes an input may have; the output has the inputs' dtype unless `result` is set
    accepts: ClassVar[tuple[str, ...]] = ("float32", "float64")
    result: ClassVar[str | None] = None
    in_place = True
    #: cheap enough to recompute in every pass over a row rather than keep in memory
    cheap: ClassVar[bool] = False

    def infer(self, *inputs: TensorType) -> TensorType:
        for pos, t in enumerate(inputs):
            if t.dtype not in self.accepts:
                raise GraphError(
                    f"{self.name}: input {pos} has dtype {t.dtype}; accepts {', '.join(self.accepts)}"
                )
        if len({t.dtype for t in inputs}) > 1:
            raise GraphError(f"{self.name}: input dtypes differ: {[t.dtype for t in inputs]}")
        out_shape = broadcast_shapes(self.name, [t.shape for t in inputs])
        return TensorType(self.result or inputs[0].dtype, out_shape)

    def scalar(self, e: ExprBuilder, *xs: Expr) -> Expr:
        raise NotImplementedError

    def batch_axis(self, ins, out, batch):
        return broadcast_batch(ins, out, batch)


def broadcast_batch(ins: list[TensorType], out: TensorType, batch: list[Batch]) -> Batch:
    """The batch of a numpy-broadcasting op: the batched inputs' batch axes, aligned from
    the right, must meet on one axis of the output, which the other inputs do not span."""
    found: Batch = None
    for t, b in zip(ins, batch):
        if b is not None:
            at = BatchAxis(b.axis + out.rank - t.rank, b.block, b.repeats)
            if found not in (None, at):
                raise BatchMixing(f"inputs put the batch on output axes {found.axis} and {at.axis}")
            found = at
    if found is not None:
        for pos, (t, b) in enumerate(zip(ins, batch)):
            axis = found.axis - (out.rank - t.rank)
            if b is None and axis >= 0 and t.shape[axis] != 1:
                raise BatchMixing(f"input {pos} ({t}) has no batch but spans the batch axis {axis}")
    return found


def batch_of_first(batch: list[Batch], ok: Callable[[int], bool], why: str) -> Batch:
    """The batch of an op whose output has input 0's layout and whose other inputs are
    weights (a conv, a norm): it stays where it is, on an axis the op keeps apart."""
    if any(batch[1:]):
        raise BatchMixing(f"input {next(i for i, b in enumerate(batch) if i and b)} holds the batch")
    first = batch[0]
    if first is not None and not ok(first.axis):
        raise BatchMixing(f"the batch is on axis {first.axis}, which {why}")
    return first


def broadcast_shapes(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise GraphError(f"{op}: shapes {shapes} do not broadcast") from None


def normalize_axis(op: str, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise GraphError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


# Importing the op modules fills the registry.
from ir.ops import attention, einsum, elementwise, matmul_nt, nn, recurrent, reduce, resample, shape, winograd  # noqa: E402,F401
