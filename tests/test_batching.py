"""Dynamic batch: the proof that a graph runs its batch elements apart (Op.batch_axis,
compiler.batching.batch_layout), and the one library that takes every batch size,
from Python and from C, against the reference interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.batching import batch_layout
from frontends.onnx import import_onnx
from ir.interpreter import interpret
from ir.ops import BatchAxis, BatchMixing
from runtime import load
from runtime.batched import BatchedModel
from tests.helpers import run_c_program


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _layout(proto, shapes, count):
    graph = import_onnx(proto, shapes)
    axes = {name: BatchAxis(shape.index(count)) for name, shape in shapes.items()}
    return batch_layout(graph, axes, count)


def _time_major(rng):
    """x: f32[3, N, 4] (the batch on axis 1, as an ONNX LSTM takes it) through a
    (3·N, 4) reshape, where each element owns every N-th row, a product, and back:
    y: f32[N, 3, 5] (the batch leading) and z: f32[3, N, 5] (the batch inside)."""
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["p"]),
        helper.make_node("Relu", ["p"], ["r"]),
        helper.make_node("Reshape", ["r", "back"], ["z"]),
        helper.make_node("Transpose", ["z"], ["y"], perm=[1, 0, 2]),
    ]
    inits = [
        _const("rows", np.array([-1, 4], np.int64)),
        _const("back", np.array([3, -1, 5], np.int64)),
        _const("w", rng.standard_normal((4, 5)).astype(np.float32)),
    ]
    return _model(nodes, [_f32("x", [3, "N", 4])], [_f32("y", ["N", 3, 5]), _f32("z", [3, "N", 5])], inits)


def test_a_reshape_that_interleaves_the_batch_keeps_it(rng):
    layout = _layout(_time_major(rng), {"x": (3, 4, 4)}, 4)
    assert layout == [BatchAxis(0), BatchAxis(1)]
    graph = import_onnx(_time_major(rng), {"x": (3, 4, 4)})
    flat = next(n for n in graph.nodes if n.op.name == "reshape")
    assert flat.op.batch_axis([flat.inputs[0].type], flat.outputs[0].type, [BatchAxis(1)]) == BatchAxis(
        0, 1, 3
    )


@pytest.mark.parametrize(
    "node, inits, message",
    [
        (helper.make_node("ReduceSum", ["x", "axes"], ["y"]), [("axes", np.array([0], np.int64))], "reduces"),
        (helper.make_node("Concat", ["x", "x"], ["y"], axis=0), [], "concat along axis 0"),
        (helper.make_node("Reshape", ["x", "s"], ["y"]), [("s", np.array([6, 4], np.int64))], "splits"),
        (
            helper.make_node("Add", ["x", "c"], ["y"]),
            [("c", np.arange(24, dtype=np.float32).reshape(4, 6))],
            "spans",
        ),
        (
            helper.make_node("Gather", ["x", "i"], ["y"], axis=0),
            [("i", np.array([1, 0], np.int64))],
            "gather",
        ),
        (helper.make_node("MatMul", ["t", "x"], ["y"]), [("t", np.ones((2, 4), np.float32))], "contracts"),
    ],
)
def test_ops_that_mix_batch_elements_are_refused_by_node(node, inits, message):
    """x: f32[N, 6] into one op that reads other batch elements."""
    proto = _model([node], [_f32("x", ["N", 6])], [_f32("y", ["A", "B"])], [_const(n, a) for n, a in inits])
    with pytest.raises(BatchMixing, match=rf"node y \(.*{message}"):
        _layout(proto, {"x": (4, 6)}, 4)


def test_a_constant_of_equal_elements_may_hold_the_batch(rng):
    """The zeros an exporter writes for a batch of initial states (ConstantOfShape of
    the batch) are the same for every element; constants that differ are not."""
    zeros = _model(
        [helper.make_node("Add", ["x", "c"], ["y"])], [_f32("x", ["N", 6])], [_f32("y", ["N", 6])],
        [_const("c", np.full((4, 6), 0.5, np.float32))],
    )  # fmt: skip
    assert _layout(zeros, {"x": (4, 6)}, 4) == [BatchAxis(0)]


def test_one_library_runs_every_batch_size_from_python(rng):
    proto = _time_major(rng)
    model = compile_model(proto, name="time_major")
    assert isinstance(model, BatchedModel)
    assert [str(t) for t in model.inputs] == ["x: float32[3, N, 4]"]
    assert [str(t) for t in model.outputs] == ["y: float32[N, 3, 5]", "z: float32[3, N, 5]"]
    for batch in (1, 7, 8, 9, 32, 45):  # every tile (32, 8, 1) and the rests
        x = rng.standard_normal((3, batch, 4)).astype(np.float32)
        expected = interpret(import_onnx(proto, {"x": x.shape}), [x])
        for got, want in zip(model.run(x), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        outs = [np.empty(s, np.float32) for s in model.output_shapes(x)]
        model.run_into(outs, x)
        np.testing.assert_array_equal(outs[1], expected[1])
    empty = model.run(np.zeros((3, 0, 4), np.float32))
    assert [o.shape for o in empty] == [(0, 3, 5), (3, 0, 5)]


def test_shapes_that_do_not_fit_are_named(rng):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    proto = _model(nodes, [_f32("x", ["N", 3]), _f32("z", ["N", 3])], [_f32("y", ["N", 3])])
    model = compile_model(proto, name="add", max_batch=16)
    a = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"dimension N is 2 in input 0 \(x\) but 5 in input 1 \(z\)"):
        model(a, rng.standard_normal((5, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"input 1 \(z\): dimension 1 is 4, expected 3"):
        model(a, rng.standard_normal((2, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="batch 17 is over this library's bound N <= 16"):
        model(*[rng.standard_normal((17, 3)).astype(np.float32)] * 2)
    with pytest.raises(TypeError, match="input 'x': expected dtype float32, got float64"):
        model(a.astype(np.float64), a)
    np.testing.assert_array_equal(model(a, a.T.copy().T), a + a)
    assert model.max_batch == 16


C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "time_major.h"
/* x[3][B][4] = (t * 7 + b * 3 + c) % 17 / 8 - 1, for B = argv[1..]; prints y then z. */
int main(int argc, char **argv) {
    time_major_model *m;
    if (time_major_create(&m)) return 1;
    if (time_major_input_shape(0)[1] != -1 || !time_major_input_dim_name(0, 1)) return 2;
    for (int a = 1; a < argc; a++) {
        int64_t batch = atoll(argv[a]);
        float *x = malloc(sizeof(float) * 12 * batch), *y = malloc(sizeof(float) * 15 * batch),
              *z = malloc(sizeof(float) * 15 * batch);
        for (int t = 0; t < 3; t++)
            for (int64_t b = 0; b < batch; b++)
                for (int c = 0; c < 4; c++)
                    x[(t * batch + b) * 4 + c] = (float)((t * 7 + b * 3 + c) % 17) / 8.0f - 1.0f;
        int64_t xs[] = {3, batch, 4}, ys[3], zs[3];
        const int64_t *in_shapes[] = {xs};
        int64_t *out_shapes[] = {ys, zs};
        const void *in[] = {x};
        void *out[] = {y, z};
        if (time_major_run_shaped(m, in, in_shapes, out, out_shapes)) {
            fprintf(stderr, "%s\n", time_major_last_error(m));
            return 3;
        }
        printf("%lld %lld ", (long long)ys[0], (long long)ys[1]);
        printf("%lld %lld\n", (long long)zs[0], (long long)zs[1]);
        for (int64_t i = 0; i < 15 * batch; i++) printf("%.9g\n", y[i]);
        for (int64_t i = 0; i < 15 * batch; i++) printf("%.9g\n", z[i]);
        free(x), free(y), free(z);
    }
    int64_t bad[] = {3, 2, 5};
    const int64_t *bad_shapes[] = {bad};
    float dummy[64];
    const void *in[] = {dummy};
    void *out[] = {dummy, dummy};
    if (time_major_run_shaped(m, in, bad_shapes, out, NULL) == 0) return 4;
    printf("%s\n", time_major_last_error(m));
    time_major_destroy(m);
    return 0;
}
"""


