"""One library for every batch size against one library per batch size, side by side.

    python benchmarks/dynamic_batch.py            # the five PyTorch-exported models
    python benchmarks/dynamic_batch.py mlp lstm   # some

Per model: the dynamic-batch library (exported with the batch named N, compiled once
for tiles 32, 8 and 1: compiler.batching) and, at each batch, the static library
compiled for exactly that batch. Both are timed through the Python API as a user
calls it and through run_into (no allocation), in alternating rounds (this machine is
noisy): the median of each, and dynamic / static (1.00: as fast; the target is at
most 1.05 at batch 1 and 32, where the dynamic library runs the very same kernels).
Batch 7 and 100 show what the tiles cost where no tile fits exactly (100 = three runs
of 32, then 4 left; a rest runs by the cheapest tiles, a larger one padded:
compiler.batching.cover_table). Needs torch==2.13.0.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler import compile_model  # noqa: E402
from frontends.zoo.torch_models import MODELS, export  # noqa: E402

BATCHES = (1, 7, 32, 100)


def _alternating(calls: list, rounds: int, per_round: int) -> list[float]:
    """Each call's median seconds over `rounds` rounds that take turns (per_round calls
    each), after one warm-up each."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, kept in zip(calls, times):
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                kept.append(time.perf_counter() - t0)
    return [statistics.median(kept) for kept in times]


def main(names: list[str]) -> None:
    print(
        f"{'model':<12} {'batch':>5} {'static ms':>10} {'dynamic ms':>10} {'dyn/static':>10}"
        f" {'into static':>11} {'into dyn':>9} {'dyn/static':>10}"
    )
    for name in names:
        dynamic = compile_model(export(name, 2, dynamic=True), name=f"{name}_dyn")
        for batch in BATCHES:
            static = compile_model(export(name, batch), name=f"{name}_b{batch}")
            x = np.random.default_rng(batch).standard_normal(static.inputs[0].shape).astype(np.float32)
            np.testing.assert_allclose(dynamic(x), static(x), rtol=1e-4, atol=1e-5)
            outs_static = [np.empty(t.shape, t.dtype) for t in static.outputs]
            outs_dynamic = [np.empty(s, np.float32) for s in dynamic.output_shapes(x)]
            heavy = name == "resnet18" and batch >= 32
            rounds, per_round = (3, 2) if heavy else (7, 10)
            calls = [
                lambda s=static, x=x: s(x),
                lambda d=dynamic, x=x: d(x),
                lambda s=static, o=outs_static, x=x: s.run_into(o, x),
                lambda d=dynamic, o=outs_dynamic, x=x: d.run_into(o, x),
            ]
            t = _alternating(calls, rounds, per_round)
            print(
                f"{name:<12} {batch:>5} {t[0] * 1e3:>10.3f} {t[1] * 1e3:>10.3f} {t[1] / t[0]:>10.2f}"
                f" {t[2] * 1e3:>11.3f} {t[3] * 1e3:>9.3f} {t[3] / t[2]:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
