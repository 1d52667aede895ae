"""Models written in PyTorch, exported with torch.onnx, compiled with `kiln compile`,
against onnxruntime on the same file at batch 1 and 32: an MLP, the MNIST CNN, an LSTM,
a 4-layer transformer encoder and ResNet-18."""

from __future__ import annotations

import numpy as np
import pytest

from compiler import compile_model
from compiler.cli import main as kiln
from runtime import load

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

from frontends.zoo.torch_models import export  # noqa: E402

RTOL = 1e-4

MODELS = [
    "mlp",
    "mnist_cnn",
    "lstm",
    pytest.param("transformer", marks=pytest.mark.slow),
    pytest.param("resnet18", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("name", MODELS)
def test_pytorch_export_matches_onnxruntime(name, batch, tmp_path, rng, capsys):
    model = export(name, batch)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    assert kiln(["compile", str(path), "-o", str(tmp_path / f"{name}.so")]) == 0
    assert "wrote" in capsys.readouterr().out
    compiled = load(tmp_path / f"{name}.so")
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = rng.standard_normal(shape).astype(np.float32)
    got = compiled(x)
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    assert got.shape == expected.shape
    # rtol on every element, with an absolute floor at RTOL of the output's scale for
    # the elements that are (nearly) zero, where a relative error means nothing
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("name", MODELS)
def test_dynamic_batch_export_is_one_library_for_every_batch(name, tmp_path, rng, capsys):
    """Exported with the batch axis named N: one `kiln compile`, one library, any batch."""
    model = export(name, 2, dynamic=True)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    assert kiln(["compile", str(path), "-o", str(tmp_path / f"{name}.so"), "--dim", "N=1..256"]) == 0
    compiled = load(tmp_path / f"{name}.so")
    assert str(compiled.inputs[0]).startswith("input: float32[N, ")
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    unit = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    for batch in (1, 7, 32, 100):
        x = rng.standard_normal([batch, *unit]).astype(np.float32)
        expected = session.run(None, {"input": x})[0]
        got = compiled(x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("name,sequences", [("lstm", (16, 40))])
def test_a_named_sequence_without_a_bound_compiles_once_per_length_for_every_batch(name, sequences, rng):
    """Exported with N and S named, compiled without a bound on S: the elements of a
    batch run apart, so Python compiles one library per sequence length, each taking
    any batch."""
    pytest.importorskip("onnxscript")
    model = export(name, 2, dynamic=True, sequence=True)
    compiled = compile_model(model, name=f"{name}_seq")
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    features = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    for length in sequences:
        for batch in (1, 7, 32, 100):
            x = rng.standard_normal([batch, length, features]).astype(np.float32)
            expected = session.run(None, {"input": x})[0]
            got = compiled(x)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert compiled.specializations == len(sequences)


@pytest.mark.slow
def test_a_transformer_with_a_named_sequence_is_one_library_for_every_batch_and_length(tmp_path, rng):
    """`kiln compile --dim S=1..200`: one library, its programs for lengths 16, 32, 64,
    128 and 200; a length between them runs padded with its padded keys masked."""
    pytest.importorskip("onnxscript")
    model = export("transformer", 2, dynamic=True, sequence=True)
    path = tmp_path / "transformer.onnx"
    path.write_bytes(model.SerializeToString())
    assert kiln(["compile", str(path), "-o", str(tmp_path / "t.so"), "--dim", "S=1..200"]) == 0
    compiled = load(tmp_path / "t.so")
    assert str(compiled.inputs[0]) == "input: float32[N, S, 256]"
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    for length in (16, 50, 128, 200):
        for batch in (1, 7, 32, 100):
            x = rng.standard_normal([batch, length, 256]).astype(np.float32)
            expected = session.run(None, {"input": x})[0]
            got = compiled(x)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
