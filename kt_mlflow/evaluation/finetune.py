"""Translation as a starting point: accuracy after a few epochs of fine-tuning the small block.

Each validation network keeps its begin and last blocks frozen (as in generation step 3) and its small
block starts from a given initialisation (the translation, random init, weight selection, ...). All
networks and all starting points train at once as members of one stacked network.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import pandas as pd
import plotly.graph_objects as go
import torch

from ..blocks import BlockFamily, fold_members, unstack_state
from ..config import PairSchedule
from ..engine import accuracy_members, train_members
from ..pairs.store import PairSet

FINETUNE_PHASE = 7  # a data-order stream of its own, distinct from generation's phases


def finetune_curves(family: BlockFamily, val: PairSet, data, inits: Mapping[str, Mapping[str, torch.Tensor]],
                    epochs: Sequence[int] = (0, 1, 2, 5), schedule: PairSchedule = PairSchedule(),
                    device: torch.device = torch.device("cpu")) -> pd.DataFrame:
    """Rows (method, epoch, network, accuracy) for every starting point in ``inits`` (stacked small blocks)."""
    return finetune(family, val, data, inits, epochs, schedule, device)[0]


def finetune(family: BlockFamily, val: PairSet, data, inits: Mapping[str, Mapping[str, torch.Tensor]],
             epochs: Sequence[int] = (0, 1, 2, 5), schedule: PairSchedule = PairSchedule(),
             device: torch.device = torch.device("cpu")) -> Tuple[pd.DataFrame, Dict[str, Dict[str, torch.Tensor]]]:
    """``finetune_curves``'s rows, and each starting point's fine-tuned small blocks (stacked, on the CPU)."""
    names = list(inits)
    n = len(val)
    k = n * len(names)
    net = family.compressed_network(k)
    rep = lambda part: {key: v.repeat(len(names), *[1] * (v.dim() - 1)) for key, v in val.part(part).items()}  # noqa: E731
    net.begin.load_state_dict(fold_members(rep("begin")))
    net.last.load_state_dict(fold_members(rep("last")))
    small = {key: torch.cat([inits[m][key] for m in names]) for key in inits[names[0]]}
    net.block.load_state_dict(fold_members(small))
    net = net.to(device, memory_format=torch.channels_last)
    for frozen in (net.begin, net.last):
        frozen.eval().requires_grad_(False)
    x, y = data.train_x.to(device), data.train_y.to(device)
    tx, ty = data.test_x.to(device), data.test_y.to(device)
    seeds = [int(r["seed"]) for r in val.records] * len(names)
    rows: List[Dict[str, object]] = []

    def record(epoch: int) -> None:
        if epoch in epochs:
            acc = accuracy_members(net, tx, ty, k).cpu()
            rows.extend({"method": names[i // n], "epoch": epoch, "network": i % n, "accuracy": float(acc[i])}
                        for i in range(k))

    record(0)
    net.block.train()
    train_members(net, net.block.parameters(), x, y, seeds, FINETUNE_PHASE, max(epochs), schedule,
                  on_epoch=lambda e: record(e + 1))
    tuned = unstack_state({key: v.detach().cpu() for key, v in net.block.state_dict().items()}, k)
    per_pair = lambda states: {key: torch.stack([st[key] for st in states]) for key in states[0]}  # noqa: E731
    return pd.DataFrame(rows), {m: per_pair(tuned[i * n: (i + 1) * n]) for i, m in enumerate(names)}


def finetune_figure(df: pd.DataFrame) -> go.Figure:
    """Mean accuracy (with min-max band) against fine-tuning epochs, one line per starting point."""
    fig = go.Figure()
    for method, g in df.groupby("method", sort=False):
        s = g.groupby("epoch")["accuracy"].agg(["mean", "min", "max"]).reset_index()
        fig.add_trace(go.Scatter(x=s["epoch"], y=s["mean"], mode="lines+markers", name=method,
                                 error_y=dict(type="data", symmetric=False, array=s["max"] - s["mean"],
                                              arrayminus=s["mean"] - s["min"])))
    fig.update_layout(title="Fine-tuning the small block from each starting point", xaxis_title="epochs",
                      yaxis_title="test accuracy (%)")
    return fig
