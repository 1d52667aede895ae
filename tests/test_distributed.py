"""Data-parallel training over real processes (torch.distributed, gloo, on loopback):
tests/distributed_train.py launched by torchrun with 2 and 3 processes against the same
script run alone with the global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from frontends import keras  # noqa: E402
from frontends.keras.distribution import DistributedError  # noqa: E402

SCRIPT = Path(__file__).with_name("distributed_train.py")
TIMEOUT = 300  # seconds a whole launch may take on a busy 2-core machine


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*cmd, str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT)


def _alone(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )


def _ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _results(out: Path, nproc: int) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(nproc)]


def _assert_replicas_identical(results: list[dict[str, np.ndarray]]) -> None:
    for rank, other in enumerate(results[1:], start=1):
        for key, value in results[0].items():
            assert np.array_equal(value, other[key]), f"process {rank}'s {key} differs from process 0's"


@pytest.mark.parametrize("nproc", [2, 3])
def test_mlp_with_dropout_matches_one_process(tmp_path, nproc):
    """97 rows in batches of 32: the last batch has one row, so with 2 or 3 processes
    some take none and still join the step."""
    _ok(_alone("mlp", str(tmp_path / "alone")))
    run = _torchrun(nproc, "mlp", str(tmp_path / "dp"))
    _ok(run)
    assert run.stdout.count("loss:") == 2, run.stdout  # 2 epochs, printed by process 0 alone
    assert sorted(p.name for p in (tmp_path / "dp").glob("log*.csv")) == ["log0.csv"]
    results = _results(tmp_path / "dp", nproc)
    _assert_replicas_identical(results)
    (alone,) = _results(tmp_path / "alone", 1)
    assert set(alone) == set(results[0])
    for key, value in alone.items():
        np.testing.assert_allclose(results[0][key], value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_cnn_with_batchnorm_replicas_stay_identical(tmp_path):
    _ok(_torchrun(2, "cnn", str(tmp_path)))
    results = _results(tmp_path, 2)
    _assert_replicas_identical(results)
    assert np.all(np.diff(results[0]["history_loss"]) < 0), results[0]["history_loss"]


def _batchnorm_rule(x: np.ndarray, nproc: int, batch: int, momentum: float = 0.99):
    """The moving statistics data-parallel training gives: each process normalizes with
    its own rows' statistics, and the moving statistics move towards the average of the
    processes' statistics weighted by their rows (ProcessGroup.rows's slices)."""
    mean, var = np.zeros(x.shape[1]), np.ones(x.shape[1])
    for start in range(0, len(x), batch):
        rows = x[start : start + batch].astype(np.float64)
        base, extra = divmod(len(rows), nproc)
        sizes = [base + (r < extra) for r in range(nproc)]
        bounds = np.cumsum([0, *sizes])
        shards = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        shares = [len(s) / len(rows) for s in shards]
        shard_mean = sum(w * s.mean(0) for w, s in zip(shares, shards))
        shard_var = sum(w * s.var(0) for w, s in zip(shares, shards))
        mean = momentum * mean + (1 - momentum) * shard_mean
        var = momentum * var + (1 - momentum) * shard_var
    return mean, var


def test_batchnorm_moving_statistics_follow_their_rule(tmp_path):
    """BatchNormalization on the inputs, unshuffled: the moving statistics after one
    epoch, computed from the data alone."""
    _ok(_torchrun(2, "bn", str(tmp_path), "--epochs", "1", "--no-shuffle"))
    results = _results(tmp_path, 2)
    _assert_replicas_identical(results)
    sys.path.insert(0, str(SCRIPT.parent))
    from distributed_train import data

    x, _ = data("bn")
    mean, var = _batchnorm_rule(x, nproc=2, batch=32)
    # weights: gamma, beta, moving_mean, moving_variance, then the Dense layer's
    np.testing.assert_allclose(results[0]["weight_2"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0]["weight_3"], var, rtol=1e-5, atol=1e-6)
    # not one process's rule: the variance within each process's rows is not the batch's
    _, single_var = _batchnorm_rule(x, nproc=1, batch=32)
    assert np.abs(results[0]["weight_3"] - single_var).max() > 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(nproc: int, *args: str) -> list[subprocess.Popen]:
    """The script in `nproc` processes started directly with the launcher's variables
    (no torchrun, which would kill the others as soon as one fails)."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, **pipes))
    return procs


@pytest.mark.parametrize(
    "failure, expected",
    [
        (["--die-at-step", "2", "--timeout", "30"], "another process died"),
        (["--hang-at-step", "1", "--timeout", "5"], "did not answer within 5 s"),
    ],
    ids=["dies", "hangs"],
)
def test_a_failed_process_fails_the_others_with_a_clear_error(tmp_path, failure, expected):
    """Process 1 exits or stops answering mid-training: process 0 fails with a
    DistributedError, at once or after the timeout, instead of waiting forever."""
    procs = _processes(2, "mlp", str(tmp_path), *failure)
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert "DistributedError" in err and expected in err, err[-3000:]


def test_processes_that_disagree_are_named(tmp_path):
    procs = _processes(2, "mlp", str(tmp_path), "--rank1-batch-size", "16", "--timeout", "30")
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode != 0
        assert "process 1 differs from process 0 in batch_size: 16 vs 32" in err, err[-3000:]


def test_one_process_keeps_the_fused_step(monkeypatch):
    """DataParallel in a lone process (no launcher): fit runs the fused train step, and
    the results are bit for bit those without DataParallel."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 40)

    def train():
        keras.utils.set_random_seed(3)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        m.fit(x, y, batch_size=16, epochs=2, verbose=0)
        return m.get_weights(), [k for k in m._programs if k[0] == "train"]

    plain, _ = train()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        parallel, programs = train()
    finally:
        keras.distribution.set_distribution(None)
    assert all(k[1] != "data_parallel" for k in programs)
    for a, b in zip(plain, parallel):
        assert np.array_equal(a, b)


def test_several_processes_without_initialize_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        m.compile(optimizer="sgd", loss="mse")
        with pytest.raises(DistributedError, match="initialize\\(\\) was not called"):
            m.fit(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), verbose=0)
    finally:
        keras.distribution.set_distribution(None)
