"""The ONNX Einsum converter (ir/ops/einsum.py): the common two-operand contractions
become one batched matmul, the rest the generic einsum op."""

from __future__ import annotations

from frontends.onnx.context import converter, emit, node_inputs, text
from ir.ops.einsum import as_matmul, normalize_equation


@converter("Einsum")
def _einsum(ctx, node, attrs):
    """Two-operand contractions become one batched matmul between transposes; other
    equations (diagonals, traces, three operands) the generic einsum op."""
    xs = node_inputs(ctx, node)
    equation = normalize_equation(text(attrs, "equation", ""), [x.type.rank for x in xs])
    plan = as_matmul(equation, [x.type.shape for x in xs])
    if plan is None or xs[0].type.dtype not in ("float32", "float64"):
        return [emit(ctx, node, "einsum", *xs, equation=equation)]
    b = ctx.b
    a = b.reshape(b.transpose(xs[0], perm=plan["perm_a"]), shape=plan["shape_a"])
    c = b.reshape(b.transpose(xs[1], perm=plan["perm_b"]), shape=plan["shape_b"])
    y = b.reshape(b.matmul(a, c), shape=plan["unflat"])
    return [b.transpose(y, perm=plan["perm_out"], name=node.output[0])]
