"""The NVPTX backend: GPU kernels (codegen.gpu) → LLVM IR with NVVM intrinsics → PTX.

Each kernel becomes a `ptx_kernel` function taking one pointer per buffer. Its block
and thread loops bind their variables to CUDA's ctaid / tid registers (the launch
makes the loops); shared buffers are `addrspace(3)` globals of the module; a Barrier
is `bar.sync 0`; a Shuffle is `shfl.sync` over the full warp (64-bit values as two
32-bit halves). `ptx_module` writes one module per architecture and refuses any PTX
that calls an outside function (a libm call, a misspelled intrinsic): ptxas would
reject it, and a GPU has no libm.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm
from llvmlite import ir

from codegen import gpu, kir
from codegen.llvm_emit import I1, I32, I64, MEM_TYPES, PTR, REG_TYPES, FunctionWriter, loop_metadata
from ir.errors import CompileError, UnsupportedError

TRIPLE = "nvptx64-nvidia-cuda"
ARCHS = ("sm_80", "sm_90")
DEFAULT_ARCH = "sm_80"
SHARED = 3  # the address space of shared memory
FULL_WARP = 0xFFFFFFFF


@functools.cache
def _target_machine(arch: str) -> llvm.TargetMachine:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    return llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=arch, opt=3)


def _intrinsic(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    existing = module.globals.get(name)
    return existing if existing is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _index(w: FunctionWriter, register: str, axis: int) -> ir.Value:
    reg = _intrinsic(w.module, f"llvm.nvvm.read.ptx.sreg.{register}.{'xyz'[axis]}", I32, [])
    return w.b.zext(w.b.call(reg, []), I64)


def _shuffle(w: FunctionWriter, s: kir.Shuffle) -> None:
    b = w.b
    value = w.expr(s.value)
    mode = {kir.ShuffleMode.XOR: "bfly", kir.ShuffleMode.DOWN: "down"}[s.mode]

    def shfl32(v: ir.Value) -> ir.Value:
        suffix = "f32" if v.type == REG_TYPES["float32"] else "i32"
        fn = _intrinsic(w.module, f"llvm.nvvm.shfl.sync.{mode}.{suffix}", v.type, [I32, v.type, I32, I32])
        return b.call(
            fn, [ir.Constant(I32, FULL_WARP), v, ir.Constant(I32, s.offset), ir.Constant(I32, 0x1F)]
        )

    dtype = s.value.dtype
    if dtype in ("float32", "int32"):
        result = shfl32(value)
    elif dtype == "bool":
        result = b.trunc(shfl32(b.zext(value, I32)), I1)
    else:  # 64 bits: the two halves
        bits = b.bitcast(value, I64) if dtype == "float64" else value
        lo = shfl32(b.trunc(bits, I32))
        hi = shfl32(b.trunc(b.lshr(bits, ir.Constant(I64, 32)), I32))
        joined = b.or_(b.shl(b.zext(hi, I64), ir.Constant(I64, 32)), b.zext(lo, I64))
        result = b.bitcast(joined, REG_TYPES["float64"]) if dtype == "float64" else joined
    w.declare(s.local, result)


def _emit(module: ir.Module, kernel: kir.Kernel) -> None:
    gpu.layout(kernel)  # the shape a launch needs, or an error naming the kernel
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR] * len(kernel.params)), kernel.name)
    fn.calling_convention = "ptx_kernel"
    pointers = dict(zip(kernel.params, fn.args))
    for buf in kernel.shared:
        typ = ir.ArrayType(MEM_TYPES[buf.dtype], buf.numel)
        array = ir.GlobalVariable(module, typ, f"{kernel.name}.{buf.name}", addrspace=SHARED)
        array.linkage = "internal"
        array.align = 16
        array.initializer = ir.Constant(typ, ir.Undefined)
        pointers[buf] = array.gep([ir.Constant(I32, 0), ir.Constant(I32, 0)])  # its first element

    def loop_hook(w: FunctionWriter, loop: kir.Loop) -> bool:
        register = {kir.LoopKind.GPU_BLOCK: "ctaid", kir.LoopKind.GPU_THREAD: "tid"}.get(loop.kind)
        if register is None:
            return False
        w.bind(loop.var, _index(w, register, loop.axis))
        w.stmts(loop.body)
        return True

    def stmt_hook(w: FunctionWriter, s: kir.Stmt) -> bool:
        if isinstance(s, kir.Barrier):
            w.b.call(_intrinsic(w.module, "llvm.nvvm.barrier0", ir.VoidType(), []), [])
        elif isinstance(s, kir.Shuffle):
            _shuffle(w, s)
        else:
            return False
        return True

    writer = FunctionWriter(fn, pointers, loop_hook, kernel.scratch, stmt_hook, libm=False)
    writer.stmts(kernel.body)
    writer.finish()


def ptx_module(kernels: list[kir.Kernel], arch: str = DEFAULT_ARCH, name: str = "kiln_gpu") -> str:
    """One PTX module holding every kernel (each a GPU kernel, see codegen.gpu)."""
    tm = _target_machine(arch)
    module = ir.Module(name=name)
    module.triple = TRIPLE
    module.data_layout = str(tm.target_data)
    for k in kernels:
        _emit(module, k)
    mod = llvm.parse_assembly(loop_metadata(str(module)))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    ptx = tm.emit_assembly(mod)
    _refuse_outside_calls(ptx)
    return ptx


_ENTRY = re.compile(r"\.entry\s+(\S+)\(")


def _refuse_outside_calls(ptx: str) -> None:
    """A `.extern .func` is a call a GPU cannot make (libm, an unknown intrinsic)."""
    externs = re.findall(r"\.extern \.func[^;]*?(\w[\w.$]*)\s*\(", ptx)
    if not externs:
        return
    entries = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)]
    callers = sorted(
        {
            name
            for f in externs
            for start, name in entries
            if re.search(rf"call[^;]*\b{re.escape(f)}\b", _body(ptx, start))
        }
    )
    raise UnsupportedError(
        f"kernel(s) {', '.join(callers) or '?'} call outside function(s) {', '.join(sorted(set(externs)))}, "
        "which a GPU cannot run (no libm there)"
    )


def _body(ptx: str, start: int) -> str:
    nxt = ptx.find(".entry", start + 1)
    return ptx[start : nxt if nxt > 0 else len(ptx)]


def ptxas(ptx: str, arch: str = DEFAULT_ARCH) -> str:
    """Assemble with ptxas (must be on PATH), warning on spills and local memory; returns
    its report (registers, shared memory, spills per kernel), raises on rejection."""
    exe = shutil.which("ptxas")
    if exe is None:
        raise CompileError("ptxas not found: install it (pip install nvidia-cuda-nvcc) to check PTX")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernels.ptx"
        src.write_text(ptx)
        result = subprocess.run(
            [exe, f"-arch={arch}", "-v", "--warn-on-spills", "--warn-on-local-memory-usage", str(src),
             "-o", str(Path(d) / "k.cubin")],
            capture_output=True,
            text=True,
        )  # fmt: skip
    if result.returncode != 0:
        raise CompileError(f"ptxas ({arch}) rejected the PTX:\n{result.stderr}")
    return result.stderr


@dataclass(frozen=True)
class Resources:
    """What ptxas reports of one kernel for one architecture."""

    registers: int
    shared_bytes: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int


_ENTRY_REPORT = re.compile(r"Compiling entry function '([^']+)'")
_NUMBERS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "shared_bytes": re.compile(r"(\d+) bytes smem"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def resources(report: str) -> dict[str, Resources]:
    """Each kernel's registers, shared memory, spills and stack from a `ptxas -v` report."""
    out = {}
    pieces = _ENTRY_REPORT.split(report)
    for name, text in zip(pieces[1::2], pieces[2::2]):
        found = {key: int(m.group(1)) if (m := pat.search(text)) else 0 for key, pat in _NUMBERS.items()}
        out[name] = Resources(
            found["registers"],
            found["shared_bytes"],
            found["spill_stores"] + found["spill_loads"],
            found["stack_bytes"],
        )
    return out
