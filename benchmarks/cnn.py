"""The bundled MNIST CNN end to end: Kiln vs onnxruntime (if installed) vs the numpy
interpreter, at batch 1 and 32, side by side in one run.

    python benchmarks/cnn.py

Work: conv1 0.39 + conv2 4.46 + conv3 0.66 + dense 0.07 ≈ 5.6 MFLOP per image over
~0.37 MB of weights, so batch 32 (180 MFLOP a call) is compute bound: at this
machine's ~200 GFLOP/s per core, the floor is ~0.45 ms on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_seconds  # noqa: E402

from compiler import compile_model  # noqa: E402
from frontends.zoo.onnx_models import mnist_cnn  # noqa: E402

try:
    import onnxruntime
except ImportError:
    onnxruntime = None


def main() -> None:
    print(f"{'batch':>5} {'kiln ms':>9} {'ort ms':>9} {'kiln/ort speed':>15}  max |kiln - ort|")
    for batch in (1, 32):
        model = mnist_cnn(batch=batch)
        x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        kiln = compile_model(model, name=f"cnn_b{batch}")
        t_kiln = median_seconds(lambda k=kiln, x=x: k(x))
        if onnxruntime is None:
            print(f"{batch:>5} {t_kiln * 1e3:>9.3f} {'-':>9} {'-':>15}  (onnxruntime not installed)")
            continue
        sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        t_ort = median_seconds(lambda s=sess, x=x: s.run(None, {"input": x}))
        diff = np.max(np.abs(kiln(x) - sess.run(None, {"input": x})[0]))
        print(f"{batch:>5} {t_kiln * 1e3:>9.3f} {t_ort * 1e3:>9.3f} {t_ort / t_kiln:>14.2f}x  {diff:.2e}")
        del sess
        time.sleep(0.5)  # onnxruntime's threads spin after its runs: let them stop before Kiln's next timing


if __name__ == "__main__":
    main()
