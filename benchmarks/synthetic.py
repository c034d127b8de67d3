"""Random parameters in a family's shapes, for benchmarks whose cost does not depend on the values."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def random_stack(module: nn.Module, n: int, generator: torch.Generator, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """``n`` random copies of ``module``'s float tensors, stacked ``(n, *shape)``; BN variances kept positive."""
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            x = scale * torch.randn((n, *v.shape), generator=generator)
            out[k] = x.abs() + 0.5 if "running_var" in k else x
    return out
