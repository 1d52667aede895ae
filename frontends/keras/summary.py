"""model.summary() in Keras 3's table layout (box-drawn columns, the params footer)."""

from __future__ import annotations

WIDTHS = (33, 24, 15)  # the cell widths Keras uses at its default line length


def _size(count: int) -> str:
    """Bytes of float32 parameters in Keras's 1024-based units."""
    n = float(count * 4)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _row(cells: tuple[str, str, str], bar: str = "│") -> str:
    name, shape, params = cells
    w0, w1, w2 = WIDTHS
    return f"{bar} {name:<{w0 - 2}} {bar} {shape:<{w1 - 2}} {bar} {params:>{w2 - 2}} {bar}"


def summary(model) -> str:
    w0, w1, w2 = WIDTHS
    lines = [f'Model: "{model.name}"']
    lines.append(f"┏{'━' * w0}┳{'━' * w1}┳{'━' * w2}┓")
    lines.append(_row(("Layer (type)", "Output Shape", "Param #"), "┃"))
    lines.append(f"┡{'━' * w0}╇{'━' * w1}╇{'━' * w2}┩")
    rows = model._layer_shapes()
    for i, (layer, shape) in enumerate(rows):
        name = f"{layer.name} ({type(layer).__name__})"
        if shape is not None:
            shown, params = "(None, " + ", ".join(map(str, shape)) + ")", f"{layer.count_params():,}"
        else:
            shown, params = "?", "0 (unbuilt)"
        lines.append(_row((name, shown, params)))
        if i < len(rows) - 1:
            lines.append(f"├{'─' * w0}┼{'─' * w1}┼{'─' * w2}┤")
    lines.append(f"└{'─' * w0}┴{'─' * w1}┴{'─' * w2}┘")
    trainable = sum(w.value.size for w in model.weights if w.trainable)
    frozen = sum(w.value.size for w in model.weights if not w.trainable)
    optimizer = 0
    if model._state is not None:  # built by a fit: its slots, and Keras's two scalars
        optimizer = sum(a.size for a in model._state.slot_values().values()) + 2
    total = trainable + frozen + optimizer
    lines.append(f" Total params: {total:,} ({_size(total)})")
    lines.append(f" Trainable params: {trainable:,} ({_size(trainable)})")
    lines.append(f" Non-trainable params: {frozen:,} ({_size(frozen)})")
    if optimizer:
        lines.append(f" Optimizer params: {optimizer:,} ({_size(optimizer)})")
    return "\n".join(lines)
