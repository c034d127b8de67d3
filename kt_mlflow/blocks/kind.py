"""What every block kind shares: two weight layers, in -> hidden -> in, seen as affine maps.

A translator and the data-free baselines read a block as its two weight layers with whatever sits
right after each folded in (``fold``: a BN's scale into the weights and its shift into a per-channel
shift, or a bias as the shift), and write one the same way (``unfold``: the state dict that computes
exactly those affine maps). A block kind declares its layers and where their scales and shifts live;
the folding itself is written once, here. Every tensor carries a leading ``(P,)`` network axis.

Example:
    >>> from kt_mlflow.blocks import create_family
    >>> block = create_family("paper_mnist").block("large")
    >>> large = {k: v[None] for k, v in block.state_dict().items()}
    >>> weights, shifts = block.fold(large)
    >>> tuple(weights["conv1.weight"].shape), tuple(shifts["conv1.weight"].shape)
    ((1, 6, 6, 3, 3), (1, 6))
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import KTError

State = Dict[str, torch.Tensor]
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class TwoLayerBlock(nn.Module):
    """A residual block of two weight layers (``layers``: weight key -> the BN after it, or None)."""

    layers: Dict[str, Optional[str]] = {}
    holds_shifts = False  # can unfold() write a per-channel shift (BN or bias)? bottleneck: no
    takes_stride = True   # forward(x, stride): see KTNetwork.forward

    @staticmethod
    def bias_key(weight_key: str) -> str:
        return weight_key[: -len("weight")] + "bias"

    def fold(self, state: Mapping[str, torch.Tensor]) -> Tuple[State, State]:
        """Stacked states -> (weights ``(P, o, i, k, k)``, shifts ``(P, o)``) of the two affine maps.

        ``BN(conv(x)) = conv(x; w * s) + t`` with ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``;
        a layer with a bias has ``t = bias``; one with neither has ``t = 0``.
        """
        weights, shifts = {}, {}
        for key, bn in self.layers.items():
            self._check_keys(state, key, bn)
            w = state[key]
            if bn is not None:
                scale = state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + getattr(self, bn).eps)
                weights[key] = w * scale.reshape(*scale.shape, *[1] * (w.dim() - 2))
                shifts[key] = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
            elif self.bias_key(key) in state:
                weights[key], shifts[key] = w, state[self.bias_key(key)]
            else:
                weights[key], shifts[key] = w, w.new_zeros(w.shape[:2])
        return weights, shifts

    def unfold(self, weights: Mapping[str, torch.Tensor], shifts: Optional[Mapping[str, torch.Tensor]] = None) -> State:
        """(weights, shifts) -> a stacked state dict computing exactly those maps (every key of the block).

        A BN becomes the identity map plus the shift in eval mode (``running_var = 1``, ``gamma =
        sqrt(1 + eps)``); a block that cannot hold shifts (``holds_shifts`` false) drops them.
        """
        ref = next(iter(weights.values()))
        p = ref.shape[0]
        out = {name: t[None].expand(p, *t.shape).to(ref.device, ref.dtype if t.is_floating_point() else t.dtype).clone()
               for name, t in self.state_dict().items()}  # the rest (LayerNorm, counters) at its default
        for key, bn in self.layers.items():
            out[key] = weights[key]
            shift = None if shifts is None or not self.holds_shifts else shifts[key]
            if bn is not None:
                c = out[f"{bn}.weight"].shape[1]
                out[f"{bn}.weight"] = ref.new_full((p, c), (1 + getattr(self, bn).eps) ** 0.5)
                out[f"{bn}.running_var"] = ref.new_ones(p, c)
                out[f"{bn}.running_mean"] = ref.new_zeros(p, c)
                out[f"{bn}.bias"] = ref.new_zeros(p, c) if shift is None else shift
            elif self.bias_key(key) in out:
                out[self.bias_key(key)] = ref.new_zeros(out[self.bias_key(key)].shape) if shift is None else shift
        return out

    @classmethod
    def permute_hidden(cls, state: Mapping[str, torch.Tensor], perm: torch.Tensor) -> State:
        """Reorder the hidden channels (layer 1's outputs with their BN or bias, layer 2's inputs): the
        block's function is unchanged. ``state`` may carry leading batch axes; ``perm`` is ``(..., hidden)``."""
        (k1, bn1), (k2, _) = list(cls.layers.items())
        lead, out = perm.dim() - 1, dict(state)

        def take(t: torch.Tensor, axis: int) -> torch.Tensor:
            shape = [1] * t.dim()
            shape[:lead] = perm.shape[:-1]
            shape[axis] = perm.shape[-1]
            return torch.take_along_dim(t, perm.reshape(shape), dim=axis)

        vectors = [f"{bn1}.{n}" for n in BN_KEYS] if bn1 else [cls.bias_key(k1)]
        for key in [k1, *[v for v in vectors if v in state]]:
            out[key] = take(state[key], lead)
        out[k2] = take(state[k2], lead + 1)
        return out

    def _check_keys(self, state: Mapping[str, torch.Tensor], key: str, bn: Optional[str]) -> None:
        needed = [key] + ([] if bn is None else [f"{bn}.{n}" for n in BN_KEYS])
        missing = [k for k in needed if k not in state]
        if missing:
            raise KTError(f"block state lacks {', '.join(missing)}; pass the whole block (BN statistics included), "
                          f"e.g. pairs.part('large').")
