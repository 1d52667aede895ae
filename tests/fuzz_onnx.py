"""Differential fuzzing of Kiln with random ONNX graphs.

Each graph is a random ModelProto (opset 17 mostly; 9, 11, 13, 18, 20 and 23 too, so the
importer's older and newer forms of an op are exercised) of 2-25 nodes drawn from every
op type the ONNX importer claims: several outputs (intermediate values that other nodes
also read, inputs and constants returned directly, the same value twice), constants,
numpy broadcasting, and values shared between reductions, contractions and elementwise
consumers. Each runs fused, unfused, through Kiln's interpreter and, where installed,
through onnxruntime with its graph optimizations off. A disagreement, an internal error,
a crash or a hang is a failure; it is shrunk to a small graph and saved as
tests/data/regressions/fuzz_<seed>_<index>.onnx (+ _inputs.npz), which
tests/test_regressions.py then runs forever after.

    python tests/fuzz_onnx.py --graphs 10000 --seed 0 --jobs 2

Graph i of seed S is drawn from numpy's generator seeded with (S, i): a run is
reproducible, and `--only I` re-checks one graph alone. Graphs are compiled in batches:
the disjoint union of K graphs of one opset (names prefixed) is one model, so one
compile and one link serve K graphs and the memory planner shares one arena among them;
a graph whose outputs disagree in a batch is re-run alone to attribute and shrink it.

Values are generated with their actual contents (onnxruntime, or onnx's reference
evaluator where it is not installed, runs each new node on the graph's inputs), so the
generator keeps every op where it is defined and well conditioned: logs and roots of
values bounded away from 0, exponentials of bounded values, and discontinuous ops (Floor,
comparisons, ArgMax, TopK, casts to integers, Mod) only on values that every correct
engine computes bit for bit, or that lie far from the discontinuity compared with float32
rounding; recurrences only where moving their operands by about float32 rounding moves
their results within tolerance (unbounded activations can amplify it step after step,
and then summation order, which every engine picks its own way, decides). Where the
spec leaves room (Resize's align_corners with a fractional length, ConvTranspose's SAME
padding past the kernel, the sign of relu(-0)) and engines read it apart, it keeps out.
A few forms Kiln claims and onnxruntime lacks (an LRN of even size, batch-first
recurrences) are compared among Kiln's engines only. Each Kiln bug it has found is kept
as a regression graph (tests/data/regressions, run by tests/test_regressions.py).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: Kiln's packages live at the repository root
    sys.path.insert(0, str(REPO))

REGRESSIONS = REPO / "tests" / "data" / "regressions"

#: opset → (weight among graphs, the IR version that goes with it)
OPSETS = {
    9: (0.06, 4),
    11: (0.06, 6),
    13: (0.08, 7),
    17: (0.45, 8),
    18: (0.1, 8),
    20: (0.08, 9),
    23: (0.17, 11),
}
MAX_NODES = 25
MAX_NUMEL = 40_000  # per value: keeps a graph's run in milliseconds
MAX_MAGNITUDE = 1e4  # larger values are rejected: float32 rounding would swamp the comparison
NOISE = 1e-4  # relative rounding a computed value may carry, against its cone's largest magnitude
RTOL, ATOL = 1e-4, 1e-5
PERTURBATION = 1e-6  # relative: about the rounding a long float32 dot product gathers
BIG_DIMS = (17, 33, 64, 130)  # vector loops and their tails

ELEM = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float64"): TensorProto.DOUBLE,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("bool"): TensorProto.BOOL,
}
DTYPE_NAMES = {
    TensorProto.FLOAT: "float",
    TensorProto.DOUBLE: "double",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.BOOL: "bool",
}
F32, I64, BOOL = np.dtype("float32"), np.dtype("int64"), np.dtype("bool")

#: ops whose float results every correct engine computes bit for bit from exact operands
EXACT_OPS = frozenset(
    "Abs Neg Relu Max Min Identity Dropout Reshape Flatten Squeeze Unsqueeze Transpose Concat Split Slice "
    "Pad Gather GatherElements Expand Tile DepthToSpace SpaceToDepth Trilu Where ReduceMax ReduceMin MaxPool "
    "GlobalMaxPool TopK Floor Ceil Round Sign Cast CastLike Clip Hardmax Constant ConstantOfShape".split()
)


class GeneratorError(Exception):
    """The generator built something invalid: a bug in this file, not in Kiln."""


# --------------------------------------------------------------------------- values and the builder


@dataclass
class Val:
    """A value of the graph being built, with its contents on the graph's inputs."""

    name: str
    array: np.ndarray
    exact: bool  # every correct engine computes it bit for bit
    scale: float  # the largest magnitude in its cone (it and all it depends on), at least 1
    const: bool = False  # known when compiling: the importer folds it
    special: bool = False  # holds inf or NaN on purpose: only IsInf/IsNaN and the outputs read it
    op: str = ""  # the op that computes it ("" for inputs and initializers)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def rank(self) -> int:
        return self.array.ndim

    @property
    def peak(self) -> float:
        """Largest magnitude (0 for an empty or non-float value)."""
        a = self.array
        return float(np.max(np.abs(a))) if a.size and a.dtype.kind == "f" else 0.0

    @property
    def noise(self) -> float:
        """How far engines may disagree on an element: 0 when computed exactly."""
        return 0.0 if self.exact else NOISE * self.scale


@functools.cache
def schema(op: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        s = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    return None if s.deprecated else s


def since(op: str, opset: int) -> int:
    """The version of op in effect at opset (0 if the op does not exist there)."""
    s = schema(op, opset)
    return s.since_version if s else 0


def accepts(op: str, opset: int, pos: int, dtype: np.dtype) -> bool:
    """Whether op's input `pos` takes this dtype at this opset."""
    s = schema(op, opset)
    if s is None or dtype not in ELEM:
        return False
    formal = s.inputs[min(pos, len(s.inputs) - 1)]
    allowed = {c.type_param_str: c.allowed_type_strs for c in s.type_constraints}
    return f"tensor({DTYPE_NAMES[ELEM[dtype]]})" in allowed.get(formal.type_str, [formal.type_str])


def _node_types(inputs: Sequence[Val | None]) -> tuple[dict, dict]:
    types, data = {}, {}
    for v in inputs:
        if v is not None:
            types[v.name] = oh.make_tensor_type_proto(ELEM[v.dtype], v.shape)
            if v.const:
                data[v.name] = numpy_helper.from_array(v.array, v.name)
    return types, data


class Builder:
    """A graph under construction: its nodes, constants, inputs, and every value so far."""

    def __init__(self, rng: np.random.Generator, opset: int):
        self.rng, self.opset = rng, opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[Val] = []
        self.pool: list[Val] = []
        self.count = 0
        self.rejected: Counter = Counter()
        self.peer = True  # onnxruntime runs every node
        self.hidden: set[str] = set()  # values no other node and no output may read

    # -- names and randomness
    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]

    def uniform(self, lo: float, hi: float) -> float:
        """A float32-representable number, so attributes mean the same to every engine."""
        return float(np.float32(self.rng.uniform(lo, hi)))

    def normal(self, shape: Sequence[int], scale: float = 1.0) -> np.ndarray:
        return np.asarray(self.rng.standard_normal(tuple(shape)) * scale, dtype=np.float32)

    def since(self, op: str) -> int:
        return since(op, self.opset)

    # -- values
    def input(self, array: np.ndarray) -> Val:
        v = Val(self.fresh("in"), array, exact=True, scale=max(1.0, float(np.max(np.abs(array), initial=0))))
        self.inputs.append(v)
        self.pool.append(v)
        return v

    def const(self, value: object, dtype: object = None, node: bool | None = None) -> Val:
        """A constant: an initializer, or (sometimes, where it exists) a Constant node."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float64 and dtype is None:
            array = array.astype(np.float32)
        if node is None:
            node = self.chance(0.12) and len(self.nodes) < MAX_NODES - 4
        if node:
            made = self.node("Constant", [], value=numpy_helper.from_array(array, "value"))
            if made:
                return made[0]
        name = self.fresh("c")
        self.inits.append(numpy_helper.from_array(array, name))
        v = Val(
            name,
            array,
            exact=True,
            scale=max(1.0, float(np.max(np.abs(array.astype(np.float64)), initial=0))),
            const=True,
        )
        self.pool.append(v)
        return v

    def hide(self, values: Sequence[Val]) -> None:
        """Keep values from every other reader (and from the outputs)."""
        self.hidden.update(v.name for v in values)
        self.pool = [v for v in self.pool if v.name not in self.hidden]

    def ints(self, values: Sequence[int] | int) -> Val:
        """An int64 constant operand (a shape, axes, pads, K)."""
        return self.const(np.asarray(values, dtype=np.int64))

    def consumers(self) -> Counter:
        return Counter(i for n in self.nodes for i in n.input)

    def heavy_readers(self) -> set[str]:
        """Values a reduction or a contraction reads."""
        return {i for n in self.nodes if n.op_type in HEAVY for i in n.input}

    def pick(
        self, ok: Callable[[Val], bool] | None = None, dtype: object = F32, const: bool = False
    ) -> Val | None:
        """An operand: recent values, values other nodes already read, values a reduction
        or contraction reads, and their results are likelier, so values end up shared
        between consumers of different kinds (what fused kernels get wrong)."""
        used, heavy = self.consumers(), self.heavy_readers()
        cands = [
            v
            for v in self.pool
            if not v.special
            and (dtype is None or v.dtype == np.dtype(dtype))
            and v.array.size
            and (ok is None or ok(v))
            and (const or not v.const or self.chance(0.1))
        ]
        if not cands:
            return None
        position = {v.name: i for i, v in enumerate(self.pool)}
        weights = np.array(
            [
                (1 + 2 * position[v.name] / len(self.pool))
                * (2.5 if used[v.name] else 1.0)
                * (2.0 if v.name in heavy else 1.0)
                * (1.8 if v.op in HEAVY else 1.0)
                for v in cands
            ]
        )
        return cands[int(self.rng.choice(len(cands), p=weights / weights.sum()))]

    # -- nodes
    def node(
        self,
        op: str,
        inputs: Sequence[Val | None],
        outputs: int | Sequence[bool] = 1,
        *,
        special: bool = False,
        exact: bool | None = None,
        peerless: bool = False,
        sensitive: bool = False,
        **attrs: object,
    ) -> list[Val | None] | None:
        """Add op's node if it is valid and its results are well behaved; its outputs
        (None where `outputs` leaves one out), or None when it is rejected. A `peerless`
        node uses what Kiln claims but onnxruntime lacks: its graph is compared among
        Kiln's engines only. A `sensitive` node must also be well conditioned
        (`_well_conditioned`)."""
        wanted = [True] * outputs if isinstance(outputs, int) else list(outputs)
        names = [self.fresh("v") if w else "" for w in wanted]
        while names and not names[-1]:
            names.pop()
        node = oh.make_node(
            op,
            [v.name if v else "" for v in inputs],
            names,
            name=f"n{len(self.nodes)}",
            **{k: v for k, v in attrs.items() if v is not None},
        )
        arrays = self._evaluate(node, inputs, peerless)
        if isinstance(arrays, str):
            self.rejected[f"{op}: {arrays}"] += 1
            return None
        given = [v for v in inputs if v is not None]
        scale = max([1.0] + [v.scale for v in given] + [_finite_peak(a) for a in arrays.values()])
        const = op in ("Shape", "Size") or all(v.const for v in given)
        made: list[Val | None] = []
        for name in names + [""] * (len(wanted) - len(names)):
            if not name:
                made.append(None)
                continue
            a = arrays[name]
            is_exact = exact if exact is not None else (op in EXACT_OPS and all(v.exact for v in given))
            made.append(
                Val(
                    name,
                    a,
                    exact=is_exact or a.dtype.kind in "biu",
                    scale=scale,
                    const=const,
                    special=special,
                    op=op,
                )
            )
        if not special and not all(_healthy(a) for a in arrays.values()):
            self.rejected[f"{op}: unhealthy values"] += 1
            return None
        if sensitive and not self._well_conditioned(node, inputs, arrays, scale, peerless):
            self.rejected[f"{op}: ill-conditioned"] += 1
            return None
        self.nodes.append(node)
        self.pool.extend(v for v in made if v is not None)
        self.peer = self.peer and not peerless
        return made

    def _well_conditioned(
        self,
        node: onnx.NodeProto,
        inputs: Sequence[Val | None],
        arrays: Mapping[str, np.ndarray],
        scale: float,
        peerless: bool,
    ) -> bool:
        """The node's results stay within tolerance when each float operand moves by
        PERTURBATION of its size (of its cone's largest magnitude where it is computed:
        rounding there is absolute). A recurrence whose unbounded activations amplify
        rounding step after step gives results that hang on summation order, which
        every engine picks its own way, so its differences are not wrong answers."""
        rng = np.random.default_rng(len(self.nodes))

        def nudge(v: Val) -> Val:
            size = np.abs(v.array) if v.exact else np.maximum(np.abs(v.array), v.scale)
            step = PERTURBATION * size * rng.uniform(-1, 1, v.shape)
            return replace(v, array=(v.array + step).astype(v.dtype))

        nudged = [v if v is None or v.dtype.kind != "f" else nudge(v) for v in inputs]
        try:
            again = _node_run(node, nudged, self.opset, reference=peerless)
        except Exception:
            return False
        return all(disagreement(np.asarray(again[k]), a, scale) is None for k, a in arrays.items())

    def _evaluate(
        self, node: onnx.NodeProto, inputs: Sequence[Val | None], peerless: bool
    ) -> dict[str, np.ndarray] | str:
        """The node's outputs on the current values, typed and shaped as ONNX's shape
        inference says, or why it cannot be added (attributes the op refuses for these
        shapes, or a node the evaluator cannot run)."""
        s = schema(node.op_type, self.opset)
        if s is None:
            raise GeneratorError(f"{node.op_type} does not exist at opset {self.opset}")
        types, data = _node_types(inputs)
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                s, node, types, data, opset_imports=[oh.make_opsetid("", self.opset)]
            )
        except Exception:
            return "shape inference"
        try:
            arrays = _node_run(node, inputs, self.opset, reference=peerless)
        except Exception:
            return "evaluator"
        out = {}
        for name in node.output:
            if not name:
                continue
            t = inferred[name].tensor_type
            a = np.asarray(arrays[name])
            dtype = oh.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else a.dtype
            if t.HasField("shape"):  # (ops defined as functions get no shape here)
                shape = tuple(d.dim_value for d in t.shape.dim)
                if a.shape != shape or any(not d.HasField("dim_value") for d in t.shape.dim):
                    return "shape inference and the evaluator disagree"
            out[name] = np.array(a, dtype=dtype, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        return out


def first(made: list[Val | None] | None) -> Val | None:
    """A node's first output, or None when it was rejected."""
    return made[0] if made else None


