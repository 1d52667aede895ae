"""Keras layers: each holds its weights (numpy, Keras's layouts and order) and writes
its computation into a graph. `call(ctx, x, training)` gets the graph context, which
hands out the Values of the layer's weights and, in training, its dropout masks."""

from __future__ import annotations

import itertools
import re
import warnings
from collections import defaultdict
from math import prod

import numpy as np

from frontends.keras import activations as activations_module
from frontends.keras import initializers
from ir.graph import Value

_counters: dict[str, itertools.count] = defaultdict(itertools.count)


def _auto_name(prefix: str) -> str:
    """dense, dense_1, dense_2, ...: Keras's process-wide naming."""
    n = next(_counters[prefix])
    return prefix if n == 0 else f"{prefix}_{n}"


def _snake(name: str) -> str:
    """Keras's snake_case of a class name: LSTM → lstm, SimpleRNN → simple_rnn, Conv2D → conv2d."""
    words = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", words).lower()


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
    def __init__(
        self, name: str | None = None, input_shape=None, input_dim=None, trainable: bool = True, **kwargs
    ):
        if kwargs:
            raise TypeError(f"Unrecognized keyword arguments passed to {type(self).__name__}: {kwargs}")
        self.name = name or _auto_name(_snake(type(self).__name__))
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


class InputLayer(Layer):
    def __init__(self, shape=None, name: str | None = None, dtype: str | None = None, **kwargs):
        super().__init__(name=name or _auto_name("input_layer"), **kwargs)
        self.shape = tuple(shape)
        self.dtype = dtype  # None: what the first layer reading it takes (indices for Embedding)

    def call(self, ctx, x, training):
        return x


def Input(shape, name: str | None = None, dtype: str | None = None) -> KerasTensor:  # noqa: N802 - Keras's spelling
    """A model input; without a dtype it follows from the first layer reading it."""
    layer = InputLayer(shape=shape, name=name, dtype=dtype)
    layer.built = True
    call = LayerCall(layer, [], False)
    call.outputs = [KerasTensor(layer.shape, call, 0)]
    return call.outputs[0]


class Dense(Layer):
    def __init__(
        self,
        units: int,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units, self.use_bias = int(units), use_bias
        self.activation = activations_module.get(activation)
        self.activation_name = activations_module.name_of(activation)
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units), self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer)
        self.built = True

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def call(self, ctx, x, training):
        args = [ctx.weight(self.kernel)] + ([ctx.weight(self.bias)] if self.use_bias else [])
        return self.activation(ctx.b, ctx.b.linear(x, *args))


class Embedding(Layer):
    """Rows of a (input_dim, output_dim) table picked by integer indices: (N, ...) → (N, ..., output_dim)."""

    input_dtype = "int64"

    def __init__(self, input_dim: int, output_dim: int, embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.embeddings_initializer = embeddings_initializer

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", (self.input_dim, self.output_dim), self.embeddings_initializer
        )
        self.built = True

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def call(self, ctx, x, training):
        return ctx.b.gather(ctx.weight(self.embeddings), x, axis=0)


class Flatten(Layer):
    def compute_output_shape(self, input_shape):
        return (prod(input_shape),)

    def call(self, ctx, x, training):
        return ctx.b.reshape(x, shape=(x.type.shape[0], prod(x.type.shape[1:])))


