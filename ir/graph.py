"""The graph IR: typed SSA values, nodes that apply a registered op, and graphs.

A Graph owns its inputs, outputs, nodes (in a valid execution order) and params:
named constant tensors (weights) that behave as values with known contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ir.types import TensorType

if TYPE_CHECKING:
    from ir.ops import Op


class Value:
    """One SSA value. Identity is the object; the name is for people and the ABI."""

    __slots__ = ("name", "type")

    def __init__(self, name: str, type: TensorType):
        self.name = name
        self.type = type

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op", "inputs", "outputs", "name")

    def __init__(self, op: Op, inputs: list[Value], outputs: list[Value], name: str):
        self.op = op
        self.inputs = inputs
        self.outputs = outputs
        self.name = name

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op.name})"


class Graph:
    def __init__(
        self,
        inputs: list[Value],
        outputs: list[Value],
        nodes: list[Node],
        params: dict[Value, np.ndarray] | None = None,
        name: str = "model",
    ):
        self.inputs = inputs
        self.outputs = outputs
        self.nodes = nodes
        self.params: dict[Value, np.ndarray] = params or {}
        self.name = name

    def values(self) -> Iterator[Value]:
        """Every value once: inputs, params, then node outputs in order."""
        yield from self.inputs
        yield from self.params
        for node in self.nodes:
            yield from node.outputs

    def producers(self) -> dict[Value, Node]:
        return {v: n for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[Value, list[Node]]:
        users: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for node in self.nodes:
            for v in node.inputs:
                users[v].append(node)
        return users

    def __str__(self) -> str:
        from ir.printer import print_graph

        return print_graph(self)
