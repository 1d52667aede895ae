"""Ops Kiln has no converter for, but whose ONNX schema defines them as a function of
other ops (Attention, GroupNormalization, SoftmaxCrossEntropyLoss, MeanVarianceNormalization,
Swish, ...), are replaced by that function body before import, as onnxruntime does for
ops it has no kernel for. The spec's own definition is the semantics, so nothing here
restates an op; the fused kernels come from Kiln's fusion of the body's ops."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx.inliner
import onnx.shape_inference

from frontends.onnx.context import UnsupportedOnnxError

EXPANDED_DOMAIN = "kiln.expanded"

#: a function body may itself use ops that are functions (rarely more than one level)
MAX_DEPTH = 4


def _schema(op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


def _version(versions: list[int], opset: int) -> int:
    """The newest function body defined at or below the model's opset."""
    fitting = [v for v in versions if v <= opset]
    return max(fitting) if fitting else min(versions)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every value's type, for the bodies that depend on their inputs' types."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: bodies that need no types still expand
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type for vi in [*g.input, *g.value_info, *g.output]}
    for t in g.initializer:
        types[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types


def _function(node: onnx.NodeProto, schema: onnx.defs.OpSchema, opset: int, types) -> onnx.FunctionProto:
    function = onnx.FunctionProto()
    if schema.has_function:
        function.ParseFromString(
            schema.get_function_with_opset_version(_version(schema.function_opset_versions, opset))
        )
    else:
        input_types = [types.get(name, onnx.TypeProto()).SerializeToString() for name in node.input]
        function.ParseFromString(
            schema.get_context_dependent_function_with_opset_version(
                _version(schema.context_dependent_function_opset_versions, opset),
                node.SerializeToString(),
                input_types,
            )
        )
    return function


def _with_defaults(node: onnx.NodeProto, schema: onnx.defs.OpSchema) -> None:
    """Attributes the node leaves out take the schema's defaults (the body refers to them)."""
    present = {a.name for a in node.attribute}
    for name, attr in schema.attributes.items():
        if name not in present and attr.default_value.name:
            node.attribute.append(attr.default_value)


def expand_functions(model: onnx.ModelProto, supported: Callable[[str], bool]) -> onnx.ModelProto:
    """The model with every node Kiln cannot convert, but ONNX defines as a function,
    replaced by its function body (recursively). Other nodes are left as they are."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for depth in range(MAX_DEPTH):
        targets = [
            (i, schema)
            for i, n in enumerate(model.graph.node)
            if n.domain in ("", "ai.onnx")
            and not supported(n.op_type)
            and (schema := _schema(n.op_type, opset)) is not None
            and (schema.has_function or schema.has_context_dependent_function)
        ]
        if not targets:
            return model
        ops = sorted({model.graph.node[i].op_type for i, _ in targets})
        model = _copy(model)
        types = _value_types(model)
        for i, schema in targets:
            node = model.graph.node[i]
            _with_defaults(node, schema)
            function = _function(node, schema, opset, types)
            function.name = f"{node.op_type}_{depth}_{i}"
            function.domain = EXPANDED_DOMAIN
            node.op_type, node.domain = function.name, EXPANDED_DOMAIN
            model.functions.append(function)
        if not any(o.domain == EXPANDED_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(EXPANDED_DOMAIN, 1))
        model = _inline(model, ops)
    return model


def _inline(model: onnx.ModelProto, ops: list[str]) -> onnx.ModelProto:
    """Inline the bodies; their opset is converted to the model's only where they differ
    (onnx's version converter cannot take every op, so it is the second try)."""
    reason = "a body's opset differs from the model's"
    for convert_version in (False, True):
        try:
            inlined = onnx.inliner.inline_local_functions(model, convert_version=convert_version)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1]
            continue
        if not any(n.domain == EXPANDED_DOMAIN for n in inlined.graph.node):
            return inlined
    raise UnsupportedOnnxError(
        f"{', '.join(ops)}: Kiln takes these ops as their ONNX function bodies, "
        f"which onnx could not inline into this model: {reason}"
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
