"""GPU kernels in the kernel IR: the shape every GPU-scheduled kernel has.

A GPU kernel's body is its grid: GPU_BLOCK loops, one per grid axis it uses (x, then
y, then z, each the only statement of the one before), holding GPU_THREAD loops the
same way (the block's axes), holding the body one thread runs. Inside it, a thread
may use shared buffers (one per block), Barrier and Shuffle. The NVPTX backend binds
the loops to CUDA's block and thread indices; the cuda-sim transformation
(codegen.gpu_sim) runs the same kernel on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def per_iteration(k: kir.KernelBuilder, cpu: kir.Kernel, threads: int = 256) -> None:
    """Emit into k a GPU kernel that runs each iteration of cpu's parallel loop as one
    thread (blocks of `threads`, the last one guarded): for loop nests whose parallel
    iterations are independent and small (a row of a pooling, a gather)."""
    loop = cpu.parallel_loop
    if loop is None:
        raise ValueError(f"kernel {cpu.name}: no single parallel loop to spread over GPU threads")
    n = int(loop.extent.value)  # type: ignore[union-attr]
    with grid(k, (-(-n // threads),), (threads,)) as ((b,), (t,)):
        index = b * threads + t
        body = kir.substitute_stmts(loop.body, {loop.var: index})
        k.splice(kir.Kernel(cpu.name, [], [kir.If(index.lt(n), body)], cpu.checks, cpu.scratch, cpu.shared))


def block_total(
    k: kir.KernelBuilder, value: kir.Expr, combine: Callable[[kir.Expr, kir.Expr], kir.Expr], threads: int,
    thread: kir.Expr,
) -> kir.Expr:  # fmt: skip
    """value combined over the `threads` threads of the block (a power of two, or a
    multiple of the warp): within each warp by butterfly shuffles, then across warps
    through shared memory. Every thread gets the total; all must call it together."""
    total = k.local(value.dtype, value, "part")
    offset = min(threads, kir.WARP) // 2
    while offset:
        k.assign(total, combine(total.ref, k.shuffle(total.ref, kir.ShuffleMode.XOR, offset)))
        offset //= 2
    if threads <= kir.WARP:
        return total.ref
    warps = threads // kir.WARP
    per_warp = k.shared("warp_totals", value.dtype, (warps,))
    with k.when((thread % kir.WARP).eq(0)):
        k.store(per_warp, thread // kir.WARP, total.ref)
    k.barrier()
    k.assign(total, per_warp.load_flat(kir.const(0, "int64")))
    for w in range(1, warps):
        k.assign(total, combine(total.ref, per_warp.load_flat(kir.const(w, "int64"))))
    k.barrier()  # every thread has read the totals before any reuses the buffer
    return total.ref


#: threads per block of the simple schedules, and the most blocks a grid-stride loop uses
THREADS = 256
MAX_BLOCKS = 4096


def blocks_for(n: int, threads: int = THREADS) -> int:
    """Blocks for a grid-stride loop over n elements: enough to fill the GPU, no more."""
    return max(1, min(-(-n // threads), MAX_BLOCKS))


@contextmanager
def stride_over(
    k: kir.KernelBuilder, n: int, block: kir.Expr, thread: kir.Expr, blocks: int, threads: int = THREADS
) -> Iterator[kir.Expr]:
    """Inside a grid of `blocks` blocks of `threads` threads: each flat index below n,
    given to one thread (consecutive threads, consecutive indices: coalesced)."""
    with k.loop(-(-n // (blocks * threads)), LoopKind.SERIAL, "stride") as s:
        i = (s * blocks + block) * threads + thread
        with k.when(i.lt(n)):
            yield i
