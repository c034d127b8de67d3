"""Augmentation for scarce pairs (arXiv 2401.05772): random masking and Gaussian noise, on the device."""
from __future__ import annotations

from typing import Tuple

import torch


def mask_and_noise(x: torch.Tensor, mask_ratio: float, noise_std: float) -> torch.Tensor:
    """Zero each element with probability ``mask_ratio``, then add N(0, noise_std^2) noise.

    Example:
        >>> mask_and_noise(torch.ones(4), 0.0, 0.0)
        tensor([1., 1., 1., 1.])
    """
    if mask_ratio > 0:
        x = x * (torch.rand_like(x) >= mask_ratio)
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    return x


def augment_pair(src: torch.Tensor, dst: torch.Tensor, mask_ratio: float, noise_std: float,
                 augment_on: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if augment_on in ("source", "both"):
        src = mask_and_noise(src, mask_ratio, noise_std)
    if augment_on in ("target", "both"):
        dst = mask_and_noise(dst, mask_ratio, noise_std)
    return src, dst
