"""Fused vs unfused, side by side in one run: memory-bound subgraphs, then whole models.

    python benchmarks/fusion.py            # the table (a few minutes: ResNet-18 compiles twice)
    python benchmarks/fusion.py --quick    # fewer repeats

Subgraphs are written the way exporters that predate fused ops write them (softmax as
max / subtract / exp / sum / divide; layer norm as mean / variance / rsqrt), so
unfused means one kernel per primitive. Bytes moved are estimated: every kernel
reads or writes each of its buffers once. The floors, at this machine's ~20-30 GB/s:
  softmax (16384 x 128) f32: 8 MiB in + 8 MiB out                    ≈ 0.6 ms fused
  layer norm (4096 x 256) f32: 4 MiB in + 4 MiB out                  ≈ 0.3 ms fused
  6 elementwise ops on 8M f32: 32 MiB in + 32 MiB out (unfused: 6x)  ≈ 2.5 ms fused
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.bench import bench, table  # noqa: E402
from frontends.onnx import import_onnx  # noqa: E402
from frontends.zoo import onnx_models as zoo  # noqa: E402
from ir.builder import GraphBuilder  # noqa: E402


def softmax_graph(rows: int = 32 * 4 * 128, n: int = 128):
    b = GraphBuilder("softmax")
    x = b.input("x", (rows, n))
    m = b.reduce_max(x, axes=(-1,))
    e = b.exp(b.sub(x, m))
    return b.build(b.div(e, b.reduce_sum(e, axes=(-1,))))


def layer_norm_graph(rows: int = 32 * 128, n: int = 256):
    rng = np.random.default_rng(0)
    b = GraphBuilder("layer_norm")
    x = b.input("x", (rows, n))
    d = b.sub(x, b.reduce_mean(x, axes=(-1,)))
    var = b.reduce_mean(b.mul(d, d), axes=(-1,))
    y = b.mul(d, b.rsqrt(b.add(var, b.param("eps", np.float32(1e-5).reshape(())))))
    y = b.add(
        b.mul(y, b.param("gamma", rng.standard_normal(n).astype(np.float32))),
        b.param("beta", rng.standard_normal(n).astype(np.float32)),
    )
    return b.build(y)


def chain_graph(n: int = 8 * 1024 * 1024):
    b = GraphBuilder("chain")
    x = b.input("x", (n,))
    s = b.param("s", np.float32(0.5).reshape(()))
    y = b.sigmoid(b.relu(b.add(b.mul(b.neg(b.abs(x)), s), s)))
    return b.build(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    repeats = 5 if args.quick else 30
    cases = [
        ("softmax (16384, 128), primitives", softmax_graph()),
        ("layer norm (4096, 256), primitives", layer_norm_graph()),
        ("6 elementwise ops, 8M", chain_graph()),
        ("MLP 784-512-512-10, batch 32", import_onnx(zoo.mlp(batch=32))),
        ("MNIST CNN, batch 32", import_onnx(zoo.mnist_cnn(batch=32))),
        ("transformer 4x(256, 4 heads), b32", import_onnx(zoo.transformer_encoder(batch=32))),
        ("ResNet-18, batch 1", import_onnx(zoo.resnet18(batch=1))),
    ]
    rows = []
    for label, graph in cases:
        rows.append((label, bench(graph, graph.name, repeats=repeats)))
        print(f"measured {label}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
