"""GraphBuilder: write graphs in a few lines, with types inferred as you go.

b = GraphBuilder("mlp")
x = b.input("x", (4, 8))
y = b.relu(b.linear(x, b.param("w", w), b.param("b", bias)))
graph = b.build(y)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from ir.errors import GraphError
from ir.graph import Graph, Node, Value
from ir.ops import REGISTRY, make_op
from ir.types import TensorType, dtype_name
from ir.verify import verify


class GraphBuilder:
    def __init__(self, name: str = "model"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[Value, np.ndarray] = {}
        self.nodes: list[Node] = []
        self._names: set[str] = set()
        self._ids = itertools.count()

    def _fresh(self, hint: str) -> str:
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._ids)}"
        self._names.add(name)
        return name

    def input(self, name: str, shape: tuple[int, ...], dtype: str = "float32") -> Value:
        if name in self._names:
            raise GraphError(f"duplicate name {name!r}")
        v = Value(self._fresh(name), TensorType(dtype, tuple(shape)))
        self.inputs.append(v)
        return v

    def param(self, name: str, array: np.ndarray) -> Value:
        array = np.asarray(array, order="C")  # not ascontiguousarray: that makes 0-d arrays 1-d
        v = Value(self._fresh(name), TensorType(dtype_name(array.dtype), array.shape))
        self.params[v] = array
        return v

    def op(self, op_name: str, *inputs: Value, name: str | None = None, **attrs) -> Value:
        op = make_op(op_name, **attrs)
        node_name = self._fresh(name or op_name)
        lo, hi = op.arity
        if not lo <= len(inputs) <= hi:
            raise GraphError(f"node {node_name} ({op_name}): takes {lo}..{hi} inputs, got {len(inputs)}")
        try:
            out_type = op.infer(*(v.type for v in inputs))
        except GraphError as e:
            raise GraphError(f"node {node_name}: {e}") from None
        out = Value(node_name, out_type)
        self.nodes.append(Node(op, list(inputs), [out], node_name))
        return out

    def __getattr__(self, op_name: str) -> Callable[..., Value]:
        if op_name in REGISTRY:
            return lambda *inputs, **attrs: self.op(op_name, *inputs, **attrs)
        raise AttributeError(op_name)

    def rename(self, value: Value, name: str) -> Value:
        """Give a value the name people and the C ABI will know it by (a model output's)."""
        self._names.discard(value.name)
        value.name = self._fresh(name)
        return value

    def build(self, *outputs: Value) -> Graph:
        graph = Graph(list(self.inputs), list(outputs), list(self.nodes), dict(self.params), self.name)
        verify(graph)
        return graph
