"""Graph nodes → kernel IR. One kernel per group of nodes (for now, one node a group).

Elementwise ops are lowered here from their `scalar` rule: a flat loop when every
operand has the output's shape, otherwise a loop nest where broadcast axes index
element 0. Every other op writes its own loop nest (`Op.lower`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from codegen import kir
from ir.graph import Node, Value
from ir.ops import ElementwiseOp

#: below this much work (statements executed, see kir.estimate_work) a kernel is not
#: worth waking the thread pool for
PARALLEL_MIN_WORK = 1 << 15


@dataclass
class KernelCall:
    """A kernel and the graph values bound to its buffer parameters, in order."""

    kernel: kir.Kernel
    values: list[Value]

    @property
    def parallel(self) -> bool:
        loop = self.kernel.parallel_loop
        return loop is not None and self.extent > 1 and self.kernel.work >= PARALLEL_MIN_WORK

    @property
    def extent(self) -> int:
        loop = self.kernel.parallel_loop
        return int(loop.extent.value) if loop is not None else 1  # type: ignore[union-attr]


def _c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def lower_elementwise(
    k: kir.KernelBuilder, op: ElementwiseOp, ins: list[kir.Buffer], out: kir.Buffer
) -> None:
    if all(b.shape == out.shape for b in ins):
        with k.flat(out.numel) as i:
            k.store(out, i, op.scalar(kir.ExprBuilder(), *(b.load_flat(i) for b in ins)))
        return
    rank = len(out.shape)
    with k.nest(out.shape) as idx:
        loads = []
        for b in ins:
            lead = rank - len(b.shape)
            loads.append(
                b[[0 if d == 1 else idx[lead + a] for a, d in enumerate(b.shape)]]
                if b.shape
                else b.load_flat(kir.const(0, "int64"))
            )
        k.store(out, idx, op.scalar(kir.ExprBuilder(), *loads))


def lower_node(node: Node, index: int, flat_block: int = 4096) -> KernelCall:
    values: list[Value] = []
    buffers: dict[Value, kir.Buffer] = {}
    for v in [*node.inputs, *node.outputs]:
        if v not in buffers:
            buffers[v] = kir.Buffer(_c_name(v.name), v.type.dtype, v.type.shape)
            values.append(v)
    ins = [buffers[v] for v in node.inputs]
    out = buffers[node.outputs[0]]
    k = kir.KernelBuilder(f"k{index}_{node.op.name}", [buffers[v] for v in values], flat_block)
    if isinstance(node.op, ElementwiseOp):
        lower_elementwise(k, node.op, ins, out)
    else:
        node.op.lower(k, ins, out)
    return KernelCall(k.finish(), values)


def copy_call(src: Value, dst: Value, index: int) -> KernelCall:
    """A kernel that copies src into dst (a graph output that is an input, a param or a repeat)."""
    a = kir.Buffer("src", src.type.dtype, src.type.shape)
    b = kir.Buffer("dst", dst.type.dtype, dst.type.shape)
    k = kir.KernelBuilder(f"k{index}_copy", [a, b])
    with k.flat(a.numel) as i:
        k.store(b, i, a.load_flat(i))
    return KernelCall(k.finish(), [src, dst])
