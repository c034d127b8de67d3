"""``train`` as a tracked MLflow step: pairs in, a registered translator out.

Under torchrun every rank trains (DistributedDataParallel) and rank 0 alone opens the MLflow run,
logs and registers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mlflow

from ..blocks import family_of
from ..config import TrainConfig, default_pairs
from ..data import load_for
from ..distributed import world
from ..tracking.datasets import load_pair_splits, log_image_input, log_pair_input
from ..tracking.models import CANDIDATE, default_name, log_translator
from ..tracking.runs import log_family, step_run
from ..training.train import check_finite, train_translator


def run_train(cfg: TrainConfig, *, experiment: Optional[str] = None,
              nested: bool = False) -> Tuple[str, Optional[str]]:
    """Train and register a translator inside an MLflow run; returns (run id, model version), rank 0's."""
    cfg.validate()
    pairs = cfg.pairs or default_pairs(cfg.dataset, cfg.data_root)
    folder, train, val = load_pair_splits(pairs, cfg.dataset)
    family = family_of(train.settings)
    data = load_for(family, cfg.dataset, cfg.data_root, cfg.colour, train.settings)
    name = cfg.registered_name or default_name(family.name, cfg.resolved_arch)
    params = {**cfg.as_params(), "pairs": pairs, "registered_name": name, "family": family.name,
              "n_train_pairs": len(train), "n_val": len(val)}
    run_name = f"translator {cfg.resolved_arch} {cfg.recipe}"
    if not world().is_main:
        train_translator(cfg, family, train, val, data, progress=False)
        return "", None
    with step_run("train", params, run_name=run_name, nested=nested, experiment=experiment,
                  family=family.name) as run:
        log_family(family)
        log_pair_input(folder, pairs, "training")
        log_image_input(data, cfg.dataset, cfg.data_root, "task")
        result = train_translator(cfg, family, train, val, data,
                                  on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch))
        check_finite(result.translator)   # a diverged translator is never registered
        mlflow.log_metrics({f"best_{k}": v for k, v in result.best.items()})
        example = {k: v[:1] for k, v in val.part("large").items()}
        tags = {"kt.val_acc_mean": f"{result.best['val_acc_mean']:.2f}", "kt.recipe": cfg.recipe,
                "kt.run_id": run.info.run_id}
        version = log_translator(result.translator, example, name, tags=tags, alias=CANDIDATE)
        print(f"train: best validation accuracy {result.best['val_acc_mean']:.2f}% "
              f"(min {result.best['val_acc_min']:.2f}, max {result.best['val_acc_max']:.2f}) at epoch "
              f"{int(result.best['epoch'])}; registered {name} version {version} as @{CANDIDATE} "
              f"(load it with kt_mlflow.load_translator('models:/{name}@{CANDIDATE}'))")
        return run.info.run_id, version
