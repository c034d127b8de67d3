"""``train`` as a tracked MLflow step: pairs in, a registered translator out."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import mlflow

from ..blocks import create_family
from ..data import load_dataset
from ..errors import KTError
from ..pairs.store import PairSet, load_split
from ..tracking.datasets import log_pair_input, resolve_pairs
from ..tracking.models import default_name, log_translator
from ..tracking.runs import step_run
from .train import TrainConfig, train_translator


def load_pairs(spec: str, dataset: str) -> Tuple[Path, PairSet, PairSet]:
    """(folder, train split, val split) from a folder or generate run id; checks the image dataset."""
    folder = resolve_pairs(spec)
    train, val = load_split(folder, "train"), load_split(folder, "val")
    made_on = train.settings.get("dataset")
    if made_on != dataset:
        raise KTError(f"the pairs in {spec} were generated on dataset {made_on!r}, not {dataset!r}; "
                      f"pass --dataset {made_on} (and its --data-root).")
    return folder, train, val


def run_train(cfg: TrainConfig, pairs: str, dataset: str = "digits", data_root: Optional[str] = None,
              registered_name: Optional[str] = None, experiment: Optional[str] = None,
              nested: bool = False) -> Tuple[str, Optional[str]]:
    """Train and register a translator inside an MLflow run; returns (run id, model version)."""
    cfg.validate()
    folder, train, val = load_pairs(pairs, dataset)
    family = create_family(train.settings["family"])
    data = load_dataset(dataset, data_root)
    name = registered_name or default_name(family.name, cfg.resolved_arch)
    params = {**cfg.as_params(), "pairs": pairs, "dataset": dataset, "data_root": data_root,
              "registered_name": name, "family": family.name, "n_train_pairs": len(train), "n_val": len(val)}
    with step_run("train", params, run_name="train", nested=nested, experiment=experiment) as run:
        log_pair_input(folder, pairs, "training")
        result = train_translator(cfg, family, train, val, data,
                                  on_epoch=lambda epoch, m: mlflow.log_metrics(m, step=epoch))
        mlflow.log_metrics({f"best_{k}": v for k, v in result.best.items()})
        example = {k: v[:1] for k, v in val.part("large").items()}
        version = log_translator(result.translator, example, name,
                                 tags={"kt.val_acc_mean": f"{result.best['val_acc_mean']:.2f}", "kt.recipe": cfg.recipe,
                                       "kt.run_id": run.info.run_id})
        print(f"train: best functional validation accuracy {result.best['val_acc_mean']:.2f}% "
              f"(min {result.best['val_acc_min']:.2f}, max {result.best['val_acc_max']:.2f}) at epoch "
              f"{int(result.best['best_epoch'])}; registered {name} version {version} "
              f"(load it with kt_mlflow.load_translator({name!r}))")
        return run.info.run_id, version
