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

On a GPU (keras.device("gpu:N"): the programs are --target cuda libraries) the two
sets are device memory (DeviceTrainState): a step uploads only the batch (inputs,
labels, dropout masks, step scalars: one copy) and downloads only the loss and metric
sums (one copy); the host sees the weights when it asks for them (one download, kept
until the next step). evaluate and predict read the weights where they lie.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler import compile_model
from compiler.batching import compile_tiles
from frontends.keras import devices
from frontends.keras.base_layer import Layer, Weight
from ir.autodiff import gradients
from ir.builder import GraphBuilder
from ir.graph import Value
from ir.ops import Batch, BatchAxis, BatchMixing


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
    device: str = devices.CPU
    _io: DeviceIO | None = field(default=None, repr=False)  # a GPU program's staging, made by run

    def run(self, arrays: list[np.ndarray], weights: list) -> list[np.ndarray]:
        """An evaluate or predict call on one batch (`arrays`: inputs, then labels): on
        the CPU `weights` are the weights' arrays, on a GPU their device addresses."""
        if self.device == devices.CPU:
            return self.compiled.run(*arrays, *weights)
        if self._io is None:
            self._io = DeviceIO(self.compiled, len(arrays))
        return self._io.run(arrays, weights)


def _compile(graph, name: str, device: str):
    """The graph's library for the device: a CPU library, or a --target cuda one for
    GPU N (its instance, made on first use, runs there)."""
    if device == devices.CPU:
        return compile_model(graph, name=name)
    compiled = compile_model(graph, name=name, target="cuda")
    compiled.ordinal = devices.ordinal(device)
    return compiled


def _start(name: str, weights: list[Weight], feeds: list[Feed]):
    b = GraphBuilder(name)
    xs = [b.input(f.name, f.shape, f.dtype) for f in feeds]
    values = {id(w): b.input(w.name.replace("/", "_"), w.shape) for w in weights}
    return b, xs, values


def build_predict(
    forward: Forward, weights: list[Weight], feeds: list[Feed], device: str = devices.CPU
) -> Program:
    b, xs, values = _start("predict", weights, feeds)
    ys = forward(GraphContext(b, values), xs, False)
    return Program(_compile(b.build(*ys), "predict", device), device=device)


def build_predict_any_batch(
    forward: Forward, weights: list[Weight], feeds_for: Callable[[int], list[Feed]]
) -> Program | None:
    """The predict program as one CPU library for every batch size (the last, partial
    batch included; see compiler.batching), or None for a model that mixes batch
    elements (it then compiles one program per batch size)."""

    def graph_for(count: int):
        b, xs, values = _start("predict", weights, feeds_for(count))
        return b.build(*forward(GraphContext(b, values), xs, False))

    axes: dict[str, Batch] = {f.name: BatchAxis(0) for f in feeds_for(1)}
    try:
        return Program(compile_tiles(graph_for, axes, "batch", "predict"))
    except BatchMixing:
        return None


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


def build_evaluate(forward, weights, feeds: list[Feed], targets: list[Target], several: bool,
                   device: str = devices.CPU) -> Program:  # fmt: skip
    b, xs, values = _start("evaluate", weights, feeds)
    y_trues = [b.input(t.y.name, t.y.shape, t.y.dtype) for t in targets]
    y_preds = forward(GraphContext(b, values), xs, False)
    total, parts, sums = _loss_and_metrics(b, targets, y_trues, y_preds, several)
    b.inputs = [*xs, *y_trues, *values.values()]
    graph = b.build(total, *parts, *sums)
    return Program(_compile(graph, "evaluate", device), [], *_names(targets, several), device=device)


@dataclass
class LossGraph:
    """A training graph's common start: the model on its inputs and labels with its
    dropout masks, the total loss, each output's own loss and the metric sums."""

    b: GraphBuilder
    xs: list[Value]
    y_trues: list[Value]
    values: dict[int, Value]  # each weight's graph input, by id(weight)
    ctx: GraphContext
    total: Value
    parts: list[Value]
    sums: list[Value]

    @property
    def masks(self) -> list[tuple[Layer, tuple[int, ...]]]:
        """The dropout masks (layer, mask shape), in input order."""
        return [(layer, m.type.shape) for layer, m in self.ctx.masks]


def _loss_graph(name: str, forward, weights, feeds: list[Feed], targets: list[Target], several: bool):
    b, xs, values = _start(name, weights, feeds)
    y_trues = [b.input(t.y.name, t.y.shape, t.y.dtype) for t in targets]
    ctx = GraphContext(b, values)
    y_preds = forward(ctx, xs, True)
    total, parts, sums = _loss_and_metrics(b, targets, y_trues, y_preds, several)
    return LossGraph(b, xs, y_trues, values, ctx, total, parts, sums)


