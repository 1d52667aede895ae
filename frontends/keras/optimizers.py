"""Keras optimizers: each writes its update rule as graph ops into the training
graph (new parameter and slot values from the old ones and the gradient), with the
per-step scalars (the learning rate, Adam's bias-corrected step) fed as inputs, so
that changing `learning_rate` never recompiles. Rules as in keras/src/optimizers."""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np

from frontends.keras import serialization
from frontends.keras.serialization import register
from ir.builder import GraphBuilder
from ir.graph import Value

#: the hyperparameters of Keras's optimizer configs that Kiln's optimizers take
HYPERPARAMETERS = ("learning_rate", "momentum", "nesterov", "beta_1", "beta_2", "epsilon", "rho", "centered",
                   "initial_accumulator_value", "weight_decay")  # fmt: skip


def _k(b: GraphBuilder, v: float) -> Value:
    return b.param("k", np.array(v, np.float32))


class Optimizer:
    keras_module: ClassVar[str] = "keras.optimizers"
    registered_name: ClassVar[str | None] = None
    keras_name: ClassVar[str]
    #: slot name → its initial value (a float fill)
    slots: dict[str, float] = {}
    #: the per-step scalar inputs the rule reads
    scalars: tuple[str, ...] = ("learning_rate",)

    def __init__(self, learning_rate: float = 0.001, name: str | None = None, **kwargs):
        if "lr" in kwargs:
            raise ValueError(f"Argument(s) not recognized: {{'lr': {kwargs['lr']}}}")
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        self.learning_rate = float(np.float32(learning_rate))
        self.iterations = 0
        self.name = name or type(self).__name__.lower()

    def step_scalars(self) -> dict[str, np.float32]:
        """The scalars of the next step (t = iterations + 1), in float32 as Keras computes them."""
        return {"learning_rate": np.float32(self.learning_rate)}

    def update(self, b: GraphBuilder, p: Value, g: Value, slots: dict[str, Value], s: dict[str, Value]):
        """(new parameter, {slot: new value})."""
        raise NotImplementedError

    def get_config(self) -> dict:
        """Keras's config: the name, the learning rate, the hyperparameters the class takes."""
        config = {"name": self.name, "learning_rate": self.learning_rate}
        for key in ("momentum", "nesterov", "beta_1", "beta_2", "epsilon", "rho", "centered", "weight_decay"):
            if hasattr(self, key):
                config[key] = getattr(self, key)
        return config

    @classmethod
    def from_config(cls, config: dict) -> Optimizer:
        """The optimizer of a Keras config, from its hyperparameters (the options Kiln does
        not have, like gradient clipping, are not read)."""
        return cls(**{k: v for k, v in config.items() if k in HYPERPARAMETERS and v is not None})


@register
class SGD(Optimizer):
    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.0, nesterov: bool = False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.slots = {"momentum": 0.0} if self.momentum else {}

    def update(self, b, p, g, slots, s):
        lr = s["learning_rate"]
        if not self.momentum:
            return b.sub(p, b.mul(lr, g)), {}
        m = _k(b, self.momentum)
        v = b.sub(b.mul(m, slots["momentum"]), b.mul(lr, g))
        step = b.sub(b.mul(m, v), b.mul(lr, g)) if self.nesterov else v
        return b.add(p, step), {"momentum": v}


@register
class Adam(Optimizer):
    scalars = ("learning_rate", "alpha")
    slots = {"m": 0.0, "v": 0.0}

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.weight_decay = weight_decay

    def step_scalars(self):
        f = np.float32
        t = f(self.iterations + 1)
        lr = f(self.learning_rate)
        alpha = lr * np.sqrt(f(1) - np.power(f(self.beta_2), t)) / (f(1) - np.power(f(self.beta_1), t))
        return {"learning_rate": lr, "alpha": f(alpha)}

    def update(self, b, p, g, slots, s):
        if self.weight_decay:  # decoupled: var -= var * wd * lr, before the rule
            p = b.sub(p, b.mul(p, b.mul(_k(b, self.weight_decay), s["learning_rate"])))
        m = b.add(slots["m"], b.mul(b.sub(g, slots["m"]), _k(b, 1 - self.beta_1)))
        v = b.add(slots["v"], b.mul(b.sub(b.mul(g, g), slots["v"]), _k(b, 1 - self.beta_2)))
        step = b.div(b.mul(s["alpha"], m), b.add(b.sqrt(v), _k(b, self.epsilon)))
        return b.sub(p, step), {"m": m, "v": v}


