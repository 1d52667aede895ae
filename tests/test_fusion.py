"""The partitioner's rules, each with the groups it must form, the compiled fused
program checked against the interpreter, and fused == unfused."""

from __future__ import annotations

from math import prod

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.kir import reshape_index
from compiler import compile_model
from compiler.driver import lower_graph
from compiler.fusion import GroupKind, partition
from ir.builder import GraphBuilder
from ir.interpreter import interpret


def groups_of(graph) -> list[str]:
    return [
        "+".join(n.name for n in g.nodes) + (" (view)" if g.kind is GroupKind.VIEW else "")
        for g in partition(graph)
    ]


def check(graph, rng, rtol=1e-4):
    feeds = [rng.standard_normal(v.type.shape).astype(v.type.np_dtype) for v in graph.inputs]
    expected = interpret(graph, feeds)
    for fuse in (True, False):
        got = compile_model(graph, name="fused" if fuse else "unfused", fuse=fuse).run(*feeds)
        for g, e in zip(got, expected):
            scale = max(1.0, float(np.max(np.abs(e))))
            np.testing.assert_allclose(g, e, rtol=rtol, atol=1e-5 * scale)


def w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def test_elementwise_chain_is_one_kernel(rng):
    b = GraphBuilder()
    x, y = b.input("x", (7, 33)), b.input("y", (33,))
    graph = b.build(b.tanh(b.relu(b.mul(b.add(x, y), y))))
    assert groups_of(graph) == ["add+mul+relu+tanh"]
    check(graph, rng)


def test_diamond_fuses_whole(rng):
    b = GraphBuilder()
    x = b.input("x", (5, 40))
    graph = b.build(b.add(b.relu(x), b.exp(b.neg(x))))
    assert groups_of(graph) == ["relu+neg+exp+add"]
    check(graph, rng)


def test_value_with_outside_readers_is_stored_once(rng):
    b = GraphBuilder()
    x = b.input("x", (6, 10))
    a = b.relu(x)
    graph = b.build(b.exp(a), b.softmax(a), a)
    groups = groups_of(graph)
    assert groups == ["relu+exp", "softmax"]
    lowered = lower_graph(graph, "g")
    assert sum(1 for c in lowered.calls if any(n.name == "relu" for n in c.nodes)) == 1  # not recomputed
    check(graph, rng)


def test_contraction_epilogue_bias_activation_residual(rng):
    b = GraphBuilder()
    x = b.input("x", (8, 16))
    h = b.linear(x, b.param("w", w(rng, 16, 16)), b.param("b", w(rng, 16)))
    graph = b.build(b.add(b.gelu(b.mul(h, b.param("s", np.float32(0.5).reshape(())))), x))
    assert groups_of(graph) == ["linear+mul+gelu+add"]
    check(graph, rng)


def test_epilogue_on_a_packed_product_whose_columns_end_inside_a_panel(rng):
    """26 columns: one whole panel of 16, then 10 summed at the panel's width in a
    scratch tile; the epilogue reads the residual at each of the 10, none past them."""
    b = GraphBuilder()
    x = b.input("x", (13, 40))
    h = b.linear(x, b.param("w", w(rng, 40, 26)), b.param("b", w(rng, 26)))
    graph = b.build(b.relu(b.add(h, b.input("r", (13, 26)))))
    assert groups_of(graph) == ["linear+add+relu"]
    assert [c.kernel.name for c in lower_graph(graph, "g").calls] == ["k0_linear_packed_add_relu"]
    check(graph, rng)


def test_conv_epilogue(rng):
    b = GraphBuilder()
    x = b.input("x", (2, 3, 9, 9))
    c = b.conv2d(x, b.param("w", w(rng, 4, 3, 3, 3)), pads=(1, 1, 1, 1))
    graph = b.build(b.relu(b.add(c, b.param("bias", w(rng, 4, 1, 1)))))
    assert groups_of(graph) == ["conv2d+add+relu"]
    check(graph, rng)


def test_no_epilogue_when_raw_result_has_another_reader(rng):
    b = GraphBuilder()
    y = b.matmul(b.input("x", (4, 8)), b.param("w", w(rng, 8, 8)))
    graph = b.build(b.relu(y), b.exp(y))
    assert groups_of(graph) == ["matmul", "relu", "exp"]  # siblings: no horizontal fusion (yet)
    check(graph, rng)


