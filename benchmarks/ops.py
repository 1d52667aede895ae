"""Kiln vs numpy on a matmul, convolutions and an elementwise chain, at 1 and 2
threads, side by side in one run, against this CPU's measured FMA peak.

    python benchmarks/ops.py                # the table
    python benchmarks/ops.py --quick        # fewer repeats
    python benchmarks/ops.py --match resnet # only the kernels whose name holds "resnet"

Each thread count runs in a child process with KILN_NUM_THREADS and OpenBLAS's
thread count set, and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset so numpy uses
its best kernel for this CPU. Reported: median time, GFLOP/s or GB/s, and the ratio
Kiln / numpy throughput (above 1: Kiln faster), and for the FLOP-bound kernels Kiln's
and numpy's share of the FMA peak at that thread count (benchmarks/fma_peak.py, measured
in the same child process, just before the kernels), and Kiln's share of the ceiling of
a product's register tile with its operands in L1 (fma_peak.tile_gflops: the loop Kiln's
products and convolutions run, as LLVM compiles it; 82-85% of the FMA peak on the Xeon
these numbers come from): what is left to a kernel's schedule.

The floors (FLOPs and the fewest bytes each kernel must move):
  matmul 512^3        268 MFLOP, 3 MiB      → compute bound
  dense 32x784→512    25.7 MFLOP, 1.6 MiB of weights (in L3) → compute bound
  dense 4096x256→1024 2.1 GFLOP, 1 MiB of weights, 20 MiB of activations → compute bound
  conv 32x32x13x13 →  64 filters 3x3, 143 MFLOP (direct), 1.4 MiB → compute bound
  chain of 4 ops 1M   4 MFLOP, 12 MiB fused (read 2, write 1), 36 MiB unfused (4 passes)
  ResNet-18's 3x3 stride-1 convolutions at batch 1, each 231 MFLOP:
    64→64 at 56²    weights 0.14 MiB, input 0.77 MiB, output 0.77 MiB
    128→128 at 28²  weights 0.56 MiB, input 0.38 MiB
    256→256 at 14²  weights 2.25 MiB, input 0.19 MiB
    512→512 at 7²   weights 9 MiB, input 0.1 MiB
  all compute bound: 231 MFLOP at ~210 GFLOP/s (one core of the Xeon, two AVX-512 FMA
  units) is 1.1 ms, and the largest's 9 MiB of weights stream from memory in about half
  of that (a core's ~20 GB/s).
  Kiln runs all four as Winograd's F(2x2, 3x3) (compiler.passes.conv_winograd, from 16
  tiles: WINOGRAD_MIN_TILES), 0.45x of the direct multiply-adds; the 512-channel one's
  transformed weights (16 MiB, 1.8x the conv's) stream from memory, each row block of
  its products fetching the next block's rows ahead. Their GFLOP/s count the direct
  convolution's FLOPs (the effective rate), so they may pass the FMA peak.
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


def _conv_numpy(x: np.ndarray, w: np.ndarray, bias: np.ndarray, pad: int = 0) -> np.ndarray:
    """numpy's best conv: im2col by sliding windows, then one BLAS matmul."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    cols = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n c oh ow kh kw
    oh, ow = cols.shape[2], cols.shape[3]
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    y = cols @ w.reshape(o, -1).T + bias
    return y.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


#: ResNet-18's 3x3 stride-1 convolutions (channels in = out, height = width), batch 1
RESNET18_CONVS = ((64, 56), (128, 28), (256, 14), (512, 7))


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

    # Dense layers of constant weights (packed at compile time): the MLP's at batch 32,
    # the transformer's feed-forward at batch 32 x seq 128
    for m, k, n in ((32, 784, 512), (4096, 256, 1024)):
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        g = GraphBuilder(f"bench_dense{m}")
        out.append(
            dict(
                kernel=f"dense {m}x{k}→{n}",
                unit="GFLOP/s",
                amount=2 * m * k * n / 1e9,
                graph=g.build(g.linear(g.input("x", x.shape), g.param("w", w), g.param("b", bias))),
                inputs=(x,),
                numpy=lambda x=x, w=w, bias=bias: x @ w + bias,
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
            numpy=lambda x=x, w=w, bias=bias: _conv_numpy(x, w, bias),
        )
    )

    for c, hw in RESNET18_CONVS:
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        w = (rng.standard_normal((c, c, 3, 3)) * 0.05).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        g = GraphBuilder(f"bench_resnet{c}")
        y = g.conv2d(g.input("x", x.shape), g.param("w", w), g.param("b", bias), pads=(1, 1, 1, 1))
        out.append(
            dict(
                kernel=f"resnet18 3x3 {c}→{c}, {hw}²",
                unit="GFLOP/s",
                amount=2 * c * c * 9 * hw * hw / 1e9,
                graph=g.build(y),
                inputs=(x,),
                numpy=lambda x=x, w=w, bias=bias: _conv_numpy(x, w, bias, pad=1),
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


def measure(threads: int, repeats: int, match: str = "") -> list[dict]:
    """The FMA peak, then all Kiln timings, then all numpy ones: OpenBLAS's worker
    threads spin for a while after each call and would steal the cores Kiln's threads
    need."""
    from fma_peak import peak_gflops, tile_gflops

    from compiler import compile_model

    rows = [r for r in cases(np.random.default_rng(0)) if match in r["kernel"]]
    peak, tile = peak_gflops(threads)[0], tile_gflops(threads)[0]
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
            peak=peak,
            tile=tile,
        )
        for r in rows
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--match", default="", help="only the kernels whose name holds this")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    repeats = 5 if args.quick else 30
    if args.child:
        print(json.dumps(measure(args.child, repeats, args.match)))
        return
    rows = []
    for threads in (1, 2):
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        env.update(
            KILN_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads)
        )
        cmd = [sys.executable, __file__, "--child", str(threads), "--match", args.match]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    for threads in (1, 2):
        peak, tile = next(((r["peak"], r["tile"]) for r in rows if r["threads"] == threads), (0.0, 0.0))
        print(
            f"FMA peak, {threads} thread{'s' if threads > 1 else ''}: {peak:.1f} GFLOP/s; a product's "
            f"register tile from L1: {tile:.1f} ({tile / max(peak, 1e-9):.0%}) (float32, measured)"
        )
    print(
        f"{'kernel':<28} {'thr':>3} {'kiln ms':>9} {'numpy ms':>9} "
        f"{'kiln':>9} {'numpy':>9}  {'kiln/numpy':>10} {'kiln %pk':>8} {'numpy %pk':>9} {'kiln %tile':>10}"
    )
    for r in rows:
        k, n = r["amount"] / r["kiln"], r["amount"] / r["numpy"]
        share = (
            f"{100 * k / r['peak']:>7.0f}% {100 * n / r['peak']:>8.0f}% {100 * k / r['tile']:>9.0f}%"
            if r["unit"] == "GFLOP/s"
            else f"{'':>8} {'':>9} {'':>10}"
        )
        print(
            f"{r['kernel']:<28} {r['threads']:>3} {r['kiln'] * 1e3:>9.3f} {r['numpy'] * 1e3:>9.3f} "
            f"{k:>9.1f} {n:>9.1f}  {k / n:>9.2f}x {share}  ({r['unit']})"
        )


if __name__ == "__main__":
    main()
