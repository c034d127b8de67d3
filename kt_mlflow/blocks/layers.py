"""Layers that hold ``members`` independent copies of themselves side by side.

Every tensor keeps the member axis folded into dim 0 (conv weights ``(members*out, in, k, k)``,
BN vectors ``(members*C,)``, linear weights ``(members*out, in)``) and activations carry it folded
into the channel axis ``(B, members*C, H, W)``. With ``members=1`` these are exactly the ordinary
PyTorch layers, so one model definition serves a user's single network and the vectorised trainer
that trains K networks in one process: grouped convolutions keep the members apart, and
``BatchNorm2d`` over ``members*C`` channels keeps running statistics per member.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def conv(cin: int, cout: int, kernel: int, stride: int = 1, members: int = 1) -> nn.Conv2d:
    """A bias-free 'same'-padded convolution, ``members`` copies in one grouped conv."""
    return nn.Conv2d(
        cin * members, cout * members, kernel, stride=stride, padding=kernel // 2, groups=members, bias=False
    )


class StackedLinear(nn.Module):
    """``members`` independent ``Linear(cin, cout)`` layers; input ``(B, members*cin)``."""

    def __init__(self, cin: int, cout: int, members: int = 1) -> None:
        super().__init__()
        self.cin, self.cout, self.members = cin, cout, members
        self.weight = nn.Parameter(torch.empty(members * cout, cin))
        self.bias = nn.Parameter(torch.empty(members * cout))
        # Same distribution as nn.Linear's default, member by member.
        bound = 1.0 / math.sqrt(cin)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = self.weight.view(self.members, self.cout, self.cin)
        y = torch.einsum("bmi,moi->bmo", x.reshape(b, self.members, self.cin), w)
        return (y + self.bias.view(self.members, self.cout)).reshape(b, self.members * self.cout)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
