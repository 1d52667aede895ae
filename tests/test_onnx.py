"""ONNX import: the bundled model, op conversions against onnxruntime, and clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from frontends.onnx import OnnxImportError, import_onnx
from frontends.zoo.onnx_models import MNIST_CNN_PATH, mnist_cnn
from ir.errors import UnsupportedError
from ir.interpreter import interpret

try:
    import onnxruntime
except ImportError:  # optional: the comparisons with onnxruntime skip without it
    onnxruntime = None


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    if onnxruntime is None:
        pytest.skip("onnxruntime is not installed")
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_bundled_file_is_what_the_builder_makes():
    assert MNIST_CNN_PATH.read_bytes() == mnist_cnn().SerializeToString()


@pytest.mark.parametrize("batch", [1, 3])
def test_mnist_cnn_matches_onnxruntime(batch, rng):
    model = mnist_cnn(batch=batch)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    got = compile_model(model, name="cnn")(x)
    np.testing.assert_allclose(got, interpret(import_onnx(model), [x])[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, _ort(model, {"input": x})[0], rtol=1e-4, atol=1e-6)


def _single_node_model(op_type, inputs, outputs, inits=(), opset=17, **attrs):
    node = helper.make_node(
        op_type, [i[0] for i in inputs] + [t.name for t in inits], [o[0] for o in outputs], name="n0", **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what onnxruntime releases of the last years all read
    return model


def _i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _f32(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


CONVERSIONS = [
    (
        "Gemm",
        [("a", [3, 5])],
        [("y", [3, 4])],
        lambda r: [_f32("b", r.standard_normal((4, 5))), _f32("c", r.standard_normal(4))],
        dict(transB=1, alpha=0.5, beta=2.0),
    ),
    (
        "Gemm",
        [("a", [5, 3])],
        [("y", [3, 4])],
        lambda r: [_f32("b", r.standard_normal((5, 4)))],
        dict(transA=1),
    ),
    (
        "Conv",
        [("x", [1, 2, 7, 7])],
        [("y", [1, 4, 4, 4])],
        lambda r: [_f32("w", r.standard_normal((4, 2, 3, 3)))],
        dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    ("ReduceLogSumExp", [("x", [2, 3, 4])], [("y", [2, 4])], lambda r: [], dict(axes=[1], keepdims=0)),
    (
        "Conv",  # 1-D
        [("x", [2, 3, 11])],
        [("y", [2, 4, 6])],
        lambda r: [_f32("w", r.standard_normal((4, 3, 3))), _f32("b", r.standard_normal(4))],
        dict(strides=[2], pads=[1, 1]),
    ),
    ("MaxPool", [("x", [1, 2, 9])], [("y", [1, 2, 4])], lambda r: [], dict(kernel_shape=[3], strides=[2])),
    (
        "MaxPool",
        [("x", [1, 2, 7, 7])],
        [("y", [1, 2, 4, 4])],
        lambda r: [],
        dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    ),
    (
        "AveragePool",
        [("x", [1, 2, 7, 7])],
        [("y", [1, 2, 4, 4])],
        lambda r: [],
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ),
    ("Softmax", [("x", [2, 3, 4])], [("y", [2, 3, 4])], lambda r: [], dict(axis=1)),
    ("Reshape", [("x", [2, 3, 4])], [("y", [6, 4])], lambda r: [_i64("s", [-1, 0])], {}),
    ("Transpose", [("x", [2, 3, 4])], [("y", [4, 2, 3])], lambda r: [], dict(perm=[2, 0, 1])),
    ("ReduceMean", [("x", [2, 3, 4])], [("y", [2, 1, 4])], lambda r: [], dict(axes=[1])),
    ("Clip", [("x", [3, 4])], [("y", [3, 4])], lambda r: [_f32("lo", -0.5), _f32("hi", 0.5)], {}),
    (
        "Slice",
        [("x", [5, 6])],
        [("y", [2, 3])],
        lambda r: [_i64("st", [1, 0]), _i64("en", [5, 6]), _i64("ax", [0, 1]), _i64("sp", [2, 2])],
        {},
    ),
    ("Pad", [("x", [2, 3])], [("y", [3, 6])], lambda r: [_i64("p", [0, 1, 1, 2]), _f32("v", 0.25)], {}),
    ("Unsqueeze", [("x", [2, 3])], [("y", [2, 1, 3])], lambda r: [_i64("axes", [1])], {}),
    ("LeakyRelu", [("x", [3, 4])], [("y", [3, 4])], lambda r: [], dict(alpha=0.3)),
    (
        "BatchNormalization",
        [("x", [2, 3, 4, 4])],
        [("y", [2, 3, 4, 4])],
        lambda r: [
            _f32("s", r.standard_normal(3)),
            _f32("b", r.standard_normal(3)),
            _f32("m", r.standard_normal(3)),
            _f32("v", r.uniform(0.5, 2, 3)),
        ],
        dict(epsilon=1e-3),
    ),
    (
        "LayerNormalization",
        [("x", [2, 3, 8])],
        [("y", [2, 3, 8])],
        lambda r: [_f32("s", r.standard_normal(8)), _f32("b", r.standard_normal(8))],
        {},
    ),
]


@pytest.mark.parametrize(
    "op_type,inputs,outputs,make_inits,attrs",
    CONVERSIONS,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CONVERSIONS)],
)
def test_conversion_matches_onnxruntime(op_type, inputs, outputs, make_inits, attrs, rng):
    model = _single_node_model(op_type, inputs, outputs, make_inits(rng), **attrs)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in inputs}
    got = compile_model(model, name="conv")(**feeds)
    np.testing.assert_allclose(got, _ort(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_softmax_before_opset_13_flattens_from_axis(rng):
    model = _single_node_model("Softmax", [("x", [2, 3, 4])], [("y", [2, 3, 4])], opset=11, axis=1)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(compile_model(model, name="sm11")(x), _ort(model, {"x": x})[0], rtol=1e-5)


def test_every_unsupported_node_is_listed_at_once():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("NonZero", ["a"], ["b"], name="nz"),
        helper.make_node("Det", ["b"], ["y"], name="det"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedError) as e:
        import_onnx(model)
    msg = str(e.value)
    assert "2 unsupported node(s)" in msg
    assert "node nz (NonZero, opset 17)" in msg and "node det (Det, opset 17)" in msg


def test_symbolic_dimension_needs_a_binding(rng):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(
        OnnxImportError, match=r"input 'x': dimension 0 is symbolic \('batch'\).*--input-shape x=Nx3"
    ):
        import_onnx(model)
    m = compile_model(model, name="bound", input_shapes={"x": (5, 3)})
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(m(x), np.maximum(x, 0))


def test_bad_files(tmp_path):
    with pytest.raises(OnnxImportError, match="no such file"):
        import_onnx(tmp_path / "absent.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MNIST_CNN_PATH.read_bytes()[:5000])
    with pytest.raises(OnnxImportError, match="not a valid ONNX file|invalid ONNX model"):
        import_onnx(truncated)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(OnnxImportError):
        import_onnx(text)


def test_runtime_computed_shape_is_reported():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="r")]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    with pytest.raises(
        OnnxImportError, match=r"node r \(Reshape, opset 17\): input 1 \(shape\) must be a constant"
    ):
        import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unsupported_dtype_is_named():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])],
    )
    with pytest.raises(UnsupportedError, match="input 'x' has dtype FLOAT16"):
        import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_shape_arithmetic_folds_at_import(rng):
    """PyTorch's Shape → Gather → Unsqueeze → Concat → Reshape: nothing of it runs."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    inits = [_i64("zero", 0), _i64("axes0", [0]), _i64("minus1", [-1])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 12])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    imported = import_onnx(model)
    assert [n.op.name for n in imported.nodes] == ["reshape", "relu"]
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(compile_model(model, name="shapes")(x), np.maximum(x.reshape(2, 12), 0))


