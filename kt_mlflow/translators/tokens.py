"""Blocks as token sequences: every kernel slice (one output x one input channel) is a token.

For the paper's pair the large block's two 6x6x3x3 conv weights give 72 tokens of 9 numbers and the
small block's two convs give 36 tokens; all of that is derived here from the family's registry entry.
With ``bn_aware`` each BN is folded into its conv (scale) and its shift is appended to every token of
that output channel, so the translator sees the whole function of the large block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from ..blocks import BlockFamily, fold_bn
from ..errors import KTError

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenLayout:
    """Which conv weights become tokens, their shapes, and the token width."""

    keys: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    extra: int = 0  # per-token features beyond the kernel (BN shift)

    @property
    def tokens(self) -> int:
        return sum(s[0] * s[1] for s in self.shapes)

    @property
    def kernel_numel(self) -> int:
        return self.shapes[0][2] * self.shapes[0][3]

    @property
    def dim(self) -> int:
        return self.kernel_numel + self.extra


def layout(family: BlockFamily, which: str, bn_aware: bool = False) -> TokenLayout:
    shapes = family.weight_shapes(which)
    kernels = {s[2:] for s in shapes.values()}
    if len(kernels) != 1:
        raise KTError(f"family {family.name}: {which} block convs have different kernel sizes {kernels}; "
                      f"tokens need one kernel size per block.")
    return TokenLayout(tuple(shapes), tuple(shapes.values()), extra=1 if bn_aware and which == "large" else 0)


def encode_source(family: BlockFamily, large: State, bn_aware: bool = False) -> torch.Tensor:
    """Stacked large blocks ``(P, ...)`` -> tokens ``(P, T, D)``."""
    lay = layout(family, "large", bn_aware)
    if bn_aware:
        weights, shifts = fold_bn(family, large)
    parts = []
    for key in lay.keys:
        w = weights[key] if bn_aware else large[key]
        p, o, i = w.shape[:3]
        tok = w.reshape(p, o * i, lay.kernel_numel)
        if bn_aware:
            tok = torch.cat([tok, shifts[key][:, :, None].expand(p, o, i).reshape(p, o * i, 1)], dim=-1)
        parts.append(tok)
    return torch.cat(parts, dim=1)


def encode_target(family: BlockFamily, small: State) -> torch.Tensor:
    """Stacked small blocks -> tokens ``(P, T_out, k*k)``."""
    lay = layout(family, "small")
    return torch.cat([small[k].reshape(small[k].shape[0], -1, lay.kernel_numel) for k in lay.keys], dim=1)


def decode_target(family: BlockFamily, tokens: torch.Tensor) -> State:
    """Tokens ``(P, T_out, k*k)`` -> stacked small-block conv weights."""
    lay = layout(family, "small")
    out, start = {}, 0
    for key, shape in zip(lay.keys, lay.shapes):
        n = shape[0] * shape[1]
        out[key] = tokens[:, start: start + n].reshape(tokens.shape[0], *shape)
        start += n
    return out
