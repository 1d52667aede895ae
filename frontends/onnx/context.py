"""What the importer and every converter share: the import Context, the error types,
the attribute helpers, and the converter table with its `converter` decorator.

This module imports no other module of the ONNX frontend, so the converters (which
fill the table) and the importer (which reads it) both depend on it, and never on
each other.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from ir.builder import GraphBuilder
from ir.errors import KilnError, UnsupportedError
from ir.graph import Value

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


class OnnxImportError(KilnError, ValueError):
    """The ONNX file is unreadable, malformed, or asks for something Kiln lacks."""


class UnsupportedOnnxError(OnnxImportError, UnsupportedError):
    pass


class SymbolicDimension(OnnxImportError):
    """A model input has a dimension named, not numbered, and no shape was bound to it."""

    def __init__(self, message: str, input_name: str):
        super().__init__(message)
        self.input_name = input_name


class ConstantInputNeeded(UnsupportedOnnxError):
    """A model input feeds a slot Kiln needs at compile time (a shape, axes, pads)."""

    def __init__(self, message: str, input_name: str):
        super().__init__(message)
        self.input_name = input_name


def node_label(node: onnx.NodeProto, opset: int) -> str:
    """How errors name a node: its name, op type and the model's opset."""
    return f"node {node.name or '(unnamed)'} ({node.op_type}, opset {opset})"


class Context:
    """Import state: the builder, ONNX value names → Kiln values, and known constants."""

    def __init__(self, builder: GraphBuilder, opset: int):
        self.b = builder
        self.opset = opset
        self.values: dict[str, Value] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.used: set[str] = set()  # every name some node or the graph's outputs read
        self.graph_inputs: set[str] = set()
        #: each run-time value's model inputs whose values it is computed from (a
        #: Shape of an input is known at compile time, so it depends on none)
        self.sources: dict[str, tuple[str, ...]] = {}

    def value(self, name: str) -> Value:
        if name not in self.values:
            if name in self.constants:
                self.values[name] = self.b.param(name or "const", self.constants[name])
            else:
                raise OnnxImportError(f"value {name!r} is used but never defined")
        return self.values[name]

    def constant(self, node: onnx.NodeProto, pos: int, what: str) -> np.ndarray | None:
        """Input `pos` of node as a numpy array; it must be a constant. None if absent."""
        if pos >= len(node.input) or not node.input[pos]:
            return None
        name = node.input[pos]
        if name not in self.constants:
            message = (
                f"{node_label(node, self.opset)}: input {pos} ({what}) must be a constant, "
                f"but {name!r} is computed at run time"
            )
            if name in self.graph_inputs:
                raise ConstantInputNeeded(
                    f"{message} (it is a model input: fix its value with constant_inputs={{{name!r}: ...}})",
                    name,
                )
            source = next(iter(self.sources.get(name, ())), None)
            if source is not None:  # fixing that input makes it a constant, folded at import
                raise ConstantInputNeeded(
                    f"{message} from model input {source!r}: "
                    f"fix its value with constant_inputs={{{source!r}: ...}}",
                    source,
                )
            raise UnsupportedOnnxError(message)
        return self.constants[name]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def ints(v: object) -> tuple[int, ...]:
    return tuple(int(x) for x in v)  # type: ignore[union-attr]


def text(attrs: dict, name: str, default: str) -> str:
    """A string attribute (onnx gives its value as bytes)."""
    v = attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def node_inputs(ctx: Context, node: onnx.NodeProto) -> list[Value]:
    """The node's inputs that are present (an optional input left out is an empty name)."""
    return [ctx.value(n) for n in node.input if n]


def emit(ctx: Context, node: onnx.NodeProto, op: str, *args: Value, **attrs) -> Value:
    """One Kiln op named after the node's first output."""
    return ctx.b.op(op, *args, name=node.output[0], **attrs)


#: (context, node, attributes) → the node's output values in order, or a numpy array
#: when the node is a constant, which the importer keeps as a known value
Converter = Callable[[Context, onnx.NodeProto, dict], "list[Value] | np.ndarray"]

#: ONNX op type → its converter; the modules of frontends.onnx.ops fill it
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of these ONNX op types."""

    def wrap(fn: Converter) -> Converter:
        for t in op_types:
            CONVERTERS[t] = fn
        return fn

    return wrap
