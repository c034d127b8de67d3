"""Augmentation for scarce pairs (arXiv 2401.05772): random masking and Gaussian noise, on the device."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Part = Optional[Tuple[torch.Tensor, int]]   # (positions of this rank's rows within the batch, batch size)


def batch_noise(shape: Tuple[int, ...], gen: torch.Generator, part: Part = None, uniform: bool = False) -> torch.Tensor:
    """N(0, 1) (or U(0, 1)) noise of ``shape``, one row per pair: drawn for the whole batch and cut to
    this rank's rows when ``part`` says which they are."""
    draw = torch.rand if uniform else torch.randn
    if part is None:
        return draw(shape, generator=gen)
    pos, total = part
    return draw((total, *shape[1:]), generator=gen)[pos.cpu()]


def mask_and_noise(x: torch.Tensor, mask_ratio: float, noise_std: float,
                   gen: Optional[torch.Generator] = None, part: Part = None) -> torch.Tensor:
    """Zero each element with probability ``mask_ratio``, then add N(0, noise_std^2) noise (drawn for
    the whole batch when ``part`` names this rank's rows of it).

    Example:
        >>> mask_and_noise(torch.ones(4), 0.0, 0.0)
        tensor([1., 1., 1., 1.])
    """
    gen = gen or torch.default_generator
    if mask_ratio > 0:
        x = x * (batch_noise(x.shape, gen, part, uniform=True).to(x.device) >= mask_ratio)
    if noise_std > 0:
        x = x + noise_std * batch_noise(x.shape, gen, part).to(x.device)
    return x


def augment_pair(src: torch.Tensor, dst: torch.Tensor, mask_ratio: float, noise_std: float, augment_on: str,
                 gen: Optional[torch.Generator] = None, part: Part = None) -> tuple:
    if augment_on in ("source", "both"):
        src = mask_and_noise(src, mask_ratio, noise_std, gen, part)
    if augment_on in ("target", "both"):
        dst = mask_and_noise(dst, mask_ratio, noise_std, gen, part)
    return src, dst
