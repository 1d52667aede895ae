"""The compiled programs behind compile/fit/evaluate/predict.

One graph per (purpose, batch size), built from the model's layers and compiled once:
  train:   inputs, labels, dropout masks, weights, optimizer slots, step scalars
           → batch loss, per-output losses, metric sums, new weights, new slots
  evaluate: inputs, labels, weights → batch loss, per-output losses, metric sums
  predict:  inputs, weights → outputs
Weights are inputs (not constants baked into the library), so training never
recompiles. The forward pass, loss, backward pass (ir.autodiff) and optimizer update
are one graph: fused and memory-planned as a whole, one native call per step.

Weights and slots live in two sets of arrays; each step reads one set and writes the
other (`bind` fixes the pointers once), so nothing is copied between steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler import compile_model
from frontends.keras.base_layer import Layer, Weight
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


Forward = Callable[[GraphContext, list[Value], bool], list[Value]]  # the model: inputs → outputs


@dataclass(frozen=True)
class Feed:
    """A graph input the host fills for each batch (a model input or a target's labels)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Target:
    """A model output trained against labels: its loss (times `weight` in the total) and
    metrics, logged under `prefix` (the output's name and "_" when the model has several)."""

    output: int
    y: Feed
    loss: object
    weight: float = 1.0
    metrics: list = field(default_factory=list)
    prefix: str = ""


@dataclass
class Program:
    """A compiled graph and how to feed it and read it. Its outputs start with the batch
    loss, then `loss_names` (each target's own loss, when there are several outputs),
    then `metric_names` (metric sums over the batch)."""

    compiled: object
    masks: list[tuple[Layer, tuple[int, ...]]] = field(default_factory=list)
    loss_names: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)


def _start(name: str, weights: list[Weight], feeds: list[Feed]):
    b = GraphBuilder(name)
    xs = [b.input(f.name, f.shape, f.dtype) for f in feeds]
    values = {id(w): b.input(w.name.replace("/", "_"), w.shape) for w in weights}
    return b, xs, values


def build_predict(forward: Forward, weights: list[Weight], feeds: list[Feed]) -> Program:
    b, xs, values = _start("predict", weights, feeds)
    ys = forward(GraphContext(b, values), xs, False)
    return Program(compile_model(b.build(*ys), name="predict"))


def inference_graph(
    forward: Forward, weights: list[Weight], feeds: list[Feed], outputs: list[str], name: str
):
    """The model for inference with its weights as constants: what export() compiles
    into a self-contained library (its outputs named `outputs`)."""
    b = GraphBuilder(name)
    xs = [b.input(f.name, f.shape, f.dtype) for f in feeds]
    values = {id(w): b.param(w.name.replace("/", "_"), w.value) for w in weights}
    ys = forward(GraphContext(b, values), xs, False)
    return b.build(*(b.rename(y, n) for y, n in zip(ys, outputs)))


def _loss_and_metrics(b, targets: list[Target], y_trues, y_preds, several: bool):
    """The total loss (Σ weight · mean loss), each target's own loss when the model has
    several outputs, and the metric sums."""
    parts, sums = [], []
    for t, y_true in zip(targets, y_trues):
        y_pred = y_preds[t.output]
        parts.append(b.reduce_mean(t.loss(b, y_true, y_pred), keepdims=False))
        sums += [b.reduce_sum(m(b, y_true, y_pred), keepdims=False) for m in t.metrics]
    if not several and targets[0].weight == 1.0:
        return parts[0], [], sums
    total = None
    for t, part in zip(targets, parts):
        if t.weight != 1.0:
            part = b.mul(part, b.param("loss_weight", np.array(t.weight, np.float32)))
        total = part if total is None else b.add(total, part)
    return total, parts if several else [], sums


def _names(targets: list[Target], several: bool) -> tuple[list[str], list[str]]:
    loss_names = [f"{t.prefix}loss" for t in targets] if several else []
    return loss_names, [f"{t.prefix}{m.name}" for t in targets for m in t.metrics]


