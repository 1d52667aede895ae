"""ONNX Resize (and Upsample) → Kiln's `resample` op with tap tables made here.

Each resized axis gets, per output position, the input positions it reads and their
weights, computed from the spec's coordinate transformation, nearest rounding, and
linear / cubic (optionally antialiased) coefficients. The tables are constants: the
kernel only gathers and sums.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from frontends.onnx.context import Context, UnsupportedOnnxError, converter, node_label, text
from ir.graph import Value

COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)


def source_coordinates(
    mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Each output position's coordinate in the input, and where it falls outside the
    input (only tf_crop_and_resize extrapolates). `scale` may not be out_len / in_len:
    the spec maps with the given scale, and the output length is its floor."""
    y = np.arange(out_len, dtype=np.float64)
    width = scale * in_len  # the output's length before rounding
    outside = np.zeros(out_len, bool)
    if mode == "align_corners":
        x = np.zeros_like(y) if width == 1 else y * (in_len - 1) / (width - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_crop_and_resize":
        start, end = roi
        if width == 1:
            x = np.full_like(y, (end - start) * (in_len - 1) / 2)
        else:
            x = y * (end - start) * (in_len - 1) / (width - 1)
        x = x + start * (in_len - 1)
        outside = (x < 0) | (x > in_len - 1)
    elif mode == "pytorch_half_pixel":
        x = np.zeros_like(y) if out_len == 1 else (y + 0.5) / scale - 0.5  # the spec: 0 for length 1
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        center = in_len / 2
        x = center * (1 - out_len / width) + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(mode)
    return x, outside


def _nearest(ratio: float, rounding: str) -> list[float]:
    """Weights of the two neighbours [left, right] of a coordinate `ratio` past left."""
    if ratio == 1.0:  # on a grid point
        return [0.0, 1.0]
    right = {
        "round_prefer_floor": ratio > 0.5,
        "round_prefer_ceil": ratio >= 0.5,
        "floor": False,
        "ceil": True,
    }[rounding]
    return [0.0, 1.0] if right else [1.0, 0.0]


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a, at distance x."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def coefficients(
    ratio: float, scale: float, mode: str, rounding: str, a: float, antialias: bool
) -> list[float]:
    """The weights of the taps around a coordinate `ratio` in (0, 1] past its left
    neighbour. Antialiasing (when shrinking) stretches the filter by 1 / scale."""
    if mode == "nearest":
        return _nearest(ratio, rounding)
    stretch = min(scale, 1.0) if antialias else 1.0
    if mode == "linear":
        start = int(math.floor(-1 / stretch) + 1)
        taps = [max(0.0, 1 - abs((i - ratio) * stretch)) for i in range(start, 2 - start)]
    else:
        start = int(math.floor(-2 / stretch) + 1)
        taps = [_cubic((i - ratio) * stretch, a) for i in range(start, 2 - start)]
    if antialias:
        total = sum(taps)
        taps = [t / total for t in taps]
    return taps


