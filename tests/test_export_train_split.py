"""The C training library's split step (export_train, CPU): NAME_compute_gradients, an
all-reduce of NAME_gradients(t) by the caller, NAME_apply_gradients; and the driver's
build_several that links the fused step and the two split programs into one library.

A C program (SPLIT_C) steps a library three ways: `fused` (NAME_train_step), `one`
(compute_gradients on its own batch + apply_gradients) and `two` (two trainers as two
processes, each with its half of a global batch, their buffers summed into both as
MPI_Allreduce would, both applying)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from codegen.cabi import c_compiler
from compiler.driver import build_several, lower_graph
from frontends import keras
from frontends.keras import layers
from ir.interpreter import interpret
from runtime import CompiledModel
from tests.helpers import mlp_graph

FEATURES, CLASSES, ROWS, STEPS = 6, 3, 16, 4  # ROWS: a library's batch; `two` steps on 2 * ROWS

SPLIT_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include HEADER

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define F(fn) CAT(NAME, fn)
typedef F(trainer) trainer;

static void check(int status, trainer *t, const char *what) {
    if (status != 0) {
        fprintf(stderr, "%s failed: %s\n", what, F(trainer_last_error)(t));
        exit(3);
    }
}

static float *param(trainer *t, int i) {
    float *p = malloc(sizeof(float) * (size_t)F(param_size)(i));
    check(F(get_param)(t, i, p), t, "get_param");
    return p;
}

int main(int argc, char **argv) { /* MODE ROWS STEPS x.bin y.bin params.bin */
    if (argc != 7) return 1;
    const char *mode = argv[1];
    const long rows = atol(argv[2]);
    const int steps = atoi(argv[3]), two = !strcmp(mode, "two");
    const size_t batch = (size_t)(two ? 2 * rows : rows), count = F(gradient_count)();
    float *x = malloc(sizeof(float) * batch * FEATURES), *sum = malloc(sizeof(float) * count);
    int64_t *y = malloc(sizeof(int64_t) * batch);
    FILE *fx = fopen(argv[4], "rb"), *fy = fopen(argv[5], "rb");
    trainer *t[2] = {NULL, NULL};
    for (int k = 0; k <= two; k++) check(F(trainer_create)(&t[k]), NULL, "create");
    for (int s = 0; s < steps; s++) {
        float loss = 0, part = 0;
        if (fread(x, sizeof(float) * FEATURES, batch, fx) != batch) return 2;
        if (fread(y, sizeof(int64_t), batch, fy) != batch) return 2;
        if (!strcmp(mode, "fused")) {
            check(F(train_step)(t[0], x, y, &loss), t[0], "train_step");
        } else if (!two) { /* one process: its own batch, no sum */
            check(F(compute_gradients)(t[0], x, y, 0, rows, &part), t[0], "compute_gradients");
            check(F(apply_gradients)(t[0], &loss), t[0], "apply_gradients");
            if (part != loss || part != F(gradients)(t[0])[0]) return 4;
        } else { /* two processes: rows k * rows .. of the global batch */
            for (int k = 0; k < 2; k++)
                check(F(compute_gradients)(t[k], x + k * rows * FEATURES, y + k * rows, k * rows, 2 * rows,
                                           &part), t[k], "compute_gradients");
            const float *g0 = F(gradients)(t[0]), *g1 = F(gradients)(t[1]);
            for (size_t i = 0; i < count; i++) sum[i] = g0[i] + g1[i]; /* MPI_Allreduce's work */
            for (int k = 0; k < 2; k++) {
                memcpy(F(gradients)(t[k]), sum, sizeof(float) * count);
                check(F(apply_gradients)(t[k], &loss), t[k], "apply_gradients");
            }
        }
        printf("%.9g\n", loss);
    }
    if (two) { /* the processes end bit-identical */
        if (F(iterations)(t[0]) != steps || F(iterations)(t[1]) != steps) return 5;
        for (int i = 0; i < F(num_params)(); i++) {
            float *a = param(t[0], i), *b = param(t[1], i);
            int same = !memcmp(a, b, sizeof(float) * (size_t)F(param_size)(i));
            free(a);
            free(b);
            if (!same) {
                fprintf(stderr, "param %d (%s) differs between the processes\n", i, F(param_name)(i));
                return 5;
            }
        }
    }
    FILE *out = fopen(argv[6], "wb");
    for (int i = 0; i < F(num_params)(); i++) {
        float *p = param(t[0], i);
        fwrite(p, sizeof(float), (size_t)F(param_size)(i), out);
        free(p);
    }
    fclose(out);
    /* rows outside the global batch are refused, with the reason */
    if (F(compute_gradients)(t[0], x, y, rows + 1, 2 * rows, NULL) == 0) return 6;
    printf("refused: %s\n", F(trainer_last_error)(t[0]));
    for (int k = 0; k <= two; k++) F(trainer_destroy)(t[k]);
    fclose(fx);
    fclose(fy);
    free(x);
    free(y);
    free(sum);
    return 0;
}
"""


