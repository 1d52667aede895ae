"""keras.distribution: data-parallel training over processes, in Keras 3's shape.

    keras.distribution.initialize()                        # joins torchrun's process group
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model.fit(x, y, batch_size=64)                         # 64 rows per step over all processes

Every process runs the same program on the same data. Each step, every process takes a
contiguous slice of the global batch, computes its share of the gradients (see
trainer.gradient_graph), and one in-place all-reduce of a single float32 buffer sums
them before every process applies the same update: the replicas stay bit-identical.
The transport is torch.distributed with the gloo backend (`pip install kiln[distributed]`),
launched by `torchrun` or joined from an existing process group (Ray Train's
TorchTrainer makes one); Kiln imports torch only here, and only when asked to.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import numpy as np

from ir.errors import KilnError

#: seconds a collective waits for the other processes before it fails
DEFAULT_TIMEOUT = 300.0


class DistributedError(KilnError, RuntimeError):
    """A data-parallel run cannot go on: a process died or hung, or the processes disagree."""


def _torch_distributed():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError(
            "data-parallel training uses torch.distributed: pip install 'kiln[distributed]' "
            "(torch==2.13.0, the CPU build)"
        ) from e
    return torch, dist


class ProcessGroup:
    """The processes training together, and the collectives Kiln needs on numpy arrays
    (in place: torch.from_numpy shares the array's memory, nothing is copied)."""

    def __init__(self, timeout: float):
        self.torch, self.dist = _torch_distributed()
        self.rank = self.dist.get_rank()
        self.size = self.dist.get_world_size()
        self.timeout = timeout

    def _collective(self, what: str, op, *args):
        try:
            return op(*args)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            raise DistributedError(
                f"process {self.rank} of {self.size}: {what} failed: another process died or did "
                f"not answer within {self.timeout:g} s ({e})"
            ) from e

    def all_reduce(self, a: np.ndarray, what: str) -> None:
        """Sum `a` over the processes, in place."""
        self._collective(what, self.dist.all_reduce, self.torch.from_numpy(a))

    def broadcast(self, a: np.ndarray, what: str) -> None:
        """Overwrite `a` with process 0's, in place."""
        self._collective(what, self.dist.broadcast, self.torch.from_numpy(a), 0)

    def broadcast_object(self, obj, what: str):
        """Process 0's `obj` (picklable), on every process."""
        box = [obj]
        self._collective(what, self.dist.broadcast_object_list, box, 0)
        return box[0]

    def all_gather_object(self, obj, what: str) -> list:
        """Every process's `obj`, in rank order, on every process."""
        out = [None] * self.size
        self._collective(what, self.dist.all_gather_object, out, obj)
        return out

    def rows(self, n: int) -> slice:
        """This process's contiguous slice of a global batch of `n` rows: the first
        n % size processes take one row more (a process may take none)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


_group: ProcessGroup | None = None
_distribution: DataParallel | None = None

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def initialize(
    job_addresses: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Join the training processes. With no arguments, the launcher's environment says
    where (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or a process group
    that already exists is used (Ray Train's TorchTrainer makes one). As in Keras,
    `job_addresses` ("host:port", the coordinator), `num_processes` and `process_id`
    override the environment. A collective that waits more than `timeout` seconds for
    another process fails with a DistributedError instead of hanging."""
    global _group
    _, dist = _torch_distributed()
    if not dist.is_initialized():
        if job_addresses is not None:
            host, _, port = job_addresses.split(",")[0].rpartition(":")
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port
        if num_processes is not None:
            os.environ["WORLD_SIZE"] = str(num_processes)
        if process_id is not None:
            os.environ["RANK"] = str(process_id)
        missing = [v for v in _LAUNCHER_VARIABLES if v not in os.environ]
        if missing:
            raise DistributedError(
                f"keras.distribution.initialize(): {', '.join(missing)} not set; launch the script "
                "with `torchrun --nproc-per-node N script.py` (or pass job_addresses, num_processes "
                "and process_id)"
            )
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        # a group left to the interpreter's exit can abort the process (a gloo thread
        # still running): the group Kiln made, Kiln closes
        atexit.register(dist.destroy_process_group)
    elif dist.get_backend() != "gloo":
        raise DistributedError(
            f"the existing process group uses {dist.get_backend()!r}; Kiln all-reduces host "
            "memory, which needs the 'gloo' backend"
        )
    _group = ProcessGroup(timeout)


def process_group() -> ProcessGroup | None:
    """The group data-parallel training runs over: None for one process."""
    if _distribution is None:
        return None
    if _group is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DistributedError(
                "DataParallel is set and this is one of several processes (WORLD_SIZE="
                f"{os.environ['WORLD_SIZE']}), but keras.distribution.initialize() was not called"
            )
        return None
    return _group if _group.size > 1 else None


class DataParallel:
    """Each process holds the whole model and trains on its slice of every batch.
    Processes run on the CPU; `devices` (Keras's argument) may only name CPUs."""

    def __init__(self, devices=None, **kwargs):
        if devices is not None and any(not str(d).lower().startswith("cpu") for d in devices):
            raise ValueError(f"DataParallel runs each process on the CPU; got devices={devices}")
        self.devices = devices


def set_distribution(value: DataParallel | None) -> None:
    global _distribution
    if value is not None and not isinstance(value, DataParallel):
        raise TypeError(f"set_distribution takes a DataParallel or None, got {type(value).__name__}")
    _distribution = value


def distribution() -> DataParallel | None:
    """The distribution set by set_distribution (None: one process trains alone)."""
    return _distribution
