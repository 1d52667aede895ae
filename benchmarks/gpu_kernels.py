"""The GPU build of the five PyTorch-exported models at a glance, without a GPU: per
model and batch, its kernels, their registers, shared memory and spills summed as
ptxas reports them for sm_80 and sm_90, and the share of the FLOPs that runs in the
tiled product kernels (the ones that decide GPU speed).

    python benchmarks/gpu_kernels.py              # all five, batch 1 and 32
    python benchmarks/gpu_kernels.py resnet18     # some

`kiln inspect MODEL.onnx --target cuda` prints the same per kernel. Needs ptxas
(pip nvidia-cuda-nvcc) and torch==2.13.0 for the exports.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.driver import lower_graph, to_graph  # noqa: E402
from compiler.report import gpu_summary  # noqa: E402
from frontends.zoo.torch_models import MODELS, export  # noqa: E402


def main(names: list[str]) -> None:
    print("| model | batch | kernels | registers sm_80/sm_90 | shared KiB | spills | FLOPs in tiled GEMMs |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        for batch in (1, 32):
            summary = gpu_summary(lower_graph(to_graph(export(name, batch)), name, target="cuda"))
            (regs80, smem, spills80), (regs90, _, spills90) = summary.totals("sm_80"), summary.totals("sm_90")
            print(
                f"| {name} | {batch} | {summary.kernels} | {regs80} / {regs90} | {smem / 1024:.1f} "
                f"| {spills80 + spills90} | {summary.product_flop_share:.1%} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
