"""``kt finetune``: compress a user's base network, then fine-tune its small block on their data.

One epoch from a translation often beats several from random init; this step shows it for the
user's own network: the translation and the data-free baselines (random init, selection) are
fine-tuned side by side (members of one stacked network), the curves logged as metrics per epoch,
a table and a plotly figure, and the compressed network with the fine-tuned KT block is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import mlflow
import pandas as pd
import torch

from ..blocks import prefixed
from ..config import FinetuneConfig, PairSchedule
from ..data import load_for
from ..device import pick_device
from ..errors import KTError
from ..evaluation.baselines import BASELINES, make_baseline
from ..evaluation.finetune import finetune, finetune_figure
from ..evaluation.plots import KT_METHOD
from ..pairs.store import PairSet
from ..tracking.datasets import log_image_input
from ..tracking.figures import log_figure
from ..tracking.models import load_translator, model_uri
from ..tracking.runs import log_family, step_run
from .compress import load_state_dict, save_state_dict


def network_as_pairs(state: Dict[str, torch.Tensor], seed: int) -> PairSet:
    """One base network as a one-pair set (its large block as ``large``), for the stacked engine."""
    tensors = {f"{new}.{k}": v[None] for old, new in (("begin", "begin"), ("block", "large"), ("last", "last"))
               for k, v in prefixed(state, old).items()}
    return PairSet({}, tensors, [{"index": 0, "seed": seed}])


def run_finetune(cfg: FinetuneConfig, *, experiment: Optional[str] = None,
                 nested: bool = False) -> Tuple[str, pd.DataFrame]:
    """Fine-tune ``cfg.input``'s translated small block (and the baselines') for ``cfg.epochs`` epochs
    inside an MLflow run; writes ``cfg.output`` and returns (run id, curves)."""
    cfg.validate()
    for name in cfg.baseline_names:
        if name not in BASELINES:
            raise KTError(f"unknown baseline {name!r}; choose from: {', '.join(BASELINES.names())}.")
    state = load_state_dict(Path(cfg.input))
    translator = load_translator(cfg.model)
    family = translator.family
    compressed = translator.compress_state(state)   # checks the network against the family, one line
    data = load_for(family, cfg.dataset, cfg.data_root, cfg.colour)
    device = pick_device(cfg.device)
    net = network_as_pairs(state, cfg.seed)
    large = net.part("large")
    inits = {KT_METHOD: {k: v[None] for k, v in compressed.block.state_dict().items()}}
    inits.update({name: make_baseline(name, family, large, seed=cfg.seed) for name in cfg.baseline_names})
    schedule = PairSchedule(lr=cfg.lr, batch_size=cfg.batch_size)
    params = {**cfg.as_params(), "model_uri": model_uri(cfg.model), "family": family.name}
    with step_run("finetune", params, run_name=f"finetune {Path(cfg.input).name}", nested=nested,
                  experiment=experiment, family=family.name) as run:
        log_family(family)
        log_image_input(data, cfg.dataset, cfg.data_root, "finetuning")
        curves, tuned = finetune(family, net, data, inits, range(cfg.epochs + 1), schedule, device)
        compressed.block.load_state_dict({k: v[0] for k, v in tuned[KT_METHOD].items()})
        save_state_dict(compressed.state_dict(), Path(cfg.output))   # on disk before MLflow is asked again
        for epoch, rows in curves.groupby("epoch"):
            mlflow.log_metrics({f"{m}_acc": float(a) for m, a in zip(rows["method"], rows["accuracy"])}, step=int(epoch))
        mlflow.log_table(curves, "finetune_curves.json")
        log_figure(finetune_figure(curves), "finetune.html")
        wide = curves.pivot_table(index="method", columns="epoch", values="accuracy").reindex(list(inits))
        print(wide.round(2).to_string())
        print(f"finetune: {cfg.output} written: KT {wide.loc[KT_METHOD, 0]:.2f}% -> {wide.loc[KT_METHOD, cfg.epochs]:.2f}% "
              f"after {cfg.epochs} epoch(s); " + ", ".join(f"{m} {wide.loc[m, 0]:.2f}% -> {wide.loc[m, cfg.epochs]:.2f}%"
                                                          for m in cfg.baseline_names))
        return run.info.run_id, curves
