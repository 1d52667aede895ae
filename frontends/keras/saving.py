"""The .keras file (keras-behaviour.md §8): a zip of metadata.json, config.json and
model.weights.h5, readable by real Keras 3 and reading what it writes, for the layers
Kiln has. h5py is needed (an optional extra: pip install h5py).

A save is written to a temporary file beside the target and renamed over it, so a
failed save never leaves a half-written file where a good one was.
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

from frontends.keras import layers as layers_module
from frontends.keras import optimizers as optimizers_module
from frontends.keras.layers import InputLayer, Layer, _snake

KERAS_VERSION = "3.15.1"


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("saving and loading .keras files needs h5py: pip install h5py") from e
    return h5py


# ------------------------------------------------------------------ layer configs


def _activation_name(layer) -> str:
    return getattr(layer, "activation_name", "linear")


def layer_config(layer: Layer) -> dict:
    """The layer's Keras config (the fields a Keras constructor takes)."""
    base = {"name": layer.name, "trainable": layer.trainable, "dtype": "float32"}
    kind = type(layer).__name__
    if kind == "Dense":
        base.update(units=layer.units, activation=_activation_name(layer), use_bias=layer.use_bias)
    elif kind == "Conv2D":
        base.update(
            filters=layer.filters,
            kernel_size=list(layer.kernel_size),
            strides=list(layer.strides),
            padding=layer.padding,
            data_format="channels_last",
            dilation_rate=list(layer.dilation_rate),
            groups=1,
            activation=_activation_name(layer),
            use_bias=layer.use_bias,
        )
    elif kind in ("MaxPooling2D", "AveragePooling2D"):
        base.update(pool_size=list(layer.pool_size), strides=list(layer.strides), padding=layer.padding,
                    data_format="channels_last")  # fmt: skip
    elif kind == "Conv1D":
        base.update(filters=layer.filters, kernel_size=[layer.kernel_size[1]], strides=[layer.strides[1]],
                    padding="causal" if layer.causal else layer.padding, data_format="channels_last",
                    dilation_rate=[layer.dilation_rate[1]], groups=1, activation=_activation_name(layer),
                    use_bias=layer.use_bias)  # fmt: skip
    elif kind == "Embedding":
        base.update(input_dim=layer.input_dim, output_dim=layer.output_dim, mask_zero=False)
    elif kind == "GlobalAveragePooling2D":
        base.update(data_format="channels_last", keepdims=False)
    elif kind == "LayerNormalization":
        base.update(axis=-1, epsilon=layer.epsilon, center=layer.center, scale=layer.scale)
    elif kind == "Flatten":
        base.update(data_format="channels_last")
    elif kind == "Reshape":
        base.update(target_shape=list(layer.target_shape))
    elif kind == "Activation":
        base.update(activation=_activation_name(layer))
    elif kind == "Dropout":
        base.update(rate=layer.rate, seed=None, noise_shape=None)
    elif kind == "BatchNormalization":
        base.update(
            axis=-1, momentum=layer.momentum, epsilon=layer.epsilon, center=layer.center, scale=layer.scale
        )
    elif kind == "Add":
        pass
    elif kind == "Concatenate":
        base.update(axis=layer.axis)
    elif kind in ("SimpleRNN", "LSTM", "GRU"):
        base.update(
            units=layer.units,
            activation=layer.activation,
            use_bias=layer.use_bias,
            return_sequences=layer.return_sequences,
            return_state=layer.return_state,
            go_backwards=layer.go_backwards,
        )
        if kind != "SimpleRNN":
            base["recurrent_activation"] = layer.recurrent_activation
        if kind == "LSTM":
            base["unit_forget_bias"] = layer.unit_forget_bias
        if kind == "GRU":
            base["reset_after"] = layer.reset_after
    else:
        raise ValueError(f"cannot save a {kind} layer")
    return base


