"""runtime.Predictor: batch inference over any number of rows, picklable for Ray Data,
Dask and Spark workers, each process loading the library once."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from compiler import compile_model
from ir.builder import GraphBuilder
from runtime import CompiledModel, Predictor, predictor

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT / "frontends" / "zoo" / "data" / "mnist_cnn.onnx"
B = 8  # the batch the CNN is compiled for: row counts below are not multiples of it


@pytest.fixture(scope="module")
def cnn() -> CompiledModel:
    return compile_model(MNIST, name="mnist", input_shapes={"input": (B, 1, 28, 28)})


@pytest.fixture(scope="module")
def pair() -> CompiledModel:
    """Two inputs a[4, 2, 3], c[4, 6] -> y = reshape(a) + c [4, 6], s = sum(y, 1) [4]."""
    b = GraphBuilder("pair")
    a, c = b.input("a", (4, 2, 3)), b.input("c", (4, 6))
    y = b.rename(b.add(b.reshape(a, shape=(4, 6)), c), "y")
    s = b.rename(b.reduce_sum(y, axes=(1,), keepdims=False), "s")
    return compile_model(b.build(y, s), name="pair")


def by_chunks(model: CompiledModel, *arrays: np.ndarray) -> list[np.ndarray]:
    """The oracle: the model itself, run on chunks of its batch, the last padded with zeros."""
    b, n = model.inputs[0].shape[0], len(arrays[0])
    outs: list[list[np.ndarray]] = [[] for _ in model.outputs]
    for i in range(0, n, b):
        padded = [np.zeros(t.shape, t.dtype) for t in model.inputs]
        for p, a in zip(padded, arrays):
            p[: len(a[i : i + b])] = a[i : i + b]
        for out, r in zip(outs, model.run(*padded)):
            out.append(r[: min(b, n - i)])
    return [
        np.concatenate(o) if o else np.empty((0, *t.shape[1:]), t.dtype) for o, t in zip(outs, model.outputs)
    ]


def objects(rows: np.ndarray) -> np.ndarray:
    """The rows as a column of objects, one array each (as pandas or Ray's ragged columns hold them)."""
    column = np.empty(len(rows), object)
    for i, row in enumerate(rows):
        column[i] = row
    return column


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random((n, 1, 28, 28), dtype=np.float32)


def test_path_form_pickles_small_and_loads_once_per_process(cnn, tmp_path, rng):
    path = cnn.save(tmp_path / "mnist.so")
    blob = pickle.dumps(Predictor(path))
    assert len(blob) < 1000
    first, second = pickle.loads(blob), pickle.loads(blob)
    key = [k for k in predictor._MODELS if str(path) in k[1]]
    assert key == [], "unpickling alone loads nothing"
    x = images(rng, 3)
    y = first({"input": x})["probabilities"]
    loaded = [k for k in predictor._MODELS if str(path) in k[1]]
    assert len(loaded) == 1
    np.testing.assert_array_equal(second({"input": x})["probabilities"], y)
    assert [k for k in predictor._MODELS if str(path) in k[1]] == loaded
    assert first.model is second.model is predictor._MODELS[loaded[0]]
    assert pickle.loads(pickle.dumps(first)).model is first.model  # a loaded one pickles without it


def test_bytes_form_is_self_contained_and_loads_once_per_process(cnn, rng):
    predictor._MODELS.clear()
    blob = pickle.dumps(Predictor.from_compiled(cnn))
    assert len(blob) > cnn.path.stat().st_size
    first, second = pickle.loads(blob), pickle.loads(blob)
    assert predictor._MODELS == {}
    x = images(rng, 11)
    y = first({"input": x})["probabilities"]
    second({"input": x})
    assert len(predictor._MODELS) == 1 and first.model is second.model
    assert first.model.path != cnn.path and first.model.path.name == "mnist.so"  # its own copy
    np.testing.assert_array_equal(y, by_chunks(cnn, x)[0])
    # the model's name is read from the bytes when not given
    unnamed = Predictor(data=cnn.path.read_bytes())
    assert unnamed.model is first.model


@pytest.mark.parametrize("n", [0, 1, B - 1, B, 3 * B + 5])
def test_any_number_of_rows_matches_the_compiled_model(cnn, tmp_path, rng, n):
    x = images(rng, n)
    out = Predictor(cnn.save(tmp_path / "mnist.so"))({"input": x, "id": np.arange(n)})
    assert set(out) == {"input", "id", "probabilities"} and out["input"] is x
    assert out["probabilities"].shape == (n, 10)
    np.testing.assert_array_equal(out["probabilities"], by_chunks(cnn, x)[0])


def test_flattened_and_nested_rows_are_reshaped(cnn, rng):
    p = Predictor.from_compiled(cnn)
    x = images(rng, B + 3)
    expected = by_chunks(cnn, x)[0]
    flat = x.reshape(len(x), -1)
    for column in (
        flat,  # one flat row each (a single column of any name feeds a one-input model)
        x.reshape(len(x), 28, 28).astype(np.float64),  # another row shape, another float width
        x.reshape(len(x), 28, 28).tolist(),  # nested lists
        objects(flat),  # one array object per row (a ragged tensor column)
    ):
        np.testing.assert_array_equal(p({"pixels": column})["probabilities"], expected)


def test_several_inputs_and_outputs_map_to_columns(pair, rng):
    a, c = rng.standard_normal((10, 2, 3), dtype=np.float32), rng.standard_normal((10, 6), dtype=np.float32)
    y, s = by_chunks(pair, a, c)
    out = Predictor.from_compiled(pair)({"a": a, "c": c})
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["s"], s)
    renamed = Predictor.from_compiled(pair, input_columns={"c": "extra"}, output_columns=["sums", "total"])
    out = renamed({"a": a.reshape(10, 6), "extra": c})
    assert set(out) == {"a", "extra", "sums", "total"}
    np.testing.assert_array_equal(out["total"], s)


