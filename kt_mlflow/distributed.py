"""One job on many processes, the torch.distributed way: torchrun starts them, this module says which
rank this process is and joins the job's process group.

A plain ``kt`` command is a job of one rank; ``torchrun --nproc-per-node 2 -m kt_mlflow generate ...``
is a job of two, each told its RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in its environment.

Example:
    >>> World().size, World().is_main
    (1, True)
"""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, List

from .errors import KTError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
TIMEOUT = timedelta(minutes=60)   # a rank waits this long for the slowest one at a barrier


@dataclass(frozen=True)
class World:
    """This process's place in the job (``size == 1`` outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 owns the MLflow run, the logging and the registration."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The job as torchrun describes it in the environment."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    try:
        rank, size, local_rank, local_size = (int(os.environ.get(k, "0" if "RANK" in k else "1")) for k in _ENV)
    except ValueError:
        raise KTError(f"torchrun's {'/'.join(_ENV)} must be whole numbers; start the job with torchrun.") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size):
        raise KTError(f"RANK {rank} / WORLD_SIZE {size} (LOCAL_RANK {local_rank} / LOCAL_WORLD_SIZE {local_size}) "
                      f"do not describe a job; start it with torchrun.")
    return World(rank, size, local_rank, local_size)


def _backend() -> str:
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _stop_on_sigterm() -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: exit through the normal path, so rank
    0's MLflow run ends as failed instead of being left running."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


@contextmanager
def process_group() -> Iterator[World]:
    """Join the job's process group for the block (nothing to join for a job of one)."""
    w = world()
    if not w.distributed:
        yield w
        return
    import torch.distributed as dist

    _stop_on_sigterm()
    dist.init_process_group(_backend(), timeout=TIMEOUT)
    try:
        yield w
    except BaseException:
        dist.destroy_process_group()   # no barrier: the other ranks may never reach it
        raise
    # A job that ends well tears its group down on every rank together, so that no rank exits while
    # another still works (rank 0 logging to MLflow).
    dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (returns at once in a job of one)."""
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: List[float]) -> List[float]:
    """``values`` summed over the ranks (float64; ``values`` itself in a job of one)."""
    if not world().distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (``flag`` itself in a job of one)."""
    return bool(all_sum([float(flag)])[0]) if world().distributed else flag


def broadcast_json(obj: Any = None) -> Any:
    """Rank 0's ``obj`` (JSON data) on every rank, sent as UTF-8 bytes: nothing is unpickled."""
    if not world().distributed:
        return obj
    import torch
    import torch.distributed as dist

    data = json.dumps(obj).encode() if world().is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.tolist()).decode())
