"""What a call of a compiled model costs beyond its kernels, on a model whose kernel is
next to nothing (a 4-element add), split by layer:

    python benchmarks/call_overhead.py

- ctypes floor: a ctypes call of a C function that does nothing (NAME_num_kernels);
- bound call: `CompiledModel.bind(...)()`, ctypes plus NAME_run (the C entry: the
  arena, the launch, the status checks), no Python checks;
- run_into: the checked call writing into preallocated outputs;
- __call__: the checked call that allocates its outputs, as most users call.
Each is the minimum over rounds of the mean of many calls (the least disturbed
measure on a shared machine), and the layers' differences are the costs of each.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler import compile_model  # noqa: E402
from ir.builder import GraphBuilder  # noqa: E402

CALLS, ROUNDS = 20000, 7


def main() -> None:
    b = GraphBuilder("tiny")
    x, y = b.input("x", (4,)), b.input("y", (4,))
    model = compile_model(b.build(b.add(x, y)), name="tiny")
    rng = np.random.default_rng(0)
    xv, yv = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    out = [np.empty(4, np.float32)]
    model.set_num_threads(1)
    np.testing.assert_allclose(model(xv, yv), xv + yv, rtol=1e-6)
    floor = model._fn["num_kernels"]
    cases = {
        "ctypes floor": floor,
        "bound call": model.bind(out, xv, yv),
        "run_into": lambda: model.run_into(out, xv, yv),
        "__call__": lambda: model(xv, yv),
    }
    print(f"{'call':<14} {'µs':>7}")
    for name, fn in cases.items():
        seconds = min(timeit.repeat(fn, number=CALLS, repeat=ROUNDS)) / CALLS
        print(f"{name:<14} {seconds * 1e6:7.2f}")


if __name__ == "__main__":
    main()
