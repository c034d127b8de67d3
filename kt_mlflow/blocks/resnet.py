"""The residual family of the KT paper: a conv stem, a residual block, a conv+linear head.

``BasicBlock`` (two conv+BN, residual) is the large block; ``BottleneckBlock`` (conv -> ReLU -> conv,
no BN, residual) is the small one. Shapes come from the family's config, never from constants here.
Each block also knows its own function-preserving symmetries (used by the translation recipes).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import StackedLinear, conv, conv_out_size


class BeginBlock(nn.Module):
    """conv(k) -> BN -> ReLU -> MaxPool(3, stride 2, pad 1)."""

    def __init__(self, cin: int, width: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.conv = conv(cin, width, kernel, members=members)
        self.bn = nn.BatchNorm2d(width * members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max-pool then ReLU: the same values and gradients as ReLU then max-pool (ReLU is monotone and
        # the pooling picks the same element), with the ReLU and its backward on a 4x smaller tensor.
        return F.relu(F.max_pool2d(self.bn(self.conv(x)), 3, stride=2, padding=1), inplace=True)


class BasicBlock(nn.Module):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + x): the large block."""

    # Which BN (if any) follows each conv weight: the translator's view of the block.
    conv_bn = {"conv1.weight": "bn1", "conv2.weight": "bn2"}

    def __init__(self, width: int, hidden: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(width, hidden, kernel, members=members)
        self.bn1 = nn.BatchNorm2d(hidden * members)
        self.conv2 = conv(hidden, width, kernel, members=members)
        self.bn2 = nn.BatchNorm2d(width * members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + x, inplace=True)

    @staticmethod
    def permute_hidden(state: Dict[str, torch.Tensor], perm: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Reorder hidden channels (conv1 outputs, bn1, conv2 inputs): the block's function is unchanged.

        ``state`` tensors may carry leading batch axes; ``perm`` is ``(..., hidden)`` matching them.
        """
        out = dict(state)
        lead = perm.dim() - 1

        def take(t: torch.Tensor, axis: int) -> torch.Tensor:
            shape = [1] * t.dim()
            shape[: lead] = perm.shape[:-1]
            shape[axis] = perm.shape[-1]
            return torch.take_along_dim(t, perm.reshape(shape), dim=axis)

        out["conv1.weight"] = take(state["conv1.weight"], lead)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"bn1.{name}"] = take(state[f"bn1.{name}"], lead)
        out["conv2.weight"] = take(state["conv2.weight"], lead + 1)
        return out


class BottleneckBlock(nn.Module):
    """ReLU(conv(ReLU(conv(x))) + x) with a narrow hidden width and no BN: the small block."""

    conv_bn = {"conv1.weight": None, "conv2.weight": None}

    def __init__(self, width: int, hidden: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(width, hidden, kernel, members=members)
        self.conv2 = conv(hidden, width, kernel, members=members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x), inplace=True)) + x, inplace=True)

    @staticmethod
    def canonicalize(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One representative of the weights' symmetry class (same function, fixed scale and order).

        ReLU is positively homogeneous, so hidden channel j's input filter can be scaled by a > 0
        and its output weights by 1/a; we pick a so both have the same norm. Hidden channels can be
        permuted; we sort them by that (now invariant) norm, largest first. Leading batch axes allowed.
        """
        w1, w2 = state["conv1.weight"], state["conv2.weight"]  # (..., h, c, k, k), (..., c, h, k, k)
        n1 = w1.flatten(-3).norm(dim=-1).clamp_min(1e-12)  # (..., h)
        n2 = w2.transpose(-4, -3).flatten(-3).norm(dim=-1).clamp_min(1e-12)  # (..., h)
        a = (n2 / n1).sqrt()
        w1 = w1 * a[..., :, None, None, None]
        w2 = w2 / a[..., None, :, None, None]
        order = (n1 * n2).argsort(dim=-1, descending=True)
        w1 = torch.take_along_dim(w1, order[..., :, None, None, None], dim=-4)
        w2 = torch.take_along_dim(w2, order[..., None, :, None, None], dim=-3)
        return {**state, "conv1.weight": w1, "conv2.weight": w2}


class LastBlock(nn.Module):
    """conv1x1(stride 2) -> BN -> ReLU -> flatten -> Linear(num_classes)."""

    def __init__(self, width: int, last_width: int, spatial: int, num_classes: int, members: int = 1) -> None:
        super().__init__()
        self.members = members
        # A strided 1x1 conv is a subsampling then a 1x1 conv. Written that way because torch 2.14's CPU
        # backward of a strided 1x1 conv on channels-last input returns wrong weight gradients.
        self.stride = 2
        self.conv = conv(width, last_width, 1, members=members)
        self.bn = nn.BatchNorm2d(last_width * members)
        out = conv_out_size(spatial, 1, self.stride, 0)
        self.fc = StackedLinear(last_width * out * out, num_classes, members=members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x[:, :, :: self.stride, :: self.stride])), inplace=True)
        return self.fc(x.reshape(x.shape[0], -1))


class KTNetwork(nn.Module):
    """begin -> block -> last. Input ``(B, members*C, H, W)``, output ``(B, members*num_classes)``."""

    def __init__(self, begin: nn.Module, block: nn.Module, last: nn.Module, members: int = 1) -> None:
        super().__init__()
        self.members = members
        self.begin, self.block, self.last = begin, block, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.begin(x)))


def stem_out_size(image_size: int) -> int:
    return conv_out_size(image_size, 3, 2, 1)


def parameter_count(modules: Sequence[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