#: config keys Kiln's constructors take (the rest of a Keras config is defaults Kiln shares)
_ACCEPTED = {
    "Dense": ("units", "activation", "use_bias"),
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "dilation_rate", "activation", "use_bias"),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "Conv1D": ("filters", "kernel_size", "strides", "padding", "dilation_rate", "activation", "use_bias"),
    "GlobalAveragePooling2D": (),
    "Embedding": ("input_dim", "output_dim"),
    "LayerNormalization": ("axis", "epsilon", "center", "scale"),
    "Flatten": (),
    "Reshape": ("target_shape",),
    "Activation": ("activation",),
    "Dropout": ("rate",),
    "BatchNormalization": ("axis", "momentum", "epsilon", "center", "scale"),
    "Add": (),
    "Concatenate": ("axis",),
    "SimpleRNN": ("units", "activation", "use_bias", "return_sequences", "return_state", "go_backwards"),
    "LSTM": ("units", "activation", "recurrent_activation", "use_bias", "return_sequences", "return_state",
             "go_backwards", "unit_forget_bias"),
    "GRU": ("units", "activation", "recurrent_activation", "use_bias", "return_sequences", "return_state",
            "go_backwards", "reset_after"),
}  # fmt: skip


def layer_from_config(entry: dict) -> Layer:
    kind, config = entry["class_name"], entry["config"]
    if kind not in _ACCEPTED:
        raise ValueError(f"cannot load a {kind} layer (Kiln has: {', '.join(_ACCEPTED)})")
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError(f"layer {config.get('name')}: only channels_last is supported")
    kwargs = {k: config[k] for k in _ACCEPTED[kind] if k in config}
    for key in ("activation", "recurrent_activation"):
        if isinstance(kwargs.get(key), dict):  # a serialized function object
            kwargs[key] = kwargs[key]["config"]
    return getattr(layers_module, kind)(name=config["name"], **kwargs)


# ------------------------------------------------------------------ weights


def _layer_groups(model) -> list[tuple[str, Layer]]:
    """layers/<snake class>[_k]: Keras numbers the groups by class, in model order."""
    seen: dict[str, int] = {}
    out = []
    for layer in model.layers:
        base = _snake(type(layer).__name__)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((base if n == 0 else f"{base}_{n}", layer))
    return out


def _vars_group(layer: Layer) -> str:
    return "cell/vars" if type(layer).__name__ in ("SimpleRNN", "LSTM", "GRU") else "vars"


def _write_weights(model, handle) -> None:
    h5py = _h5py()
    with h5py.File(handle, "w") as f:
        for group, layer in _layer_groups(model):
            g = f.create_group(f"layers/{group}/{_vars_group(layer)}")
            if _vars_group(layer) != "vars":
                f.create_group(f"layers/{group}/vars")
            for i, w in enumerate(
                [w for w in layer.weights if w.trainable] + [w for w in layer.weights if not w.trainable]
            ):
                g.create_dataset(str(i), data=w.value)
        opt = f.create_group("optimizer/vars")
        if model.optimizer is not None:
            opt.create_dataset("0", data=np.array(model.optimizer.iterations, np.int32))
            opt.create_dataset("1", data=np.array(model.optimizer.learning_rate, np.float32))
            slots = model._state.slot_values() if model._state is not None else {}
            i = 2
            for w in model.weights:
                if not w.trainable:
                    continue
                for s, start in model.optimizer.slots.items():
                    value = slots.get((w.name, s), np.full(w.shape, start, np.float32))
                    opt.create_dataset(str(i), data=value)
                    i += 1
        f.create_group("vars")


def _read_weights(model, handle) -> dict:
    """Load the layers' weights; return the optimizer's variables (name → array)."""
    h5py = _h5py()
    with h5py.File(handle, "r") as f:
        for group, layer in _layer_groups(model):
            path = f"layers/{group}/{_vars_group(layer)}"
            ordered = [w for w in layer.weights if w.trainable] + [
                w for w in layer.weights if not w.trainable
            ]
            stored = f[path] if path in f else {}
            if len(stored) != len(ordered):
                raise ValueError(
                    f"{path}: {len(stored)} weights in the file, layer {layer.name} has {len(ordered)}"
                )
            for i, w in enumerate(ordered):
                value = np.asarray(stored[str(i)], np.float32)
                if value.shape != w.shape:
                    raise ValueError(f"{path}/{i}: shape {value.shape}, layer {layer.name} expects {w.shape}")
                w.value = value
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


def write_weights_file(model, filepath) -> None:
    buffer = io.BytesIO()
    _write_weights(model, buffer)
    _atomic_write(Path(filepath), lambda f: f.write(buffer.getvalue()))