def _gradients(b: GraphBuilder, loss: Value, values: dict[int, Value], trainable: list[Weight]) -> list:
    """d loss / d w for each trainable weight, None where the loss does not reach it
    (with Keras's warning naming those weights)."""
    grads = gradients(b, loss, [values[id(w)] for w in trainable], unreached="none")
    unreached = [w.name for w, g in zip(trainable, grads) if g is None]
    if unreached:
        warnings.warn(
            f"Gradients do not exist for variables {unreached} when minimizing the loss. If using "
            "`model.compile()`, did you forget to provide a `loss` argument?",
            UserWarning,
            stacklevel=5,
        )
    return grads


def _slot_inputs(b: GraphBuilder, trainable: list[Weight], optimizer) -> dict[tuple[int, str], Value]:
    """Each trainable weight's optimizer slots as graph inputs, in optimizer.slots order."""
    return {
        (id(w), s): b.input(f"{w.name.replace('/', '_')}_{s}", w.shape)
        for w in trainable
        for s in optimizer.slots
    }


def _apply(b: GraphBuilder, optimizer, trainable, values, grads, slot_inputs, scalars):
    """The optimizer's rule on every trainable weight: ({id(w): new weight}, new slots in
    slot input order). A weight without a gradient is left alone, slots and all, as
    Keras leaves it."""
    new_weights, new_slots = {}, []
    for w, g in zip(trainable, grads):
        slots = {s: slot_inputs[(id(w), s)] for s in optimizer.slots}
        if g is None:
            new_slots += list(slots.values())
            continue
        new_weights[id(w)], updated = optimizer.update(b, values[id(w)], g, slots, scalars)
        new_slots += [updated[s] for s in optimizer.slots]
    return new_weights, new_slots


def train_graph(forward, weights, feeds: list[Feed], targets: list[Target], several: bool, optimizer,
                name="train_step"):  # fmt: skip
    """The train step as a graph, with its dropout masks (layer, mask shape) in input order.
    Inputs: model inputs, labels, masks, weights, slots (per trainable weight,
    optimizer.slots order), scalars. Outputs: loss, per-output losses, metric sums, new
    weights, new slots."""
    g = _loss_graph(name, forward, weights, feeds, targets, several)
    b, values = g.b, g.values
    trainable = [w for w in weights if w.trainable]
    slot_inputs = _slot_inputs(b, trainable, optimizer)
    scalars = {s: b.input(s, ()) for s in optimizer.scalars}
    grads = _gradients(b, g.total, values, trainable)
    new_weights, new_slots = _apply(b, optimizer, trainable, values, grads, slot_inputs, scalars)
    new_weights.update(g.ctx.updates)
    new_values = [new_weights.get(id(w), values[id(w)]) for w in weights]
    outputs = [g.total, *g.parts, *g.sums, *new_values, *new_slots]
    b.inputs = [
        *g.xs,
        *g.y_trues,
        *(m for _, m in g.ctx.masks),
        *(values[id(w)] for w in weights),
        *slot_inputs.values(),
        *scalars.values(),
    ]
    return b.build(*outputs), g.masks


@dataclass(frozen=True)
class GradientLayout:
    """What a gradient program writes after the loss and metric sums, in order: the
    gradient of each trainable weight the loss reaches (`reached`) and the new value of
    each weight the step updates without a gradient (`updated`: BatchNormalization's
    moving statistics). The update program reads them in the same order."""

    reached: list[Weight]
    updated: list[Weight]


def gradient_graph(forward, weights, feeds: list[Feed], targets: list[Target], several: bool,
                   name="gradients"):  # fmt: skip
    """The first half of a split train step, for data parallelism: inputs as train_graph's
    up to the weights, then `share` (this process's rows / the global batch's rows).
    Outputs: share · loss, share · each output's loss, the metric sums, share · each
    reached weight's gradient, share · each updated weight's new value. Every output is
    this process's part of a sum over processes: summed (all-reduced), they are the
    global batch's loss and gradients, and the updates averaged with the shares as
    weights. Returns the graph, its masks and its GradientLayout."""
    g = _loss_graph(name, forward, weights, feeds, targets, several)
    b, values = g.b, g.values
    share = b.input("share", ())
    trainable = [w for w in weights if w.trainable]
    loss = b.mul(g.total, share)
    grads = _gradients(b, loss, values, trainable)
    reached = [(w, d) for w, d in zip(trainable, grads) if d is not None]
    by_id = {id(w): w for w in weights}
    updated = [(by_id[key], b.mul(v, share)) for key, v in g.ctx.updates.items()]
    outputs = [loss, *(b.mul(p, share) for p in g.parts), *g.sums]
    outputs += [d for _, d in reached] + [v for _, v in updated]
    b.inputs = [*g.xs, *g.y_trues, *(m for _, m in g.ctx.masks), *(values[id(w)] for w in weights), share]
    layout = GradientLayout([w for w, _ in reached], [w for w, _ in updated])
    return b.build(*outputs), g.masks, layout


