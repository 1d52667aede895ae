"""Tensor types: a dtype and a static shape. Every Value in a Graph carries one."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

#: The dtypes Kiln knows, by their numpy names. float32 is the compute type;
#: the integer and bool types carry indices and masks.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "bool": np.dtype(np.bool_),
}

_SHORT = {"float32": "f32", "float64": "f64", "int64": "i64", "int32": "i32", "bool": "bool"}


def dtype_name(dtype: object) -> str:
    """The Kiln name of a numpy dtype (or of a name); raises for dtypes Kiln lacks."""
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    if name not in DTYPES:
        raise TypeError(f"dtype {name} is not supported (supported: {', '.join(DTYPES)})")
    return name


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype {self.dtype!r} is not supported")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def with_shape(self, shape: tuple[int, ...]) -> TensorType:
        return TensorType(self.dtype, shape)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(dtype, self.shape)

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(dtype_name(array.dtype), array.shape)

    def __str__(self) -> str:
        return f"{_SHORT[self.dtype]}[{','.join(map(str, self.shape))}]"
