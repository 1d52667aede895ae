"""Keras models: Sequential, with compile / fit / evaluate / predict as Keras 3 defines
them (keras-behaviour.md §5), running the programs of trainer.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from frontends.keras import callbacks as callbacks_module
from frontends.keras import losses as losses_module
from frontends.keras import metrics as metrics_module
from frontends.keras import optimizers as optimizers_module
from frontends.keras import utils
from frontends.keras.layers import InputLayer, KerasTensor, Layer, Weight, _auto_name
from frontends.keras.trainer import BoundStep, TrainState, build_evaluate, build_predict, build_train

DEFAULT_BATCH_SIZE = 32


def _as_array(data, name: str) -> np.ndarray:
    """Lists and arrays alike; floats become float32 (Keras's floatx), ints stay ints."""
    a = np.asarray(data)
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
    elif a.dtype.kind not in "iub":
        raise TypeError(f"{name}: expected numbers, got an array of {a.dtype}")
    return np.ascontiguousarray(a)


class Model:
    """keras.Model(inputs, outputs): the Functional API (one input and one output tensor;
    layers in between may branch and join, with Add and Concatenate). Sequential is
    the subclass for a chain of layers."""

    def __init__(self, inputs=None, outputs=None, name: str | None = None):
        self.name = name or _auto_name("functional" if inputs is not None else "model")
        self.layers: list[Layer] = []
        self._nodes: list[KerasTensor] = []
        self.optimizer = None
        self.loss = None
        self.compiled_metrics: list = []
        self.stop_training = False
        self.history = None
        self._programs: dict = {}
        self._state: TrainState | None = None
        self._input_shape: tuple[int, ...] | None = None
        if inputs is not None or outputs is not None:
            self._connect(inputs, outputs)

    def _connect(self, inputs, outputs) -> None:
        """The layer calls between the input and output tensors, in an order that computes
        each tensor after its inputs."""
        inputs, outputs = _single(inputs, "inputs"), _single(outputs, "outputs")
        order: list[KerasTensor] = []
        seen: set[int] = set()

        def visit(t: KerasTensor) -> None:
            if id(t) in seen:
                return
            seen.add(id(t))
            if t is not inputs:
                if not t.inputs:
                    raise ValueError(f"{t} does not come from the model's input {inputs}")
                for parent in t.inputs:
                    visit(parent)
            order.append(t)

        visit(outputs)
        self._nodes = order
        self.layers = list(dict.fromkeys(t.layer for t in order))
        self._input_tensor, self._output_tensor = inputs, outputs
        self._input_shape, self._output_shape = inputs.shape, outputs.shape

    def _forward(self, ctx, x, training: bool):
        """The model's computation as graph ops: x → y."""
        values = {id(self._input_tensor): x}
        for t in self._nodes:
            if t is self._input_tensor:
                continue
            args = [values[id(parent)] for parent in t.inputs]
            values[id(t)] = t.layer.call(ctx, args if len(args) > 1 else args[0], training)
        return values[id(self._output_tensor)]

    def _layer_shapes(self) -> list[tuple[Layer, tuple[int, ...] | None]]:
        """Each layer with its output shape (for summary)."""
        return [(t.layer, t.shape) for t in self._nodes]

    # ------------------------------------------------------------------ structure

    @property
    def built(self) -> bool:
        return self._input_shape is not None

    def build(self, input_shape) -> None:
        """input_shape with or without the batch axis (None or a number first)."""
        shape = tuple(input_shape)
        if shape and shape[0] is None:
            shape = shape[1:]
        self._input_shape = tuple(int(d) for d in shape)
        s = self._input_shape
        for layer in self.layers:
            if not layer.built:
                layer.build(s)
            s = layer.compute_output_shape(s)
        self._output_shape = s

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

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs) -> None:
        unknown = set(kwargs) - {"loss_weights", "weighted_metrics", "run_eagerly", "jit_compile"}
        if unknown:
            raise TypeError(f"compile() got unexpected keyword argument(s) {sorted(unknown)}")
        self.optimizer = optimizers_module.get(optimizer)
        self.loss = losses_module.get(loss) if loss is not None else None
        self._metric_ids = list(metrics or [])
        self._programs = {}
        self._state = None
        self._slots_kept = None

    def _metrics_for(self, y_shape, pred_shape) -> list:
        return [metrics_module.resolve(m, y_shape, pred_shape) for m in self._metric_ids]

    # ------------------------------------------------------------------ data

    def _prepare_x(self, x) -> np.ndarray:
        x = _as_array(x, "x")
        if not self.built:
            self.build(x.shape[1:] if x.ndim > 1 else (1,))
        if x.ndim == 1 and self._input_shape == (1,):  # one feature, given as a flat list (TF2 took it)
            x = x.reshape(-1, 1)
        if x.shape[1:] != self._input_shape:
            raise ValueError(
                f"Input has shape {x.shape}, but model {self.name} expects "
                f"(batch, {', '.join(map(str, self._input_shape))})"
            )
        return np.ascontiguousarray(x, dtype=self._input_dtype)

    @property
    def _input_dtype(self) -> str:
        """float32, or int64 when the first layer takes indices (Embedding)."""
        first = (
            self.layers[1]
            if self.layers and isinstance(self.layers[0], InputLayer)
            else (self.layers[0] if self.layers else None)
        )
        return getattr(first, "input_dtype", "float32")

    def _prepare_y(self, y, n: int) -> np.ndarray:
        y = _as_array(y, "y")
        if len(y) != n:
            raise ValueError(f"x has {n} samples but y has {len(y)}")
        if self.loss.sparse:
            return np.ascontiguousarray(y.reshape(n).astype(np.int64))
        out = self._output_shape
        y = y.astype(np.float32)
        if y.shape[1:] != out and y.size == n * int(np.prod(out)):
            y = y.reshape((n, *out))  # (N,) labels against (N, 1) predictions: aligned, not broadcast
        if y.shape[1:] != out:
            raise ValueError(f"y has shape {y.shape}; the model's output is (batch, {out})")
        return np.ascontiguousarray(y)

    # ------------------------------------------------------------------ programs

    def _program(self, kind: str, batch: int, y_shape=None, y_dtype=None):
        key = (kind, batch)
        if key not in self._programs:
            weights = self.weights
            x_shape, x_dtype = (batch, *self._input_shape), self._input_dtype
            pred_shape = (batch, *self._output_shape)
            if kind == "predict":
                self._programs[key] = build_predict(self._forward, weights, x_shape, x_dtype)
            else:
                metrics = self._metrics_for(y_shape, pred_shape)
                args = (self._forward, weights, x_shape, x_dtype, y_shape, y_dtype, self.loss, metrics)
                if kind == "evaluate":
                    self._programs[key] = build_evaluate(*args)
                else:
                    program = build_train(*args, self.optimizer)
                    self._programs[key] = BoundStep(
                        program, self._train_state(), x_shape, x_dtype, y_shape, y_dtype, self.optimizer
                    )
        return self._programs[key]

    def _train_state(self) -> TrainState:
        if self._state is None:
            self._state = TrainState(self.weights, self.optimizer, getattr(self, "_slots_kept", None))
            self._programs = {
                k: v for k, v in self._programs.items() if k[0] != "train"
            }  # bound to old arrays
        return self._state

    # ------------------------------------------------------------------ fit / evaluate / predict

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
        if self.optimizer is None or self.loss is None:
            raise RuntimeError("You must call `compile()` before using the model.")
        x = self._prepare_x(x)
        y = self._prepare_y(y, len(x))
        if validation_data is None and validation_split:
            split = int(len(x) * (1 - validation_split))
            if split == 0 or split == len(x):
                raise ValueError(f"validation_split={validation_split} leaves no training or validation data")
            validation_data = (x[split:], y[split:])
            x, y = x[:split], y[:split]
        batch = int(batch_size or DEFAULT_BATCH_SIZE)
        n = len(x)
        steps = -(-n // batch)
        verbose = 1 if verbose == "auto" else int(verbose)
        history = callbacks_module.History()
        cbs = callbacks_module.CallbackList(
            [*(callbacks or []), history], self, verbose=verbose, epochs=epochs, steps=steps
        )
        self.stop_training = False
        self._train_state()
        cbs.on_train_begin()
        for epoch in range(initial_epoch, epochs):
            cbs.on_epoch_begin(epoch)
            order = utils.rng().permutation(n) if shuffle else np.arange(n)
            totals = _Totals()
            for step in range(steps):
                idx = order[step * batch : (step + 1) * batch]
                cbs.on_train_batch_begin(step)
                logs = self._train_batch(x, y, idx, totals)
                cbs.on_train_batch_end(step, logs)
            logs = totals.logs()
            if validation_data is not None:
                val = self.evaluate(*validation_data, batch_size=batch, verbose=0, return_dict=True)
                logs.update({f"val_{k}": v for k, v in val.items()})
            self._sync()
            cbs.on_epoch_end(epoch, logs)
            if self.stop_training:
                break
        cbs.on_train_end()
        self._sync()
        self.history = history
        return history

    def _train_batch(self, x, y, idx, totals: _Totals) -> dict:
        size = len(idx)
        step = self._program("train", size, (size, *y.shape[1:]), y.dtype.name)
        np.take(x, idx, axis=0, out=step.x)
        np.take(y, idx, axis=0, out=step.y)
        for mask, (layer, shape) in zip(step.masks, step.program.masks):
            mask[...] = layer.draw_mask(utils.rng(), shape)
        for name, value in self.optimizer.step_scalars().items():
            step.scalars[name][...] = value
        state = self._state
        step.calls[state.current]()
        state.current ^= 1
        self.optimizer.iterations += 1
        totals.add(float(step.loss), size, step.program.metric_names, [float(s) for s in step.metric_sums])
        return totals.logs()

    def train_on_batch(self, x, y, return_dict: bool = False):
        """One training step on this batch; the loss (and metrics) measured before it."""
        if self.optimizer is None or self.loss is None:
            raise RuntimeError("You must call `compile()` before using the model.")
        x = self._prepare_x(x)
        y = self._prepare_y(y, len(x))
        self._train_state()
        totals = _Totals()
        logs = self._train_batch(x, y, np.arange(len(x)), totals)
        self._sync()
        if return_dict:
            return logs
        return (
            logs["loss"] if not self._metric_ids else [logs["loss"], *(logs[n] for n in totals.metric_order)]
        )

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", return_dict: bool = False, **kwargs):
        if kwargs:
            raise TypeError(f"evaluate() got unexpected keyword argument(s) {sorted(kwargs)}")
        if self.loss is None:
            raise RuntimeError("You must call `compile()` before using the model.")
        x = self._prepare_x(x)
        y = self._prepare_y(y, len(x))
        self._sync()
        weights = [w.value for w in self.weights]
        batch = int(batch_size or DEFAULT_BATCH_SIZE)
        totals = _Totals()
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            program = self._program("evaluate", len(xb), yb.shape, yb.dtype.name)
            loss, *sums = program.compiled.run(np.ascontiguousarray(xb), np.ascontiguousarray(yb), *weights)
            totals.add(float(loss), len(xb), program.metric_names, [float(s) for s in sums])
        logs = totals.logs()
        if return_dict:
            return logs
        if not self._metric_ids:
            return logs["loss"]
        return [logs["loss"], *(logs[name] for name in totals.metric_order)]

    def predict(self, x, batch_size=None, verbose="auto", **kwargs) -> np.ndarray:
        if kwargs:
            raise TypeError(f"predict() got unexpected keyword argument(s) {sorted(kwargs)}")
        x = self._prepare_x(x)
        self._sync()
        weights = [w.value for w in self.weights]
        batch = int(batch_size or DEFAULT_BATCH_SIZE)
        parts = []
        for start in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[start : start + batch])
            parts.append(self._program("predict", len(xb)).compiled.run(xb, *weights)[0])
        return np.concatenate(parts) if parts else np.zeros((0, *self._output_shape), np.float32)

    def save(self, filepath, overwrite: bool = True) -> None:
        """The .keras file real Keras 3 loads (written atomically)."""
        from frontends.keras.saving import save_model

        if not overwrite and os.path.exists(filepath):
            raise FileExistsError(f"{filepath} exists and overwrite=False")
        save_model(self, filepath)

    def export(self, filepath, batch_size: int = 1) -> Path:
        """The model for inference as a shared library with Kiln's C ABI (NAME_create,
        NAME_run, ... with NAME the file's stem) and its header beside it, the current
        weights inside. Inputs have a fixed batch size."""
        from compiler import compile_model
        from frontends.keras.trainer import inference_graph

        path = Path(filepath)
        if path.suffix != ".so":
            raise ValueError(f"export writes a shared library: the filename must end in .so, got {filepath}")
        if not self.built:
            raise ValueError("the model has no weights yet: build it (or fit it) before exporting")
        self._sync()
        shape = (batch_size, *self._input_shape)
        graph = inference_graph(self._forward, self.weights, shape, self._input_dtype, path.stem)
        return compile_model(graph, name=path.stem).save(path)

    def export_train(self, filepath, batch_size: int = 32) -> Path:
        """The training step as a C library: NAME_trainer_create, NAME_train_step,
        NAME_get_param / NAME_set_param ... (see frontends/keras/export_train.py)."""
        from frontends.keras.export_train import export_train

        return export_train(self, filepath, batch_size)

    def save_weights(self, filepath) -> None:
        """Keras's .weights.h5 (the weights part of a .keras file), written atomically."""
        from frontends.keras.saving import write_weights_file

        if not str(filepath).endswith(".weights.h5"):
            raise ValueError(f"The filename must end in `.weights.h5`. Received: filepath={filepath}")
        self._sync()
        write_weights_file(self, filepath)

    def load_weights(self, filepath) -> None:
        from frontends.keras.saving import read_weights_file

        read_weights_file(self, filepath)
        self._reset_state()

    def __call__(self, x, training: bool = False):
        return self.predict(x, batch_size=len(x))

    def summary(self, print_fn=print) -> None:
        from frontends.keras.summary import summary

        print_fn(summary(self))


