"""The five PyTorch-exported models and the train steps of the Keras parity models,
scheduled for the GPU: run on the CPU exactly (cuda-sim) they match the interpreter,
and ptxas takes every kernel for sm_80 and sm_90 without spilling."""

from __future__ import annotations

import numpy as np
import pytest
from test_gpu import needs_ptxas

from compiler.driver import compile_model, lower_graph, to_graph
from compiler.report import gpu_summary
from frontends.zoo.keras_models import PARITY_MODELS, train_step
from ir.interpreter import interpret

pytest.importorskip("torch")
from frontends.zoo.torch_models import export  # noqa: E402

SMALL = ["mlp", "mnist_cnn", "lstm"]
LARGE = ["transformer", "resnet18"]
CASES = [
    *[pytest.param(name, 1) for name in SMALL],
    *[pytest.param(name, 1, marks=pytest.mark.slow) for name in LARGE],
    *[pytest.param(name, 32, marks=pytest.mark.slow) for name in SMALL + LARGE],
]


@pytest.mark.parametrize("name,batch", CASES)
def test_gpu_schedule_matches_the_interpreter(name, batch, rng):
    model = export(name, batch)
    graph = to_graph(model)
    feeds = [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]
    got = compile_model(model, name=f"{name}_b{batch}", target="cuda-sim").run(*feeds)
    for g, e in zip(got, interpret(graph, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


@needs_ptxas
@pytest.mark.parametrize("name", [*SMALL, pytest.param("transformer", marks=pytest.mark.slow), "resnet18"])
def test_ptxas_takes_every_kernel_without_spills(name):
    summary = gpu_summary(lower_graph(to_graph(export(name, 1)), name, target="cuda"))
    for arch, kernels in summary.resources.items():
        assert len(kernels) == summary.kernels, arch
        spilling = {k: r for k, r in kernels.items() if r.spill_bytes or r.stack_bytes}
        assert not spilling, f"{arch}: {spilling}"


@pytest.mark.parametrize("name", list(PARITY_MODELS))
def test_keras_train_step_gpu_schedule_matches_the_interpreter(name, rng):
    graph, feeds = train_step(name, 32, rng)
    got = compile_model(graph, name=f"train_{name}", target="cuda-sim").run(*feeds)
    for g, e in zip(got, interpret(graph, feeds)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * max(float(np.abs(e).max()), 1.0))


@needs_ptxas
@pytest.mark.parametrize("name", list(PARITY_MODELS))
def test_ptxas_takes_every_train_step_kernel_without_spills(name, rng):
    graph, _ = train_step(name, 32, rng)
    summary = gpu_summary(lower_graph(graph, f"train_{name}", target="cuda"))
    for arch, kernels in summary.resources.items():
        assert len(kernels) == summary.kernels, arch
        spilling = {k: r for k, r in kernels.items() if r.spill_bytes or r.stack_bytes}
        assert not spilling, f"{arch}: {spilling}"
