"""Accuracy of P assembled networks (begin_i + block_i + last_i) on the same test images, in one pass."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..blocks import BlockFamily
from ..pairs.trainer import accuracy_members

State = Dict[str, torch.Tensor]


def _fold(stacked: State) -> State:
    """``(P, *shape)`` per-network tensors -> the member-folded layout of a ``members=P`` module."""
    return {k: v.reshape(-1, *v.shape[2:]) if v.dim() > 1 else v[0] for k, v in stacked.items()}


@torch.no_grad()
def network_accuracy(family: BlockFamily, begin: State, block: State, last: State, data,
                     which: str = "small", device: Optional[torch.device] = None, chunk: int = 64) -> torch.Tensor:
    """Test accuracy (%) of each network ``begin[i] -> block[i] -> last[i]``; tensors are ``(P, ...)``.

    ``which`` says whether ``block`` is the family's 'small' or 'large' block. Networks are evaluated
    ``chunk`` at a time as members of one stacked network.

    Example:
        >>> acc = network_accuracy(fam, pairs.part("begin"), small, pairs.part("last"), data)  # doctest: +SKIP
    """
    device = device or torch.device("cpu")
    n = next(iter(block.values())).shape[0]
    tx, ty = data.test_x.to(device), data.test_y.to(device)
    out = []
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        k = sl.stop - sl.start
        net = family.base_network(k) if which == "large" else family.compressed_network(k)
        pick = lambda s: _fold({name: t[sl] for name, t in s.items()})  # noqa: E731
        net.begin.load_state_dict(pick(begin))
        net.block.load_state_dict(pick(block))
        net.last.load_state_dict(pick(last))
        net = net.to(device, memory_format=torch.channels_last)
        out.append(accuracy_members(net, tx, ty, k))
    return torch.cat(out).cpu()
