"""keras.device: which device runs a model's compiled programs (the CPU, or a GPU).

    with keras.device("gpu:0"):
        model.fit(x, y, epochs=3)        # trains on the GPU (the --target cuda programs)

The device is the innermost `keras.device` scope around fit / evaluate / predict /
train_on_batch; outside any scope, the one that was around the model's compile(); else
the CPU. Names as Keras 3 takes them: "cpu", "gpu", "gpu:N", and "cuda", "cuda:N" as
its torch backend also does (N: the device's ordinal).

Why a scope and not `compile(..., target="cuda")`: `keras.device` is Keras 3's own API
for placement, so a script written for Keras runs unchanged on Kiln and on Keras, where
a `target=` argument would be refused by Keras's compile(). Why compile() keeps the
scope around it: Keras keeps a model's variables on the device they were made on, so
code that builds and compiles a model inside the scope and fits it after expects the
GPU; a scope at the call still wins, as the nearer one does in Keras.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

CPU = "cpu"
_scopes = threading.local()  # each thread its own stack, as Keras's global state is per thread


def canonical(name: str) -> str:
    """The device's name in Kiln: "cpu", or "cuda:N" for GPU N, from any name Keras
    takes for them."""
    if not isinstance(name, str):
        raise TypeError(f"keras.device takes a device name such as 'gpu:0', got {name!r}")
    match = re.fullmatch(r"(cpu|gpu|cuda)(?::(\d+))?", name.strip().lower())
    if match is None:
        raise ValueError(
            f"Invalid device name {name!r}: Kiln runs models on 'cpu' or an NVIDIA GPU, "
            "'gpu' / 'gpu:N' (also written 'cuda' / 'cuda:N')"
        )
    kind, ordinal = match.groups()
    if kind == "cpu":
        if ordinal not in (None, "0"):
            raise ValueError(f"Invalid device name {name!r}: there is one CPU device, 'cpu' (or 'cpu:0')")
        return CPU
    return f"cuda:{int(ordinal or 0)}"


@contextlib.contextmanager
def device(device_name: str) -> Iterator[None]:
    """Run the programs of models fit, evaluated or called inside (and of models
    compiled inside, outside any other scope) on `device_name`: see the module's text."""
    name = canonical(device_name)
    stack = _stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current() -> str | None:
    """The innermost scope's device, or None outside every scope."""
    stack = _stack()
    return stack[-1] if stack else None


def ordinal(name: str) -> int:
    """N of "cuda:N"."""
    return int(name.partition(":")[2] or 0)


def _stack() -> list[str]:
    if not hasattr(_scopes, "stack"):
        _scopes.stack = []
    return _scopes.stack
