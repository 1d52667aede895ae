"""GPU kernels without a GPU: the kernel IR's GPU constructs, run on the CPU exactly
(codegen.gpu_sim) and assembled by ptxas for sm_80 and sm_90."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers import run_kernel

from codegen import gpu, gpu_sim, kir, nvptx
from codegen.kir import ShuffleMode
from compiler.driver import compile_model, gpu_modules, lower_graph
from ir.builder import GraphBuilder
from ir.errors import UnsupportedError
from ir.interpreter import interpret

needs_ptxas = pytest.mark.skipif(
    shutil.which("ptxas") is None and not os.environ.get("CI"),
    reason="ptxas is not installed (.ci/run installs it; under CI its absence fails)",
)


def block_sums(blocks: int = 8, threads: int = 128, barriers: bool = True) -> kir.Kernel:
    """Each block sums its `threads` elements: a shared-memory halving to one warp, then
    butterfly shuffles. Without the barriers, threads read shared values not yet written."""
    x = kir.Buffer("x", "float32", (blocks * threads,))
    y = kir.Buffer("y", "float32", (blocks,))
    k = kir.KernelBuilder("block_sums", [x, y])
    partial = k.shared("partial", "float32", (threads,))
    with gpu.grid(k, (blocks,), (threads,)) as ((b,), (t,)):
        k.store(partial, t, x.load_flat(b * threads + t))
        half = threads // 2
        while half >= kir.WARP:
            if barriers:
                k.barrier()
            with k.when(t.lt(half)):
                k.store(partial, t, partial.load_flat(t) + partial.load_flat(t + half))
            half //= 2
        if barriers:
            k.barrier()
        total = k.local("float32", partial.load_flat(t % kir.WARP), "total")
        offset = kir.WARP // 2
        while offset:
            k.assign(total, total.ref + k.shuffle(total.ref, ShuffleMode.XOR, offset))
            offset //= 2
        with k.when(t.eq(0)):
            k.store(y, b, total.ref)
    return k.finish()


def test_barriers_are_real(rng):
    x = rng.standard_normal(8 * 128).astype(np.float32)
    expected = x.reshape(8, 128).sum(axis=1)
    for barriers in (True, False):
        y = np.zeros(8, np.float32)
        run_kernel(gpu_sim.simulate(block_sums(barriers=barriers)), x, y)
        close = np.allclose(y, expected, rtol=1e-5, atol=1e-5)
        assert close == barriers, f"barriers={barriers}: {y} vs {expected}"


@pytest.mark.parametrize("mode", list(ShuffleMode))
def test_shuffles_read_the_partner_lane(mode, rng):
    """Two warps; every lane reads lane ^ 5 (xor) or lane + 5 (down: past the warp's
    end, its own value)."""
    x = rng.standard_normal(64).astype(np.float32)
    y = np.zeros(64, np.float32)
    xb, yb = kir.Buffer("x", "float32", (64,)), kir.Buffer("y", "float32", (64,))
    k = kir.KernelBuilder("shuffle", [xb, yb])
    offset = 4 if mode is ShuffleMode.XOR else 5
    with gpu.grid(k, (1,), (64,)) as (_, (t,)):
        k.store(yb, t, k.shuffle(xb.load_flat(t), mode, offset))
    run_kernel(gpu_sim.simulate(k.finish()), x, y)
    lane = np.arange(64) % 32
    if mode is ShuffleMode.XOR:
        partner = np.arange(64) ^ offset
    else:
        partner = np.where(lane + offset < 32, np.arange(64) + offset, np.arange(64))
    np.testing.assert_array_equal(y, x[partner])


def test_a_barrier_under_thread_dependent_control_is_refused():
    k = kir.KernelBuilder("divergent", [kir.Buffer("x", "float32", (32,))])
    with gpu.grid(k, (1,), (32,)) as (_, (t,)):
        with k.when(t.lt(16)):
            k.barrier()
    with pytest.raises(gpu_sim.SimulationError, match="depends on the thread"):
        gpu_sim.simulate(k.finish())


@needs_ptxas
@pytest.mark.parametrize("arch", nvptx.ARCHS)
def test_ptxas_accepts_shared_memory_barriers_and_shuffles(arch):
    report = nvptx.ptxas(nvptx.ptx_module([block_sums()], arch), arch)
    assert "Compiling entry function 'block_sums'" in report and "512 bytes smem" in report


def test_ptx_calling_an_outside_function_is_refused_naming_the_kernel():
    ptx = (
        ".extern .func (.param .b64 r) exp (.param .b64 x);\n"
        ".visible .entry k3_exp(.param .u64 p) {\n  call.uni (r), exp, (x);\n}\n"
    )
    with pytest.raises(UnsupportedError, match=r"kernel\(s\) k3_exp call outside function\(s\) exp"):
        nvptx._refuse_outside_calls(ptx)


def gpu_graph(rows: int = 37, cols: int = 1000):
    b = GraphBuilder("gpu")
    x = b.input("x", (rows, cols))
    y = b.gelu(x)  # elementwise
    z = b.reduce_sum(y, axes=(1,))  # a reduction
    return b.build(b.softmax(y), z, b.transpose(y))  # a rows kernel and an injective op


def test_gpu_scheduled_model_runs_on_the_cpu(rng):
    graph = gpu_graph(rows=37, cols=300)
    model = compile_model(graph, name="gpu_on_cpu", target="cuda-sim")
    x = rng.standard_normal((37, 300)).astype(np.float32)
    for got, expected in zip(model.run(x), interpret(graph, [x])):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_every_gpu_kernel_is_a_grid():
    lowered = lower_graph(gpu_graph(), "gpu", target="cuda")
    for call in lowered.calls:
        layout = gpu.layout(call.kernel)
        assert layout.threads % kir.WARP == 0 and all(layout.grid)


@needs_ptxas
@pytest.mark.parametrize("arch", nvptx.ARCHS)
def test_ptxas_accepts_a_model(arch):
    lowered = lower_graph(gpu_graph(), "gpu", target="cuda")
    ptx = gpu_modules(lowered, (arch,))[arch]
    assert f".target {arch}" in ptx
    report = nvptx.ptxas(ptx, arch)
    for call in lowered.calls:
        assert f"Compiling entry function '{call.kernel.name}'" in report


def test_cli_writes_ptx_and_a_cuda_sim_library(tmp_path, rng):
    from compiler.cli import main
    from frontends.zoo.onnx_models import MNIST_CNN_PATH
    from runtime import load

    assert (
        main(
            [
                "compile",
                str(MNIST_CNN_PATH),
                "--target",
                "cuda",
                "--emit",
                "ptx",
                "-o",
                str(tmp_path / "g.so"),
            ]
        )
        == 0
    )
    for arch in nvptx.ARCHS:
        assert f".target {arch}" in (tmp_path / f"g.{arch}.ptx").read_text()
    assert main(["compile", str(MNIST_CNN_PATH), "--target", "cuda-sim", "-o", str(tmp_path / "sim.so")]) == 0
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    expected = compile_model(MNIST_CNN_PATH, name="cnn")(x)
    np.testing.assert_allclose(load(tmp_path / "sim.so")(x), expected, rtol=1e-4, atol=1e-6)


@needs_ptxas
def test_inspect_shows_each_gpu_kernels_resources(capsys):
    from compiler.cli import main
    from frontends.zoo.onnx_models import MNIST_CNN_PATH

    assert main(["inspect", str(MNIST_CNN_PATH), "--target", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "sm_80 regs" in text and "sm_90 regs" in text
    assert "k4_conv2d_gemm_relu" in text and "of the FLOPs in tiled products" in text
