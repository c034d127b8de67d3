"""A transformer-style family: patch embedding, the residual MLP block, mean-pool and classify.

Activations keep the conv families' layout ``(B, members*C, H, W)``, the patches on the H x W grid, so
the MLP block's two Linear layers are 1x1 convolutions over positions: every stacked form, the
translator's view (``TwoLayerBlock``) and the engine carry over unchanged. With ``members=1`` each
module computes exactly the plain PyTorch one: ``Linear(d, h) -> GELU -> Linear(h, d)`` on every
patch token, with an optional pre-LayerNorm, plus the residual.

Example:
    >>> block = MLPBlock(width=16, hidden=32)
    >>> block(torch.zeros(2, 16, 7, 7)).shape
    torch.Size([2, 16, 7, 7])
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kind import TwoLayerBlock
from .layers import StackedConv2d, StackedLinear


def pointwise(cin: int, cout: int, members: int = 1) -> StackedConv2d:
    """``members`` Linear(cin, cout) layers applied at every position (1x1 convs with a bias)."""
    return StackedConv2d(cin * members, cout * members, 1, groups=members, bias=True)


class StackedLayerNorm(nn.Module):
    """LayerNorm over each member's C channels at every position; input ``(B, members*C, H, W)``."""

    def __init__(self, channels: int, members: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.members, self.eps = channels, members, eps
        self.weight = nn.Parameter(torch.ones(members * channels))
        self.bias = nn.Parameter(torch.zeros(members * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        v = x.reshape(b, self.members, self.channels, h, w)
        mean = v.mean(2, keepdim=True)
        var = (v - mean).pow(2).mean(2, keepdim=True)
        shape = (1, self.members, self.channels, 1, 1)
        y = (v - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return y.reshape(b, -1, h, w)


class PatchBegin(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches -> ``width`` features each, then one token-mixing MLP.

    The token-mixing half of an MLP-Mixer layer (pre-LayerNorm, Linear over the patches, GELU, Linear
    back, residual) lets every token see the whole image before the residual MLP block (the channel-
    mixing half) and the mean-pool: a mean over tokens that never met cannot tell where a stroke was,
    and such networks stall near 30% on MNIST.
    """

    def __init__(self, cin: int, width: int, patch: int, image_size: int, members: int = 1) -> None:
        super().__init__()
        self.members, self.width, self.tokens = members, width, (image_size // patch) ** 2
        self.embed = StackedConv2d(cin * members, width * members, patch, stride=patch, groups=members, bias=True)
        self.norm = StackedLayerNorm(width, members)
        self.mix1 = StackedLinear(self.tokens, 2 * self.tokens, members)
        self.mix2 = StackedLinear(2 * self.tokens, self.tokens, members)

    def forward(self, x: torch.Tensor, moments=None) -> torch.Tensor:
        return self.preactivation(x)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The block's input (nothing follows the token mixing; see ``activate``)."""
        t = self.embed(x)                                              # (B, m*C, g, g)
        b, _, g, _ = t.shape
        m, c, n = self.members, self.width, self.tokens
        v = self.norm(t).reshape(b, m, c, n).transpose(1, 2).reshape(b * c, m * n)  # each channel's tokens
        mixed = self.mix2(F.gelu(self.mix1(v))).reshape(b, c, m, n).transpose(1, 2).reshape(b, m * c, g, g)
        return t + mixed

    @staticmethod
    def activate(pre: torch.Tensor) -> torch.Tensor:
        return pre


class MLPBlock(TwoLayerBlock):
    """x + fc2(GELU(fc1(LN(x)))) at every position: the residual MLP of transformers and MLP-Mixers."""

    layers = {"fc1.weight": None, "fc2.weight": None}
    holds_shifts = True

    def __init__(self, width: int, hidden: int, norm: bool = True, members: int = 1) -> None:
        super().__init__()
        self.norm = StackedLayerNorm(width, members) if norm else nn.Identity()
        self.fc1, self.fc2 = pointwise(width, hidden, members), pointwise(hidden, width, members)

    def forward(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        y = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return y if stride == 1 else y[:, :, ::stride, ::stride]

    def fold(self, state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The biases as shifts, and the LayerNorm's affine folded into fc1 (``W (g x + b) + c``)."""
        weights, shifts = super().fold(state)
        if isinstance(self.norm, StackedLayerNorm):
            g, b, w = state["norm.weight"], state["norm.bias"], weights["fc1.weight"]  # (P, d), (P, d), (P, h, d, 1, 1)
            shifts["fc1.weight"] = shifts["fc1.weight"] + torch.einsum("phd,pd->ph", w[..., 0, 0], b)
            weights["fc1.weight"] = w * g[:, None, :, None, None]
        return weights, shifts


class PoolLast(nn.Module):
    """LayerNorm -> mean over positions -> Linear(num_classes)."""

    stride = 1  # reads every position

    def __init__(self, width: int, num_classes: int, members: int = 1) -> None:
        super().__init__()
        self.norm = StackedLayerNorm(width, members)
        self.fc = StackedLinear(width, num_classes, members=members)

    def forward(self, x: torch.Tensor, subsampled: bool = False) -> torch.Tensor:
        return self.fc(self.norm(x).mean((-2, -1)))
