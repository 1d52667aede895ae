"""Keras models: the Functional API's Model and Sequential, with compile / fit / evaluate
/ predict as Keras 3 defines them, running the programs of trainer.py. A model describes
itself as Keras does (get_config / from_config, get_compile_config / compile_from_config),
and saves and loads through the file formats registered in serialization. The programs
run on the CPU, or on a GPU inside `keras.device("gpu:0")` (see devices.py)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from frontends.keras import callbacks as callbacks_module
from frontends.keras import data_parallel, devices, distribution, serialization, utils
from frontends.keras import losses as losses_module
from frontends.keras import metrics as metrics_module
from frontends.keras import optimizers as optimizers_module
from frontends.keras.base_layer import InputLayer, KerasTensor, Layer, LayerCall, Weight, auto_name
from frontends.keras.serialization import dtype_policy, file_format, register, serialize
from frontends.keras.trainer import (
    BoundStep,
    DeviceStep,
    DeviceTrainState,
    Feed,
    Staging,
    Target,
    TrainState,
    build_evaluate,
    build_predict,
    build_predict_any_batch,
    build_train,
)
from ir.graph import Value

DEFAULT_BATCH_SIZE = 32


def _as_array(data, name: str) -> np.ndarray:
    """Lists and arrays alike; floats become float32 (Keras's floatx), ints stay ints."""
    a = np.asarray(data)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
    elif a.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected numbers, got an array of {a.dtype}")
    return np.ascontiguousarray(a)


@register(name="Functional")
class Model:
    """keras.Model(inputs, outputs): the Functional API. Inputs and outputs are one
    tensor or lists of them; layers in between may branch, join (Add, Concatenate) and
    give several outputs (an RNN's return_state). Sequential is the subclass for a chain
    of layers."""

    keras_module: ClassVar[str] = "keras.src.models.functional"
    registered_name: ClassVar[str | None] = "Functional"
    keras_name: ClassVar[str]

    def __init__(self, inputs=None, outputs=None, name: str | None = None):
        self.name = name or auto_name("functional" if inputs is not None else "model")
        self.layers: list[Layer] = []
        self._calls: list[LayerCall] = []
        self._inputs: list[KerasTensor] = []
        self._outputs: list[KerasTensor] = []
        self.optimizer = None
        self.loss = None
        self.stop_training = False
        self.history = None
        self._programs: dict = {}
        self._state: TrainState | DeviceTrainState | None = None
        self._compile_device: str | None = None  # the keras.device scope around compile()
        self._slots_kept: dict | None = None  # optimizer slots to start the next training from
        self._input_shapes: list[tuple[int, ...]] | None = None
        self._output_shapes: list[tuple[int, ...]] = []
        if inputs is not None or outputs is not None:
            self._connect(inputs, outputs)

    def _connect(self, inputs, outputs) -> None:
        """The layer calls between the input and output tensors, in an order that computes
        each tensor after its inputs."""
        inputs, outputs = _tensors(inputs, "inputs"), _tensors(outputs, "outputs")
        for t in inputs:
            if not isinstance(t.layer, InputLayer):
                raise ValueError(f"model inputs must be keras.Input tensors; {t} is not")
        given = {id(t) for t in inputs}
        postorder: list[LayerCall] = []  # each call after the calls it reads from
        first_seen: dict[int, int] = {}  # layer → when a walk from the outputs first meets it
        seen: set[int] = set()

        def visit(t: KerasTensor) -> None:
            call = t.call
            first_seen.setdefault(id(call.layer), len(first_seen))
            if id(call) in seen:
                return
            seen.add(id(call))
            if id(t) not in given:
                if not call.inputs:
                    raise ValueError(f"{t} does not come from the model's inputs {inputs}")
                for parent in call.inputs:
                    visit(parent)
            postorder.append(call)

        for t in outputs:
            visit(t)
        self._calls = [c for c in postorder if c.inputs]
        self._inputs, self._outputs = inputs, outputs
        self.layers = _keras_layer_order(postorder, first_seen, inputs)
        self._input_shapes = [t.shape for t in inputs]
        self._output_shapes = [t.shape for t in outputs]

    def _forward(self, ctx, xs: list[Value], training: bool) -> list[Value]:
        """The model's computation as graph ops: inputs → outputs."""
        values = {id(t): x for t, x in zip(self._inputs, xs)}
        for call in self._calls:
            args = [values[id(parent)] for parent in call.inputs]
            out = call.layer.call(ctx, args if call.many else args[0], training)
            for t, v in zip(call.outputs, out if isinstance(out, list) else [out]):
                values[id(t)] = v
        return [values[id(t)] for t in self._outputs]

    def _layer_shapes(self) -> list[tuple[Layer, list[tuple[int, ...]] | None]]:
        """Each layer with its output shapes (for summary)."""
        shapes: dict[int, list] = {id(t.layer): [t.shape] for t in self._inputs}
        for call in self._calls:  # a layer called more than once shows its last call, as Keras does
            shapes[id(call.layer)] = [t.shape for t in call.outputs]
        return [(layer, shapes[id(layer)]) for layer in self.layers]

    def _connections(self) -> dict[int, str] | None:
        """For summary's "Connected to" column: each layer's inbound tensors as Keras
        writes them (name[call][output]); None for a plain chain (Keras leaves the column
        out)."""
        chain = len(self._inputs) == 1 and len(self._outputs) == 1
        previous = self._inputs[0] if chain else None
        for call in self._calls:
            chain = chain and len(call.inputs) == 1 and call.inputs[0] is previous and len(call.outputs) == 1
            previous = call.outputs[0]
        if chain:
            return None
        inbound: dict[int, list[str]] = {id(t.layer): [] for t in self._inputs}
        for call in self._calls:
            named = (f"{t.layer.name}[{t.call.index}][{t.index}]" for t in call.inputs)
            inbound.setdefault(id(call.layer), []).extend(named)
        return {layer: ", ".join(names) or "-" for layer, names in inbound.items()}

    @property
    def output_names(self) -> list[str]:
        return [t.layer.name for t in self._outputs] or [self.layers[-1].name if self.layers else "output"]

    @property
    def _several_outputs(self) -> bool:
        return len(self._output_shapes) > 1

    # ------------------------------------------------------------------ structure

    @property
    def built(self) -> bool:
        return self._input_shapes is not None

    def build(self, input_shape=None) -> None:
        """A Functional model is built by its inputs and outputs already (as in Keras)."""

    @property
    def weights(self) -> list[Weight]:
        """Keras's order: layer by layer, trainable first, then the others."""
        out = []
        for layer in self.layers:
            out += [w for w in layer.weights if w.trainable] + [w for w in layer.weights if not w.trainable]
        return out

    def get_weights(self) -> list[np.ndarray]:
        self._sync()
        return [w.value.copy() for w in self.weights]

    def set_weights(self, values) -> None:
        weights = self.weights
        if len(values) != len(weights):
            raise ValueError(f"model {self.name} has {len(weights)} weights, got {len(values)}")
        for w, v in zip(weights, values):
            v = np.asarray(v, np.float32)
            if v.shape != w.shape:
                raise ValueError(f"weight {w.name}: expected shape {w.shape}, got {v.shape}")
            w.value = v
        self._reset_state()

    def count_params(self) -> int:
        return sum(w.value.size for w in self.weights)

    def _sync(self) -> None:
        """Training keeps the weights in its own arrays; copy them back to the layers."""
        if self._state is not None:
            for w, v in zip(self.weights, self._state.weights):
                w.value = v

    def _reset_state(self) -> None:
        """Weights changed from outside: training starts again from them (slots kept)."""
        if self._state is not None:
            slots = self._state.slot_values()
            self._state = None
            self._slots_kept = slots

    # ------------------------------------------------------------------ compile

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None, **kwargs) -> None:
        unknown = set(kwargs) - {"weighted_metrics", "run_eagerly", "jit_compile"}
        if unknown:
            raise TypeError(f"compile() got unexpected keyword argument(s) {sorted(unknown)}")
        self._output_losses = [
            losses_module.get(spec) if spec is not None else None for spec in self._per_output(loss, "loss")
        ]
        self._loss_weights_spec = loss_weights
        weights = self._per_output(loss_weights, "loss_weights")
        self._loss_weights = [1.0 if w is None else float(w) for w in weights]
        per_output = self._per_output(metrics, "metrics", listed=True)
        self._output_metrics = [
            list(m) if isinstance(m, (list, tuple)) else [m] if m else [] for m in per_output
        ]
        self.optimizer = optimizers_module.get(optimizer)
        self.loss = loss if self._several_outputs or loss is None else self._output_losses[0]
        self._metric_ids = metrics
        self._programs = {}
        self._state = None
        self._slots_kept = None
        self._compile_device = devices.current()

    def _device(self) -> str:
        """Where the programs run now: the keras.device scope around this call, else
        the one that was around compile(), else the CPU (see devices.py)."""
        return devices.current() or self._compile_device or devices.CPU

    def _per_output(self, spec, what: str, listed: bool = False) -> list:
        """compile()'s loss / loss_weights / metrics, one entry per output: given once
        (for every output; a metrics list for a one-output model), as a list in output
        order, or as a dict by output name."""
        names = self.output_names
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"{what}: {unknown} are not outputs of model {self.name} (outputs: {names})")
            if what == "loss" and set(spec) != set(names):  # Keras wants every output named (None: no loss)
                raise ValueError(f"Expected keys {names} in loss dict, but found loss.keys()={list(spec)}")
            return [spec.get(n) for n in names]
        if isinstance(spec, (list, tuple)) and (len(names) > 1 or not listed):
            if len(spec) != len(names):
                raise ValueError(
                    f"{what}: model {self.name} has {len(names)} outputs {names}; a list must have "
                    f"one entry per output, got {len(spec)}: {list(spec)}"
                )
            return list(spec)
        return [spec] * len(names)

    def _targets(self, batch: int) -> list[Target]:
        """The outputs with a loss, the labels they take and their metrics."""
        if getattr(self, "_output_losses", None) is None or not any(self._output_losses):
            raise RuntimeError("You must call `compile()` with a loss before training or evaluating.")
        targets = []
        several = self._several_outputs
        for i, (name, loss) in enumerate(zip(self.output_names, self._output_losses)):
            if loss is None:
                continue
            out = self._output_shapes[i]
            label = "y" if not several else f"{name}_labels"
            y = Feed(label, (batch,), "int64") if loss.sparse else Feed(label, (batch, *out), "float32")
            metrics = [metrics_module.resolve(m, y.shape, (batch, *out)) for m in self._output_metrics[i]]
            targets.append(Target(i, y, loss, self._loss_weights[i], metrics, f"{name}_" if several else ""))
        return targets

    # ------------------------------------------------------------------ data

    def _split(self, data, names: list[str], what: str) -> list:
        """Arrays for a model's inputs (or outputs): one array, a list in order, or a dict by name."""
        if isinstance(data, dict):
            missing = [n for n in names if n not in data]
            if missing:
                raise ValueError(f"{what}: no data for {missing} (the dict has {sorted(data)})")
            return [data[n] for n in names]
        if len(names) > 1:
            if not isinstance(data, (list, tuple)) or len(data) != len(names):
                got = f"a list of {len(data)}" if isinstance(data, (list, tuple)) else type(data).__name__
                raise ValueError(
                    f"{what}: model {self.name} has {len(names)} ({', '.join(names)}); pass a list of "
                    f"{len(names)} arrays or a dict by name, got {got}"
                )
            return list(data)
        if isinstance(data, (list, tuple)) and len(data) == 1 and isinstance(data[0], np.ndarray):
            return [data[0]]
        return [data]

    def _prepare_x(self, x) -> list[np.ndarray]:
        arrays = [_as_array(a, "x") for a in self._split(x, self.input_names, "x")]
        if not self.built:
            first = arrays[0]
            self.build(first.shape[1:] if first.ndim > 1 else (1,))
        out = []
        for a, name, shape, dtype in zip(arrays, self.input_names, self._input_shapes, self._input_dtypes):
            if a.ndim == 1 and shape == (1,):  # one feature, given as a flat list (TF2 took it)
                a = a.reshape(-1, 1)
            if a.shape[1:] != shape:
                raise ValueError(
                    f"Input {name} has shape {a.shape}, but model {self.name} expects "
                    f"(batch, {', '.join(map(str, shape))})"
                )
            if len(a) != len(arrays[0]):
                raise ValueError(f"inputs have different numbers of samples: {[len(b) for b in arrays]}")
            out.append(np.ascontiguousarray(a, dtype=dtype))
        return out

    @property
    def input_names(self) -> list[str]:
        return [t.layer.name for t in self._inputs] or ["x"]

    @property
    def _input_dtypes(self) -> list[str]:
        """Each input's dtype: the Input's own, or else what the first layer reading it
        takes (float32, or int64 indices for Embedding)."""
        dtypes = []
        for t in self._inputs:
            readers = [c.layer for c in self._calls if any(p is t for p in c.inputs)]
            dtypes.append(t.layer.dtype or getattr(readers[0] if readers else None, "input_dtype", "float32"))
        return dtypes

    def _prepare_y(self, y, n: int, targets: list[Target]) -> list[np.ndarray]:
        given = self._split(y, self.output_names, "y")
        out = []
        for t in targets:
            a = _as_array(given[t.output], "y")
            if len(a) != n:
                raise ValueError(f"x has {n} samples but y has {len(a)}")
            if t.loss.sparse:
                out.append(np.ascontiguousarray(a.reshape(n).astype(np.int64)))
                continue
            shape = self._output_shapes[t.output]
            a = a.astype(np.float32)
            if a.shape[1:] != shape and a.size == n * int(np.prod(shape)):
                a = a.reshape((n, *shape))  # (N,) labels against (N, 1) predictions: aligned, not broadcast
            if a.shape[1:] != shape:
                name = self.output_names[t.output]
                raise ValueError(f"y for {name} has shape {a.shape}; the output is (batch, {shape})")
            out.append(np.ascontiguousarray(a))
        return out

    def _feeds(self, batch: int) -> list[Feed]:
        names = self.input_names if len(self._input_shapes) > 1 else ["x"]
        return [
            Feed(name, (batch, *shape), dtype)
            for name, shape, dtype in zip(names, self._input_shapes, self._input_dtypes)
        ]

    # ------------------------------------------------------------------ programs

    def _program(self, kind: str, batch: int, device: str = devices.CPU):
        key = (kind, batch, device)
        if key not in self._programs:
            forward, weights, feeds = self._forward, self.weights, self._feeds(batch)
            if kind == "predict":
                self._programs[key] = build_predict(forward, weights, feeds, device)
            else:
                targets = self._targets(batch)
                several = len(targets) > 1  # each output's own loss is logged when several have one
                if kind == "evaluate":
                    self._programs[key] = build_evaluate(forward, weights, feeds, targets, several, device)
                else:
                    program = build_train(forward, weights, feeds, targets, several, self.optimizer, device)
                    state = self._train_state(device)
                    step = BoundStep if device == devices.CPU else DeviceStep
                    self._programs[key] = step(program, state, feeds, targets, self.optimizer)
        return self._programs[key]

    def _predict_program(self, batch: int, device: str):
        """On the CPU one library for every batch size, where the model runs its batch
        elements apart; else one per batch size."""
        key = ("predict", None, device)
        if device == devices.CPU and key not in self._programs:
            self._programs[key] = build_predict_any_batch(self._forward, self.weights, self._feeds)
        return self._programs.get(key) or self._program("predict", batch, device)

    def _train_state(self, device: str = devices.CPU) -> TrainState | DeviceTrainState:
        """The training state on `device`; a state on another device hands its weights
        and slots over (the weights through the layers)."""
        if self._state is not None and self._state.device != device:
            self._sync()
            self._reset_state()
        if self._state is None:
            if device == devices.CPU:
                self._state = TrainState(self.weights, self.optimizer, self._slots_kept)
            else:
                self._state = DeviceTrainState(self.weights, self.optimizer, self._slots_kept, device)
            self._programs = {
                k: v for k, v in self._programs.items() if k[0] != "train"
            }  # bound to old arrays
        return self._state

    def _weights_for(self, program) -> tuple[list, object]:
        """The weights as `program.run` takes them, and what must stay alive meanwhile:
        on the CPU the layers' arrays; on a GPU the device addresses where training
        left them, else the layers' values uploaded (one copy) for this call."""
        state = self._state
        if isinstance(state, DeviceTrainState) and state.device == program.device:
            addresses = state.weight_addresses()
            if addresses is not None:
                return addresses, state
        self._sync()
        values = [w.value for w in self.weights]
        if program.device == devices.CPU:
            return values, None
        staging = Staging(program.compiled, [(v.shape, "float32") for v in values], "the weights")
        for dst, src in zip(staging.arrays, values):
            dst[...] = src
        staging.upload()
        return staging.addresses, staging

    # ------------------------------------------------------------------ fit / evaluate / predict

    def _check_compiled(self) -> list[Target]:
        if self.optimizer is None:
            raise RuntimeError("You must call `compile()` before using the model.")
        return self._targets(0)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs: int = 1,
        verbose="auto",
        callbacks=None,
        validation_split: float = 0.0,
        validation_data=None,
        shuffle=True,
        initial_epoch: int = 0,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"fit() got unexpected keyword argument(s) {sorted(kwargs)}")
        targets = self._check_compiled()
        xs = self._prepare_x(x)
        n = len(xs[0])
        ys = self._prepare_y(y, n, targets)
        validation = None
        if validation_data is not None:
            val_xs = self._prepare_x(validation_data[0])
            validation = (val_xs, self._prepare_y(validation_data[1], len(val_xs[0]), targets))
        elif validation_split:
            split = int(n * (1 - validation_split))
            if split == 0 or split == n:
                raise ValueError(f"validation_split={validation_split} leaves no training or validation data")
            validation = ([a[split:] for a in xs], [a[split:] for a in ys])
            xs, ys, n = [a[:split] for a in xs], [a[:split] for a in ys], split
        batch = int(batch_size or DEFAULT_BATCH_SIZE)
        steps = -(-n // batch)
        verbose = 1 if verbose == "auto" else int(verbose)
        device = self._device()
        group = self._process_group(device)
        chief = group is None or group.rank == 0
        history = callbacks_module.History()
        cbs = callbacks_module.CallbackList(
            [*(callbacks or []), history], self, verbose=verbose, epochs=epochs, steps=steps, chief=chief
        )
        self.stop_training = False
        self._train_state(device)
        if group is not None:
            val_rows = len(validation[0][0]) if validation is not None else 0
            fit_args = {"batch_size": batch, "samples": n, "epochs": epochs, "initial_epoch": initial_epoch,
                        "shuffle": bool(shuffle), "validation_samples": val_rows}  # fmt: skip
            data_parallel.start(self, group, fit_args)
        with contextlib.nullcontext() if chief else contextlib.redirect_stdout(io.StringIO()):
            cbs.on_train_begin()
            for epoch in range(initial_epoch, epochs):
                cbs.on_epoch_begin(epoch)
                order = utils.rng().permutation(n) if shuffle else np.arange(n)
                totals = _Totals()
                for step in range(steps):
                    idx = order[step * batch : (step + 1) * batch]
                    cbs.on_train_batch_begin(step)
                    logs = self._train_batch(xs, ys, idx, totals, device, group)
                    cbs.on_train_batch_end(step, logs)
                logs = totals.logs()
                if validation is not None:
                    val = self._evaluate(*validation, batch, device).logs()
                    logs.update({f"val_{k}": v for k, v in val.items()})
                self._sync()
                cbs.on_epoch_end(epoch, logs)
                if self.stop_training:
                    break
            cbs.on_train_end()
        self._sync()
        self.history = history
        return history

    def _process_group(self, device: str) -> distribution.ProcessGroup | None:
        """The processes this model trains with (keras.distribution.DataParallel), or None."""
        group = distribution.process_group()
        if group is not None and device != devices.CPU:
            raise distribution.DistributedError(
                f"DataParallel trains on the CPU; this fit runs on {device} (keras.device)"
            )
        return group

    def _train_batch(self, xs, ys, idx, totals: _Totals, device: str, group=None) -> dict:
        size = len(idx)
        if group is not None:
            key = ("train", "data_parallel", device)
            if key not in self._programs:
                self._programs[key] = data_parallel.DataParallelStep(self, self._state, group)
            step = self._programs[key]
            step.run(xs, ys, idx, self.optimizer.iterations)
            self.optimizer.iterations += 1
            totals.add(step, float(step.loss), [float(v) for v in step.losses], size,
                       [float(s) for s in step.metric_sums])  # fmt: skip
            return totals.logs()
        step = self._program("train", size, device)
        for src, dst in zip([*xs, *ys], [*step.xs, *step.ys]):
            np.take(src, idx, axis=0, out=dst)
        for mask, (layer, shape) in zip(step.masks, step.program.masks):
            mask[...] = layer.draw_mask(utils.rng(), shape)
        for name, value in self.optimizer.step_scalars().items():
            step.scalars[name][...] = value
        state = self._state
        step.calls[state.current]()
        state.advance()
        self.optimizer.iterations += 1
        totals.add(step.program, float(step.loss), [float(v) for v in step.losses], size,
                   [float(s) for s in step.metric_sums])  # fmt: skip
        return totals.logs()

    def train_on_batch(self, x, y, return_dict: bool = False):
        """One training step on this batch; the loss (and metrics) measured before it."""
        targets = self._check_compiled()
        xs = self._prepare_x(x)
        ys = self._prepare_y(y, len(xs[0]), targets)
        device = self._device()
        group = self._process_group(device)
        self._train_state(device)
        if group is not None:
            data_parallel.start(self, group, {"batch_size": len(xs[0])})
        totals = _Totals()
        logs = self._train_batch(xs, ys, np.arange(len(xs[0])), totals, device, group)
        self._sync()
        return logs if return_dict else self._as_list(totals)

    def _as_list(self, totals: _Totals):
        """evaluate()'s return: the loss alone, or [loss, per-output losses, metrics] (the
        metrics in compile order for one output, by name for several, as Keras orders them)."""
        if not totals.parts and not totals.metrics:
            return totals.loss / totals.count
        metric_order = sorted(totals.metric_order) if self._several_outputs else totals.metric_order
        logs = totals.logs()
        return [logs["loss"], *(logs[name] for name in [*totals.parts, *metric_order])]

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", return_dict: bool = False, **kwargs):
        if kwargs:
            raise TypeError(f"evaluate() got unexpected keyword argument(s) {sorted(kwargs)}")
        targets = self._targets(0)
        xs = self._prepare_x(x)
        ys = self._prepare_y(y, len(xs[0]), targets)
        totals = self._evaluate(xs, ys, int(batch_size or DEFAULT_BATCH_SIZE), self._device())
        return totals.logs() if return_dict else self._as_list(totals)

    def _evaluate(self, xs: list[np.ndarray], ys: list[np.ndarray], batch: int, device: str) -> _Totals:
        totals = _Totals()
        weights = None
        for start in range(0, len(xs[0]), batch):
            parts = [np.ascontiguousarray(a[start : start + batch]) for a in [*xs, *ys]]
            size = len(parts[0])
            program = self._program("evaluate", size, device)
            if weights is None:
                weights, _alive = self._weights_for(program)
            loss, *rest = program.run(parts, weights)
            n_losses = len(program.loss_names)
            totals.add(program, float(loss), [float(v) for v in rest[:n_losses]], size,
                       [float(s) for s in rest[n_losses:]])  # fmt: skip
        return totals

    def predict(self, x, batch_size=None, verbose="auto", **kwargs):
        """An array, or a list of arrays for a model with several outputs."""
        if kwargs:
            raise TypeError(f"predict() got unexpected keyword argument(s) {sorted(kwargs)}")
        return self._predict(self._prepare_x(x), int(batch_size or DEFAULT_BATCH_SIZE))

    def _predict(self, xs: list[np.ndarray], batch: int):
        device = self._device()
        weights = None
        parts: list[list[np.ndarray]] = [[] for _ in self._output_shapes]
        for start in range(0, len(xs[0]), batch):
            inputs = [np.ascontiguousarray(a[start : start + batch]) for a in xs]
            program = self._predict_program(len(inputs[0]), device)
            if weights is None:
                weights, _alive = self._weights_for(program)
            outputs = program.run(inputs, weights)
            for part, y in zip(parts, outputs):
                part.append(y)
        ys = [
            np.concatenate(p) if p else np.zeros((0, *shape), np.float32)
            for p, shape in zip(parts, self._output_shapes)
        ]
        return ys if self._several_outputs else ys[0]

    def save(self, filepath, overwrite: bool = True) -> None:
        """The .keras file real Keras 3 loads (written atomically)."""
        keras_file = file_format(".keras", filepath)
        if not overwrite and os.path.exists(filepath):
            raise FileExistsError(f"{filepath} exists and overwrite=False")
        if not self.built:
            raise ValueError("the model has no weights yet: build it (or fit it) before saving")
        self._sync()
        keras_file.save(self, filepath)

    def export(self, filepath, batch_size: int = 1, cpu: str | None = None, target: str = "cpu") -> Path:
        """The model for inference as a shared library with Kiln's C ABI (NAME_create,
        NAME_run, ... with NAME the file's stem) and its header beside it, the current
        weights inside. Inputs have a fixed batch size; `cpu` targets an LLVM CPU
        (e.g. "x86-64-v3") instead of this machine's; `target` "cuda" gives a library
        that runs on an NVIDIA GPU (compile_model's targets)."""
        from compiler import compile_model
        from frontends.keras.trainer import inference_graph

        path = Path(filepath)
        if path.suffix != ".so":
            raise ValueError(f"export writes a shared library: the filename must end in .so, got {filepath}")
        if not self.built:
            raise ValueError("the model has no weights yet: build it (or fit it) before exporting")
        self._sync()
        feeds = self._feeds(batch_size)
        graph = inference_graph(self._forward, self.weights, feeds, self.output_names, path.stem)
        return compile_model(graph, target=target, name=path.stem, cpu_name=cpu).save(path)

    def export_train(
        self, filepath, batch_size: int = 32, cpu: str | None = None, target: str = "cpu"
    ) -> Path:
        """The training step as a C library: NAME_trainer_create, NAME_train_step,
        NAME_get_param / NAME_set_param ... (see frontends/keras/export_train.py);
        target="cuda": the same API, training on an NVIDIA GPU."""
        from frontends.keras.export_train import export_train

        return export_train(self, filepath, batch_size, cpu, target)

    def save_weights(self, filepath) -> None:
        """Keras's .weights.h5 (the weights part of a .keras file), written atomically."""
        weights_file = file_format(".weights.h5", filepath)
        self._sync()
        weights_file.save(self, filepath)

    def load_weights(self, filepath) -> None:
        """The weights of a .weights.h5 file (and its optimizer state, once compiled)."""
        self._reset_state()
        serialization.FILE_FORMATS[".weights.h5"].load(self, filepath)

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict:
        """Keras's Functional config: each layer with the calls that feed it (inbound_nodes),
        in the model's layer order; inputs and outputs as [layer, call, output]."""
        calls: dict[int, list[LayerCall]] = {}
        for call in self._calls:
            calls.setdefault(id(call.layer), []).append(call)
        dtypes = dict(zip(map(id, self._inputs), self._input_dtypes))
        entries = []
        for layer in self.layers:
            if isinstance(layer, InputLayer):
                (t,) = [t for t in self._inputs if t.layer is layer]
                entries.append(
                    {**_input_entry(layer, dtypes[id(t)]), "name": layer.name, "inbound_nodes": []}
                )
                continue
            first = calls[id(layer)][0]
            shapes = [[None, *t.shape] for t in first.inputs]
            nodes = [
                {"args": [_arguments(call)], "kwargs": dict(layer.call_kwargs)} for call in calls[id(layer)]
            ]
            entry = _layer_entry(layer, shapes if first.many else shapes[0])
            entries.append({**entry, "name": layer.name, "inbound_nodes": nodes})
        return {"name": self.name, "trainable": True, "layers": entries, "input_layers": _ends(self._inputs),
                "output_layers": _ends(self._outputs)}  # fmt: skip

    @classmethod
    def from_config(cls, config: dict) -> Model:
        """Rebuild the layers and replay their calls (inbound_nodes) in the config's order."""
        tensors: dict[tuple, KerasTensor] = {}

        def tensor(arg):
            if isinstance(arg, list):
                return [tensor(a) for a in arg]
            key = tuple(arg["config"]["keras_history"])
            if key not in tensors:
                raise ValueError(f"layer input {list(key)} is not made by an earlier layer in the config")
            return tensors[key]

        for entry in config["layers"]:
            layer = serialization.deserialize(entry)
            if isinstance(layer, InputLayer):
                tensors[(layer.name, 0, 0)] = layer.tensor()
            for index, node in enumerate(entry["inbound_nodes"]):
                out = layer(tensor(node["args"][0]))
                for i, t in enumerate(out if isinstance(out, list) else [out]):
                    tensors[(layer.name, index, i)] = t

        def ends(spec):
            return [tensors[tuple(s)] for s in (spec if isinstance(spec[0], list) else [spec])]

        return cls(ends(config["input_layers"]), ends(config["output_layers"]), name=config.get("name"))

    def get_build_config(self) -> dict:
        return {"input_shape": None}  # a Functional model is built by its inputs

    def get_compile_config(self) -> dict | None:
        """compile()'s arguments as Keras writes them (None before compile)."""
        if self.optimizer is None or self.loss is None:
            return None
        return {"optimizer": serialize(self.optimizer), "loss": _names(self.loss),
                "loss_weights": self._loss_weights_spec, "metrics": _names(self._metric_ids) or None,
                "weighted_metrics": None, "run_eagerly": False, "steps_per_execution": 1,
                "jit_compile": False}  # fmt: skip

    def compile_from_config(self, config: dict) -> None:
        self.compile(
            optimizer=optimizers_module.get(config["optimizer"]),
            loss=config["loss"],
            metrics=config.get("metrics"),
            loss_weights=config.get("loss_weights"),
        )

    def save_optimizer_variables(self, store) -> None:
        """The optimizer's variables into a weights file's store, in Keras's order:
        iterations, learning rate, then each trainable weight's slots."""
        if self.optimizer is None:
            return
        store["0"] = np.array(self.optimizer.iterations, np.int32)
        store["1"] = np.array(self.optimizer.learning_rate, np.float32)
        slots = self._state.slot_values() if self._state is not None else self._slots_kept or {}
        for i, (w, s) in enumerate(self._slot_order(), start=2):
            store[str(i)] = slots.get((w.name, s), np.full(w.shape, self.optimizer.slots[s], np.float32))

    def load_optimizer_variables(self, store) -> None:
        """What save_optimizer_variables wrote (or Keras did); slots whose shape does not
        fit are left to start afresh."""
        if "0" not in store:
            return
        self.optimizer.iterations = int(store["0"][()])
        self.optimizer.learning_rate = float(store["1"][()])
        self._slots_kept = {
            (w.name, s): np.asarray(store[str(i)], np.float32)
            for i, (w, s) in enumerate(self._slot_order(), start=2)
            if str(i) in store and store[str(i)].shape == w.shape
        }

    def _slot_order(self) -> list[tuple[Weight, str]]:
        return [(w, s) for w in self.weights if w.trainable for s in self.optimizer.slots]

    def __call__(self, x, training: bool = False):
        xs = self._prepare_x(x)
        return self._predict(xs, len(xs[0]))  # all of x as one batch, as Keras calls a model

    def summary(self, print_fn=print) -> None:
        from frontends.keras.summary import summary

        print_fn(summary(self))


def _keras_layer_order(postorder: list[LayerCall], first_seen: dict[int, int], inputs) -> list[Layer]:
    """Keras's order of a Functional model's layers (which fixes get_weights' order and
    the weight file's layout): deepest first (depth: the longest path to an output),
    ties in the order a walk from the outputs first meets them."""
    call_depth: dict[int, int] = {}
    layer_depth: dict[int, int] = {}
    layers: dict[int, Layer] = {}
    for call in reversed(postorder):
        depth = max(call_depth.get(id(call), 0), layer_depth.get(id(call.layer), 0))
        layer_depth[id(call.layer)] = call_depth[id(call)] = depth
        layers[id(call.layer)] = call.layer
        for parent in call.inputs:
            call_depth[id(parent.call)] = max(depth + 1, call_depth.get(id(parent.call), 0))
    for t in inputs:  # an input no output depends on
        layers.setdefault(id(t.layer), t.layer)
        layer_depth.setdefault(id(t.layer), 0)
        first_seen.setdefault(id(t.layer), -1)
    order = sorted(layers, key=lambda k: (-layer_depth[k], first_seen[k]))
    return [layers[k] for k in order]


def _tensors(tensors, what: str) -> list[KerasTensor]:
    listed = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    if not listed or not all(isinstance(t, KerasTensor) for t in listed):
        raise TypeError(
            f"{what} must be keras.Input / layer output tensors, or lists of them; got {tensors!r}"
        )
    return listed


class _Totals:
    """Keras's epoch logs: the losses weighted by batch size, metrics streamed over samples."""

    def __init__(self):
        self.loss = 0.0
        self.count = 0
        self.parts: dict[str, float] = {}  # each output's own loss (several outputs)
        self.metrics: dict[str, float] = {}
        self.metric_order: list[str] = []

    def add(self, program, loss: float, parts: list[float], n: int, sums: list[float]) -> None:
        self.loss += loss * n
        self.count += n
        for name, part in zip(program.loss_names, parts):
            self.parts[name] = self.parts.get(name, 0.0) + part * n
        for name, s in zip(program.metric_names, sums):
            if name not in self.metrics:
                self.metric_order.append(name)
            self.metrics[name] = self.metrics.get(name, 0.0) + s

    def logs(self) -> dict:
        logs = {name: total / self.count for name, total in {**self.parts, **self.metrics}.items()}
        logs["loss"] = self.loss / self.count
        return dict(sorted(logs.items()))


@register
class Sequential(Model):
    keras_module = "keras"
    registered_name = None

    def __init__(self, layers=None, name: str | None = None):
        super().__init__(name=name or auto_name("sequential"))
        self._input_layer: InputLayer | None = None
        for layer in layers or []:
            self.add(layer)

    def _forward(self, ctx, xs, training: bool):
        (x,) = xs
        for layer in self.layers:
            x = layer.call(ctx, x, training)
        return [x]

    def _connections(self) -> None:
        return None

    def _layer_shapes(self):
        shape, out = self._input_shapes[0] if self.built else None, []
        for layer in self.layers:
            shape = layer.compute_output_shape(shape) if shape is not None else None
            out.append((layer, [shape] if shape is not None else None))
        return out

    @property
    def _input_dtypes(self) -> list[str]:
        first = self.layers[0] if self.layers else None
        given = self._input_layer.dtype if self._input_layer is not None else None
        return [given or getattr(first, "input_dtype", "float32")]

    def build(self, input_shape) -> None:
        """input_shape with or without the batch axis (None or a number first)."""
        shape = tuple(input_shape)
        if shape and shape[0] is None:
            shape = shape[1:]
        s = tuple(int(d) for d in shape)
        self._input_shapes = [s]
        if self._input_layer is None:
            self._input_layer = InputLayer(shape=s)  # the input a config names, as Keras makes it
        for layer in self.layers:
            if not layer.built:
                layer.build(s)
            s = layer.compute_output_shape(s)
        self._output_shapes = [s]

    def add(self, layer: Layer) -> None:
        if isinstance(layer, KerasTensor):  # keras.Input(shape) as the first entry
            layer = layer.layer
        if isinstance(layer, InputLayer):
            if self.layers:
                raise ValueError("an Input must be the first layer of a Sequential model")
            self._input_layer = layer
            self.build(layer.shape)
            return
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add takes a layer, got {type(layer).__name__}")
        if getattr(layer, "return_state", False):
            raise ValueError(
                f"All layers in a Sequential model should have a single output tensor; {layer.name} "
                "returns its states too (return_state=True): use the Functional API"
            )
        first = not self.layers
        self.layers.append(layer)
        if first and layer.input_shape_hint is not None and not self.built:
            self.build(layer.input_shape_hint)
        elif self.built:
            s = self._input_shapes[0]
            for previous in self.layers[:-1]:
                s = previous.compute_output_shape(s)
            if not layer.built:
                layer.build(s)
            self._output_shapes = [layer.compute_output_shape(s)]
        self._programs = {}
        self._state = None

    def get_config(self) -> dict:
        """Keras's Sequential config: its input, then each layer with the shape it was built for."""
        config = {"name": self.name, "trainable": True, "dtype": dtype_policy()}
        if not self.built:
            return {**config, "layers": [serialize(layer) for layer in self.layers]}
        shape = self._input_shapes[0]
        layers = [_input_entry(self._input_layer, self._input_dtypes[0])]
        for layer in self.layers:
            layers.append(_layer_entry(layer, [None, *shape]))
            shape = layer.compute_output_shape(shape)
        return {**config, "layers": layers, "build_input_shape": [None, *self._input_shapes[0]]}

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        model = cls(name=config.get("name"))
        for entry in config["layers"]:
            model.add(serialization.deserialize(entry))
        if not model.built and config.get("build_input_shape"):
            model.build(config["build_input_shape"])
        return model

    def get_build_config(self) -> dict | None:
        return {"input_shape": [None, *self._input_shapes[0]]} if self.built else None


def load_model(filepath, compile: bool = True) -> Model:
    """A .keras file written by real Keras 3 or by Kiln."""
    return serialization.FILE_FORMATS[".keras"].load(filepath, compile)


def _input_entry(layer: InputLayer, dtype: str) -> dict:
    """An InputLayer's entry, with the dtype the model takes there."""
    entry = serialize(layer)
    entry["config"]["dtype"] = dtype
    return entry


def _layer_entry(layer: Layer, input_shape) -> dict:
    entry = serialize(layer)
    if layer.records_build:
        entry["build_config"] = {"input_shape": input_shape}
    return entry


def _history(t: KerasTensor) -> list:
    """A tensor as Keras's config names it: [layer, call, output]."""
    return [t.layer.name, t.call.index, t.index]


def _arguments(call: LayerCall):
    """A call's input tensors as Keras's config writes them (a list if given as one)."""
    tensors = [
        {"class_name": "__keras_tensor__",
         "config": {"shape": [None, *t.shape], "dtype": "float32", "keras_history": _history(t)}}
        for t in call.inputs
    ]  # fmt: skip
    return tensors if call.many else tensors[0]


def _ends(tensors: list[KerasTensor]) -> list:
    """A model's inputs or outputs in its config: one [layer, call, output], or a list of them."""
    return _history(tensors[0]) if len(tensors) == 1 else [_history(t) for t in tensors]


def _names(spec):
    """compile()'s loss or metrics as Keras stores them: names, in the structure given."""
    if isinstance(spec, (list, tuple)):
        return [_names(s) for s in spec]
    if isinstance(spec, dict):
        return {k: _names(v) for k, v in spec.items()}
    return spec if spec is None or isinstance(spec, str) else spec.name