@register
class AdamW(Adam):
    def __init__(self, learning_rate: float = 0.001, weight_decay: float = 0.004, **kwargs):
        super().__init__(learning_rate, weight_decay=weight_decay, **kwargs)


@register
class RMSprop(Optimizer):
    def __init__(
        self,
        learning_rate: float = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.rho, self.momentum, self.epsilon, self.centered = (
            float(rho),
            float(momentum),
            float(epsilon),
            centered,
        )
        self.slots = {"velocity": 0.0}
        if self.momentum:
            self.slots["momentum"] = 0.0
        if self.centered:
            self.slots["average_gradient"] = 0.0

    def update(self, b, p, g, slots, s):
        rho = _k(b, self.rho)
        v = b.add(b.mul(rho, slots["velocity"]), b.mul(_k(b, 1 - self.rho), b.mul(g, g)))
        new = {"velocity": v}
        denom = v
        if self.centered:
            a = b.add(b.mul(rho, slots["average_gradient"]), b.mul(_k(b, 1 - self.rho), g))
            new["average_gradient"] = a
            denom = b.sub(v, b.mul(a, a))
        inc = b.div(b.mul(s["learning_rate"], g), b.sqrt(b.add(denom, _k(b, self.epsilon))))
        if self.momentum:
            mom = b.add(b.mul(_k(b, self.momentum), slots["momentum"]), inc)
            new["momentum"] = mom
            inc = mom
        return b.sub(p, inc), new


class RMSpropOptimizer(RMSprop):
    """TF1's tf.train.RMSPropOptimizer, which old tutorials call as
    keras.optimizers.RMSpropOptimizer(lr): mean-square slot starting at 1, epsilon 1e-10
    (Keras 3 dropped it; Kiln keeps it with a warning rather than change its first steps)."""

    def __init__(
        self, learning_rate: float, decay: float = 0.9, momentum: float = 0.0, epsilon: float = 1e-10
    ):
        warnings.warn(
            "RMSpropOptimizer is TensorFlow 1's optimizer, which Keras 3 removed; "
            "use keras.optimizers.RMSprop",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(learning_rate, rho=decay, momentum=momentum, epsilon=epsilon)
        self.slots = {"velocity": 1.0, "momentum": 0.0}
        self.name = "rmsprop_optimizer"

    def update(self, b, p, g, slots, s):
        rho = _k(b, self.rho)
        ms = b.add(b.mul(rho, slots["velocity"]), b.mul(_k(b, 1 - self.rho), b.mul(g, g)))
        mom = b.add(
            b.mul(_k(b, self.momentum), slots["momentum"]),
            b.div(b.mul(s["learning_rate"], g), b.sqrt(b.add(ms, _k(b, self.epsilon)))),
        )
        return b.sub(p, mom), {"velocity": ms, "momentum": mom}


@register
class Adagrad(Optimizer):
    def __init__(
        self,
        learning_rate: float = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        **kwargs,
    ):
        super().__init__(learning_rate, **kwargs)
        self.epsilon = float(epsilon)
        self.slots = {"accumulator": float(initial_accumulator_value)}

    def update(self, b, p, g, slots, s):
        acc = b.add(slots["accumulator"], b.mul(g, g))
        return b.sub(p, b.div(b.mul(s["learning_rate"], g), b.sqrt(b.add(acc, _k(b, self.epsilon))))), {
            "accumulator": acc
        }


BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad}


def get(identifier) -> Optimizer:
    """An optimizer by Keras name or config entry, or itself."""
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        return serialization.deserialize(identifier)
    key = str(identifier).lower()
    if key not in BY_NAME:
        raise ValueError(f"Unknown optimizer {identifier!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[key]()
