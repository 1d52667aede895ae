"""GPU kernels in the kernel IR: the shape every GPU-scheduled kernel has.

A GPU kernel's body is its grid: GPU_BLOCK loops, one per grid axis it uses (x, then
y, then z, each the only statement of the one before), holding GPU_THREAD loops the
same way (the block's axes), holding the body one thread runs. Inside it, a thread
may use shared buffers (one per block), Barrier and Shuffle. The NVPTX backend binds
the loops to CUDA's block and thread indices; the cuda-sim transformation
(codegen.gpu_sim) runs the same kernel on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from math import prod

from codegen import kir
from codegen.kir import LoopKind


@dataclass
class GpuLayout:
    grid: tuple[int, ...]  # blocks per axis (x, y, z as used)
    block: tuple[int, ...]  # threads per axis
    block_vars: list[kir.Var]
    thread_vars: list[kir.Var]
    body: list[kir.Stmt]  # what one thread runs

    @property
    def threads(self) -> int:
        return prod(self.block)

    @property
    def launch(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(grid, block) padded to three axes, as cuLaunchKernel takes them."""
        pad = lambda dims: (*dims, *(1,) * (3 - len(dims)))  # noqa: E731
        return pad(self.grid), pad(self.block)


def layout(kernel: kir.Kernel) -> GpuLayout:
    """The grid, the block and the thread body of a GPU kernel; an error names what in
    the kernel breaks the shape."""
    grid: list[int] = []
    block: list[int] = []
    bvars: list[kir.Var] = []
    tvars: list[kir.Var] = []
    body = kernel.body
    for kind, dims, names in ((LoopKind.GPU_BLOCK, grid, bvars), (LoopKind.GPU_THREAD, block, tvars)):
        while len(body) == 1 and isinstance(body[0], kir.Loop) and body[0].kind is kind:
            loop = body[0]
            if loop.axis != len(dims) or not isinstance(loop.extent, kir.Const):
                raise ValueError(
                    f"kernel {kernel.name}: {kind.value} loops must run x, y, z with constant extents"
                )
            dims.append(int(loop.extent.value))
            names.append(loop.var)
            body = loop.body
        if not dims:
            raise ValueError(f"kernel {kernel.name} is not a GPU kernel: it has no {kind.value} loop")
    return GpuLayout(tuple(grid), tuple(block), bvars, tvars, body)


def is_gpu_kernel(kernel: kir.Kernel) -> bool:
    body = kernel.body
    return len(body) == 1 and isinstance(body[0], kir.Loop) and body[0].kind is LoopKind.GPU_BLOCK


@contextmanager
def grid(
    k: kir.KernelBuilder, blocks: Sequence[int], threads: Sequence[int]
) -> Iterator[tuple[list[kir.Var], list[kir.Var]]]:
    """A GPU launch of `blocks` (per grid axis) blocks of `threads` (per block axis)
    threads; the body written inside is one thread's. Yields (block indices, thread
    indices), x first."""
    with ExitStack() as stack:
        bvars = [
            stack.enter_context(k.loop(n, LoopKind.GPU_BLOCK, "bid" + "xyz"[axis], axis=axis))
            for axis, n in enumerate(blocks)
        ]
        tvars = [
            stack.enter_context(k.loop(n, LoopKind.GPU_THREAD, "tid" + "xyz"[axis], axis=axis))
            for axis, n in enumerate(threads)
        ]
        yield bvars, tvars
