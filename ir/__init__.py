"""Kiln's graph IR: typed SSA values, the op registry, the verifier, the printer and
the reference interpreter (the oracle of every test)."""

from ir.builder import GraphBuilder
from ir.graph import Graph, Node, Value
from ir.interpreter import interpret
from ir.types import TensorType

__all__ = ["Graph", "GraphBuilder", "Node", "TensorType", "Value", "interpret"]