def axis_taps(
    in_len: int,
    out_len: int,
    scale: float,
    roi: tuple[float, float],
    mode: str,
    coordinate_mode: str,
    rounding: str,
    cubic_a: float,
    exclude_outside: bool,
    antialias: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_len, taps), for one axis; rows of -1 lie outside."""
    x, outside = source_coordinates(coordinate_mode, out_len, in_len, scale, roi)
    left = np.floor(x)
    ratios = np.where(x == left, 1.0, x - left)
    weights = np.array([coefficients(r, scale, mode, rounding, cubic_a, antialias) for r in ratios])
    n = weights.shape[1]
    # the n input positions nearest x (ties to the lower), as the spec's edge-padded window
    pad = -(-n // 2)
    shifted = x + pad
    base = np.floor(shifted)
    frac = shifted - base
    if n % 2 == 0:
        start = base + np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        start = base + np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    indices = start.astype(np.int64)[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        weights = np.where((indices < 0) | (indices >= in_len), 0.0, weights)
        sums = weights.sum(axis=1, keepdims=True)
        weights = weights / np.where(sums == 0, 1.0, sums)
    indices = np.clip(indices, 0, in_len - 1)  # edge padding
    if mode == "nearest":  # one tap: the one with weight 1
        pick = np.argmax(weights, axis=1)
        indices = indices[np.arange(out_len), pick][:, None]
        weights = np.ones((out_len, 1))
    indices[outside] = -1
    return indices, weights


@converter("Resize", "Upsample")
def _resize(ctx: Context, node: onnx.NodeProto, attrs: dict) -> list[Value]:
    where = node_label(node, ctx.opset)
    x = ctx.value(node.input[0])
    shape = x.type.shape
    rank = len(shape)
    mode = text(attrs, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise UnsupportedOnnxError(f"{where}: mode {mode!r} is not supported")
    mode = "linear" if mode == "bilinear" else mode
    legacy = node.op_type == "Upsample" or ctx.opset < 11  # scales only; asymmetric, floor
    if legacy:
        scales_in = ctx.constant(node, 1, "scales") if len(node.input) > 1 else np.array(attrs["scales"])
        coordinate_mode, rounding = "asymmetric", "floor"
        sizes_in, roi_in = None, None
    else:
        coordinate_mode = text(attrs, "coordinate_transformation_mode", "half_pixel")
        rounding = text(attrs, "nearest_mode", "round_prefer_floor")
        roi_in = ctx.constant(node, 1, "roi")
        scales_in = ctx.constant(node, 2, "scales")
        sizes_in = ctx.constant(node, 3, "sizes")
    if coordinate_mode not in COORDINATE_MODES:
        raise UnsupportedOnnxError(f"{where}: coordinate_transformation_mode {coordinate_mode!r}")
    antialias = bool(attrs.get("antialias", 0))
    if antialias and mode == "nearest":
        raise UnsupportedOnnxError(f"{where}: antialias applies to linear and cubic modes only")
    axes = [a % rank for a in attrs.get("axes", range(rank))]
    scales = [1.0] * rank
    sizes = list(shape)
    roi = [(0.0, 1.0)] * rank
    if roi_in is not None and roi_in.size:
        for i, a in enumerate(axes):
            roi[a] = (float(roi_in[i]), float(roi_in[len(axes) + i]))
    if sizes_in is not None and sizes_in.size:
        for a, n in zip(axes, sizes_in.ravel()):
            sizes[a] = int(n)
        scales = [sizes[a] / shape[a] for a in range(rank)]
        policy = text(attrs, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            kept = [scales[a] for a in axes]
            scale = min(kept) if policy == "not_larger" else max(kept)
            for a in axes:
                scales[a], sizes[a] = scale, int(scale * shape[a] + 0.5)
    elif scales_in is not None and scales_in.size:
        for a, s in zip(axes, scales_in.ravel()):
            scales[a] = float(s)
        sizes = [int(math.floor(s * d)) for s, d in zip(scales, shape)]
    else:
        raise UnsupportedOnnxError(f"{where}: neither scales nor sizes is given")
    b = ctx.b
    resized, tables = [], []
    for a in range(rank):
        identity = sizes[a] == shape[a] and math.isclose(scales[a], 1.0) and roi[a] == (0.0, 1.0)
        if identity:
            continue
        indices, weights = axis_taps(
            shape[a],
            sizes[a],
            scales[a],
            roi[a],
            mode,
            coordinate_mode,
            rounding,
            float(attrs.get("cubic_coeff_a", -0.75)),
            bool(attrs.get("exclude_outside", 0)),
            antialias,
        )
        resized.append(a)
        tables += [b.param(f"taps{a}", indices), b.param(f"weights{a}", weights.astype(x.type.np_dtype))]
    if not resized:
        return [x]
    outside = float(attrs.get("extrapolation_value", 0.0))
    y = b.op("resample", x, *tables, name=node.output[0], axes=tuple(resized), extrapolation_value=outside)
    return [y]
