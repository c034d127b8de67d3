"""Scale-canonical form of residual two-conv blocks (in -> hidden -> in), BN folded.

ReLU is positively homogeneous, so two families of per-channel scalings leave a network's function
unchanged:
- hidden channel h: conv1's filter h and its shift times ``b_h > 0``, conv2's inputs from h over ``b_h``;
- residual channel r, with the blocks around it: the block's input and output channel r times
  ``a_r > 0`` (conv1's inputs from r over ``a_r``, conv2's filter r and its shift times ``a_r``; the
  begin block's BN and the last block's inputs absorb the rest). Trained networks differ by such
  scalings for no reason that matters.

``balance`` picks, per block, the scalings that make every channel's incoming and outgoing weights
equally large (matrix balancing). A translator that reads the balanced block and writes its small
block in the same balanced coordinates (``small_to_original`` maps it back) is then exactly
equivariant to both scalings: what varies between networks only by scale cannot surprise it.

Example:
    >>> a, b = balance(w1, t1, w2, t2)                      # doctest: +SKIP
    >>> w1c, t1c, w2c, t2c = rescale_large(w1, t1, w2, t2, a, b)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

State = Dict[str, torch.Tensor]


def _sq(w: torch.Tensor) -> torch.Tensor:
    """Squared norm of each kernel slice: ``(P, O, I, k, k)`` -> ``(P, O, I)``."""
    return w.pow(2).flatten(3).sum(-1)


def balance(w1: torch.Tensor, t1: torch.Tensor, w2: torch.Tensor, t2: torch.Tensor,
            iters: int = 30) -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual scales ``a`` ``(P, R)`` and hidden scales ``b`` ``(P, H)`` balancing a folded block.

    ``w1`` ``(P, H, R, k, k)`` with shifts ``t1`` ``(P, H)``; ``w2`` ``(P, R, H, k, k)`` with ``t2``
    ``(P, R)``. After ``rescale_large`` every hidden channel's row of conv1 has the norm of its column
    of conv2 and every residual channel's column of conv1 the norm of its row of conv2 (alternating
    exact updates). That leaves one common factor free (all channels times c keeps the weights and
    multiplies the shifts by c); it is set so the shifts' mean square equals the kernel slices' mean
    squared norm. Every step is equivariant to the scalings, so the result is too. Float64 inside.
    """
    dt = w1.dtype
    s1, s2 = _sq(w1.double()), _sq(w2.double())            # (P, H, R), (P, R, H)
    a = torch.ones(s2.shape[:2], dtype=torch.float64, device=w1.device)
    b = torch.ones(s1.shape[:2], dtype=torch.float64, device=w1.device)
    tiny = 1e-30
    for _ in range(iters):
        # hidden h: b^2 * sum_r s1[h,r] / a_r^2 = sum_r s2[r,h] * a_r^2 / b^2
        b = (((s2 * a[:, :, None].pow(2)).sum(1) + tiny) / ((s1 / a[:, None, :].pow(2)).sum(-1) + tiny)).pow(0.25)
        # residual r: sum_h s1[h,r] * b_h^2 / a^2 = a^2 * sum_h s2[r,h] / b_h^2
        a = (((s1 * b[:, :, None].pow(2)).sum(1) + tiny) / ((s2 / b[:, None, :].pow(2)).sum(-1) + tiny)).pow(0.25)
        g = a.log().mean(-1, keepdim=True).exp()  # keep the free common factor from drifting
        a, b = a / g, b / g
    kernels = ((s1 * (b[:, :, None] / a[:, None, :]).pow(2)).sum((1, 2)) +
               (s2 * (a[:, :, None] / b[:, None, :]).pow(2)).sum((1, 2))) / (s1[0].numel() + s2[0].numel())
    shifts = ((t1.double() * b).pow(2).sum(-1) + (t2.double() * a).pow(2).sum(-1)) / (b.shape[1] + a.shape[1])
    c = ((kernels + tiny) / (shifts + tiny)).sqrt()[:, None]
    return (a * c).to(dt), (b * c).to(dt)


def rescale_large(w1: torch.Tensor, t1: torch.Tensor, w2: torch.Tensor, t2: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The folded block in coordinates where residual channel r is multiplied by ``a_r`` and hidden h by ``b_h``."""
    w1 = w1 * (b[:, :, None] / a[:, None, :])[..., None, None]
    w2 = w2 * (a[:, :, None] / b[:, None, :])[..., None, None]
    return w1, t1 * b, w2, t2 * a


def small_to_original(weights: State, shifts: Optional[State], keys: Tuple[str, str],
                      a: torch.Tensor) -> Tuple[State, Optional[State]]:
    """A small block written in rescaled residual coordinates -> the same function on the original ones.

    In rescaled coordinates the block computes ``f'(x')`` with ``x' = a * x``; on ``x`` the network
    needs ``f(x) = f'(a * x) / a``: layer 1's inputs times ``a``, layer 2's outputs (and shift) over ``a``.
    """
    k1, k2 = keys
    w = dict(weights)
    w[k1] = weights[k1] * a[:, None, :, None, None]
    w[k2] = weights[k2] / a[:, :, None, None, None]
    if shifts is None:
        return w, None
    return w, {**shifts, k2: shifts[k2] / a}


def small_to_rescaled(weights: State, shifts: Optional[State], keys: Tuple[str, str],
                      a: torch.Tensor) -> Tuple[State, Optional[State]]:
    """The inverse of ``small_to_original`` (e.g. to regress targets in rescaled coordinates)."""
    return small_to_original(weights, shifts, keys, 1.0 / a)