def test_reduction_prologue_and_epilogue(rng):
    b = GraphBuilder()
    x = b.input("x", (16, 64))
    s = b.reduce_sum(b.exp(b.mul(x, x)), axes=(1,))
    graph = b.build(b.sqrt(b.add(s, b.param("eps", np.float32(1e-3).reshape(())))))
    assert groups_of(graph) == ["mul+exp+reduce_sum+add+sqrt"]
    check(graph, rng)


def test_softmax_and_layer_norm_take_prologues(rng):
    b = GraphBuilder()
    x = b.input("x", (12, 32))
    sm = b.softmax(b.mul(x, b.param("t", np.float32(0.125).reshape(()))))
    ln = b.layer_norm(b.add(x, b.exp(x)), b.param("g", w(rng, 32)), b.param("b", w(rng, 32)))
    graph = b.build(b.add(sm, ln))
    assert sorted(groups_of(graph)) == ["exp+add+layer_norm", "mul+softmax+add_0"]
    check(graph, rng)


def test_no_cycle_through_a_reduction(rng):
    """a feeds a column reduction whose result comes back to a's consumer: a's group
    cannot take that consumer, or the kernel would need the reduction before itself."""
    b = GraphBuilder()
    x = b.input("x", (9, 20))
    a = b.relu(x)
    m = b.reduce_max(a, axes=(0,))
    graph = b.build(b.sub(a, m))  # a - max over the columns: broadcast back
    assert groups_of(graph) == ["relu", "reduce_max", "sub"]
    check(graph, rng)


def test_reshape_is_a_view(rng):
    b = GraphBuilder()
    x = b.input("x", (4, 6))
    graph = b.build(b.exp(b.reshape(b.relu(x), shape=(24,))))
    assert groups_of(graph) == ["relu", "reshape (view)", "exp"]
    lowered = lower_graph(graph, "g", fuse=True)
    assert len(lowered.calls) == 2
    check(graph, rng)


@pytest.mark.parametrize("fuse", [True, False])
def test_in_place_reuse_is_correct(fuse, rng):
    b = GraphBuilder()
    x = b.input("x", (64, 64))
    h = b.matmul(x, b.param("w", w(rng, 64, 64)))
    y = b.tanh(b.relu(h))
    graph = b.build(b.softmax(b.mul(y, y)))
    lowered = lower_graph(graph, "g", fuse=fuse)
    if not fuse:
        assert lowered.plan.in_place  # relu over matmul's output, tanh over relu's, ...
    check(graph, rng)


def softmax_from_primitives(b, x):
    m = b.reduce_max(x, axes=(-1,))
    e = b.exp(b.sub(x, m))
    return b.div(e, b.reduce_sum(e, axes=(-1,)))


def layer_norm_from_primitives(b, x, gamma, beta):
    mean = b.reduce_mean(x, axes=(-1,))
    d = b.sub(x, mean)
    var = b.reduce_mean(b.mul(d, d), axes=(-1,))
    eps = b.param("eps", np.float32(1e-5).reshape(()))
    return b.add(b.mul(b.mul(d, b.rsqrt(b.add(var, eps))), gamma), beta)


def test_softmax_written_with_primitives_is_one_kernel(rng):
    b = GraphBuilder()
    x = b.input("x", (3, 5, 40))
    graph = b.build(softmax_from_primitives(b, x))
    assert groups_of(graph) == ["reduce_max+sub+exp+reduce_sum+div"]
    check(graph, rng)


def test_layer_norm_written_with_primitives_is_one_kernel(rng):
    b = GraphBuilder()
    x = b.input("x", (10, 64))
    graph = b.build(layer_norm_from_primitives(b, x, b.param("g", w(rng, 64)), b.param("b", w(rng, 64))))
    assert groups_of(graph) == ["reduce_mean+sub+mul+reduce_mean_0+add+rsqrt+mul_1+mul_2+add_3"]
    check(graph, rng)


def test_rows_group_stores_values_read_outside(rng):
    b = GraphBuilder()
    x = b.input("x", (4, 24))
    m = b.reduce_max(x, axes=(-1,))
    shifted = b.sub(x, m)
    graph = b.build(b.exp(shifted), m, b.matmul(shifted, b.param("w", w(rng, 24, 3))))
    assert groups_of(graph)[0] == "reduce_max+sub+exp"
    check(graph, rng)


def test_elementwise_group_reading_the_result_twice_becomes_the_epilogue(rng):
    """GELU as exporters spell it reads the matmul's result twice: still one kernel."""
    b = GraphBuilder()
    x = b.input("x", (8, 32))
    h = b.matmul(x, b.param("w", w(rng, 32, 64)))
    erf = b.erf(b.div(h, b.param("sqrt2", np.float32(np.sqrt(2)).reshape(()))))
    one, half = (b.param(n, np.float32(v).reshape(())) for n, v in (("one", 1.0), ("half", 0.5)))
    graph = b.build(b.mul(b.mul(h, b.add(erf, one)), half))
    assert groups_of(graph) == ["matmul+div+erf+add+mul+mul_0"]
    check(graph, rng)


