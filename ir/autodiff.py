"""Reverse-mode automatic differentiation on the graph IR: the reverse sweep.

`gradients(b, loss, wrt)` appends to the GraphBuilder `b` the nodes that compute
d loss / d v for each v in `wrt`, and returns those values. What each op contributes
is declared on its class (ir.ops): its `gradient` rule, written with ordinary graph
ops, or a decomposition into simpler ops (which replaces the op in the graph being
differentiated, so its forward pass runs once, and the sweep goes back through it),
or that nothing flows back through it; so the backward pass is fused, memory-planned
and compiled like any graph. An op with no rule on the path from `wrt` to the loss
is an error naming the node.
"""

from __future__ import annotations

import numpy as np

from ir.builder import GraphBuilder
from ir.errors import GraphError
from ir.graph import Node, Value
from ir.ops import Gradient, Grads, make_op, normalize_axis


def _pullback(b: GraphBuilder, nodes: list[Node], seeds: dict[Value, Value], wrt: list[Value]) -> Grads:
    """Σ seed · d value / d v for each v in wrt, through `nodes` only (None where no path)."""
    needed: set[Value] = set(wrt)
    on_path = []
    for node in nodes:
        if any(v in needed for v in node.inputs):
            needed.add(node.outputs[0])
            on_path.append(node)
    parts: dict[Value, list[Value]] = {v: [g] for v, g in seeds.items()}
    pads: dict[Value, Node] = {}  # the zero pads the rules made (a slice's gradient), by value
    for node in reversed(on_path):
        out = node.outputs[0]
        if out not in parts:
            continue
        if node.op.differentiation is Gradient.DECOMPOSE:
            raise GraphError(f"node {node.name} ({node.op.name}): its decomposition was not expanded")
        start = len(b.nodes)
        input_grads = node.op.gradient(b, node, _total(b, parts[out], pads))
        pads |= {n.outputs[0]: n for n in b.nodes[start:] if _zero_pad_axis(n) is not None}
        for v, gv in zip(node.inputs, input_grads):
            if gv is not None and v in needed:
                parts.setdefault(v, []).append(gv)
    return [_total(b, parts[v], pads) if v in parts else None for v in wrt]


def _zero_pad_axis(node: Node) -> int | None:
    """The one axis a zero pad widens (a slice's gradient), else None."""
    op = node.op
    if op.name != "pad" or op.mode != "constant" or op.value != 0 or min(op.pads, default=0) < 0:
        return None
    rank = len(op.pads) // 2
    axes = [a for a in range(rank) if op.pads[a] or op.pads[rank + a]]
    return axes[0] if len(axes) == 1 else None


def _total(b: GraphBuilder, parts: list[Value], pads: dict[Value, Node]) -> Value:
    """The sum of a value's gradient parts. Parts that are zero pads of disjoint windows
    along one axis (the gradients of slices that split the value: a recurrence's gates
    and steps) are joined by one concat of what they pad, zeros between, instead of
    summing full-size pads."""
    if len(parts) == 1:
        return parts[0]
    by_axis: dict[int, list[tuple[int, Value]]] = {}
    for p in parts:
        if p in pads:
            axis = _zero_pad_axis(pads[p])
            by_axis.setdefault(axis, []).append((pads[p].op.pads[axis], p))  # type: ignore[index]
    axis, windows = max(by_axis.items(), key=lambda kv: len(kv[1]), default=(0, []))
    windows.sort(key=lambda w: w[0])
    shape = parts[0].type.shape
    inner = [pads[p].inputs[0] for _, p in windows]
    ends = [begin + v.type.shape[axis] for (begin, _), v in zip(windows, inner)]
    if len(windows) < 2 or any(e > next_begin for e, (next_begin, _) in zip(ends, windows[1:])):
        total = parts[0]
        for p in parts[1:]:
            total = b.add(total, p)
        return total
    pieces, at = [], 0
    for (begin, _), v, end in zip(windows, inner, ends):
        if begin > at:
            pieces.append(_zeros(b, shape, axis, begin - at, v))
        pieces.append(v)
        at = end
    if at < shape[axis]:
        pieces.append(_zeros(b, shape, axis, shape[axis] - at, inner[0]))
    total = b.concat(*pieces, axis=axis)
    for p in parts:
        if p not in {w for _, w in windows}:
            total = b.add(total, p)
    return total


