"""The compiled programs behind compile/fit/evaluate/predict.

One graph per (purpose, batch size), built from the model's layers and compiled once:
  train:   x, y, dropout masks, weights, optimizer slots, step scalars
           → batch loss, metric sums, new weights, new slots
  evaluate: x, y, weights → batch loss, metric sums
  predict:  x, weights → y
Weights are inputs (not constants baked into the library), so training never
recompiles. The forward pass, loss, backward pass (ir.autodiff) and optimizer update
are one graph: fused and memory-planned as a whole, one native call per step.

Weights and slots live in two sets of arrays; each step reads one set and writes the
other (`bind` fixes the pointers once), so nothing is copied between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler import compile_model
from frontends.keras.layers import Layer, Weight
from ir.autodiff import gradients
from ir.builder import GraphBuilder
from ir.graph import Value


class GraphContext:
    """What a layer's call() builds with: the builder, its weights' values, its masks."""

    def __init__(self, b: GraphBuilder, weights: dict[int, Value]):
        self.b = b
        self._weights = weights
        self.masks: list[tuple[Layer, Value]] = []
        self.updates: dict[int, Value] = {}  # non-trainable weights' new values (BN's moving stats)

    def weight(self, w: Weight) -> Value:
        return self._weights[id(w)]

    def update(self, w: Weight, value: Value) -> None:
        """The value `w` takes after this training step."""
        self.updates[id(w)] = value

    def dropout_mask(self, layer: Layer, shape: tuple[int, ...]) -> Value:
        mask = self.b.input(f"{layer.name}_mask{len(self.masks)}", shape)
        self.masks.append((layer, mask))
        return mask


Forward = Callable[[GraphContext, Value, bool], Value]  # the model's computation, x → y


@dataclass
class Program:
    """A compiled graph and how to feed it."""

    compiled: object
    masks: list[tuple[Layer, tuple[int, ...]]] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)


def _start(name: str, weights: list[Weight], x_shape, x_dtype: str):
    b = GraphBuilder(name)
    x = b.input("x", x_shape, x_dtype)
    values = {id(w): b.input(w.name.replace("/", "_"), w.shape) for w in weights}
    return b, x, values


def build_predict(forward: Forward, weights: list[Weight], x_shape, x_dtype) -> Program:
    b, x, values = _start("predict", weights, x_shape, x_dtype)
    y = forward(GraphContext(b, values), x, False)
    return Program(compile_model(b.build(y), name="predict"))


def inference_graph(forward: Forward, weights: list[Weight], x_shape, x_dtype: str, name: str):
    """The model for inference with its weights as constants: what export() compiles
    into a self-contained library (input `x`, output `y`)."""
    b = GraphBuilder(name)
    x = b.input("x", x_shape, x_dtype)
    values = {id(w): b.param(w.name.replace("/", "_"), w.value) for w in weights}
    y = forward(GraphContext(b, values), x, False)
    return b.build(y)


def _loss_and_metrics(b, y_true, y_pred, loss, metrics) -> tuple[Value, list[Value]]:
    per_sample = loss(b, y_true, y_pred)
    batch_loss = b.reduce_mean(per_sample, keepdims=False)
    sums = [b.reduce_sum(m(b, y_true, y_pred), keepdims=False) for m in metrics]
    return batch_loss, sums


def build_evaluate(forward, weights, x_shape, x_dtype, y_shape, y_dtype, loss, metrics) -> Program:
    b, x, values = _start("evaluate", weights, x_shape, x_dtype)
    y_true = b.input("y", y_shape, y_dtype)
    y_pred = forward(GraphContext(b, values), x, False)
    batch_loss, sums = _loss_and_metrics(b, y_true, y_pred, loss, metrics)
    b.inputs = [x, y_true, *values.values()]
    return Program(compile_model(b.build(batch_loss, *sums), name="evaluate"), [], [m.name for m in metrics])


def train_graph(
    forward, weights, x_shape, x_dtype, y_shape, y_dtype, loss, metrics, optimizer, name="train_step"
):
    """The train step as a graph, with its dropout masks (layer, mask input) in input order.
    Inputs: x, y, masks, weights, slots (per trainable weight, optimizer.slots order),
    scalars. Outputs: loss, metric sums, new weights, new slots."""
    b, x, values = _start(name, weights, x_shape, x_dtype)
    y_true = b.input("y", y_shape, y_dtype)
    ctx = GraphContext(b, values)
    y_pred = forward(ctx, x, True)
    batch_loss, sums = _loss_and_metrics(b, y_true, y_pred, loss, metrics)
    trainable = [w for w in weights if w.trainable]
    slot_inputs = {
        (id(w), s): b.input(f"{w.name.replace('/', '_')}_{s}", w.shape)
        for w in trainable
        for s in optimizer.slots
    }
    scalars = {s: b.input(s, ()) for s in optimizer.scalars}
    grads = gradients(b, batch_loss, [values[id(w)] for w in trainable])
    new_weights, new_slots = {}, []
    for w, g in zip(trainable, grads):
        slots = {s: slot_inputs[(id(w), s)] for s in optimizer.slots}
        new_weights[id(w)], updated = optimizer.update(b, values[id(w)], g, slots, scalars)
        new_slots += [updated[s] for s in optimizer.slots]
    new_weights.update(ctx.updates)
    outputs = [batch_loss, *sums, *(new_weights.get(id(w), values[id(w)]) for w in weights), *new_slots]
    masks = [m for _, m in ctx.masks]
    b.inputs = [
        x,
        y_true,
        *masks,
        *(values[id(w)] for w in weights),
        *slot_inputs.values(),
        *scalars.values(),
    ]
    return b.build(*outputs), [(layer, m.type.shape) for layer, m in ctx.masks]


def build_train(forward, weights, x_shape, x_dtype, y_shape, y_dtype, loss, metrics, optimizer) -> Program:
    graph, masks = train_graph(forward, weights, x_shape, x_dtype, y_shape, y_dtype, loss, metrics, optimizer)
    return Program(compile_model(graph, name="train_step"), masks, [m.name for m in metrics])


class TrainState:
    """Weights and optimizer slots in two sets of arrays that steps alternate between."""

    def __init__(self, weights: list[Weight], optimizer, slot_values: dict | None = None):
        trainable = [w for w in weights if w.trainable]
        slots = [
            (slot_values or {}).get((w.name, s), np.full(w.shape, optimizer.slots[s], np.float32))
            for w in trainable
            for s in optimizer.slots
        ]
        first = [w.value.copy() for w in weights] + [np.array(s, np.float32) for s in slots]
        self.sets = [first, [a.copy() for a in first]]
        self.current = 0
        self.n_weights = len(weights)
        self.slot_keys = [(w.name, s) for w in trainable for s in optimizer.slots]

    @property
    def weights(self) -> list[np.ndarray]:
        return self.sets[self.current][: self.n_weights]

    def slot_values(self) -> dict:
        return dict(zip(self.slot_keys, self.sets[self.current][self.n_weights :]))


class BoundStep:
    """A train program bound to fixed arrays: x and y staging, masks, scalars, outputs,
    and both state sets, one call per direction."""

    def __init__(self, program: Program, state: TrainState, x_shape, x_dtype, y_shape, y_dtype, optimizer):
        self.program = program
        self.x = np.zeros(x_shape, x_dtype)
        self.y = np.zeros(y_shape, y_dtype)
        self.masks = [np.ones(shape, np.float32) for _, shape in program.masks]
        self.scalars = {s: np.zeros((), np.float32) for s in optimizer.scalars}
        self.loss = np.zeros((), np.float32)
        self.metric_sums = [np.zeros((), np.float32) for _ in program.metric_names]
        head = [self.x, self.y, *self.masks]
        tail = list(self.scalars.values())
        self.calls = []
        for read, write in ((0, 1), (1, 0)):
            outs = [self.loss, *self.metric_sums, *state.sets[write]]
            self.calls.append(program.compiled.bind(outs, *head, *state.sets[read], *tail))