def test_lrn_and_unused_dropout_mask(rng):
    nodes = [
        helper.make_node("LRN", ["x"], ["y"], size=3, alpha=1e-3, beta=0.75, bias=1.5),
        helper.make_node("Dropout", ["y"], ["z", "mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5, 3, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(
        compile_model(model, name="lrn")(x), _ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6
    )


def test_constant_inputs_fix_a_shape_fed_as_input():
    """A Reshape whose shape is a model input: Kiln says which input to fix, and
    compiles once it is fixed with constant_inputs=."""
    from frontends.onnx import ConstantInputNeeded

    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConstantInputNeeded, match=r"constant_inputs=\{'shape'") as info:
        compile_model(model, specialize=False)
    assert info.value.input_name == "shape"
    compiled = compile_model(model, constant_inputs={"shape": np.array([3, 4])})
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(compiled.run(x)[0], x.reshape(3, 4))


def test_a_slot_computed_from_a_model_input_names_that_input(rng):
    """Pads computed from a model input (target shape minus the input's Shape): the
    error names the model input to fix, and a plain compile_model specializes on its
    values, folding the arithmetic at import."""
    from frontends.onnx import ConstantInputNeeded

    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Sub", ["target", "x_shape"], ["grow"]),
        helper.make_node("Concat", ["zeros", "grow"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("target", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["h", "w"])],
        [helper.make_tensor("zeros", TensorProto.INT64, [2], [0, 0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(
        ConstantInputNeeded, match=r"'pads' is computed at run time from model input 'target'"
    ):
        compile_model(model, specialize=False)
    compiled = compile_model(model)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for target in ([4, 5], [2, 7]):
        want = np.pad(x, [(0, target[0] - 2), (0, target[1] - 3)])
        np.testing.assert_array_equal(compiled.run(x, np.array(target))[0], want)


@pytest.mark.parametrize(
    "op_type,opset,attrs",
    [
        ("MeanVarianceNormalization", 13, {}),
        ("GroupNormalization", 21, {"num_groups": 2}),
        ("Swish", 24, {"alpha": 0.7}),
    ],
)
def test_ops_defined_as_onnx_functions_import_as_their_bodies(op_type, opset, attrs, rng):
    shape = [2, 4, 3, 5]
    inits = []
    if op_type == "GroupNormalization":
        inits = [_f32("scale", rng.standard_normal(4)), _f32("bias", rng.standard_normal(4))]
    model = _single_node_model(op_type, [("x", shape)], [("y", shape)], inits, opset=opset, **attrs)
    model.ir_version = 10
    graph = import_onnx(model)
    assert op_type.lower() not in {n.op.name for n in graph.nodes}
    x = rng.standard_normal(shape).astype(np.float32)
    got = compile_model(model, name="fn")(x)
    if onnxruntime is not None and op_type != "Swish":  # onnxruntime 1.31 lacks Swish-24
        expected = _ort(model, {"x": x})[0]
    else:
        from onnx.reference import ReferenceEvaluator

        expected = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "equation,shapes,as_matmul",
    [
        ("bhqd,bhkd->bhqk", [(2, 4, 9, 16), (2, 4, 11, 16)], True),
        ("bhqk,bhkd->bhqd", [(2, 4, 9, 11), (2, 4, 11, 16)], True),
        ("...d,dh->...h", [(3, 5, 8), (8, 6)], True),
        ("ij,jk", [(4, 5), (5, 3)], True),
        ("ii->i", [(5, 5)], False),
        ("i,i", [(7,), (7,)], True),
    ],
)
def test_einsum_matches_onnxruntime(equation, shapes, as_matmul, rng):
    names = [f"x{i}" for i in range(len(shapes))]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    expected_shape = np.einsum(equation, *[np.zeros(s) for s in shapes]).shape
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, expected_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ops = {n.op.name for n in import_onnx(model).nodes}
    assert ("matmul" in ops) == as_matmul and ("einsum" in ops) != as_matmul
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    got = compile_model(model, name="einsum")(*feeds.values())
    np.testing.assert_allclose(got, _ort(model, feeds)[0], rtol=1e-4, atol=1e-5)
