"""Accuracy of P assembled networks (begin_i + block_i + last_i) on the same test images, in one pass."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..blocks import BlockFamily, fold_members
from ..pairs.trainer import accuracy_members

State = Dict[str, torch.Tensor]


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
        net.begin.load_state_dict(fold_members(begin, sl))
        net.block.load_state_dict(fold_members(block, sl))
        net.last.load_state_dict(fold_members(last, sl))
        net = net.to(device, memory_format=torch.channels_last)
        out.append(accuracy_members(net, tx, ty, k))
    return torch.cat(out).cpu()