class Reshape(Layer):
    def __init__(self, target_shape, **kwargs):
        super().__init__(**kwargs)
        self.target_shape = tuple(target_shape)

    def compute_output_shape(self, input_shape):
        if -1 in self.target_shape:
            known = prod(d for d in self.target_shape if d != -1)
            return tuple(prod(input_shape) // known if d == -1 else d for d in self.target_shape)
        return self.target_shape

    def call(self, ctx, x, training):
        return ctx.b.reshape(x, shape=(x.type.shape[0], *self.compute_output_shape(x.type.shape[1:])))


class Activation(Layer):
    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activations_module.get(activation)
        self.activation_name = activations_module.name_of(activation)

    def call(self, ctx, x, training):
        return self.activation(ctx.b, x)


class Dropout(Layer):
    """Inverted dropout: in training x · mask / (1 - rate), mask ~ Bernoulli(1 - rate)
    drawn per step on the host (keras.utils.set_random_seed makes it repeatable); in
    inference the identity."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate <= 1:
            raise ValueError(
                "Invalid value received for argument `rate`. Expected a float value "
                f"between 0 and 1. Received: rate={rate}"
            )
        self.rate = float(rate)

    def call(self, ctx, x, training):
        if not training or self.rate == 0:
            return x
        return ctx.b.mul(x, ctx.dropout_mask(self, x.type.shape))

    def draw_mask(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.rate == 1:
            return np.zeros(shape, np.float32)
        keep = rng.random(shape) >= self.rate
        return (keep / np.float32(1 - self.rate)).astype(np.float32)


class BatchNormalization(Layer):
    """Over the last axis. Training: the batch's statistics (biased variance, E[x²] - E[x]²
    as Keras computes it) normalize, and the moving ones move toward them, inside the
    compiled train step. Inference: the moving statistics."""

    def __init__(self, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        if axis != -1:
            raise ValueError("BatchNormalization supports axis=-1 (channels last) only")
        self.momentum, self.epsilon, self.center, self.scale = float(momentum), float(epsilon), center, scale

    def build(self, input_shape):
        c = (input_shape[-1],)
        self.gamma = self.add_weight("gamma", c, "ones") if self.scale else None
        self.beta = self.add_weight("beta", c, "zeros") if self.center else None
        self.moving_mean = self.add_weight("moving_mean", c, "zeros", trainable=False)
        self.moving_variance = self.add_weight("moving_variance", c, "ones", trainable=False)
        self.built = True

    def call(self, ctx, x, training):
        b = ctx.b
        k = lambda v: b.param("k", np.array(v, np.float32))  # noqa: E731
        if training and self.trainable:
            axes = tuple(range(x.type.rank - 1))
            mean = b.reduce_mean(x, axes=axes, keepdims=False)
            var = b.sub(b.reduce_mean(b.mul(x, x), axes=axes, keepdims=False), b.mul(mean, mean))
            keep, take = k(self.momentum), k(1 - self.momentum)
            for w, batch in ((self.moving_mean, mean), (self.moving_variance, var)):
                ctx.update(w, b.add(b.mul(ctx.weight(w), keep), b.mul(batch, take)))
        else:
            mean, var = ctx.weight(self.moving_mean), ctx.weight(self.moving_variance)
        y = b.mul(b.sub(x, mean), b.rsqrt(b.add(var, k(self.epsilon))))
        if self.gamma is not None:
            y = b.mul(y, ctx.weight(self.gamma))
        if self.beta is not None:
            y = b.add(y, ctx.weight(self.beta))
        return y


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(d) for d in v)  # type: ignore[return-value]


def _same_pads(size: tuple[int, int], kernel, strides, dilations) -> tuple[int, int, int, int]:
    """Keras "same": out = ceil(n / s); the odd pixel of padding goes at the end."""
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return (begins[0], begins[1], ends[0], ends[1])


def _window_size(n: int, k: int, s: int, d: int, pad: int) -> int:
    return (n + pad - (k - 1) * d - 1) // s + 1


class Conv2D(Layer):
    """channels_last, as Keras: x (N, H, W, C), kernel (kh, kw, C, filters) (HWIO).
    Kiln's conv2d is NCHW/OIHW: the layer transposes around it (fusion folds the
    transposes into the neighbouring kernels where it can)."""

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=(1, 1),
        padding: str = "valid",
        dilation_rate=(1, 1),
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters, self.kernel_size = int(filters), _pair(kernel_size)
        self.strides, self.dilation_rate = _pair(strides), _pair(dilation_rate)
        self.padding = padding.lower()
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError("strides > 1 not supported in conjunction with dilation_rate > 1")
        self.activation = activations_module.get(activation)
        self.activation_name = activations_module.name_of(activation)
        self.use_bias = use_bias
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer

    def _pads(self, input_shape) -> tuple[int, int, int, int]:
        if self.padding == "valid":
            return (0, 0, 0, 0)
        return _same_pads(input_shape[:2], self.kernel_size, self.strides, self.dilation_rate)

    def build(self, input_shape):
        kh, kw = self.kernel_size
        self.kernel = self.add_weight(
            "kernel", (kh, kw, input_shape[-1], self.filters), self.kernel_initializer
        )
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer)
        self.built = True

    def compute_output_shape(self, input_shape):
        p = self._pads(input_shape)
        size = [
            _window_size(
                input_shape[a], self.kernel_size[a], self.strides[a], self.dilation_rate[a], p[a] + p[a + 2]
            )
            for a in range(2)
        ]
        return (*size, self.filters)

    def call(self, ctx, x, training):
        b = ctx.b
        nchw = b.transpose(x, perm=(0, 3, 1, 2))
        oihw = b.transpose(ctx.weight(self.kernel), perm=(3, 2, 0, 1))
        args = [oihw] + ([ctx.weight(self.bias)] if self.use_bias else [])
        y = b.conv2d(
            nchw, *args, strides=self.strides, dilations=self.dilation_rate, pads=self._pads(x.type.shape[1:])
        )
        # the activation before the transpose back: a next layer's transpose then cancels it
        return b.transpose(self.activation(b, y), perm=(0, 2, 3, 1))


class MaxPooling2D(Layer):
    pool_op = "max_pool2d"

    def __init__(self, pool_size=(2, 2), strides=None, padding: str = "valid", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size)
        self.strides = _pair(strides) if strides is not None else self.pool_size
        self.padding = padding.lower()

    def _pads(self, input_shape):
        if self.padding == "valid":
            return (0, 0, 0, 0)
        return _same_pads(input_shape[:2], self.pool_size, self.strides, (1, 1))

    def compute_output_shape(self, input_shape):
        p = self._pads(input_shape)
        size = [
            _window_size(input_shape[a], self.pool_size[a], self.strides[a], 1, p[a] + p[a + 2])
            for a in range(2)
        ]
        return (*size, input_shape[-1])

    def call(self, ctx, x, training):
        b = ctx.b
        nchw = b.transpose(x, perm=(0, 3, 1, 2))
        y = b.op(
            self.pool_op, nchw, kernel=self.pool_size, strides=self.strides, pads=self._pads(x.type.shape[1:])
        )
        return b.transpose(y, perm=(0, 2, 3, 1))


class AveragePooling2D(MaxPooling2D):
    """The window mean; with padding "same" the padding is not counted, as Keras does."""

    pool_op = "avg_pool2d"


from frontends.keras.recurrent import GRU, LSTM, SimpleRNN  # noqa: E402,F401 - Keras's layer namespace


class Conv1D(Conv2D):
    """Over sequences (N, T, C), kernel (k, C, filters): a Conv2D over a height-1 image.
    padding "causal" pads only the start, so step t sees steps ≤ t."""

    def __init__(
        self, filters: int, kernel_size, strides=1, padding: str = "valid", dilation_rate=1, **kwargs
    ):
        self.causal = str(padding).lower() == "causal"
        k, s, d = (int(v if isinstance(v, int) else v[0]) for v in (kernel_size, strides, dilation_rate))
        super().__init__(filters, (1, k), (1, s), "valid" if self.causal else padding, (1, d), **kwargs)

    def build(self, input_shape):
        k = self.kernel_size[1]
        self.kernel = self.add_weight("kernel", (k, input_shape[-1], self.filters), self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer)
        self.built = True

    def _pads(self, input_shape):
        if self.causal:
            return (0, self.dilation_rate[1] * (self.kernel_size[1] - 1), 0, 0)
        return super()._pads(input_shape)

    def compute_output_shape(self, input_shape):
        return super().compute_output_shape((1, *input_shape))[1:]

    def call(self, ctx, x, training):
        b = ctx.b
        n, t, c = x.type.shape
        image = b.reshape(x, shape=(n, 1, t, c))
        nchw = b.transpose(image, perm=(0, 3, 1, 2))
        kernel = b.reshape(ctx.weight(self.kernel), shape=(1, *self.kernel.shape))
        args = [b.transpose(kernel, perm=(3, 2, 0, 1))] + ([ctx.weight(self.bias)] if self.use_bias else [])
        y = b.conv2d(
            nchw, *args, strides=self.strides, dilations=self.dilation_rate, pads=self._pads((1, t, c))
        )
        y = b.transpose(self.activation(b, y), perm=(0, 2, 3, 1))
        return b.reshape(y, shape=(n, y.type.shape[2], self.filters))


class GlobalAveragePooling2D(Layer):
    def compute_output_shape(self, input_shape):
        return (input_shape[-1],)

    def call(self, ctx, x, training):
        return ctx.b.reduce_mean(x, axes=(1, 2), keepdims=False)


class LayerNormalization(Layer):
    """Over the last axis: (x - mean) / sqrt(var + epsilon) · gamma + beta."""

    def __init__(
        self, axis: int = -1, epsilon: float = 1e-3, center: bool = True, scale: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        if axis != -1:
            raise ValueError("LayerNormalization supports axis=-1 only")
        self.epsilon, self.center, self.scale = float(epsilon), center, scale

    def build(self, input_shape):
        c = (input_shape[-1],)
        self.gamma = self.add_weight("gamma", c, "ones") if self.scale else None
        self.beta = self.add_weight("beta", c, "zeros") if self.center else None
        self.built = True

    def call(self, ctx, x, training):
        b = ctx.b
        mean = b.reduce_mean(x, axes=(-1,), keepdims=True)
        centered = b.sub(x, mean)
        var = b.reduce_mean(b.mul(centered, centered), axes=(-1,), keepdims=True)
        y = b.mul(centered, b.rsqrt(b.add(var, b.param("k", np.array(self.epsilon, np.float32)))))
        if self.gamma is not None:
            y = b.mul(y, ctx.weight(self.gamma))
        if self.beta is not None:
            y = b.add(y, ctx.weight(self.beta))
        return y


class Add(Layer):
    """The sum of its inputs (Functional API)."""

    def compute_output_shape(self, input_shape):
        return tuple(np.broadcast_shapes(*input_shape))

    def call(self, ctx, xs, training):
        total = xs[0]
        for x in xs[1:]:
            total = ctx.b.add(total, x)
        return total


class Concatenate(Layer):
    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def compute_output_shape(self, input_shape):
        first = list(input_shape[0])
        a = self.axis % (len(first) + 1) - 1  # Keras counts the batch axis; the shapes here do not
        first[a] = sum(s[a] for s in input_shape)
        return tuple(first)

    def call(self, ctx, xs, training):
        return ctx.b.concat(*xs, axis=self.axis)
