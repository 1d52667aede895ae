"""One library for every batch and sequence length against one library per shape.

    python benchmarks/dynamic_sequence.py

The transformer (4 encoder layers, d_model 256) exported with the batch named N and
the sequence named S, compiled once for every length up to 200 (`dims={"S": 200}`:
programs for lengths 16, 32, 64, 128 and 200, each for batch tiles 32, 8 and 1; see
compiler.sequence), and for each (batch, length) below the static library compiled
for exactly that shape from the same file. Timed through run_into in alternating
rounds (this machine is noisy): the median of each and dynamic / static. Where the
length is a bucket's the dynamic library runs the same kernels plus the key mask; in
between it runs the next bucket's programs (the bucket column) on the sequence padded
to that length. Needs torch==2.13.0 and onnxscript.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dynamic_batch import _alternating  # noqa: E402
from compiler import compile_model  # noqa: E402
from compiler.sequence import bucket_lengths  # noqa: E402
from frontends.zoo.torch_models import export  # noqa: E402

BOUND = 200
SHAPES = ((1, 16), (1, 128), (32, 128), (1, 200), (32, 200), (1, 50), (32, 50), (8, 100))


def main() -> None:
    model = export("transformer", 2, dynamic=True, sequence=True)
    t0 = time.perf_counter()
    dynamic = compile_model(model, name="transformer_seq", dims={"S": BOUND})
    print(f"compiled once for every batch and length 1..{BOUND} in {time.perf_counter() - t0:.0f} s")
    print(f"{'batch':>5} {'length':>6} {'bucket':>6} {'static ms':>10} {'dynamic ms':>10} {'dyn/static':>10}")
    buckets = bucket_lengths(BOUND)
    for batch, length in SHAPES:
        static = compile_model(
            model, name=f"transformer_{batch}x{length}", input_shapes={"input": (batch, length, 256)}
        )
        x = np.random.default_rng(length).standard_normal((batch, length, 256)).astype(np.float32)
        np.testing.assert_allclose(dynamic(x), static(x), rtol=1e-4, atol=1e-4)
        outs_static = [np.empty(t.shape, t.dtype) for t in static.outputs]
        outs_dynamic = [np.empty(x.shape, np.float32)]
        calls = [
            lambda s=static, o=outs_static, x=x: s.run_into(o, x),
            lambda o=outs_dynamic, x=x: dynamic.run_into(o, x),
        ]
        rounds, per_round = (5, 3) if batch * length >= 3200 else (7, 10)
        t = _alternating(calls, rounds, per_round)
        bucket = next(b for b in buckets if b >= length)
        times = f"{t[0] * 1e3:>10.3f} {t[1] * 1e3:>10.3f} {t[1] / t[0]:>10.2f}"
        print(f"{batch:>5} {length:>6} {bucket:>6} {times}", flush=True)


if __name__ == "__main__":
    main()
