"""The CPU backend: kernels → one LLVM module → an object file for the host CPU.

Every kernel becomes `void PREFIX_NAME(void *const *bufs, int64_t begin, int64_t end)`.
`bufs` holds the kernel's buffer pointers in parameter order. A kernel whose body is
one parallel loop runs iterations [begin, end) of it, so the library's thread pool
hands each thread a slice; any other kernel runs whole when called with (0, 1).
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir

from codegen import kir
from codegen.llvm_emit import I64, PTR, FunctionWriter, loop_metadata


@functools.cache
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


@functools.cache
def target_machine(cpu_name: str | None = None) -> llvm.TargetMachine:
    """A TargetMachine for `cpu_name` (an LLVM CPU such as "x86-64-v3"), or for this
    CPU with all its features (AVX-512 where present) when None."""
    _init_llvm()
    target = llvm.Target.from_default_triple()
    host = cpu_name is None
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name() if host else cpu_name,
        features=llvm.get_host_cpu_features().flatten() if host else "",
        opt=3,
        reloc="pic",
        codemodel="default",
    )


@functools.cache
def vector_unit(cpu_name: str | None = None) -> kir.VectorUnit:
    """The vector registers LLVM uses for float32 on `cpu_name` (None: this CPU), found
    by compiling one 16-lane add and reading which registers it took: zmm (AVX-512: 16
    lanes, 32 registers), ymm (AVX2: 8 lanes, 16 registers), else 128-bit vectors (4
    lanes; 32 registers on AArch64, 16 on x86-64). LLVM's own tuning decides, so a CPU
    where it prefers 256-bit vectors despite AVX-512 gets the AVX2 unit."""
    module = llvm.parse_assembly(
        "define void @probe(<16 x float>* %p) {\n"
        "  %v = load <16 x float>, <16 x float>* %p\n"
        "  %s = fadd <16 x float> %v, %v\n"
        "  store <16 x float> %s, <16 x float>* %p\n"
        "  ret void\n}\n"
    )
    asm = target_machine(cpu_name).emit_assembly(module)
    if "zmm" in asm:
        return kir.AVX512
    if "ymm" in asm:
        return kir.AVX2
    return kir.VectorUnit(4, 32 if llvm.get_default_triple().startswith("aarch64") else 16)


def target_id(cpu_name: str | None = None) -> str:
    """What the generated code depends on: the triple, the CPU and its features."""
    if cpu_name is not None:
        return f"{llvm.get_default_triple()}|{cpu_name}"
    return f"{llvm.get_default_triple()}|{llvm.get_host_cpu_name()}|{llvm.get_host_cpu_features().flatten()}"


def emit_kernel(module: ir.Module, kernel: kir.Kernel, symbol: str, libm: bool = True) -> ir.Function:
    """The kernel body takes each buffer as its own `noalias` pointer (a kernel's buffers
    are distinct values, which the memory plan keeps apart while they are live), so
    LLVM may keep loaded values in registers across stores; the exported entry point
    unpacks the `bufs` array the thread pool passes and calls it."""
    n = len(kernel.params)
    body_fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * n + [I64, I64]), f"{symbol}.body")
    body_fn.linkage = "internal"
    for arg in body_fn.args[:n]:
        arg.add_attribute("noalias")
    begin, end = body_fn.args[n], body_fn.args[n + 1]
    parallel = kernel.parallel_loop

    def loop_hook(w: FunctionWriter, loop: kir.Loop) -> bool:
        if loop is not parallel:
            return False
        w.counted_loop(loop.var, begin, end, loop.body, loop.kind)
        return True

    pointers = dict(zip(kernel.params, body_fn.args[:n]))
    writer = FunctionWriter(body_fn, pointers, loop_hook, kernel.scratch, libm=libm)
    if parallel is None:
        # run once, on the call with begin == 0
        with writer.b.if_then(writer.b.icmp_signed("==", begin, ir.Constant(I64, 0))):
            writer.stmts(kernel.body)
    else:
        writer.stmts(kernel.body)
    writer.finish()

    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]), symbol)
    fn.visibility = "hidden"
    bufs, fbegin, fend = fn.args
    b = ir.IRBuilder(fn.append_basic_block())
    pointers = [
        b.load(b.gep(bufs, [ir.Constant(I64, i)], inbounds=True, source_etype=PTR), typ=PTR, name=buf.name)
        for i, buf in enumerate(kernel.params)
    ]
    b.call(body_fn, [*pointers, fbegin, fend])
    b.ret_void()
    return fn


def build_module(
    kernels: list[kir.Kernel], prefix: str, cpu_name: str | None = None, libm: bool = True
) -> ir.Module:
    """One module of the kernels' entry points. libm=False computes float64 math inline
    as a GPU does (codegen.mathlib), so a simulated GPU kernel rounds as the real one."""
    module = ir.Module(name=prefix)
    tm = target_machine(cpu_name)
    module.triple = tm.triple
    module.data_layout = str(tm.target_data)
    for kernel in kernels:
        emit_kernel(module, kernel, f"{prefix}_{kernel.name}", libm)
    return module


def optimize(module: ir.Module, cpu_name: str | None = None) -> llvm.ModuleRef:
    """Parse, verify and run LLVM's O3 pipeline (with loop and SLP vectorization)."""
    tm = target_machine(cpu_name)
    mod = llvm.parse_assembly(loop_metadata(str(module)))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def object_code(mod: llvm.ModuleRef, cpu_name: str | None = None) -> bytes:
    return target_machine(cpu_name).emit_object(mod)


def assembly(mod: llvm.ModuleRef, cpu_name: str | None = None) -> str:
    return target_machine(cpu_name).emit_assembly(mod)
