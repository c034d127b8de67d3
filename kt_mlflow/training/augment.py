"""Augmentation for scarce pairs (KT_SPEC.md): random masking and Gaussian noise, on the device."""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import KTError

TARGETS = ("source", "target", "both")


def check_augmentation(mask_ratio: float, noise_std: float, augment_on: str) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise KTError(f"--mask-ratio must be in [0, 1), got {mask_ratio}.")
    if noise_std < 0:
        raise KTError(f"--noise-std must be >= 0, got {noise_std}.")
    if augment_on not in TARGETS:
        raise KTError(f"--augment-on must be one of {', '.join(TARGETS)}, got {augment_on!r}.")


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
