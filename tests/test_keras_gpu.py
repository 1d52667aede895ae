"""Keras training on the GPU (`with keras.device("gpu:0")`), through the mock CUDA driver
(tests/mock_cuda: each launch runs the cuda-sim build of the same kernel). The train
step's weights and optimizer slots stay in device memory between steps; fit's history,
the weights it reaches, evaluate and predict match training on the CPU; every driver
failure on the way is a Kiln error naming what failed, and the model carries on after
it; export_train(target="cuda") gives the C training library, which a C program steps
through the mock as far as the CPU one."""

from __future__ import annotations

import ctypes
import gc
import os
import re
import subprocess
import warnings

import numpy as np
import pytest

from codegen.cabi import c_compiler
from frontends import keras
from frontends.keras import devices, trainer
from runtime import KilnRuntimeError
from tests import mock_cuda
from tests.test_cuda_artifact import DRIVER_VARS, calls, live, needs_ptxas

pytestmark = needs_ptxas


@pytest.fixture(scope="session")
def mock():
    return mock_cuda.build_mock()


@pytest.fixture
def gpu(monkeypatch, mock):
    """This process's CUDA libraries on the mock: each one Keras compiles for cuda gets
    its kernel table (the cuda-sim build of the same graph) in KILN_MOCK_KERNELS, as a
    LIBRARY=TABLE pair. Returns a function that sets driver variables (KILN_MOCK_FAIL)."""
    for var in DRIVER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KILN_LIBCUDA", str(mock))
    pairs: list[str] = []
    compile_model = trainer.compile_model

    def compile_with_table(graph, target="cpu", name="model", **options):
        compiled = compile_model(graph, target=target, name=name, **options)
        if target == "cuda":
            pairs.append(f"{compiled.path.resolve()}={mock_cuda.kernels(graph, name)}")
            monkeypatch.setenv("KILN_MOCK_KERNELS", ":".join(pairs))
        return compiled

    monkeypatch.setattr(trainer, "compile_model", compile_with_table)

    def driver(**env: str) -> None:
        for var, value in env.items():
            if value:
                monkeypatch.setenv(var, value)
            else:
                monkeypatch.delenv(var, raising=False)

    before = live(mock)
    yield driver
    gc.collect()  # the models of the test: their instances and device memory are freed
    assert live(mock) == before


