"""Batch inference over large data: a picklable predictor for Ray Data, Dask and Spark.

A `Predictor` holds only what it needs to find the model (a library path, or the
library's bytes) and the column mapping, so it pickles small and travels to workers;
each process loads the library once, on first use, and shares it among every
predictor of the same model. A call takes a batch in Ray's numpy format (a dict of
column name -> array) or a pandas DataFrame, feeds the model any number of rows in
chunks of its compiled batch size and returns the batch with the outputs added.

    ds.map_batches(Predictor, fn_constructor_args=("build/mnist.so",),
                   compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5, batch_format="numpy")

Kiln itself needs none of Ray, Dask, Spark or pandas: nothing of them is imported here.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import CompiledModel, TensorInfo, load

__all__ = ["Predictor"]

Columns = Sequence[str] | Mapping[str, str]

# The libraries loaded in this process, by (process id, path or content hash): a pickled
# predictor unpickled many times (one Ray task per batch, one Dask task per partition)
# loads its library once. The process id keeps a forked child from using its parent's
# instance, whose threads do not exist in the child.
_MODELS: dict[tuple[int, str], CompiledModel] = {}
_LOCK = threading.Lock()


class Predictor:
    """A compiled Kiln model applied to batches of rows (see the module docstring).

    `path`: a library saved by `CompiledModel.save` (it must exist where the predictor
    runs); or `data`: the library's bytes, so that the predictor is self-contained.
    `name`: the model's symbol prefix (default: the file's stem, or read from the bytes).
    `input_columns` / `output_columns`: column names in the model's input / output
    order, or a dict {tensor name: column}; by default columns are named as the model's
    tensors (a one-input model also takes a batch's only column, whatever its name).
    `num_threads`: native threads per process (default: the library's, all cores);
    give several workers on one machine a share each.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        data: bytes | None = None,
        name: str | None = None,
        input_columns: Columns | None = None,
        output_columns: Columns | None = None,
        num_threads: int | None = None,
    ):
        if (path is None) == (data is None):
            raise TypeError("Predictor takes a library path or its bytes (data=...), exactly one")
        self.path = None if path is None else str(path)
        self.data = None if data is None else bytes(data)
        self.name = name
        self.input_columns = input_columns
        self.output_columns = output_columns
        self.num_threads = num_threads
        self._model: CompiledModel | None = None

    @classmethod
    def from_compiled(cls, model: CompiledModel, **kwargs: Any) -> Predictor:
        """A self-contained predictor: the library's bytes travel with it."""
        return cls(data=model.path.read_bytes(), name=model.name, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}  # the loaded library stays in its process

    @property
    def model(self) -> CompiledModel:
        """The library, loaded on first use (once per process)."""
        if self._model is None:
            model = _load(self.path, self.data, self.name)
            if self.num_threads is not None:
                model.set_num_threads(self.num_threads)
            self._model = model
        return self._model

    def __call__(self, batch: Any) -> Any:
        """The batch with the model's outputs added as columns (replacing any of the same name)."""
        model = self.model
        is_frame = _is_dataframe(batch)
        if not (is_frame or isinstance(batch, Mapping)):
            raise TypeError(
                f"a batch is a dict of column -> array or a pandas DataFrame, got {type(batch).__name__} "
                "(with Ray Data, pass batch_format='numpy')"
            )
        sources = _pick(self.input_columns, model.inputs, "input", list(batch.keys()))
        arrays = [_rows(batch[col], col, info) for col, info in zip(sources, model.inputs)]
        counts = {col: len(a) for col, a in zip(sources, arrays)}
        if len(set(counts.values())) > 1:
            raise ValueError(f"input columns have different numbers of rows: {counts}")
        results = _run(model, arrays, len(arrays[0]))
        targets = _pick(self.output_columns, model.outputs, "output", None)
        if is_frame:  # one value per row: 1-D outputs as they are, others as one array per row
            return batch.assign(**{t: r if r.ndim == 1 else _cells(r) for t, r in zip(targets, results)})
        return {**batch, **dict(zip(targets, results))}

    def __repr__(self) -> str:
        where = self.path if self.path is not None else f"<{len(self.data or b'')} bytes>"
        return f"Predictor({where})"


def _load(path: str | None, data: bytes | None, name: str | None) -> CompiledModel:
    """The library from the process-wide cache, loading it (and checking that it can run
    in chunks) the first time."""
    if data is not None:
        name = name or _name_in(data)
        key = f"{name}:sha256:{hashlib.sha256(data).hexdigest()}"
    else:
        key = f"{name}:{Path(str(path)).resolve()}"
    with _LOCK:
        model = _MODELS.get((os.getpid(), key))
        if model is None:
            model = load(_write_temporary(data, str(name)) if data is not None else str(path), name)
            _check_batched(model)
            _MODELS[(os.getpid(), key)] = model
    return model


def _name_in(data: bytes) -> str:
    """A library's symbol prefix, read from its symbol names (NAME_num_inputs)."""
    names = set(re.findall(rb"\x00([A-Za-z_][A-Za-z0-9_]*)_num_inputs\x00", data))
    if len(names) != 1:
        raise ValueError("cannot tell the model's name from the library's bytes: pass name=...")
    return names.pop().decode()


def _write_temporary(data: bytes, name: str) -> Path:
    """The bytes as NAME.so in a folder of this process's own, removed when it exits."""
    folder = tempfile.mkdtemp(prefix="kiln-predictor-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / f"{name}.so"
    path.write_bytes(data)
    return path


def _check_batched(model: CompiledModel) -> None:
    """Chunking needs every input and output to lead with the same batch dimension."""
    leading = {t.name: t.shape[0] if t.shape else None for t in [*model.inputs, *model.outputs]}
    if None in leading.values() or len(set(leading.values())) != 1:
        raise ValueError(
            f"a Predictor runs models whose inputs and outputs all lead with one batch dimension; "
            f"{model.name}'s leading dimensions: {leading}"
        )


def _is_dataframe(batch: object) -> bool:
    pandas = sys.modules.get("pandas")  # a DataFrame means pandas is imported already
    return pandas is not None and isinstance(batch, pandas.DataFrame)


def _pick(
    given: Columns | None, tensors: list[TensorInfo], kind: str, columns: list[str] | None
) -> list[str]:
    """The column of each tensor, in the model's order. For inputs, `columns` is the
    batch's columns, which must hold them; for outputs it is None."""
    names = [t.name for t in tensors]
    if given is None:
        picked = names
        if columns is not None and len(names) == 1 and len(columns) == 1 and names[0] not in columns:
            picked = columns  # a one-input model takes the only column, whatever its name
    elif isinstance(given, Mapping):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{kind}_columns names no {kind}s {unknown}; the model's {kind}s are {names}")
        picked = [given.get(n, n) for n in names]
    else:
        picked = [given] if isinstance(given, str) else list(given)
        if len(picked) != len(names):
            raise ValueError(f"{kind}_columns has {len(picked)} names for the model's {kind}s {names}")
    if columns is not None:
        missing = [c for c in picked if c not in columns]
        if missing:
            raise ValueError(
                f"the batch has no column {', '.join(map(repr, missing))} for the model's {kind}s {names}; "
                f"its columns are {columns} (pass {kind}_columns=... to map them)"
            )
    return picked


def _rows(values: Any, column: str, info: TensorInfo) -> np.ndarray:
    """A column as a dense array of the input's rows. Rows may come flat, nested, or as
    one object per row (lists, a pandas column of arrays): any with the row's number of
    values is reshaped to it, and dtypes of the same kind are cast (float64 -> float32)."""
    row, dtype = info.shape[1:], np.dtype(info.dtype)
    size = math.prod(row)
    where = f"column {column!r} (input {info.name!r}): expected rows of {size} values {row}, got"
    try:
        a = np.asarray(values)
    except ValueError:  # ragged nested lists: one object per row, checked below
        a = np.empty(len(values), object)
        for i, v in enumerate(values):
            a[i] = v
    if a.dtype == object:  # one Python object per row
        cells = [np.asarray(v) for v in a] if a.ndim == 1 else []
        for i, c in enumerate(cells):
            if c.size != size or c.dtype == object:
                raise ValueError(f"{where} row {i} of shape {c.shape}")
        if a.ndim != 1:
            raise ValueError(f"{where} objects in shape {a.shape}")
        a = np.stack([c.reshape(row) for c in cells]) if cells else np.empty((0, *row), dtype)
    if a.ndim == 0 or math.prod(a.shape[1:]) != size:
        raise ValueError(f"{where} " + (f"rows of shape {a.shape[1:]}" if a.ndim else "a scalar"))
    if not np.can_cast(a.dtype, dtype, "same_kind"):
        raise TypeError(f"column {column!r} (input {info.name!r}): expected {dtype} rows, got {a.dtype}")
    return np.ascontiguousarray(a.reshape(len(a), *row), dtype=dtype)


def _cells(rows: np.ndarray) -> np.ndarray:
    """Rows as an object column, one array per row (its dtype object even when empty)."""
    column = np.empty(len(rows), object)
    for i, row in enumerate(rows):
        column[i] = row
    return column


def _run(model: CompiledModel, arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The outputs for n rows, computed B rows at a time (B: the compiled batch size).
    Full chunks are read and written in place; the last partial chunk is padded with
    zeros and its padded rows dropped."""
    b = model.inputs[0].shape[0]
    outs = [np.empty((n, *t.shape[1:]), t.dtype) for t in model.outputs]
    full = n - n % b
    for i in range(0, full, b):
        model.run_into([o[i : i + b] for o in outs], *[a[i : i + b] for a in arrays])
    if full < n:
        padded = [np.zeros(t.shape, t.dtype) for t in model.inputs]
        for p, a in zip(padded, arrays):
            p[: n - full] = a[full:]
        for o, r in zip(outs, model.run(*padded)):
            o[full:] = r[: n - full]
    return outs
