"""From groups to a program over storage: the steps between fusion and kernel lowering.

- `schedule_kernels`: the kernels in order, what each reads and stores, the views,
  and where each graph output ends up (written in place by its kernel, or copied);
- `in_place_candidates`: which outputs may take the bytes of an input (the policy);
- `pack_weights`: the params laid out in one aligned blob, embedded in the library;
- `Storage`: where every value lives once memory is planned (an input, an output,
  the weights or the arena) and the kernel-IR buffer that stands for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from codegen import kir
from codegen.cabi import ALIGN, BufferRef, Space
from compiler.fusion import Group, GroupKind, stored_values
from compiler.lowering import c_name, writes_in_place
from compiler.memory import InPlace, MemoryPlan
from ir.graph import Graph, Value


@dataclass
class Schedule:
    """Kernels in the order they run. reads[t] and writes[t]: the values kernel t reads
    and stores; copies run after the kernels, each (source, output slot)."""

    kernels: list[Group]
    reads: list[list[Value]]
    writes: list[list[Value]]
    views: list[tuple[Value, Value]]  # (view, the value it views)
    slots: list[Value]  # the value each graph output's buffer holds, in output order
    copies: list[tuple[Value, Value]] = field(default_factory=list)

    def steps(self) -> list[list[Value]]:
        """Every step's values, kernels then copies: what liveness is computed from."""
        return [r + w for r, w in zip(self.reads, self.writes)] + [[s, d] for s, d in self.copies]

    def step_io(self) -> list[tuple[list[Value], list[Value]]]:
        """(reads, writes) of every step, kernels then copies."""
        return [*zip(self.reads, self.writes), *(([s], [d]) for s, d in self.copies)]


def schedule_kernels(graph: Graph, groups: list[Group]) -> Schedule:
    users, outputs = graph.consumers(), set(graph.outputs)
    kernels = [g for g in groups if g.kind is not GroupKind.VIEW]
    views = [(g.tail, g.nodes[0].inputs[0]) for g in groups if g.kind is GroupKind.VIEW]
    reads, writes = [], []
    for g in kernels:
        produced = g.produced()
        reads.append(list(dict.fromkeys(v for n in g.nodes for v in n.inputs if v not in produced)))
        writes.append(stored_values(g, users, outputs))
    schedule = Schedule(kernels, reads, writes, views, [])
    # a graph output is written in place by its kernel, or copied (an input, a param, a
    # view, or an output that repeats another)
    produced_by_kernel = {v for g in kernels for v in g.produced()}
    for v in graph.outputs:
        if v in produced_by_kernel and v not in schedule.slots:
            schedule.slots.append(v)
        else:
            slot = Value(v.name, v.type)
            schedule.slots.append(slot)
            schedule.copies.append((v, slot))
    return schedule


def in_place_candidates(schedule: Schedule) -> list[InPlace]:
    """Only a one-pass elementwise kernel may write over what it reads, and only over an
    input of its own shape and dtype: a rows kernel reads its inputs again after it
    stores, a contraction accumulates in its output."""
    out = []
    for t, (g, reads, writes) in enumerate(zip(schedule.kernels, schedule.reads, schedule.writes)):
        if writes_in_place(g):
            full = [x for x in reads if x.type.shape == g.shape]
            out += [InPlace(t, y, [x for x in full if x.type.dtype == y.type.dtype]) for y in writes]
    return out


def pack_weights(params: dict[Value, np.ndarray]) -> tuple[bytes, dict[Value, int]]:
    """The params in one blob, each at an ALIGN-byte boundary, and their offsets."""
    blob, offsets = bytearray(), {}
    for v, array in params.items():
        offsets[v] = len(blob)
        blob += np.ascontiguousarray(array).tobytes()
        blob += bytes(-len(blob) % ALIGN)
    return bytes(blob), offsets


class Storage:
    """Where each value lives: pinned to an input, an output or the weights, else at its
    storage class's offset in the arena; and the kernel-IR buffer naming those bytes
    (one buffer per storage class, viewed with each member's shape)."""

    def __init__(self, plan: MemoryPlan, pins: dict[Value, BufferRef]):
        self.plan = plan
        self.pinned = {plan.root.get(v, v): ref for v, ref in pins.items()}
        self.buffers: dict[Value, kir.Buffer] = {}

    def ref(self, v: Value) -> BufferRef:
        root = self.plan.root.get(v, v)
        return self.pinned.get(root) or BufferRef(Space.ARENA, self.plan.offsets[root])

    def buffer(self, v: Value) -> kir.Buffer:
        root = self.plan.root.get(v, v)
        if root not in self.buffers:
            self.buffers[root] = kir.Buffer(c_name(root.name), root.type.dtype, root.type.shape)
        base = self.buffers[root]
        return base if v.type.shape == base.shape else base.view(v.type.shape)


def pins(graph: Graph, schedule: Schedule, weight_offsets: dict[Value, int]) -> dict[Value, BufferRef]:
    """The values whose bytes the caller or the library owns: inputs, weights, outputs."""
    out = {v: BufferRef(Space.INPUT, i) for i, v in enumerate(graph.inputs)}
    out |= {v: BufferRef(Space.WEIGHTS, o) for v, o in weight_offsets.items()}
    out |= {v: BufferRef(Space.OUTPUT, j) for j, v in enumerate(schedule.slots)}
    return out