def _mlp(k=keras):
    """test_keras.py's MLP (Adam, sparse categorical cross-entropy). Its layers are named,
    so that every copy's programs are the same graphs: compiled once, by the cache."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # input_shape= on the first layer, as older tutorials write it
        model = k.Sequential(
            [
                k.layers.Dense(64, activation="relu", input_shape=(32,), name="hidden_1"),
                k.layers.Dense(64, activation="relu", name="hidden_2"),
                k.layers.Dense(10, activation="softmax", name="probabilities"),
            ]
        )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _mnist_cnn(k=keras):
    """test_keras.py's MNIST CNN."""
    model = k.Sequential(
        [
            k.Input((28, 28, 1)),
            k.layers.Conv2D(32, (3, 3), activation="relu", name="conv_1"),
            k.layers.MaxPooling2D((2, 2), name="pool_1"),
            k.layers.Conv2D(64, (3, 3), activation="relu", name="conv_2"),
            k.layers.MaxPooling2D((2, 2), name="pool_2"),
            k.layers.Flatten(name="flatten"),
            k.layers.Dense(10, activation="softmax", name="probabilities"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _mlp_data(n: int = 80):
    rng = np.random.default_rng(13)  # fixed: training is chaotic at float32 rounding (see test_keras)
    x = rng.standard_normal((n, 32)).astype(np.float32)
    return x, x[:, :10].argmax(axis=1)


def _pair(build):
    """Two copies of a model with the same initial weights: one for the CPU, one for the GPU."""
    cpu, gpu = build(), build()
    gpu.set_weights(cpu.get_weights())
    return cpu, gpu


def _assert_same_training(got: dict, expected: dict, cpu, gpu) -> None:
    """The history at rtol 1e-4; the weights within 1e-3 (Adam moves a weight by about
    the learning rate a step whatever its gradient's size, so a gradient within rounding
    of zero may move it differently: the CNN's weights differ by up to ~2e-4 there)."""
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
    for g, e in zip(gpu.get_weights(), cpu.get_weights(), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------- training
def test_mlp_trains_on_the_gpu_as_on_the_cpu(gpu, mock):
    """Three epochs, a last batch of another size (a second train step), validation on
    the GPU from the weights where training left them. Per step one copy goes up (the
    batch) and one comes down (loss and metric sums); the weights come down once an
    epoch, for the layers (callbacks may read them)."""
    x, y = _mlp_data()
    cpu, model = _pair(_mlp)
    fit = dict(epochs=3, batch_size=32, shuffle=False, verbose=0, validation_data=(x[:40], y[:40]))
    expected = cpu.fit(x, y, **fit).history
    ups, downs = calls(mock, "cuMemcpyHtoDAsync_v2"), calls(mock, "cuMemcpyDtoHAsync_v2")
    with keras.device("gpu:0"):
        got = model.fit(x, y, **fit).history
    _assert_same_training(got, expected, cpu, model)
    steps, val_batches, epochs = 3 * 3, 2 * 3, 3
    assert calls(mock, "cuMemcpyHtoDAsync_v2") - ups == 1 + steps + val_batches  # 1: the initial state
    status = calls(mock, "cuMemcpyDtoHAsync_v2") - downs - (steps + val_batches + epochs)
    assert status in (0, steps + val_batches)  # a program with checks reads its status words per run
    assert model._state.device == "cuda:0"
    with keras.device("gpu"):
        np.testing.assert_allclose(model.predict(x), cpu.predict(x), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.evaluate(x, y, verbose=0), cpu.evaluate(x, y, verbose=0), rtol=1e-4)
    # outside the scope the CPU runs it, from the weights and slots the GPU left
    again = model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0).history
    assert model._state.device == "cpu"
    _assert_same_training(again, cpu.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0).history,
                          cpu, model)  # fmt: skip


def test_mnist_cnn_trains_on_the_gpu_as_on_the_cpu(gpu):
    rng = np.random.default_rng(7)
    x = rng.random((128, 28, 28, 1)).astype(np.float32)
    y = (x[:, :14, :14, 0].mean(axis=(1, 2)) * 40).astype(np.int64) % 10
    cpu, model = _pair(_mnist_cnn)
    expected = cpu.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0).history
    with keras.device("cuda:0"):
        got = model.fit(x, y, epochs=3, batch_size=32, shuffle=False, verbose=0).history
        predicted = model.predict(x[:32])
    _assert_same_training(got, expected, cpu, model)
    np.testing.assert_allclose(predicted, cpu.predict(x[:32]), rtol=1e-4, atol=1e-4)


def test_dropout_batch_norm_and_shuffling_on_the_gpu(gpu):
    """What else a step feeds or updates: Dropout masks (drawn on the host, uploaded with
    the batch), BatchNormalization's moving statistics (non-trainable weights the step
    rewrites), shuffled batches, RMSprop's slot; the same seed gives the CPU's training."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = x[:, :3].argmax(axis=1)

    def build():
        model = keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(16, name="dense"),
                keras.layers.BatchNormalization(name="norm"),
                keras.layers.Activation("relu", name="relu"),
                keras.layers.Dropout(0.3, name="dropout"),
                keras.layers.Dense(3, activation="softmax", name="probabilities"),
            ]
        )
        model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    cpu, model = _pair(build)
    keras.utils.set_random_seed(1)
    expected = cpu.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    keras.utils.set_random_seed(1)
    with keras.device("gpu:0"):
        got = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    _assert_same_training(got, expected, cpu, model)


def test_a_model_compiled_in_the_scope_trains_on_the_gpu(gpu, mock, tmp_path):
    """As Keras keeps variables where they were made: compile() inside the scope, fit
    after it; a "cpu" scope at the call wins. What the model saves is what the GPU
    trained (its weights and optimizer slots come down for it)."""
    pytest.importorskip("h5py")
    x, y = _mlp_data(32)
    cpu, model = _pair(_mlp)
    with keras.device("gpu:0"):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    launches = calls(mock, "cuLaunchKernel")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    assert calls(mock, "cuLaunchKernel") > launches and model._state.device == "cuda:0"
    cpu.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False)
    model.save_weights(tmp_path / "gpu.weights.h5")
    cpu.save_weights(tmp_path / "cpu.weights.h5")
    for path, other in ((tmp_path / "gpu.weights.h5", cpu), (tmp_path / "cpu.weights.h5", model)):
        loaded = _mlp()
        loaded.load_weights(path)
        for a, b in zip(loaded.get_weights(), other.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    launches = calls(mock, "cuLaunchKernel")
    with keras.device("cpu"):
        model.predict(x)
    assert calls(mock, "cuLaunchKernel") == launches


def test_device_names_are_keras_s():
    assert [devices.canonical(n) for n in ("cpu", "CPU:0", "gpu", "gpu:1", "cuda", "cuda:2")] == [
        "cpu", "cpu", "cuda:0", "cuda:1", "cuda:0", "cuda:2"
    ]  # fmt: skip
    for bad in ("tpu", "gpu:x", "cpu:1", ""):
        with pytest.raises(ValueError, match="Invalid device name"), keras.device(bad):
            pass
    with keras.device("gpu:1"):
        with keras.device("cpu"):
            assert devices.current() == "cpu"
        assert devices.current() == "cuda:1"
    assert devices.current() is None


# ---------------------------------------------------------------------------- failures
def test_no_driver_or_no_such_device_is_named(gpu):
    x, y = _mlp_data(32)
    model = _mlp()
    gpu(KILN_LIBCUDA="/nonexistent/libcuda.so.1")
    with pytest.raises(KilnRuntimeError, match=r"train_step_create failed: no CUDA driver: cannot load"):
        with keras.device("gpu:0"):
            model.fit(x, y, verbose=0)
    gpu(KILN_LIBCUDA=str(mock_cuda.build_mock()))
    with pytest.raises(KilnRuntimeError, match=r"train_step_create failed: no CUDA device 3: the driv"):
        with keras.device("gpu:3"):
            model.fit(x, y, verbose=0)
    with pytest.raises(KilnRuntimeError, match=r"predict_create failed: no CUDA device 3"):
        with keras.device("gpu:3"):
            model.predict(x)
    assert model.fit(x, y, verbose=0).history["loss"]  # the CPU still trains it


# (the failing call; which call, from how many a first model's first step made; the message)
FAILURES = [
    pytest.param(
        "cuMemAlloc_v2",
        lambda made: made - 3,  # made: creating the instance, 2 sets, batch, results
        r"train_step_alloc failed for the weights and optimizer slots \(set 0\): allocating a device buffer "
        r"\(\d+ bytes\) on device 0, Kiln mock GPU .*: cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY \(2\)",
        id="state-alloc",
    ),
    pytest.param(
        "cuMemAlloc_v2",
        lambda made: made - 1,
        r"train_step_alloc failed for the batch \(inputs, labels, dropout masks, step scalars\): "
        r"allocating a device buffer \(\d+ bytes\).*CUDA_ERROR_OUT_OF_MEMORY",
        id="batch-alloc",
    ),
    pytest.param(
        "cuMemcpyHtoDAsync_v2",
        lambda made: 3,  # the state, step 1's batch, step 2's batch
        r"train_step_upload of the batch \(inputs, labels, dropout masks, step scalars\) failed: copying "
        r"\d+ bytes to the device \(at 0x[0-9a-f]+\): cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS \(700\)",
        id="batch-upload",
    ),
    pytest.param(
        "cuLaunchKernel",
        lambda made: made + 3,  # made: a step's kernels
        r"train_step_run_device failed: kernel k\d+_\w+ \(node .*\): cuLaunchKernel: "
        r"CUDA_ERROR_LAUNCH_FAILED \(719\): unspecified launch failure",
        id="launch",
    ),
    pytest.param(
        "cuStreamSynchronize",
        lambda made: 6,  # the state's upload, then per step: upload, run, download
        r"train_step_run_device failed: running the kernels: cuStreamSynchronize: "
        r"CUDA_ERROR_ILLEGAL_ADDRESS \(700\): an illegal memory access",
        id="asynchronous",
    ),
    pytest.param(
        "cuMemcpyDtoHAsync_v2",
        lambda made: 2 * (made - 1),  # made: a step's, and the weights for the layers
        r"train_step_download of the loss and metric sums failed: copying \d+ bytes from the device "
        r"\(at 0x[0-9a-f]+\): cuMemcpyDtoHAsync: CUDA_ERROR_ILLEGAL_ADDRESS \(700\)",
        id="results-download",
    ),
]


@pytest.mark.parametrize("fn,nth,message", FAILURES)
def test_a_driver_failure_mid_fit_is_named_and_training_carries_on(gpu, mock, fn, nth, message):
    """How many calls of `fn` a first model's first step makes places the failure in a
    second model's fit (its second step, or the allocation named). After it the model
    is as before the failed step, and fit carries on from there: the weights it reaches
    are the CPU's over the same steps."""
    x, y = _mlp_data(96)
    first, model = _pair(_mlp)
    initial = model.get_weights()
    before = calls(mock, fn)
    with keras.device("gpu:0"):
        first.train_on_batch(x[:32], y[:32])
    start = calls(mock, fn)
    gpu(KILN_MOCK_FAIL=f"{fn}@{start + nth(start - before)}")
    with keras.device("gpu:0"):
        with pytest.raises(KilnRuntimeError, match=message):
            model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
        done = model.optimizer.iterations
        gpu(KILN_MOCK_FAIL="")
        model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    reference = _mlp()
    reference.set_weights(initial)
    for step in range(done):
        reference.train_on_batch(x[32 * step : 32 * step + 32], y[32 * step : 32 * step + 32])
    reference.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0)
    for g, e in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the C training library
