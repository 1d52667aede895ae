"""model.summary() in Keras 3's table layout (box-drawn columns, the params footer), as
rich draws it on an 80-column terminal: cells wrap at spaces, and a word too long for
its cell is cut with "…". Functional models that are not a plain chain get Keras's
"Connected to" column."""

from __future__ import annotations

CHAIN_WIDTHS = (33, 24, 15)  # Layer (type), Output Shape, Param #
GRAPH_WIDTHS = (21, 19, 12, 19)  # the same and Connected to


def _size(count: int) -> str:
    """Bytes of float32 parameters in Keras's 1024-based units."""
    n = float(count * 4)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if len(word) > width:
            word = word[: width - 1] + "…"
        if line and len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            if line:
                lines.append(line)
            line = word
    return [*lines, line]


def _rows(cells: list[str], widths: tuple[int, ...], bar: str = "│") -> list[str]:
    """One table row, as many lines as its tallest cell; the third column right-aligned."""
    wrapped = [_wrap(c, w - 2) for c, w in zip(cells, widths)]
    height = max(len(w) for w in wrapped)
    lines = []
    for i in range(height):
        parts = []
        for col, (cell, w) in enumerate(zip(wrapped, widths)):
            text = cell[i] if i < len(cell) else ""
            parts.append(f" {text:>{w - 2}} " if col == 2 else f" {text:<{w - 2}} ")
        lines.append(bar + bar.join(parts) + bar)
    return lines


def _shapes(shapes: list[tuple[int, ...]] | None) -> str:
    if shapes is None:
        return "?"
    shown = ["(None, " + ", ".join(map(str, s)) + ")" for s in shapes]
    return shown[0] if len(shown) == 1 else "[" + ", ".join(shown) + "]"


def summary(model) -> str:
    connections = model._connections()
    widths = GRAPH_WIDTHS if connections is not None else CHAIN_WIDTHS
    header = ["Layer (type)", "Output Shape", "Param #", "Connected to"][: len(widths)]
    rule = "─"
    lines = [f'Model: "{model.name}"', "┏" + "┳".join("━" * w for w in widths) + "┓"]
    lines += _rows(header, widths, "┃")
    lines.append("┡" + "╇".join("━" * w for w in widths) + "┩")
    rows = model._layer_shapes()
    for i, (layer, shapes) in enumerate(rows):
        params = f"{layer.count_params():,}" if shapes is not None else "0 (unbuilt)"
        cells = [f"{layer.name} ({type(layer).__name__})", _shapes(shapes), params]
        if connections is not None:
            cells.append(connections[id(layer)])
        lines += _rows(cells, widths)
        if i < len(rows) - 1:
            lines.append("├" + "┼".join(rule * w for w in widths) + "┤")
    lines.append("└" + "┴".join(rule * w for w in widths) + "┘")
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