def test_pandas_frames_in_and_out(cnn, rng):
    pd = pytest.importorskip("pandas")
    x = images(rng, 2 * B + 1)
    frame = pd.DataFrame({"id": np.arange(len(x)), "image": list(x.reshape(len(x), -1))})
    out = Predictor.from_compiled(cnn, input_columns=["image"])(frame)
    assert list(out.columns) == ["id", "image", "probabilities"] and list(frame.columns) == ["id", "image"]
    np.testing.assert_array_equal(np.stack(out["probabilities"]), by_chunks(cnn, x)[0])
    # a 1-D output is a plain column; an empty frame (as Dask's meta) goes through
    sums = Predictor.from_compiled(compile_model(_sum_graph(), name="rowsum"), input_columns=["image"])
    out = sums(frame)
    assert out["s"].dtype == np.float32
    np.testing.assert_allclose(out["s"], x.reshape(len(x), -1).sum(1), rtol=1e-5)
    assert list(sums(frame.iloc[:0]).columns) == ["id", "image", "s"]
    empty = Predictor.from_compiled(cnn, input_columns=["image"])(frame.iloc[:0])
    assert empty["probabilities"].dtype == object  # as when full: Dask's meta= can be this


def _sum_graph():
    b = GraphBuilder("rowsum")
    x = b.input("x", (4, 784))
    return b.build(b.rename(b.reduce_sum(x, axes=(1,), keepdims=False), "s"))


def test_bad_columns_are_named(cnn, pair, rng):
    p = Predictor.from_compiled(cnn)
    x = images(rng, 3)
    with pytest.raises(ValueError, match=r"column 'input' \(input 'input'\): expected rows of 784 values "):
        p({"input": x.reshape(3, -1)[:, :783]})
    with pytest.raises(ValueError, match=r"column 'image' .* got row 1 of shape \(5,\)"):
        p({"image": [x[0].ravel(), np.ones(5), x[2].ravel()]})
    with pytest.raises(ValueError, match=r"no column 'input' .* its columns are \['id', 'image'\]"):
        p({"id": np.arange(3), "image": x})
    with pytest.raises(TypeError, match=r"column 'input' \(input 'input'\): expected float32 rows, got <U"):
        p({"input": np.array([["a"] * 784] * 3)})
    with pytest.raises(ValueError, match="different numbers of rows"):
        Predictor.from_compiled(pair)({"a": np.ones((2, 6)), "c": np.ones((3, 6))})
    with pytest.raises(TypeError, match="batch_format='numpy'"):
        p([x])
    with pytest.raises(TypeError, match="exactly one"):
        Predictor()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray's own, about its own settings
def test_ray_data_map_batches(cnn, tmp_path, rng, monkeypatch):
    """The bundled CNN over 1,000 rows with two actors on this 2-core machine (each at half
    a CPU: at one CPU each, the two actors and Ray's read task wait for each other forever)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    path = cnn.save(tmp_path / "mnist.so")
    x = images(rng, 1000)
    # Ray's workers import Kiln as the driver does, even where it is not installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"id": i, "image": row} for i, row in enumerate(x)])
        out = ds.map_batches(
            Predictor,
            fn_constructor_args=(str(path),),
            fn_constructor_kwargs={"input_columns": {"input": "image"}, "num_threads": 1},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.5,
            batch_size=100,
            batch_format="numpy",
        )
        batches = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        ray.shutdown()
    ids = np.concatenate([b["id"] for b in batches])
    y = np.concatenate([b["probabilities"] for b in batches])
    assert sorted(ids) == list(range(len(x)))
    np.testing.assert_allclose(y[np.argsort(ids)], by_chunks(cnn, x)[0], rtol=0, atol=1e-6)