C_TRAINER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "mlp.h"
int main(int argc, char **argv) {            /* x.bin y.bin steps params.bin */
    FILE *fx = fopen(argv[1], "rb"), *fy = fopen(argv[2], "rb"), *out = fopen(argv[4], "wb");
    static float x[32 * 6];
    static int64_t y[32];
    mlp_trainer *t;
    if (argc != 5 || !fx || !fy || !out) return 2;
    if (mlp_trainer_create(&t) != 0) {
        fprintf(stderr, "create failed: %s\n", mlp_trainer_last_error(NULL));
        return 1;
    }
    for (int s = 0; s < atoi(argv[3]); s++) {
        float loss;
        if (fread(x, sizeof x, 1, fx) != 1 || fread(y, sizeof y, 1, fy) != 1) return 2;
        if (mlp_train_step(t, x, y, &loss) != 0) {
            fprintf(stderr, "step %d failed: %s\n", s, mlp_trainer_last_error(t));
            mlp_trainer_destroy(t);
            return 1;
        }
        printf("%.9g\n", loss);
    }
    for (int i = 0; i < mlp_num_params(); i++) {
        long n = mlp_param_size(i);
        float *p = malloc(sizeof(float) * (size_t)n);
        if (mlp_get_param(t, i, p) != 0) return 3;
        if (i == 0 && mlp_set_param(t, i, p) != 0) return 3;
        fwrite(p, sizeof(float), (size_t)n, out);
        free(p);
    }
    fclose(out);
    mlp_trainer_destroy(t);
    return 0;
}
"""


def test_export_train_for_cuda_gives_the_c_training_library(gpu, mock, tmp_path, monkeypatch):
    """`kiln compile m.keras --train --target cuda`: the CPU library's C API, its step
    on the GPU. A C program trains four steps (Dropout masks drawn in C) to the losses
    and weights of the CPU library; without a driver, out of device memory, or with a
    failed launch it says so in one line and leaves no driver object behind."""
    from compiler.cli import main
    from frontends.keras import export_train as export_module

    rng = np.random.default_rng(5)
    x = rng.standard_normal((128, 6)).astype(np.float32)
    y = x[:, :3].argmax(axis=1).astype(np.int64)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.save(tmp_path / "m.keras")
    lowered = []
    lower_graph = export_module.lower_graph
    monkeypatch.setattr(
        export_module, "lower_graph", lambda graph, name, **kw: lowered.append((graph, name)) or lower_graph(
            graph, name, **kw)
    )  # fmt: skip
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    model.export_train(tmp_path / "cpu" / "mlp.so", batch_size=32)
    args = ["compile", str(tmp_path / "m.keras"), "--train", "--target", "cuda", "--batch-size", "32"]
    assert main([*args, "-o", str(tmp_path / "gpu" / "mlp.so")]) == 0
    header = (tmp_path / "gpu" / "mlp.h").read_text()
    assert "int mlp_train_step(mlp_trainer *t, const void *x, const void *y, float *loss);" in header
    assert "trains on an NVIDIA GPU" in header
    graph, name = lowered[-1]
    kernels = mock_cuda.kernels(graph, name, cpu_name="x86-64-v3")  # AVX2: valgrind decodes it
    x.tofile(tmp_path / "x.bin")
    y.tofile(tmp_path / "y.bin")
    (tmp_path / "main.c").write_text(C_TRAINER)
    runs = {}
    for kind in ("cpu", "gpu"):
        work = tmp_path / kind
        exe = work / "main"
        cmd = [c_compiler(), "-Wall", "-Wextra", "-Werror", str(tmp_path / "main.c"), str(work / "mlp.so")]
        subprocess.run([*cmd, f"-I{work}", f"-Wl,-rpath,{work}", "-o", str(exe)], check=True)
        runs[kind] = [str(exe), str(tmp_path / "x.bin"), str(tmp_path / "y.bin"), "4", str(work / "p.bin")]
    env = {k: v for k, v in os.environ.items() if k not in DRIVER_VARS}
    env |= {"KILN_LIBCUDA": str(mock), "KILN_MOCK_KERNELS": str(kernels), "KILN_MOCK_CHECK_EXIT": "1"}
    cpu = subprocess.run(runs["cpu"], capture_output=True, text=True, env=env)
    assert cpu.returncode == 0, cpu.stderr
    valgrind = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]
    on_gpu = subprocess.run([*valgrind, "-q", *runs["gpu"]], capture_output=True, text=True, env=env)
    assert on_gpu.returncode == 0 and on_gpu.stderr == "", on_gpu.stderr[-3000:]
    losses = [np.array(r.stdout.split(), np.float64) for r in (on_gpu, cpu)]
    np.testing.assert_allclose(*losses, rtol=1e-4)
    params = [np.fromfile(tmp_path / kind / "p.bin", np.float32) for kind in ("gpu", "cpu")]
    np.testing.assert_allclose(*params, rtol=1e-4, atol=1e-6)
    library = ctypes.CDLL(str(tmp_path / "gpu" / "mlp.so"))
    kernels_per_step, state = library.mlp_num_kernels(), 3 * library.mlp_num_params()  # Adam: 2 slots each
    for fail, message in (
        ({"KILN_LIBCUDA": "/nonexistent/libcuda.so.1"}, r"create failed: no CUDA driver: cannot load /nonex"),
        ({"KILN_MOCK_FAIL": "cuMemAlloc_v2@5"},  # create allocates at most 3 (arena, weights, status)
         r"create failed: allocating a device buffer \(\d+ bytes\) on device 0, Kiln mock GPU .*: "
         r"cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY"),
        ({"KILN_MOCK_FAIL": f"cuLaunchKernel@{kernels_per_step + 2}"},
         r"step 1 failed: kernel k\d+_\w+ \(node .*\): cuLaunchKernel: CUDA_ERROR_LAUNCH_FAILED"),
        ({"KILN_MOCK_FAIL": f"cuMemcpyHtoDAsync_v2@{state + 2}"},  # the state one by one, a batch a step
         r"step 1 failed: copying \d+ bytes to the device \(at 0x[0-9a-f]+\): cuMemcpyHtoDAsync: "
         r"CUDA_ERROR_ILLEGAL_ADDRESS"),
    ):  # fmt: skip
        proc = subprocess.run(runs["gpu"], capture_output=True, text=True, env=env | fail)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert re.fullmatch(message + ".*", lines[0]), lines[0]
