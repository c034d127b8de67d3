"""The in-memory image containers, the fixed train/test split and per-channel normalisation.

Example:
    >>> import torch
    >>> raw = RawImages("toy", torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4),
    ...                 torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.arange(2))
    >>> raw.train_x.shape[1:]
    torch.Size([1, 8, 8])
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

SPLIT_SEED = 20240111  # fixed: every run and every worker sees the same train/test split
_STATS_CHUNK = 4096  # images per float64 block when computing channel statistics


@dataclass(frozen=True)
class ImageData:
    """Normalised images ``(N, C, H, W)`` float32 and int64 labels, already split.

    Example:
        >>> from kt_mlflow.data import load_dataset
        >>> load_dataset("digits").train_x.shape[1:]
        torch.Size([1, 28, 28])
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device) -> "ImageData":
        return ImageData(self.name, *(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


@dataclass(frozen=True)
class RawImages:
    """A split dataset as read: uint8 pixels ``(N, C, H, W)`` and int64 labels, not yet fitted or normalised."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split(x: torch.Tensor, y: torch.Tensor, n_test: int) -> Tuple[torch.Tensor, ...]:
    """``(train_x, train_y, test_x, test_y)``: a permutation fixed by ``SPLIT_SEED``, ``n_test`` images held out.

    Example:
        >>> [len(t) for t in split(torch.zeros(10, 1), torch.arange(10), n_test=2)]
        [8, 8, 2, 2]
    """
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and (population) std of ``(N, C, H, W)`` images.

    Summed in float64 numpy blocks in a fixed order, so the result does not depend on thread counts.
    A constant channel gets std 1 so that normalising it cannot divide by zero.

    Example:
        >>> channel_stats(torch.tensor([[[[0.0, 1.0]]]]))
        ((0.5,), (0.5,))
    """
    a = x.detach().cpu().numpy()
    n = a.shape[0] * a.shape[2] * a.shape[3]
    means, stds = [], []
    for c in range(a.shape[1]):
        total = squares = 0.0
        for i in range(0, len(a), _STATS_CHUNK):
            block = a[i: i + _STATS_CHUNK, c].astype(np.float64)
            total += float(block.sum())
            squares += float(np.square(block).sum())
        mean = total / n
        means.append(mean)
        stds.append(math.sqrt(max(squares / n - mean * mean, 0.0)) or 1.0)
    return tuple(means), tuple(stds)


def normalise(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place on ``x`` (a float tensor this module owns).

    Example:
        >>> normalise(torch.ones(1, 2, 1, 1), (0.5, 1.0), (0.5, 1.0)).flatten().tolist()
        [1.0, 0.0]
    """
    shape = (1, len(mean), 1, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return x.sub_(m).div_(s)
