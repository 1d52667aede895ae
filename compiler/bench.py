"""Timing compiled models: what `kiln bench` and benchmarks/fusion.py report.

Fused and unfused builds of the same simplified graph run side by side in one
process, alternating in short blocks, so that machine noise hits both alike.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from compiler.driver import compile_model, lower_graph
from ir.graph import Graph


@dataclass
class BenchResult:
    median_ms: float
    p90_ms: float
    kernels: int
    bytes_moved: int  # estimated: every kernel's buffers read or written once
    mflop: float
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    weights_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


#: runs per mode before switching to the other: each instance's idle threads spin
#: briefly after a run, which would slow the other mode's next run
BLOCK = 5


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for v in graph.inputs:
        if v.type.dtype.startswith("float"):
            out.append(rng.standard_normal(v.type.shape).astype(v.type.np_dtype))
        elif v.type.dtype == "bool":
            out.append(rng.random(v.type.shape) < 0.5)
        else:
            out.append(rng.integers(0, 2, v.type.shape).astype(v.type.np_dtype))
    return out


def bench(
    graph: Graph,
    name: str,
    modes: tuple[bool, ...] = (True, False),
    threads: int | None = None,
    repeats: int = 50,
    min_seconds: float = 0.5,
    target: str = "cpu",
) -> dict[bool, BenchResult]:
    """Median and p90 latency of each mode (fuse=True/False), measured in alternation.
    For target cuda a run is what NAME_run does: copies in, kernels, copies out."""
    models = {
        fuse: compile_model(graph, name=f"{name}_{'fused' if fuse else 'unfused'}", fuse=fuse, target=target)
        for fuse in modes
    }
    if threads is not None:
        for m in models.values():
            m.set_num_threads(threads)
    feeds = random_inputs(graph)
    outs = {fuse: m.run(*feeds) for fuse, m in models.items()}  # warm up: page in weights, arena
    times: dict[bool, list[float]] = {fuse: [] for fuse in modes}
    start = time.perf_counter()
    while min(len(t) for t in times.values()) < repeats or time.perf_counter() - start < min_seconds:
        for fuse, m in models.items():
            for i in range(BLOCK + 1):  # the first run of a block waits out the other pool's spin
                t0 = time.perf_counter()
                m.run_into(outs[fuse], *feeds)  # preallocated outputs, as from C: no page faults timed
                if i:
                    times[fuse].append(time.perf_counter() - t0)
        if time.perf_counter() - start > 60:
            break
    results = {}
    for fuse in modes:
        lowered = lower_graph(graph, name, fuse, target)
        t = np.array(times[fuse]) * 1e3
        results[fuse] = BenchResult(
            float(np.median(t)),
            float(np.percentile(t, 90)),
            len(lowered.calls),
            sum(c.kernel.bytes for c in lowered.calls),
            sum(c.kernel.flops for c in lowered.calls) / 1e6,
            lowered.plan.arena_bytes,
            lowered.plan.lower_bound,
            lowered.plan.naive_bytes,
            lowered.plan.weights_bytes,
        )
    return results


def table(rows: list[tuple[str, dict[bool, BenchResult]]]) -> str:
    head = (
        f"{'model':<34} {'kernels':>11} {'fused ms':>9} {'unfused ms':>10} {'speedup':>8} "
        f"{'MB moved (f/u)':>15} {'arena/bound/naive MB':>21}"
    )
    lines = [head]
    for label, r in rows:
        f, u = r[True], r.get(False, r[True])
        kernels = f"{f.kernels}/{u.kernels}"
        moved = f"{f.bytes_moved / 1e6:.1f}/{u.bytes_moved / 1e6:.1f}"
        memory = f"{f.arena_bytes / 1e6:.2f}/{f.lower_bound_bytes / 1e6:.2f}/{f.naive_bytes / 1e6:.2f}"
        lines.append(
            f"{label:<34} {kernels:>11} {f.median_ms:>9.3f} {u.median_ms:>10.3f} "
            f"{u.median_ms / f.median_ms:>7.2f}x {moved:>15} {memory:>21}"
        )
    return "\n".join(lines)