def update_graph(weights: list[Weight], optimizer, layout: GradientLayout, name="apply_gradients"):
    """The second half of a split train step: inputs the weights, the slots (as
    train_graph's), the summed gradients and updates (GradientLayout order), the step
    scalars; outputs the new weights and slots (as train_graph's)."""
    b = GraphBuilder(name)
    values = {id(w): b.input(w.name.replace("/", "_"), w.shape) for w in weights}
    trainable = [w for w in weights if w.trainable]
    slot_inputs = _slot_inputs(b, trainable, optimizer)
    grads_in = {id(w): b.input(f"{w.name.replace('/', '_')}_grad", w.shape) for w in layout.reached}
    updates_in = {id(w): b.input(f"{w.name.replace('/', '_')}_new", w.shape) for w in layout.updated}
    scalars = {s: b.input(s, ()) for s in optimizer.scalars}
    grads = [grads_in.get(id(w)) for w in trainable]
    new_weights, new_slots = _apply(b, optimizer, trainable, values, grads, slot_inputs, scalars)
    new_weights.update(updates_in)
    b.inputs = [*values.values(), *slot_inputs.values(), *grads_in.values(), *updates_in.values(),
                *scalars.values()]  # fmt: skip
    return b.build(*(new_weights.get(id(w), values[id(w)]) for w in weights), *new_slots)


def build_train(forward, weights, feeds: list[Feed], targets: list[Target], several: bool, optimizer,
                device: str = devices.CPU):  # fmt: skip
    graph, masks = train_graph(forward, weights, feeds, targets, several, optimizer)
    return Program(_compile(graph, "train_step", device), masks, *_names(targets, several), device=device)


def _initial_state(weights: list[Weight], optimizer, slot_values: dict | None):
    """The weights and slots a training starts from (slots not given start at the
    optimizer's initial value), and the slots' keys (weight name, slot name)."""
    trainable = [w for w in weights if w.trainable]
    keys = [(w.name, s) for w in trainable for s in optimizer.slots]
    slots = [
        (slot_values or {}).get((w.name, s), np.full(w.shape, optimizer.slots[s], np.float32))
        for w in trainable
        for s in optimizer.slots
    ]
    return [w.value.copy() for w in weights] + [np.array(s, np.float32) for s in slots], keys


class TrainState:
    """Weights and optimizer slots in two sets of arrays that steps alternate between."""

    device = devices.CPU

    def __init__(self, weights: list[Weight], optimizer, slot_values: dict | None = None):
        first, self.slot_keys = _initial_state(weights, optimizer, slot_values)
        self.sets = [first, [a.copy() for a in first]]
        self.current = 0
        self.n_weights = len(weights)

    def advance(self) -> None:
        """A step wrote the other set: it is the current one now."""
        self.current ^= 1

    def arrays(self) -> list[np.ndarray]:
        """The current weights, then slots."""
        return self.sets[self.current]

    @property
    def weights(self) -> list[np.ndarray]:
        return self.arrays()[: self.n_weights]

    def slot_values(self) -> dict:
        return dict(zip(self.slot_keys, self.arrays()[self.n_weights :]))


ALIGN = 256  # cuMemAlloc's alignment: each array of a Staging block starts at a multiple