def _c_input(batch: int) -> np.ndarray:
    t, b, c = np.meshgrid(np.arange(3), np.arange(batch), np.arange(4), indexing="ij")
    return ((t * 7 + b * 3 + c) % 17 / 8 - 1).astype(np.float32)


@pytest.mark.parametrize("tool", ["plain", "valgrind"])
def test_a_c_program_calls_one_library_at_three_batch_sizes(tool, tmp_path, rng, monkeypatch):
    proto = _time_major(rng)
    so = compile_model(proto, name="time_major", cpu_name="x86-64-v3").save(tmp_path / "time_major.so")
    assert isinstance(load(so), BatchedModel)
    monkeypatch.setenv("KILN_NUM_THREADS", "2")
    batches = (1, 9, 41)  # tile 1; 8 + 1; 32 + 8 + 1
    lines = run_c_program(C_PROGRAM, so, [str(b) for b in batches], tool)
    for batch in batches:
        header, lines = lines[0], lines[1:]
        assert header == f"{batch} 3 3 {batch}"
        got = np.array(lines[: 30 * batch], np.float32)
        lines = lines[30 * batch :]
        x = _c_input(batch)
        y, z = interpret(import_onnx(proto, {"x": x.shape}), [x])
        np.testing.assert_allclose(got, np.concatenate([y.ravel(), z.ravel()]), rtol=1e-5, atol=1e-6)
    assert lines == ["input 0 (x): dimension 2 is 5, expected 4"]


