"""A plain MLP translator over the flattened parameters, for comparison with the Mixer."""
from __future__ import annotations

import torch
from torch import nn

from ..blocks.native_ops import Dropout
from .linear import Linear


class MLPTranslator(nn.Module):
    """Flatten (T_in*D_in) -> ``depth`` hidden layers of ``width`` -> (T_out, D_out).

    Example:
        >>> MLPTranslator(72, 9, 36, 9, depth=2, width=64)(torch.zeros(3, 72, 9)).shape
        torch.Size([3, 36, 9])
    """

    def __init__(self, in_tokens: int, in_dim: int, out_tokens: int, out_dim: int, depth: int = 3,
                 width: int = 512, dropout: float = 0.1, **_: object) -> None:
        super().__init__()
        self.out_shape = (out_tokens, out_dim)
        layers, d = [], in_tokens * in_dim
        for _ in range(depth):
            layers += [Linear(d, width), nn.GELU(), Dropout(dropout)]
            d = width
        layers.append(Linear(d, out_tokens * out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).view(x.shape[0], *self.out_shape)