def _node_run(
    node: onnx.NodeProto, inputs: Sequence[Val | None], opset: int, reference: bool = False
) -> dict[str, np.ndarray]:
    """The node's outputs, computed by onnxruntime where installed (so the generator
    keeps to what the peer engine runs), else (or when asked) by onnx's reference evaluator."""
    given = list({v.name: v for v in inputs if v is not None}.values())
    graph = oh.make_graph(
        [node],
        "node",
        [oh.make_tensor_value_info(v.name, ELEM[v.dtype], v.shape) for v in given],
        [onnx.ValueInfoProto(name=o) for o in node.output if o],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=OPSETS[opset][1])
    feeds = {v.name: np.asarray(v.array) for v in given}
    if onnxruntime_session is not None and not reference:
        results = onnxruntime_session(model).run(None, feeds)
    else:
        from onnx.reference import ReferenceEvaluator

        with np.errstate(all="ignore"):
            results = ReferenceEvaluator(model).run(None, feeds)
    return dict(zip([o for o in node.output if o], results))


def _onnxruntime_session_maker() -> Callable[[onnx.ModelProto], object] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 4  # its own report of a node it refuses is noise here

    def session(model: onnx.ModelProto) -> object:
        return onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    return session


onnxruntime_session = _onnxruntime_session_maker()


def _finite_peak(a: np.ndarray) -> float:
    if a.dtype.kind != "f" or not a.size:
        return 0.0
    finite = a[np.isfinite(a)]
    return float(np.max(np.abs(finite), initial=0.0))


def _healthy(a: np.ndarray) -> bool:
    if not 0 < a.size <= MAX_NUMEL:
        return False
    if a.dtype.kind != "f":
        return True
    return bool(np.all(np.isfinite(a))) and float(np.max(np.abs(a))) <= MAX_MAGNITUDE


# --------------------------------------------------------------------------- shapes and operands


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        return None


def partner_shape(b: Builder, shape: Sequence[int]) -> tuple[int, ...]:
    """A shape that broadcasts against `shape`: a suffix of it with some dims set to 1,
    sometimes with a new leading dim."""
    keep = int(b.rng.integers(0, len(shape) + 1))
    out = [d if b.chance(0.6) else 1 for d in shape[len(shape) - keep :]]
    if b.chance(0.15) and len(shape) < 4:
        out = [int(b.rng.integers(2, 4))] + [1] * (len(shape) - keep) + out
    return tuple(out)


def second_operand(b: Builder, x: Val, dtype: object = None, ok: Callable[[Val], bool] | None = None) -> Val:
    """The other operand of a binary op on x: a reduction of x kept broadcastable (x - max(x)),
    a reduction's or contraction's result that broadcasts with x, another value that does,
    x itself, or a constant of a shape that broadcasts."""
    dtype = np.dtype(dtype or x.dtype)
    r = b.rng.random()
    if r < 0.15 and x.dtype == dtype == F32 and x.rank and (ok is None or ok(x)):
        op = b.choice(["ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"])
        back = reduce_node(b, op, x, (x.rank - 1,) if b.chance(0.6) else split_axes(b, x), 1)
        if back is not None:
            return back
    if r < 0.3:
        other = b.pick(
            lambda v: v.op in HEAVY and broadcast(v.shape, x.shape) is not None and (ok is None or ok(v)),
            dtype=dtype,
        )
        if other is not None:
            return other
    if r < 0.55:
        other = b.pick(
            lambda v: (
                (shape := broadcast(v.shape, x.shape)) is not None
                and math.prod(shape) <= MAX_NUMEL
                and (ok is None or ok(v))
            ),
            dtype=dtype,
        )
        if other is not None:
            return other
    if r < 0.65 and (ok is None or ok(x)) and x.dtype == dtype:
        return x
    shape = partner_shape(b, x.shape)
    if dtype.kind == "f":
        values = b.normal(shape)
    elif dtype == BOOL:
        values = b.rng.random(shape) < 0.5
    else:
        values = b.rng.integers(-3, 4, shape)
    return b.const(values, dtype=dtype)


def positive(b: Builder, x: Val, low: float) -> Val | None:
    """x itself when it is at least `low` everywhere, else |x| + c with c >= low."""
    if x.array.min() >= low:
        return x
    if b.chance(0.3):
        inner = b.node("Mul", [x, x])
    else:
        inner = b.node("Abs", [x])
    if inner is None:
        return None
    return first(b.node("Add", [inner[0], b.const(np.float32(low + b.uniform(0, 0.5)))]))


def bounded(b: Builder, x: Val, limit: float) -> Val | None:
    """x when |x| <= limit, else tanh(x)."""
    if x.peak <= limit:
        return x
    return first(b.node("Tanh", [x]))


def away_from_zero(b: Builder, x: Val) -> Val | None:
    """x when |x| >= 0.1 everywhere, else |x| + c."""
    if x.array.size and np.min(np.abs(x.array)) >= 0.1:
        return x
    return positive(b, x, 0.5)


def off_grid(v: Val, step: float = 1.0, offset: float = 0.0) -> bool:
    """v is exact, or stays clear of the points offset + k·step by more than its noise."""
    if v.exact:
        return True
    t = (v.array.astype(np.float64) - offset) / step
    return float(np.min(np.abs(t - np.round(t)))) * step > 10 * v.noise


def apart(a: Val, c: Val) -> bool:
    """Comparing a with c gives the same answer in every engine."""
    if a.exact and c.exact:
        return True
    gap = np.abs(a.array.astype(np.float64) - c.array.astype(np.float64))
    return float(np.min(gap)) > 10 * (a.noise + c.noise)


def clear_top(v: Val, axis: int | None, k: int = 1) -> bool:
    """The k largest (and k smallest) along axis are told apart from their neighbours
    the same way by every engine: v is exact, or their gaps exceed its noise."""
    if v.exact:
        return True
    a = v.array.reshape(-1) if axis is None else np.moveaxis(v.array, axis, -1)
    s = np.sort(a.astype(np.float64), axis=-1)
    n = s.shape[-1]
    if n < 2:
        return True
    gaps = np.diff(s, axis=-1)
    edge = np.concatenate([gaps[..., : min(k, n - 1)], gaps[..., max(0, n - 1 - k) :]], axis=-1)
    return float(np.min(edge)) > 10 * v.noise


def spread(v: Val, axes: tuple[int, ...]) -> bool:
    """Normalizing v over axes is well conditioned: each slice's spread is far above the
    rounding the values carry (a near-constant row divides rounding noise by ~0)."""
    a = v.array.astype(np.float64)
    std = a.std(axis=axes) if a.size else np.zeros(1)
    return bool(np.all(std > 1e-2 * v.scale))


def as_rank(b: Builder, x: Val, rank: int) -> Val | None:
    """x with the given rank: leading dims merged, or leading 1s added, by one Reshape."""
    if x.rank == rank:
        return x
    shape = list(x.shape)
    while len(shape) > rank:
        shape[0:2] = [shape[0] * shape[1]]
    if len(shape) < rank and shape and shape[0] > 1 and b.chance(0.5):
        lead = _divisor(b, shape[0])  # split the first dim: more than one image or channel
        shape[0:1] = [lead, shape[0] // lead]
    shape = [1] * (rank - len(shape)) + shape
    return first(b.node("Reshape", [x, b.ints(shape)]))


def _divisor(b: Builder, n: int) -> int:
    return b.choice([d for d in range(1, n + 1) if n % d == 0])


def random_dim(b: Builder) -> int:
    return int(b.choice(BIG_DIMS)) if b.chance(0.1) else int(b.rng.integers(1, 10))


def spatial_value(b: Builder, low_rank: int = 3, high_rank: int = 4) -> Val | None:
    """A float value shaped (N, C, spatial...) with rank in [low_rank, high_rank]: one
    there is, or one reshaped to it."""
    x = b.pick(lambda v: low_rank <= v.rank <= high_rank)
    if x is not None and b.chance(0.8):
        return x
    x = b.pick(lambda v: v.rank >= 1 and v.array.size >= 2)
    return x and as_rank(b, x, int(b.rng.integers(low_rank, high_rank + 1)))


def split_axes(b: Builder, v: Val) -> tuple[int, ...]:
    """A random non-empty set of v's axes, the last one half the time."""
    if b.chance(0.45):
        return (v.rank - 1,)
    k = int(b.rng.integers(1, v.rank + 1))
    return tuple(sorted(int(a) for a in b.rng.choice(v.rank, size=k, replace=False)))


def signed(b: Builder, axes: Sequence[int], rank: int) -> list[int]:
    """Axes, some written negative (from opset 11 on, where ONNX allows it)."""
    if b.opset < 11:
        return list(axes)
    return [a - rank if b.chance(0.3) else a for a in axes]


# --------------------------------------------------------------------------- one generator per op (family)

#: op type → (builder, op) → whether a node was added; one entry per op the importer claims
Gen = Callable[[Builder, str], bool]
GENERATORS: dict[str, Gen] = {}
WEIGHTS: dict[str, float] = {}


def generates(*ops: str, weight: float = 1.0) -> Callable[[Gen], Gen]:
    def register(fn: Gen) -> Gen:
        for op in ops:
            GENERATORS[op] = fn
            WEIGHTS[op] = weight
        return fn

    return register


def added(made: list[Val | None] | None) -> bool:
    return made is not None


def int_or_float(b: Builder, op: str, p: float = 0.15) -> np.dtype:
    """int64 now and then, where op takes it and an int64 value exists."""
    if b.chance(p) and accepts(op, b.opset, 0, I64) and b.pick(dtype=I64, const=True) is not None:
        return I64
    return F32


@generates("Abs", "Neg", "Relu", "Tanh", "Sigmoid", "Erf", "Softplus", "Softsign", "HardSwish", "Mish")
def _unary(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op))
    return x is not None and added(b.node(op, [x]))


@generates("Identity")
def _identity(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None)
    return x is not None and added(b.node(op, [x]))


@generates("Exp")
def _exp(b: Builder, op: str) -> bool:
    x = b.pick()
    x = x and bounded(b, x, 8.0)
    return x is not None and added(b.node(op, [x]))


@generates("Log", "Sqrt")
def _log_sqrt(b: Builder, op: str) -> bool:
    x = b.pick()
    if x is not None and not (op == "Sqrt" and x.exact and x.array.min() >= 0):
        x = positive(b, x, 0.05)
    return x is not None and added(b.node(op, [x]))


@generates("Reciprocal")
def _reciprocal(b: Builder, op: str) -> bool:
    x = b.pick()
    x = x and away_from_zero(b, x)
    return x is not None and added(b.node(op, [x]))


@generates("Floor", "Ceil", "Round", "Sign")
def _steps(b: Builder, op: str) -> bool:
    """Discontinuous: only on values every engine computes alike near the steps."""
    offset = 0.5 if op == "Round" else 0.0
    if op == "Sign":
        x = b.pick(
            lambda v: v.exact or float(np.min(np.abs(v.array))) > 10 * v.noise, dtype=int_or_float(b, op)
        )
    else:
        x = b.pick(lambda v: off_grid(v, 1.0, offset))
    return x is not None and added(b.node(op, [x]))


@generates("Elu", "Celu", "Selu", "LeakyRelu", "HardSigmoid", "ThresholdedRelu", "Gelu")
def _activation(b: Builder, op: str) -> bool:
    ranges = {
        "Elu": {"alpha": (0.1, 2.0)},
        "Celu": {"alpha": (0.2, 2.0)},
        "Selu": {"alpha": (1.0, 2.0), "gamma": (0.5, 1.5)},
        "LeakyRelu": {"alpha": (0.01, 0.5)},
        "HardSigmoid": {"alpha": (0.1, 0.5), "beta": (0.2, 0.8)},
        "ThresholdedRelu": {"alpha": (-1.0, 1.5)},
        "Gelu": {},
    }[op]
    attrs: dict[str, object] = {k: b.uniform(*r) for k, r in ranges.items() if b.chance(0.7)}
    if op == "Gelu" and b.chance(0.5):
        attrs["approximate"] = b.choice(["none", "tanh"])
    x = b.pick()
    if x is not None and op == "ThresholdedRelu":  # a step at alpha
        alpha = float(attrs.get("alpha", 1.0))
        x = x if x.exact or float(np.min(np.abs(x.array - alpha))) > 10 * x.noise else None
    return x is not None and added(b.node(op, [x], **attrs))


@generates("IsNaN", "IsInf", weight=0.7)
def _special(b: Builder, op: str) -> bool:
    """On a value that holds inf or NaN in places fixed by exact values (1/relu(x),
    log(relu(x)), sqrt(x)), or on an ordinary value."""
    x = b.pick(lambda v: v.exact)
    if x is None:
        return False
    if b.chance(0.7):
        kind = b.choice(["reciprocal", "log", "sqrt"])
        if kind == "sqrt":
            x = first(b.node("Sqrt", [x], special=True))
        else:
            if kind == "reciprocal" and np.any(np.signbit(x.array) & (x.array == 0)):
                return False  # relu(-0) is -0 or +0 (engines differ), and 1/relu(-0) ±inf
            r = first(b.node("Relu", [x]))
            x = r and first(b.node("Reciprocal" if kind == "reciprocal" else "Log", [r], special=True))
        if x is None:
            return False
    attrs = {}
    if op == "IsInf":
        attrs = {k: int(b.chance(0.7)) for k in ("detect_negative", "detect_positive") if b.chance(0.4)}
    return added(b.node(op, [x], exact=True, **attrs))


def boolean(b: Builder, like: Val | None = None) -> Val | None:
    """A bool value: one already there (broadcasting with `like`), or a new comparison."""
    v = b.pick(lambda v: like is None or broadcast(v.shape, like.shape) is not None, dtype=BOOL)
    if v is None or b.chance(0.3):
        v = comparison(b, b.choice(["Less", "Greater"]), like)
    return v if v is not None and (like is None or broadcast(v.shape, like.shape) is not None) else None


def comparison(b: Builder, op: str, like: Val | None = None) -> Val | None:
    dtype = int_or_float(b, op, 0.2)
    if not accepts(op, b.opset, 0, dtype):
        dtype = I64 if accepts(op, b.opset, 0, I64) else None
    if dtype is None:
        return None
    fits = (lambda v: broadcast(v.shape, like.shape) is not None) if like is not None else None
    if op == "Equal" and dtype == F32:  # only exact values are ever equal alike everywhere
        x = b.pick(lambda v: v.exact and (fits is None or fits(v)))
        if x is None:
            return None
        if b.chance(0.4):
            y = b.const(np.float32(x.array.flat[int(b.rng.integers(x.array.size))]))
        else:
            y = second_operand(b, x, ok=lambda v: v.exact)
    else:
        x = b.pick(fits, dtype=dtype)
        if x is None:
            return None
        y = second_operand(b, x)
    if b.chance(0.5):
        x, y = y, x
    if not apart(x, y) or broadcast(x.shape, y.shape) is None:
        return None
    return first(b.node(op, [x, y], exact=True))


