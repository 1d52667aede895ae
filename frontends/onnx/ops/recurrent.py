"""ONNX RNN, GRU and LSTM → Kiln's recurrence ops (ir/ops/recurrent.py).

Per direction: the input projection x·Wᵀ + biases for all steps is one `linear`
(a matmul with the bias fused), the recurrence one `rnn`/`gru`/`lstm` node, and
Y, Y_h, Y_c are slices of its state slots. Weight slicing and transposes are graph
ops on constants, which constant folding turns into the weights the kernels read.
"""

from __future__ import annotations

import numpy as np
import onnx

from frontends.onnx.context import Context, UnsupportedOnnxError, converter, node_inputs, node_label, text
from ir.graph import Value

#: ONNX activation → (Kiln elementwise op, its attributes that take activation_alpha/beta)
ACTIVATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Sigmoid": ("sigmoid", ()),
    "Tanh": ("tanh", ()),
    "Relu": ("relu", ()),
    "LeakyRelu": ("leaky_relu", ("alpha",)),
    "HardSigmoid": ("hard_sigmoid", ("alpha", "beta")),
    "Elu": ("elu", ("alpha",)),
    "Softsign": ("softsign", ()),
    "Softplus": ("softplus", ()),
    "ThresholdedRelu": ("thresholded_relu", ("alpha",)),
}

#: per cell: (Kiln op, gates, ONNX default activations per direction)
CELLS = {
    "RNN": ("rnn", 1, ("Tanh",)),
    "GRU": ("gru", 3, ("Sigmoid", "Tanh")),
    "LSTM": ("lstm", 4, ("Sigmoid", "Tanh", "Tanh")),
}


def _activations(ctx: Context, node: onnx.NodeProto, attrs: dict, dirs: int) -> list[tuple]:
    """Each direction's activations as (op, ((attr, value), ...)); alpha and beta
    values are taken in order by the activations that use them."""
    _, _, default = CELLS[node.op_type]
    names = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    names = names or list(default) * dirs
    alphas = list(attrs.get("activation_alpha", []))
    betas = list(attrs.get("activation_beta", []))
    specs = []
    for name in names:
        match = next((k for k in ACTIVATIONS if k.lower() == name.lower()), None)
        if match is None:
            raise UnsupportedOnnxError(f"{node_label(node, ctx.opset)}: activation {name!r} is not supported")
        op, params = ACTIVATIONS[match]
        values = []
        for p in params:
            source = alphas if p == "alpha" else betas
            if source:
                values.append((p, float(source.pop(0))))
        specs.append((op, tuple(values)))
    per_dir = len(default)
    if len(specs) != per_dir * dirs:
        raise UnsupportedOnnxError(
            f"{node_label(node, ctx.opset)}: {len(specs)} activations given, expected {per_dir * dirs}"
        )
    return [tuple(specs[d * per_dir : (d + 1) * per_dir]) for d in range(dirs)]


def _direction(ctx: Context, v: Value, d: int, axis: int = 0) -> Value:
    """v[d] along `axis` (the direction axis), that axis dropped."""
    sliced = ctx.b.slice(v, starts=(d,), ends=(d + 1,), axes=(axis,))
    shape = sliced.type.shape
    return ctx.b.reshape(sliced, shape=shape[:axis] + shape[axis + 1 :])


def _input(ctx: Context, node: onnx.NodeProto, pos: int) -> Value | None:
    return ctx.value(node.input[pos]) if len(node.input) > pos and node.input[pos] else None


def _zeros(ctx: Context, name: str, shape: tuple[int, ...], dtype: str) -> Value:
    return ctx.b.param(name, np.zeros(shape, dtype))


def _check_sequence_lens(ctx: Context, node: onnx.NodeProto, seq: int) -> None:
    lens = ctx.constant(node, 4, "sequence_lens")
    if lens is not None and np.any(lens != seq):
        raise UnsupportedOnnxError(
            f"{node_label(node, ctx.opset)}: sequences of different lengths (sequence_lens {lens.tolist()}) "
            "are not supported; every sequence must have all steps"
        )