def test_epilogue_group_must_hand_on_one_value(rng):
    b = GraphBuilder()
    h = b.matmul(b.input("x", (8, 32)), b.param("w", w(rng, 32, 16)))
    t = b.tanh(h)
    graph = b.build(b.add(t, h), t)  # t is read outside: no epilogue
    assert groups_of(graph) == ["matmul", "tanh+add"]
    check(graph, rng)


def test_epilogue_with_a_branch_that_skips_the_anchor(rng):
    """relu(x) + (x - max(x)) over a 1-wide axis (a plain reduction, not a row kernel):
    relu reads x, not the reduction, yet ends up in its epilogue (found by the fuzzer)."""
    b = GraphBuilder()
    x = b.input("x", (3, 1))
    graph = b.build(b.add(b.relu(x), b.sub(x, b.reduce_max(x, axes=(-1,)))))
    assert groups_of(graph) == ["relu+reduce_max+sub+add"]
    check(graph, rng)


def test_no_epilogue_that_changes_the_dtype(rng):
    """A contraction accumulates in its group's output buffer: a cast after it is a
    kernel of its own (found by the ONNX Attention cases, which cast scores to float64)."""
    b = GraphBuilder()
    y = b.matmul(b.input("x", (4, 8)), b.param("w", w(rng, 8, 8)))
    graph = b.build(b.cast(b.relu(y), to="float64"))
    assert groups_of(graph) == ["matmul+relu", "cast"]
    check(graph, rng)


def test_rows_kernel_never_writes_over_an_input(rng):
    """The gradient of log(softmax(z)): a rows kernel reads softmax(z) in its reduction
    pass and again in its last pass, so its output may not take softmax(z)'s bytes (it
    did: the stash written in the first pass clobbered the input the last pass read)."""
    from ir.autodiff import gradients

    b = GraphBuilder()
    x, wv = b.input("x", (8, 4)), b.input("w", (4, 5))
    loss = b.reduce_mean(b.log(b.softmax(b.linear(x, wv), axis=-1)), keepdims=False)
    graph = b.build(loss, *gradients(b, loss, [wv, x]))
    check(graph, rng)


def test_index_chain_is_one_kernel(rng):
    """transpose → reshape → slice → transpose: one kernel reading x where it lies."""
    b = GraphBuilder()
    x = b.input("x", (4, 6, 12))
    t = b.reshape(b.transpose(x, perm=(1, 0, 2)), shape=(6, 4, 3, 4))
    s = b.slice(t, starts=(1,), ends=(3,), axes=(2,))
    graph = b.build(b.transpose(s, perm=(2, 0, 1, 3)))
    assert groups_of(graph) == ["transpose+reshape+slice+transpose_0"]
    check(graph, rng)


def test_index_chain_through_a_pad_and_a_gather(rng):
    """Pads read their input guarded (constant) or mirrored (reflect), a gather's
    indices come from a buffer: both work on an input read through a chain."""
    b = GraphBuilder()
    x = b.input("x", (5, 7))
    idx = b.param("idx", np.array([[4, 0], [2, 2]], np.int64))
    padded = b.pad(b.transpose(x, perm=(1, 0)), pads=(1, 0, 2, 1))
    mirrored = b.pad(b.reshape(b.transpose(x, perm=(1, 0)), shape=(35,)), pads=(2, 3), mode="reflect")
    picked = b.gather(b.transpose(x, perm=(1, 0)), idx, axis=1)
    graph = b.build(padded, mirrored, picked)
    assert groups_of(graph) == ["transpose+pad", "transpose_0+reshape+pad_1", "transpose_2+gather"]
    check(graph, rng)


def test_transpose_of_the_innermost_axis_reads_a_stored_input(rng):
    """A transpose that moves the last axis reads across rows: it takes no chain in
    (through one its stride would be the chain's source's), its input is stored."""
    b = GraphBuilder()
    x = b.input("x", (8, 16, 32))
    s = b.slice(b.transpose(x, perm=(1, 0, 2)), starts=(8,), ends=(16,), axes=(2,))
    graph = b.build(b.transpose(s, perm=(0, 2, 1)))
    assert groups_of(graph) == ["transpose+slice", "transpose_0"]
    check(graph, rng)


