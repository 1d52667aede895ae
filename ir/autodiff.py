"""Reverse-mode automatic differentiation on the graph IR: the reverse sweep.

`gradients(b, loss, wrt)` appends to the GraphBuilder `b` the nodes that compute
d loss / d v for each v in `wrt`, and returns those values. What each op contributes
is declared on its class (ir.ops): its `gradient` rule, written with ordinary graph
ops, or a decomposition into simpler ops to go back through, or that nothing flows
back through it; so the backward pass is fused, memory-planned and compiled like any
graph. An op with no rule on the path from `wrt` to the loss is an error naming the
node.
"""

from __future__ import annotations

import numpy as np

from ir.builder import GraphBuilder
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Gradient, Grads


def _pullback(b: GraphBuilder, nodes: list[Node], seeds: dict[Value, Value], wrt: list[Value]) -> Grads:
    """Σ seed · d value / d v for each v in wrt, through `nodes` only (None where no path)."""
    needed: set[Value] = set(wrt)
    on_path = []
    for node in nodes:
        if any(v in needed for v in node.inputs):
            needed.add(node.outputs[0])
            on_path.append(node)
    grads = dict(seeds)
    for node in reversed(on_path):
        out = node.outputs[0]
        if out not in grads:
            continue
        for v, gv in zip(node.inputs, _node_gradient(b, node, grads[out])):
            if gv is None or v not in needed:
                continue
            grads[v] = b.add(grads[v], gv) if v in grads else gv
    return [grads.get(v) for v in wrt]


def _node_gradient(b: GraphBuilder, node: Node, g: Value) -> Grads:
    """The gradient of each of node's inputs, given g, its output's."""
    if node.op.differentiation is Gradient.DECOMPOSE:
        start = len(b.nodes)
        out = node.op.decompose(b, list(node.inputs))
        return _pullback(b, b.nodes[start:], {out: g}, list(node.inputs))
    return node.op.gradient(b, node, g)


def gradients(b: GraphBuilder, loss: Value, wrt: list[Value], unreached: str = "zeros") -> list[Value | None]:
    """d loss / d v for each v in wrt; where the loss does not depend on v, zeros, or
    None with unreached="none" (a trainer then leaves v alone)."""
    if loss.type.numel != 1:
        raise GraphError(f"gradients: the loss must be a scalar, got {loss.type}")
    one = b.param("one", np.ones(loss.type.shape, loss.type.np_dtype))
    grads = dict(zip(wrt, _pullback(b, list(b.nodes), {loss: one}, wrt)))
    if unreached == "none":
        return [grads[v] for v in wrt]
    return [
        grads[v] if grads[v] is not None else b.param("zero", np.zeros(v.type.shape, v.type.np_dtype))
        for v in wrt
    ]
