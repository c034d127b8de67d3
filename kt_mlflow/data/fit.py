"""Fitting a dataset to a network's input: image size, channels, "digits in colour", then normalisation.

Size: smaller images are zero-padded symmetrically (MNIST 28 -> 32 pads 2 a side, as LeNet did), larger
ones resized (bilinear, antialiased). Channels: gray -> RGB repeats the image, RGB -> gray takes luma
(0.299 R + 0.587 G + 0.114 B). ``colour`` paints each gray image with its own foreground and background
colour, drawn from a fixed seed and the image's position, so every run sees the same images.

Example:
    >>> import torch
    >>> fit_images(torch.zeros(2, 1, 28, 28), channels=3, image_size=32, colour=True).shape
    torch.Size([2, 3, 32, 32])
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import KTError
from .images import ImageData, RawImages, channel_stats, normalise

COLOUR_SEED = 20240112  # fixed: the colours of image i are the same in every run and every worker
MIN_CONTRAST = 0.3  # Euclidean RGB distance below which a background is redrawn, so the digit stays visible
MIN_IMAGE_SIZE = 4
_ATTEMPTS = 128  # background redraws; each is ~9% likely to be needed, so 128 never run out in practice
_LUMA = (0.299, 0.587, 0.114)


def check_fit_args(dataset: str, source_channels: Optional[int], channels: int, image_size: int,
                   colour: bool) -> None:
    """One-line KTErrors for a network input no dataset can be fitted to; ``source_channels`` None: any."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 3):
        raise KTError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; "
                      "give the network 1 or 3 input channels.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise KTError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}.")
    if colour and (source_channels != 1 or channels != 3):
        raise KTError(f"colour=True paints grayscale images in colour, so it applies to digits, mnist or "
                      f"fashion_mnist with channels=3 (got {dataset} with channels={channels}); drop colour.")


def fitted_name(base: str, source: Tuple[int, int], channels: int, image_size: int, colour: bool) -> str:
    """What the fitted dataset is, e.g. ``mnist-colour-32`` or ``cifar10-gray-28``; the unfitted base stays bare.

    Example:
        >>> fitted_name("cifar10", (3, 32), channels=1, image_size=28, colour=False)
        'cifar10-gray-28'
    """
    mode = "colour" if colour else "" if channels == source[0] else "gray" if channels == 1 else "rgb"
    if not mode and image_size == source[1]:
        return base
    return "-".join(p for p in (base, mode, str(image_size)) if p)


def fit_size(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """``(N, C, H, W)`` pixels in [0, 1] brought to ``image_size`` square: zero-padded if smaller, else resized."""
    h, w = x.shape[-2:]
    if (h, w) == (image_size, image_size):
        return x
    if h <= image_size and w <= image_size:  # pad in the raw pixel domain, so the border is background (0)
        top, left = (image_size - h) // 2, (image_size - w) // 2
        return F.pad(x, (left, image_size - w - left, top, image_size - h - top))
    resized = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 counters into uniform-looking bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(stream: int, index: np.ndarray, attempt: int, component: int) -> np.ndarray:
    """Floats in [0, 1): a pure function of (seed, stream, image index, attempt, component), no RNG state."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        key = _mix(np.array([COLOUR_SEED * 4 + stream], dtype=np.uint64))
        counter = index * np.uint64(1024) + np.uint64(attempt * 8 + component)
        bits = _mix(_mix(counter + key))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def colour_pairs(n: int, stream: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background RGB ``(n, 3)`` for images 0..n-1 of a split (train: stream 0, test: 1).

    A background closer than ``MIN_CONTRAST`` to its foreground is redrawn (deterministically).

    Example:
        >>> fg, bg = colour_pairs(5, stream=0)
        >>> bool(((fg - bg).norm(dim=1) >= MIN_CONTRAST).all())
        True
    """
    index = np.arange(n, dtype=np.uint64)
    fg = np.stack([_uniform(stream, index, 0, k) for k in range(3)], axis=1)
    bg = np.stack([_uniform(stream, index, 0, 3 + k) for k in range(3)], axis=1)
    for attempt in range(1, _ATTEMPTS):
        close = np.linalg.norm(fg - bg, axis=1) < MIN_CONTRAST
        if not close.any():
            break
        bg[close] = np.stack([_uniform(stream, index[close], attempt, 3 + k) for k in range(3)], axis=1)
    return torch.from_numpy(fg.astype(np.float32)), torch.from_numpy(bg.astype(np.float32))


def colourise(x: torch.Tensor, stream: int) -> torch.Tensor:
    """Gray ``(N, 1, H, W)`` in [0, 1] to RGB: ``background * (1 - a) + foreground * a`` with ``a`` the gray."""
    fg, bg = colour_pairs(len(x), stream)
    return torch.lerp(bg[:, :, None, None], fg[:, :, None, None], x)  # weight 0 gives exactly the background


def fit_images(x: torch.Tensor, channels: int, image_size: int, colour: bool = False,
               stream: int = 0) -> torch.Tensor:
    """Pixels in [0, 1] ``(N, C, H, W)`` fitted to ``channels`` x ``image_size`` x ``image_size``, still in [0, 1].

    Example:
        >>> fit_images(torch.ones(1, 3, 32, 32), channels=1, image_size=28).shape
        torch.Size([1, 1, 28, 28])
    """
    x = fit_size(x, image_size)
    source = x.shape[1]
    if colour:
        if (source, channels) != (1, 3):
            raise KTError(f"colour=True turns 1-channel images into 3 channels, not {source} into {channels}.")
        return colourise(x, stream)
    if source == channels:
        return x
    if (source, channels) == (1, 3):
        return x.repeat(1, 3, 1, 1)
    if (source, channels) == (3, 1):
        r, g, b = _LUMA
        return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]
    raise KTError(f"cannot fit {source}-channel images to {channels} channels; use channels=1 or 3.")


def fit_dataset(raw: RawImages, channels: int, image_size: int, colour: bool = False,
                fixed: Optional[Tuple[float, float]] = None) -> ImageData:
    """Fit ``raw`` to the network's input and normalise it.

    Unfitted with ``fixed`` (mean, std) given, it is normalised with those exactly as before (MNIST's
    constants); otherwise per channel with the fitted train split's own mean and std.
    """
    source = (raw.train_x.shape[1], raw.train_x.shape[2])
    unfitted = tuple(raw.train_x.shape[1:]) == (channels, image_size, image_size) and not colour
    if unfitted and fixed is not None:
        mean, std = fixed
        return ImageData(raw.name, ((raw.train_x.float() / 255.0) - mean) / std, raw.train_y,
                         ((raw.test_x.float() / 255.0) - mean) / std, raw.test_y)
    train = fit_images(raw.train_x.float() / 255.0, channels, image_size, colour, stream=0)
    test = fit_images(raw.test_x.float() / 255.0, channels, image_size, colour, stream=1)
    means, stds = channel_stats(train)
    name = fitted_name(raw.name, source, channels, image_size, colour)
    return ImageData(name, normalise(train, means, stds), raw.train_y, normalise(test, means, stds), raw.test_y)
