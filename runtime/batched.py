"""Running a dynamic-batch library: one library, any batch size (see compiler.batching),
and where it has one, any sequence length up to its bound (compiler.sequence).

Such a library has NAME_run_shaped in place of NAME_run: each call brings its input
shapes, the library checks them against its named dimensions and says the output
shapes. `.inputs` shows the named dimensions (`input: float32[N, 784]`).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ir.errors import KilnError
from runtime import CompiledModel, KilnRuntimeError, TensorInfo, _addresses, inputs_by_name

_API = (
    "create", "destroy", "run_shaped", "output_shapes", "last_error", "set_num_threads", "num_threads",
    "batch_dim", "max_batch", "num_inputs", "num_outputs",
)  # fmt: skip


#: input shapes whose output shapes a BatchedModel keeps worked out
MAX_PLANS = 64


@dataclass(frozen=True)
class _Plan:
    """What a call's input shapes give: the output shapes, and the input shapes as the
    library takes them (kept alive with their pointer array)."""

    outputs: list[tuple[int, ...]]
    inputs: list[np.ndarray]
    pointers: ctypes.Array


class BatchedModel:
    """A dynamic-batch library loaded in this process, with its own native instance.
    Called like a CompiledModel (`model(x)`, `model.run(x)`, `model.run_into(outs, x)`)
    with inputs of any batch size; calls on one BatchedModel are serialized."""

    target = "cpu"

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        try:
            self._lib = ctypes.CDLL(str(self.path.resolve()))
            self._fn = {s: getattr(self._lib, f"{self.name}_{s}") for s in _API}
        except (OSError, AttributeError) as e:
            raise KilnError(f"{self.path}: no dynamic-batch Kiln library {self.name!r}: {e}") from None
        self._declare()
        self.batch_dim = self._fn["batch_dim"]().decode()
        #: the largest batch a call may bring (0: any)
        self.max_batch = int(self._fn["max_batch"]())
        #: the sequence dimension it takes at every length from 1 to max_length, if any
        #: (compiler.sequence), else None and 0
        self.sequence_dim: str | None = None
        self.max_length = 0
        if hasattr(self._lib, f"{self.name}_sequence_dim"):
            sequence_dim, max_length = (
                getattr(self._lib, f"{self.name}_{f}") for f in ("sequence_dim", "max_length")
            )
            sequence_dim.restype, max_length.restype = ctypes.c_char_p, ctypes.c_int64
            self.sequence_dim, self.max_length = sequence_dim().decode(), int(max_length())
        self.inputs = self._tensors("input")
        self.outputs = self._tensors("output")
        self._handle = ctypes.c_void_p()
        self._lock = threading.Lock()
        self._plans: dict[tuple, _Plan] = {}
        self._pointers_in = ctypes.c_void_p * max(len(self.inputs), 1)
        self._pointers_out = ctypes.c_void_p * max(len(self.outputs), 1)

    def _declare(self) -> None:
        f, vp, cp, i, i64 = self._fn, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int64
        pp = ctypes.POINTER(vp)
        f["create"].argtypes, f["create"].restype = [pp], i
        f["destroy"].argtypes, f["destroy"].restype = [vp], None
        f["run_shaped"].argtypes, f["run_shaped"].restype = [vp, pp, pp, pp, pp], i
        f["output_shapes"].argtypes, f["output_shapes"].restype = [vp, pp, pp], i
        f["last_error"].argtypes, f["last_error"].restype = [vp], cp
        f["set_num_threads"].argtypes, f["set_num_threads"].restype = [vp, i], i
        f["num_threads"].argtypes, f["num_threads"].restype = [vp], i
        f["batch_dim"].restype, f["max_batch"].restype = cp, i64
        for kind in ("input", "output"):
            f[f"num_{kind}s"].restype = i
            for attr, res in (("name", cp), ("dtype", cp), ("rank", i), ("shape", ctypes.POINTER(i64))):
                fn = f[f"{kind}_{attr}"] = getattr(self._lib, f"{self.name}_{kind}_{attr}")
                fn.argtypes, fn.restype = [i], res
            fn = f[f"{kind}_dim_name"] = getattr(self._lib, f"{self.name}_{kind}_dim_name")
            fn.argtypes, fn.restype = [i, i], cp

    def _tensors(self, kind: str) -> list[TensorInfo]:
        f, out = self._fn, []
        for i in range(f[f"num_{kind}s"]()):
            shape = f[f"{kind}_shape"](i)
            dims: list[int | str] = []
            for axis in range(f[f"{kind}_rank"](i)):
                named = f[f"{kind}_dim_name"](i, axis)
                dims.append(named.decode() if named else int(shape[axis]))
            out.append(TensorInfo(f[f"{kind}_name"](i).decode(), f[f"{kind}_dtype"](i).decode(), tuple(dims)))
        return out

    def _instance(self) -> ctypes.c_void_p:
        if not self._handle:
            handle = ctypes.c_void_p()
            if self._fn["create"](ctypes.byref(handle)) != 0:
                why = (self._fn["last_error"](None) or b"").decode()
                raise KilnRuntimeError(f"{self.name}_create failed: {why or 'out of memory?'}")
            self._handle = handle
        return self._handle

    def _arrange(self, args: Sequence[object], kwargs: dict[str, object]) -> list[np.ndarray]:
        """The inputs in the library's order, each of its dtype and rank and dense (a
        strided array is copied); the library checks the dimensions."""
        given = inputs_by_name(self.name, [t.name for t in self.inputs], args, kwargs)
        arrays = []
        for info in self.inputs:
            a = np.asarray(given[info.name])
            if a.dtype != np.dtype(info.dtype):
                raise TypeError(f"input {info.name!r}: expected dtype {info.dtype}, got {a.dtype}")
            if a.ndim != len(info.shape):
                raise ValueError(f"input {info.name!r}: expected shape {info}, got {list(a.shape)}")
            arrays.append(a if a.flags.c_contiguous and a.flags.aligned else np.array(a, order="C"))
        return arrays

    @staticmethod
    def _pointers(addresses: Sequence[int]) -> ctypes.Array:
        return (ctypes.c_void_p * max(len(addresses), 1))(*addresses)

    def output_shapes(self, *args: object, **kwargs: object) -> list[tuple[int, ...]]:
        """The output shapes these inputs give (their shapes checked)."""
        return self._shapes(self._arrange(args, kwargs))[0]

    def _shapes(self, arrays: list[np.ndarray]) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
        shapes_in = [np.array(a.shape, np.int64) for a in arrays]
        shapes_out = [np.zeros(len(t.shape), np.int64) for t in self.outputs]
        with self._lock:
            ok = self._fn["output_shapes"](
                self._instance(),
                self._pointers([s.ctypes.data for s in shapes_in]),
                self._pointers([s.ctypes.data for s in shapes_out]),
            )
            if ok != 0:
                raise ValueError(f"{self.name}: {self.last_error()}")
        return [tuple(int(d) for d in s) for s in shapes_out], shapes_in

    def _plan(self, args: Sequence[object], kwargs: dict) -> tuple[list[np.ndarray], _Plan]:
        """The inputs in order, and the shapes of the call. The common call (dense
        arrays by position, input shapes seen before) reuses what the first call with
        those shapes worked out; the library checks the shapes on every call anyway."""
        if not kwargs and len(args) == len(self.inputs) and all(type(a) is np.ndarray for a in args):
            arrays = list(args)  # type: ignore[arg-type]
            key = tuple((a.shape, a.dtype) for a in arrays)
            plan = self._plans.get(key)
            if plan is not None and all(a.flags.c_contiguous and a.flags.aligned for a in arrays):
                return arrays, plan
        arrays = self._arrange(args, kwargs)
        shapes, shapes_in = self._shapes(arrays)
        plan = _Plan(shapes, shapes_in, self._pointers([s.ctypes.data for s in shapes_in]))
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[tuple((a.shape, a.dtype) for a in arrays)] = plan
        return arrays, plan

    def run(self, *args: object, **kwargs: object) -> list[np.ndarray]:
        """The outputs, in new arrays."""
        arrays, plan = self._plan(args, kwargs)
        outs = [np.empty(s, t.dtype) for s, t in zip(plan.outputs, self.outputs)]
        self._run(arrays, plan, outs)
        return outs

    def run_into(self, outs: Sequence[np.ndarray], *args: object, **kwargs: object) -> list[np.ndarray]:
        """Like run, writing into `outs`: each of the shape the inputs give, dense and
        writeable, sharing no byte with an input."""
        arrays, plan = self._plan(args, kwargs)
        shapes = plan.outputs
        if len(outs) != len(self.outputs):
            raise TypeError(f"{self.name} has {len(self.outputs)} output(s), given {len(outs)} buffers")
        for info, o, shape in zip(self.outputs, outs, shapes):
            if not isinstance(o, np.ndarray) or o.dtype != np.dtype(info.dtype) or o.shape != shape:
                got = f"{o.dtype}{list(o.shape)}" if isinstance(o, np.ndarray) else type(o).__name__
                raise TypeError(f"output {info.name!r}: expected {info.dtype}{list(shape)}, got {got}")
            if not (o.flags.c_contiguous and o.flags.aligned and o.flags.writeable):
                raise ValueError(f"output {info.name!r} must be C-contiguous, aligned and writeable")
            if any(np.shares_memory(o, a) for a in arrays):
                raise ValueError(f"output {info.name!r} overlaps an input")
        self._run(arrays, plan, list(outs))
        return list(outs)

    def _run(self, arrays: list[np.ndarray], plan: _Plan, outs: list[np.ndarray]) -> None:
        with self._lock:
            ok = self._fn["run_shaped"](
                self._instance(),
                self._pointers_in(*_addresses(arrays)),
                plan.pointers,
                self._pointers_out(*_addresses(outs)),
                None,
            )
            if ok != 0:
                raise KilnRuntimeError(f"{self.name}_run_shaped failed: {self.last_error()}")

    def instance(self) -> BatchedModel:
        """Another native instance of the same library, to run concurrently with this one."""
        return BatchedModel(self.path, self.name)

    # the same over the same native handle and function table as a CompiledModel's
    __call__ = CompiledModel.__call__
    last_error = CompiledModel.last_error
    num_threads = CompiledModel.num_threads
    set_num_threads = CompiledModel.set_num_threads
    save = CompiledModel.save

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._fn["destroy"](handle)
            self._handle = None

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"<BatchedModel {self.name} ({ins}) -> ({outs}) at {self.path}>"
