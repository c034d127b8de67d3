"""Where work runs: the GPU when there is one, else every CPU core."""
from __future__ import annotations

import os

import torch

from .errors import KTError


def cpu_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (using all cores)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KTError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu or auto.")
    if name == "cpu":
        torch.set_num_threads(cpu_cores())
    try:
        return torch.device(name)
    except RuntimeError:
        raise KTError(f"unknown --device {name!r}; use auto, cpu or cuda[:N].") from None