def build_evaluate(forward, weights, feeds: list[Feed], targets: list[Target], several: bool) -> Program:
    b, xs, values = _start("evaluate", weights, feeds)
    y_trues = [b.input(t.y.name, t.y.shape, t.y.dtype) for t in targets]
    y_preds = forward(GraphContext(b, values), xs, False)
    total, parts, sums = _loss_and_metrics(b, targets, y_trues, y_preds, several)
    b.inputs = [*xs, *y_trues, *values.values()]
    graph = b.build(total, *parts, *sums)
    return Program(compile_model(graph, name="evaluate"), [], *_names(targets, several))


def train_graph(forward, weights, feeds: list[Feed], targets: list[Target], several: bool, optimizer,
                name="train_step"):  # fmt: skip
    """The train step as a graph, with its dropout masks (layer, mask shape) in input order.
    Inputs: model inputs, labels, masks, weights, slots (per trainable weight,
    optimizer.slots order), scalars. Outputs: loss, per-output losses, metric sums, new
    weights, new slots."""
    b, xs, values = _start(name, weights, feeds)
    y_trues = [b.input(t.y.name, t.y.shape, t.y.dtype) for t in targets]
    ctx = GraphContext(b, values)
    y_preds = forward(ctx, xs, True)
    total, parts, sums = _loss_and_metrics(b, targets, y_trues, y_preds, several)
    trainable = [w for w in weights if w.trainable]
    slot_inputs = {
        (id(w), s): b.input(f"{w.name.replace('/', '_')}_{s}", w.shape)
        for w in trainable
        for s in optimizer.slots
    }
    scalars = {s: b.input(s, ()) for s in optimizer.scalars}
    grads = gradients(b, total, [values[id(w)] for w in trainable], unreached="none")
    unreached = [w.name for w, g in zip(trainable, grads) if g is None]
    if unreached:
        warnings.warn(
            f"Gradients do not exist for variables {unreached} when minimizing the loss. If using "
            "`model.compile()`, did you forget to provide a `loss` argument?",
            UserWarning,
            stacklevel=4,
        )
    new_weights, new_slots = {}, []
    for w, g in zip(trainable, grads):
        slots = {s: slot_inputs[(id(w), s)] for s in optimizer.slots}
        if g is None:  # no loss reaches it: left alone, slots and all, as Keras leaves it
            new_slots += list(slots.values())
            continue
        new_weights[id(w)], updated = optimizer.update(b, values[id(w)], g, slots, scalars)
        new_slots += [updated[s] for s in optimizer.slots]
    new_weights.update(ctx.updates)
    outputs = [total, *parts, *sums, *(new_weights.get(id(w), values[id(w)]) for w in weights), *new_slots]
    masks = [m for _, m in ctx.masks]
    b.inputs = [
        *xs,
        *y_trues,
        *masks,
        *(values[id(w)] for w in weights),
        *slot_inputs.values(),
        *scalars.values(),
    ]
    return b.build(*outputs), [(layer, m.type.shape) for layer, m in ctx.masks]


def build_train(forward, weights, feeds: list[Feed], targets: list[Target], several: bool, optimizer):
    graph, masks = train_graph(forward, weights, feeds, targets, several, optimizer)
    return Program(compile_model(graph, name="train_step"), masks, *_names(targets, several))


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
    """A train program bound to fixed arrays: input and label staging, masks, scalars,
    outputs, and both state sets, one call per direction."""

    def __init__(
        self, program: Program, state: TrainState, feeds: list[Feed], targets: list[Target], optimizer
    ):
        self.program = program
        self.xs = [np.zeros(f.shape, f.dtype) for f in feeds]
        self.ys = [np.zeros(t.y.shape, t.y.dtype) for t in targets]
        self.masks = [np.ones(shape, np.float32) for _, shape in program.masks]
        self.scalars = {s: np.zeros((), np.float32) for s in optimizer.scalars}
        self.loss = np.zeros((), np.float32)
        self.losses = [np.zeros((), np.float32) for _ in program.loss_names]
        self.metric_sums = [np.zeros((), np.float32) for _ in program.metric_names]
        head = [*self.xs, *self.ys, *self.masks]
        tail = list(self.scalars.values())
        self.calls = []
        for read, write in ((0, 1), (1, 0)):
            outs = [self.loss, *self.losses, *self.metric_sums, *state.sets[write]]
            self.calls.append(program.compiled.bind(outs, *head, *state.sets[read], *tail))
