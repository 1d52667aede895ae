"""Keras initializers (the defaults Dense and Conv use), drawing from utils.rng()."""

from __future__ import annotations

from math import prod

import numpy as np

from frontends.keras import utils


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Keras's fan-in / fan-out: the last two axes, times the receptive field."""
    if len(shape) < 2:
        return shape[0] if shape else 1, shape[0] if shape else 1
    receptive = prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def glorot_uniform(shape):
    fan_in, fan_out = _fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return utils.rng().uniform(-limit, limit, shape).astype(np.float32)


def he_normal(shape):
    fan_in, _ = _fans(shape)
    std = np.sqrt(2.0 / fan_in) / 0.87962566103423978  # truncated normal at 2 std, as Keras
    x = utils.rng().standard_normal(shape)
    while np.any(np.abs(x) > 2):
        bad = np.abs(x) > 2
        x[bad] = utils.rng().standard_normal(int(bad.sum()))
    return (x * std).astype(np.float32)


def orthogonal(shape):
    """Keras's orthogonal: for (rows, cols), QR of a normal (cols, rows) draw, signs fixed
    by diag(r), transposed: the whole matrix has orthonormal rows (or columns)."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    flat = utils.rng().standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return np.ascontiguousarray(q.reshape(shape), dtype=np.float32)


def uniform(shape):
    """Keras's "uniform": RandomUniform(-0.05, 0.05) (Embedding's default)."""
    return utils.rng().uniform(-0.05, 0.05, shape).astype(np.float32)


def zeros(shape):
    return np.zeros(shape, np.float32)


def ones(shape):
    return np.ones(shape, np.float32)


INITIALIZERS = {
    "glorot_uniform": glorot_uniform,
    "he_normal": he_normal,
    "orthogonal": orthogonal,
    "uniform": uniform,
    "zeros": zeros,
    "ones": ones,
}


def get(identifier):
    if callable(identifier):
        return identifier
    if identifier not in INITIALIZERS:
        raise ValueError(f"Unknown initializer {identifier!r}; known: {', '.join(INITIALIZERS)}")
    return INITIALIZERS[identifier]
