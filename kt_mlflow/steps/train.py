"""``train`` as a tracked MLflow step: pairs in, a registered translator out.

Under torchrun every rank trains (DistributedDataParallel) and rank 0 alone opens the MLflow run,
logs and registers.
"""
from __future__ import annotations

import shutil
import sys
from typing import Optional, Tuple

import mlflow

from ..blocks import family_of
from ..config import TrainConfig, default_pairs
from ..data import load_for
from ..distributed import world
from ..errors import ShownKTError, first_line
from ..tracking.datasets import load_pair_splits, log_image_input, log_pair_input
from ..tracking.models import CANDIDATE, default_name, log_translator
from ..tracking.runs import log_family, step_run
from ..training.train import check_finite, check_training, train_translator
from .register import keep_translator


def run_train(cfg: TrainConfig, *, experiment: Optional[str] = None,
              nested: bool = False) -> Tuple[str, Optional[str]]:
    """Train and register a translator inside an MLflow run; returns (run id, model version), rank 0's."""
    cfg.validate()
    pairs = cfg.pairs or default_pairs(cfg.dataset, cfg.data_root)
    specs = cfg.pair_specs(pairs)
    folders, trains, vals = zip(*(load_pair_splits(spec, cfg.dataset) for spec in specs))
    family = family_of(trains[0].settings)
    train, val = (trains[0], vals[0]) if len(specs) == 1 else (list(trains), list(vals))   # one set, or one per size
    data = load_for(family, cfg.dataset, cfg.data_root, cfg.colour, trains[0].settings)
    name = cfg.registered_name or default_name(family.name, cfg.resolved_arch)
    params = {**cfg.as_params(), "pairs": pairs, "registered_name": name, "family": family.name,
              "n_train_pairs": sum(map(len, trains)), "n_val": sum(map(len, vals))}
    check_training(cfg, family, train, val)   # refusals before the run opens
    run_name = f"translator {cfg.resolved_arch} {cfg.recipe}"
    if not world().is_main:
        train_translator(cfg, family, train, val, data, progress=False)
        return "", None
    with step_run("train", params, run_name=run_name, nested=nested, experiment=experiment,
                  family=family.name) as run:
        log_family(family)
        for folder, spec in zip(folders, specs):
            log_pair_input(folder, spec, "training")
        log_image_input(data, cfg.dataset, cfg.data_root, "task")
        result = train_translator(cfg, family, train, val, data, on_epoch=_EpochLog())
        check_finite(result.translator)   # a diverged translator is never registered
        best = {f"best_{k}": v for k, v in result.best.items()}
        tags = {"kt.val_acc_mean": f"{result.best['val_acc_mean']:.2f}", "kt.recipe": cfg.recipe,
                "kt.run_id": run.info.run_id}
        # Kept on disk before MLflow is asked again: if the server went away, the training is not lost.
        kept = keep_translator(result.translator, name, tags, best)
        try:
            mlflow.log_metrics(best)
            example = {k: v[:1] for k, v in vals[0].part("large").items()}
            version = log_translator(result.translator, example, name, tags=tags, alias=CANDIDATE)
        except Exception as e:
            message = (f"the trained translator could not be logged ({first_line(e)}); it is kept in {kept}: "
                       f"log it later with `kt register --translator {kept}`")
            print(f"kt train: error: {message}", file=sys.stderr, flush=True)   # before MLflow retries closing the run
            raise ShownKTError(message) from None
        shutil.rmtree(kept, ignore_errors=True)
        print(f"train: best validation accuracy {result.best['val_acc_mean']:.2f}% "
              f"(min {result.best['val_acc_min']:.2f}, max {result.best['val_acc_max']:.2f}) at epoch "
              f"{int(result.best['epoch'])}; registered {name} version {version} as @{CANDIDATE} "
              f"(load it with kt_mlflow.load_translator('models:/{name}@{CANDIDATE}'))")
        return run.info.run_id, version


class _EpochLog:
    """Logs each epoch's metrics; after the first failure (the server went away) it warns once and lets
    training go on, so the translator can still be kept."""

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, epoch: int, metrics) -> None:
        if self.failed:
            return
        try:
            mlflow.log_metrics(metrics, step=epoch)
        except Exception as e:
            self.failed = True
            print(f"kt train: warning: could not log epoch {epoch}'s metrics ({first_line(e)}); training goes on, "
                  f"and the translator is kept on disk if it cannot be logged either", file=sys.stderr, flush=True)
