"""Keras's layers (the `keras.layers` namespace): each writes its computation into a
graph and describes itself with Keras's config."""

from __future__ import annotations

from math import prod

import numpy as np

from frontends.keras import activations as activations_module
from frontends.keras import initializers
from frontends.keras.base_layer import Input, InputLayer, Layer
from frontends.keras.recurrent import GRU, LSTM, SimpleRNN
from frontends.keras.serialization import register

__all__ = [
    "GRU",
    "LSTM",
    "Activation",
    "Add",
    "AveragePooling2D",
    "BatchNormalization",
    "Concatenate",
    "Conv1D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "GlobalAveragePooling2D",
    "Input",
    "InputLayer",
    "Layer",
    "LayerNormalization",
    "MaxPooling2D",
    "Reshape",
    "SimpleRNN",
]

#: options only training reads, for layers with a kernel and a bias
_REGULARIZERS = dict.fromkeys(
    ("kernel_regularizer", "bias_regularizer", "kernel_constraint", "bias_constraint")
)
_CONV_OPTIONS = {**_REGULARIZERS, "activity_regularizer": None}
_CHANNELS_LAST = {"data_format": "channels_last"}
#: a normalization's options only training reads: its initializers (Kiln's are Keras's
#: defaults), regularizers and constraints
_NORMALIZATION_OPTIONS = {
    "beta_initializer": initializers.serialize(initializers.Zeros()),
    "gamma_initializer": initializers.serialize(initializers.Ones()),
    **dict.fromkeys(("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint")),
}


@register
class Dense(Layer):
    fixed_options = {"quantization_config": None}
    training_options = _REGULARIZERS

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
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units), self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer)
        self.built = True

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation_name,
                "use_bias": self.use_bias, **self.initializer_config("kernel", "bias")}  # fmt: skip

    def call(self, ctx, x, training):
        args = [ctx.weight(self.kernel)] + ([ctx.weight(self.bias)] if self.use_bias else [])
        return self.activation(ctx.b, ctx.b.linear(x, *args))


@register
class Embedding(Layer):
    """Rows of a (input_dim, output_dim) table picked by integer indices: (N, ...) → (N, ..., output_dim)."""

    input_dtype = "int64"
    fixed_options = {"mask_zero": False, "quantization_config": None}
    training_options = dict.fromkeys(
        ("embeddings_regularizer", "activity_regularizer", "embeddings_constraint")
    )

    def __init__(self, input_dim: int, output_dim: int, embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        self.input_dim, self.output_dim = int(input_dim), int(output_dim)
        self.embeddings_initializer = initializers.get(embeddings_initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", (self.input_dim, self.output_dim), self.embeddings_initializer
        )
        self.built = True

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def call(self, ctx, x, training):
        return ctx.b.gather(ctx.weight(self.embeddings), x, axis=0)

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim, "output_dim": self.output_dim,
                **self.initializer_config("embeddings")}  # fmt: skip


@register
class Flatten(Layer):
    fixed_options = _CHANNELS_LAST

    def compute_output_shape(self, input_shape):
        return (prod(input_shape),)

    def call(self, ctx, x, training):
        return ctx.b.reshape(x, shape=(x.type.shape[0], prod(x.type.shape[1:])))


@register
class Reshape(Layer):
    records_build = False

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

    def get_config(self):
        return {**super().get_config(), "target_shape": list(self.target_shape)}


@register
class Activation(Layer):
    records_build = False

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activations_module.get(activation)
        self.activation_name = activations_module.name_of(activation)

    def call(self, ctx, x, training):
        return self.activation(ctx.b, x)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation_name}


