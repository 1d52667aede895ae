"""What `kiln inspect` and `kiln bench` print about a lowered program: its kernels (ops,
shapes, estimated FLOPs and bytes), its memory plan, and a Graphviz picture."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from codegen import nvptx
from codegen.kir_print import kernel_text
from compiler.driver import Lowered
from ir.ops.nn import ProductOp


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def kernels_table(lowered: Lowered, with_ir: bool = False) -> str:
    ops = sum(len(c.nodes) for c in lowered.calls)
    lines = [
        f"{len(lowered.calls)} kernels ({ops} ops):",
        f"  {'kernel':<36} {'output':<22} {'MFLOP':>9} {'MB':>9}  launch",
    ]
    for call, launch in zip(lowered.cpu_calls, lowered.library.launches):
        out = call.nodes[-1].outputs[0].type if call.nodes else None
        shape = str(out) if out is not None else "copy"
        mode = f"parallel x{launch.extent}" if launch.parallel else "serial"
        lines.append(
            f"  {call.kernel.name:<36} {shape:<22} {call.kernel.flops / 1e6:>9.3f} "
            f"{_mb(call.kernel.bytes):>9}  {mode}"
        )
    total_flops = sum(c.kernel.flops for c in lowered.calls)
    total_bytes = sum(c.kernel.bytes for c in lowered.calls)
    lines.append(f"  {'total':<36} {'':<22} {total_flops / 1e6:>9.3f} {_mb(total_bytes):>9}")
    if with_ir:
        for call in lowered.calls:
            lines += ["", kernel_text(call.kernel)]
    return "\n".join(lines)


def memory_table(lowered: Lowered) -> str:
    plan = lowered.plan
    lines = [f"  {'offset':>10} {'bytes':>10}  value (class members)"]
    classes: dict = {}
    for v, root in plan.root.items():
        classes.setdefault(root, []).append(v)
    for root, offset in sorted(plan.offsets.items(), key=lambda kv: kv[1]):
        size = max(v.type.nbytes for v in classes[root])
        names = ", ".join(sorted(v.name for v in classes[root]))
        lines.append(f"  {offset:>10} {size:>10}  {names}")
    return "\n".join(lines)


NEWLINE = "\\n"  # Graphviz's line break inside a label


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def dot_source(lowered: Lowered) -> str:
    """The simplified graph with each kernel's nodes drawn inside one cluster."""
    lines = ["digraph kiln {", "  rankdir=TB; node [shape=box, fontsize=10];"]
    for v in lowered.graph.inputs:
        label = _q(v.name + NEWLINE + str(v.type))
        lines.append(f"  {_q('v:' + v.name)} [label={label}, shape=ellipse];")
    for i, call in enumerate(lowered.calls):
        lines.append(f"  subgraph cluster_{i} {{ label={_q(call.kernel.name)}; style=rounded;")
        for n in call.nodes:
            label = _q(n.op.name + NEWLINE + str(n.outputs[0].type))
            lines.append(f"    {_q('n:' + n.name)} [label={label}];")
        lines.append("  }")
    in_kernels = {n for call in lowered.calls for n in call.nodes}
    for n in lowered.graph.nodes:
        if n not in in_kernels:  # a view: no kernel, its input's bytes
            label = _q(n.op.name + " (view)" + NEWLINE + str(n.outputs[0].type))
            lines.append(f"  {_q('n:' + n.name)} [label={label}, style=dashed];")
    producer = {n.outputs[0]: n for n in lowered.graph.nodes}
    for n in lowered.graph.nodes:
        for v in n.inputs:
            if v in producer:
                lines.append(f"  {_q('n:' + producer[v].name)} -> {_q('n:' + n.name)};")
            elif v not in lowered.graph.params:
                lines.append(f"  {_q('v:' + v.name)} -> {_q('n:' + n.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(path: Path) -> Path | None:
    """path.svg from Graphviz's dot, when it is installed."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    svg = path.with_suffix(".svg")
    subprocess.run([dot, "-Tsvg", str(path), "-o", str(svg)], check=True, capture_output=True)
    return svg


@dataclass(frozen=True)
class GpuSummary:
    """A GPU build at a glance: per architecture, the kernels' registers, shared memory
    and spills as ptxas reports them, and the share of the FLOPs in tiled products."""

    kernels: int
    resources: dict[str, dict[str, nvptx.Resources]]  # arch → kernel → ptxas's report
    product_flop_share: float

    def totals(self, arch: str) -> tuple[int, int, int]:
        """(registers, shared bytes, spill bytes) summed over the kernels."""
        rs = self.resources[arch].values()
        return sum(r.registers for r in rs), sum(r.shared_bytes for r in rs), sum(r.spill_bytes for r in rs)


def gpu_summary(lowered: Lowered) -> GpuSummary:
    """Assemble every architecture's PTX with ptxas (which must be installed) and gather
    its report."""
    from compiler.driver import gpu_modules

    found = {arch: nvptx.resources(nvptx.ptxas(ptx, arch)) for arch, ptx in gpu_modules(lowered).items()}
    flops = [c.kernel.flops for c in lowered.calls]
    in_products = sum(
        f for c, f in zip(lowered.calls, flops) if any(isinstance(n.op, ProductOp) for n in c.nodes)
    )
    return GpuSummary(len(lowered.calls), found, in_products / max(sum(flops), 1))


def gpu_table(lowered: Lowered) -> str:
    """Per kernel and architecture: registers, shared memory, spills (what `kiln inspect
    --target cuda` prints, so a change that makes a kernel spill is seen)."""
    summary = gpu_summary(lowered)
    archs = list(summary.resources)
    head = "".join(f" {arch + ' regs':>12} {'smem':>7} {'spill':>6}" for arch in archs)
    lines = [f"GPU kernels ({summary.kernels}), as ptxas reports them:", f"  {'kernel':<44}{head}"]
    for call in lowered.calls:
        name = call.kernel.name
        cells = "".join(
            f" {r.registers:>12} {r.shared_bytes:>7} {r.spill_bytes:>6}"
            for r in (summary.resources[arch][name] for arch in archs)
        )
        lines.append(f"  {name:<44}{cells}")
    totals = "".join(" {:>12} {:>7} {:>6}".format(*summary.totals(arch)) for arch in archs)
    lines.append(f"  {'total':<44}{totals}")
    lines.append(f"  {summary.product_flop_share:.1%} of the FLOPs in tiled products")
    return "\n".join(lines)
