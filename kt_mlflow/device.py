"""Where work runs: the GPU when there is one, else every CPU core (shared among a machine's ranks)."""
from __future__ import annotations

import os

import torch

from .distributed import world
from .errors import KTError


def cpu_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_share() -> int:
    """This rank's cores: torchrun's processes on one machine split its cores evenly."""
    return max(1, cpu_cores() // world().local_size)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (this rank's cores). Under torchrun ``cuda``
    means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KTError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu or auto.")
    if name == "cuda" and world().distributed:
        name = f"cuda:{world().local_rank}"
    if name == "cpu":
        torch.set_num_threads(cpu_share())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KTError(f"unknown --device {name!r}; use auto, cpu or cuda[:N].") from None
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise KTError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                          f"start at most that many ranks per machine or pick another index.")
        torch.cuda.set_device(device)
    return device