def test_kiln_compile_dim_bounds_the_batch(tmp_path, rng):
    from compiler.cli import main as kiln

    path = tmp_path / "time_major.onnx"
    path.write_bytes(_time_major(rng).SerializeToString())
    assert kiln(["compile", str(path), "-o", str(tmp_path / "tm.so"), "--dim", "N=1..20"]) == 0
    model = load(tmp_path / "tm.so")
    assert model.max_batch == 20 and model.batch_dim == "N"
    assert "(any size)" not in Path(tmp_path / "tm.h").read_text()
    assert kiln(["compile", str(path), "-o", str(tmp_path / "tm2.so"), "--dim", "B"]) == 2


def test_kiln_compile_fixes_a_sequence_and_keeps_the_batch(tmp_path, rng, capsys):
    """x: f32[S, N, 3] minus its mean over the steps S: the steps meet, the batch
    elements do not. --fix-dim S=5 gives one library for every N at S = 5."""
    from compiler.cli import main as kiln

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["y"]),
    ]
    path = tmp_path / "steps.onnx"
    proto = _model(nodes, [_f32("x", ["S", "N", 3])], [_f32("y", ["S", "N", 3])])
    path.write_bytes(proto.SerializeToString())
    so = tmp_path / "steps.so"
    assert kiln(["compile", str(path), "-o", str(so), "--fix-dim", "S=5", "--dim", "N"]) == 0
    model = load(so)
    assert [str(t) for t in model.inputs] == ["x: float32[5, N, 3]"]
    for batch in (1, 6, 40):
        x = rng.standard_normal((5, batch, 3)).astype(np.float32)
        np.testing.assert_allclose(model(x), x - x.mean(axis=0, keepdims=True), rtol=1e-5, atol=1e-6)
    assert kiln(["compile", str(path), "-o", str(so), "--fix-dim", "T=5"]) == 2
    assert "--fix-dim T: no input names it (named: N, S)" in capsys.readouterr().err


def test_the_rest_of_a_batch_runs_by_the_cheapest_tiles():
    """A tile whose cost is its batch (compute-bound) is split to what the rest needs; one
    that costs the same at every size (weights streamed once) runs padded."""
    from compiler.batching import cover_table

    by_work = cover_table([32, 8, 1], [32.0, 8.0, 1.0])
    assert by_work[7] == 2 and by_work[9] == 1 and by_work[31] == 1
    by_weights = cover_table([32, 8, 1], [1.2, 1.05, 1.0])
    assert by_weights[7] == 1 and by_weights[1] == 2 and by_weights[20] == 0


def test_a_recurrence_rest_runs_padded_since_its_weights_stream_every_step(rng):
    """An LSTM reads Rᵀ again at every step (each step needs the state the last one
    made), whatever the batch: the estimate counts it, so seven elements run as one
    padded tile of 8, not as seven tiles of 1."""
    from compiler.batching import cover_table, program_seconds
    from compiler.driver import lower_graph

    seq, features, hidden = 16, 8, 64
    node = helper.make_node("LSTM", ["x", "w", "r"], ["", "h"], hidden_size=hidden)
    inits = [
        _const("w", rng.standard_normal((1, 4 * hidden, features)).astype(np.float32)),
        _const("r", rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)),
    ]
    proto = _model([node], [_f32("x", [seq, "N", features])], [_f32("h", [1, "N", hidden])], inits)
    programs = [lower_graph(import_onnx(proto, {"x": (seq, b, features)}), "t", True, "cpu") for b in (8, 1)]
    recurrence = max((c.kernel for c in programs[1].cpu_calls), key=lambda k: k.bytes)
    assert recurrence.bytes >= seq * 4 * hidden * hidden * 4  # Rᵀ once per step
    assert cover_table([8, 1], [program_seconds(p) for p in programs])[7] == 0
