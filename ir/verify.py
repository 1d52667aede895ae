"""The verifier: a graph is well formed when every value is defined once, before
its uses, and every node's output types are what its op infers from its inputs."""

from __future__ import annotations

from ir.errors import GraphError
from ir.graph import Graph


def verify(graph: Graph) -> None:
    defined: set[int] = set()
    names: set[str] = set()

    def define(value, where: str) -> None:
        if id(value) in defined:
            raise GraphError(f"{where}: value %{value.name} defined twice")
        if value.name in names:
            raise GraphError(f"{where}: name %{value.name} used by two values")
        defined.add(id(value))
        names.add(value.name)

    for v in graph.inputs:
        define(v, "graph input")
    for v, array in graph.params.items():
        define(v, "param")
        if tuple(array.shape) != v.type.shape or array.dtype != v.type.np_dtype:
            raise GraphError(f"param %{v.name}: array is {array.dtype}{array.shape}, type says {v.type}")
    for node in graph.nodes:
        where = f"node {node.name} ({node.op.name})"
        for pos, v in enumerate(node.inputs):
            if id(v) not in defined:
                raise GraphError(f"{where}: input {pos} %{v.name} is used before it is defined")
        lo, hi = node.op.arity
        if not lo <= len(node.inputs) <= hi:
            raise GraphError(f"{where}: takes {lo}..{hi} inputs, got {len(node.inputs)}")
        try:
            expected = node.op.infer(*(v.type for v in node.inputs))
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        if len(node.outputs) != 1 or node.outputs[0].type != expected:
            got = ", ".join(str(v.type) for v in node.outputs)
            raise GraphError(f"{where}: output type {got}, op infers {expected}")
        for v in node.outputs:
            define(v, where)
    for v in graph.outputs:
        if id(v) not in defined:
            raise GraphError(f"graph output %{v.name} is not defined")
