"""The five PyTorch-exported models (frontends/zoo/torch_models.py): Kiln against
onnxruntime on the same ONNX file, at batch 1 and 32, side by side in one run.

    python benchmarks/torch_models.py            # all five
    python benchmarks/torch_models.py lstm mlp   # some

Per model and batch: the largest error relative to the output's largest magnitude
(max |kiln - ort| / max |ort|), the largest elementwise relative error where |ort| is
above 1e-3 of that magnitude, Kiln's cold compile time (an empty build cache), and
the run times. Needs torch==2.13.0 and onnxruntime.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_seconds  # noqa: E402

from compiler import compile_model  # noqa: E402
from frontends.zoo.torch_models import MODELS, export  # noqa: E402


def main(names: list[str]) -> None:
    import onnxruntime

    os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-bench-")  # cold compiles
    print(
        f"{'model':<12} {'batch':>5} {'compile s':>9} {'kiln ms':>9} {'ort ms':>9} {'kiln/ort':>9}"
        f"  {'max err / max|y|':>16} {'max rel err':>11}"
    )
    for name in names:
        for batch in (1, 32):
            model = export(name, batch)
            shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            t0 = time.perf_counter()
            kiln = compile_model(model, name=f"{name}_b{batch}")
            compile_s = time.perf_counter() - t0
            repeats = 5 if name == "resnet18" and batch == 32 else 20
            # Kiln first: onnxruntime's threads spin for a while after each of its runs and
            # would take the cores from anything timed right after them
            t_kiln = median_seconds(lambda k=kiln, x=x: k(x), repeats)
            got = kiln(x)
            session = onnxruntime.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            expected = session.run(None, {"input": x})[0]
            scale = float(np.abs(expected).max())
            big = np.abs(expected) > 1e-3 * scale
            rel = float(np.max(np.abs(got - expected)[big] / np.abs(expected)[big]))
            t_ort = median_seconds(lambda s=session, x=x: s.run(None, {"input": x}), repeats)
            del session
            time.sleep(0.5)  # let its threads stop spinning
            print(
                f"{name:<12} {batch:>5} {compile_s:>9.1f} {t_kiln * 1e3:>9.2f} {t_ort * 1e3:>9.2f} "
                f"{t_ort / t_kiln:>8.2f}x  {np.abs(got - expected).max() / scale:>16.1e} {rel:>11.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
