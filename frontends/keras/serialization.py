"""Keras objects as configs, and the files they are saved in, by name.

A class that describes itself (`get_config`) and builds itself from that description
(`from_config`) enters the registry under its Keras class name with @register; an
object's entry is Keras's: {"module", "class_name", "config", "registered_name"}.
`deserialize` finds an entry's class by that name, so the file format never names a
layer or model class. The file formats register here too, by suffix, so models save
and load through them without importing the module that writes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REGISTRY: dict[str, type] = {}


def register(cls: type | None = None, *, name: str | None = None):
    """Class decorator: `cls` is saved and loaded as Keras's class `name` (its own name
    by default)."""

    def wrap(cls: type) -> type:
        cls.keras_name = name or cls.__name__
        REGISTRY[cls.keras_name] = cls
        return cls

    return wrap(cls) if cls is not None else wrap


def serialize(obj: Any) -> dict:
    """Keras's entry for `obj`: its module, class name, config and registered name, and
    for a model the configs of its build and of its compile() (where it has them)."""
    entry = {
        "module": obj.keras_module,
        "class_name": obj.keras_name,
        "config": obj.get_config(),
        "registered_name": obj.registered_name,
    }
    for key in ("build_config", "compile_config"):
        value = getattr(obj, f"get_{key}", lambda: None)()
        if value is not None:
            entry[key] = value
    return entry


def deserialize(entry: dict) -> Any:
    """The object an entry describes, built by its class's from_config."""
    kind = entry["class_name"]
    if kind not in REGISTRY:
        raise ValueError(f"cannot load a {kind} (Kiln has: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[kind].from_config(entry["config"])


def dtype_policy() -> dict:
    """The dtype every Kiln layer computes in, as Keras writes a layer's dtype policy."""
    return {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
        "registered_name": None,
    }


def snake_case(name: str) -> str:
    """Keras's snake_case of a class name: LSTM → lstm, SimpleRNN → simple_rnn, Conv2D → conv2d."""
    words = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", words).lower()


@dataclass(frozen=True)
class FileFormat:
    """How models are saved to and loaded from files ending in `suffix`: save(model, path);
    load(path, compile) gives a model (.keras), load(model, path) fills one (.weights.h5)."""

    suffix: str
    save: Callable[..., None]
    load: Callable[..., Any]


FILE_FORMATS: dict[str, FileFormat] = {}


def file_format(suffix: str, filepath) -> FileFormat:
    """The format of `suffix`, for a file that must end in it."""
    if not str(filepath).endswith(suffix):
        raise ValueError(f"The filename must end in `{suffix}`. Received: filepath={filepath}")
    return FILE_FORMATS[suffix]
