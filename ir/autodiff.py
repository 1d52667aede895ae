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

#: where a zero pad a gradient rule made (a slice's gradient) places its input:
#: (axis, begin, the input), by the pad's value
Windows = dict[Value, tuple[int, int, Value]]


def _pullback(b: GraphBuilder, nodes: list[Node], seeds: dict[Value, Value], wrt: list[Value]) -> Grads:
    """Σ seed · d value / d v for each v in wrt, through `nodes` only (None where no path)."""
    needed: set[Value] = set(wrt)
    on_path = []
    for node in nodes:
        if any(v in needed for v in node.inputs):
            needed.add(node.outputs[0])
            on_path.append(node)
    parts: dict[Value, list[Value]] = {v: [g] for v, g in seeds.items()}
    windows: Windows = {}
    for node in reversed(on_path):
        out = node.outputs[0]
        if out not in parts:
            continue
        if node.op.differentiation is Gradient.DECOMPOSE:
            raise GraphError(f"node {node.name} ({node.op.name}): its decomposition was not expanded")
        start = len(b.nodes)
        input_grads = node.op.gradient(b, node, _total(b, parts[out], windows))
        windows |= {n.outputs[0]: w for n in b.nodes[start:] if (w := _zero_pad_window(n))}
        for v, gv in zip(node.inputs, input_grads):
            if gv is not None and v in needed:
                parts.setdefault(v, []).append(gv)
    return [_total(b, parts[v], windows) if v in parts else None for v in wrt]


def _zero_pad_window(node: Node) -> tuple[int, int, Value] | None:
    """(axis, begin, input) of a zero pad that widens one axis, else None."""
    op = node.op
    if op.name != "pad" or op.mode != "constant" or op.value != 0 or min(op.pads, default=0) < 0:
        return None
    rank = len(op.pads) // 2
    axes = [a for a in range(rank) if op.pads[a] or op.pads[rank + a]]
    return (axes[0], op.pads[axes[0]], node.inputs[0]) if len(axes) == 1 else None


def _total(b: GraphBuilder, parts: list[Value], windows: Windows) -> Value:
    """The sum of a value's gradient parts."""
    joined = _join_windows(b, parts, windows) if len(parts) > 1 else None
    rest = parts if joined is None else [joined[0], *(p for p in parts if p not in joined[1])]
    total = rest[0]
    for p in rest[1:]:
        total = b.add(total, p)
    return total


def _join_windows(b: GraphBuilder, parts: list[Value], windows: Windows) -> tuple[Value, set[Value]] | None:
    """The parts that are zero pads of disjoint windows along one axis (the gradients of
    slices that split the value: a recurrence's gate columns and steps), joined by one
    concat of what they pad with zeros between, instead of summed as full-size pads;
    with the parts it stands for. None where fewer than two such parts are disjoint."""
    by_axis: dict[int, list[Value]] = {}
    for p in parts:
        if p in windows:
            by_axis.setdefault(windows[p][0], []).append(p)
    axis, padded = max(by_axis.items(), key=lambda kv: len(kv[1]), default=(0, []))
    placed = sorted(((windows[p][1], windows[p][2]) for p in padded), key=lambda w: w[0])
    ends = [begin + inner.type.shape[axis] for begin, inner in placed]
    if len(placed) < 2 or any(end > begin for end, (begin, _) in zip(ends, placed[1:])):
        return None
    length, pieces, at = parts[0].type.shape[axis], [], 0
    for (begin, inner), end in zip(placed, ends):
        pieces += [_zeros(b, inner, axis, begin - at)] if begin > at else []
        pieces.append(inner)
        at = end
    pieces += [_zeros(b, placed[0][1], axis, length - at)] if at < length else []
    return b.concat(*pieces, axis=axis), set(padded)


def _zeros(b: GraphBuilder, like: Value, axis: int, length: int) -> Value:
    """Zeros shaped as `like` but `length` long along `axis`."""
    shape = tuple(length if a == axis else d for a, d in enumerate(like.type.shape))
    return b.param("zeros", np.zeros(shape, like.type.np_dtype))


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
