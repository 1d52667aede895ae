"""Keras activations by name, as graph builders: (GraphBuilder, Value) → Value."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ir.builder import GraphBuilder
from ir.graph import Value

Activation = Callable[[GraphBuilder, Value], Value]


def _scalar(b: GraphBuilder, v: float) -> Value:
    return b.param("k", np.array(v, np.float32))


ACTIVATIONS: dict[str, Activation] = {
    "linear": lambda b, x: x,
    "relu": lambda b, x: b.relu(x),
    "sigmoid": lambda b, x: b.sigmoid(x),
    "tanh": lambda b, x: b.tanh(x),
    "softmax": lambda b, x: b.softmax(x, axis=-1),
    "elu": lambda b, x: b.elu(x, alpha=1.0),
    "selu": lambda b, x: b.mul(b.elu(x, alpha=1.6732632423543772), _scalar(b, 1.0507009873554805)),
    "swish": lambda b, x: b.mul(x, b.sigmoid(x)),
    "silu": lambda b, x: b.mul(x, b.sigmoid(x)),
    "softplus": lambda b, x: b.softplus(x),
    "gelu": lambda b, x: b.gelu(x),  # exact (erf), as keras.activations.gelu
}


#: Keras activations that are one elementwise op of the registry (op, attributes): what
#: the recurrent ops take
OPS: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "linear": ("leaky_relu", (("alpha", 1.0),)),  # slope 1 on both sides: the identity
    "relu": ("relu", ()),
    "sigmoid": ("sigmoid", ()),
    "tanh": ("tanh", ()),
    "elu": ("elu", (("alpha", 1.0),)),
    "selu": ("selu", (("alpha", 1.6732632423543772), ("gamma", 1.0507009873554805))),
    "softplus": ("softplus", ()),
    "gelu": ("gelu", ()),
}


def _name(identifier: str | dict) -> str:
    """A Keras name, also from a config's serialized function ({"config": name, ...})."""
    return str(identifier["config"] if isinstance(identifier, dict) else identifier).lower()


def get(identifier: str | dict | Callable | None) -> Activation:
    """An activation by Keras name (None is linear), or itself (a builder)."""
    if identifier is None:
        return ACTIVATIONS["linear"]
    if callable(identifier):
        return identifier  # type: ignore[return-value]
    name = _name(identifier)
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {identifier!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def name_of(identifier: str | dict | Callable | None) -> str:
    """The Keras name a config gives the activation ("custom" for a builder of one's own)."""
    if identifier is None:
        return "linear"
    return "custom" if callable(identifier) else _name(identifier)


def op_spec(name: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The registry op computing the activation `name` (a recurrent layer's)."""
    if name not in OPS:
        raise ValueError(
            f"activation {name!r} is not supported in recurrent layers; they take {', '.join(OPS)}"
        )
    return OPS[name]
