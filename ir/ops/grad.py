"""Small graph-building steps that the ops' gradient rules share.

A rule receives the builder `b`, its node and g (the gradient of the node's output)
and returns one gradient per input, written with ordinary graph ops, so the backward
pass is fused, memory-planned and compiled like any graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ir.ops import normalize_axis

if TYPE_CHECKING:
    from ir.builder import GraphBuilder
    from ir.graph import Value


def constant(b: GraphBuilder, value: float, like: Value) -> Value:
    """A scalar constant of like's dtype."""
    return b.param("k", np.array(value, like.type.np_dtype))


def unbroadcast(b: GraphBuilder, g: Value, shape: tuple[int, ...]) -> Value:
    """The gradient of a value broadcast to g's shape: g summed over the broadcast axes."""
    if g.type.shape == shape:
        return g
    lead = g.type.rank - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.type.shape[lead + i] != 1
    )
    summed = b.reduce_sum(g, axes=axes, keepdims=False) if axes else g
    return b.reshape(summed, shape=shape)


def where_positive(b: GraphBuilder, x: Value, g: Value, strict: bool = True) -> Value:
    """g where x > 0 (x >= 0 unless strict), else 0."""
    zero = constant(b, 0.0, g)
    return b.where(b.greater(x, zero) if strict else b.greater_equal(x, zero), g, zero)


def expand_back(b: GraphBuilder, g: Value, x: Value, axes: tuple[int, ...] | None, keepdims: bool) -> Value:
    """A reduction's result (or gradient) broadcast back over the axes it reduced."""
    rank = x.type.rank
    axes = tuple(range(rank)) if axes is None else tuple(normalize_axis("reduce", a, rank) for a in axes)
    kept_shape = tuple(1 if i in axes else d for i, d in enumerate(x.type.shape))
    return b.expand(b.reshape(g, shape=kept_shape), shape=x.type.shape)


def swap_last(b: GraphBuilder, v: Value) -> Value:
    """v with its last two axes swapped (a batch of transposed matrices)."""
    perm = tuple(range(v.type.rank - 2)) + (v.type.rank - 1, v.type.rank - 2)
    return b.transpose(v, perm=perm)
