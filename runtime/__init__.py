"""Running compiled models: load a Kiln library with ctypes and call it with numpy arrays.

Every input is checked against the library's own metadata (count, name, dtype,
shape) before any native call, so a wrong input raises a Python error that names it,
never a crash; a non-contiguous array is copied first, never passed to native code.
A CUDA library (one with NAME_run_device) loads the same way and takes the same
host arrays; it also runs on device buffers (`run_device`), which it can allocate
itself (`alloc`: a DeviceBuffer, for state kept on the GPU between runs).
"""

from __future__ import annotations

import ctypes
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ir.errors import KilnError

__all__ = ["CompiledModel", "DeviceBuffer", "TensorInfo", "load", "KilnRuntimeError"]


class KilnRuntimeError(KilnError, RuntimeError):
    """The native library reported a failure."""


Specs = list[tuple[np.dtype, tuple[int, ...]]]


def _all_match(arrays: Sequence[object], specs: Specs, writeable: bool) -> bool:
    """Whether `arrays` are exactly the tensors `specs` describe, each a dense, aligned
    numpy array (and writeable, for outputs): the common call's whole check, done
    first so that it costs little; any other call goes through the checks that name
    what is wrong."""
    if len(arrays) != len(specs):
        return False
    for a, (dtype, shape) in zip(arrays, specs):
        if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
            return False
        flags = a.flags
        if not (flags.c_contiguous and flags.aligned) or (writeable and not flags.writeable):
            return False
    return True


def _overlap(a: int, a_bytes: int, b: int, b_bytes: int) -> bool:
    """Whether the byte ranges [a, a + a_bytes) and [b, b + b_bytes) meet."""
    return a_bytes > 0 and b_bytes > 0 and a < b + b_bytes and b < a + a_bytes


def _addresses(arrays: Sequence[np.ndarray]) -> list[int]:
    return [a.__array_interface__["data"][0] for a in arrays]


def inputs_by_name(model: str, names: list[str], args: Sequence[object], kwargs: dict[str, object]) -> dict:
    """A call's inputs by name, given by position and/or by name: every one of `names`
    exactly once, else a TypeError that says which."""
    if len(args) > len(names):
        raise TypeError(f"{model} takes {len(names)} input(s) {names}, got {len(args)}")
    given: dict[str, object] = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{model} has no input named {key!r}; inputs are {names}")
        if key in given:
            raise TypeError(f"input {key!r} given twice (by position and by name)")
        given[key] = value
    missing = [n for n in names if n not in given]
    if missing:
        raise TypeError(f"{model} takes {len(names)} input(s) {names}; missing {missing}")
    return given


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype}[{', '.join(map(str, a.shape))}]"


