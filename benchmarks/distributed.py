"""Data-parallel training: the MNIST-CNN `fit` epoch in one process and in N processes
(torchrun, gloo on loopback), with the all-reduce's share of the step.

    python benchmarks/distributed.py                 # 6,000 rows, batch 64, 1 and 2 processes
    python benchmarks/distributed.py --rows 60000 --procs 1,2

Each configuration uses all the machine's cores: one process with every core as Kiln
threads, or N processes with cores/N threads each. The model is benchmarks/training.py's
Keras MNIST CNN (Adam). Per configuration, in fresh processes: an epoch over a few
batches to compile and warm up, then the timed epoch. Each process adds up the seconds
it spends inside the all-reduce (which includes waiting for the slower process) and
the step count; process 0 reports.

What bounds it: the gradient buffer is the CNN's 34,826 float32 weights (136 KiB), so an
all-reduce moves little (about 0.5 ms on loopback for 136 KiB); a step at batch 64 is a
few GFLOP, tens of milliseconds. Two processes on two cores can at best match one
process using both cores as threads, and gain where Kiln's threads scale worse than
processes (the small kernels that one thread runs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import data, keras_model  # noqa: E402


def worker(rows: int, batch: int, out: Path) -> None:
    """One process's run (launched alone or by torchrun)."""
    from frontends import keras
    from frontends.keras import distribution

    if "RANK" in os.environ:
        keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    waited = {"seconds": 0.0, "calls": 0}
    reduce = distribution.ProcessGroup.all_reduce

    def timed_reduce(self, a, what):
        t0 = time.perf_counter()
        reduce(self, a, what)
        waited["seconds"] += time.perf_counter() - t0
        waited["calls"] += 1

    distribution.ProcessGroup.all_reduce = timed_reduce
    keras.utils.set_random_seed(0)
    m = keras_model(keras, "cnn")
    x, y = data("cnn", rows)
    warm = 2 * batch + rows % batch  # a full and the last partial batch: every program compiled
    m.fit(x[:warm], y[:warm], batch_size=batch, epochs=1, verbose=0)
    waited.update(seconds=0.0, calls=0)
    t0 = time.perf_counter()
    history = m.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    epoch = time.perf_counter() - t0
    if os.environ.get("RANK", "0") == "0":
        result = {"epoch": epoch, "steps": -(-rows // batch), "loss": history.history["loss"][-1], **waited}
        out.write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--json", type=Path, default=Path("build/distributed.json"))
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.rows, args.batch, args.worker)
        return
    cores = os.cpu_count() or 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    print(f"MNIST CNN, {args.rows} rows, batch {args.batch} (global), {cores} cores")
    print(f"{'processes':>9} {'threads':>7} {'epoch s':>8} {'ms/step':>8} {'all-reduce':>10} {'loss':>8}")
    for n in [int(v) for v in args.procs.split(",")]:
        threads = max(cores // n, 1)
        env = {**os.environ, "KILN_NUM_THREADS": str(threads)}
        out = args.json.with_suffix(f".{n}.tmp")
        script = [str(Path(__file__).resolve()), "--rows", str(args.rows), "--batch", str(args.batch)]
        script += ["--worker", str(out)]
        if n == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            cmd += script
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        r = json.loads(out.read_text())
        out.unlink()
        r["threads"] = threads
        share = r["seconds"] / r["epoch"]
        results[n] = r
        print(f"{n:>9} {threads:>7} {r['epoch']:>8.2f} {1e3 * r['epoch'] / r['steps']:>8.1f} "
              f"{share:>9.1%} {r['loss']:>8.4f}")  # fmt: skip
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