def read_weights_file(model, filepath) -> None:
    stored = _read_weights(model, filepath)
    if model.optimizer is not None:
        _restore_optimizer(model, stored)


# ------------------------------------------------------------------ save / load


def _input_entry(name: str, shape, dtype: str | None) -> dict:
    return {"module": "keras.layers", "class_name": "InputLayer",
            "config": {"batch_shape": [None, *shape], "dtype": dtype or "float32", "sparse": False,
                       "ragged": False, "name": name, "optional": False},
            "registered_name": None}  # fmt: skip


def _layer_entry(layer: Layer, input_shape) -> dict:
    return {"module": "keras.layers", "class_name": type(layer).__name__, "config": layer_config(layer),
            "registered_name": None, "build_config": {"input_shape": input_shape}}  # fmt: skip


def _sequential_config(model) -> dict:
    build_shape = [None, *model._input_shapes[0]]
    entries = [_input_entry("input_layer", model._input_shapes[0], model._input_dtypes[0])]
    shape = model._input_shapes[0]
    for layer in model.layers:
        entries.append(_layer_entry(layer, [None, *shape]))
        shape = layer.compute_output_shape(shape)
    return {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": model.name, "trainable": True, "dtype": "float32", "layers": entries,
                   "build_input_shape": build_shape},
        "registered_name": None,
        "build_config": {"input_shape": build_shape},
    }  # fmt: skip


def _history(t) -> list:
    """A tensor as Keras's config names it: [layer, call, output]."""
    return [t.layer.name, t.call.index, t.index]


def _functional_config(model) -> dict:
    """Keras's Functional config: each layer with the calls that feed it (inbound_nodes),
    in the model's layer order."""
    calls: dict[int, list] = {}
    for call in model._calls:
        calls.setdefault(id(call.layer), []).append(call)
    dtypes = dict(zip(map(id, model._inputs), model._input_dtypes))
    entries = []
    for layer in model.layers:
        if isinstance(layer, InputLayer):
            (t,) = [t for t in model._inputs if t.layer is layer]
            entry = _input_entry(layer.name, t.shape, dtypes[id(t)])
            entries.append({**entry, "name": layer.name, "inbound_nodes": []})
            continue
        nodes = []
        for call in calls[id(layer)]:
            tensors = [
                {"class_name": "__keras_tensor__",
                 "config": {"shape": [None, *t.shape], "dtype": "float32", "keras_history": _history(t)}}
                for t in call.inputs
            ]  # fmt: skip
            nodes.append({"args": [tensors if call.many else tensors[0]], "kwargs": {}})
        shapes = [[None, *t.shape] for t in calls[id(layer)][0].inputs]
        entry = _layer_entry(layer, shapes if calls[id(layer)][0].many else shapes[0])
        entries.append({**entry, "name": layer.name, "inbound_nodes": nodes})
    return {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {"name": model.name, "trainable": True, "layers": entries,
                   "input_layers": [_history(t) for t in model._inputs],
                   "output_layers": [_history(t) for t in model._outputs]},
        "registered_name": "Functional",
        "build_config": {"input_shape": None},
    }  # fmt: skip


def _names_config(spec):
    """compile()'s loss or metrics as Keras stores them: names, in the structure given."""
    if isinstance(spec, (list, tuple)):
        return [_names_config(s) for s in spec]
    if isinstance(spec, dict):
        return {k: _names_config(v) for k, v in spec.items()}
    return spec if spec is None or isinstance(spec, str) else spec.name


def _config(model) -> dict:
    from frontends.keras.models import Sequential

    config = _sequential_config(model) if isinstance(model, Sequential) else _functional_config(model)
    if model.optimizer is not None and model.loss is not None:
        opt = model.optimizer
        config["compile_config"] = {
            "optimizer": {"module": "keras.optimizers", "class_name": type(opt).__name__,
                          "config": opt.get_config(), "registered_name": None},
            "loss": _names_config(model.loss),
            "loss_weights": model._loss_weights_spec,
            "metrics": _names_config(model._metric_ids) or None,
            "weighted_metrics": None,
            "run_eagerly": False,
            "steps_per_execution": 1,
            "jit_compile": False,
        }  # fmt: skip
    return config


