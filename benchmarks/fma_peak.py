"""This CPU's float32 FMA peak, measured: the roof that benchmarks/ops.py reports against.

    python benchmarks/fma_peak.py

A loop of CHAINS independent fused multiply-add chains on the widest vectors LLVM
targets here (AVX-512: 16 floats; <8 x float> and <4 x float> for comparison),
JIT-compiled with llvmlite for this CPU. Enough chains that each FMA's latency hides
behind the others (latency x FMA units per core: 4 x 2 on current x86, so 12 is
ample), no loads or stores in the loop, so the only limit is how many FMAs a core
retires per cycle. Each thread runs the loop on its own core (ctypes releases the
GIL); GFLOP/s = 2 x lanes x chains x iterations / median time, summed over threads.
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


def peak_gflops(threads: int = 1, lanes: int = 16, repeats: int = 9) -> tuple[float, float, float]:
    """(median, min, max) GFLOP/s of `threads` threads each running the FMA loop at once."""
    fn = kernel(lanes)
    fn(ITERATIONS // 8)  # warm-up: clocks up, code paged in
    flops = 2 * lanes * CHAINS * ITERATIONS * threads
    rates = []
    for _ in range(repeats):
        start = threading.Barrier(threads + 1)

        def work(start: threading.Barrier = start) -> None:
            start.wait()
            fn(ITERATIONS)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    print(f"CPU {llvm.get_host_cpu_name() if _engine() else ''}, {CHAINS} FMA chains, float32")
    print(f"{'vector':>12} {'threads':>7} {'GFLOP/s median':>15} {'min':>7} {'max':>7}")
    for lanes in (16, 8, 4):
        for threads in (1, 2):
            med, lo, hi = peak_gflops(threads, lanes)
            print(f"{f'<{lanes} x float>':>12} {threads:>7} {med:>15.1f} {lo:>7.1f} {hi:>7.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
