"""`kiln demo`: the main job on the bundled model, end to end, with its evidence.

Compiles the bundled MNIST CNN, runs it from Python (ctypes) and from a C program
built against the generated header, and compares both with the reference
interpreter on the same input.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from codegen.cabi import build_c_runner
from compiler.driver import compile_model, to_graph
from frontends.zoo.onnx_models import MNIST_CNN_PATH
from ir.interpreter import interpret

RTOL, ATOL = 1e-4, 1e-6


def demo_input(seed: int = 7) -> np.ndarray:
    """A fixed 28x28 'image': a bright stroke on noise, so the demo is repeatable."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 0.1, (28, 28)).astype(np.float32)
    img[6:22, 13:16] = 1.0
    return img.reshape(1, 1, 28, 28)


def run_demo(workdir: Path | None = None) -> int:
    work = Path(workdir or tempfile.mkdtemp(prefix="kiln-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model: {MNIST_CNN_PATH}")
    t0 = time.perf_counter()
    model = compile_model(MNIST_CNN_PATH, name="mnist_cnn")
    so = model.save(work / "mnist_cnn.so")
    print(f"compiled in {time.perf_counter() - t0:.2f} s → {so} (+ mnist_cnn.h), {model.num_threads} threads")

    x = demo_input()
    expected = interpret(to_graph(MNIST_CNN_PATH), [x])[0]
    from_python = model(x)

    runner = build_c_runner(so, "mnist_cnn", work / "mnist_cnn_runner")
    (work / "input.bin").write_bytes(x.tobytes())
    subprocess.run([str(runner), str(work / "input.bin"), str(work / "output.bin")], check=True)
    from_c = np.frombuffer((work / "output.bin").read_bytes(), dtype=np.float32).reshape(expected.shape)

    ok = True
    print(f"{'run':<12} {'argmax':>6} {'max |diff| vs interpreter':>26}  agrees")
    for label, y in (("interpreter", expected), ("python", from_python), ("C program", from_c)):
        diff = float(np.max(np.abs(y - expected)))
        agrees = bool(np.allclose(y, expected, rtol=RTOL, atol=ATOL))
        ok &= agrees
        print(f"{label:<12} {int(np.argmax(y)):>6} {diff:>26.3g}  {'yes' if agrees else 'NO'}")
    print("probabilities:", np.array2string(from_python[0], precision=4, suppress_small=True))
    print("demo: OK" if ok else "demo: MISMATCH")
    return 0 if ok else 1
