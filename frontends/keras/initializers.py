"""Keras initializers, drawing from utils.rng() (or their own seed), each describing
itself as Keras does so that a layer's config names it."""

from __future__ import annotations

import math
from math import prod
from typing import ClassVar

import numpy as np

from frontends.keras import serialization, utils
from frontends.keras.serialization import register


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Keras's fan-in / fan-out: the last two axes, times the receptive field."""
    if len(shape) < 2:
        return shape[0] if shape else 1, shape[0] if shape else 1
    receptive = prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


class Initializer:
    """init(shape) → a float32 array."""

    keras_module: ClassVar[str] = "keras.initializers"
    registered_name: ClassVar[str | None] = None
    keras_name: ClassVar[str]

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Initializer:
        return cls(**config)


class _Random(Initializer):
    """An initializer that draws: from its own generator when seeded, else from utils.rng()."""

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def rng(self) -> np.random.Generator:
        return utils.rng() if self.seed is None else np.random.default_rng(self.seed)

    def get_config(self):
        return {"seed": self.seed}


@register
class Zeros(Initializer):
    def __call__(self, shape):
        return np.zeros(shape, np.float32)


@register
class Ones(Initializer):
    def __call__(self, shape):
        return np.ones(shape, np.float32)


@register
class Constant(Initializer):
    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, shape):
        return np.full(shape, self.value, np.float32)

    def get_config(self):
        return {"value": self.value}


@register
class RandomUniform(_Random):
    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None):
        super().__init__(seed)
        self.minval, self.maxval = minval, maxval

    def __call__(self, shape):
        return self.rng().uniform(self.minval, self.maxval, shape).astype(np.float32)

    def get_config(self):
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


def _truncated(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws, those beyond 2 redrawn (Keras's truncation)."""
    x = rng.standard_normal(shape)
    while np.any(np.abs(x) > 2):
        bad = np.abs(x) > 2
        x[bad] = rng.standard_normal(int(bad.sum()))
    return x


@register
class RandomNormal(_Random):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None):
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape):
        return (self.rng().standard_normal(shape) * self.stddev + self.mean).astype(np.float32)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@register
class TruncatedNormal(RandomNormal):
    def __call__(self, shape):
        return (_truncated(self.rng(), shape) * self.stddev + self.mean).astype(np.float32)


@register
class VarianceScaling(_Random):
    """Draws of variance scale / n, n the fan-in, fan-out or their mean (`mode`)."""

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        input_axes=None,
        output_axes=None,
    ):
        super().__init__(seed)
        if input_axes is not None or output_axes is not None:
            raise ValueError("initializers: input_axes and output_axes are not supported")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"VarianceScaling: mode {mode!r} is not fan_in, fan_out or fan_avg")
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(f"VarianceScaling: unknown distribution {distribution!r}")
        self.scale, self.mode, self.distribution = scale, mode, distribution

    def __call__(self, shape):
        fan_in, fan_out = _fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        scale = self.scale / max(1.0, fan)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * scale)
            return self.rng().uniform(-limit, limit, shape).astype(np.float32)
        if self.distribution == "truncated_normal":
            return (_truncated(self.rng(), shape) * (math.sqrt(scale) / 0.87962566103423978)).astype(
                np.float32
            )
        return (self.rng().standard_normal(shape) * math.sqrt(scale)).astype(np.float32)

    def get_config(self):
        config = {"scale": self.scale, "mode": self.mode, "distribution": self.distribution}
        return {**super().get_config(), **config, "input_axes": None, "output_axes": None}


class _Preset(VarianceScaling):
    """A VarianceScaling whose config is only its seed (and Keras's axes)."""

    preset: ClassVar[tuple[float, str, str]]

    def __init__(self, seed: int | None = None, input_axes=None, output_axes=None):
        super().__init__(*self.preset, seed=seed, input_axes=input_axes, output_axes=output_axes)

    def get_config(self):
        return {"seed": self.seed, "input_axes": None, "output_axes": None}


@register
class GlorotUniform(_Preset):
    preset = (1.0, "fan_avg", "uniform")


@register
class GlorotNormal(_Preset):
    preset = (1.0, "fan_avg", "truncated_normal")


@register
class HeNormal(_Preset):
    preset = (2.0, "fan_in", "truncated_normal")


@register
class HeUniform(_Preset):
    preset = (2.0, "fan_in", "uniform")


@register
class LecunNormal(_Preset):
    preset = (1.0, "fan_in", "truncated_normal")


@register
class LecunUniform(_Preset):
    preset = (1.0, "fan_in", "uniform")


@register
class Orthogonal(_Random):
    """For (rows, cols): QR of a normal (cols, rows) draw, signs fixed by diag(r),
    transposed: the whole matrix has orthonormal rows (or columns), times `gain`."""

    def __init__(self, gain: float = 1.0, seed: int | None = None):
        super().__init__(seed)
        self.gain = gain

    def __call__(self, shape):
        rows, cols = shape[0], int(np.prod(shape[1:]))
        flat = self.rng().standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(flat)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return np.ascontiguousarray(self.gain * q.reshape(shape), dtype=np.float32)

    def get_config(self):
        return {**super().get_config(), "gain": self.gain}


#: Keras's names for its initializers
NAMES = {
    "zeros": Zeros,
    "ones": Ones,
    "uniform": RandomUniform,
    "random_uniform": RandomUniform,
    "normal": RandomNormal,
    "random_normal": RandomNormal,
    "truncated_normal": TruncatedNormal,
    "variance_scaling": VarianceScaling,
    "glorot_uniform": GlorotUniform,
    "glorot_normal": GlorotNormal,
    "he_normal": HeNormal,
    "he_uniform": HeUniform,
    "lecun_normal": LecunNormal,
    "lecun_uniform": LecunUniform,
    "orthogonal": Orthogonal,
}


def get(identifier) -> Initializer:
    """An initializer from a Keras name, a config entry ({"class_name", "config"}), or
    itself (an Initializer, or any callable shape → array)."""
    if isinstance(identifier, dict):
        return serialization.deserialize(identifier)
    if callable(identifier):
        return identifier
    if identifier not in NAMES:
        raise ValueError(f"Unknown initializer {identifier!r}; known: {', '.join(NAMES)}")
    return NAMES[identifier]()


def serialize(init: Initializer) -> dict:
    if not isinstance(init, Initializer):
        raise ValueError(f"cannot describe the initializer {init!r}: it is not a Keras initializer")
    return serialization.serialize(init)
