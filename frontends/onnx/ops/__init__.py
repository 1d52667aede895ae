"""The converters, one module per family of `ir/ops`, each holding the ONNX ops that
become ops of that family (a composition lives with the op that does its work; Expand
shares Tile's converter in `shape`). Importing this package fills CONVERTERS, the
whole table: `from frontends.onnx.ops import CONVERTERS`.
"""

from frontends.onnx.context import CONVERTERS

# importing each module registers its converters
from frontends.onnx.ops import einsum, elementwise, nn, recurrent, reduce, resample, shape  # noqa: F401

__all__ = ["CONVERTERS"]
