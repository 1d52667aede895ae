"""The ONNX importer: a ModelProto becomes a Graph of Kiln ops.

Initializers become params. Inputs that ONNX computes from constants (a Reshape's
shape, a Clip's bounds, a Pad's pads) must be constant here and become attributes.
Every node is checked against the converter table before any is converted, so an
unsupported model fails with one error that lists every node Kiln cannot take.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from frontends.onnx.context import (
    ONNX_DTYPES,
    Context,
    OnnxImportError,
    SymbolicDimension,
    UnsupportedOnnxError,
    attributes,
    node_label,
)
from frontends.onnx.expand import expand_functions
from frontends.onnx.ops import CONVERTERS
from ir.builder import GraphBuilder
from ir.errors import GraphError
from ir.graph import Graph, Value
from ir.types import DTYPES


def load_model(model: str | os.PathLike | onnx.ModelProto | bytes) -> onnx.ModelProto:
    """Read and check a model; every way it can be broken becomes an OnnxImportError."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        data = model if isinstance(model, bytes) else None
        path = None if data is not None else Path(model)  # type: ignore[arg-type]
        if path is not None:
            if not path.is_file():
                raise OnnxImportError(f"{path}: no such file")
            data = path.read_bytes()
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError and friends
            raise OnnxImportError(
                f"{path or 'model'}: not a valid ONNX file (truncated or not ONNX): {e}"
            ) from None
        if not proto.graph.node and not proto.graph.output:
            raise OnnxImportError(f"{path or 'model'}: not an ONNX model (no graph in it)")
        if path is not None:
            try:
                onnx.load_external_data_for_model(proto, str(path.parent))
            except Exception as e:  # OSError, or onnx's ValidationError for a path it rejects
                detail = " ".join(str(e).split())
                raise OnnxImportError(f"{path}: external data file missing or unreadable: {detail}") from None
    _check_defined(proto.graph, proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise OnnxImportError(f"invalid ONNX model: {' '.join(str(e).split())}") from None
    return proto


def _check_defined(g: onnx.GraphProto, proto: onnx.ModelProto) -> None:
    """Every value a node reads must be defined before it: a missing initializer is the
    usual cause, and onnx's checker names it less clearly."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    defined = {vi.name for vi in g.input} | {t.name for t in g.initializer} | {""}
    for node in g.node:
        for pos, name in enumerate(node.input):
            if name not in defined:
                raise OnnxImportError(
                    f"{node_label(node, opset)}: input {pos} {name!r} is not an initializer, a model "
                    "input or an earlier node's output (a missing initializer?)"
                )
        defined.update(node.output)


def _tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type not in ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise UnsupportedOnnxError(
            f"initializer {t.name!r} has dtype {name}; Kiln supports {', '.join(DTYPES)}"
        )
    if t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data:
        raise OnnxImportError(f"initializer {t.name!r}: its external data was not loaded")
    return np.asarray(numpy_helper.to_array(t), order="C")  # keeps 0-d (ascontiguousarray would not)


def _input_shape(
    vi: onnx.ValueInfoProto, bindings: dict[str, tuple[int, ...]]
) -> tuple[str, tuple[int, ...]]:
    tt = vi.type.tensor_type
    if tt.elem_type not in ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(tt.elem_type)
        raise UnsupportedOnnxError(f"input {vi.name!r} has dtype {name}; Kiln supports {', '.join(DTYPES)}")
    dtype = ONNX_DTYPES[tt.elem_type]
    if vi.name in bindings:
        return dtype, tuple(int(d) for d in bindings[vi.name])
    if not tt.HasField("shape"):
        raise OnnxImportError(f"input {vi.name!r} has no shape; bind one with --input-shape {vi.name}=...")
    shape = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value)
        else:
            label = d.dim_param or "?"
            template = "x".join(
                str(x.dim_value) if x.HasField("dim_value") and x.dim_value > 0 else "N" for x in tt.shape.dim
            )
            fix = f"--fix-dim {d.dim_param}=SIZE or " if d.dim_param else ""
            raise SymbolicDimension(
                f"input {vi.name!r}: dimension {i} is symbolic ({label!r}); bind it with "
                f"{fix}--input-shape {vi.name}={template} (or input_shapes= in Python)",
                vi.name,
            )
    return dtype, tuple(shape)


#: results of constant nodes larger than this stay nodes (compile-time folding takes them)
IMPORT_FOLD_MAX_ELEMENTS = 1 << 16


def _fold(b: GraphBuilder, first: int) -> dict[Value, np.ndarray] | None:
    """Evaluate the nodes added since `first` (all their inputs constant) and drop them,
    so a Shape → Gather → Concat → Reshape chain gives Reshape a constant shape."""
    new = b.nodes[first:]
    if any(n.outputs[0].type.numel > IMPORT_FOLD_MAX_ELEMENTS for n in new):
        return None
    env: dict[Value, np.ndarray] = {}
    for n in new:
        args = [env[v] if v in env else b.params[v] for v in n.inputs]
        out = n.outputs[0]
        env[out] = np.asarray(n.op.reference(*args), dtype=out.type.np_dtype).reshape(out.type.shape)
    del b.nodes[first:]
    return env


def _constant_input(vi: onnx.ValueInfoProto, value: object) -> np.ndarray:
    """A model input whose value the caller fixes at compile time (a Reshape's shape or
    a ReduceSum's axes fed as an input): it becomes a constant of the input's dtype."""
    dtype, _ = _input_shape(vi, {vi.name: np.shape(value)})
    array = np.asarray(value)
    if array.dtype != np.dtype(dtype) and not np.can_cast(array.dtype, dtype, "same_kind"):
        raise OnnxImportError(f"constant input {vi.name!r}: expected {dtype}, got {array.dtype}")
    return np.asarray(array, dtype=dtype, order="C")


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto | bytes,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    constant_inputs: dict[str, object] | None = None,
) -> Graph:
    """`input_shapes` binds symbolic dimensions; `constant_inputs` fixes the values of
    model inputs that Kiln needs at compile time (shapes, axes, pads, ...): the compiled
    model no longer takes them."""
    proto = expand_functions(load_model(model), lambda op: op in CONVERTERS)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    g = proto.graph
    unsupported = [n for n in g.node if n.domain not in ("", "ai.onnx") or n.op_type not in CONVERTERS]
    if unsupported:
        listing = "; ".join(
            node_label(n, opset) + (f" in domain {n.domain}" if n.domain else "") for n in unsupported
        )
        raise UnsupportedOnnxError(f"{len(unsupported)} unsupported node(s): {listing}")
    bindings = dict(input_shapes or {})
    b = GraphBuilder(g.name or "model")
    ctx = Context(b, opset)
    ctx.used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for t in g.initializer:
        ctx.constants[t.name] = _tensor_to_array(t)
    graph_inputs = [vi for vi in g.input if vi.name not in ctx.constants]
    fixed = dict(constant_inputs or {})
    for what, names in (("input shape", bindings), ("constant value", fixed)):
        unknown = set(names) - {vi.name for vi in graph_inputs}
        if unknown:
            raise OnnxImportError(
                f"{what} given for unknown input(s) {sorted(unknown)}; "
                f"inputs are {[vi.name for vi in graph_inputs]}"
            )
    for vi in graph_inputs:
        if vi.name in fixed:
            ctx.constants[vi.name] = _constant_input(vi, fixed[vi.name])
    graph_inputs = [vi for vi in graph_inputs if vi.name not in fixed]
    ctx.graph_inputs = {vi.name for vi in graph_inputs}
    for vi in graph_inputs:
        dtype, shape = _input_shape(vi, bindings)
        ctx.values[vi.name] = b.input(vi.name, shape, dtype)
        ctx.sources[vi.name] = (vi.name,)
    for node in g.node:
        convert = CONVERTERS[node.op_type]
        first_new = len(b.nodes)
        try:
            outs = convert(ctx, node, attributes(node))
        except GraphError as e:
            raise OnnxImportError(f"{node_label(node, opset)}: {e}") from None
        if isinstance(outs, np.ndarray):
            ctx.constants[node.output[0]] = outs
            continue
        if all(i in ctx.constants for i in node.input if i):
            folded = _fold(b, first_new)  # shape arithmetic and the like: known now
            if folded is not None:
                for name, v in zip(node.output, outs):
                    ctx.constants[name] = folded.get(v, b.params.get(v))
                continue
        sources = tuple(dict.fromkeys(s for i in node.input if i for s in ctx.sources.get(i, ())))
        for name, v in zip(node.output, outs):
            if name:
                ctx.values[name] = v
                ctx.sources[name] = sources
    outputs = [ctx.value(o.name) for o in g.output]
    return b.build(*outputs)
