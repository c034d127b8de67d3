"""``main``: generate -> train -> evaluate as child runs of one parent run.

MLflow's multistep-workflow pattern: a step whose parameters match a finished run in the same
experiment is reused instead of rerun, so rerunning ``kt main`` after a change redoes only what changed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mlflow

from ..blocks import create_family
from ..config import EvaluateConfig, MainConfig, TrainConfig
from ..tracking.models import default_name
from ..tracking.runs import find_finished_run, log_family, step_run, ui_url
from .evaluate import run_evaluate
from .generate import run_generate
from .train import run_train


def _train_step(cfg: TrainConfig, family: str, experiment_id: str) -> Tuple[str, str, str]:
    """(train run id, registered name, version): reused when a finished run has the same params."""
    name = cfg.registered_name or default_name(family, cfg.resolved_arch)
    previous = find_finished_run("train", {**cfg.as_params(), "registered_name": name}, experiment_id)
    if previous is None:
        train_id, version = run_train(cfg, nested=True)
        return train_id, name, str(version)
    versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{previous.info.run_id}'")
    print(f"main: reusing train run {previous.info.run_id} (model {name} version {versions[0].version})")
    return previous.info.run_id, name, str(versions[0].version)


def run_main(cfg: MainConfig, *, experiment: Optional[str] = None, nested: bool = False) -> str:
    """Run (or reuse) each step; returns the parent run id."""
    cfg.validate()
    gen = cfg.generate_config()
    family = create_family(cfg.family)
    with step_run("main", cfg.as_params(), run_name=f"main {family.name} {cfg.recipe}", nested=nested,
                  experiment=experiment, family=family.name) as parent:
        log_family(family)
        exp_id = parent.info.experiment_id
        previous = find_finished_run("generate", gen.as_params(), exp_id)
        gen_id = previous.info.run_id if previous else run_generate(gen, nested=True)
        if previous:
            print(f"main: reusing generate run {gen_id} (same parameters)")
        train_id, name, version = _train_step(cfg.train_config(gen_id), family.name, exp_id)
        model = f"models:/{name}/{version}"
        evaluation = EvaluateConfig(dataset=cfg.dataset, data_root=cfg.data_root, colour=cfg.colour, seed=cfg.seed,
                                    device=cfg.device, model=model, pairs=gen_id)
        previous = find_finished_run("evaluate", evaluation.as_params(), exp_id)
        if previous:
            print(f"main: reusing evaluate run {previous.info.run_id}")
        else:
            run_evaluate(evaluation, nested=True)
        mlflow.log_params({"generate_run": gen_id, "train_run": train_id, "model": model})
        where = ui_url(exp_id)
        where = f"at {where}" if where else f"with `mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}`"
        print(f"main: done. Browse the runs {where}; "
              f"the translator is registered as {name} (version {version}): "
              f"kt_mlflow.load_translator({name!r}) or `kt compress --model {name} ...`")
        return parent.info.run_id