def test_index_chain_on_the_simulated_gpu(rng):
    b = GraphBuilder()
    x = b.input("x", (3, 40, 48))
    t = b.reshape(b.transpose(x, perm=(2, 1, 0)), shape=(48, 4, 10, 3))
    graph = b.build(b.transpose(b.slice(t, starts=(2,), ends=(9,), axes=(2,)), perm=(1, 0, 2, 3)))
    feeds = [rng.standard_normal((3, 40, 48)).astype(np.float32)]
    got = compile_model(graph, name="chain_sim", target="cuda-sim").run(*feeds)
    np.testing.assert_array_equal(got[0], interpret(graph, feeds)[0])


def _factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_reshape_index_is_the_row_major_reshape(shape, random):
    """reshape_index on a chain's view, against numpy's unravel of the flat index,
    for a random regrouping of the same elements (ones inserted anywhere)."""
    factors = _factors(prod(shape))
    random.shuffle(factors)
    to, i = [], 0
    while i < len(factors):
        take = random.randint(1, 3)
        to.append(prod(factors[i : i + take]))
        i += take
    to.insert(random.randint(0, len(to)), 1)
    for flat in {0, prod(shape) - 1, random.randrange(prod(shape))}:
        idx = [int(i) for i in np.unravel_index(flat, shape)]
        assert reshape_index(idx, tuple(shape), tuple(to)) == [int(i) for i in np.unravel_index(flat, to)]


def test_elementwise_reads_through_an_index_chain(rng):
    """mul(reshape(slice(transpose(x)))) + y: one kernel at the product's shape, x read
    through the chain; a chain read by two groups stays a kernel of its own."""
    b = GraphBuilder()
    x, y = b.input("x", (6, 8, 10)), b.input("y", (4, 2, 5, 6))
    picked = b.reshape(
        b.slice(b.transpose(x, perm=(1, 2, 0)), starts=(0,), ends=(5,), axes=(1,)), shape=(4, 2, 5, 6)
    )
    scaled = b.add(b.mul(picked, b.param("s", np.array([0.5], np.float32))), y)
    shared = b.transpose(x, perm=(2, 0, 1))
    graph = b.build(scaled, b.relu(shared), b.tanh(shared))
    assert groups_of(graph) == ["transpose+slice+reshape+mul+add", "transpose_0", "relu", "tanh"]
    check(graph, rng)


def test_epilogue_may_compute_booleans_on_the_way(rng):
    """where(y > 0, y, 0.1 y) after a matmul: the comparison's booleans live in
    registers, only the float result is stored, so the group is the matmul's epilogue;
    so is a ReLU's gradient mask after a max pool's gradient (a training step's)."""
    b = GraphBuilder()
    y = b.matmul(b.input("x", (5, 8)), b.param("w", w(rng, 8, 16)))
    leaky = b.where(
        b.greater(y, b.param("zero", np.zeros((), np.float32))), y, b.mul(y, b.param("a", np.float32(0.1)))
    )
    graph = b.build(leaky)
    assert groups_of(graph) == ["matmul+greater+mul+where"]
    check(graph, rng)
    b = GraphBuilder()
    x, g, pre = b.input("x", (2, 3, 9, 8)), b.input("g", (2, 3, 4, 4)), b.input("pre", (2, 3, 9, 8))
    routed = b.op("max_pool2d_tiled_backward", x, g, kernel=(2, 2))
    graph = b.build(
        b.where(
            b.greater(pre, b.param("zero", np.zeros((), np.float32))), routed, b.param("z", np.float32(0))
        )
    )
    assert groups_of(graph) == ["max_pool2d_tiled_backward+greater+where"]
    check(graph, rng)


def test_attention_takes_an_epilogue_on_overlapping_steps(rng, monkeypatch):
    """softmax(q kᵀ) v + b on 37 query rows: steps of 16, the last overlapping the one
    before; each step stores finished values (add and all) from its own scratch, so
    the overlap, run by two threads at once, gets b once."""
    monkeypatch.setenv("KILN_NUM_THREADS", "2")
    b = GraphBuilder()
    q, kt, v = b.input("q", (3, 37, 16)), b.input("kt", (3, 16, 40)), b.input("v", (3, 40, 24))
    out = b.add(
        b.matmul(b.softmax(b.matmul(q, kt)), v), b.param("b", rng.standard_normal(24).astype(np.float32))
    )
    graph = b.build(out)
    assert [n.op.name for g in lower_graph(graph, "att").groups for n in g.nodes] == ["attention", "add"]
    assert len(lower_graph(graph, "att").groups) == 1
    check(graph, rng)
