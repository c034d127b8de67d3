"""Starting step runs, logging params, and finding a finished run to reuse."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping, Optional

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from .context import KTRunContextProvider

STEP_TAG = "kt.step"


def flat_params(params: Mapping[str, Any]) -> Dict[str, str]:
    """MLflow params are strings; None becomes '' so a rerun with the same inputs matches exactly."""
    return {k: "" if v is None else str(v) for k, v in params.items()}


def use_experiment(name: str) -> str:
    """Make ``name`` the active experiment (created if missing); returns its id.

    mlflow 3.17's set_experiment, when another worker creates the same experiment at the same moment,
    returns it without making it active; setting it again by id closes that race.
    """
    experiment_id = mlflow.set_experiment(name).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def step_run(step: str, params: Mapping[str, Any], run_name: Optional[str] = None,
             nested: bool = False, experiment: Optional[str] = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one step (or the run `mlflow run` already created), tagged and with params."""
    if experiment and not os.environ.get("MLFLOW_RUN_ID") and not mlflow.active_run():
        use_experiment(experiment)
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.set_tag(STEP_TAG, step)
        # A run that `mlflow run` created and we resumed did not pass through the run-context plugin.
        mlflow.set_tags(KTRunContextProvider().tags())
        # Under `mlflow run` the project params are already logged (as MLflow rendered them) and
        # MLflow forbids changing a param: log only the ones it does not have.
        logged = MlflowClient().get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in flat_params(params).items() if k not in logged})
        yield run


def find_finished_run(step: str, params: Mapping[str, Any], experiment_id: str) -> Optional[mlflow.entities.Run]:
    """The newest FINISHED run of ``step`` in the experiment whose params equal ``params``.

    This is MLflow's multistep-workflow pattern: a step rerun with the same inputs is reused.
    """
    wanted = flat_params(params)
    client = MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{STEP_TAG}` = '{step}'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            continue
        if all(run.data.params.get(k) == v for k, v in wanted.items()):
            return run
    return None
