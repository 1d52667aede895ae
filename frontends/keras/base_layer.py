"""What every Keras layer is: its weights, its config, its calls in the Functional API.

A layer holds its weights (numpy, Keras's layouts and order) and writes its computation
into a graph: `call(ctx, x, training)` gets the graph context, which hands out the
Values of the layer's weights and, in training, its dropout masks. It describes itself
as Keras does (`get_config`, `from_config`) and reads and writes its own variables in
a weights file's store (`save_own_variables`, `load_own_variables`).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import defaultdict
from typing import Any, ClassVar

import numpy as np

from frontends.keras import initializers
from frontends.keras.serialization import dtype_policy, register, snake_case
from ir.graph import Value

_counters: dict[str, itertools.count] = defaultdict(itertools.count)


def auto_name(prefix: str) -> str:
    """dense, dense_1, dense_2, ...: Keras's process-wide naming."""
    n = next(_counters[prefix])
    return prefix if n == 0 else f"{prefix}_{n}"


class Weight:
    """One variable: its name, value (float32) and whether training updates it."""

    def __init__(self, name: str, value: np.ndarray, trainable: bool = True):
        self.name, self.trainable = name, trainable
        self.value = value

    @property
    def value(self) -> np.ndarray:
        return self._value

    @value.setter
    def value(self, array) -> None:
        """Always a float32, C-contiguous copy: the compiled programs read it as it lies."""
        self._value = np.array(array, np.float32, order="C")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape


class Layer:
    keras_module: ClassVar[str] = "keras.layers"
    registered_name: ClassVar[str | None] = None
    keras_name: ClassVar[str]
    #: Keras's options that Kiln has at one value only (data_format "channels_last"):
    #: written as they are; a config with another value is refused
    fixed_options: ClassVar[dict[str, Any]] = {}
    #: Keras's options that only training reads (regularizers, constraints, recurrent
    #: dropout) and Kiln does not have: written at Keras's defaults, not read, so that a
    #: model using them still loads
    training_options: ClassVar[dict[str, Any]] = {}
    #: where a weights file keeps the layer's variables, under the layer's group
    variables_path: ClassVar[str] = "vars"
    #: the keyword arguments a Functional config records for each call of the layer
    call_kwargs: ClassVar[dict[str, Any]] = {}
    #: whether a model's config records the input shape the layer was built for (Keras
    #: does not for layers with no build step of their own: pooling, reshaping, dropout)
    records_build: ClassVar[bool] = True

    def __init__(
        self, name: str | None = None, input_shape=None, input_dim=None, trainable: bool = True, **kwargs
    ):
        if kwargs:
            raise TypeError(f"Unrecognized keyword arguments passed to {type(self).__name__}: {kwargs}")
        self.name = name or auto_name(snake_case(type(self).__name__))
        self.trainable = trainable
        self.weights: list[Weight] = []
        self.built = False
        self.input_shape_hint: tuple[int, ...] | None = None
        self._calls = 0  # Functional API calls so far
        if input_shape is not None or input_dim is not None:
            warnings.warn(
                "Do not pass an `input_shape`/`input_dim` argument to a layer. When using Sequential "
                "models, prefer using an `Input(shape)` object as the first layer in the model instead.",
                UserWarning,
                stacklevel=3,
            )
            self.input_shape_hint = tuple(input_shape) if input_shape is not None else (int(input_dim),)

    def __call__(self, inputs):
        """Functional API: call the layer on KerasTensor(s); it is built on first use. A
        layer with several outputs (an RNN with return_state) gives a list of tensors."""
        many = isinstance(inputs, (list, tuple))
        tensors = list(inputs) if many else [inputs]
        if not all(isinstance(t, KerasTensor) for t in tensors):
            raise TypeError(
                f"{self.name}: call layers on keras.Input tensors (for arrays, use model.predict)"
            )
        shapes = [t.shape for t in tensors]
        shape_in = shapes if many else shapes[0]
        if not self.built:
            self.build(shape_in)
        shape_out = self.compute_output_shape(shape_in)
        call = LayerCall(self, tensors, many)
        if isinstance(shape_out, list):
            call.outputs = [KerasTensor(s, call, i) for i, s in enumerate(shape_out)]
            return list(call.outputs)
        call.outputs = [KerasTensor(shape_out, call, 0)]
        return call.outputs[0]

    def add_weight(self, name: str, shape: tuple[int, ...], initializer, trainable: bool = True) -> Weight:
        w = Weight(f"{self.name}/{name}", initializers.get(initializer)(tuple(shape)), trainable)
        self.weights.append(w)
        return w

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.built = True

    def compute_output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def call(self, ctx, x: Value, training: bool) -> Value:
        raise NotImplementedError

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict:
        """Keras's config of the layer: what its constructor takes, as Keras writes it."""
        options = {**self.fixed_options, **self.training_options}
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": dtype_policy(),
            **copy.deepcopy(options),
        }

    @classmethod
    def from_config(cls, config: dict) -> Layer:
        """The layer a Keras config describes (computing in float32 whatever its dtype policy)."""
        for key, value in cls.fixed_options.items():
            if config.get(key, value) != value:
                raise ValueError(
                    f"layer {config.get('name')} ({cls.keras_name}): {key}={config[key]!r} is not "
                    f"supported; Kiln has {key}={value!r}"
                )
        skipped = {"dtype", *cls.fixed_options, *cls.training_options}
        return cls(**{key: value for key, value in config.items() if key not in skipped})

    def initializer_config(self, *weights: str) -> dict:
        """The `<weight>_initializer` entries of the layer's config."""
        return {
            f"{w}_initializer": initializers.serialize(getattr(self, f"{w}_initializer")) for w in weights
        }

    # ------------------------------------------------------------------ weights

    @property
    def ordered_weights(self) -> list[Weight]:
        """Keras's order: the trainable weights, then the others."""
        return [w for w in self.weights if w.trainable] + [w for w in self.weights if not w.trainable]

    def get_weights(self) -> list[np.ndarray]:
        return [w.value.copy() for w in self.weights]

    def set_weights(self, values) -> None:
        if len(values) != len(self.weights):
            raise ValueError(f"layer {self.name} has {len(self.weights)} weights, got {len(values)}")
        for w, v in zip(self.weights, values):
            v = np.asarray(v, np.float32)
            if v.shape != w.shape:
                raise ValueError(f"layer {self.name}: weight {w.name} has shape {w.shape}, got {v.shape}")
            w.value = v

    def save_own_variables(self, store) -> None:
        """Write the weights into a weights file's store: "0", "1", ... in Keras's order."""
        for i, w in enumerate(self.ordered_weights):
            store[str(i)] = w.value

    def load_own_variables(self, store) -> None:
        """Read the weights save_own_variables wrote (or Keras did)."""
        ordered = self.ordered_weights
        if len(store) != len(ordered):
            raise ValueError(f"layer {self.name} has {len(ordered)} weights, the file {len(store)}")
        for i, w in enumerate(ordered):
            value = np.asarray(store[str(i)], np.float32)
            if value.shape != w.shape:
                raise ValueError(
                    f"layer {self.name}: weight {i} has shape {w.shape}, the file's {value.shape}"
                )
            w.value = value

    def count_params(self) -> int:
        return sum(w.value.size for w in self.weights)