class CompiledModel:
    """A model library loaded in this process, with its own native instance (arena, threads).

    `model(x, ...)` returns one array for a one-output model, else a tuple;
    `model.run(...)` always returns a list. Calls on one CompiledModel are serialized;
    separate instances (`model.instance()`) run concurrently. The native instance is
    made on first use (`create()` makes it now): a CUDA library needs its GPU only then,
    and a failure there (no driver, no device) raises KilnRuntimeError with the
    library's own message. `ordinal` picks the GPU a CUDA library's instance runs on.
    """

    def __init__(self, path: str | Path, name: str | None = None, ordinal: int = 0):
        self.path = Path(path)
        self.ordinal = int(ordinal)
        if not self.path.is_file():
            raise FileNotFoundError(f"no model library at {self.path}")
        self.name = name or self.path.stem
        try:
            self._lib = ctypes.CDLL(str(self.path.resolve()))
        except OSError as e:
            raise KilnError(f"{self.path} is not a loadable shared library: {e}") from None
        try:
            self._fn = {
                s: getattr(self._lib, f"{self.name}_{s}")
                for s in (
                    "create",
                    "run",
                    "destroy",
                    "last_error",
                    "set_num_threads",
                    "num_threads",
                    "num_kernels",
                    "kernel_name",
                    "set_profiling",
                    "kernel_seconds",
                    "num_inputs",
                    "num_outputs",
                    "input_name",
                    "input_dtype",
                    "input_rank",
                    "input_shape",
                    "output_name",
                    "output_dtype",
                    "output_rank",
                    "output_shape",
                )
            }
        except AttributeError:
            raise KilnError(
                f"{self.path} has no Kiln model named {self.name!r} "
                f"(no {self.name}_create symbol); pass the name it was compiled with"
            ) from None
        #: "cuda" for a library that runs on a GPU, else "cpu" (cuda-sim libraries included)
        self.target = "cuda" if hasattr(self._lib, f"{self.name}_run_device") else "cpu"
        if self.target == "cuda":
            cuda_only = ("create_device", "run_device", "device", "alloc", "free", "upload", "download")
            self._fn |= {s: getattr(self._lib, f"{self.name}_{s}") for s in cuda_only}
        self._declare()
        self.inputs = self._tensors("input")
        self.outputs = self._tensors("output")
        # what every call checks against, made once: (dtype, shape) per tensor
        self._input_specs = [(np.dtype(t.dtype), t.shape) for t in self.inputs]
        self._output_specs = [(np.dtype(t.dtype), t.shape) for t in self.outputs]
        self._pointers_in = ctypes.c_void_p * max(len(self.inputs), 1)
        self._pointers_out = ctypes.c_void_p * max(len(self.outputs), 1)
        self._handle = ctypes.c_void_p()
        self._lock = threading.RLock()  # reentrant: a DeviceBuffer may be freed by GC inside a call

    def create(self) -> CompiledModel:
        """Make the native instance now (else the first call that needs it does)."""
        with self._lock:
            self._instance()
        return self

    def _instance(self) -> ctypes.c_void_p:
        """The native instance, made on first use (the caller holds the lock)."""
        if not self._handle:
            handle = ctypes.c_void_p()
            made = (
                self._fn["create_device"](ctypes.byref(handle), self.ordinal)
                if self.target == "cuda"
                else self._fn["create"](ctypes.byref(handle))
            )
            if made != 0:
                why = (self._fn["last_error"](None) or b"").decode()
                raise KilnRuntimeError(f"{self.name}_create failed: {why or 'out of memory?'}")
            self._handle = handle
        return self._handle

    def _declare(self) -> None:
        f, vp, cp, i = self._fn, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        f["create"].argtypes, f["create"].restype = [ctypes.POINTER(vp)], i
        f["run"].argtypes, f["run"].restype = [vp, ctypes.POINTER(vp), ctypes.POINTER(vp)], i
        f["destroy"].argtypes, f["destroy"].restype = [vp], None
        f["last_error"].argtypes, f["last_error"].restype = [vp], cp
        f["set_num_threads"].argtypes, f["set_num_threads"].restype = [vp, i], i
        f["num_threads"].argtypes, f["num_threads"].restype = [vp], i
        f["num_kernels"].argtypes, f["num_kernels"].restype = [], i
        f["kernel_name"].argtypes, f["kernel_name"].restype = [i], cp
        f["set_profiling"].argtypes, f["set_profiling"].restype = [vp, i], None
        f["kernel_seconds"].argtypes = [vp]
        f["kernel_seconds"].restype = ctypes.POINTER(ctypes.c_double)
        if self.target == "cuda":
            f["run_device"].argtypes, f["run_device"].restype = (
                [vp, ctypes.POINTER(vp), ctypes.POINTER(vp), vp],
                i,
            )
            f["device"].argtypes, f["device"].restype = [vp], cp
            f["create_device"].argtypes, f["create_device"].restype = [ctypes.POINTER(vp), i], i
            f["alloc"].argtypes, f["alloc"].restype = [vp, ctypes.c_size_t, ctypes.POINTER(vp)], i
            f["free"].argtypes, f["free"].restype = [vp, vp], i
            for copy in ("upload", "download"):
                f[copy].argtypes, f[copy].restype = [vp, vp, vp, ctypes.c_size_t], i
        for kind in ("input", "output"):
            f[f"num_{kind}s"].argtypes, f[f"num_{kind}s"].restype = [], i
            for attr, res in (
                ("name", cp),
                ("dtype", cp),
                ("rank", i),
                ("shape", ctypes.POINTER(ctypes.c_int64)),
            ):
                f[f"{kind}_{attr}"].argtypes, f[f"{kind}_{attr}"].restype = [i], res

    def _tensors(self, kind: str) -> list[TensorInfo]:
        f = self._fn
        out = []
        for i in range(f[f"num_{kind}s"]()):
            rank = f[f"{kind}_rank"](i)
            shape = f[f"{kind}_shape"](i)
            out.append(
                TensorInfo(
                    f[f"{kind}_name"](i).decode(),
                    f[f"{kind}_dtype"](i).decode(),
                    tuple(shape[d] for d in range(rank)),
                )
            )
        return out

    # ------------------------------------------------------------------ calling
    def _arrange(
        self, args: Sequence[object], kwargs: dict[str, object], copy: bool = True
    ) -> list[np.ndarray]:
        """The inputs in the library's order, each checked against its metadata. A
        non-contiguous (or misaligned) array is copied when `copy`, as onnxruntime does;
        a wrong dtype, shape or count is refused."""
        if not kwargs and _all_match(args, self._input_specs, writeable=False):
            return list(args)  # type: ignore[arg-type]  # the common call: every check passed
        given = inputs_by_name(self.name, [t.name for t in self.inputs], args, kwargs)
        arrays = []
        for info in self.inputs:
            a = given[info.name]
            if isinstance(a, np.generic):  # a numpy scalar, for a rank-0 input
                a = np.asarray(a)
            if not isinstance(a, np.ndarray):
                raise TypeError(
                    f"input {info.name!r}: expected a numpy array {info.dtype}{list(info.shape)}, "
                    f"got {type(a).__name__}"
                )
            if a.dtype != np.dtype(info.dtype):
                raise TypeError(f"input {info.name!r}: expected dtype {info.dtype}, got {a.dtype}")
            if a.shape != info.shape:
                raise ValueError(f"input {info.name!r}: expected shape {info.shape}, got {a.shape}")
            if not (a.flags.c_contiguous and a.flags.aligned):
                if not copy:
                    raise ValueError(
                        f"input {info.name!r} is not C-contiguous; a bound call reads the array "
                        "itself, so pass np.ascontiguousarray(...)"
                    )
                a = np.array(a, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
            arrays.append(a)
        return arrays

    def run(self, *args: object, **kwargs: object) -> list[np.ndarray]:
        """The outputs, in new arrays."""
        outs = [np.empty(shape, dtype) for dtype, shape in self._output_specs]
        arrays = self._arrange(args, kwargs)
        self._run(self._pointers_in(*_addresses(arrays)), self._pointers_out(*_addresses(outs)))
        return outs

    def run_into(self, outs: Sequence[np.ndarray], *args: object, **kwargs: object) -> list[np.ndarray]:
        """Like run, writing into `outs` (preallocated, as a C caller would): no allocation
        per call. They must match the outputs exactly and not overlap any input."""
        arrays = self._arrange(args, kwargs)
        ins = _addresses(arrays)
        self._run(self._pointers_in(*ins), self._pointers_out(*self._output_addresses(outs, arrays, ins)))
        return list(outs)

    def _output_addresses(
        self, outs: Sequence[np.ndarray], arrays: list[np.ndarray], ins: list[int]
    ) -> list[int]:
        """The outputs' addresses, once each is checked to be the buffer the library
        writes and to share no byte with an input (both are dense, so their byte
        ranges say whether they meet)."""
        if not _all_match(outs, self._output_specs, writeable=True):
            self._refuse_outputs(outs)
        at = _addresses(outs)
        for info, out, o in zip(self.outputs, outs, at):
            if any(
                a.nbytes and out.nbytes and o < i + a.nbytes and i < o + out.nbytes
                for a, i in zip(arrays, ins)
            ):
                raise ValueError(f"output {info.name!r} overlaps an input")
        return at

    def _refuse_outputs(self, outs: Sequence[object]) -> None:
        """Raise the error that names what is wrong with output buffers that do not match."""
        if len(outs) != len(self.outputs):
            raise TypeError(f"{self.name} has {len(self.outputs)} output(s), given {len(outs)} buffers")
        for info, o in zip(self.outputs, outs):
            if not isinstance(o, np.ndarray) or o.dtype != np.dtype(info.dtype) or o.shape != info.shape:
                got = f"{o.dtype}{list(o.shape)}" if isinstance(o, np.ndarray) else type(o).__name__
                raise TypeError(f"output {info.name!r}: expected {info.dtype}{list(info.shape)}, got {got}")
            if not (o.flags.c_contiguous and o.flags.aligned and o.flags.writeable):
                raise ValueError(f"output {info.name!r} must be C-contiguous, aligned and writeable")
        raise AssertionError("unreachable: the outputs matched")

    def _run(self, ins_c: ctypes.Array, outs_c: ctypes.Array) -> None:
        with self._lock:
            if self._fn["run"](self._instance(), ins_c, outs_c) != 0:
                raise KilnRuntimeError(f"{self.name}_run failed: {self.last_error()}")

    def run_device(self, inputs: Sequence[int], outputs: Sequence[int], stream: int | None = None) -> None:
        """Run a CUDA library on device buffers: `inputs` and `outputs` are device
        addresses (CUdeviceptr, e.g. a torch tensor's data_ptr()), each holding its
        tensor's bytes (dense, C order) in the instance's CUDA context (the device's
        primary one); `stream` a CUstream handle (None: the instance's own). Returns
        when the outputs are written."""
        if self.target != "cuda":
            raise KilnError(f"{self.path.name} is a CPU library: run_device needs one compiled for cuda")
        if len(inputs) != len(self.inputs) or len(outputs) != len(self.outputs):
            raise TypeError(
                f"{self.name} takes {len(self.inputs)} input and {len(self.outputs)} output device "
                f"buffers, given {len(inputs)} and {len(outputs)}"
            )
        ins_c = (ctypes.c_void_p * max(len(inputs), 1))(*[int(a) for a in inputs])
        outs_c = (ctypes.c_void_p * max(len(outputs), 1))(*[int(a) for a in outputs])
        with self._lock:
            if self._fn["run_device"](self._instance(), ins_c, outs_c, stream) != 0:
                raise KilnRuntimeError(f"{self.name}_run_device failed: {self.last_error()}")

    def alloc(self, nbytes: int, what: str = "a device buffer") -> DeviceBuffer:
        """`nbytes` of device memory in this instance's context (shared by every instance
        on the same GPU), freed when the DeviceBuffer is garbage (or by its free()), and
        at the latest with the instance. `what` names it in error messages."""
        if self.target != "cuda":
            raise KilnError(f"{self.path.name} is a CPU library: device memory needs one compiled for cuda")
        address = ctypes.c_void_p()
        with self._lock:
            if self._fn["alloc"](self._instance(), int(nbytes), ctypes.byref(address)) != 0:
                raise KilnRuntimeError(f"{self.name}_alloc failed for {what}: {self.last_error()}")
        return DeviceBuffer(self, int(address.value or 0), int(nbytes), what)

    def _copy(self, direction: str, dev: int, host: int, nbytes: int, what: str) -> None:
        with self._lock:
            handle = self._handle
            if not handle:
                raise KilnError(f"{what} is gone: its instance of {self.name} was destroyed")
            args = (handle, dev, host, nbytes) if direction == "upload" else (handle, host, dev, nbytes)
            if self._fn[direction](*args) != 0:
                raise KilnRuntimeError(f"{self.name}_{direction} of {what} failed: {self.last_error()}")

    @property
    def device(self) -> str | None:
        """For a CUDA library, the device, driver and image its instance runs (making
        the instance); None for a CPU library."""
        if self.target != "cuda":
            return None
        with self._lock:
            return self._fn["device"](self._instance()).decode()

    def bind(self, outs: Sequence[np.ndarray], *args: object) -> Callable[[], None]:
        """A call of the library on these very arrays, checked once now (it does not run):
        the returned function runs it with no per-call checks or allocation, which a
        training loop needs (it changes the arrays' contents between steps, never the
        arrays). The arrays must stay alive and in place while the function is used."""
        arrays = self._arrange(args, {}, copy=False)
        ins = _addresses(arrays)
        ins_c, outs_c = (
            self._pointers_in(*ins),
            self._pointers_out(*self._output_addresses(outs, arrays, ins)),
        )

        def call() -> None:
            self._run(ins_c, outs_c)

        call.arrays = (arrays, list(outs))  # type: ignore[attr-defined]  # alive as long as the call
        return call

    def __call__(self, *args: object, **kwargs: object) -> np.ndarray | tuple[np.ndarray, ...]:
        outs = self.run(*args, **kwargs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def last_error(self) -> str:
        if not self._handle:
            return ""
        return (self._fn["last_error"](self._handle) or b"").decode()

    @property
    def num_threads(self) -> int:
        with self._lock:
            return self._fn["num_threads"](self._instance())

    def set_num_threads(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"thread count must be >= 1, got {n}")
        with self._lock:
            self._fn["set_num_threads"](self._instance(), int(n))

    def set_profiling(self, on: bool) -> None:
        """Start (and zero) or stop timing each kernel; see kernel_times()."""
        with self._lock:
            handle = self._instance()
            self._fn["set_profiling"](handle, int(on))
            if on and self.target == "cuda" and self.last_error():
                raise KilnRuntimeError(f"{self.name}_set_profiling failed: {self.last_error()}")

    def kernel_times(self) -> dict[str, float]:
        """Seconds spent in each kernel since set_profiling(True), by kernel name."""
        n = self._fn["num_kernels"]()
        with self._lock:
            seconds = self._fn["kernel_seconds"](self._instance())
            return {self._fn["kernel_name"](i).decode(): seconds[i] for i in range(n)}

    def instance(self) -> CompiledModel:
        """Another native instance of the same library, to run concurrently with this one."""
        return CompiledModel(self.path, self.name, self.ordinal).create()

    def save(self, path: str | Path) -> Path:
        """Copy the library (and its header, if beside it) to path (a .so file or a folder)."""
        dest = Path(path)
        if dest.is_dir() or not dest.suffix:
            dest.mkdir(parents=True, exist_ok=True)
            dest = dest / self.path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, dest)
        header = self.path.with_suffix(".h")
        if header.exists():
            shutil.copyfile(header, dest.with_name(f"{self.name}.h"))
        return dest

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._fn["destroy"](handle)
            self._handle = None

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        outs = ", ".join(map(str, self.outputs))
        return f"<CompiledModel {self.name} ({ins}) -> ({outs}) at {self.path}>"


class DeviceBuffer:
    """Device memory from a CUDA library's instance (CompiledModel.alloc): its address
    (a CUdeviceptr, for run_device) and size, with copies from and to numpy arrays.
    It keeps its instance alive; garbage, it is freed (or with the instance, whichever
    goes first)."""

    def __init__(self, owner: CompiledModel, address: int, nbytes: int, what: str):
        self.owner, self.address, self.nbytes, self.what = owner, address, nbytes, what

    def _host(self, array: np.ndarray, offset: int, writing: bool) -> int:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise TypeError(f"{self.what}: copies take a C-contiguous numpy array")
        if writing and not array.flags.writeable:
            raise ValueError(f"{self.what}: the array to download into is read-only")
        if offset < 0 or offset + array.nbytes > self.nbytes:
            raise ValueError(
                f"{self.what} has {self.nbytes} bytes: {array.nbytes} bytes at offset {offset} do not fit"
            )
        if not self.address:
            raise KilnError(f"{self.what} was freed")
        return array.ctypes.data

    def upload(self, array: np.ndarray, offset: int = 0) -> None:
        """array's bytes to the device, at `offset` bytes into the buffer; returns when done."""
        host = self._host(array, offset, writing=False)
        self.owner._copy("upload", self.address + offset, host, array.nbytes, self.what)

    def download(self, out: np.ndarray, offset: int = 0) -> np.ndarray:
        """The device bytes at `offset` into `out` (its size of them); returns out."""
        host = self._host(out, offset, writing=True)
        self.owner._copy("download", self.address + offset, host, out.nbytes, self.what)
        return out

    def free(self) -> None:
        address, self.address = self.address, 0
        owner = self.owner
        with owner._lock:
            if address and owner._handle and owner._fn["free"](owner._handle, address) != 0:
                raise KilnRuntimeError(f"{owner.name}_free of {self.what} failed: {owner.last_error()}")

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            try:
                self.free()
            except Exception:  # a driver failure, or the interpreter going: destroy frees it anyway
                pass

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self.what}: {self.nbytes} bytes at 0x{self.address:x} of {self.owner.name}>"


def load(path: str | Path, name: str | None = None, ordinal: int = 0):
    """Load a Kiln model library (a CompiledModel, or a BatchedModel for a library that
    takes any batch size); its name defaults to the file's stem (NAME.so); `ordinal`:
    the GPU a CUDA library runs on."""
    from runtime.batched import BatchedModel

    path = Path(path)
    name = name or path.stem
    if _exports(path, f"{name}_run_shaped"):
        return BatchedModel(path, name)
    return CompiledModel(path, name, ordinal)  # it names what is wrong with a bad file


def _exports(path: Path, symbol: str) -> bool:
    """Whether `path` is a loadable library that exports `symbol`."""
    try:
        return path.is_file() and hasattr(ctypes.CDLL(str(path.resolve())), symbol)
    except OSError:
        return False


from runtime.predictor import Predictor as Predictor  # noqa: E402  (it builds on CompiledModel, above)