@converter("RNN", "GRU", "LSTM")
def _recurrent(ctx: Context, node: onnx.NodeProto, attrs: dict) -> list[Value]:
    op, gates, _ = CELLS[node.op_type]
    where = node_label(node, ctx.opset)
    direction = text(attrs, "direction", "forward")
    reverses = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if reverses is None:
        raise UnsupportedOnnxError(f"{where}: direction {direction!r} is not one ONNX defines")
    if attrs.get("input_forget", 0):
        raise UnsupportedOnnxError(f"{where}: input_forget=1 (coupled gates) is not supported")
    layout = int(attrs.get("layout", 0))
    x, w, r = node_inputs(ctx, node)[:3]
    if layout:
        x = ctx.b.transpose(x, perm=(1, 0, 2))  # (batch, seq, in) → (seq, batch, in)
    seq, batch, features = x.type.shape
    dtype = x.type.dtype
    hidden = int(attrs.get("hidden_size", r.type.shape[-1]))
    dirs = len(reverses)
    _check_sequence_lens(ctx, node, seq)
    bias = _input(ctx, node, 3) or _zeros(ctx, "B", (dirs, 2 * gates * hidden), dtype)
    states = [_input(ctx, node, 5)] + ([_input(ctx, node, 6)] if op == "lstm" else [])
    if layout:  # (batch, dirs, hidden) → (dirs, batch, hidden)
        states = [s if s is None else ctx.b.transpose(s, perm=(1, 0, 2)) for s in states]
    states = [s or _zeros(ctx, "state0", (dirs, batch, hidden), dtype) for s in states]
    peepholes = (
        (_input(ctx, node, 7) or _zeros(ctx, "P", (dirs, 3 * hidden), dtype)) if op == "lstm" else None
    )
    clip = float(attrs["clip"]) if "clip" in attrs else None
    activations = _activations(ctx, node, attrs, dirs)
    flat_x = ctx.b.reshape(x, shape=(seq * batch, features))

    ys, finals = [], [[] for _ in range(2 if op == "lstm" else 1)]
    for d, reverse in enumerate(reverses):
        b_d = _direction(ctx, bias, d)
        wb = ctx.b.slice(b_d, starts=(0,), ends=(gates * hidden,))
        rb = ctx.b.slice(b_d, starts=(gates * hidden,), ends=(2 * gates * hidden,))
        extra: list[Value] = []
        if op == "gru":  # the n gate's recurrent bias stays apart (it sits inside r ⊙ (...))
            zr = ctx.b.slice(rb, starts=(0,), ends=(2 * hidden,))
            rb_n = ctx.b.slice(rb, starts=(2 * hidden,), ends=(3 * hidden,))
            rb = ctx.b.concat(zr, _zeros(ctx, "zeros", (hidden,), dtype), axis=0)
            extra = [rb_n]
        w_t = ctx.b.transpose(_direction(ctx, w, d), perm=(1, 0))
        xw = ctx.b.linear(flat_x, w_t, ctx.b.add(wb, rb))
        xw = ctx.b.reshape(xw, shape=(seq, batch, gates * hidden))
        r_t = ctx.b.transpose(_direction(ctx, r, d), perm=(1, 0))  # the op reads Rᵀ row by row
        inputs = [xw, r_t] + [_direction(ctx, s, d) for s in states] + extra
        if peepholes is not None:
            inputs.append(_direction(ctx, peepholes, d))
        attributes = {"hidden": hidden, "reverse": reverse, "activations": activations[d], "clip": clip}
        if op == "gru":
            attributes["linear_before_reset"] = bool(attrs.get("linear_before_reset", 0))
        slots = ctx.b.op(op, *inputs, name=f"{node.output[0]}_{op}{d}", **attributes)
        steps = (0, seq) if reverse else (1, seq + 1)
        ys.append(ctx.b.slice(slots, starts=(steps[0], 0), ends=(steps[1], 1), axes=(0, 1)))
        last = 0 if reverse else seq
        for plane, acc in enumerate(finals):
            final = ctx.b.slice(slots, starts=(last, plane), ends=(last + 1, plane + 1), axes=(0, 1))
            acc.append(ctx.b.reshape(final, shape=(1, batch, hidden)))
    y = ys[0] if dirs == 1 else ctx.b.concat(*ys, axis=1)  # (seq, dirs, batch, hidden)
    outs = [y] + [acc[0] if dirs == 1 else ctx.b.concat(*acc, axis=0) for acc in finals]
    if layout:
        outs = [ctx.b.transpose(outs[0], perm=(2, 0, 1, 3))] + [
            ctx.b.transpose(o, perm=(1, 0, 2)) for o in outs[1:]
        ]
    return outs[: len(node.output)]