@generates("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
def _compare(b: Builder, op: str) -> bool:
    return comparison(b, op) is not None


@generates("Not")
def _not(b: Builder, op: str) -> bool:
    x = boolean(b)
    return x is not None and added(b.node(op, [x]))


@generates("And", "Or", "Xor")
def _logic(b: Builder, op: str) -> bool:
    x = boolean(b)
    y = x and (boolean(b, x) if b.chance(0.7) else b.const(b.rng.random(partner_shape(b, x.shape)) < 0.5))
    return x is not None and y is not None and added(b.node(op, [x, y]))


@generates("Where")
def _where(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op))
    if x is None:
        return False
    y = second_operand(b, x)
    both = broadcast(x.shape, y.shape)
    cond = both is not None and boolean(b, Val("", np.empty(both), True, 1.0))
    if not cond:
        return False
    if b.chance(0.5):
        x, y = y, x
    return added(b.node(op, [cond, x, y]))


@generates("Add", "Sub", "Mul", weight=2.0)
def _arith(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op))
    if x is None:
        return False
    y = second_operand(b, x)
    if b.chance(0.5):
        x, y = y, x
    return added(b.node(op, [x, y]))


@generates("Div", weight=1.5)
def _div(b: Builder, op: str) -> bool:
    if int_or_float(b, op) == I64:  # non-negative by positive: truncation and floor agree
        x = b.pick(lambda v: v.array.min() >= 0, dtype=I64, const=True)
        y = x and b.const(b.rng.integers(1, 5, partner_shape(b, x.shape)), dtype=np.int64)
    else:
        x = b.pick()
        y = x and away_from_zero(b, second_operand(b, x))
    return x is not None and y is not None and added(b.node(op, [x, y]))


@generates("Pow")
def _pow(b: Builder, op: str) -> bool:
    x = b.pick()
    if x is None:
        return False
    if b.opset >= 12 and b.chance(0.25):  # an integer exponent: any base
        return added(b.node(op, [x, b.const(np.int64(b.choice([2, 3])))]))
    base = positive(b, x, 0.2)
    r = b.rng.random()
    if r < 0.4:
        e = b.const(np.float32(b.choice([2.0, 3.0, 0.5, -1.0, 1.5, -0.5])))
    elif r < 0.7 or base is None:
        e = b.const(b.rng.uniform(-2, 2, partner_shape(b, x.shape)).astype(np.float32))
    else:
        e = b.pick(lambda v: broadcast(v.shape, base.shape) is not None)  # type: ignore[union-attr]
        e = e and bounded(b, e, 2.0)
    if base is None or e is None:
        return False
    if b.chance(0.2) and base.shape == e.shape:
        base, e = e, base  # a computed exponent with a constant base is fine too when both are tame
        if base.array.min() < 0.2:
            return False
    return added(b.node(op, [base, e]))


@generates("Mod")
def _mod(b: Builder, op: str) -> bool:
    if int_or_float(b, op, 0.3) == I64:
        x = b.pick(dtype=I64, const=True)
        y = x and b.const(b.choice([-3, -2, 2, 3, 5]) * np.ones(partner_shape(b, x.shape), np.int64))
        return x is not None and y is not None and added(b.node(op, [x, y], fmod=int(b.chance(0.5))))
    x = b.pick()
    if x is None:
        return False
    y = b.const((b.rng.uniform(0.5, 2, partner_shape(b, x.shape)) * b.choice([1, -1])).astype(np.float32))
    ratio = x.array.astype(np.float64) / y.array
    margin = np.abs(ratio - np.round(ratio)) * np.abs(y.array)
    if float(np.min(margin)) <= 10 * x.noise + 1e-5 * x.scale:  # fmod jumps where x / y is whole
        return False
    return added(b.node(op, [x, y], fmod=1))


@generates("PRelu")
def _prelu(b: Builder, op: str) -> bool:
    x = b.pick()
    if x is None:
        return False
    keep = int(b.rng.integers(0, x.rank + 1))
    shape = tuple(d if b.chance(0.6) else 1 for d in x.shape[x.rank - keep :])  # broadcasts to x
    return added(b.node(op, [x, b.const(b.rng.uniform(-0.5, 0.5, shape).astype(np.float32))]))


@generates("Max", "Min", "Sum", "Mean")
def _variadic(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op))
    if x is None:
        return False
    operands = [x]
    for _ in range(int(b.rng.integers(0, 4))):
        y = second_operand(b, x)
        if broadcast(*[v.shape for v in operands], y.shape) is not None:
            operands.append(y)
    b.rng.shuffle(operands)  # type: ignore[arg-type]
    return added(b.node(op, operands))


def reduce_all(b: Builder, x: Val, op: str) -> Val | None:
    """A scalar: op over all of x's axes, keepdims=0."""
    return reduce_node(b, op, x, None, 0)


def reduce_node(
    b: Builder, op: str, x: Val, axes: Sequence[int] | None, keepdims: int, **attrs
) -> Val | None:
    """A reduction in the form its opset wants: axes as an attribute, or (ReduceSum from
    opset 13, all of them from 18) as an input."""
    as_input = b.since(op) >= 18 or (op == "ReduceSum" and b.since(op) >= 13)
    inputs: list[Val | None] = [x]
    if axes is not None:
        axes = signed(b, axes, x.rank)
        if as_input:
            inputs.append(b.ints(axes))
        else:
            attrs["axes"] = axes
    return first(b.node(op, inputs, keepdims=keepdims, **attrs))


#: reductions and contractions: the ops fusion builds whole kernels around
HEAVY = frozenset(
    "ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum "
    "ReduceLogSumExp Softmax LogSoftmax LayerNormalization RMSNormalization MatMul Gemm Conv ConvTranspose "
    "Einsum".split()
)
REDUCTIONS = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSum",
    "ReduceLogSumExp",
)


@generates(*REDUCTIONS, weight=1.5)
def _reduce(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op, 0.1) if op in ("ReduceSum", "ReduceMax", "ReduceMin") else F32)
    if x is None:
        return False
    if op == "ReduceLogSum":
        x = positive(b, x, 0.05)
    elif op == "ReduceProd":
        x = bounded(b, x, 2.0)
    if x is None:
        return False
    axes = None if x.rank == 0 or b.chance(0.15) else split_axes(b, x)
    keepdims = int(b.chance(0.6))
    attrs = {}
    as_input = b.since(op) >= 18 or (op == "ReduceSum" and b.since(op) >= 13)
    if axes is None and as_input and b.chance(0.25):
        if b.chance(0.5):
            attrs["noop_with_empty_axes"] = 1
        else:
            return added(b.node(op, [x, b.ints(np.zeros(0, np.int64))], keepdims=keepdims))
    return reduce_node(b, op, x, axes, keepdims, **attrs) is not None


