"""Blocks as token sequences: every kernel slice (one output x one input channel) is a token.

For the paper's pair the large block's two 6x6x3x3 conv weights give 72 tokens of 9 numbers and the
small block's two convs give 36 tokens; all of that is derived here from the family's registry entry.
With ``bn_aware`` each BN is folded into its conv (scale) and its shift is appended to every token of
that output channel, so the translator sees the whole function of the large block; ``encode_rescaled``
also puts it in its balanced scale coordinates first (see ``rescale``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..blocks import BlockFamily, bn_output_stats, fold_bn
from ..errors import KTError
from . import rescale

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


def layout(family: BlockFamily, which: str, bn_aware: bool = False, bn_stats: bool = False) -> TokenLayout:
    shapes = family.weight_shapes(which)
    kernels = {s[2:] for s in shapes.values()}
    if len(kernels) != 1:
        raise KTError(f"family {family.name}: {which} block convs have different kernel sizes {kernels}; "
                      f"tokens need one kernel size per block.")
    if which == "large":
        extra = (1 + 2 * bn_stats) if bn_aware else 0
    else:  # a small block that holds shifts (BN, biases) gets them written too
        extra = int(family.prototype("small").holds_shifts)
    return TokenLayout(tuple(shapes), tuple(shapes.values()), extra=extra)


def encode_source(family: BlockFamily, large: State, bn_aware: bool = False, bn_stats: bool = False) -> torch.Tensor:
    """Stacked large blocks ``(P, ...)`` -> tokens ``(P, T, D)``.

    ``bn_stats`` (with ``bn_aware``) also appends the mean and standard deviation of the token's output
    channel after BN (``bn_output_stats``): how that channel is distributed on the training data.
    """
    if not bn_aware:
        return _source_tokens(family, large, {})
    weights, shifts = fold_bn(family, large)
    stats = bn_output_stats(family, large) if bn_stats else None
    return _source_tokens(family, weights, _channel_features(shifts, stats))


def encode_rescaled(family: BlockFamily, large: State, bn_stats: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN-aware tokens of each large block in its balanced scale coordinates (``rescale.balance``), and
    the residual scales ``(P, R)`` that map the small block written there back (``small_to_original``)."""
    lay = layout(family, "large", True)
    shapes = [s[:2] for s in lay.shapes]
    if len(shapes) != 2 or shapes[0] != shapes[1][::-1]:
        raise KTError(f"family {family.name}: rescaling needs a large block of two convs in -> hidden -> in, "
                      f"got conv shapes {lay.shapes}; train without the rescale switch.")
    weights, shifts = fold_bn(family, large)
    k1, k2 = lay.keys
    a, b = rescale.balance(weights[k1], shifts[k1], weights[k2], shifts[k2])
    w1, t1, w2, t2 = rescale.rescale_large(weights[k1], shifts[k1], weights[k2], shifts[k2], a, b)
    stats = None
    if bn_stats:  # a channel's mean and spread scale with it
        stats = bn_output_stats(family, large)
        stats = {k1: stats[k1] * b[..., None], k2: stats[k2] * a[..., None]}
    return _source_tokens(family, {k1: w1, k2: w2}, _channel_features({k1: t1, k2: t2}, stats)), a


def _channel_features(shifts: State, stats: Optional[State]) -> State:
    """Per conv, the features every token of an output channel carries: ``(P, o, f)``."""
    return {k: t[..., None] if stats is None else torch.cat([t[..., None], stats[k]], -1) for k, t in shifts.items()}


def _source_tokens(family: BlockFamily, weights: State, features: State) -> torch.Tensor:
    """Kernel slices as tokens, each followed by its output channel's ``features`` (if any)."""
    parts = []
    for key in family.weight_shapes("large"):
        w = weights[key]
        p, o, i = w.shape[:3]
        tok = w.reshape(p, o * i, -1)
        if key in features:
            f = features[key]
            tok = torch.cat([tok, f[:, :, None].expand(p, o, i, f.shape[-1]).reshape(p, o * i, -1)], dim=-1)
        parts.append(tok)
    return torch.cat(parts, dim=1)


def encode_target(family: BlockFamily, small: State, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stacked small blocks -> tokens ``(P, T_out, k*k [+ 1])``: their folded weights, and where the block
    holds shifts, each output channel's shift on every token of that channel. ``scales``: written in
    the balanced coordinates of ``encode_rescaled``."""
    lay = layout(family, "small")
    weights, shifts = family.prototype("small").fold(small)
    if scales is not None:
        weights, shifts = rescale.small_to_rescaled(weights, shifts, lay.keys, scales)
    parts = []
    for k in lay.keys:
        p, o, i = weights[k].shape[:3]
        tok = weights[k].reshape(p, o * i, lay.kernel_numel)
        if lay.extra:
            tok = torch.cat([tok, shifts[k][:, :, None, None].expand(p, o, i, 1).reshape(p, o * i, 1)], -1)
        parts.append(tok)
    return torch.cat(parts, dim=1)


def decode_target(family: BlockFamily, tokens: torch.Tensor) -> Tuple[State, Optional[State]]:
    """Tokens ``(P, T_out, D_out)`` -> folded small-block (weights, shifts); shifts are None when the block
    holds none, else each channel's mean over its tokens."""
    lay = layout(family, "small")
    weights, shifts, start = {}, {}, 0
    for key, shape in zip(lay.keys, lay.shapes):
        n = shape[0] * shape[1]
        part = tokens[:, start: start + n]
        weights[key] = part[..., : lay.kernel_numel].reshape(tokens.shape[0], *shape)
        if lay.extra:
            shifts[key] = part[..., lay.kernel_numel].reshape(tokens.shape[0], shape[0], shape[1]).mean(-1)
        start += n
    return weights, (shifts if lay.extra else None)
