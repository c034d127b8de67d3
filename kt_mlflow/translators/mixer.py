"""The KT translator: an MLP-Mixer from large-block tokens to small-block tokens (arXiv 2401.05772)."""
from __future__ import annotations

import torch
from torch import nn

from ..blocks.native_ops import Dropout
from .linear import Linear


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(Linear(dim, hidden), nn.GELU(), Dropout(dropout), Linear(hidden, dim), Dropout(dropout))


class MixerLayer(nn.Module):
    """Token mixing (across the T tokens) then channel mixing (across the C features), each residual."""

    def __init__(self, tokens: int, width: int, token_hidden: int, channel_hidden: int, dropout: float) -> None:
        super().__init__()
        self.token_norm, self.token_mlp = nn.LayerNorm(width), FeedForward(tokens, token_hidden, dropout)
        self.channel_norm, self.channel_mlp = nn.LayerNorm(width), FeedForward(width, channel_hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class MixerTranslator(nn.Module):
    """(B, T_in, D_in) -> (B, T_out, D_out). Paper: depth 24, width 128, hidden 256/512, dropout 0.1.

    Example:
        >>> m = MixerTranslator(72, 9, 36, 9, depth=2, width=32)
        >>> m(torch.zeros(5, 72, 9)).shape
        torch.Size([5, 36, 9])
    """

    def __init__(self, in_tokens: int, in_dim: int, out_tokens: int, out_dim: int, depth: int = 24,
                 width: int = 128, token_hidden: int = 256, channel_hidden: int = 512, dropout: float = 0.1, **_: object) -> None:
        super().__init__()
        self.embed = Linear(in_dim, width)
        self.layers = nn.Sequential(*[MixerLayer(in_tokens, width, token_hidden, channel_hidden, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.token_proj = nn.Sequential(Linear(in_tokens, token_hidden), nn.GELU(), Linear(token_hidden, out_tokens))
        self.channel_proj = Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.embed(x)))
        x = self.token_proj(x.transpose(1, 2)).transpose(1, 2)
        return self.channel_proj(x)
