"""ONNX → Kiln graph. `import_onnx(path_or_model)` returns an ir.Graph."""

from frontends.onnx.context import (
    ConstantInputNeeded,
    OnnxImportError,
    SymbolicDimension,
    UnsupportedOnnxError,
)
from frontends.onnx.importer import import_onnx, load_model

__all__ = [
    "ConstantInputNeeded",
    "OnnxImportError",
    "SymbolicDimension",
    "UnsupportedOnnxError",
    "import_onnx",
    "load_model",
]
