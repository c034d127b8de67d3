"""Layers that hold ``members`` independent copies of themselves side by side.

Every tensor keeps the member axis folded into dim 0 (conv weights ``(members*out, in, k, k)``,
BN vectors ``(members*C,)``, linear weights ``(members*out, in)``) and activations carry it folded
into the channel axis ``(B, members*C, H, W)``. With ``members=1`` these are exactly the ordinary
PyTorch layers, so one model definition serves a user's single network and the vectorised trainer
that trains K networks in one process: grouped convolutions keep the members apart, and
``BatchNorm2d`` over ``members*C`` channels keeps running statistics per member.

On a CPU the trainer switches a stacked network to interleaved activations (``set_interleaved``:
channel ``c*members + m``), where convolutions run ``native.member_conv2d``; parameters and state
dicts stay member major in both layouts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .native import member_conv2d, member_order, stacked_order


class StackedConv2d(nn.Conv2d):
    """``members`` convolutions: grouped (member major) or native (interleaved; 'same' padding only)."""

    interleaved = False

    def forward(self, x: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        return self.run(x, self.weight, stride)

    def run(self, x: torch.Tensor, weight: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        """This layer's convolution with another ``weight`` (e.g. BN-scaled) and/or ``stride``."""
        stride = self.stride[0] if stride is None else stride
        if self.interleaved:
            y = member_conv2d(x, weight, self.groups, stride)
            return y if self.bias is None else y + member_order(self.bias, self.groups)[:, None, None]
        return F.conv2d(x, weight, self.bias, stride, self.padding, groups=self.groups)


class StackedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` over ``members*C`` channels; statistics and parameters per member in both layouts."""

    interleaved = False

    def __init__(self, channels: int, members: int = 1) -> None:
        super().__init__(channels * members)
        self.members = members

    def channels(self, v: torch.Tensor) -> torch.Tensor:
        """A member-major per-channel vector in the activations' channel order."""
        return member_order(v, self.members) if self.interleaved and self.members > 1 else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.interleaved or self.members == 1:  # one member: both layouts are the same
            return super().forward(x)
        # The buffers stay member major; F.batch_norm updates interleaved copies, written back after.
        mean, var = self.channels(self.running_mean), self.channels(self.running_var)
        momentum = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y = F.batch_norm(x, mean, var, self.channels(self.weight), self.channels(self.bias), self.training,
                         momentum, self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(stacked_order(mean, self.members))
                self.running_var.copy_(stacked_order(var, self.members))
        return y


def conv(cin: int, cout: int, kernel: int, stride: int = 1, members: int = 1) -> StackedConv2d:
    """A bias-free 'same'-padded convolution, ``members`` copies in one grouped conv."""
    return StackedConv2d(
        cin * members, cout * members, kernel, stride=stride, padding=kernel // 2, groups=members, bias=False
    )


def set_interleaved(module: nn.Module, on: bool) -> nn.Module:
    """Switch every stacked layer of ``module`` to interleaved activations (``on``) or member major."""
    for m in module.modules():
        if hasattr(type(m), "interleaved"):
            m.interleaved = on
    return module


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
