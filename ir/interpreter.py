"""The reference interpreter: runs a Graph with each op's numpy `reference`.

It is the oracle: every compiled kernel, pass and frontend is tested against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ir.errors import GraphError
from ir.graph import Graph, Value


def interpret(graph: Graph, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run `graph` on `inputs` (positional, or by input name) and return its outputs."""
    if isinstance(inputs, Mapping):
        missing = [v.name for v in graph.inputs if v.name not in inputs]
        if missing:
            raise GraphError(f"missing input(s): {missing}")
        inputs = [inputs[v.name] for v in graph.inputs]
    if len(inputs) != len(graph.inputs):
        raise GraphError(f"graph takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env: dict[Value, np.ndarray] = dict(graph.params)
    for v, array in zip(graph.inputs, inputs):
        array = np.asarray(array)
        if array.shape != v.type.shape or array.dtype != v.type.np_dtype:
            raise GraphError(f"input {v.name}: expected {v.type}, got {array.dtype}{array.shape}")
        env[v] = array
    with np.errstate(all="ignore"):
        for node in graph.nodes:
            result = node.op.reference(*(env[v] for v in node.inputs))
            out = node.outputs[0]
            env[out] = np.asarray(result, dtype=out.type.np_dtype).reshape(out.type.shape)
    return [env[v] for v in graph.outputs]
