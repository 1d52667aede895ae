"""A Keras-compatible API whose models train as native code.

    from frontends import keras
    model = keras.Sequential([keras.layers.Dense(64, activation="relu", input_shape=(32,)), ...])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=5)
    with keras.device("gpu:0"):          # the same, on an NVIDIA GPU
        model.fit(x, y, epochs=5)

Forward pass, loss, gradients (ir.autodiff) and optimizer update are compiled into one
train step per batch shape; defaults and formulas follow Keras 3.
"""

from frontends.keras import (
    activations,
    callbacks,
    distribution,
    initializers,
    layers,
    losses,
    metrics,
    models,
    optimizers,
    saving,
    utils,
)
from frontends.keras.devices import device
from frontends.keras.layers import Input
from frontends.keras.models import Model, Sequential

__all__ = [
    "Input",
    "Model",
    "Sequential",
    "activations",
    "device",
    "callbacks",
    "distribution",
    "initializers",
    "layers",
    "losses",
    "metrics",
    "models",
    "optimizers",
    "saving",
    "utils",
]
