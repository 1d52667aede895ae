"""Training speed: Kiln's compiled train step vs real Keras 3 (torch backend) vs a plain
PyTorch loop, on four models, 1 and 2 threads, side by side in one run.

    python benchmarks/training.py                      # 60,000 samples per epoch (3,200 sequences)
    python benchmarks/training.py --samples 6000       # a quicker look
    python benchmarks/training.py --models lstm,gru --frameworks kiln   # some of them

Per (model, threads, framework), in a fresh process: the median time of one train step
(batch 32, after warm-up), the time of one `fit` epoch (batch 32, shuffled, verbose 0;
PyTorch: the usual zero_grad / forward / backward / step loop over a permutation) and,
for the sequence models, of `predict` over the same data (batch 32; PyTorch: the model
under no_grad, batch by batch).
Models: an MLP Dense(64, relu) on 32 inputs → Dense(64, relu) → Dense(10, softmax) with
Adam and sparse categorical cross-entropy; the Keras MNIST CNN (Conv2D 32 → pool →
Conv2D 64 → pool → Dense 10, Dropout left out) with Adam, on 28x28x1 images; sequence
classifiers LSTM(128) and GRU(128) (Keras's defaults: GRU reset_after=True) over 64
steps of 32 features → Dense(10, softmax), with Adam.
Needs torch==2.13.0 and keras for the two references (they are skipped without them).

Work per CNN step (batch 32): forward 2 x 0.66 + 2 x 4.5 ... ≈ 0.37 GFLOP, backward about
twice that: ~1.1 GFLOP, so ~6-10 ms per step at this machine's 100-200 GFLOP/s per core.
Per LSTM step (batch 32): 64 steps x 2 x 32 x (32 + 128) x 512 ≈ 0.34 GFLOP forward; the
recurrence's h·Rᵀ (0.27 of it) runs step after step on 32 rows, so it is bound by the
per-step latency more than by the FLOPs. GRU: 3/4 of that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32
MODELS = ("mlp", "cnn", "lstm", "gru")
SEQUENCE_MODELS = ("lstm", "gru")
STEPS, FEATURES, UNITS = 64, 32, 128


def data(model: str, n: int):
    rng = np.random.default_rng(0)
    if model == "mlp":
        x = rng.standard_normal((n, 32)).astype(np.float32)
        return x, x[:, :10].argmax(axis=1).astype(np.int64)
    if model in SEQUENCE_MODELS:
        x = rng.standard_normal((n, STEPS, FEATURES)).astype(np.float32)
        return x, x[:, :, :10].sum(axis=1).argmax(axis=1).astype(np.int64)
    x = rng.random((n, 28, 28, 1)).astype(np.float32)
    return x, (x[:, :14, :14, 0].mean(axis=(1, 2)) * 40).astype(np.int64) % 10


def keras_model(k, model: str):
    if model == "mlp":
        layers = [
            k.Input((32,)),
            k.layers.Dense(64, activation="relu"),
            k.layers.Dense(64, activation="relu"),
        ]
    elif model in SEQUENCE_MODELS:
        layers = [k.Input((STEPS, FEATURES)), getattr(k.layers, model.upper())(UNITS)]
    else:
        layers = [
            k.Input((28, 28, 1)),
            k.layers.Conv2D(32, (3, 3), activation="relu"),
            k.layers.MaxPooling2D((2, 2)),
            k.layers.Conv2D(64, (3, 3), activation="relu"),
            k.layers.MaxPooling2D((2, 2)),
            k.layers.Flatten(),
        ]
    m = k.Sequential([*layers, k.layers.Dense(10, activation="softmax")])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def run_keras_like(framework: str, model: str, n: int) -> dict:
    if framework == "kiln":
        from frontends import keras as k
    else:
        os.environ["KERAS_BACKEND"] = "torch"
        import keras as k
    m = keras_model(k, model)
    x, y = data(model, n)
    xb, yb = x[:BATCH], y[:BATCH]
    warm = 2 * BATCH + n % BATCH  # the full and the last partial batch: compiles and warms up both
    m.fit(x[:warm], y[:warm], batch_size=BATCH, epochs=1, verbose=0)
    step = median_seconds(lambda: m.train_on_batch(xb, yb)) if hasattr(m, "train_on_batch") else None
    t0 = time.perf_counter()
    m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    result = {"step": step, "epoch": time.perf_counter() - t0}
    if model in SEQUENCE_MODELS:
        m.predict(x[:warm], batch_size=BATCH, verbose=0)
        t0 = time.perf_counter()
        m.predict(x, batch_size=BATCH, verbose=0)
        result["predict"] = time.perf_counter() - t0
    return result


def run_torch(model: str, n: int) -> dict:
    import torch
    from torch import nn

    if model == "mlp":
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    elif model in SEQUENCE_MODELS:
        net = sequence_classifier(getattr(nn, model.upper())(FEATURES, UNITS, batch_first=True))
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(1600, 10),
        )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(model, n)
    if model == "cnn":
        x = x.transpose(0, 3, 1, 2).copy()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step(xb, yb):
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()

    step_time = median_seconds(lambda: step(xt[:BATCH], yt[:BATCH]))
    t0 = time.perf_counter()
    order = torch.randperm(n)
    for i in range(0, n, BATCH):
        idx = order[i : i + BATCH]
        step(xt[idx], yt[idx])
    result = {"step": step_time, "epoch": time.perf_counter() - t0}
    if model in SEQUENCE_MODELS:
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, BATCH):
                net(xt[i : i + BATCH])
        result["predict"] = time.perf_counter() - t0
    return result


def sequence_classifier(rnn):
    """rnn's last output → Linear(UNITS, 10), as the Keras models' Dense head."""
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(UNITS, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    return Classifier()


def worker(args) -> None:
    os.environ["KILN_NUM_THREADS"] = str(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        if args.framework != "kiln":
            print(json.dumps({"skipped": "torch is not installed"}))
            return
    if args.framework == "torch":
        result = run_torch(args.model, args.samples)
    else:
        result = run_keras_like(args.framework, args.model, args.samples)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=60000, help="samples per epoch (MLP, CNN)")
    p.add_argument("--sequences", type=int, default=3200, help="samples per epoch (LSTM, GRU)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    p.add_argument("--frameworks", default="kiln,keras,torch", help="comma-separated, of kiln, keras, torch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--framework", default="kiln", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"{args.samples} samples per epoch ({args.sequences} sequences of {STEPS} steps), batch {BATCH}")
    header = f"{'model':<5} {'thr':>3} {'framework':<10} {'step ms':>8} {'epoch s':>8} {'predict s':>9}"
    print(f"{header}  {'Kiln is faster by (epoch, predict)':>34}")
    for model in args.models.split(","):
        samples = args.sequences if model in SEQUENCE_MODELS else args.samples
        for threads in (1, 2):
            results = {}
            for framework in args.frameworks.split(","):
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--framework", framework]
                cmd += ["--threads", str(threads), "--samples", str(samples)]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                )
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                results[framework] = (
                    json.loads(lines[-1]) if lines else {"skipped": out.stderr.strip()[-200:]}
                )
            for framework, r in results.items():
                if "skipped" in r:
                    print(f"{model:<5} {threads:>3} {framework:<10} skipped: {r['skipped']}")
                    continue
                print(
                    f"{model:<5} {threads:>3} {framework:<10} {_row(r, results.get('kiln', {}), framework)}"
                )


def _row(r: dict, kiln: dict, framework: str) -> str:
    """A framework's times, and how many times Kiln's are faster."""
    step = f"{r['step'] * 1e3:8.2f}" if r.get("step") else f"{'-':>8}"
    predict = f"{r['predict']:9.2f}" if "predict" in r else f"{'-':>9}"
    ratios = []
    if framework != "kiln":
        ratios = [f"{r[k] / kiln[k]:.1f}x" for k in ("epoch", "predict") if k in r and k in kiln]
    return f"{step} {r['epoch']:8.2f} {predict}  {', '.join(ratios):>34}"


if __name__ == "__main__":
    main()