@generates("ArgMax", "ArgMin")
def _arg(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    axis = int(b.rng.integers(x.rank))
    if not clear_top(x, axis):
        return False
    attrs = {"axis": signed(b, [axis], x.rank)[0], "keepdims": int(b.chance(0.5))}
    if b.opset >= 12 and b.chance(0.4):
        attrs["select_last_index"] = int(b.chance(0.5))
    return added(b.node(op, [x], exact=True, **attrs))


@generates("TopK")
def _topk(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    axis = int(b.rng.integers(x.rank))
    k = int(b.rng.integers(1, min(x.shape[axis], 6) + 1))
    if not clear_top(x, axis, k):
        return False
    attrs: dict[str, object] = {"axis": signed(b, [axis], x.rank)[0]}
    if b.since(op) >= 11:
        attrs["largest"] = int(b.chance(0.7))
    inputs: list[Val | None] = [x]
    if b.since(op) >= 10:
        inputs.append(b.ints([k]))
    else:
        attrs["k"] = k
    return added(b.node(op, inputs, 2, **attrs))


@generates("Softmax", "LogSoftmax", "Hardmax")
def _softmax(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    modern = b.since(op) >= 13
    axis = int(b.rng.integers(x.rank))
    if op == "Hardmax":  # 1 at the first largest: ties and near ties must be seen alike
        rows = np.moveaxis(x.array, axis, -1) if modern else x.array.reshape(math.prod(x.shape[:axis]), -1)
        if not clear_top(Val("", rows, x.exact, x.scale), -1):
            return False
    default = -1 if modern else 1
    attrs = {} if axis == default % x.rank and b.chance(0.5) else {"axis": signed(b, [axis], x.rank)[0]}
    return added(b.node(op, [x], **attrs))


@generates("CumSum")
def _cumsum(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=int_or_float(b, op))
    if x is None:
        return False
    axis = signed(b, [int(b.rng.integers(x.rank))], x.rank)[0]
    attrs = {k: int(b.chance(0.5)) for k in ("exclusive", "reverse") if b.chance(0.5)}
    axis_const = b.const(np.asarray(axis, dtype=b.choice([np.int64, np.int32])))
    return added(b.node(op, [x, axis_const], **attrs))


# --------------------------------------------------------------------------- contractions


def weights(b: Builder, shape: Sequence[int], fan_in: int) -> Val:
    return b.const(b.normal(shape, 1.0 / math.sqrt(max(fan_in, 1))))


@generates("MatMul", weight=2.0)
def _matmul(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    k = x.shape[-1]
    r = b.rng.random()
    if r < 0.3:  # two computed values
        y = b.pick(
            lambda v: (
                v.rank >= 1
                and v.shape[-2 if v.rank >= 2 else 0] == k
                and (x.rank < 2 or v.rank < 2 or broadcast(x.shape[:-2], v.shape[:-2]) is not None)
            )
        )
        if y is not None:
            return added(b.node(op, [x, y]))
    if r < 0.45 and x.rank >= 2:  # a constant on the left
        a = weights(b, (random_dim(b), x.shape[-2]), x.shape[-2])
        return added(b.node(op, [a, x]))
    n = random_dim(b)
    if b.chance(0.15):
        shape: tuple[int, ...] = (k,)
    elif x.rank >= 3 and b.chance(0.3):
        shape = (b.choice([1, x.shape[-3]]), k, n)
    else:
        shape = (k, n)
    return added(b.node(op, [x, weights(b, shape, k)]))


def as_matrix(b: Builder) -> Val | None:
    x = b.pick(lambda v: v.rank == 2)
    if x is not None and b.chance(0.7):
        return x
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return None
    return first(b.node("Flatten", [x], axis=int(b.rng.integers(0, x.rank + 1))))


@generates("Gemm", weight=1.5)
def _gemm(b: Builder, op: str) -> bool:
    a = as_matrix(b)
    if a is None:
        return False
    trans_a, trans_b = int(b.chance(0.3)), int(b.chance(0.4))
    m, k = a.shape[::-1] if trans_a else a.shape
    n = random_dim(b)
    bmat = None
    if b.chance(0.3):
        bmat = b.pick(lambda v: v.rank == 2 and v.shape[1 if trans_b else 0] == k)
    if bmat is None:
        bmat = weights(b, (n, k) if trans_b else (k, n), k)
    n = bmat.shape[0] if trans_b else bmat.shape[1]
    inputs: list[Val | None] = [a, bmat]
    r = b.rng.random()
    if r < 0.6 or b.opset < 11:
        c_shape = b.choice([(), (n,), (1, n), (m, 1), (m, n)])
        inputs.append(b.const(b.normal(c_shape)))
    elif r < 0.75:
        c = b.pick(lambda v: v.rank <= 2 and broadcast(v.shape, (m, n)) == (m, n))
        if c is not None:
            inputs.append(c)
    attrs = {"transA": trans_a or None, "transB": trans_b or None}
    if b.chance(0.3):
        attrs["alpha"] = b.uniform(-2, 2)
    if b.chance(0.3):
        attrs["beta"] = b.uniform(-2, 2)
    return added(b.node(op, inputs, **attrs))


def window(b: Builder, spatial: Sequence[int], max_kernel: int = 5, dilate: bool = True) -> dict | None:
    """Kernel, strides, dilations and padding for a sliding window over `spatial` dims
    (None when the window does not fit)."""
    kernel = [int(b.rng.integers(1, min(max_kernel, d + 2) + 1)) for d in spatial]
    strides = [int(b.choice([1, 1, 2, 3])) for _ in spatial]
    dilations = [int(b.choice([1, 1, 2])) if dilate else 1 for _ in spatial]
    pads = [int(b.rng.integers(0, k)) for k in kernel] + [int(b.rng.integers(0, k)) for k in kernel]
    n = len(spatial)
    for i, d in enumerate(spatial):
        if d + pads[i] + pads[i + n] < dilations[i] * (kernel[i] - 1) + 1:
            return None
    attrs: dict[str, object] = {"kernel_shape": kernel}
    if any(s != 1 for s in strides) or b.chance(0.3):
        attrs["strides"] = strides
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    autos = []  # onnxruntime pads SAME windows only undilated, and no wider than the stride
    if all(d == 1 for d in dilations) and all(s <= k for s, k in zip(strides, kernel)):
        autos += ["SAME_UPPER", "SAME_LOWER"]
    if all(d >= e * (k - 1) + 1 for d, e, k in zip(spatial, dilations, kernel)):
        autos.append("VALID")  # (unpadded, the window must fit)
    r = b.rng.random()
    if r < 0.15 and autos:
        attrs["auto_pad"] = b.choice(autos)
    elif r < 0.75 or any(pads):
        attrs["pads"] = pads
    return attrs


@generates("Conv", weight=1.5)
def _conv(b: Builder, op: str) -> bool:
    x = spatial_value(b)
    if x is None:
        return False
    c = x.shape[1]
    groups = 1 if b.chance(0.6) else (c if b.chance(0.5) else _divisor(b, c))
    m = groups * int(b.rng.integers(1, 4)) if groups > 1 else random_dim(b)
    attrs = window(b, x.shape[2:])
    if attrs is None:
        return False
    kernel = attrs["kernel_shape"]
    if b.chance(0.3):
        del attrs["kernel_shape"]  # inferred from the weights
    fan_in = c // groups * math.prod(kernel)  # type: ignore[arg-type]
    inputs = [x, weights(b, (m, c // groups, *kernel), fan_in)]  # type: ignore[misc]
    if b.chance(0.6):
        inputs.append(b.const(b.normal((m,))))
    return added(b.node(op, inputs, group=groups if groups > 1 else None, **attrs))


@generates("ConvTranspose")
def _conv_transpose(b: Builder, op: str) -> bool:
    x = spatial_value(b)
    if x is None:
        return False
    c = x.shape[1]
    groups = 1 if b.chance(0.7) else _divisor(b, c)
    m = int(b.rng.integers(1, 4))
    n = x.rank - 2
    kernel = [int(b.rng.integers(1, 5)) for _ in range(n)]
    strides = [int(b.choice([1, 2, 3])) for _ in range(n)]
    dilations = [int(b.choice([1, 1, 2])) for _ in range(n)]
    attrs: dict[str, object] = {"strides": strides, "group": groups if groups > 1 else None}
    if any(d != 1 for d in dilations):
        attrs["dilations"] = dilations
    r = b.rng.random()
    if r < 0.5:
        attrs["pads"] = [int(b.rng.integers(0, k)) for k in kernel] * 2
    if b.chance(0.3):
        attrs["output_padding"] = [int(b.rng.integers(0, s)) for s in strides]
    if r > 0.85:
        attrs["auto_pad"] = b.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])
    elif r > 0.75:
        attrs["output_shape"] = [int(d * s + b.rng.integers(0, s)) for d, s in zip(x.shape[2:], strides)]
        attrs.pop("output_padding", None)
    if "pads" in attrs:  # every output dim at least 1
        pads = attrs["pads"]
        for i, (d, k) in enumerate(zip(x.shape[2:], kernel)):
            out = strides[i] * (d - 1) + dilations[i] * (k - 1) + 1 - pads[i] - pads[i + n]  # type: ignore[index]
            if out < 1:
                return False
    if attrs.get("auto_pad", "").startswith("SAME") and (  # type: ignore[union-attr]
        any(d != 1 for d in dilations) or any(k < s for k, s in zip(kernel, strides))
    ):  # onnxruntime pads SAME windows only undilated; a stride past the kernel pads negatively
        return False
    inputs = [x, weights(b, (c, m, *kernel), c // groups * math.prod(kernel))]
    if b.chance(0.5):
        inputs.append(b.const(b.normal((m * groups,))))
    return added(b.node(op, inputs, **attrs))


@generates("Einsum", weight=1.2)
def _einsum(b: Builder, op: str) -> bool:
    """A random equation over x's dims: shared letters contract or batch, a letter
    repeated within x takes a diagonal, the output keeps any subset in any order."""
    x = b.pick(lambda v: 1 <= v.rank <= 4)
    if x is None:
        return False
    letters = list("abcdefgh")
    b.rng.shuffle(letters)  # type: ignore[arg-type]
    sizes: dict[str, int] = {}
    x_sub = []
    for d in x.shape:
        reuse = [s for s in x_sub if sizes[s] == d and s not in x_sub[-1:]]
        if reuse and b.chance(0.15):
            x_sub.append(b.choice(reuse))
        else:
            s = letters.pop()
            sizes[s] = d
            x_sub.append(s)
    ellipsis = x.rank >= 3 and len(set(x_sub)) == x.rank and b.chance(0.15)
    subs, operands = [x_sub[2:] if ellipsis else x_sub], [x]
    for _ in range(1 if b.chance(0.75) else (0 if b.chance(0.6) else 2)):
        own = [s for s in dict.fromkeys(subs[0]) if b.chance(0.6)]
        for _ in range(int(b.rng.integers(0, 3))):
            s = letters.pop()
            sizes[s] = int(b.rng.integers(1, 7))
            own.append(s)
        b.rng.shuffle(own)  # type: ignore[arg-type]
        contracted = math.prod(sizes[s] for s in own)
        subs.append(own)
        operands.append(weights(b, [sizes[s] for s in own], contracted))
    every = list(dict.fromkeys(s for sub in subs for s in sub))
    head = "..." if ellipsis else ""
    lhs = ",".join(head * (i == 0) + "".join(sub) for i, sub in enumerate(subs))
    if b.chance(0.8) or ellipsis:
        out = [s for s in every if b.chance(0.5)]
        b.rng.shuffle(out)  # type: ignore[arg-type]
        equation = f"{lhs}->{head}{''.join(out)}"
    else:
        equation = lhs
    return added(b.node(op, operands, equation=equation))


# --------------------------------------------------------------------------- windows and normalizations


@generates("MaxPool", "AveragePool")
def _pool(b: Builder, op: str) -> bool:
    x = spatial_value(b)
    if x is None:
        return False
    dilate = op == "MaxPool" and b.since(op) >= 10 or b.since(op) >= 19
    attrs = window(b, x.shape[2:], 4, dilate)
    if attrs is None:
        return False
    if b.since(op) >= 10 and b.chance(0.3):
        attrs["ceil_mode"] = 1
    if op == "AveragePool" and b.chance(0.4):
        attrs["count_include_pad"] = int(b.chance(0.6))
    outputs = 1
    distinct = x.exact and np.unique(x.array).size == x.array.size  # which of equal maxima is unspecified
    if op == "MaxPool" and distinct and b.chance(0.4) and "auto_pad" not in attrs:
        outputs = 2
        if b.chance(0.3):
            attrs["storage_order"] = 1
    return added(b.node(op, [x], outputs, **attrs))


@generates("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b: Builder, op: str) -> bool:
    x = spatial_value(b, 4, 4) if op == "GlobalAveragePool" else spatial_value(b)
    return x is not None and added(b.node(op, [x]))


@generates("LRN")
def _lrn(b: Builder, op: str) -> bool:
    x = spatial_value(b, 4, 4)
    if x is None:
        return False
    size = int(b.rng.integers(1, 6))
    attrs = {}
    for name, lo, hi in (("alpha", 1e-4, 1e-2), ("beta", 0.5, 1.0), ("bias", 0.5, 2.0)):
        if b.chance(0.5):
            attrs[name] = b.uniform(lo, hi)
    return added(b.node(op, [x], size=size, peerless=size % 2 == 0, **attrs))  # onnxruntime: odd sizes


def channel_params(b: Builder, c: int) -> list[Val]:
    return [b.const(b.normal((c,))), b.const(b.normal((c,)))]


@generates("BatchNormalization")
def _batchnorm(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 2) if b.chance(0.7) else spatial_value(b, 2, 4)
    if x is None:
        return False
    c = x.shape[1]
    stats = [b.const(b.normal((c,))), b.const(b.rng.uniform(0.5, 2.0, (c,)).astype(np.float32))]
    attrs: dict[str, object] = {}
    if b.chance(0.5):
        attrs["epsilon"] = b.uniform(1e-5, 1e-3)
    outputs = 1
    if b.since(op) >= 14 and b.chance(0.2):
        if not spread(x, (0, *range(2, x.rank))):
            return False
        attrs["training_mode"] = 1
        attrs["momentum"] = b.uniform(0.5, 0.99)
        outputs = 3
        b.hide(stats)  # onnxruntime updates them in place: another reader would see the new ones
    return added(b.node(op, [x, *channel_params(b, c), *stats], outputs, **attrs))


@generates("InstanceNormalization")
def _instance_norm(b: Builder, op: str) -> bool:
    x = spatial_value(b)
    if x is None or not spread(x, tuple(range(2, x.rank))):
        return False
    eps = {"epsilon": b.uniform(1e-5, 1e-3)} if b.chance(0.5) else {}
    return added(b.node(op, [x, *channel_params(b, x.shape[1])], **eps))


@generates("LayerNormalization", "RMSNormalization")
def _layer_norm(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    axis = int(b.rng.integers(x.rank)) if b.chance(0.5) else x.rank - 1
    axes = tuple(range(axis, x.rank))
    if op == "LayerNormalization" and not spread(x, axes):
        return False
    if op == "RMSNormalization":
        rms = np.sqrt(np.mean(np.square(x.array.astype(np.float64)), axis=axes))
        if float(np.min(rms)) <= 1e-2 * x.scale:
            return False
    attrs: dict[str, object] = (
        {} if axis == x.rank - 1 and b.chance(0.5) else {"axis": signed(b, [axis], x.rank)[0]}
    )
    if b.chance(0.4):
        attrs["epsilon"] = b.uniform(1e-6, 1e-3)
    inputs = [x, b.const(b.normal(x.shape[axis:]))]
    outputs: int | list[bool] = 1
    if op == "LayerNormalization":
        if b.chance(0.6):
            inputs.append(b.const(b.normal(x.shape[axis:])))
        if b.chance(0.25):
            outputs = [True, b.chance(0.7), b.chance(0.7)]
    return added(b.node(op, inputs, outputs, **attrs))


@generates("LpNormalization")
def _lp_norm(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1)
    if x is None:
        return False
    axis = int(b.rng.integers(x.rank)) if b.chance(0.7) else x.rank - 1  # -1 is the default
    p = int(b.choice([1, 2]))  # 2 is the default
    a = np.abs(x.array.astype(np.float64))
    norm = np.sqrt(np.sum(a * a, axis=axis)) if p == 2 else np.sum(a, axis=axis)
    if float(np.min(norm)) <= 0.05 * x.scale:
        return False
    attrs = {
        "axis": signed(b, [axis], x.rank)[0] if axis != x.rank - 1 or b.chance(0.5) else None,
        "p": p if p != 2 or b.chance(0.5) else None,
    }
    return added(b.node(op, [x], **attrs))


# --------------------------------------------------------------------------- shapes and data movement


def factor_shape(b: Builder, numel: int, rank: int) -> list[int]:
    """A random shape of `rank` dims holding numel elements."""
    dims, rest = [], numel
    for _ in range(rank - 1):
        d = _divisor(b, rest)
        dims.append(d)
        rest //= d
    dims.append(rest)
    b.rng.shuffle(dims)  # type: ignore[arg-type]
    return dims


def shape_operand(b: Builder, dims: Sequence[int], fits: Callable[[np.ndarray], bool]) -> Val:
    """A constant shape: a known int64 vector that fits (a Shape's result, say), or new."""
    known = b.pick(lambda v: v.const and v.rank == 1 and fits(v.array), dtype=I64, const=True)
    if known is not None and b.chance(0.5):
        return known
    return b.ints(dims)


@generates("Reshape", weight=1.2)
def _reshape(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None)
    if x is None:
        return False
    n = x.array.size
    dims = factor_shape(b, n, int(b.rng.integers(1 if n > 1 else 0, 6)))
    if n == 1 and b.chance(0.3):
        dims = []
    coded = [0 if i < x.rank and d == x.shape[i] and b.chance(0.3) else d for i, d in enumerate(dims)]
    if coded and b.chance(0.3):
        coded[int(b.rng.integers(len(coded)))] = -1
    if b.chance(0.2):
        target = shape_operand(b, coded, lambda a: a.size and a.min() > 0 and math.prod(a.tolist()) == n)
    else:
        target = b.ints(coded)
    return added(b.node(op, [x, target]))


@generates("Flatten")
def _flatten(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=None)
    if x is None:
        return False
    axis = int(b.rng.integers(0, x.rank + 1))
    if b.opset >= 11 and axis and b.chance(0.3):
        axis -= x.rank
    return added(b.node(op, [x], **({"axis": axis} if axis != 1 or b.chance(0.5) else {})))


def axes_operand(b: Builder, op: str, axes: Sequence[int]) -> tuple[list[Val], dict]:
    """Axes as an input (from opset 13) or as an attribute."""
    if b.since(op) >= 13:
        return [b.ints(list(axes))], {}
    return [], {"axes": list(axes)}


@generates("Squeeze")
def _squeeze(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: 1 in v.shape, dtype=None)
    if x is None:
        return False
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    if b.chance(0.25):
        return added(b.node(op, [x]))
    axes = signed(
        b,
        sorted(int(a) for a in b.rng.choice(ones, size=int(b.rng.integers(1, len(ones) + 1)), replace=False)),
        x.rank,
    )
    extra, attrs = axes_operand(b, op, axes)
    return added(b.node(op, [x, *extra], **attrs))


@generates("Unsqueeze")
def _unsqueeze(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank <= 4, dtype=None)
    if x is None:
        return False
    rank = x.rank + int(b.rng.integers(1, 3))
    axes = sorted(int(a) for a in b.rng.choice(rank, size=rank - x.rank, replace=False))
    extra, attrs = axes_operand(b, op, signed(b, axes, rank))
    return added(b.node(op, [x, *extra], **attrs))


@generates("Transpose", weight=1.2)
def _transpose(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 2, dtype=None)
    if x is None:
        return False
    perm = None if b.chance(0.2) else [int(a) for a in b.rng.permutation(x.rank)]
    return added(b.node(op, [x], perm=perm))


@generates("Concat")
def _concat(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=None)
    if x is None:
        return False
    axis = int(b.rng.integers(x.rank))

    def same(v: Val) -> bool:  # x's shape but for the axis
        return v.rank == x.rank and all(d == e for i, (d, e) in enumerate(zip(v.shape, x.shape)) if i != axis)

    parts = [x]
    for _ in range(int(b.rng.integers(1, 3))):
        y = b.pick(same, dtype=x.dtype) if b.chance(0.6) else None
        if y is None:
            shape = list(x.shape)
            shape[axis] = int(b.rng.integers(1, 5))
            y = b.const(b.normal(shape).astype(x.dtype) if x.dtype.kind == "f" else np.ones(shape, x.dtype))
        parts.append(y)
    b.rng.shuffle(parts)  # type: ignore[arg-type]
    return added(b.node(op, parts, axis=signed(b, [axis], x.rank)[0]))


@generates("Split")
def _split(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1 and max(v.shape) >= 2, dtype=None)
    if x is None:
        return False
    axis = b.choice([i for i, d in enumerate(x.shape) if d >= 2])
    d = x.shape[axis]
    parts = int(b.rng.integers(2, min(d, 3) + 1))
    cuts = sorted(int(c) for c in b.rng.choice(np.arange(1, d), size=parts - 1, replace=False))
    sizes = np.diff([0, *cuts, d]).tolist()
    attrs: dict[str, object] = {"axis": signed(b, [axis], x.rank)[0]} if axis or b.chance(0.5) else {}
    inputs: list[Val | None] = [x]
    version = b.since(op)
    r = b.rng.random()
    if version >= 18 and r < 0.3:
        attrs["num_outputs"] = parts
    elif r < 0.55 and d % parts == 0 and version < 18:
        pass  # equal parts, from the number of outputs
    elif version >= 13:
        inputs.append(b.ints(sizes))
    else:
        attrs["split"] = sizes
    return added(b.node(op, inputs, parts, **attrs))


INT64_MAX = np.iinfo(np.int64).max


def slice_bounds(b: Builder, d: int, step: int) -> tuple[int, int]:
    """Start and end (as ONNX may write them) of a non-empty slice of a dim of size d."""
    if step > 0:
        s = int(b.rng.integers(0, d))
        e = int(b.rng.integers(s + 1, d + 1))
        end = INT64_MAX if e == d and b.chance(0.4) else (e - d if e < d and b.chance(0.3) else e)
    else:
        s = int(b.rng.integers(0, d))
        e = int(b.rng.integers(-1, s))
        end = -INT64_MAX if e == -1 and b.chance(0.5) else (-d - 1 if e == -1 else e)
    start = s - d if b.chance(0.3) else s
    if step > 0 and s == 0 and b.chance(0.2):
        start = -INT64_MAX
    return start, end


@generates("Slice", weight=1.2)
def _slice(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=None)
    if x is None:
        return False
    axes = sorted(
        int(a) for a in b.rng.choice(x.rank, size=int(b.rng.integers(1, x.rank + 1)), replace=False)
    )
    modern = b.since(op) >= 10
    steps = [int(b.choice([1, 1, 1, 2, 3, -1, -2])) if modern else 1 for _ in axes]
    bounds = [slice_bounds(b, x.shape[a], s) for a, s in zip(axes, steps)]
    starts, ends = [s for s, _ in bounds], [e for _, e in bounds]
    all_axes = axes == list(range(x.rank)) and b.chance(0.4)
    if not modern:
        attrs = {"starts": starts, "ends": ends, "axes": None if all_axes else axes}
        return added(b.node(op, [x], **attrs))
    inputs: list[Val | None] = [x, b.ints(starts), b.ints(ends)]
    with_steps = any(s != 1 for s in steps) or b.chance(0.2)
    if not all_axes or with_steps:
        inputs.append(b.ints(signed(b, axes, x.rank)))
    if with_steps:
        inputs.append(b.ints(steps))
    return added(b.node(op, inputs))


@generates("Pad")
def _pad(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=int_or_float(b, op, 0.1))
    if x is None:
        return False
    version = b.since(op)
    modes = ["constant", "constant", "edge", "reflect"] + (["wrap"] if version >= 19 else [])
    mode = b.choice(modes)
    axes = list(range(x.rank))
    if version >= 18 and b.chance(0.3):
        axes = sorted(
            int(a) for a in b.rng.choice(x.rank, size=int(b.rng.integers(1, x.rank + 1)), replace=False)
        )

    def amount(d: int) -> int:
        if mode == "reflect":
            return int(b.rng.integers(0, min(d - 1, 3) + 1))
        if mode == "wrap":
            return int(b.rng.integers(0, min(d, 3) + 1))
        if mode == "constant" and d >= 3 and b.chance(0.1):
            return -1  # a negative pad crops
        return int(b.rng.integers(0, 4))

    pads = [amount(x.shape[a]) for a in axes] + [amount(x.shape[a]) for a in axes]
    value = b.uniform(-2, 2) if mode == "constant" and b.chance(0.5) else None
    if version < 11:
        return added(b.node(op, [x], mode=mode, pads=pads, value=value))
    inputs: list[Val | None] = [x, b.ints(pads)]
    if value is not None or axes != list(range(x.rank)):
        inputs.append(b.const(np.asarray(value or 0, x.dtype)) if value is not None else None)
    if axes != list(range(x.rank)):
        inputs.append(b.ints(signed(b, axes, x.rank)))
    return added(b.node(op, inputs, mode=mode if mode != "constant" or b.chance(0.5) else None))


@generates("Gather", weight=1.2)
def _gather(b: Builder, op: str) -> bool:
    data = b.pick(lambda v: v.rank >= 1, dtype=None)
    if data is None:
        return False
    axis = int(b.rng.integers(data.rank))
    d = data.shape[axis]
    low = -d if b.opset >= 11 else 0
    idx = None
    if b.chance(0.3):  # indices computed by the graph (ArgMax, TopK)
        idx = b.pick(lambda v: v.rank <= 2 and v.array.min() >= low and v.array.max() < d, dtype=I64)
    if idx is None:
        shape = tuple(int(b.rng.integers(1, 5)) for _ in range(int(b.rng.integers(0, 3))))
        idx = b.const(b.rng.integers(low, d, shape), dtype=b.choice([np.int64, np.int64, np.int32]))
    return added(b.node(op, [data, idx], axis=signed(b, [axis], data.rank)[0]))


@generates("GatherElements")
def _gather_elements(b: Builder, op: str) -> bool:
    data = b.pick(lambda v: v.rank >= 1, dtype=None)
    if data is None:
        return False
    axis = int(b.rng.integers(data.rank))
    d = data.shape[axis]
    shape = [
        int(b.rng.integers(1, 5)) if i == axis else int(b.rng.integers(1, n + 1))
        for i, n in enumerate(data.shape)
    ]
    idx = b.const(b.rng.integers(-d, d, shape), dtype=np.int64)
    return added(b.node(op, [data, idx], axis=signed(b, [axis], data.rank)[0]))


@generates("Expand")
def _expand(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None)
    if x is None:
        return False
    target = [
        int(b.rng.integers(2, 5)) if d == 1 and b.chance(0.6) else (1 if b.chance(0.1) else d)
        for d in x.shape
    ]
    if x.rank < 4 and b.chance(0.4):
        target = [int(b.rng.integers(1, 4))] + target
    if b.chance(0.3):
        shape = shape_operand(
            b, target, lambda a: a.size and a.min() > 0 and broadcast(x.shape, a.tolist()) is not None
        )
    else:
        shape = b.ints(target)
    return added(b.node(op, [x, shape]))


@generates("Tile")
def _tile(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 1, dtype=None)
    if x is None:
        return False
    return added(b.node(op, [x, b.ints([int(b.choice([1, 1, 2, 3])) for _ in x.shape])]))


@generates("DepthToSpace", "SpaceToDepth")
def _depth_space(b: Builder, op: str) -> bool:
    bs = int(b.choice([2, 2, 3]))
    if op == "DepthToSpace":
        fits = lambda v: v.rank == 4 and v.shape[1] % (bs * bs) == 0  # noqa: E731
    else:
        fits = lambda v: v.rank == 4 and v.shape[2] % bs == 0 and v.shape[3] % bs == 0  # noqa: E731
    x = b.pick(fits)
    if x is None:
        y = b.pick(lambda v: v.array.size % (bs * bs) == 0)
        if y is None:
            return False
        c, h, w = factor_shape(b, y.array.size // (bs * bs), 3)
        shape = [1, c * bs * bs, h, w] if op == "DepthToSpace" else [1, c, h * bs, w * bs]
        x = first(b.node("Reshape", [y, b.ints(shape)]))
        if x is None:
            return False
    mode = (
        {"mode": b.choice(["DCR", "CRD"])} if op == "DepthToSpace" and b.opset >= 11 and b.chance(0.6) else {}
    )
    return added(b.node(op, [x], blocksize=bs, **mode))


@generates("Trilu")
def _trilu(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank >= 2, dtype=None)
    if x is None:
        return False
    inputs: list[Val | None] = [x]
    if b.chance(0.6):
        inputs.append(b.const(np.int64(b.rng.integers(-3, 4))))
    return added(b.node(op, inputs, upper=int(b.chance(0.5)) if b.chance(0.7) else None))


# --------------------------------------------------------------------------- constants and shape arithmetic


@generates("Shape", weight=0.7)
def _shape(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None, const=True)
    if x is None:
        return False
    attrs = {}
    if b.since(op) >= 15 and b.chance(0.3) and x.rank:
        attrs = {
            "start": int(b.rng.integers(-x.rank, x.rank)),
            "end": int(b.rng.integers(-x.rank, x.rank + 1)),
        }
    return added(b.node(op, [x], **attrs))


@generates("Size", weight=0.7)
def _size(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None, const=True)
    return x is not None and added(b.node(op, [x]))


@generates("ConstantOfShape", weight=0.7)
def _constant_of_shape(b: Builder, op: str) -> bool:
    shape = shape_operand(
        b,
        [int(b.rng.integers(1, 6)) for _ in range(int(b.rng.integers(1, 4)))],
        lambda a: a.size <= 4 and a.min() > 0 and math.prod(a.tolist()) <= 4096,
    )
    r = b.rng.random()
    if r < 0.2:
        return added(b.node(op, [shape]))
    value = (
        np.array([b.uniform(-3, 3)], np.float32) if r < 0.7 else np.array([b.rng.integers(-3, 4)], np.int64)
    )
    return added(b.node(op, [shape], value=numpy_helper.from_array(value, "value")))


@generates("Range", weight=0.7)
def _range(b: Builder, op: str) -> bool:
    n = int(b.rng.integers(1, 34))
    if b.chance(0.6):  # float steps that are exact in binary, and a limit half a step past the last
        start, delta = float(b.rng.integers(-12, 12)) / 4, float(b.choice([0.25, 0.5, 1.0, -0.5, 2.0]))
        limit = start + delta * (n - 0.5)
        dtype: type = np.float32
    else:
        start, delta = int(b.rng.integers(-5, 6)), int(b.choice([1, 2, 3, -1, -2]))
        limit = start + delta * (n - 1) + (1 if delta > 0 else -1)
        dtype = np.int64
    scalars = [b.const(np.asarray(v, dtype)) for v in (start, limit, delta)]
    return added(b.node(op, scalars))


@generates("Constant", weight=0.7)
def _constant(b: Builder, op: str) -> bool:
    r = b.rng.random()
    if b.opset >= 12 and r < 0.4:
        key = b.choice(["value_float", "value_floats", "value_int", "value_ints"])
        n = int(b.rng.integers(1, 6))
        value: object = {
            "value_float": b.uniform(-2, 2),
            "value_floats": [b.uniform(-2, 2) for _ in range(n)],
            "value_int": int(b.rng.integers(-3, 4)),
            "value_ints": [int(i) for i in b.rng.integers(-3, 4, n)],
        }[key]
        return added(b.node(op, [], **{key: value}))
    shape = partner_shape(b, (b.pick(dtype=None) or b.inputs[0]).shape)
    return added(b.node(op, [], value=numpy_helper.from_array(b.normal(shape), "value")))


@generates("Cast", weight=1.2)
def _cast(b: Builder, op: str) -> bool:
    x = b.pick(dtype=None, const=True)
    if x is None:
        return False
    kind = x.dtype.kind
    if kind == "f" and x.dtype == F32:
        targets = [TensorProto.DOUBLE, TensorProto.FLOAT]
        if off_grid(x) and x.peak < 1e6:  # truncation jumps at whole numbers
            targets += [TensorProto.INT64, TensorProto.INT32]
        if x.exact or float(np.min(np.abs(x.array))) > 10 * x.noise:
            targets.append(TensorProto.BOOL)
    elif kind == "f":
        targets = [TensorProto.FLOAT]
    elif kind == "b":
        targets = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32]
    else:
        targets = [
            TensorProto.FLOAT,
            TensorProto.INT32,
            TensorProto.INT64,
            TensorProto.BOOL,
            TensorProto.DOUBLE,
        ]
    to = int(b.choice(targets))
    if op == "CastLike":
        dtype = oh.tensor_dtype_to_np_dtype(to)
        like = b.pick(dtype=dtype, const=True) if b.chance(0.5) else None
        like = like or b.const(np.zeros((1,), dtype))
        return added(b.node(op, [x, like], exact=x.exact))
    return added(b.node(op, [x], exact=x.exact, to=to))


GENERATORS["CastLike"] = _cast
WEIGHTS["CastLike"] = 0.8


@generates("Clip")
def _clip(b: Builder, op: str) -> bool:
    x = b.pick(dtype=int_or_float(b, op, 0.1) if b.opset >= 12 else F32)
    if x is None:
        return False
    lo = b.uniform(-1.5, 0.0) if b.chance(0.7) else None
    hi = b.uniform(0.0, 1.5) if b.chance(0.7) else None
    if b.since(op) < 11:
        return added(b.node(op, [x], min=lo, max=hi))

    def bound(v: float | None, reduce: str) -> Val | None:
        if v is None:
            return None
        if b.chance(0.25) and x.dtype == F32:  # a bound computed at run time
            src = b.pick(lambda s: s.rank >= 1)
            return src and reduce_all(b, src, reduce)
        return b.const(np.asarray(round(v) if x.dtype.kind == "i" else v, x.dtype))

    bounds = [bound(lo, "ReduceMin"), bound(hi, "ReduceMax")]
    if all(v is not None for v in bounds) and bounds[0].array > bounds[1].array:  # type: ignore[union-attr,operator]
        return False
    while bounds and bounds[-1] is None:
        bounds.pop()
    return added(b.node(op, [x, *bounds]))


@generates("Dropout")
def _dropout(b: Builder, op: str) -> bool:
    x = b.pick()
    if x is None:
        return False
    version = b.since(op)
    outputs = 2 if version >= 12 and b.chance(0.4) else 1  # onnxruntime's mask before 12 is all false
    if version < 12:
        return added(b.node(op, [x], outputs, ratio=b.uniform(0, 0.9) if b.chance(0.5) else None))
    inputs: list[Val | None] = [x]
    r = b.rng.random()
    if r < 0.3:
        inputs.append(b.const(np.float32(b.uniform(0, 0.9))))
    elif r < 0.5:
        inputs += [b.const(np.float32(b.uniform(0, 0.9))), b.const(np.bool_(False))]
    elif r < 0.6:
        inputs += [b.const(np.float32(0.0)), b.const(np.bool_(True))]  # training with ratio 0 keeps all
    return added(b.node(op, inputs, outputs))


# --------------------------------------------------------------------------- recurrences and resampling

#: activation → how many of (alpha, beta) it takes, for activation_alpha / activation_beta
RNN_ACTIVATIONS = {
    "Tanh": 0,
    "Sigmoid": 0,
    "Relu": 0,
    "LeakyRelu": 1,
    "HardSigmoid": 2,
    "Elu": 1,
    "Softsign": 0,
    "Softplus": 0,
}
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
PER_DIRECTION = {"RNN": 1, "GRU": 2, "LSTM": 3}


@generates("RNN", "GRU", "LSTM")
def _recurrent(b: Builder, op: str) -> bool:
    x = b.pick(lambda v: v.rank == 3 and v.shape[0] <= 17)
    if x is None or b.chance(0.3):
        y = b.pick(lambda v: 2 <= v.array.size <= 4096)
        x = y and as_rank(b, y, 3)
    if x is None:
        return False
    layout = int(b.since(op) >= 14 and b.chance(0.25))
    seq, batch, features = (x.shape[1], x.shape[0], x.shape[2]) if layout else x.shape
    hidden = random_dim(b) if b.chance(0.8) else 17
    direction = b.choice(["forward", "forward", "reverse", "bidirectional"])
    dirs, gates = 1 + (direction == "bidirectional"), GATES[op]
    w = weights(b, (dirs, gates * hidden, features), features)
    r = weights(b, (dirs, gates * hidden, hidden), hidden)
    optional: list[Val | None] = [
        b.const(b.normal((dirs, 2 * gates * hidden), 0.5)) if b.chance(0.6) else None,
        b.const(np.full((batch,), seq, np.int32)) if b.chance(0.2) else None,
    ]
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    optional.append(b.const(b.normal(state_shape, 0.5)) if b.chance(0.5) else None)
    if op == "LSTM":
        optional.append(b.const(b.normal(state_shape, 0.5)) if b.chance(0.4) else None)
        optional.append(b.const(b.normal((dirs, 3 * hidden), 0.5)) if b.chance(0.3) else None)
    while optional and optional[-1] is None:
        optional.pop()
    attrs: dict[str, object] = {"hidden_size": hidden, "layout": layout or None}
    if direction != "forward" or b.chance(0.3):
        attrs["direction"] = direction
    if not layout and b.chance(0.3):  # (onnx's evaluator, which runs layout 1, keeps the defaults)
        names = [b.choice(list(RNN_ACTIVATIONS)) for _ in range(PER_DIRECTION[op] * dirs)]
        attrs["activations"] = names
        alphas = [b.uniform(0.1, 0.5) for n in names if RNN_ACTIVATIONS[n] >= 1]
        betas = [b.uniform(0.3, 0.7) for n in names if RNN_ACTIVATIONS[n] >= 2]
        attrs["activation_alpha"] = alphas or None
        attrs["activation_beta"] = betas or None
    if b.chance(0.2):
        attrs["clip"] = b.uniform(1.0, 5.0)
    if op == "GRU" and b.chance(0.5):
        attrs["linear_before_reset"] = 1
    wanted = [b.chance(0.7) for _ in range(3 if op == "LSTM" else 2)]
    if not any(wanted):
        wanted[0] = True
    return added(
        b.node(op, [x, w, r, *optional], wanted, peerless=bool(layout), sensitive=True, **attrs)
    )  # onnxruntime: layout 0


def resize_plan(b: Builder, x: Val, mode: str) -> tuple[list[int], list[float], list[int]] | None:
    """Resized axes, their scales and output sizes. Nearest sampling only with scales
    whose coordinate arithmetic is exact in float32, so no engine rounds a tie differently."""
    if mode == "nearest":
        axes = sorted(
            int(a) for a in b.rng.choice(x.rank, size=int(b.rng.integers(1, x.rank + 1)), replace=False)
        )
        scales = [float(b.choice([2.0, 3.0, 1.0] + ([0.5] if x.shape[a] % 2 == 0 else []))) for a in axes]
    else:  # whole output lengths: where scale × length is fractional, engines read align_corners apart
        axes = [x.rank - 2, x.rank - 1]
        whole = lambda a: [s for s in (0.5, 0.75, 1.5, 2.0, 2.5, 3.0) if (s * x.shape[a]).is_integer()]  # noqa: E731
        scales = [float(b.choice(whole(a))) for a in axes]
    sizes = [int(math.floor(s * x.shape[a])) for a, s in zip(axes, scales)]
    if min(sizes) < 1:
        return None
    return axes, scales, sizes


@generates("Resize", weight=1.2)
def _resize(b: Builder, op: str) -> bool:
    mode = b.choice(["nearest", "linear", "cubic"])
    if mode == "nearest":
        x = b.pick(lambda v: 1 <= v.rank <= 4)
    else:  # onnxruntime resizes 2-D, or the last two axes of 4-D, with these modes
        x = b.pick(lambda v: v.rank in (2, 4) and min(v.shape[-2:]) >= 2)
    plan = x and resize_plan(b, x, mode)
    if x is None or plan is None:
        return False
    axes, scales, sizes = plan
    version = b.since(op)
    use_axes = version >= 18 and b.chance(0.3)
    full_scales = [1.0] * x.rank
    full_sizes = list(x.shape)
    for a, s, n in zip(axes, scales, sizes):
        full_scales[a], full_sizes[a] = s, n
    attrs: dict[str, object] = {"mode": mode if mode != "nearest" or b.chance(0.5) else None}
    coordinate = "half_pixel"
    if mode == "nearest":
        coordinate = b.choice(["half_pixel", "asymmetric", "pytorch_half_pixel"])
        attrs["nearest_mode"] = b.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil", None])
    elif version >= 11:
        coordinate = b.choice(
            ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"]
            + (["half_pixel_symmetric"] if version >= 19 else [])
        )
        if mode == "cubic":
            attrs["cubic_coeff_a"] = b.uniform(-0.9, -0.4) if b.chance(0.5) else None
            attrs["exclude_outside"] = int(b.chance(0.5)) or None
        if version >= 18 and min(scales) < 1 and b.chance(0.4):
            attrs["antialias"] = 1
    if version < 11:
        if mode != "nearest":
            return False  # opset 10 resizes asymmetrically: onnxruntime and the spec differ there
        return added(b.node(op, [x, b.const(np.asarray(full_scales, np.float32))], **attrs))
    if coordinate != "half_pixel" or b.chance(0.3):
        attrs["coordinate_transformation_mode"] = coordinate
    listed = axes if use_axes else list(range(x.rank))
    if use_axes:
        attrs["axes"] = signed(b, axes, x.rank)
    roi: Val | None = None
    if coordinate == "tf_crop_and_resize":
        starts = [b.uniform(0, 0.3) if a in axes else 0.0 for a in listed]
        ends = [b.uniform(0.7, 1.0) if a in axes else 1.0 for a in listed]
        roi = b.const(np.asarray(starts + ends, np.float32))
        attrs["extrapolation_value"] = b.uniform(-1, 1) if b.chance(0.5) else None
    elif version < 13:
        roi = b.const(np.zeros(0, np.float32))
    by_sizes = b.chance(0.4)
    scales_in: Val | None = None
    sizes_in: Val | None = None
    if by_sizes:
        sizes_in = b.ints([full_sizes[a] for a in listed])
        if version < 13:
            scales_in = b.const(np.zeros(0, np.float32))
        if version >= 18 and mode != "nearest" and coordinate != "tf_crop_and_resize" and b.chance(0.3):
            # (not with a crop: where the policy's sizes come back to the input's,
            # onnxruntime returns the input and ignores the ROI the spec applies)
            attrs["keep_aspect_ratio_policy"] = b.choice(["not_larger", "not_smaller"])
    else:
        scales_in = b.const(np.asarray([full_scales[a] for a in listed], np.float32))
    inputs = [x, roi, scales_in, sizes_in]
    while inputs[-1] is None:
        inputs.pop()
    return added(b.node(op, inputs, **attrs))


@generates("Upsample", weight=3.0)
def _upsample(b: Builder, op: str) -> bool:
    mode = b.choice(["nearest", "linear"])
    x = b.pick(lambda v: v.rank in (2, 4) if mode == "linear" else 1 <= v.rank <= 4)
    if x is None:
        return False
    scales = [
        float(b.choice([1, 2, 3])) if mode == "nearest" or i >= x.rank - 2 else 1.0 for i in range(x.rank)
    ]
    return added(b.node(op, [x, b.const(np.asarray(scales, np.float32))], mode=mode))


# --------------------------------------------------------------------------- graphs


@dataclass
class Case:
    """One generated graph: the model, its inputs, and how often each op type is in it."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    ops: Counter
    peer: bool = True  # onnxruntime runs it (some forms Kiln claims, onnxruntime lacks)
    rejected: Counter = field(default_factory=Counter)


def choose_opset(rng: np.random.Generator) -> int:
    opsets = list(OPSETS)
    weights = np.array([OPSETS[o][0] for o in opsets])
    return int(opsets[int(rng.choice(len(opsets), p=weights / weights.sum()))])


def opset_of(seed: int, index: int) -> int:
    """Graph (seed, index)'s opset: the first draw of its generator."""
    return choose_opset(np.random.default_rng([seed, index]))


@functools.cache
def ops_at(opset: int) -> tuple[tuple[str, ...], np.ndarray]:
    """The op types that exist at opset, and how likely each is drawn."""
    ops = tuple(op for op in GENERATORS if schema(op, opset) is not None)
    weights = np.array([WEIGHTS[op] for op in ops])
    return ops, weights / weights.sum()


def input_shapes(b: Builder) -> list[tuple[int, ...]]:
    """1-3 shapes of rank 0-4, related so that they often broadcast together."""
    rank = int(b.rng.choice(5, p=[0.05, 0.2, 0.3, 0.25, 0.2]))
    base = [random_dim(b) for _ in range(rank)]
    while math.prod(base) > 4096:
        base[int(np.argmax(base))] //= 2
    shapes = [tuple(base)]
    for _ in range(int(b.rng.integers(0, 3))):
        r = b.rng.random()
        if r < 0.45:
            shapes.append(tuple(base))
        elif r < 0.8:
            shapes.append(partner_shape(b, base))
        else:
            shape = [random_dim(b) for _ in range(int(b.rng.integers(0, 5)))]
            while math.prod(shape) > 4096:
                shape[int(np.argmax(shape))] //= 2
            shapes.append(tuple(shape))
    return shapes


def choose_outputs(b: Builder) -> list[str]:
    """Every value nothing reads (so no node is dead), some that other nodes also read,
    now and then an input or a constant returned as is, and now and then one twice."""
    used = b.consumers()
    made = [v for v in b.pool if not v.name.startswith(("in", "c"))]
    outputs = [v.name for v in made if not used[v.name]]
    outputs += [v.name for v in made if used[v.name] and b.chance(0.2)]
    if b.chance(0.1):
        outputs.append(b.choice(b.inputs).name)
    constants = [t.name for t in b.inits if t.name not in b.hidden]
    if constants and b.chance(0.05):
        outputs.append(b.choice(constants))
    if outputs and b.chance(0.15):
        outputs.append(b.choice(outputs))
    order = b.rng.permutation(len(outputs))
    return [outputs[i] for i in order] or [b.inputs[0].name]


def generate(seed: int, index: int) -> Case:
    """Graph `index` of `seed`: the same model and inputs every time."""
    rng = np.random.default_rng([seed, index])
    b = Builder(rng, choose_opset(rng))
    for shape in input_shapes(b):
        b.input(b.normal(shape, float(b.choice([1.0, 1.0, 0.5, 2.0]))))
    target = int(rng.integers(2, MAX_NODES + 1))
    ops, weights = ops_at(b.opset)
    for _ in range(60 * MAX_NODES):
        if len(b.nodes) >= target:
            break
        op = ops[int(rng.choice(len(ops), p=weights))]
        mark = (len(b.nodes), len(b.inits), len(b.pool))
        if not GENERATORS[op](b, op) or len(b.nodes) > MAX_NODES:
            del b.nodes[mark[0] :], b.inits[mark[1] :], b.pool[mark[2] :]
    inputs = [(v.name, ELEM[v.dtype], v.shape) for v in b.inputs]
    model = assemble(b.nodes, inputs, b.inits, choose_outputs(b), b.opset, f"fuzz_{seed}_{index}")
    feeds = {v.name: v.array for v in b.inputs}
    return Case(model, feeds, Counter(n.op_type for n in b.nodes), b.peer, b.rejected)


def assemble(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int]]],
    inits: Sequence[onnx.TensorProto],
    outputs: Sequence[str],
    opset: int,
    name: str = "fuzz",
) -> onnx.ModelProto:
    """A checked model: outputs typed by ONNX's shape inference (strict), the whole
    passing onnx.checker; a GeneratorError says what is wrong otherwise."""
    graph = oh.make_graph(
        list(nodes), name, [oh.make_tensor_value_info(n, e, s) for n, e, s in inputs], [], list(inits)
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=OPSETS[opset][1])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise GeneratorError(f"shape inference rejects the graph: {e}") from e
    types = {vi.name: vi.type for vi in [*inferred.graph.input, *inferred.graph.value_info]}
    for t in inits:
        types[t.name] = oh.make_tensor_type_proto(t.data_type, t.dims)
    missing = [o for o in outputs if o not in types]
    if missing:
        raise GeneratorError(f"no type inferred for outputs {missing}")
    model.graph.output.extend(onnx.ValueInfoProto(name=o, type=types[o]) for o in outputs)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise GeneratorError(f"onnx.checker rejects the graph: {e}") from e
    return model


def union(
    models: Sequence[onnx.ModelProto], feeds: Sequence[Mapping[str, np.ndarray]], prefixes: Sequence[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The disjoint union of models of one opset: each keeps its own inputs and outputs,
    its names prefixed."""
    parts = [onnx.compose.add_prefix(m, p) for m, p in zip(models, prefixes)]
    graph = oh.make_graph(
        [n for m in parts for n in m.graph.node],
        "batch",
        [i for m in parts for i in m.graph.input],
        [o for m in parts for o in m.graph.output],
        [t for m in parts for t in m.graph.initializer],
    )
    model = oh.make_model(graph, opset_imports=list(models[0].opset_import), ir_version=models[0].ir_version)
    merged = {p + k: v for f, p in zip(feeds, prefixes) for k, v in f.items()}
    return model, merged


# --------------------------------------------------------------------------- running and comparing

Engine = Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Outcome:
    """How one check went. kind: ok, mismatch, internal (Kiln raised), unsupported (Kiln
    refused what the generator made: a generator bug), generator (an invalid graph or one
    onnxruntime refuses), crash, hang. `bad` lists the outputs that disagree."""

    kind: str
    where: str = ""
    detail: str = ""
    bad: tuple[int, ...] = ()

    @property
    def failed(self) -> bool:
        return self.kind != "ok"

    @property
    def signature(self) -> tuple[str, str, str]:
        """What a shrunk graph must still show to count as the same failure: the kind,
        where, and for an error its message without the numbers and names in it."""
        lines = self.detail.strip().splitlines()
        if self.kind in ("ok", "mismatch") or not lines:
            return self.kind, self.where, ""
        gist = re.sub(r"\d+", "#", re.sub(r"'[^']*'|\"[^\"]*\"", "*", lines[-1]))
        return self.kind, self.where, gist[:160]


class EngineError(Exception):
    def __init__(self, kind: str, where: str, detail: str):
        super().__init__(detail)
        self.outcome = Outcome(kind, where, detail)


def kiln_engine(fuse: bool, threads: int | None = None) -> Engine:
    def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from compiler import compile_model

        compiled = compile_model(model, name="fuzz", fuse=fuse)
        if threads:
            compiled.set_num_threads(threads)
        return compiled.run(**feeds)

    return run


def interpreter_engine(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    from compiler.driver import to_graph
    from ir.interpreter import interpret

    return interpret(to_graph(model), dict(feeds))


def onnxruntime_engine(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    assert onnxruntime_session is not None
    return onnxruntime_session(model).run(None, dict(feeds))


#: the engines compared, each against the interpreter (unfused at one thread, fused at the default)
ENGINES: dict[str, Engine] = {"fused": kiln_engine(True), "unfused": kiln_engine(False, threads=1)}


def _error_where(stage: str, e: BaseException) -> str:
    """The stage and the exception type (and the type inside an InternalCompilerError)."""
    inner = ""
    if type(e).__name__ == "InternalCompilerError":
        found = [w for w in str(e).replace(":", " ").split() if w.endswith(("Error", "Exception"))]
        inner = f" ({found[0]})" if found else ""
    return f"{stage}: {type(e).__name__}{inner}"


def _run(
    stage: str, engine: Engine, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    from ir.errors import UnsupportedError

    try:
        with np.errstate(all="ignore"):  # inf and NaN on purpose (IsInf, IsNaN)
            return [np.asarray(a) for a in engine(model, feeds)]
    except UnsupportedError as e:
        raise EngineError("unsupported", _error_where(stage, e), f"{stage}: {e}") from e
    except Exception as e:
        kind = "generator" if stage == "onnxruntime" else "internal"
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        raise EngineError(kind, _error_where(stage, e), f"{stage}: {detail[:2000]}") from e


def exposed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every node output a graph output too (its own outputs first)."""
    m = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = {vi.name: vi.type for vi in m.graph.value_info}
    have = {o.name for o in m.graph.output}
    extra = [o for n in m.graph.node for o in n.output if o and o not in have and o in types]
    m.graph.output.extend(onnx.ValueInfoProto(name=o, type=types[o]) for o in dict.fromkeys(extra))
    del m.graph.value_info[:]
    return m


def scales(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> list[float]:
    """Per output, the largest magnitude among it and its producing node's operands (at
    least 1): float32 rounding is relative to the operands, not the result (x - max(x),
    or a normalization of nearly equal values, gives results near 0 whose error is eps
    times the operands' size)."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def size(name: str) -> float:
        a = values.get(name)
        return _finite_peak(np.asarray(a)) if a is not None else 0.0

    return [
        max(
            [1.0, size(o.name)]
            + [size(i) for i in (producer[o.name].input if o.name in producer else []) if i]
        )
        for o in model.graph.output
    ]


def intermediates(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every node's results by Kiln's interpreter, for the tolerances (empty if that
    fails: an output is then its own scale)."""
    every = exposed(model)
    try:
        with np.errstate(all="ignore"):
            return dict(zip([o.name for o in every.graph.output], interpreter_engine(every, feeds)))
    except Exception:
        return {}


def disagreement(got: np.ndarray, want: np.ndarray, scale: float) -> str | None:
    """Why `got` is not `want` within tolerance (None when it is): rtol 1e-4 with an
    absolute floor of 1e-5 × scale; integers and bools must match exactly, NaN where
    NaN, infinities exactly."""
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.dtype.kind != "f":
        wrong = got != want
        if not wrong.any():
            return None
        i = np.unravel_index(int(np.argmax(wrong)), got.shape)
        return f"{int(wrong.sum())} of {got.size} elements differ; at {i}: {got[i]!r}, expected {want[i]!r}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    with np.errstate(invalid="ignore"):
        error = np.where(same, 0.0, np.abs(g - w))
    allowed = RTOL * np.abs(np.where(np.isfinite(w), w, 0.0)) + ATOL * scale
    bad = ~(error <= allowed)
    if not bad.any():
        return None
    i = np.unravel_index(
        int(np.argmax(np.where(bad, np.nan_to_num(error, nan=np.inf, posinf=np.inf), -1))), g.shape
    )
    return (
        f"{int(bad.sum())} of {g.size} elements off, worst at {i}: {got[i]!r}, expected {want[i]!r} "
        f"(error {error[i]:.3g}, allowed {allowed[i]:.3g})"
    )


def check(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    engines: Mapping[str, Engine] | None = None,
    peer: bool = True,
) -> Outcome:
    """Run the model through Kiln's interpreter, its fused and unfused builds and (when
    installed, and `peer`) onnxruntime, and compare each with the interpreter."""
    engines = dict(ENGINES if engines is None else engines)
    names = [o.name for o in model.graph.output]
    if peer and onnxruntime_session is not None and "onnxruntime" not in engines:
        engines["onnxruntime"] = onnxruntime_engine
    try:
        expected = _run("interpreter", interpreter_engine, model, feeds)
        limits = scales(model, intermediates(model, feeds) | dict(feeds) | dict(zip(names, expected)))
        results = {name: _run(name, engine, model, feeds) for name, engine in engines.items()}
    except EngineError as e:
        return e.outcome
    first: Outcome | None = None
    bad: set[int] = set()
    for name, got in results.items():
        pair = f"{name} vs interpreter"
        if len(got) != len(expected):
            return Outcome(
                "mismatch", pair, f"{len(got)} outputs, expected {len(expected)}", tuple(range(len(got)))
            )
        for i, (g, w, scale) in enumerate(zip(got, expected, limits)):
            why = disagreement(g, w, scale)
            if why is not None:
                bad.add(i)
                if first is None:
                    output = model.graph.output[i].name
                    first = Outcome("mismatch", pair, f"{pair}, output {i} ({output}): {why}")
    if first is None:
        return Outcome("ok")
    return Outcome(first.kind, first.where, first.detail, tuple(sorted(bad)))


# --------------------------------------------------------------------------- batches and worker processes


@dataclass
class Verdict:
    """One graph's result in a run: its outcome, and the model and inputs that show it
    (for a graph that only fails inside its batch, the batch)."""

    seed: int
    index: int
    outcome: Outcome
    ops: Counter = field(default_factory=Counter)
    model: bytes = b""
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    peer: bool = True
    suspect: bool = False  # its batch failed on it: to be re-run alone


def prefix(index: int) -> str:
    return f"g{index}_"


def check_batch(seed: int, indices: Sequence[int]) -> list[Verdict]:
    """Generate the graphs, check their disjoint union as one model, and say for each
    graph whether the batch showed a problem with it (a suspect, to be re-run alone:
    its outcome is the batch's), or it passed."""
    cases, verdicts = {}, {}
    for i in indices:
        try:
            cases[i] = generate(seed, i)
        except GeneratorError as e:
            verdicts[i] = Verdict(seed, i, Outcome("generator", "generate", str(e)))
    if cases:
        order = list(cases)
        model, feeds = union(
            [cases[i].model for i in order], [cases[i].feeds for i in order], [prefix(i) for i in order]
        )
        outcome = check(model, feeds, peer=False)
        peers = [i for i in order if cases[i].peer]
        if not outcome.failed and peers and onnxruntime_session is not None:
            peer_model, peer_feeds = union(
                [cases[i].model for i in peers], [cases[i].feeds for i in peers], [prefix(i) for i in peers]
            )
            outcome = check(peer_model, peer_feeds, engines={}, peer=True)
            order = peers
            model = peer_model
        owners = [next(i for i in order if o.name.startswith(prefix(i))) for o in model.graph.output]
        suspects = {owners[k] for k in outcome.bad} if outcome.kind == "mismatch" else set(order)
        for i, case in cases.items():
            suspect = outcome.failed and i in suspects
            verdicts[i] = Verdict(
                seed, i, outcome if suspect else Outcome("ok"), case.ops, peer=case.peer, suspect=suspect
            )
    return [verdicts[i] for i in indices]


def check_alone(seed: int, index: int) -> Verdict:
    try:
        case = generate(seed, index)
    except GeneratorError as e:
        return Verdict(seed, index, Outcome("generator", "generate", str(e)))
    outcome = check(case.model, case.feeds, peer=case.peer)
    return Verdict(seed, index, outcome, case.ops, case.model.SerializeToString(), case.feeds, case.peer)


def check_model_bytes(model: bytes, feeds: dict[str, np.ndarray], peer: bool) -> Outcome:
    proto = onnx.ModelProto()
    proto.ParseFromString(model)
    return check(proto, feeds, peer=peer)


#: a task: a module-level function (pickled by name) and its arguments
Task = tuple[Callable, tuple]


def execute(task: Task) -> object:
    fn, args = task
    return fn(*args)


def _worker(conn, cache: str) -> None:  # type: ignore[no-untyped-def]
    """A worker process: run tasks until told to stop. Its compiled libraries go to a
    directory of its own, emptied after each task (every graph is new: nothing to reuse)."""
    os.environ["KILN_CACHE_DIR"] = cache
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = execute(task)
        except Exception:
            result = Broken(traceback.format_exc())
        shutil.rmtree(cache, ignore_errors=True)
        conn.send(result)


def task_timeout(task: Task) -> float:
    fn, args = task
    return 120.0 + (30.0 * len(args[1]) if fn is check_batch else 0.0)


class Crashed(Exception):
    """The worker running a task died (a signal, or an exit without an answer)."""


class Hung(Exception):
    """The task ran past its time limit; its worker was killed."""


class Broken(Exception):
    """The task raised outside Kiln's engines: a bug in this file."""


class Workers:
    """Worker processes for checks: a task that kills its worker reports Crashed, one
    that overruns its limit Hung; either way a fresh worker takes the next task. With
    jobs=0 tasks run in this process (no protection; for debugging and tests)."""

    RECYCLE = 25  # tasks per worker: every compiled model stays loaded in it

    def __init__(self, jobs: int):
        import multiprocessing

        self.jobs = jobs
        self.ctx = multiprocessing.get_context("spawn")
        self.idle: list[tuple[object, object, int]] = []
        root = os.environ.get("KILN_CACHE_DIR") or tempfile.gettempdir()
        self.cache_root = Path(root) / f"fuzz-{os.getpid()}"

    def _spawn(self) -> tuple[object, object, int]:
        parent, child = self.ctx.Pipe()
        cache = str(self.cache_root / f"w{time.monotonic_ns()}")
        proc = self.ctx.Process(target=_worker, args=(child, cache), daemon=True)
        proc.start()
        child.close()
        return proc, parent, 0

    def run(self, queue: deque[Task]) -> Iterator[tuple[Task, object]]:
        """(task, result) as tasks finish; tasks appended to the queue meanwhile run too.
        A result is the task's return value, or a Crashed or Hung exception."""
        if self.jobs == 0:
            while queue:
                task = queue.popleft()
                yield task, execute(task)
            return
        from multiprocessing.connection import wait

        busy: dict[object, tuple[object, Task, float, int]] = {}
        while queue or busy:
            while queue and len(busy) < self.jobs:
                proc, conn, done = self.idle.pop() if self.idle else self._spawn()
                task = queue.popleft()
                conn.send(task)  # type: ignore[attr-defined]
                busy[conn] = (proc, task, time.monotonic() + task_timeout(task), done)
            soonest = min(deadline for _, _, deadline, _ in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                proc, task, _, done = busy.pop(conn)
                try:
                    result = conn.recv()  # type: ignore[attr-defined]
                except (EOFError, OSError):
                    proc.join()  # type: ignore[attr-defined]
                    yield task, Crashed(f"worker exited with code {proc.exitcode}")  # type: ignore[attr-defined]
                    continue
                self._release(proc, conn, done + 1)
                yield task, result
            for conn, (proc, task, deadline, _) in list(busy.items()):
                if time.monotonic() > deadline:
                    proc.kill()  # type: ignore[attr-defined]
                    proc.join()  # type: ignore[attr-defined]
                    del busy[conn]
                    yield task, Hung(f"no answer within {task_timeout(task):.0f} s")

    def _release(self, proc: object, conn: object, done: int) -> None:
        if done < self.RECYCLE:
            self.idle.append((proc, conn, done))
            return
        conn.send(None)  # type: ignore[attr-defined]
        proc.join()  # type: ignore[attr-defined]

    def close(self) -> None:
        for proc, conn, _ in self.idle:
            conn.send(None)  # type: ignore[attr-defined]
            proc.join()  # type: ignore[attr-defined]
        self.idle.clear()
        shutil.rmtree(self.cache_root, ignore_errors=True)


def as_outcome(result: object) -> Outcome:
    if isinstance(result, Crashed):
        return Outcome("crash", "worker", str(result))
    if isinstance(result, Hung):
        return Outcome("hang", "worker", str(result))
    if isinstance(result, Broken):
        return Outcome("generator", "fuzzer", str(result))
    assert isinstance(result, Outcome)
    return result


def batch_case(
    seed: int, indices: Sequence[int], peer: bool
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A batch's union again (only the graphs onnxruntime runs, when `peer`)."""
    cases = {i: generate(seed, i) for i in indices}
    chosen = [i for i in indices if cases[i].peer or not peer]
    return union(
        [cases[i].model for i in chosen], [cases[i].feeds for i in chosen], [prefix(i) for i in chosen]
    )


# --------------------------------------------------------------------------- shrinking


@dataclass
class Parts:
    """A model taken apart, to be edited and put back together."""

    nodes: list[onnx.NodeProto]
    inputs: list[tuple[str, int, tuple[int, ...]]]
    inits: list[onnx.TensorProto]
    outputs: list[str]
    opset: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> Parts:
        g = model.graph
        inputs = [
            (
                vi.name,
                vi.type.tensor_type.elem_type,
                tuple(d.dim_value for d in vi.type.tensor_type.shape.dim),
            )
            for vi in g.input
        ]
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        return cls(list(g.node), inputs, list(g.initializer), [o.name for o in g.output], opset)

    def copy(self, **changes: object) -> Parts:
        fields = {
            "nodes": list(self.nodes),
            "inputs": list(self.inputs),
            "inits": list(self.inits),
            "outputs": list(self.outputs),
            "opset": self.opset,
        }
        return Parts(**(fields | changes))  # type: ignore[arg-type]

    def build(self, feeds: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
        """The model without dead nodes and unused inputs and constants (None if invalid)."""
        live = set(self.outputs)
        nodes = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.output):
                nodes.append(n)
                live.update(i for i in n.input if i)
        nodes.reverse()
        inputs = [i for i in self.inputs if i[0] in live]
        if self.inputs and not inputs:
            return None  # a graph of constants only: the importer folds it, nothing is compiled
        try:
            model = assemble(
                nodes, inputs, [t for t in self.inits if t.name in live], self.outputs, self.opset
            )
        except GeneratorError:
            return None
        return model, {name: feeds[name] for name, _, _ in inputs}


def model_values(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], peer: bool = True
) -> dict[str, np.ndarray]:
    """Every value of the model on these inputs, by onnxruntime (when installed and
    `peer`) or onnx's reference evaluator; empty if the evaluator refuses the model."""
    every = exposed(model)
    names = [o.name for o in every.graph.output]
    try:
        if onnxruntime_session is not None and peer:
            results = onnxruntime_session(every).run(None, dict(feeds))
        else:
            from onnx.reference import ReferenceEvaluator

            with np.errstate(all="ignore"):
                results = ReferenceEvaluator(every).run(None, dict(feeds))
    except Exception:
        return {}
    return dict(zip(names, (np.asarray(r) for r in results)))


Candidate = Callable[[], "tuple[onnx.ModelProto, dict[str, np.ndarray]] | None"]


def candidates(model: onnx.ModelProto, feeds: dict[str, np.ndarray], peer: bool = True) -> list[Candidate]:
    """Smaller variants of the model, the likely biggest cuts first: an output fewer; a
    node fewer (its results becoming inputs or constants holding their values, or
    replaced by one of its own operands of the same type); an input made a constant;
    an input dim made 1 or halved."""
    parts = Parts.of(model)
    values = model_values(model, feeds, peer)
    found: list[Candidate] = []
    if len(parts.outputs) > 1:
        for k in range(len(parts.outputs)):
            found.append(
                lambda k=k: parts.copy(outputs=parts.outputs[:k] + parts.outputs[k + 1 :]).build(feeds)
            )
    for n in parts.nodes:
        outs = [o for o in n.output if o]
        if all(o in values for o in outs):
            found.append(lambda n=n, outs=outs: _cut(parts, feeds, values, n, outs, as_inputs=True))
            found.append(lambda n=n, outs=outs: _cut(parts, feeds, values, n, outs, as_inputs=False))
        if len(outs) == 1 and outs[0] in values:
            for i in dict.fromkeys(i for i in n.input if i in values or i in feeds):
                found.append(lambda n=n, o=outs[0], i=i: _bypass(parts, feeds, values, n, o, i))
    for name, _, _ in parts.inputs[1:] if len(parts.inputs) > 1 else []:  # one input stays: code to compile
        found.append(lambda name=name: _freeze(parts, feeds, name))
    for k, (_, _, shape) in enumerate(parts.inputs):
        for axis, d in enumerate(shape):
            for smaller in dict.fromkeys([1, d // 2]):
                if 1 <= smaller < d:
                    found.append(
                        lambda k=k, axis=axis, smaller=smaller: _narrow(parts, feeds, k, axis, smaller)
                    )
    return found


def _cut(parts: Parts, feeds: dict, values: dict, node: onnx.NodeProto, outs: list[str], as_inputs: bool):
    nodes = [n for n in parts.nodes if n is not node]
    arrays = {o: values[o] for o in outs}
    if as_inputs:
        inputs = parts.inputs + [(o, ELEM[a.dtype], a.shape) for o, a in arrays.items() if a.dtype in ELEM]
        return parts.copy(nodes=nodes, inputs=inputs).build(feeds | arrays)
    inits = parts.inits + [numpy_helper.from_array(a, o) for o, a in arrays.items()]
    return parts.copy(nodes=nodes, inits=inits).build(feeds)


def _bypass(parts: Parts, feeds: dict, values: dict, node: onnx.NodeProto, out: str, operand: str):
    known = values | feeds | {t.name: numpy_helper.to_array(t) for t in parts.inits}
    a, b = known.get(out), known.get(operand)
    if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
        return None
    nodes = []
    for n in parts.nodes:
        if n is node:
            continue
        if out in n.input:
            n2 = onnx.NodeProto()
            n2.CopyFrom(n)
            n2.input[:] = [operand if i == out else i for i in n.input]
            n = n2
        nodes.append(n)
    outputs = [operand if o == out else o for o in parts.outputs]
    return parts.copy(nodes=nodes, outputs=outputs).build(feeds)


def _freeze(parts: Parts, feeds: dict, name: str):
    inputs = [i for i in parts.inputs if i[0] != name]
    inits = parts.inits + [numpy_helper.from_array(np.asarray(feeds[name]), name)]
    return parts.copy(inputs=inputs, inits=inits).build({k: v for k, v in feeds.items() if k != name})


def _narrow(parts: Parts, feeds: dict, k: int, axis: int, size: int):
    name, elem, shape = parts.inputs[k]
    new_shape = shape[:axis] + (size,) + shape[axis + 1 :]
    inputs = parts.inputs[:k] + [(name, elem, new_shape)] + parts.inputs[k + 1 :]
    narrowed = np.ascontiguousarray(np.take(feeds[name], np.arange(size), axis=axis))
    return parts.copy(inputs=inputs).build(feeds | {name: narrowed})


def size_of(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    return len(model.graph.node), len(model.graph.output), sum(np.asarray(a).size for a in feeds.values())


def shrink(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    fails: Callable[[onnx.ModelProto, dict[str, np.ndarray]], bool],
    peer: bool = True,
    budget_s: float = 900.0,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Greedily the smallest variant that still `fails`: take the first smaller
    candidate that fails and start over from it, until none does (or time is up).
    A candidate must run on the evaluator (onnxruntime for a `peer` graph): a smaller
    input can make a constant index or window invalid, which is no repro of anything."""
    deadline = time.monotonic() + budget_s
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        i = 0
        while time.monotonic() < deadline:
            found = candidates(model, feeds, peer)
            if i >= len(found):
                break
            built = found[i]()
            if (
                built is not None
                and size_of(*built) < size_of(model, feeds)
                and model_values(*built, peer)
                and fails(*built)
            ):
                model, feeds = built
                changed = True
            else:
                i += 1
    return model, feeds


def save(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.onnx"
    onnx.save(model, path)
    np.savez(out / f"{name}_inputs.npz", **{k: np.asarray(v) for k, v in feeds.items()})
    return path


# --------------------------------------------------------------------------- the run


KINDS = ("mismatch", "internal", "unsupported", "generator", "crash", "hang")


@dataclass
class Summary:
    """What a run found: counts per outcome kind, op use, and the failures."""

    graphs: int = 0
    counts: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    failures: list[Verdict] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.counts[k] for k in KINDS)

    def table(self) -> str:
        head = f"{self.graphs} graphs in {self.seconds:.0f} s: " + ", ".join(
            f"{self.counts[k]} {k}" for k in ("ok", *KINDS)
        )
        ops = "  ".join(f"{op} {n}" for op, n in sorted(self.ops.items()))
        return f"{head}\nops used ({len(self.ops)} types): {ops}"


def batches(seed: int, indices: Iterable[int], size: int) -> Iterator[tuple[int, ...]]:
    """The indices grouped by opset (a batch is one model, of one opset), `size` a group."""
    pending: dict[int, list[int]] = {}
    for i in indices:
        group = pending.setdefault(opset_of(seed, i), [])
        group.append(i)
        if len(group) == size:
            yield tuple(group)
            group.clear()
    for group in pending.values():
        if group:
            yield tuple(group)


def fuzz(
    seed: int,
    graphs: int,
    jobs: int = 1,
    batch: int = 8,
    start: int = 0,
    out: Path | None = None,
    shrink_max: int = 8,
    report: Callable[[str], None] = lambda line: None,
) -> Summary:
    """Check graphs start..start+graphs of `seed`. Failures are re-run alone; with
    `out`, the first of each kind of failure (at most shrink_max) is shrunk and saved there."""
    began = time.monotonic()
    summary = Summary()
    queue: deque[Task] = deque(
        (check_batch, (seed, b)) for b in batches(seed, range(start, start + graphs), batch)
    )
    retrials: dict[int, Retrial] = {}
    workers = Workers(jobs)
    last = began
    try:
        for task, result in workers.run(queue):
            for verdict in _settle(task, result, queue, retrials):
                summary.graphs += 1
                summary.counts[verdict.outcome.kind] += 1
                summary.ops.update(verdict.ops)
                if verdict.outcome.failed:
                    summary.failures.append(verdict)
                    report(
                        f"graph {verdict.index}: {verdict.outcome.kind} [{verdict.outcome.where}] "
                        f"{verdict.outcome.detail[:500]}"
                    )
            if time.monotonic() - last > 15:
                last = time.monotonic()
                rate = summary.graphs / (last - began)
                report(
                    f"[{last - began:.0f} s] {summary.graphs}/{graphs} graphs, {summary.failed} failed, "
                    f"{rate:.2f} graphs/s"
                )
        if out is not None:
            summary.saved = _shrink_failures(summary.failures, workers, out, shrink_max, report)
    finally:
        workers.close()
    summary.seconds = time.monotonic() - began
    return summary


@dataclass
class Retrial:
    """A failed batch whose suspects run again alone."""

    seed: int
    indices: tuple[int, ...]
    outcome: Outcome  # the batch's
    left: set[int]
    passed: list[Verdict] = field(default_factory=list)
    reproduced: bool = False


def _settle(task: Task, result: object, queue: deque[Task], retrials: dict[int, Retrial]) -> list[Verdict]:
    """The graphs a finished task decides. A failed batch's suspects go back in the queue
    to run alone; one that passes alone but disagreed in the batch, or a batch error no
    graph shows alone, is a failure of the batch (its union is what shows it)."""
    fn, args = task
    if fn is check_batch:
        seed, indices = args
        if isinstance(result, Exception):  # which graph did it is unknown: each alone
            verdicts = [Verdict(seed, i, as_outcome(result), suspect=True) for i in indices]
        else:
            verdicts = result  # type: ignore[assignment]
        suspects = [v for v in verdicts if v.suspect]
        if suspects:
            retrial = Retrial(seed, indices, suspects[0].outcome, {v.index for v in suspects})
            for v in suspects:
                retrials[v.index] = retrial
                queue.append((check_alone, (seed, v.index)))
        return [v for v in verdicts if not v.suspect]
    seed, index = args
    retrial = retrials.pop(index)
    retrial.left.discard(index)
    verdict = Verdict(seed, index, as_outcome(result)) if isinstance(result, Exception) else result
    assert isinstance(verdict, Verdict)
    if verdict.outcome.failed:
        retrial.reproduced = True
        decided = [verdict]
    elif retrial.outcome.kind == "mismatch":  # its own outputs disagreed in the batch
        decided = [_batch_failure(retrial, verdict)]
    else:
        retrial.passed.append(verdict)
        decided = []
    if not retrial.left and retrial.passed:
        if not retrial.reproduced:
            retrial.passed[0] = _batch_failure(retrial, retrial.passed[0])
        decided += retrial.passed
    return decided


def _batch_failure(retrial: Retrial, alone: Verdict) -> Verdict:
    """A failure only the batch shows (a plan sharing the arena between graphs, say)."""
    peer = retrial.outcome.where.startswith("onnxruntime")
    model, feeds = batch_case(retrial.seed, retrial.indices, peer)
    return Verdict(
        alone.seed, alone.index, retrial.outcome, alone.ops, model.SerializeToString(), feeds, peer
    )


def _shrink_failures(
    failures: list[Verdict], workers: Workers, out: Path, limit: int, report: Callable[[str], None]
) -> list[Path]:
    """Shrink and save the first failure of each signature (kind and where)."""
    saved, seen = [], set()
    for v in failures:
        sig = v.outcome.signature
        if sig in seen or len(saved) >= limit or not v.model or v.outcome.kind == "generator":
            continue
        seen.add(sig)
        model = onnx.ModelProto()
        model.ParseFromString(v.model)

        def fails(m: onnx.ModelProto, f: dict[str, np.ndarray], sig=sig, peer=v.peer) -> bool:
            task: Task = (check_model_bytes, (m.SerializeToString(), f, peer))
            _, result = next(iter(workers.run(deque([task]))))
            return as_outcome(result).signature == sig

        nodes = size_of(model, v.feeds)[0]
        report(f"shrinking graph {v.index} ({v.outcome.kind}, {v.outcome.where}): {nodes} nodes")
        small, feeds = shrink(model, v.feeds, fails, v.peer)
        path = save(small, feeds, f"fuzz_{v.seed}_{v.index}", out)
        report(
            f"  -> {len(small.graph.node)} nodes ({', '.join(n.op_type for n in small.graph.node)}): {path}"
        )
        saved.append(path)
    return saved


def describe(model: onnx.ModelProto) -> str:
    """The graph in a few lines: inputs, nodes, outputs."""
    g = model.graph
    shapes = lambda vis: ", ".join(  # noqa: E731
        f"{v.name}: {[d.dim_value for d in v.type.tensor_type.shape.dim]}" for v in vis
    )
    lines = [f"opset {model.opset_import[0].version}; inputs {shapes(g.input)}"]
    for n in g.node:
        attrs = {a.name: oh.get_attribute_value(a) for a in n.attribute}
        text = {
            k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in attrs.items()
            if not isinstance(v, onnx.TensorProto)
        }
        lines.append(f"  {', '.join(n.output)} = {n.op_type}({', '.join(n.input)}) {text or ''}")
    lines.append(f"outputs {[o.name for o in g.output]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=1000, help="how many graphs (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first graph")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (0: run in this process)")
    parser.add_argument("--batch", type=int, default=8, help="graphs compiled together as one model")
    parser.add_argument("--only", type=int, help="check graph ONLY of the seed alone and print it")
    parser.add_argument("--out", type=Path, default=REGRESSIONS, help="where shrunk failures are saved")
    parser.add_argument(
        "--no-save", dest="save", action="store_false", help="do not shrink and save failures"
    )
    parser.add_argument("--shrink-max", type=int, default=8, help="failures to shrink and save, at most")
    args = parser.parse_args(argv)
    os.environ.setdefault("KILN_CHECKS", "1")  # every compile verifies each pass and replays its memory plan
    if args.only is not None:
        verdict = check_alone(args.seed, args.only)
        if verdict.model:
            model = onnx.ModelProto()
            model.ParseFromString(verdict.model)
            print(describe(model))
        print(f"{verdict.outcome.kind} [{verdict.outcome.where}] {verdict.outcome.detail}")
        return int(verdict.outcome.failed)
    print(
        f"seed {args.seed}: graphs {args.start}..{args.start + args.graphs - 1}, compiled in batches of "
        f"{args.batch}, {args.jobs} worker(s), onnxruntime {'on' if onnxruntime_session else 'absent'}",
        flush=True,
    )
    summary = fuzz(
        args.seed,
        args.graphs,
        args.jobs,
        args.batch,
        args.start,
        args.out if args.save else None,
        args.shrink_max,
        report=lambda line: print(line, flush=True),
    )
    print(summary.table())
    for v in summary.failures:
        print(
            f"  graph {v.index}: {v.outcome.kind} [{v.outcome.where}]  "
            f"(python tests/fuzz_onnx.py --seed {v.seed} --only {v.index})"
        )
    for path in summary.saved:
        print(f"  saved {path}")
    return int(summary.failed > 0)


if __name__ == "__main__":
    sys.exit(main())
