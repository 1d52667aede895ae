"""A stable text form of a graph, for `kiln inspect` and for tests that compare graphs."""

from __future__ import annotations

import dataclasses

from ir.graph import Graph, Node


def _attrs(node: Node) -> str:
    op = node.op
    fields = dataclasses.fields(op)  # type: ignore[arg-type]
    shown = [f"{f.name}={getattr(op, f.name)!r}" for f in fields if getattr(op, f.name) != f.default]
    return f" {{{', '.join(shown)}}}" if shown else ""


def print_graph(graph: Graph) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph {graph.name}({ins}) {{"]
    for v in graph.params:
        lines.append(f"  param %{v.name}: {v.type}")
    for node in graph.nodes:
        args = ", ".join(f"%{v.name}" for v in node.inputs)
        outs = ", ".join(f"%{v.name}" for v in node.outputs)
        types = ", ".join(str(v.type) for v in node.outputs)
        lines.append(f"  {outs} = {node.op.name}({args}){_attrs(node)} : {types}")
    lines.append(f"  return {', '.join('%' + v.name for v in graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)
