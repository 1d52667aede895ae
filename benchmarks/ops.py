"""Kiln vs numpy on three kernels, at 1 and 2 threads, side by side in one run.

    python benchmarks/ops.py            # the table
    python benchmarks/ops.py --quick    # fewer repeats

Each thread count runs in a child process with KILN_NUM_THREADS and OpenBLAS's
thread count set, and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset so numpy uses
its best kernel for this CPU. Reported: median time, GFLOP/s or GB/s, and the ratio
Kiln / numpy throughput (above 1: Kiln faster).

The floors (FLOPs and the fewest bytes each kernel must move):
  matmul 512^3        268 MFLOP, 3 MiB      → compute bound
  conv 32x32x13x13 →  64 filters 3x3, 143 MFLOP (direct), 1.4 MiB → compute bound
  chain of 4 ops 1M   4 MFLOP, 12 MiB fused (read 2, write 1), 36 MiB unfused (4 passes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_seconds  # noqa: E402


def _conv_numpy(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """numpy's best conv: im2col by sliding windows, then one BLAS matmul."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    oh, ow = cols.shape[2], cols.shape[3]
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    y = cols @ w.reshape(o, -1).T + bias
    return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def cases(rng: np.random.Generator) -> list[dict]:
    """Each kernel: a Kiln graph, its inputs, the numpy version and its work amount."""
    from ir.builder import GraphBuilder

    out = []
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    g = GraphBuilder("bench_matmul")
    out.append(
        dict(
            kernel="matmul 512x512x512",
            unit="GFLOP/s",
            amount=2 * 512**3 / 1e9,
            graph=g.build(g.matmul(g.input("a", a.shape), g.input("b", b.shape))),
            inputs=(a, b),
            numpy=lambda: a @ b,
        )
    )

    x = rng.standard_normal((32, 32, 13, 13)).astype(np.float32)
    w = (rng.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    g = GraphBuilder("bench_conv")
    out.append(
        dict(
            kernel="conv 3x3 32→64, 32x13x13",
            unit="GFLOP/s",
            amount=2 * 32 * 64 * 121 * 288 / 1e9,
            graph=g.build(g.conv2d(g.input("x", x.shape), g.param("w", w), g.param("b", bias))),
            inputs=(x,),
            numpy=lambda: _conv_numpy(x, w, bias),
        )
    )

    n = 1 << 20
    u = rng.standard_normal(n).astype(np.float32)
    v = rng.standard_normal(n).astype(np.float32)
    g = GraphBuilder("bench_chain")
    s = g.param("s", np.float32(0.5).reshape(()))
    chain = g.tanh(g.relu(g.mul(g.add(g.input("u", (n,)), g.input("v", (n,))), s)))
    out.append(
        dict(
            kernel="add→mul→relu→tanh, 1M",
            unit="GB/s",
            amount=3 * 4 * n / 1e9,
            graph=g.build(chain),
            inputs=(u, v),
            numpy=lambda: np.tanh(np.maximum((u + v) * np.float32(0.5), np.float32(0))),
        )
    )
    return out


def measure(threads: int, repeats: int) -> list[dict]:
    """All Kiln timings first, then all numpy ones: OpenBLAS's worker threads spin for a
    while after each call and would steal the cores Kiln's threads need."""
    from compiler import compile_model

    rows = cases(np.random.default_rng(0))
    results = []
    for r in rows:
        model = compile_model(r["graph"], name=r["graph"].name)
        model.set_num_threads(threads)
        r["kiln_time"] = median_seconds(lambda m=model, i=r["inputs"]: m(*i), repeats)
        results.append(model(*r["inputs"]))
    for r, got in zip(rows, results):
        r["numpy_time"] = median_seconds(r["numpy"], repeats)
        np.testing.assert_allclose(got, r["numpy"](), rtol=1e-3, atol=1e-3)
    return [
        dict(
            kernel=r["kernel"],
            unit=r["unit"],
            amount=r["amount"],
            threads=threads,
            kiln=r["kiln_time"],
            numpy=r["numpy_time"],
        )
        for r in rows
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    repeats = 5 if args.quick else 30
    if args.child:
        print(json.dumps(measure(args.child, repeats)))
        return
    rows = []
    for threads in (1, 2):
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        env.update(
            KILN_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads)
        )
        cmd = [sys.executable, __file__, "--child", str(threads)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    print(
        f"{'kernel':<28} {'thr':>3} {'kiln ms':>9} {'numpy ms':>9} "
        f"{'kiln':>9} {'numpy':>9}  {'kiln/numpy':>10}"
    )
    for r in rows:
        k, n = r["amount"] / r["kiln"], r["amount"] / r["numpy"]
        print(
            f"{r['kernel']:<28} {r['threads']:>3} {r['kiln'] * 1e3:>9.3f} {r['numpy'] * 1e3:>9.3f} "
            f"{k:>9.1f} {n:>9.1f}  {k / n:>9.2f}x   ({r['unit']})"
        )


if __name__ == "__main__":
    main()