@register
class Dropout(Layer):
    """Inverted dropout: in training x · mask / (1 - rate), mask ~ Bernoulli(1 - rate)
    drawn per step on the host (keras.utils.set_random_seed makes it repeatable); in
    inference the identity. `seed` is kept for the config only."""

    training_options = {"noise_shape": None}
    call_kwargs = {"training": False}
    records_build = False

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate <= 1:
            raise ValueError(
                "Invalid value received for argument `rate`. Expected a float value "
                f"between 0 and 1. Received: rate={rate}"
            )
        self.rate, self.seed = float(rate), seed

    def call(self, ctx, x, training):
        if not training or self.rate == 0:
            return x
        return ctx.b.mul(x, ctx.dropout_mask(self, x.type.shape))

    def draw_mask(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.rate == 1:
            return np.zeros(shape, np.float32)
        keep = rng.random(shape) >= self.rate
        return (keep / np.float32(1 - self.rate)).astype(np.float32)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@register
class BatchNormalization(Layer):
    """Over the last axis. Training: the batch's statistics (biased variance, E[x²] - E[x]²
    as Keras computes it) normalize, and the moving ones move toward them, inside the
    compiled train step. Inference: the moving statistics."""

    training_options = {
        **_NORMALIZATION_OPTIONS,
        "moving_mean_initializer": initializers.serialize(initializers.Zeros()),
        "moving_variance_initializer": initializers.serialize(initializers.Ones()),
        "synchronized": False,
        "renorm": False,
        "renorm_clipping": None,
        "renorm_momentum": 0.99,
    }
    call_kwargs = {"mask": None}

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

    def get_config(self):
        return {**super().get_config(), "axis": -1, "momentum": self.momentum, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale}  # fmt: skip


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


@register
class Conv2D(Layer):
    """channels_last, as Keras: x (N, H, W, C), kernel (kh, kw, C, filters) (HWIO).
    Kiln's conv2d is NCHW/OIHW: the layer transposes around it (fusion folds the
    transposes into the neighbouring kernels where it can)."""

    fixed_options = {**_CHANNELS_LAST, "groups": 1}
    training_options = _CONV_OPTIONS

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
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)

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

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding,
                "dilation_rate": list(self.dilation_rate), "activation": self.activation_name,
                "use_bias": self.use_bias, **self.initializer_config("kernel", "bias")}  # fmt: skip


@register
class MaxPooling2D(Layer):
    pool_op = "max_pool2d"
    records_build = False
    fixed_options = _CHANNELS_LAST

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

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size), "padding": self.padding,
                "strides": list(self.strides)}  # fmt: skip


@register
class AveragePooling2D(MaxPooling2D):
    """The window mean; with padding "same" the padding is not counted, as Keras does."""

    pool_op = "avg_pool2d"


@register
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

    def get_config(self):
        config = super().get_config()
        for key in ("kernel_size", "strides", "dilation_rate"):
            config[key] = config[key][1:]  # the width of the height-1 image
        return {**config, "padding": "causal" if self.causal else self.padding}


@register
class GlobalAveragePooling2D(Layer):
    records_build = False
    fixed_options = {**_CHANNELS_LAST, "keepdims": False}

    def compute_output_shape(self, input_shape):
        return (input_shape[-1],)

    def call(self, ctx, x, training):
        return ctx.b.reduce_mean(x, axes=(1, 2), keepdims=False)


@register
class LayerNormalization(Layer):
    """Over the last axis: (x - mean) / sqrt(var + epsilon) · gamma + beta."""

    fixed_options = {"rms_scaling": False}
    training_options = _NORMALIZATION_OPTIONS

    def __init__(
        self, axis: int = -1, epsilon: float = 1e-3, center: bool = True, scale: bool = True, **kwargs
    ):
        super().__init__(**kwargs)
        if axis not in (-1, [-1], (-1,)):
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

    def get_config(self):
        axis = [-1] if self.built else -1  # Keras makes it a list when it builds the layer
        return {**super().get_config(), "axis": axis, "epsilon": self.epsilon, "center": self.center,
                "scale": self.scale}  # fmt: skip


@register
class Add(Layer):
    """The sum of its inputs (Functional API)."""

    def compute_output_shape(self, input_shape):
        return tuple(np.broadcast_shapes(*input_shape))

    def call(self, ctx, xs, training):
        total = xs[0]
        for x in xs[1:]:
            total = ctx.b.add(total, x)
        return total


@register
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

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}
