"""ONNX → Kiln graph. `import_onnx(path_or_model)` returns an ir.Graph."""

from frontends.onnx.importer import OnnxImportError, import_onnx

__all__ = ["OnnxImportError", "import_onnx"]
