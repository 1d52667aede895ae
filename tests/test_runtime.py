"""CompiledModel: calling conventions, metadata, and every bad input as a clear error."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from compiler import compile_model
from ir.errors import KilnError
from ir.interpreter import interpret
from runtime import load
from tests.helpers import mlp_graph, two_input_graph


def test_metadata_and_calls_by_position_and_name(rng):
    g, m = two_input_graph()
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [
        ("a", "float32", (2, 3)),
        ("b", "float32", (3,)),
    ]
    assert [(t.name, t.shape) for t in m.outputs] == [("add", (2, 3))]
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    np.testing.assert_array_equal(m(a, b), a + b)
    np.testing.assert_array_equal(m(b=b, a=a), a + b)
    np.testing.assert_array_equal(m.run(a, b=b)[0], a + b)


@pytest.mark.parametrize(
    "args,kwargs,error,pattern",
    [
        ((), {}, TypeError, r"missing \['a', 'b'\]"),
        ((np.zeros((2, 3), np.float32),), {}, TypeError, r"missing \['b'\]"),
        ((np.zeros((2, 3), np.float32),) * 3, {}, TypeError, "takes 2 input"),
        ((), {"a": np.zeros((2, 3), np.float32), "c": 1}, TypeError, "no input named 'c'"),
        (
            (np.zeros((2, 3), np.float64), np.zeros(3, np.float32)),
            {},
            TypeError,
            "input 'a': expected dtype float32, got float64",
        ),
        (
            (np.zeros((3, 2), np.float32), np.zeros(3, np.float32)),
            {},
            ValueError,
            r"input 'a': expected shape \(2, 3\), got \(3, 2\)",
        ),
        (([[1.0, 2.0, 3.0]] * 2, np.zeros(3, np.float32)), {}, TypeError, "expected a numpy array"),
        ((np.zeros((2, 3), np.float32),), {"a": np.zeros((2, 3), np.float32)}, TypeError, "given twice"),
    ],
)
def test_bad_inputs_raise_named_errors(args, kwargs, error, pattern):
    _, m = two_input_graph()
    with pytest.raises(error, match=pattern):
        m(*args, **kwargs)


def test_non_contiguous_inputs_are_copied(rng):
    """A transpose, a strided slice, a misaligned view: numpy gives them without loss, so
    they are copied (as onnxruntime does) and give the same result as contiguous arrays."""
    _, m = two_input_graph()
    a = rng.standard_normal((3, 2)).astype(np.float32).T
    strided = rng.standard_normal(6).astype(np.float32)[::2]
    raw = np.zeros(2 * 3 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(2, 3)
    raw[...] = rng.standard_normal((2, 3))
    for x, y in ((a, strided), (raw, strided)):
        assert not (x.flags.c_contiguous and x.flags.aligned) and not y.flags.c_contiguous
        np.testing.assert_array_equal(m(x, y), m(np.ascontiguousarray(x), np.ascontiguousarray(y)))
        np.testing.assert_array_equal(m(x, y), x + y)


def test_bound_calls_refuse_non_contiguous_inputs():
    """A bound call reads the caller's array itself on every step: a copy would not see
    the caller's later writes, so it is refused instead."""
    _, m = two_input_graph()
    outs = [np.empty(t.shape, t.dtype) for t in m.outputs]
    with pytest.raises(ValueError, match="input 'a' is not C-contiguous; a bound call"):
        m.bind(outs, np.zeros((3, 2), np.float32).T, np.zeros(3, np.float32))


def test_missing_library_and_wrong_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model library"):
        load(tmp_path / "absent.so")
    _, m = two_input_graph()
    copy = m.save(tmp_path / "renamed.so")
    with pytest.raises(KilnError, match="no Kiln model named 'renamed'"):
        load(copy)
    assert load(copy, name="two").inputs == m.inputs
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(KilnError, match="not a loadable shared library"):
        load(junk)


def test_save_keeps_library_and_header(tmp_path, rng):
    g, m = two_input_graph()
    so = m.save(tmp_path / "out" / "two.so")
    assert so.exists() and (tmp_path / "out" / "two.h").exists()
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    np.testing.assert_array_equal(load(so)(a, b), a + b)