def _mlp(batchnorm: bool):
    """An MLP with Dropout (and BatchNormalization), Adam, a metric; weights from seed 3."""
    keras.utils.set_random_seed(3)
    hidden = [layers.Dense(16, activation="relu")] + ([layers.BatchNormalization()] if batchnorm else [])
    model = keras.Sequential(
        [keras.Input((FEATURES,)), *hidden, layers.Dropout(0.3), layers.Dense(CLASSES, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _program(model, work: Path, name: str, batch: int, cpu: str | None = None) -> Path:
    """model.export_train(NAME.so) and SPLIT_C built against it: the executable."""
    model.export_train(work / f"{name}.so", batch_size=batch, cpu=cpu)
    source = work / "split.c"
    source.write_text(SPLIT_C)
    exe = work / f"split_{name}"
    subprocess.run(
        [c_compiler(), "-Wall", "-Wextra", "-Werror", f"-DNAME={name}", f'-DHEADER="{name}.h"',
         f"-DFEATURES={FEATURES}", str(source), str(work / f"{name}.so"), f"-I{work}", f"-Wl,-rpath,{work}",
         "-o", str(exe)],
        check=True,
    )  # fmt: skip
    return exe


@pytest.fixture
def data(tmp_path, rng):
    """STEPS global batches of 2 * ROWS rows: x.bin, y.bin."""
    x = rng.standard_normal((STEPS * 2 * ROWS, FEATURES)).astype(np.float32)
    y = x[:, :CLASSES].argmax(axis=1).astype(np.int64)
    x.tofile(tmp_path / "x.bin")
    y.tofile(tmp_path / "y.bin")
    return tmp_path


def _run(exe: Path, mode: str, rows: int, work: Path, wrap: list[str] = (), **env):
    """One run of SPLIT_C: the losses it printed, its parameters and the refusal line."""
    params = work / f"{exe.name}.{mode}.bin"
    files = [str(work / name) for name in ("x.bin", "y.bin")] + [str(params)]
    cmd = [*wrap, str(exe), mode, str(rows), str(STEPS), *files]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, f"{mode}: exit {run.returncode}\n{run.stdout}{run.stderr[-3000:]}"
    *losses, refused = run.stdout.splitlines()
    return np.array(losses, np.float64), np.fromfile(params, np.float32), refused


def test_one_process_split_step_trains_as_the_fused_step(data):
    """(a) compute_gradients on the trainer's own batch (share 1) + apply_gradients gives
    the losses and weights of NAME_train_step on the same batches, with the same
    Dropout masks and BatchNormalization moving statistics. Compared at rtol 1e-5 (the
    elementwise bound of DESIGN.md's numerics), not bit for bit: the fused step and
    the split programs are different graphs (the fused one may update a weight in the
    kernel that finishes its gradient, the split one stores the gradient and a second
    program reads it), so fusion and LLVM may group and contract their float32
    arithmetic differently; the share's ×1.0 is exact, so only rounding of the same
    formulas can differ. Today, on this machine, they agree bit for bit."""
    exe = _program(_mlp(batchnorm=True), data, "bn", ROWS)
    fused_losses, fused, _ = _run(exe, "fused", ROWS, data)
    losses, params, refused = _run(exe, "one", ROWS, data)
    np.testing.assert_allclose(losses, fused_losses, rtol=1e-5)
    np.testing.assert_allclose(params, fused, rtol=1e-5, atol=1e-7)
    assert refused == f"refused: rows {ROWS + 1} to {2 * ROWS} are not rows of a batch of {2 * ROWS} rows " \
        f"(x and y hold {ROWS} rows)"  # fmt: skip


def test_two_processes_end_identical_and_train_as_one_with_the_global_batch(data):
    """(b) two trainers, each computing its half of a global batch (share 0.5), their
    buffers summed into both: they end bit-identical (the C program compares them)
    and, without BatchNormalization, as one trainer with the whole batch: losses and
    weights at rtol 1e-5 (the halves' sums are the whole batch's, added in another
    order). The Dropout masks are each process's rows of the whole batch's."""
    model = _mlp(batchnorm=False)
    half = _program(model, data, "half", ROWS)
    full = _program(model, data, "full", 2 * ROWS)
    losses, params, _ = _run(half, "two", ROWS, data)
    full_losses, full_params, _ = _run(full, "fused", 2 * ROWS, data)
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)
    np.testing.assert_allclose(params, full_params, rtol=1e-5, atol=1e-7)
    # with BatchNormalization, each process normalizes by its own rows: only identical
    with_bn = _program(_mlp(batchnorm=True), data, "bn", ROWS)
    bn_losses, _, _ = _run(with_bn, "two", ROWS, data)
    assert np.all(np.isfinite(bn_losses))


def test_split_step_stays_inside_its_buffers(data):
    """valgrind memcheck over the two-process run with Dropout and BatchNormalization (an
    AVX2 build: valgrind cannot decode AVX-512), at two threads: both trainers, their
    split instances (made on the first split call) and buffers, and the refusal."""
    if shutil.which("valgrind") is None and not os.environ.get("CI"):
        pytest.skip("valgrind is not installed (.ci/run installs it; under CI its absence fails)")
    exe = _program(_mlp(batchnorm=True), data, "bn", ROWS, cpu="x86-64-v3")
    valgrind = ["valgrind", "--error-exitcode=9", "--leak-check=full", "--errors-for-leak-kinds=all", "-q"]
    _run(exe, "two", ROWS, data, valgrind, KILN_NUM_THREADS="2")


def test_header_documents_the_split_step_and_cuda_has_none(tmp_path):
    """NAME.h declares the split functions and explains the all-reduce and the buffer; a
    --target cuda library keeps today's API: no split functions in its header or in
    its symbols."""
    model = _mlp(batchnorm=True)
    model.export_train(tmp_path / "cpu" / "mlp.so", batch_size=8)
    header = (tmp_path / "cpu" / "mlp.h").read_text()
    for declaration in (
        "int mlp_compute_gradients(mlp_trainer *t, const void *x, const void *y, long first_row,",
        "float *mlp_gradients(mlp_trainer *t);",
        "size_t mlp_gradient_count(void);",
        "int mlp_apply_gradients(mlp_trainer *t, float *loss);",
        "int mlp_train_step(mlp_trainer *t, const void *x, const void *y, float *loss);",
    ):
        assert declaration in header
    kernel, moving_mean = model.layers[0].weights[0].name, model.layers[1].weights[2].name
    for text in (
        "MPI_Allreduce(MPI_IN_PLACE, mlp_gradients(t), (int)mlp_gradient_count(),",
        "[0] loss",
        "[16] accuracy",
        f"[32] s * d loss / d {kernel}  float[96]",
        f"s * new {moving_mean}  float[16]",
    ):
        assert text in header, text
    model.export_train(tmp_path / "cuda" / "mlp.so", batch_size=8, target="cuda")
    header = (tmp_path / "cuda" / "mlp.h").read_text()
    assert "mlp_train_step" in header and "gradients" not in header
    dynamic = subprocess.run(["nm", "-D", str(tmp_path / "cuda" / "mlp.so")], capture_output=True, text=True)
    assert "mlp_train_step" in dynamic.stdout and "gradients" not in dynamic.stdout


def test_build_several_links_programs_into_one_library(tmp_path, rng):
    """Two lowered graphs in one library: each runs under its own prefix as its own
    library would; equal prefixes, and programs lowered for different CPUs (their tiles
    sized for different vector units), are refused."""
    graphs = {"a": mlp_graph(0), "b_two": mlp_graph(1, batch=2)}
    so = build_several([lower_graph(g, name) for name, g in graphs.items()], tmp_path, "both")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h", "b_two.h", "both.so"]
    for name, g in graphs.items():
        x = rng.standard_normal(g.inputs[0].type.shape).astype(np.float32)
        ours = CompiledModel(so, name).run(x)[0]
        np.testing.assert_allclose(ours, interpret(g, [x])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="distinct prefixes"):
        build_several([lower_graph(graphs["a"], "a"), lower_graph(graphs["a"], "a")], tmp_path, "same")
    avx2 = lower_graph(graphs["b_two"], "b_two", cpu_name="x86-64-v3")
    with pytest.raises(ValueError, match="lowered for one CPU"):
        build_several([lower_graph(graphs["a"], "a"), avx2], tmp_path, "mixed")