class LayerCall:
    """One call of a layer in the Functional API: its input tensors (`many`: given as a
    list, as Add and Concatenate take them) and the output tensors it made. `index` counts
    the layer's calls (Keras's node index, shown in summary's "Connected to")."""

    def __init__(self, layer: Layer, inputs: list[KerasTensor], many: bool):
        self.layer, self.inputs, self.many = layer, inputs, many
        self.index = layer._calls
        layer._calls += 1
        self.outputs: list[KerasTensor] = []


class KerasTensor:
    """A symbolic value of the Functional API: a shape (without the batch axis), and the
    layer call that makes it as its output number `index`."""

    def __init__(self, shape: tuple[int, ...], call: LayerCall, index: int = 0):
        self.shape, self.call, self.index = tuple(shape), call, index

    @property
    def layer(self) -> Layer:
        return self.call.layer

    @property
    def inputs(self) -> list[KerasTensor]:
        return self.call.inputs

    def __repr__(self) -> str:
        return f"<KerasTensor shape=(None, {', '.join(map(str, self.shape))}) from {self.layer.name}>"


@register
class InputLayer(Layer):
    def __init__(self, shape=None, name: str | None = None, dtype: str | None = None, **kwargs):
        super().__init__(name=name or auto_name("input_layer"), **kwargs)
        self.shape = tuple(shape)
        self.dtype = dtype  # None: what the first layer reading it takes (indices for Embedding)
        self.built = True

    def call(self, ctx, x, training):
        return x

    def tensor(self) -> KerasTensor:
        """The model input this layer stands for."""
        call = LayerCall(self, [], False)
        call.outputs = [KerasTensor(self.shape, call, 0)]
        return call.outputs[0]

    def get_config(self) -> dict:
        return {"batch_shape": [None, *self.shape], "dtype": self.dtype or "float32", "sparse": False,
                "ragged": False, "name": self.name, "optional": False}  # fmt: skip

    @classmethod
    def from_config(cls, config: dict) -> InputLayer:
        dtype = config.get("dtype")
        return cls(config["batch_shape"][1:], config["name"], None if dtype == "float32" else dtype)


def Input(shape, name: str | None = None, dtype: str | None = None) -> KerasTensor:  # noqa: N802 - Keras's spelling
    """A model input; without a dtype it follows from the first layer reading it."""
    return InputLayer(shape=shape, name=name, dtype=dtype).tensor()