def test_instances_run_concurrently_on_threads(rng):
    graph = mlp_graph(batch=64)
    base = compile_model(graph, name="mlp")
    xs = [rng.standard_normal((64, 8)).astype(np.float32) for _ in range(4)]
    expected = [interpret(graph, [x])[0] for x in xs]
    results: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        model = base.instance()
        results[i] = [model(xs[(i + r) % 4]) for r in range(50)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for r, y in enumerate(results[i]):
            np.testing.assert_allclose(y, expected[(i + r) % 4], rtol=1e-4, atol=1e-6)


def test_results_do_not_depend_on_thread_count(rng):
    from ir.builder import GraphBuilder

    b = GraphBuilder("big")
    x = b.input("x", (256, 300))
    graph = b.build(
        b.softmax(b.tanh(b.matmul(x, b.param("w", rng.standard_normal((300, 200)).astype(np.float32)))))
    )
    m = compile_model(graph, name="big")
    xv = rng.standard_normal((256, 300)).astype(np.float32)
    outs = []
    for n in (1, 2, 3):
        m.set_num_threads(n)
        assert m.num_threads == n
        outs.append(m(xv))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_allclose(outs[0], interpret(graph, [xv])[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="thread count"):
        m.set_num_threads(0)


def test_run_into_preallocated_outputs(rng):
    _, m = two_input_graph()
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    out = np.empty((2, 3), np.float32)
    (got,) = m.run_into([out], a, b)
    assert got is out
    np.testing.assert_array_equal(out, a + b)
    with pytest.raises(TypeError, match=r"output 'add': expected float32\[2, 3\], got float64\[2, 3\]"):
        m.run_into([np.empty((2, 3))], a, b)
    with pytest.raises(ValueError, match="overlaps an input"):
        m.run_into([a], a, b)
    shared = rng.standard_normal(12).astype(np.float32)  # an input; outputs over its last bytes, beside it
    with pytest.raises(ValueError, match="overlaps an input"):
        m.run_into([shared[3:9].reshape(2, 3)], shared[:6].reshape(2, 3), b)
    m.run_into([shared[6:].reshape(2, 3)], shared[:6].reshape(2, 3), b)
    np.testing.assert_array_equal(shared[6:], (shared[:6].reshape(2, 3) + b).ravel())
    read_only = np.empty((2, 3), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="output 'add' must be C-contiguous, aligned and writeable"):
        m.run_into([read_only], a, b)
    with pytest.raises(TypeError, match="has 1 output"):
        m.run_into([], a, b)


def test_thread_pool_under_many_quick_launches(rng):
    """Many small parallel kernels back to back: every launch must see all its slices done."""
    from ir.builder import GraphBuilder

    b = GraphBuilder("quick")
    x = b.input("x", (64, 1024))
    y = x
    for _ in range(6):
        y = b.softmax(b.add(b.tanh(y), y))
    graph = b.build(y)
    m = compile_model(graph, name="quick")
    xv = rng.standard_normal((64, 1024)).astype(np.float32)
    expected = interpret(graph, [xv])[0]
    for threads in (2, 3, 1):
        m.set_num_threads(threads)
        for _ in range(100):
            np.testing.assert_allclose(m(xv), expected, rtol=1e-4, atol=1e-6)


def test_gather_index_out_of_range_is_an_error_naming_the_node(rng):
    from ir.builder import GraphBuilder
    from runtime import KilnRuntimeError

    b = GraphBuilder("g")
    data, idx = b.input("data", (5, 3)), b.input("idx", (4,), "int64")
    m = compile_model(b.build(b.gather(data, idx, name="embedding")), name="gather_check")
    x = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(m(x, np.array([0, 4, -5, 2])), x[[0, 4, 0, 2]])
    for bad in ([0, 5, 1, 2], [-6, 0, 0, 0]):
        with pytest.raises(KilnRuntimeError, match=r"node embedding \(gather\): .*outside \[-5, 5\)"):
            m(x, np.array(bad))
    np.testing.assert_array_equal(m(x, np.array([1, 1, 1, 1])), x[[1, 1, 1, 1]])  # recovers
