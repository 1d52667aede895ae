"""compile_model on ONNX models with named dimensions or inputs needed at compile time:
a SpecializingModel that compiles per distinct shapes and values, on first sight."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.specialize import SpecializingModel
from frontends.onnx import SymbolicDimension, import_onnx
from ir.errors import UnsupportedError
from ir.interpreter import interpret


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _centered(source: str, out: str = "y") -> list:
    """out = source minus its mean over the batch: the batch elements meet, so the
    batch cannot run in pieces (one library per batch size, not one for all)."""
    return [
        helper.make_node("ReduceMean", [source], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", [source, "mean"], [out]),
    ]


def _dense_on_batch(rng):
    """x: f32[N, 8] → relu(x·W + b), centered over the batch: the batch is named."""
    w = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        *_centered("r"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return _model(nodes, [x], [y], [w, b])


def test_named_batch_compiles_per_batch_and_matches_the_interpreter(rng):
    proto = _dense_on_batch(rng)
    model = compile_model(proto, name="dense")
    assert isinstance(model, SpecializingModel)
    assert [str(t) for t in model.inputs] == ["x: float32[N, 8]"]
    assert [str(t) for t in model.outputs] == ["y: float32[N, 5]"]
    for batch in (1, 7, 32, 100, 7):
        x = rng.standard_normal((batch, 8)).astype(np.float32)
        (expected,) = interpret(import_onnx(proto, {"x": (batch, 8)}), [x])
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model.specializations == 4  # batch 7 came twice


def test_an_input_needed_at_compile_time_specializes_on_its_value(rng):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])
    model = compile_model(_model(nodes, [x, shape], [y]), name="reshape")
    data = rng.standard_normal((4, 6)).astype(np.float32)
    for target in ([6, 4], [3, 8], [6, 4]):
        got = model(data, np.array(target, np.int64))
        np.testing.assert_array_equal(got, np.maximum(data, 0).reshape(target))
    assert model.specializations == 2
    with pytest.raises(UnsupportedError, match="compile with input_shapes="):
        model.save("never.so")


def test_inputs_that_do_not_fit_are_named(rng):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Add", ["x", "z"], ["s"]), *_centered("s")]
    model = compile_model(_model(nodes, [x, z], [y]), name="add")
    a = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="dimension 'N' is 2 in input 'x' but 5 in input 'z'"):
        model(a, rng.standard_normal((5, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="input 'z': dimension 1 must be 3, got 4"):
        model(a, rng.standard_normal((2, 4)).astype(np.float32))
    with pytest.raises(TypeError, match="input 'x': expected dtype float32, got float64"):
        model(a.astype(np.float64), a)
    with pytest.raises(TypeError, match=r"missing \['z'\]"):
        model(a)
    np.testing.assert_allclose(model(a, a), (a + a) - (a + a).mean(axis=0), rtol=1e-5, atol=1e-6)
    assert model.specializations == 1  # nothing was compiled for the refused calls


def test_without_specialize_the_error_says_what_to_bind(rng):
    with pytest.raises(SymbolicDimension, match="--input-shape x=Nx8") as error:
        compile_model(_dense_on_batch(rng), name="dense", specialize=False)
    assert "not possible: node mean (reduce_mean): it reduces the batch axis 0" in str(error.value)


def test_specializations_are_bounded(rng, monkeypatch):
    monkeypatch.setattr("compiler.specialize.MAX_SPECIALIZATIONS", 2)
    model = compile_model(_dense_on_batch(rng), name="dense")
    for batch in (1, 2, 3, 1):
        model(rng.standard_normal((batch, 8)).astype(np.float32))
    assert model.specializations == 2


def _attention_over_sequence(rng):
    """x: f32[S, N, 4] (time-major) → softmax(x·xᵀ)·x per batch element: the sequence
    positions meet (S cannot run in pieces), the batch elements do not."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xn"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 2, 0]),
        helper.make_node("MatMul", ["xn", "xt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "xn"], ["yn"]),
        helper.make_node("Transpose", ["yn"], ["y"], perm=[1, 0, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", "N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", "N", 4])
    return _model(nodes, [x], [y])


def test_one_library_per_sequence_length_takes_every_batch(rng):
    """Named S (mixed) and N (run apart), S first: S is tried as the batch and refused,
    then N is: one library per S, each taking any N."""
    proto = _attention_over_sequence(rng)
    model = compile_model(proto, name="attend")
    for n, s in ((2, 5), (7, 5), (1, 5), (3, 9), (8, 9)):
        x = rng.standard_normal((s, n, 4)).astype(np.float32)
        (expected,) = interpret(import_onnx(proto, {"x": (s, n, 4)}), [x])
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model.specializations == 2
