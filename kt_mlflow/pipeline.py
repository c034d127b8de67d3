"""``main``: generate -> train -> evaluate as child runs of one parent run.

MLflow's multistep-workflow pattern: a step whose parameters match a finished run in the same
experiment is reused instead of rerun, so rerunning ``kt main`` after a change redoes only what changed.
"""
from __future__ import annotations

from typing import Optional

import mlflow

from .evaluation.step import run_evaluate
from .pairs.generate import GenerateConfig
from .pairs.step import run_generate
from .tracking.models import default_name
from .tracking.runs import find_finished_run, flat_params, use_experiment
from .training.step import run_train
from .training.train import TrainConfig


def run_main(gen: GenerateConfig, train: TrainConfig, registered_name: Optional[str] = None,
             experiment: Optional[str] = None) -> str:
    """Run (or reuse) each step; returns the parent run id."""
    gen.validate()
    train.validate()
    if experiment:
        use_experiment(experiment)
    with mlflow.start_run(run_name="main") as parent:
        mlflow.set_tag("kt.step", "main")
        exp_id = parent.info.experiment_id

        previous = find_finished_run("generate", gen.as_params(), exp_id)
        gen_id = previous.info.run_id if previous else run_generate(gen, nested=True)
        if previous:
            print(f"main: reusing generate run {gen_id} (same parameters)")

        name = registered_name or default_name(gen.family, train.resolved_arch)
        train_params = {**train.as_params(), "pairs": gen_id, "dataset": gen.dataset, "data_root": gen.data_root,
                        "registered_name": name}
        previous = find_finished_run("train", train_params, exp_id)
        if previous:
            train_id = previous.info.run_id
            version = mlflow.MlflowClient().search_model_versions(f"run_id = '{train_id}'")[0].version
            print(f"main: reusing train run {train_id} (model {name} version {version})")
        else:
            train_id, version = run_train(train, gen_id, gen.dataset, gen.data_root, name, nested=True)

        model = f"models:/{name}/{version}"
        eval_params = flat_params({"model": model, "pairs": gen_id, "dataset": gen.dataset,
                                   "data_root": gen.data_root, "seed": gen.seed})
        previous = find_finished_run("evaluate", eval_params, exp_id)
        if previous:
            print(f"main: reusing evaluate run {previous.info.run_id}")
        else:
            run_evaluate(model, gen_id, gen.dataset, gen.data_root, seed=gen.seed, device=gen.device, nested=True)
        mlflow.log_params({"generate_run": gen_id, "train_run": train_id, "model": model})
        print(f"main: done. Browse the runs with `mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}`; "
              f"the translator is registered as {name} (version {version}): "
              f"kt_mlflow.load_translator({name!r}) or `kt compress --model {name} ...`")
        return parent.info.run_id
