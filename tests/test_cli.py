"""The `kiln` command line: every subcommand, and errors as one line (exit code 2 for the
user's, 3 for Kiln's own)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from compiler.driver import to_graph
from frontends.zoo.onnx_models import MNIST_CNN_PATH
from ir.interpreter import interpret


def kiln(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_version_and_help():
    assert kiln("--version").stdout.startswith("kiln ")
    for sub in ("compile", "run", "inspect", "demo"):
        result = kiln(sub, "--help")
        assert result.returncode == 0 and "usage: kiln " + sub in result.stdout


def test_compile_then_run(tmp_path, rng):
    out = tmp_path / "cnn.so"
    result = kiln("compile", str(MNIST_CNN_PATH), "-o", str(out), "--emit", "llvm", "--emit", "asm")
    assert result.returncode == 0, result.stderr
    assert out.exists() and (tmp_path / "cnn.h").exists()
    assert (
        "define" in (tmp_path / "cnn.ll").read_text()
        and "cnn_k1_conv2d_pooled_relu" in (tmp_path / "cnn.s").read_text()
    )
    assert "int cnn_run(cnn_model *m" in (tmp_path / "cnn.h").read_text()
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = kiln("run", str(out), "--input", f"input={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"))
    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npz")["probabilities"]
    np.testing.assert_allclose(y, interpret(to_graph(MNIST_CNN_PATH), [x])[0], rtol=1e-4, atol=1e-6)


def test_inspect_shows_ir_kernels_and_memory(tmp_path):
    result = kiln("inspect", str(MNIST_CNN_PATH), "--kernels", "--memory", "--dot", str(tmp_path / "g.dot"))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    planes = "%conv1.out.column_planes"
    assert f"conv2d_pooled({planes}, %conv1.weight.packed, %conv1.bias) {{out_channels=32}}" in text
    # each conv (constant weights, on the CPU) one conv2d_packed reading its windows in
    # place, relu in its epilogue, the first two with their max pools inside: conv1 (few
    # taps) as conv2d_pooled over the input's columns dealt into two planes, conv2 with
    # pool=2 (a tile of one 2x2 window's 4 positions x 64 filters, 288 taps each, on
    # AVX-512 and AVX2 alike; per output the maximum of 4, the bias and the relu);
    # flatten a view
    mflop = 5 * 5 * (4 * 64 * 2 * 288 + 64 * (3 + 2)) / 1e6
    assert "7 kernels (11 ops):" in text and "k2_conv2d_packed_relu" in text and f"{mflop:.3f}" in text
    assert "pool=2" in text and "k5_linear_packed " in text
    assert "memory: arena 28,032 B (lower bound 28,032 B, 1.00x" in text
    assert "kernel k1_conv2d_pooled_relu(" in text and "conv3.relu, flat" in text
    dot = (tmp_path / "g.dot").read_text()
    assert "subgraph cluster_0" in dot and "flatten (view)" in dot
    unfused = kiln("inspect", str(MNIST_CNN_PATH), "--no-fuse").stdout
    assert "11 kernels (11 ops):" in unfused


def test_inspect_prints_the_graph_after_every_pass():
    from compiler.passes import PIPELINE

    text = kiln("inspect", str(MNIST_CNN_PATH), "--print-after-all").stdout
    headings = [line for line in text.splitlines() if line.startswith("// ")]
    assert headings == ["// as imported"] + [f"// after {p.name}: {p.purpose}" for p in PIPELINE]
    imported = text.split("// after fold_batchnorm")[0]
    after_packed = text.split("// after conv_packed")[1].split("// after conv_to_gemm")[0]
    assert "conv2d(" in imported and "conv2d_packed(" not in imported
    assert "conv2d_packed(" in after_packed and "conv2d(" not in after_packed and "im2col(" not in text


def test_demo_runs_python_and_c():
    result = kiln("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "C program" in result.stdout and "demo: OK" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["compile", "absent.onnx", "-o", "x.so"], "absent.onnx: no such file"),
        (["run", "absent.so"], "no model library at absent.so"),
        (["compile", "MODEL", "-o", "x.so", "--name", "bad-name"], "must be a C identifier"),
    ],
)
def test_errors_are_one_line_exit_2(args, message, tmp_path):
    args = [str(MNIST_CNN_PATH) if a == "MODEL" else a for a in args]
    result = kiln(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kiln: error:") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_run_with_wrong_input_shape(tmp_path):
    out = tmp_path / "cnn.so"
    assert kiln("compile", str(MNIST_CNN_PATH), "-o", str(out)).returncode == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 28, 28), np.float32))
    result = kiln("run", str(out), "--input", f"input={tmp_path / 'x.npy'}")
    assert (
        result.returncode == 2
        and "input 'input': expected shape (1, 1, 28, 28), got (2, 1, 28, 28)" in result.stderr
    )


def test_emitted_code_uses_the_host_vector_width(tmp_path):
    """AVX-512 registers where the host has them (this project's machines), AVX2 with --cpu."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    out = tmp_path / "host.so"
    assert kiln("compile", str(MNIST_CNN_PATH), "-o", str(out), "--emit", "asm").returncode == 0
    if features.get("avx512f"):
        assert "zmm" in out.with_suffix(".s").read_text()
    out = tmp_path / "avx2.so"
    assert (
        kiln("compile", str(MNIST_CNN_PATH), "-o", str(out), "--emit", "asm", "--cpu", "x86-64-v3").returncode
        == 0
    )
    asm = out.with_suffix(".s").read_text()
    assert "ymm" in asm and "zmm" not in asm


def test_bench_json_compares_fusion():
    import json

    result = kiln(
        "bench", str(MNIST_CNN_PATH), "--compare-fusion", "--batch", "2", "--repeats", "3", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for mode in ("fused", "unfused"):
        r = data[mode]
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"]
        assert r["lower_bound_bytes"] <= r["arena_bytes"] <= r["naive_bytes"]
    assert data["fused"]["kernels"] < data["unfused"]["kernels"]
    assert data["fused"]["bytes_moved"] < data["unfused"]["bytes_moved"]


def _model(nodes, inputs, outputs, inits=(), opset=17):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _broken_models(tmp_path):
    """Each way an ONNX file a user brings can be wrong, and what the error must say."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
        return helper.make_tensor_value_info(name, dtype, list(shape))

    cases = {
        "unsupported.onnx": (
            _model(
                [
                    helper.make_node("NonZero", ["x"], ["a"], name="nz"),
                    helper.make_node("Det", ["x"], ["y"], name="det"),
                ],
                [vi("x")],
                [vi("y")],
            ),
            "2 unsupported node(s): node nz (NonZero, opset 17); node det (Det, opset 17)",
        ),
        "symbolic.onnx": (
            _model(
                [helper.make_node("Relu", ["x"], ["y"])],
                [vi("x", shape=("N", "C"))],
                [vi("y", shape=("N", "C"))],
            ),
            "input 'x': dimension 0 is symbolic ('N'); bind it with --fix-dim N=SIZE or --input-shape x=NxN",
        ),
        "missing_init.onnx": (
            _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x")], [vi("y")]),
            "node mm (MatMul, opset 17): input 1 'w' is not an initializer",
        ),
        "float16.onnx": (
            _model(
                [helper.make_node("Relu", ["x"], ["y"])],
                [vi("x", TensorProto.FLOAT16)],
                [vi("y", TensorProto.FLOAT16)],
            ),
            "input 'x' has dtype FLOAT16; Kiln supports float32",
        ),
    }
    for name, (model, message) in cases.items():
        onnx.save(model, tmp_path / name)
        yield name, message
    good = onnx.shape_inference.infer_shapes(cases["unsupported.onnx"][0]).SerializeToString()
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    yield "truncated.onnx", "not a valid ONNX file (truncated or not ONNX)"
    weights = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    external = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x")], [vi("y", shape=(2, 4))], [weights]
    )
    onnx.save(
        external, tmp_path / "external.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    (tmp_path / "w.bin").unlink()
    yield "external.onnx", "external data file missing"


def test_every_bad_model_is_one_clear_line(tmp_path):
    for name, message in _broken_models(tmp_path):
        result = kiln("compile", str(tmp_path / name), "-o", str(tmp_path / "out.so"))
        assert result.returncode == 2, (name, result.stderr)
        err = result.stderr.strip()
        assert err.startswith("kiln: error:") and message in err, (name, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1, (name, err)


def test_compile_keras_model_for_training(tmp_path):
    from frontends import keras

    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.save(tmp_path / "m.keras")
    result = kiln(
        "compile", str(tmp_path / "m.keras"), "--train", "--batch-size", "16", "-o", str(tmp_path / "m.so")
    )
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "m.h").read_text()
    assert "int m_train_step(m_trainer *t, const void *x, const void *y, float *loss);" in header
    assert "x: float32[16, 6]" in header


def test_internal_error_is_one_line_naming_the_kernel(tmp_path, monkeypatch, capsys):
    """A failure inside Kiln (here: the relu's scalar rule made to fail) is an
    InternalCompilerError naming the stage, kernel and nodes; the CLI prints that line
    and exits 3, with no traceback."""
    from compiler.cli import main
    from ir.ops import REGISTRY

    def broken(self, e, x):
        raise IndexError("list index out of range")

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(REGISTRY["relu"], "scalar", broken)
    assert main(["compile", str(MNIST_CNN_PATH), "-o", str(tmp_path / "cnn.so")]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("kiln: internal compiler error while lowering kernel 1 (node ")
    assert "(relu)" in err and "IndexError: list index out of range (a bug in Kiln, not in the model)" in err
