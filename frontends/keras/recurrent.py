"""Keras's SimpleRNN, LSTM and GRU layers on the registry's `rnn`, `lstm` and `gru` ops.

The input projection x·W + b of every step is one matmul; the recurrence is one op
node, which runs as the tuned recurrent kernel (and trains through the op's unrolled
decomposition). Keras's weights stay in Keras's layouts, so they carry over with
get_weights / set_weights; the layer maps them onto the op's conventions in the graph:
the op's gate order (LSTM: Keras i, f, c, o → i, o, f, c; GRU: z, r, h is the op's z,
r, n), kernel (input, gates·units) as the projection's weight, recurrent_kernel
(units, gates·units) as the op's Rᵀ, and GRU reset_after=True's recurrent bias split:
its z and r parts join the projection's bias, its h part is the op's n-gate bias.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from frontends.keras import activations as activations_module
from frontends.keras import initializers
from frontends.keras.base_layer import Layer
from frontends.keras.serialization import register
from ir.builder import GraphBuilder
from ir.graph import Value


class _Recurrent(Layer):
    op: ClassVar[str]
    gates: ClassVar[int] = 1
    #: the op's gates in Keras's order (the op's gate k is Keras's gate order[k]); None: the same
    order: ClassVar[tuple[int, ...] | None] = None
    n_states: ClassVar[int] = 1  # final states returned with return_state: h (LSTM: h and c)
    variables_path = "cell/vars"  # Keras keeps the weights in the layer's cell
    fixed_options = {"stateful": False}
    call_kwargs = {"training": False, "mask": None}
    training_options = {
        "unroll": False,
        "zero_output_for_mask": False,
        **dict.fromkeys(
            ("kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "activity_regularizer")
        ),
        **dict.fromkeys(("kernel_constraint", "recurrent_constraint", "bias_constraint")),
        "dropout": 0.0,
        "recurrent_dropout": 0.0,
    }

    def __init__(
        self,
        units: int,
        activation="tanh",
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        return_sequences: bool = False,
        return_state: bool = False,
        go_backwards: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = activations_module.name_of(activation)
        activations_module.op_spec(self.activation)  # one the recurrent ops can take
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.return_sequences, self.go_backwards = return_sequences, go_backwards
        self.return_state = return_state

    def _bias_shape(self) -> tuple[int, ...]:
        return (self.gates * self.units,)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{self.name} expects input (batch, timesteps, features), got (batch, {input_shape})"
            )
        g, u = self.gates, self.units
        self.kernel = self.add_weight("kernel", (input_shape[-1], g * u), self.kernel_initializer)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", (u, g * u), self.recurrent_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", self._bias_shape(), self.bias_initializer)
            self._init_bias()
        self.built = True

    def _init_bias(self) -> None:
        pass

    def compute_output_shape(self, input_shape):
        """The output; with return_state a list: [output, *final states] (h, and c for LSTM)."""
        output = (input_shape[0], self.units) if self.return_sequences else (self.units,)
        if self.return_state:
            return [output, *[(self.units,)] * self.n_states]
        return output

    def call(self, ctx, x, training):
        b = ctx.b
        n, steps, features = x.type.shape
        u = self.units
        sequence = b.transpose(x, perm=(1, 0, 2))  # (steps, batch, features): the op's layout
        bias = self._input_bias(ctx)
        projection = [self._op_order(b, ctx.weight(self.kernel))] + ([bias] if bias is not None else [])
        xw = b.linear(b.reshape(sequence, shape=(steps * n, features)), *projection)
        slots = b.op(
            self.op,
            b.reshape(xw, shape=(steps, n, self.gates * u)),
            self._op_order(b, ctx.weight(self.recurrent_kernel)),
            *self._cell_inputs(ctx, b.param("h0", np.zeros((n, u), np.float32))),
            hidden=u,
            reverse=self.go_backwards,
            activations=self._activations(),
            **self._attributes(),
        )
        last = 0 if self.go_backwards else steps  # the slot of the final state
        states = [self._slot(b, slots, last, plane) for plane in range(self.n_states)]
        output = self._sequence(b, slots) if self.return_sequences else states[0]
        return [output, *states] if self.return_state else output

    def get_config(self):
        return {
            **super().get_config(),
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "units": self.units,
            "activation": self.activation,
            "use_bias": self.use_bias,
            **self.initializer_config("kernel", "recurrent", "bias"),
        }

    def _sequence(self, b: GraphBuilder, slots: Value) -> Value:
        """h after each step, (batch, steps, units), in the order the steps ran (which is
        Keras's order with go_backwards too)."""
        slot_count, _, n, u = slots.type.shape
        steps = slot_count - 1
        h = b.reshape(b.slice(slots, starts=(0,), ends=(1,), axes=(1,)), shape=(slot_count, n, u))
        if self.go_backwards:  # step t wrote slot t, and ran after step t + 1
            ran = b.gather(h, b.param("order", np.arange(steps - 1, -1, -1, dtype=np.int64)), axis=0)
        else:
            ran = b.slice(h, starts=(1,), ends=(steps + 1,), axes=(0,))
        return b.transpose(ran, perm=(1, 0, 2))

    def _slot(self, b: GraphBuilder, slots: Value, slot: int, plane: int) -> Value:
        """One plane of one slot of the op's output, (batch, units)."""
        value = b.slice(slots, starts=(slot, plane), ends=(slot + 1, plane + 1), axes=(0, 1))
        return b.reshape(value, shape=value.type.shape[2:])

    def _op_order(self, b: GraphBuilder, w: Value) -> Value:
        """w's last axis, gates·units long in Keras's gate order, in the op's."""
        if self.order is None:
            return w
        u, axis = self.units, w.type.rank - 1
        blocks = [b.slice(w, starts=(k * u,), ends=((k + 1) * u,), axes=(axis,)) for k in self.order]
        return b.concat(*blocks, axis=axis)

    def _zeros(self, b: GraphBuilder, shape: tuple[int, ...]) -> Value:
        return b.param("zeros", np.zeros(shape, np.float32))

    def _input_bias(self, ctx) -> Value | None:
        """The projection's bias, in the op's gate order."""
        return self._op_order(ctx.b, ctx.weight(self.bias)) if self.use_bias else None

    def _cell_inputs(self, ctx, h0: Value) -> list[Value]:
        """The op's inputs after Rᵀ."""
        return [h0]

    def _activations(self) -> tuple:
        """The op's activations, in ONNX's roles (f, and g, h where the cell has them)."""
        return (activations_module.op_spec(self.activation),)

    def _attributes(self) -> dict:
        return {}


@register
class SimpleRNN(_Recurrent):
    op = "rnn"


class _Gated(_Recurrent):
    """LSTM and GRU: their gates take recurrent_activation; the candidate and output, activation."""

    training_options = {**_Recurrent.training_options, "seed": None}

    def __init__(self, units: int, recurrent_activation="sigmoid", **kwargs):
        super().__init__(units, **kwargs)
        self.recurrent_activation = activations_module.name_of(recurrent_activation)
        activations_module.op_spec(self.recurrent_activation)

    def get_config(self):
        return {**super().get_config(), "recurrent_activation": self.recurrent_activation}

    def _specs(self) -> tuple:
        """The op's f (the gates': Keras's recurrent_activation) and g (Keras's activation)."""
        return tuple(map(activations_module.op_spec, (self.recurrent_activation, self.activation)))


@register
class LSTM(_Gated):
    """Gates i, f, c, o; unit_forget_bias: the forget gate's bias starts at 1."""

    op = "lstm"
    gates = 4
    order = (0, 3, 1, 2)
    n_states = 2

    def __init__(self, units: int, unit_forget_bias: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = unit_forget_bias

    def _init_bias(self) -> None:
        if self.unit_forget_bias:
            self.bias.value[self.units : 2 * self.units] = 1.0

    def get_config(self):
        return {**super().get_config(), "unit_forget_bias": self.unit_forget_bias}

    def _cell_inputs(self, ctx, h0):
        return [h0, h0, self._zeros(ctx.b, (3 * self.units,))]  # c starts at zero too; no peepholes

    def _activations(self):
        f, g = self._specs()
        return (f, g, g)  # the cell state's output activation (h) is Keras's activation too


@register
class GRU(_Gated):
    """Gates z, r, h; reset_after=True (Keras 3's default): bias (2, 3u), input and
    recurrent, the reset gate applied after the recurrent matmul (the op's
    linear_before_reset); reset_after=False: bias (3u,), the reset gate applied to h
    before it."""

    op = "gru"
    gates = 3

    def __init__(self, units: int, reset_after: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = reset_after

    def _bias_shape(self):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}

    def _bias_row(self, b: GraphBuilder, bias: Value, row: int) -> Value:
        return b.reshape(b.slice(bias, starts=(row,), ends=(row + 1,), axes=(0,)), shape=(3 * self.units,))

    def _input_bias(self, ctx):
        if not (self.use_bias and self.reset_after):
            return super()._input_bias(ctx)
        b, u = ctx.b, self.units
        bias = ctx.weight(self.bias)
        recurrent_zr = b.slice(self._bias_row(b, bias, 1), starts=(0,), ends=(2 * u,))
        return b.add(self._bias_row(b, bias, 0), b.concat(recurrent_zr, self._zeros(b, (u,)), axis=0))

    def _cell_inputs(self, ctx, h0):
        b, u = ctx.b, self.units
        if self.use_bias and self.reset_after:
            return [h0, b.slice(self._bias_row(b, ctx.weight(self.bias), 1), starts=(2 * u,), ends=(3 * u,))]
        return [h0, self._zeros(b, (u,))]

    def _activations(self):
        return self._specs()

    def _attributes(self):
        return {"linear_before_reset": self.reset_after}