def save_model(model, filepath) -> None:
    path = Path(filepath)
    if path.suffix != ".keras":
        raise ValueError(f"The filename must end in `.keras`. Received: filepath={filepath}")
    if not model.built:
        raise ValueError("the model has no weights yet: build it (or fit it) before saving")
    model._sync()
    weights = io.BytesIO()
    _write_weights(model, weights)
    metadata = {
        "keras_version": KERAS_VERSION,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    config = json.dumps(_config(model))

    def write(raw) -> None:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as z:
            z.writestr("metadata.json", json.dumps(metadata))
            z.writestr("config.json", config)
            z.writestr("model.weights.h5", weights.getvalue())

    _atomic_write(path, write)


def _load_sequential(config: dict):
    from frontends.keras.models import Sequential

    model = Sequential(name=config["config"].get("name"))
    for entry in config["config"]["layers"]:
        if entry["class_name"] == "InputLayer":
            model.add(InputLayer(shape=entry["config"]["batch_shape"][1:]))
        else:
            model.add(layer_from_config(entry))
    if not model.built:
        model.build(
            config.get("build_config", {}).get("input_shape") or config["config"]["build_input_shape"]
        )
    return model


def _load_functional(config: dict):
    """Rebuild the layers and replay their calls (inbound_nodes) in the file's order."""
    from frontends.keras.models import Model

    tensors: dict[tuple, object] = {}

    def tensor(arg):
        if isinstance(arg, list):
            return [tensor(a) for a in arg]
        key = tuple(arg["config"]["keras_history"])
        if key not in tensors:
            raise ValueError(f"layer input {list(key)} is not made by an earlier layer in the file")
        return tensors[key]

    for entry in config["config"]["layers"]:
        if entry["class_name"] == "InputLayer":
            c = entry["config"]
            dtype = c.get("dtype") if c.get("dtype") != "float32" else None
            shape = c["batch_shape"][1:]
            tensors[(c["name"], 0, 0)] = layers_module.Input(shape, name=c["name"], dtype=dtype)
            continue
        layer = layer_from_config(entry)
        for index, node in enumerate(entry["inbound_nodes"]):
            out = layer(tensor(node["args"][0]))
            for i, t in enumerate(out if isinstance(out, list) else [out]):
                tensors[(layer.name, index, i)] = t

    def ends(spec):
        spec = spec if spec and isinstance(spec[0], list) else [spec]
        return [tensors[tuple(s)] for s in spec]

    c = config["config"]
    return Model(ends(c["input_layers"]), ends(c["output_layers"]), name=c.get("name"))


def load_model(filepath, compile: bool = True):
    with zipfile.ZipFile(filepath) as z:
        config = json.loads(z.read("config.json"))
        weights = io.BytesIO(z.read("model.weights.h5"))
    kind = config.get("class_name")
    if kind == "Sequential":
        model = _load_sequential(config)
    elif kind in ("Functional", "Model"):
        model = _load_functional(config)
    else:
        raise ValueError(f"{filepath}: a {kind} model; Kiln loads Sequential and Functional models")
    optimizer_vars = _read_weights(model, weights)
    compiled = config.get("compile_config")
    if compile and compiled:
        opt = compiled["optimizer"]
        if isinstance(opt, dict):
            cls = getattr(optimizers_module, opt["class_name"])
            known = {"learning_rate", "momentum", "nesterov", "beta_1", "beta_2", "epsilon", "rho"}
            known |= {"centered", "initial_accumulator_value", "weight_decay"}
            opt = cls(**{k: v for k, v in opt["config"].items() if k in known and v is not None})
        model.compile(
            optimizer=opt,
            loss=compiled["loss"],
            metrics=compiled.get("metrics"),
            loss_weights=compiled.get("loss_weights"),
        )
        _restore_optimizer(model, optimizer_vars)
    return model


def _restore_optimizer(model, stored: dict) -> None:
    """iterations, learning rate and the slots, as _write_weights lays them out."""
    opt = model.optimizer
    if "0" not in stored:
        return
    opt.iterations = int(stored["0"])
    opt.learning_rate = float(stored["1"])
    slots, i = {}, 2
    for w in model.weights:
        if not w.trainable:
            continue
        for s in opt.slots:
            if str(i) in stored and stored[str(i)].shape == w.shape:
                slots[(w.name, s)] = np.asarray(stored[str(i)], np.float32)
            i += 1
    model._slots_kept = slots
