"""Kernels of equal code (codegen.kir.code_key) are emitted once per library: the
layers of a model that repeat a block of one shape share their machine code, each
call running it on its own buffers."""

from __future__ import annotations

import numpy as np

from codegen import cpu
from codegen.kir import code_key
from compiler import compile_model
from compiler.driver import lower_graph
from ir.builder import GraphBuilder
from ir.interpreter import interpret


def _two_blocks(rng, scale: float = 1.0):
    """Two dense + scale + tanh blocks of one shape (their own weights), then a third of
    another width: three kernels fused, the first two alike."""
    b = GraphBuilder("blocks")
    x = b.input("x", (8, 32))
    for width in (32, 32, 16):
        w = b.param("w", (rng.standard_normal((32, width)) * 0.2).astype(np.float32))
        x = b.tanh(b.mul(b.matmul(x, w), b.param("s", np.full(width, scale, np.float32))))
    return b.build(x)


def test_kernels_alike_but_for_names_share_a_key_and_others_do_not(rng):
    calls = lower_graph(_two_blocks(rng), "blocks").cpu_calls
    keys = [code_key(c.kernel) for c in calls]
    assert len(keys) == 3 and keys[0] == keys[1] != keys[2]  # the third block is 16 wide
    other = lower_graph(_two_blocks(rng, scale=2.0), "blocks").cpu_calls
    assert [code_key(c.kernel) for c in other] == keys  # weights and scales are buffers, not code
    unfused = [code_key(c.kernel) for c in lower_graph(_two_blocks(rng), "blocks", fuse=False).cpu_calls]
    assert len(unfused) == 9 and unfused[:3] == unfused[3:6] and len(set(unfused)) == 6
    module = cpu.build_module([c.kernel for c in calls], "blocks")
    assert len([f for f in module.functions if f.name.endswith(".body")]) == 2
    assert {f.name for f in module.functions if not f.name.endswith(".body")} >= {
        f"blocks_{c.kernel.name}" for c in calls
    }


def test_a_shared_kernel_runs_on_each_call_s_own_buffers(rng):
    graph = _two_blocks(rng)
    model = compile_model(graph, name="blocks", fuse=False)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    (expected,) = interpret(graph, [x])
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
