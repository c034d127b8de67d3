"""The generation protocol for one shard: K base networks, then K small blocks in their place."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blocks import BlockFamily, stack_states, unstack_state
from ..blocks.layers import set_interleaved
from ..blocks.native import use_native
from ..config import PairSchedule
from ..engine import shared_begin_accuracy, train_members


def train_pairs(
    family: BlockFamily,
    seeds: Sequence[int],
    data,
    schedule: PairSchedule,
    device: torch.device,
    bar: Optional[tqdm] = None,
    kernels: str = "auto",
) -> Dict[str, object]:
    """Run the generation protocol for len(seeds) networks at once (arXiv 2401.05772: train the base
    network, then the small block in place of the large one with begin and last frozen).

    Returns the per-member states of begin / large / last / small and both accuracies. The networks
    take the dtype of ``data``: float32 normally, float64 for the exact equivalence tests.
    ``kernels``: see ``blocks.native.use_native`` (the same networks either way, other float rounding).
    """
    k = len(seeds)
    native = use_native(kernels, device, family.name, family.native_kernels)
    inits = [family.init_pair(s) for s in seeds]
    x, y = data.train_x.to(device), data.train_y.to(device)
    tx, ty = data.test_x.to(device), data.test_y.to(device)

    base = family.base_network(k)
    base.load_state_dict(stack_states([b for b, _ in inits]))
    base = set_interleaved(base, native).to(device, dtype=x.dtype, memory_format=torch.channels_last).train()
    train_members(base, base.parameters(), x, y, seeds, 0, schedule.epochs, schedule, bar)

    # Step 3: begin and last frozen (parameters and BN statistics); only the small block learns.
    small = family.small_block(k)
    small.load_state_dict(stack_states([s for _, s in inits]))
    small = small.to(device, dtype=x.dtype, memory_format=torch.channels_last)
    comp = set_interleaved(type(base)(base.begin, small, base.last, k), native)
    for frozen in (comp.begin, comp.last):
        frozen.eval().requires_grad_(False)
    comp.block.train()
    train_members(comp, comp.block.parameters(), x, y, seeds, 1, schedule.small_epochs, schedule, bar)
    # The base network is measured here, not before step 3: nothing of it changed since (begin and last
    # frozen in eval mode, the large block untouched), and both networks then share the begin's output.
    base_acc, small_acc = shared_begin_accuracy([base, comp], tx, ty, k)

    def split(module: nn.Module) -> List[Dict[str, torch.Tensor]]:
        return unstack_state({n: t.detach().cpu().contiguous() for n, t in module.state_dict().items()}, k)

    return {
        "begin": split(base.begin), "large": split(base.block), "last": split(base.last),
        "small": split(comp.block), "base_acc": base_acc.cpu(), "small_acc": small_acc.cpu(),
    }
