"""Keras losses as graph builders. Each gives the per-sample loss (N,); the batch loss
is their mean (Keras's "sum_over_batch_size"), formulas as in keras/src/losses."""

from __future__ import annotations

import numpy as np

from ir.builder import GraphBuilder
from ir.graph import Value

EPSILON = 1e-7  # keras.backend.epsilon()


def _k(b: GraphBuilder, v: float) -> Value:
    return b.param("k", np.array(v, np.float32))


def _mean_last(b: GraphBuilder, x: Value) -> Value:
    return b.reduce_mean(x, axes=(-1,), keepdims=False)


class Loss:
    name = "loss"
    sparse = False  # y_true holds class indices (int64), not one value per output

    def __call__(self, b: GraphBuilder, y_true: Value, y_pred: Value) -> Value:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name}


class MeanSquaredError(Loss):
    name = "mean_squared_error"

    def __call__(self, b, y_true, y_pred):
        d = b.sub(y_pred, y_true)
        return _mean_last(b, b.mul(d, d))


class MeanAbsoluteError(Loss):
    name = "mean_absolute_error"

    def __call__(self, b, y_true, y_pred):
        return _mean_last(b, b.abs(b.sub(y_pred, y_true)))


class Huber(Loss):
    name = "huber_loss"

    def __init__(self, delta: float = 1.0):
        self.delta = float(delta)

    def __call__(self, b, y_true, y_pred):
        err = b.abs(b.sub(y_pred, y_true))
        quadratic = b.mul(_k(b, 0.5), b.mul(err, err))
        linear = b.sub(b.mul(_k(b, self.delta), err), _k(b, 0.5 * self.delta**2))
        return _mean_last(b, b.where(b.less_equal(err, _k(b, self.delta)), quadratic, linear))


class _Crossentropy(Loss):
    def __init__(self, from_logits: bool = False):
        self.from_logits = bool(from_logits)

    def _log_probs(self, b: GraphBuilder, y_pred: Value) -> Value:
        """log p, from logits (log_softmax) or from probabilities normalized and clipped."""
        if self.from_logits:
            return b.log_softmax(y_pred, axis=-1)
        p = b.div(y_pred, b.reduce_sum(y_pred, axes=(-1,), keepdims=True))
        return b.log(b.clip(p, min=EPSILON, max=1 - EPSILON))


class CategoricalCrossentropy(_Crossentropy):
    name = "categorical_crossentropy"

    def __call__(self, b, y_true, y_pred):
        return b.neg(b.reduce_sum(b.mul(y_true, self._log_probs(b, y_pred)), axes=(-1,), keepdims=False))


class SparseCategoricalCrossentropy(_Crossentropy):
    name = "sparse_categorical_crossentropy"
    sparse = True

    def __call__(self, b, y_true, y_pred):
        classes = y_pred.type.shape[-1]
        labels = b.reshape(y_true, shape=(*y_true.type.shape, 1))
        one_hot = b.cast(
            b.equal(labels, b.param("classes", np.arange(classes, dtype=np.int64))), to="float32"
        )
        return b.neg(b.reduce_sum(b.mul(one_hot, self._log_probs(b, y_pred)), axes=(-1,), keepdims=False))


class BinaryCrossentropy(Loss):
    name = "binary_crossentropy"

    def __init__(self, from_logits: bool = False):
        self.from_logits = bool(from_logits)

    def __call__(self, b, y_true, y_pred):
        if self.from_logits:  # max(x, 0) - x y + log(1 + exp(-|x|))
            per = b.add(b.sub(b.relu(y_pred), b.mul(y_pred, y_true)), b.softplus(b.neg(b.abs(y_pred))))
        else:
            p = b.clip(y_pred, min=EPSILON, max=1 - EPSILON)
            one = _k(b, 1.0)
            per = b.neg(b.add(b.mul(y_true, b.log(p)), b.mul(b.sub(one, y_true), b.log(b.sub(one, p)))))
        return _mean_last(b, per)


ALIASES = {
    "mean_squared_error": MeanSquaredError,
    "mse": MeanSquaredError,
    "mean_absolute_error": MeanAbsoluteError,
    "mae": MeanAbsoluteError,
    "huber": Huber,
    "huber_loss": Huber,
    "binary_crossentropy": BinaryCrossentropy,
    "bce": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
}


def get(identifier) -> Loss:
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in ALIASES:
        return ALIASES[identifier.lower()]()
    raise ValueError(f"Unknown loss {identifier!r}; known: {', '.join(ALIASES)}")


mean_squared_error = mse = "mean_squared_error"
