"""The NVPTX backend (thin slice): kernel IR → LLVM IR with NVVM intrinsics → PTX.

`bind_gpu` schedules a kernel for the GPU: its parallel loop over n becomes a grid
of ceil(n / threads) blocks of `threads` threads, each doing one iteration when
its global index is below n. The bound kernel is still plain kernel IR, so the CPU
backend runs it too (block and thread indices as loop variables): that is how GPU
kernels are checked for correctness on machines with no GPU. `ptx_module` turns
bound kernels into one PTX module, which `ptxas` must accept.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import llvmlite.binding as llvm
from llvmlite import ir

from codegen import kir
from codegen.llvm_emit import I32, I64, PTR, FunctionWriter, loop_metadata
from ir.errors import CompileError, UnsupportedError

TRIPLE = "nvptx64-nvidia-cuda"
DEFAULT_ARCH = "sm_80"


def bind_gpu(kernel: kir.Kernel, threads: int = 256) -> kir.Kernel:
    loop = kernel.parallel_loop
    if loop is None:
        raise UnsupportedError(f"kernel {kernel.name}: only kernels with a parallel loop map to the GPU")
    n = int(loop.extent.value)  # type: ignore[union-attr]
    block, thread = kir.Var(f"{loop.var.name}_block"), kir.Var(f"{loop.var.name}_thread")
    index = block * threads + thread
    body = kir.substitute_stmts(loop.body, {loop.var: index})
    guarded = kir.If(index.lt(n), body)
    inner = kir.Loop(thread, kir.Const(threads, "int64"), kir.LoopKind.GPU_THREAD, [guarded])
    outer = kir.Loop(block, kir.Const(-(-n // threads), "int64"), kir.LoopKind.GPU_BLOCK, [inner])
    return kir.Kernel(kernel.name, kernel.params, [outer])


def launch_dims(kernel: kir.Kernel) -> tuple[int, int]:
    """(blocks, threads per block) of a bound kernel."""
    outer = kernel.body[0]
    assert isinstance(outer, kir.Loop) and outer.kind is kir.LoopKind.GPU_BLOCK
    inner = outer.body[0]
    assert isinstance(inner, kir.Loop) and inner.kind is kir.LoopKind.GPU_THREAD
    return int(outer.extent.value), int(inner.extent.value)  # type: ignore[union-attr]


@functools.cache
def _target_machine(arch: str) -> llvm.TargetMachine:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    return llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=arch, opt=3)


_SREG = {
    kir.LoopKind.GPU_BLOCK: "llvm.nvvm.read.ptx.sreg.ctaid.x",
    kir.LoopKind.GPU_THREAD: "llvm.nvvm.read.ptx.sreg.tid.x",
}


def _emit(module: ir.Module, kernel: kir.Kernel) -> None:
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * len(kernel.params)), kernel.name)
    fn.calling_convention = "ptx_kernel"

    def loop_hook(w: FunctionWriter, loop: kir.Loop) -> bool:
        if loop.kind not in _SREG:
            return False
        reg = module.globals.get(_SREG[loop.kind]) or ir.Function(
            module, ir.FunctionType(I32, []), _SREG[loop.kind]
        )
        w.bind(loop.var, w.b.zext(w.b.call(reg, []), I64))
        w.stmts(loop.body)
        return True

    writer = FunctionWriter(fn, dict(zip(kernel.params, fn.args)), loop_hook, kernel.scratch)
    writer.stmts(kernel.body)
    writer.finish()


def ptx_module(kernels: list[kir.Kernel], arch: str = DEFAULT_ARCH) -> str:
    """One PTX module holding every kernel (each must be bound with bind_gpu)."""
    tm = _target_machine(arch)
    module = ir.Module(name="kiln_gpu")
    module.triple = TRIPLE
    module.data_layout = str(tm.target_data)
    for k in kernels:
        launch_dims(k)
        _emit(module, k)
    mod = llvm.parse_assembly(loop_metadata(str(module)))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    ptx = tm.emit_assembly(mod)
    if "pow" in ptx and ".extern .func" in ptx:
        raise UnsupportedError("pow has no GPU lowering yet (it calls libm)")
    return ptx


def ptxas_check(ptx: str, arch: str = DEFAULT_ARCH) -> str:
    """Assemble with ptxas (must be on PATH); returns its report, raises on rejection."""
    exe = shutil.which("ptxas")
    if exe is None:
        raise CompileError("ptxas not found: install it (pip install nvidia-cuda-nvcc) to check PTX")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernels.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [exe, f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        raise CompileError(f"ptxas rejected the PTX:\n{result.stderr}")
    return result.stderr
