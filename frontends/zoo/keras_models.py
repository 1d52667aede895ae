"""The Keras parity models (the ones tests/test_keras.py trains against real Keras 3),
written with Kiln's Keras, and their train steps as graphs with inputs to feed them:
what the GPU tests and benchmarks/gpu.py run.

    train_step(name, batch, rng) -> (graph, feeds)     # name in PARITY_MODELS
"""

from __future__ import annotations

import numpy as np

from frontends import keras as k
from frontends.keras.trainer import train_graph
from ir.graph import Graph


def _mlp(k):
    dense = k.layers.Dense
    return [k.Input((32,)), dense(64, activation="relu"), dense(64, activation="relu"), dense(10, "softmax")]


def _cnn(k):
    conv, pool = k.layers.Conv2D, k.layers.MaxPooling2D
    return [
        k.Input((28, 28, 1)), conv(32, 3, activation="relu"), pool(2), conv(64, 3, activation="relu"),
        pool(2), k.layers.Flatten(), k.layers.Dense(10, "softmax"),
    ]  # fmt: skip


def _lstm(k):
    return [k.Input((8, 4)), k.layers.LSTM(32), k.layers.Dense(1)]


def _gru(k):
    return [k.Input((8, 4)), k.layers.GRU(16), k.layers.Dense(3, activation="softmax")]


#: The Keras parity models (tests/test_keras.py): layers, optimizer, loss, and the number
#: of classes of sparse labels (None: targets shaped as the output).
PARITY_MODELS = {
    "mlp": (_mlp, "adam", "sparse_categorical_crossentropy", 10),
    "cnn": (_cnn, "adam", "sparse_categorical_crossentropy", 10),
    "lstm": (_lstm, "rmsprop", "mse", None),
    "gru": (_gru, "sgd", "categorical_crossentropy", None),
}


def train_step(name: str, batch: int, rng: np.random.Generator) -> tuple[Graph, list[np.ndarray]]:
    """A Keras parity model's train step as a graph, with inputs for it: a random batch,
    the model's initial weights and random optimizer slots (positive, as second moments
    are) so the update's every term is exercised."""
    layers, optimizer, loss, classes = PARITY_MODELS[name]
    model = k.Sequential(layers(k))
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] if classes else [])
    (feed,) = model._feeds(batch)
    targets = model._targets(batch)
    graph, _masks = train_graph(model._forward, model.weights, [feed], targets, False, model.optimizer)
    state = model._train_state().sets[0]
    n_weights = len(model.weights)
    x = rng.standard_normal(feed.shape).astype(feed.dtype)
    y_type = graph.inputs[1].type
    if classes:
        y = rng.integers(0, classes, y_type.shape).astype(y_type.np_dtype)
    else:
        y = rng.random(y_type.shape).astype(y_type.np_dtype)
    slots = [(rng.random(a.shape) * 0.01).astype(np.float32) for a in state[n_weights:]]
    scalars = list(model.optimizer.step_scalars().values())
    return graph, [x, y, *state[:n_weights], *slots, *(np.asarray(v, np.float32) for v in scalars)]