def _single(tensors, what: str) -> KerasTensor:
    if isinstance(tensors, (list, tuple)):
        if len(tensors) != 1:
            raise ValueError(
                f"Kiln's Functional models take one input and one output tensor; {what} has {len(tensors)}"
            )
        tensors = tensors[0]
    if not isinstance(tensors, KerasTensor):
        raise TypeError(f"{what} must be keras.Input / layer output tensors, got {type(tensors).__name__}")
    return tensors


class _Totals:
    """Keras's epoch logs: loss weighted by batch size, metrics streamed over samples."""

    def __init__(self):
        self.loss = 0.0
        self.count = 0
        self.metrics: dict[str, float] = {}
        self.metric_order: list[str] = []

    def add(self, loss: float, n: int, names: list[str], sums: list[float]) -> None:
        self.loss += loss * n
        self.count += n
        for name, s in zip(names, sums):
            if name not in self.metrics:
                self.metric_order.append(name)
            self.metrics[name] = self.metrics.get(name, 0.0) + s

    def logs(self) -> dict:
        logs = {name: total / self.count for name, total in self.metrics.items()}
        logs["loss"] = self.loss / self.count
        return dict(sorted(logs.items()))


class Sequential(Model):
    def __init__(self, layers=None, name: str | None = None):
        super().__init__(name=name or _auto_name("sequential"))
        for layer in layers or []:
            self.add(layer)

    def _forward(self, ctx, x, training: bool):
        for layer in self.layers:
            x = layer.call(ctx, x, training)
        return x

    def _layer_shapes(self):
        shape, out = self._input_shape, []
        for layer in self.layers:
            shape = layer.compute_output_shape(shape) if shape is not None else None
            out.append((layer, shape))
        return out

    def add(self, layer: Layer) -> None:
        if isinstance(layer, KerasTensor):  # keras.Input(shape) as the first entry
            layer = layer.layer
        if isinstance(layer, InputLayer):
            if self.layers:
                raise ValueError("an Input must be the first layer of a Sequential model")
            self.build(layer.shape)
            return
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add takes a layer, got {type(layer).__name__}")
        first = not self.layers
        self.layers.append(layer)
        if first and layer.input_shape_hint is not None and not self.built:
            self.build(layer.input_shape_hint)
        elif self.built:
            s = self._input_shape
            for previous in self.layers[:-1]:
                s = previous.compute_output_shape(s)
            if not layer.built:
                layer.build(s)
            self._output_shape = layer.compute_output_shape(s)
        self._programs = {}
        self._state = None


def load_model(filepath, compile: bool = True) -> Model:
    """A .keras file written by real Keras 3 or by Kiln."""
    from frontends.keras.saving import load_model as load

    return load(filepath, compile=compile)
