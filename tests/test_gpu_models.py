"""The five PyTorch-exported models and the train steps of the Keras parity models,
scheduled for the GPU: run on the CPU exactly (cuda-sim) they match the interpreter,
and ptxas takes every kernel for sm_80 and sm_90 without spilling."""

from __future__ import annotations

import numpy as np
import pytest
from test_gpu import needs_ptxas

from compiler.driver import compile_model, lower_graph, to_graph
from compiler.report import gpu_summary
from frontends.keras.trainer import train_graph
from ir.graph import Graph
from ir.interpreter import interpret

pytest.importorskip("torch")
from frontends.zoo.torch_models import export  # noqa: E402

SMALL = ["mlp", "mnist_cnn", "lstm"]
LARGE = ["transformer", "resnet18"]
CASES = [
    *[pytest.param(name, 1) for name in SMALL],
    *[pytest.param(name, 1, marks=pytest.mark.slow) for name in LARGE],
    *[pytest.param(name, 32, marks=pytest.mark.slow) for name in SMALL + LARGE],
]


@pytest.mark.parametrize("name,batch", CASES)
def test_gpu_schedule_matches_the_interpreter(name, batch, rng):
    model = export(name, batch)
    graph = to_graph(model)
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    got = compile_model(model, name=f"{name}_b{batch}", target="cuda-sim").run(*feeds)
    for g, e in zip(got, interpret(graph, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


@needs_ptxas
@pytest.mark.parametrize("name", [*SMALL, pytest.param("transformer", marks=pytest.mark.slow), "resnet18"])
def test_ptxas_takes_every_kernel_without_spills(name):
    summary = gpu_summary(lower_graph(to_graph(export(name, 1)), name, target="cuda"))
    for arch, kernels in summary.resources.items():
        assert len(kernels) == summary.kernels, arch
        spilling = {k: r for k, r in kernels.items() if r.spill_bytes or r.stack_bytes}
        assert not spilling, f"{arch}: {spilling}"


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
KERAS_MODELS = {
    "mlp": (_mlp, "adam", "sparse_categorical_crossentropy", 10),
    "cnn": (_cnn, "adam", "sparse_categorical_crossentropy", 10),
    "lstm": (_lstm, "rmsprop", "mse", None),
    "gru": (_gru, "sgd", "categorical_crossentropy", None),
}


def keras_train_step(name: str, batch: int, rng: np.random.Generator) -> tuple[Graph, list[np.ndarray]]:
    """A Keras parity model's train step as a graph, with inputs for it: a random batch,
    the model's initial weights and random optimizer slots (positive, as second moments
    are) so the update's every term is exercised."""
    from frontends import keras as k

    layers, optimizer, loss, classes = KERAS_MODELS[name]
    model = k.Sequential(layers(k))
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"] if classes else [])
    (feed,) = model._feeds(batch)
    targets = model._targets(batch)
    graph, masks = train_graph(model._forward, model.weights, [feed], targets, False, model.optimizer)
    assert not masks
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


@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_keras_train_step_gpu_schedule_matches_the_interpreter(name, rng):
    graph, feeds = keras_train_step(name, 32, rng)
    got = compile_model(graph, name=f"train_{name}", target="cuda-sim").run(*feeds)
    for g, e in zip(got, interpret(graph, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(float(np.abs(e).max()), 1.0))


@needs_ptxas
@pytest.mark.parametrize("name", list(KERAS_MODELS))
def test_ptxas_takes_every_train_step_kernel_without_spills(name, rng):
    graph, _ = keras_train_step(name, 32, rng)
    summary = gpu_summary(lower_graph(graph, f"train_{name}", target="cuda"))
    for arch, kernels in summary.resources.items():
        assert len(kernels) == summary.kernels, arch
        spilling = {k: r for k, r in kernels.items() if r.spill_bytes or r.stack_bytes}
        assert not spilling, f"{arch}: {spilling}"
