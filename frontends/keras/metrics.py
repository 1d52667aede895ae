"""Keras metrics: each a graph builder of per-sample values (N,) that fit and evaluate
average over all samples of an epoch (Keras's streaming means)."""

from __future__ import annotations

import numpy as np

from ir.builder import GraphBuilder
from ir.graph import Value


class Metric:
    def __init__(self, name: str | None = None):
        self.name = name or self.default_name

    default_name = "metric"

    def __call__(self, b: GraphBuilder, y_true: Value, y_pred: Value) -> Value:
        raise NotImplementedError


def _same(b: GraphBuilder, a: Value, c: Value) -> Value:
    return b.cast(b.equal(a, c), to="float32")


class SparseCategoricalAccuracy(Metric):
    default_name = "sparse_categorical_accuracy"

    def __call__(self, b, y_true, y_pred):
        predicted = b.arg_reduce(y_pred, axis=-1, keepdims=False)
        return _same(b, predicted, b.reshape(b.cast(y_true, to="int64"), shape=predicted.type.shape))


class CategoricalAccuracy(Metric):
    default_name = "categorical_accuracy"

    def __call__(self, b, y_true, y_pred):
        return _same(
            b, b.arg_reduce(y_pred, axis=-1, keepdims=False), b.arg_reduce(y_true, axis=-1, keepdims=False)
        )


class BinaryAccuracy(Metric):
    default_name = "binary_accuracy"

    def __call__(self, b, y_true, y_pred):
        half = b.param("half", np.array(0.5, np.float32))
        hits = _same(b, b.greater(y_pred, half), b.greater(y_true, half))
        return b.reduce_mean(hits, axes=(-1,), keepdims=False)


class MeanAbsoluteError(Metric):
    default_name = "mean_absolute_error"

    def __call__(self, b, y_true, y_pred):
        return b.reduce_mean(b.abs(b.sub(y_pred, y_true)), axes=(-1,), keepdims=False)


class MeanSquaredError(Metric):
    default_name = "mean_squared_error"

    def __call__(self, b, y_true, y_pred):
        d = b.sub(y_pred, y_true)
        return b.reduce_mean(b.mul(d, d), axes=(-1,), keepdims=False)


def resolve(identifier, y_true_shape: tuple[int, ...], y_pred_shape: tuple[int, ...]) -> Metric:
    """A metric from compile(metrics=[...]); 'accuracy' is chosen from the shapes, as
    Keras does: one output → binary; labels of lower rank (or one column against
    many) → sparse categorical; else categorical. The name stays as given."""
    if isinstance(identifier, Metric):
        return identifier
    key = str(identifier).lower()
    if key in ("accuracy", "acc"):
        if y_pred_shape[-1] == 1:
            cls = BinaryAccuracy
        elif len(y_true_shape) < len(y_pred_shape) or (y_true_shape[-1] == 1 and y_pred_shape[-1] > 1):
            cls = SparseCategoricalAccuracy
        else:
            cls = CategoricalAccuracy
        return cls(name=str(identifier))
    named = {
        "mae": MeanAbsoluteError,
        "mean_absolute_error": MeanAbsoluteError,
        "mse": MeanSquaredError,
        "mean_squared_error": MeanSquaredError,
        "sparse_categorical_accuracy": SparseCategoricalAccuracy,
        "categorical_accuracy": CategoricalAccuracy,
        "binary_accuracy": BinaryAccuracy,
    }
    if key not in named:
        raise ValueError(f"Unknown metric {identifier!r}; known: accuracy, {', '.join(named)}")
    return named[key](name=str(identifier))
