"""Keras's SimpleRNN, LSTM and GRU layers (keras-behaviour.md §1), unrolled over the
sequence into graph ops: each step is a matmul with the recurrent kernel and the gate
arithmetic, so the backward pass comes from the ordinary gradient rules and the whole
sequence is one fused, compiled train step. Weights, gate orders and formulas are
Keras's, so weights carry over with get_weights / set_weights."""

from __future__ import annotations

import numpy as np

from frontends.keras import activations as activations_module
from frontends.keras.layers import Layer
from ir.graph import Value


class _Recurrent(Layer):
    gates = 1
    n_states = 1  # h (LSTM: h and c)

    def __init__(
        self,
        units: int,
        activation="tanh",
        recurrent_activation="sigmoid",
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
        self.activation = activations_module.get(activation)
        self.recurrent_activation = activations_module.get(recurrent_activation)
        self.activation_names = (
            activations_module.name_of(activation),
            activations_module.name_of(recurrent_activation),
        )
        self.use_bias = use_bias
        self.initializers = (kernel_initializer, recurrent_initializer, bias_initializer)
        self.return_sequences, self.go_backwards = return_sequences, go_backwards
        self.return_state = return_state

    def _bias_shape(self) -> tuple[int, ...]:
        return (self.gates * self.units,)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{self.name} expects input (batch, timesteps, features), got (batch, {input_shape})"
            )
        k_init, r_init, b_init = self.initializers
        g, u = self.gates, self.units
        self.kernel = self.add_weight("kernel", (input_shape[-1], g * u), k_init)
        self.recurrent_kernel = self.add_weight("recurrent_kernel", (u, g * u), r_init)
        if self.use_bias:
            self.bias = self.add_weight("bias", self._bias_shape(), b_init)
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
        n, steps, _ = x.type.shape
        state = self._initial_state(ctx, n)
        outputs = []
        order = range(steps - 1, -1, -1) if self.go_backwards else range(steps)
        for t in order:
            x_t = b.reshape(b.slice(x, starts=(t,), ends=(t + 1,), axes=(1,)), shape=(n, x.type.shape[2]))
            state = self.step(ctx, x_t, state)
            outputs.append(state[0])
        if self.return_sequences:
            output = b.concat(*(b.reshape(h, shape=(n, 1, self.units)) for h in outputs), axis=1)
        else:
            output = outputs[-1]
        return [output, *state] if self.return_state else output

    def _initial_state(self, ctx, n: int) -> tuple[Value, ...]:
        zero = ctx.b.param("h0", np.zeros((n, self.units), np.float32))
        return (zero,)

    def _gate(self, ctx, z: Value, i: int) -> Value:
        u = self.units
        return ctx.b.slice(z, starts=(i * u,), ends=((i + 1) * u,), axes=(1,))

    def _input_part(self, ctx, x_t: Value, bias: Value | None) -> Value:
        args = [ctx.weight(self.kernel)] + ([bias] if bias is not None else [])
        return ctx.b.linear(x_t, *args)

    def step(self, ctx, x_t: Value, state: tuple[Value, ...]) -> tuple[Value, ...]:
        raise NotImplementedError


class SimpleRNN(_Recurrent):
    def step(self, ctx, x_t, state):
        b = ctx.b
        bias = ctx.weight(self.bias) if self.use_bias else None
        z = b.add(self._input_part(ctx, x_t, bias), b.matmul(state[0], ctx.weight(self.recurrent_kernel)))
        return (self.activation(b, z),)


class LSTM(_Recurrent):
    """Gates i, f, c, o; unit_forget_bias: the forget gate's bias starts at 1."""

    gates = 4
    n_states = 2

    def __init__(self, units: int, unit_forget_bias: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = unit_forget_bias

    def _init_bias(self) -> None:
        if self.unit_forget_bias:
            self.bias.value[self.units : 2 * self.units] = 1.0

    def _initial_state(self, ctx, n):
        zero = ctx.b.param("h0", np.zeros((n, self.units), np.float32))
        return (zero, zero)

    def step(self, ctx, x_t, state):
        b = ctx.b
        h, c = state
        bias = ctx.weight(self.bias) if self.use_bias else None
        z = b.add(self._input_part(ctx, x_t, bias), b.matmul(h, ctx.weight(self.recurrent_kernel)))
        i, f, g, o = (self._gate(ctx, z, k) for k in range(4))
        sig = self.recurrent_activation
        c = b.add(b.mul(sig(b, f), c), b.mul(sig(b, i), self.activation(b, g)))
        return (b.mul(sig(b, o), self.activation(b, c)), c)


class GRU(_Recurrent):
    """Gates z, r, h; reset_after=True (Keras 3's default): bias (2, 3u), the reset gate
    applied after the recurrent matmul; reset_after=False: bias (3u,), applied before."""

    gates = 3

    def __init__(self, units: int, reset_after: bool = True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = reset_after

    def _bias_shape(self):
        return (2, 3 * self.units) if self.reset_after else (3 * self.units,)

    def step(self, ctx, x_t, state):
        b = ctx.b
        (h,) = state
        u = self.units
        rk = ctx.weight(self.recurrent_kernel)
        sig = self.recurrent_activation
        if self.reset_after:
            bias = ctx.weight(self.bias) if self.use_bias else None
            b_in = (
                b.reshape(b.slice(bias, starts=(0,), ends=(1,), axes=(0,)), shape=(3 * u,)) if bias else None
            )
            b_rec = (
                b.reshape(b.slice(bias, starts=(1,), ends=(2,), axes=(0,)), shape=(3 * u,)) if bias else None
            )
            xs = self._input_part(ctx, x_t, b_in)
            hs = b.linear(h, rk, *([b_rec] if b_rec is not None else []))
            z = sig(b, b.add(self._gate(ctx, xs, 0), self._gate(ctx, hs, 0)))
            r = sig(b, b.add(self._gate(ctx, xs, 1), self._gate(ctx, hs, 1)))
            candidate = self.activation(b, b.add(self._gate(ctx, xs, 2), b.mul(r, self._gate(ctx, hs, 2))))
        else:
            xs = self._input_part(ctx, x_t, ctx.weight(self.bias) if self.use_bias else None)
            rk_zr = b.slice(rk, starts=(0,), ends=(2 * u,), axes=(1,))
            rk_h = b.slice(rk, starts=(2 * u,), ends=(3 * u,), axes=(1,))
            hs = b.matmul(h, rk_zr)
            z = sig(b, b.add(self._gate(ctx, xs, 0), self._gate(ctx, hs, 0)))
            r = sig(b, b.add(self._gate(ctx, xs, 1), self._gate(ctx, hs, 1)))
            candidate = self.activation(b, b.add(self._gate(ctx, xs, 2), b.matmul(b.mul(r, h), rk_h)))
        one = b.param("one", np.array(1.0, np.float32))
        return (b.add(b.mul(z, h), b.mul(b.sub(one, z), candidate)),)
