"""An ONNX model that takes what it needs at compile time from each call's inputs.

A native Kiln library has fixed input shapes, and takes as constants the inputs that
fill a slot Kiln needs at compile time (a Reshape's shape, TopK's K, ReduceSum's
axes). A model whose inputs have named dimensions (`batch_size`, `N`) or feed such
slots cannot be one library until those are bound. From Python it need not be:
`compile_model(path)` returns a SpecializingModel, which compiles a library on first
sight of each distinct (input shapes, values of the inputs needed as constants), keeps
it, and reuses it; the build cache makes a repeated compile cheap across processes too.
Where one named dimension is a batch whose elements run apart (compiler.batching) and
others are not (a transformer's sequence), each library binds the others and takes
every batch size: one library per sequence length, not per (batch, sequence).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ir.errors import UnsupportedError
from runtime import CompiledModel, TensorInfo, inputs_by_name

#: how many specializations one model keeps loaded (the least recently used goes first)
MAX_SPECIALIZATIONS = 32

Dim = int | str  # a dimension: a number, or the name of a dimension the calls choose


def declared_inputs(value_infos, onnx) -> list[TensorInfo]:
    """The names, dtypes and shapes an ONNX graph declares (named dims as their names)."""
    from frontends.onnx.context import ONNX_DTYPES

    infos = []
    for vi in value_infos:
        tt = vi.type.tensor_type
        dims: list[Dim] = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in tt.shape.dim
        ]
        dtype = ONNX_DTYPES.get(tt.elem_type, onnx.TensorProto.DataType.Name(tt.elem_type).lower())
        infos.append(TensorInfo(vi.name, dtype, tuple(dims)))
    return infos


def _once(dim: Dim, inputs: list[TensorInfo]) -> bool:
    """Whether `dim` is a name that no input repeats (a batch is on one axis of each)."""
    return isinstance(dim, str) and dim != "?" and all(t.shape.count(dim) <= 1 for t in inputs)


def bind_dims(proto, sizes: dict[str, int]):
    """A copy of the ONNX model with these named dimensions numbered, in its inputs,
    outputs and value infos alike."""
    bound = type(proto)()
    bound.CopyFrom(proto)
    g = bound.graph
    for vi in (*g.input, *g.output, *g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in sizes:
                d.dim_value = sizes[d.dim_param]
    return bound


class SpecializingModel:
    """Called like a CompiledModel (`model(x)`, `model.run(...)`), on any inputs that fit
    the declared shapes: a named dimension takes any size, the same in every input
    that names it. `.inputs` / `.outputs` show the names (`x: float32[N, 3, 224, 224]`)."""

    def __init__(self, model: object, compile: Callable[..., CompiledModel], **options):
        import onnx

        from frontends.onnx import load_model

        self._proto = load_model(model)
        self._compile = compile
        self._options = options
        self._bound = dict(options.pop("input_shapes", None) or {})
        self._fixed = dict(options.pop("constant_inputs", None) or {})
        inits = {t.name for t in self._proto.graph.initializer}
        inputs = [vi for vi in self._proto.graph.input if vi.name not in inits and vi.name not in self._fixed]
        self.inputs = declared_inputs(inputs, onnx)
        self.outputs = declared_inputs(self._proto.graph.output, onnx)
        self.name = options.get("name", "model")
        #: each input's shape as declared, or as input_shapes= bound it
        self._shapes: list[tuple[Dim, ...]] = [tuple(self._bound.get(t.name, t.shape)) for t in self.inputs]
        self._needed: set[str] = set()  # inputs found to be needed at compile time
        #: the named dimensions that may be a batch the libraries take in any size, at
        #: most once in each input (the first is tried; one found to mix goes)
        named = dict.fromkeys(d for shape in self._shapes for d in shape)
        unbound_cpu = options.get("target", "cpu") == "cpu" and not self._bound
        self._batches: list[str] = [d for d in named if _once(d, self.inputs)] if unbound_cpu else []
        self._libraries: OrderedDict[tuple, CompiledModel] = OrderedDict()

    @property
    def specializations(self) -> int:
        """How many libraries are loaded now, one per distinct shapes and constants."""
        return len(self._libraries)

    def _arrange(self, args: tuple, kwargs: dict) -> list[np.ndarray]:
        names = [t.name for t in self.inputs]
        given = inputs_by_name(self.name, names, args, kwargs)
        arrays = [np.asarray(given[n]) for n in names]
        self._check(arrays)
        return arrays

    def _check(self, arrays: list[np.ndarray]) -> None:
        """Each input's dtype and rank as declared, its numbered dims as declared, and
        every named dim one size across the inputs."""
        sizes: dict[str, tuple[int, str]] = {}
        for info, declared, a in zip(self.inputs, self._shapes, arrays):
            if a.dtype != np.dtype(info.dtype):
                raise TypeError(f"input {info.name!r}: expected dtype {info.dtype}, got {a.dtype}")
            if a.ndim != len(declared):
                raise ValueError(f"input {info.name!r}: expected shape {info}, got {list(a.shape)}")
            for axis, (want, got) in enumerate(zip(declared, a.shape)):
                if isinstance(want, int) and want != got:
                    raise ValueError(
                        f"input {info.name!r}: dimension {axis} must be {want}, got {got} (shape {a.shape})"
                    )
                if isinstance(want, str) and want != "?":
                    first = sizes.setdefault(want, (got, info.name))
                    if first[0] != got:
                        raise ValueError(
                            f"dimension {want!r} is {first[0]} in input {first[1]!r} but {got} in input "
                            f"{info.name!r}"
                        )

    def _key(self, names: list[str], arrays: list[np.ndarray]) -> tuple:
        """What tells one library from another: the input shapes (but for the batch
        dimension, when the libraries take any batch) and the values needed as constants."""
        batch = self._batches[0] if self._batches else None
        return tuple(
            (
                tuple(None if dim == batch else size for dim, size in zip(shape, a.shape)),
                a.tobytes() if n in self._needed else None,
            )
            for n, shape, a in zip(names, self._shapes, arrays)
        )

    def _build(self, names: list[str], arrays: list[np.ndarray]) -> CompiledModel:
        """A library for these inputs. While a named dimension may yet be a batch that
        the elements run apart along, every other named dimension is bound to its size
        here and the batch left named: one library for every batch size (a time-major
        input names its steps first, so the names are tried in turn)."""
        from frontends.onnx import SymbolicDimension

        constants = {**self._fixed, **{n: a for n, a in zip(names, arrays) if n in self._needed}}
        while self._batches:
            sizes = {
                dim: size
                for shape, a in zip(self._shapes, arrays)
                for dim, size in zip(shape, a.shape)
                if isinstance(dim, str) and dim != self._batches[0]
            }
            try:
                return self._compile(
                    bind_dims(self._proto, sizes), constant_inputs=constants, **self._options
                )
            except SymbolicDimension:  # it mixes the batch elements: not a batch
                self._batches.pop(0)
        shapes = {n: a.shape for n, a in zip(names, arrays) if n not in self._needed}
        return self._compile(self._proto, input_shapes=shapes, constant_inputs=constants, **self._options)

    def _library(self, arrays: list[np.ndarray]) -> tuple[CompiledModel, list[int]]:
        """The library for these inputs (compiled on first sight) and the positions of
        the inputs it takes (the others are compiled in as constants)."""
        from frontends.onnx import ConstantInputNeeded

        names = [t.name for t in self.inputs]
        while True:
            key = self._key(names, arrays)
            if key in self._libraries:
                self._libraries.move_to_end(key)
                break
            try:
                library = self._build(names, arrays)
            except ConstantInputNeeded as e:
                if e.input_name in self._needed or e.input_name not in names:
                    raise
                self._needed.add(e.input_name)
                continue
            key = self._key(names, arrays)  # the batch may have been found not to be one
            self._libraries[key] = library
            if len(self._libraries) > MAX_SPECIALIZATIONS:
                self._libraries.popitem(last=False)
            break
        return self._libraries[key], [i for i, n in enumerate(names) if n not in self._needed]

    def run(self, *args: object, **kwargs: object) -> list[np.ndarray]:
        arrays = self._arrange(args, kwargs)
        library, taken = self._library(arrays)
        return library.run(*(arrays[i] for i in taken))

    def __call__(self, *args: object, **kwargs: object) -> np.ndarray | tuple[np.ndarray, ...]:
        outs = self.run(*args, **kwargs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, path) -> None:
        named = sorted({d for t in self.inputs for d in t.shape if isinstance(d, str)})
        raise UnsupportedError(
            f"{self.name} has named dimensions {named} or inputs needed at compile time; a "
            "library has fixed shapes: compile with input_shapes= (and constant_inputs=) to save one"
        )

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.inputs))
        return f"<SpecializingModel {self.name}({ins}), {self.specializations} specialization(s)>"
