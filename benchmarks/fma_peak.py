"""This CPU's float32 FMA peak, measured: the roof that benchmarks/ops.py reports against.

    python benchmarks/fma_peak.py

A loop of CHAINS independent fused multiply-add chains on the widest vectors LLVM
targets here (AVX-512: 16 floats; <8 x float> and <4 x float> for comparison),
JIT-compiled with llvmlite for this CPU. Enough chains that each FMA's latency hides
behind the others (latency x FMA units per core: 4 x 2 on current x86, so 12 is
ample), no loads or stores in the loop, so the only limit is how many FMAs a core
retires per cycle. Each thread runs the loop on its own core (ctypes releases the
GIL); GFLOP/s = 2 x lanes x chains x iterations / median time, summed over threads.

Beside it, the ceiling of a product's register tile (`tile_gflops`): the loop Kiln's
AVX-512 products and convolutions run, TILE_ROWS x 64 sums over TILE_DEPTH steps, each
step a broadcast of each row's input and four vectors of the panel, with every operand
in L1 (TILE_DEPTH x 64 floats of panel: 32 KiB) and the k loop unrolled by 4, as Kiln
emits it, compiled by the same LLVM. The broadcasts and loads share the core with the
FMAs, so this is what such a kernel can reach at best on this CPU; a kernel's share of
it says how much is left to its schedule, and its share of the FMA peak how much the
loop's shape costs.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import threading
import time
from functools import cache

import llvmlite.binding as llvm
from llvmlite import ir

#: independent accumulators: more than FMA latency x FMA ports, fewer than 32 registers
CHAINS = 12
#: loop iterations per timed call: about 15 ms at this CPU's peak, long beside a
#: thread's start (2 ms calls let one thread finish before the other began)
ITERATIONS = 1 << 23
#: the register tile of tile_gflops: rows x 64 columns (4 vectors of 16) over `depth` k
#: steps, unrolled by TILE_UNROLL (Kiln's AVX512_WIDE_ROWS, AVX512_MATMUL_K_UNROLL)
TILE_ROWS = 6
TILE_DEPTH = 128
TILE_UNROLL = 4
TILE_VECTORS = 4
#: passes over the tile's k steps per timed call (about 15 ms at the peak)
TILE_PASSES = 1 << 14


def _kernel_ir(lanes: int) -> str:
    """float fma_loop(int64 n): CHAINS accumulators, each acc = acc * a + b, n times."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, lanes)
    i64 = ir.IntType(64)
    module = ir.Module(name=f"fma{lanes}")
    fn = ir.Function(module, ir.FunctionType(f32, [i64]), "fma_loop")
    fma = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{lanes}f32")
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    # a slightly below 1 and b small keep the sums finite and denormal-free forever
    a = ir.Constant(vec, [0.999999] * lanes)
    c = ir.Constant(vec, [1e-6] * lanes)
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(i64, "i")
    accs = [b.phi(vec, f"acc{j}") for j in range(CHAINS)]
    new = [b.call(fma, [acc, a, c]) for acc in accs]
    nxt = b.add(i, ir.Constant(i64, 1))
    b.cbranch(b.icmp_signed("<", nxt, fn.args[0]), loop, done)
    i.add_incoming(ir.Constant(i64, 0), entry)
    i.add_incoming(nxt, loop)
    for j, (acc, n) in enumerate(zip(accs, new)):
        acc.add_incoming(ir.Constant(vec, [float(j)] * lanes), entry)
        acc.add_incoming(n, loop)
    b.position_at_end(done)
    total = new[0]
    for n in new[1:]:  # every chain is used, so none is dead code
        total = b.fadd(total, n)
    b.ret(b.extract_element(total, ir.Constant(ir.IntType(32), 0)))
    return str(module)


def _tile_ir() -> str:
    """void tile_loop(float *a, float *b, float *c, int64 passes): TILE_ROWS x 64 sums
    over TILE_DEPTH steps of a (rows x depth) and b (depth x 64), `passes` times, into c."""
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, 16)
    module = ir.Module(name="tile")
    ptr = f32.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ptr, ptr, ptr, i64]), "tile_loop")
    fma = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
    a, bp, c, passes = fn.args
    blocks = ("entry", "pass", "step", "pass_end", "done")
    entry, pass_, step, pass_end, done = (fn.append_basic_block(n) for n in blocks)
    b = ir.IRBuilder(entry)
    zero = ir.Constant(vec, [0.0] * 16)
    b.branch(pass_)
    b.position_at_end(pass_)
    p = b.phi(i64, "p")
    outer = [[b.phi(vec, f"sum{r}_{v}") for v in range(TILE_VECTORS)] for r in range(TILE_ROWS)]
    b.branch(step)
    b.position_at_end(step)
    k0 = b.phi(i64, "k")
    accs = [[b.phi(vec, f"acc{r}_{v}") for v in range(TILE_VECTORS)] for r in range(TILE_ROWS)]
    new = [list(row) for row in accs]
    lanes = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16)
    for u in range(TILE_UNROLL):
        k = b.add(k0, ir.Constant(i64, u))
        row = b.gep(bp, [b.mul(k, ir.Constant(i64, 16 * TILE_VECTORS))])
        panel = [
            b.load(b.bitcast(b.gep(row, [ir.Constant(i64, 16 * v)]), vec.as_pointer()), align=4)
            for v in range(TILE_VECTORS)
        ]
        for r in range(TILE_ROWS):
            x = b.load(b.gep(a, [b.add(ir.Constant(i64, r * TILE_DEPTH), k)]))
            one = b.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
            xs = b.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lanes)
            for v in range(TILE_VECTORS):
                new[r][v] = b.call(fma, [xs, panel[v], new[r][v]])
    k_next = b.add(k0, ir.Constant(i64, TILE_UNROLL))
    b.cbranch(b.icmp_signed("<", k_next, ir.Constant(i64, TILE_DEPTH)), step, pass_end)
    k0.add_incoming(ir.Constant(i64, 0), pass_)
    k0.add_incoming(k_next, step)
    for r in range(TILE_ROWS):
        for v in range(TILE_VECTORS):
            accs[r][v].add_incoming(outer[r][v], pass_)
            accs[r][v].add_incoming(new[r][v], step)
    b.position_at_end(pass_end)
    p_next = b.add(p, ir.Constant(i64, 1))
    b.cbranch(b.icmp_signed("<", p_next, passes), pass_, done)
    p.add_incoming(ir.Constant(i64, 0), entry)
    p.add_incoming(p_next, pass_end)
    for r in range(TILE_ROWS):
        for v in range(TILE_VECTORS):
            outer[r][v].add_incoming(zero, entry)
            outer[r][v].add_incoming(new[r][v], pass_end)
    b.position_at_end(done)
    for r in range(TILE_ROWS):  # every sum is stored, so none is dead code
        for v in range(TILE_VECTORS):
            at = b.gep(c, [ir.Constant(i64, (r * TILE_VECTORS + v) * 16)])
            b.store(new[r][v], b.bitcast(at, vec.as_pointer()), align=4)
    b.ret_void()
    return str(module)


