"""A Keras-style training script as a user writes it for data parallelism; the tests in
test_distributed.py launch it with torchrun (several processes) and alone (one process
with the global batch), and compare what each run saved.

    torchrun --standalone --nproc-per-node 2 tests/distributed_train.py mlp OUT_DIR
    python tests/distributed_train.py mlp OUT_DIR          # one process, the reference

Each process saves OUT_DIR/rank{R}.npz: its final weights and its history; fit logs
to OUT_DIR/log{R}.csv with a CSVLogger (which only process 0 runs) and prints a line
per epoch (only process 0 prints). `--die-at-step S` makes process 1 exit at step S,
`--hang-at-step S` stop answering there, `--rank1-batch-size B` call fit with another
batch size (the failure tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frontends import keras  # noqa: E402

ROWS = 97  # three batches of 32 and a last batch of 1: some processes get no rows


def data(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    shape = {"mlp": (ROWS, 20), "cnn": (ROWS, 8, 8, 2), "bn": (ROWS, 5)}[kind]
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 4, ROWS)
    return x, y


def model(kind: str) -> keras.Model:
    layers = keras.layers
    if kind == "mlp":
        stack = [
            keras.Input((20,)),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(4, activation="softmax"),
        ]
    elif kind == "bn":  # batch statistics of the inputs themselves: the test can compute them
        stack = [keras.Input((5,)), layers.BatchNormalization(), layers.Dense(4, activation="softmax")]
    else:
        stack = [
            keras.Input((8, 8, 2)),
            layers.Conv2D(6, 3, activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(4, activation="softmax"),
        ]
    return keras.Sequential(stack)


class FailAt(keras.callbacks.Callback):
    """Process 1 exits (as a crashed worker does) or stops answering at a step."""

    def __init__(self, step: int, hang: bool):
        super().__init__()
        self.step, self.hang = step, hang

    def on_train_batch_begin(self, batch, logs=None):
        if os.environ.get("RANK") == "1" and batch == self.step:
            if self.hang:
                time.sleep(3600)
            os._exit(17)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["mlp", "cnn", "bn"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--die-at-step", type=int)
    parser.add_argument("--hang-at-step", type=int)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument("--rank1-batch-size", type=int, help="process 1 disagrees on the batch size")
    args = parser.parse_args()
    if "RANK" in os.environ:
        keras.distribution.initialize(timeout=args.timeout)
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    keras.utils.set_random_seed(7)
    x, y = data(args.kind)
    m = model(args.kind)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rank = os.environ.get("RANK", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    callbacks = [keras.callbacks.CSVLogger(str(args.out / f"log{rank}.csv"))]
    if args.die_at_step is not None or args.hang_at_step is not None:
        hang = args.hang_at_step is not None
        callbacks.append(FailAt(args.hang_at_step if hang else args.die_at_step, hang))
    batch = args.rank1_batch_size if rank == "1" and args.rank1_batch_size else 32
    history = m.fit(
        x,
        y,
        batch_size=batch,
        epochs=args.epochs,
        verbose=2,
        callbacks=callbacks,
        shuffle=not args.no_shuffle,
    )
    logs = {f"history_{k}": np.array(v) for k, v in history.history.items()}
    weights = {f"weight_{i}": w for i, w in enumerate(m.get_weights())}
    np.savez(args.out / f"rank{rank}.npz", **logs, **weights)


if __name__ == "__main__":
    main()
