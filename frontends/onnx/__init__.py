"""ONNX → Kiln graph. `import_onnx(path_or_model)` returns an ir.Graph."""

from frontends.onnx.context import ConstantInputNeeded, OnnxImportError, UnsupportedOnnxError
from frontends.onnx.importer import import_onnx

__all__ = ["ConstantInputNeeded", "OnnxImportError", "UnsupportedOnnxError", "import_onnx"]
