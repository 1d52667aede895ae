"""Dynamic sequence length: the proof that a model runs a sequence padded, its padded
keys masked (compiler.sequence.sequence_layout), and the one library for every batch
and every length up to a bound, from Python and from C, against the reference
interpreter."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.cli import main as kiln
from compiler.sequence import KEY_MASK, SequenceMixing, bucket_lengths, sequence_layout, with_key_mask
from frontends.onnx import import_onnx
from ir.interpreter import interpret
from ir.ops import BatchAxis
from runtime.batched import BatchedModel
from tests.helpers import run_c_program


def _attention(rng, scores_node=None, tail=(), out_shape=("N", "S", 4)):
    """x, z: f32[N, S, 4] → y = softmax((x·W)·xᵀ / 2)·z + x, positions on axis 1; x and z
    share S. `scores_node` replaces the softmax (its output "p"); `tail` adds nodes after
    y, the last writing "out" (of out_shape) instead."""
    softmax = scores_node or helper.make_node("Softmax", ["scaled"], ["p"], axis=-1)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["scores"]),
        helper.make_node("Mul", ["scores", "half"], ["scaled"]),
        softmax,
        helper.make_node("MatMul", ["p", "z"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["y"]),
        *tail,
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    f32 = helper.make_tensor_value_info
    inputs = [f32("x", TensorProto.FLOAT, ["N", "S", 4]), f32("z", TensorProto.FLOAT, ["N", "S", 4])]
    out = f32("out" if tail else "y", TensorProto.FLOAT, list(out_shape))
    graph = helper.make_graph(nodes, "attend", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _expected(proto, x, z):
    (y,) = interpret(import_onnx(proto, {"x": x.shape, "z": z.shape}), [x, z])
    return y


def test_bucket_lengths_double_from_16_up_to_the_bound():
    assert bucket_lengths(5) == (5,)
    assert bucket_lengths(16) == (16,)
    assert bucket_lengths(40) == (16, 32, 40)
    assert bucket_lengths(64) == (16, 32, 64)


def test_a_padded_sequence_with_its_keys_masked_gives_the_short_ones_rows(rng):
    """The proof's claim, in numpy: the graph for 8 positions, its softmax masked, run on
    6 positions padded with copies of the last, gives the graph for 6's rows."""
    proto = _attention(rng)
    graph = import_onnx(proto, {"x": (2, 8, 4), "z": (2, 8, 4)})
    layout, softmaxes = sequence_layout(graph, {"x": BatchAxis(1), "z": BatchAxis(1)}, 8)
    assert layout == [BatchAxis(1)] and [n.op.name for n in softmaxes] == ["softmax"]
    masked = with_key_mask(graph, softmaxes, 8)
    assert [v.name for v in masked.inputs] == ["x", "z", KEY_MASK]
    x, z = (rng.standard_normal((2, 6, 4)).astype(np.float32) for _ in range(2))
    pad = [0, 1, 2, 3, 4, 5, 5, 5]
    mask = np.where(np.arange(8) < 6, 0, -np.inf).astype(np.float32)
    (padded,) = interpret(masked, [x[:, pad], z[:, pad], mask])
    np.testing.assert_allclose(padded[:, :6], _expected(proto, x, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scores_node,tail,out_shape,message",
    [
        (
            None,
            [helper.make_node("ReduceMean", ["y"], ["out"], axes=[1])],
            ("N", 1, 4),
            "reduce_mean.*positions meet",
        ),
        (
            helper.make_node("Softmax", ["scaled"], ["p"], axis=1),
            (),
            ("N", "S", 4),
            "otherwise than times the values",
        ),
        (helper.make_node("Relu", ["scaled"], ["p"]), (), ("N", "S", 4), "otherwise than times the values"),
        (None, [helper.make_node("Identity", ["p"], ["out"])], ("N", "S", "S"), "does not hold one row"),
    ],
    ids=["mean_over_positions", "softmax_over_queries", "scores_without_softmax", "probabilities_out"],
)
def test_positions_that_meet_outside_attention_are_named(rng, scores_node, tail, out_shape, message):
    proto = _attention(rng, scores_node, tail, out_shape)
    graph = import_onnx(proto, {"x": (2, 8, 4), "z": (2, 8, 4)})
    with pytest.raises(SequenceMixing, match=message):
        sequence_layout(graph, {"x": BatchAxis(1), "z": BatchAxis(1)}, 8)


def test_one_library_takes_every_batch_and_every_length_up_to_its_bound(rng):
    proto = _attention(rng)
    model = compile_model(proto, name="attend", dims={"S": 40})
    assert isinstance(model, BatchedModel)
    assert (model.batch_dim, model.sequence_dim, model.max_length) == ("N", "S", 40)
    assert [str(t) for t in model.inputs] == ["x: float32[N, S, 4]", "z: float32[N, S, 4]"]
    # buckets 16, 32 and 40: exact, padded by one, padded to the bound; batches of one
    # tile, of two, and over the largest
    for batch, length in ((1, 1), (2, 5), (3, 16), (9, 17), (33, 40), (2, 39)):
        x, z = (rng.standard_normal((batch, length, 4)).astype(np.float32) for _ in range(2))
        np.testing.assert_allclose(model(x, z), _expected(proto, x, z), rtol=1e-5, atol=1e-5)
    x = rng.standard_normal((2, 41, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"input 0 \(x\): dimension 1 \(S\) is 41, expected 1..40"):
        model(x, x)
    with pytest.raises(ValueError, match=r"dimension S is 5 in input 0 \(x\) but 6 in input 1 \(z\)"):
        model(x[:, :5], x[:, :6])
    with pytest.raises(ValueError, match=r"dimension N is 2 in input 0 \(x\) but 1 in input 1 \(z\)"):
        model(x[:, :5], x[:1, :5])


def test_a_time_major_model_finds_its_batch_by_trying_each_order(rng):
    """x: f32[S, N, 4], both bounded: S tried as the batch is refused (its positions
    meet), then N is the batch and S the sequence."""
    from tests.test_specialize import _attention_over_sequence

    proto = _attention_over_sequence(rng)
    model = compile_model(proto, name="time_major_attend", dims={"S": 20, "N": 16})
    assert (model.batch_dim, model.sequence_dim, model.max_batch) == ("N", "S", 16)
    for length, batch in ((3, 16), (20, 1), (17, 5)):
        x = rng.standard_normal((length, batch, 4)).astype(np.float32)
        (expected,) = interpret(import_onnx(proto, {"x": x.shape}), [x])
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_token_ids_through_an_embedding_run_padded_too(rng):
    """ids: int64[N, S] → an embedding (Gather: its output holds the positions where the
    ids do) → attention; padded positions repeat the last id."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["y"]),
    ]
    table = numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "table")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])
    graph = helper.make_graph(nodes, "embed", [ids], [y], initializer=[table])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = compile_model(proto, name="embed", dims={"S": 24})
    assert [str(t) for t in model.inputs] == ["ids: int64[N, S]"]
    for batch, length in ((1, 3), (5, 17), (3, 24)):
        x = rng.integers(0, 50, (batch, length)).astype(np.int64)
        (expected,) = interpret(import_onnx(proto, {"ids": x.shape}), [x])
        np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "attend.h"
/* x[N][S][4] = ((n * 5 + s * 3 + c) % 11) / 4 - 1, z = x / 2, for N S pairs in argv; prints y. */
int main(int argc, char **argv) {
    attend_model *m;
    if (attend_create(&m)) return 1;
    if (attend_input_shape(0)[1] != -1 || !attend_input_dim_name(0, 1)) return 2;
    for (int a = 1; a + 1 < argc; a += 2) {
        int64_t n = atoll(argv[a]), s = atoll(argv[a + 1]), count = n * s * 4;
        float *x = malloc(sizeof(float) * count), *z = malloc(sizeof(float) * count),
              *y = malloc(sizeof(float) * count);
        for (int64_t i = 0; i < count; i++) {
            int64_t b = i / (s * 4), t = i / 4 % s, c = i % 4;
            x[i] = (float)((b * 5 + t * 3 + c) % 11) / 4.0f - 1.0f;
            z[i] = x[i] / 2;
        }
        int64_t xs[] = {n, s, 4}, ys[3];
        const int64_t *in_shapes[] = {xs, xs};
        int64_t *out_shapes[] = {ys};
        const void *in[] = {x, z};
        void *out[] = {y};
        if (attend_run_shaped(m, in, in_shapes, out, out_shapes)) {
            fprintf(stderr, "%s\n", attend_last_error(m));
            return 3;
        }
        printf("%lld %lld %lld\n", (long long)ys[0], (long long)ys[1], (long long)ys[2]);
        for (int64_t i = 0; i < count; i++) printf("%.9g\n", y[i]);
        free(x), free(y), free(z);
    }
    int64_t bad[] = {2, 41, 4};
    const int64_t *bad_shapes[] = {bad, bad};
    float dummy[64];
    const void *in[] = {dummy, dummy};
    void *out[] = {dummy};
    if (attend_run_shaped(m, in, bad_shapes, out, NULL) == 0) return 4;
    printf("%s\n", attend_last_error(m));
    attend_destroy(m);
    return 0;
}
"""


def _c_inputs(batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    b, t, c = np.meshgrid(np.arange(batch), np.arange(length), np.arange(4), indexing="ij")
    x = ((b * 5 + t * 3 + c) % 11 / 4 - 1).astype(np.float32)
    return x, x / 2


@pytest.mark.parametrize("tool", ["plain", "valgrind"])
def test_a_c_program_calls_one_library_at_three_batches_and_lengths(tool, tmp_path, rng, monkeypatch):
    proto = _attention(rng)
    path = tmp_path / "attend.onnx"
    path.write_bytes(proto.SerializeToString())
    so = tmp_path / "attend.so"
    dims = ["--dim", "N=1..64", "--dim", "S=1..40"]
    assert kiln(["compile", str(path), "-o", str(so), *dims, "--cpu", "x86-64-v3"]) == 0
    assert "every sequence\n * length S from 1 to 40" in (tmp_path / "attend.h").read_text()
    monkeypatch.setenv("KILN_NUM_THREADS", "2")
    calls = ((1, 3), (9, 16), (41, 33))  # padded 3 -> 16; exact; padded 33 -> 40 over tiles 32 + 8 + 1
    lines = run_c_program(C_PROGRAM, so, [str(d) for call in calls for d in call], tool)
    for batch, length in calls:
        header, lines = lines[0], lines[1:]
        assert header == f"{batch} {length} 4"
        count = batch * length * 4
        got, lines = np.array(lines[:count], np.float32), lines[count:]
        np.testing.assert_allclose(
            got, _expected(proto, *_c_inputs(batch, length)).ravel(), rtol=1e-5, atol=1e-5
        )
    assert lines == ["input 0 (x): dimension 1 (S) is 41, expected 1..40"]


def test_kiln_compile_dim_names_a_dimension_of_the_model(tmp_path, rng, capsys):
    path = tmp_path / "attend.onnx"
    path.write_bytes(_attention(rng).SerializeToString())
    assert kiln(["compile", str(path), "-o", str(tmp_path / "a.so"), "--dim", "T=1..8"]) == 2
    assert "T: no input of a names it (named: N, S)" in capsys.readouterr().err
    # the batch bounded, the sequence not: N tried as the sequence, S as the batch
    assert kiln(["compile", str(path), "-o", str(tmp_path / "a.so"), "--dim", "N=1..8"]) == 2
    assert "a sequence dimension needs a bound (S=1..MAX)" in capsys.readouterr().err