def _zeros(b: GraphBuilder, shape: tuple[int, ...], axis: int, length: int, like: Value) -> Value:
    """Zeros of `shape` but `length` along `axis`, in like's dtype."""
    block = tuple(length if a == axis else d for a, d in enumerate(shape))
    return b.param("zeros", np.zeros(block, like.type.np_dtype))


def _expand_decompositions(b: GraphBuilder, wrt: list[Value]) -> None:
    """Replace each DECOMPOSE node that a gradient must go back through by its
    decomposition, in place: the decomposition's last node computes the op's own output
    value, so every reader, and the forward pass, now use it, and the forward runs once
    (the reverse sweep then goes back through ordinary ops)."""
    needed: set[Value] = set(wrt)
    i = 0
    while i < len(b.nodes):
        node = b.nodes[i]
        if not any(v in needed for v in node.inputs):
            i += 1
            continue
        if node.op.differentiation is Gradient.DECOMPOSE:
            start = len(b.nodes)
            out = node.op.decompose(b, list(node.inputs))
            expansion = b.nodes[start:]
            del b.nodes[start:]
            if out.type != node.outputs[0].type:
                raise GraphError(f"node {node.name} ({node.op.name}): its decomposition gives {out.type}")
            last = next((n for n in expansion if n.outputs[0] is out), None)
            if last is None:
                raise GraphError(f"node {node.name} ({node.op.name}): its decomposition adds no node")
            last.outputs[0] = node.outputs[0]
            b.nodes[i : i + 1] = expansion
            continue  # the expansion's nodes are visited next
        needed.add(node.outputs[0])
        i += 1


def _slice_through_concats(nodes: list[Node]) -> None:
    """A slice that reads within one input of a concat reads that input instead (its
    range moved along the concat's axis). An unrolled recurrence stacks every step's
    state into its output; a reader that takes one step's state then depends on that
    step alone, not on the whole stack, so the gradient flows to that step directly
    instead of through a slice of every other step, all zeros."""
    producer = {v: n for n in nodes for v in n.outputs}
    for node in nodes:
        while node.op.name == "slice" and (src := producer.get(node.inputs[0])) and src.op.name == "concat":
            shape = node.inputs[0].type.shape
            ranges = node.op.ranges(shape)
            axis = normalize_axis("concat", src.op.axis, len(shape))
            start, _, count = ranges[axis]
            if count == 0 or any(step < 0 for _, step, _ in ranges):
                break
            offset = 0
            for part in src.inputs:
                if offset <= start and start + ranges[axis][1] * (count - 1) < offset + part.type.shape[axis]:
                    break
                offset += part.type.shape[axis]
            else:
                break  # it reads across inputs
            ranges[axis] = (start - offset, ranges[axis][1], count)
            node.op = make_op(
                "slice",
                starts=tuple(s for s, _, _ in ranges),
                ends=tuple(s + step * (n - 1) + 1 for s, step, n in ranges),
                axes=tuple(range(len(shape))),
                steps=tuple(step for _, step, _ in ranges),
            )
            node.inputs[0] = part


def gradients(b: GraphBuilder, loss: Value, wrt: list[Value], unreached: str = "zeros") -> list[Value | None]:
    """d loss / d v for each v in wrt; where the loss does not depend on v, zeros, or
    None with unreached="none" (a trainer then leaves v alone)."""
    if loss.type.numel != 1:
        raise GraphError(f"gradients: the loss must be a scalar, got {loss.type}")
    _expand_decompositions(b, wrt)
    _slice_through_concats(b.nodes)
    one = b.param("one", np.ones(loss.type.shape, loss.type.np_dtype))
    grads = dict(zip(wrt, _pullback(b, list(b.nodes), {loss: one}, wrt)))
    if unreached == "none":
        return [grads[v] for v in wrt]
    return [
        grads[v] if grads[v] is not None else b.param("zero", np.zeros(v.type.shape, v.type.np_dtype))
        for v in wrt
    ]