@cache
def _engine() -> llvm.ExecutionEngine:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple()
    tm = target.create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    return llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)


@cache
def kernel(lanes: int):
    """The compiled fma_loop for vectors of `lanes` floats, as a ctypes function."""
    engine = _engine()
    mod = llvm.parse_assembly(_kernel_ir(lanes))
    mod.verify()
    engine.add_module(mod)
    engine.finalize_object()
    return ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_int64)(engine.get_function_address("fma_loop"))


@cache
def tile_kernel():
    """The compiled tile_loop, as a ctypes function."""
    engine = _engine()
    mod = llvm.parse_assembly(_tile_ir())
    mod.verify()
    engine.add_module(mod)
    engine.finalize_object()
    pointer = ctypes.POINTER(ctypes.c_float)
    signature = ctypes.CFUNCTYPE(None, pointer, pointer, pointer, ctypes.c_int64)
    return signature(engine.get_function_address("tile_loop"))


def _timed(threads: int, call, flops: float, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) GFLOP/s of `threads` threads each running call(thread) at once."""
    rates = []
    for _ in range(repeats):
        start = threading.Barrier(threads + 1)

        def work(t: int, start: threading.Barrier = start) -> None:
            start.wait()
            call(t)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        rates.append(flops * threads / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), min(rates), max(rates)


def tile_gflops(threads: int = 1, repeats: int = 9) -> tuple[float, float, float]:
    """(median, min, max) GFLOP/s of `threads` threads each running the register tile's
    loop over its own operands (small values, so the sums stay finite)."""
    fn = tile_kernel()
    cols = 16 * TILE_VECTORS
    buffers = []
    rows, depth = TILE_ROWS, TILE_DEPTH
    for _ in range(threads):
        a = (ctypes.c_float * (rows * depth))(*[1e-3 * (i % 7) for i in range(rows * depth)])
        b = (ctypes.c_float * (depth * cols))(*[1e-3 * (i % 5) for i in range(depth * cols)])
        buffers.append((a, b, (ctypes.c_float * (TILE_ROWS * cols))()))
    fn(*buffers[0], TILE_PASSES // 8)  # warm-up
    flops = 2.0 * TILE_ROWS * cols * TILE_DEPTH * TILE_PASSES
    return _timed(threads, lambda t: fn(*buffers[t], TILE_PASSES), flops, repeats)


def peak_gflops(threads: int = 1, lanes: int = 16, repeats: int = 9) -> tuple[float, float, float]:
    """(median, min, max) GFLOP/s of `threads` threads each running the FMA loop at once."""
    fn = kernel(lanes)
    fn(ITERATIONS // 8)  # warm-up: clocks up, code paged in
    return _timed(threads, lambda t: fn(ITERATIONS), 2.0 * lanes * CHAINS * ITERATIONS, repeats)


def main() -> None:
    print(f"CPU {llvm.get_host_cpu_name() if _engine() else ''}, {CHAINS} FMA chains, float32")
    print(f"{'vector':>12} {'threads':>7} {'GFLOP/s median':>15} {'min':>7} {'max':>7}")
    for lanes in (16, 8, 4):
        for threads in (1, 2):
            med, lo, hi = peak_gflops(threads, lanes)
            print(f"{f'<{lanes} x float>':>12} {threads:>7} {med:>15.1f} {lo:>7.1f} {hi:>7.1f}")
    print(f"\nA product's register tile, {TILE_ROWS} x 64 sums, operands in L1 (<16 x float>):")
    for threads in (1, 2):
        peak = peak_gflops(threads)[0]
        med, lo, hi = tile_gflops(threads)
        share = f"({med / peak:.0%} of the FMA peak)"
        print(f"{'tile':>12} {threads:>7} {med:>15.1f} {lo:>7.1f} {hi:>7.1f}  {share}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