def aligned_offsets(sizes: list[int], align: int) -> tuple[list[int], int]:
    """Where each of consecutive arrays of these sizes starts when each starts at a
    multiple of `align` (in the sizes' unit), and where the last one ends."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(-(-end // align) * align)
        end = offsets[-1] + size
    return offsets, end


class Staging:
    """Arrays that cross between host and GPU together, laid out in one host buffer and
    one device buffer of the same layout: one copy moves them all (a copy costs a
    driver call and a synchronization however small it is). `arrays` are views into
    the host buffer; `addresses` where each lies on the device."""

    def __init__(self, lib, specs: list[tuple[tuple[int, ...], str]], what: str):
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in specs]
        offsets, end = aligned_offsets(sizes, ALIGN)
        self.host = np.zeros(max(end, 1), np.uint8)
        self.arrays = [
            self.host[o : o + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize]
            .view(dtype)
            .reshape(shape)
            for o, (shape, dtype) in zip(offsets, specs)
        ]
        self.device = lib.alloc(max(end, 1), what)
        self.addresses = [self.device.address + o for o in offsets]

    def upload(self) -> None:
        self.device.upload(self.host)

    def download(self) -> None:
        self.device.download(self.host)


class DeviceTrainState:
    """TrainState on a GPU: each set of weights and slots is one device block (Staging),
    allocated with the first train program's instance (`attach`). The host reads the
    current set by downloading it (`arrays`), and keeps that copy until the next step."""

    def __init__(self, weights: list[Weight], optimizer, slot_values: dict | None, device: str):
        self.device = device
        self._host, self.slot_keys = _initial_state(weights, optimizer, slot_values)
        self.n_weights = len(weights)
        self.sets: list[Staging] | None = None
        self.current = 0

    def attach(self, lib) -> list[Staging]:
        """The two sets on the device, the first holding the state so far."""
        if self.sets is None:
            specs = [(a.shape, "float32") for a in self._host]
            sets = [Staging(lib, specs, f"the weights and optimizer slots (set {k})") for k in (0, 1)]
            for dst, src in zip(sets[self.current].arrays, self._host):
                dst[...] = src
            sets[self.current].upload()
            self.sets = sets
        return self.sets

    def advance(self) -> None:
        self.current ^= 1
        self._host = None

    def arrays(self) -> list[np.ndarray]:
        if self._host is None:
            current = self.sets[self.current]
            current.download()
            self._host = [a.copy() for a in current.arrays]
        return self._host

    weights = TrainState.weights
    slot_values = TrainState.slot_values

    def weight_addresses(self) -> list[int] | None:
        """Where the current weights lie on the device (None before the first step)."""
        return None if self.sets is None else self.sets[self.current].addresses[: self.n_weights]


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


class DeviceStep:
    """BoundStep on a GPU, with the same arrays for the host to fill and read: they are
    views into two Staging blocks, the batch (inputs, labels, masks, scalars) that each
    step uploads and the results (loss, per-output losses, metric sums) it downloads;
    the weights and slots stay in the state's device sets."""

    def __init__(
        self, program: Program, state: DeviceTrainState, feeds: list[Feed], targets: list[Target], optimizer
    ):
        self.program = program
        lib = program.compiled
        sets = state.attach(lib)
        specs = [(f.shape, f.dtype) for f in feeds] + [(t.y.shape, t.y.dtype) for t in targets]
        specs += [(shape, "float32") for _, shape in program.masks]
        specs += [((), "float32") for _ in optimizer.scalars]
        self.batch = Staging(lib, specs, "the batch (inputs, labels, dropout masks, step scalars)")
        arrays = iter(self.batch.arrays)
        self.xs = [next(arrays) for _ in feeds]
        self.ys = [next(arrays) for _ in targets]
        self.masks = [next(arrays) for _ in program.masks]
        for mask in self.masks:
            mask[...] = 1
        self.scalars = {s: next(arrays) for s in optimizer.scalars}
        n_results = 1 + len(program.loss_names) + len(program.metric_names)
        self.results = Staging(lib, [((), "float32")] * n_results, "the loss and metric sums")
        self.loss, *rest = self.results.arrays
        self.losses = rest[: len(program.loss_names)]
        self.metric_sums = rest[len(program.loss_names) :]
        n_head = len(feeds) + len(targets) + len(self.masks)
        head, tail = self.batch.addresses[:n_head], self.batch.addresses[n_head:]
        self.calls = []
        for read, write in ((0, 1), (1, 0)):
            ins = [*head, *sets[read].addresses, *tail]
            outs = [*self.results.addresses, *sets[write].addresses]
            self.calls.append(functools.partial(self._step, ins, outs))

    def _step(self, ins: list[int], outs: list[int]) -> None:
        self.batch.upload()
        self.program.compiled.run_device(ins, outs)
        self.results.download()


class DeviceIO:
    """The staging of an evaluate or predict program on a GPU: the batch goes up in one
    copy, the outputs come down in one; the weights are device addresses the caller
    gives (where training left them, or uploaded for the call)."""

    def __init__(self, lib, n_arrays: int):
        self.lib = lib
        self.inputs = Staging(lib, [(t.shape, t.dtype) for t in lib.inputs[:n_arrays]], "the batch")
        self.outputs = Staging(lib, [(t.shape, t.dtype) for t in lib.outputs], "the outputs")

    def run(self, arrays: list[np.ndarray], weights: list[int]) -> list[np.ndarray]:
        for dst, src in zip(self.inputs.arrays, arrays):
            dst[...] = src
        self.inputs.upload()
        self.lib.run_device([*self.inputs.addresses, *weights], self.outputs.addresses)
        self.outputs.download()
        return [a.copy() for a in self.outputs.arrays]
