"""The .keras file and the .weights.h5 file, as Keras 3 reads and writes them.

A .keras file is a zip of metadata.json, config.json (the model's entry: its config,
build config and compile config, which the model and its layers describe themselves)
and model.weights.h5: each layer's variables under layers/<snake_case class>[_k]/ in
the model's layer order (the layer's own variables_path there, "vars" or an RNN's
"cell/vars"), the optimizer's under optimizer/vars. The models and layers come from
their config entries through the registry of classes by name. h5py is needed (an
optional extra: pip install h5py).

A save is written to a temporary file beside the target and renamed over it, so a
failed save never leaves a half-written file where a good one was. The formats enter
serialization.FILE_FORMATS, through which models save and load.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from frontends.keras import serialization
from frontends.keras.serialization import FileFormat, snake_case

KERAS_VERSION = "3.15.1"


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("saving and loading .keras files needs h5py: pip install h5py") from e
    return h5py


def _layer_groups(model) -> list[tuple[str, object]]:
    """layers/<snake class>[_k]: Keras numbers the groups by class, in model order."""
    seen: dict[str, int] = {}
    out = []
    for layer in model.layers:
        base = snake_case(type(layer).__name__)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((base if n == 0 else f"{base}_{n}", layer))
    return out


def _write_weights(model, handle) -> None:
    h5py = _h5py()
    with h5py.File(handle, "w") as f:
        for group, layer in _layer_groups(model):
            f.create_group(f"layers/{group}/vars")
            layer.save_own_variables(f.require_group(f"layers/{group}/{layer.variables_path}"))
        model.save_optimizer_variables(f.create_group("optimizer/vars"))
        f.create_group("vars")


def _read_weights(model, handle) -> dict[str, np.ndarray]:
    """Load the layers' weights; return the optimizer's variables (name → array)."""
    h5py = _h5py()
    with h5py.File(handle, "r") as f:
        for group, layer in _layer_groups(model):
            path = f"layers/{group}/{layer.variables_path}"
            layer.load_own_variables(f[path] if path in f else {})
        opt = f.get("optimizer/vars")
        return {k: np.asarray(opt[k]) for k in opt} if opt is not None else {}


def _atomic_write(path: Path, write) -> None:
    """write(file object) into a temporary file beside path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(model, filepath) -> None:
    buffer = io.BytesIO()
    _write_weights(model, buffer)
    _atomic_write(Path(filepath), lambda f: f.write(buffer.getvalue()))


def load_weights(model, filepath) -> None:
    stored = _read_weights(model, filepath)
    if model.optimizer is not None:
        model.load_optimizer_variables(stored)


def save_model(model, filepath) -> None:
    weights = io.BytesIO()
    _write_weights(model, weights)
    metadata = {
        "keras_version": KERAS_VERSION,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    config = json.dumps(serialization.serialize(model))

    def write(raw) -> None:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as z:
            z.writestr("metadata.json", json.dumps(metadata))
            z.writestr("config.json", config)
            z.writestr("model.weights.h5", weights.getvalue())

    _atomic_write(Path(filepath), write)


def load_model(filepath, compile: bool = True):
    with zipfile.ZipFile(filepath) as z:
        entry = json.loads(z.read("config.json"))
        weights = io.BytesIO(z.read("model.weights.h5"))
    model = serialization.deserialize(entry)
    optimizer_variables = _read_weights(model, weights)
    if compile and entry.get("compile_config"):
        model.compile_from_config(entry["compile_config"])
        model.load_optimizer_variables(optimizer_variables)
    return model


serialization.FILE_FORMATS[".keras"] = FileFormat(".keras", save_model, load_model)
serialization.FILE_FORMATS[".weights.h5"] = FileFormat(".weights.h5", save_weights, load_weights)
