"""Starting step runs, logging params, and finding a finished run to reuse."""
from __future__ import annotations

import os
import urllib.parse
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, Mapping, Optional

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from ..blocks import family_spec
from ..family_file import spec_digest
from .context import KTRunContextProvider

STEP_TAG = "kt.step"
KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"  # the UI's model view
NOTE_TAG = "mlflow.note.content"  # an experiment's description in the UI
# The MLflow 3.17 UI picks its GenAI or model-training view from this URL parameter, else from the
# switch at its top left (remembered per browser; GenAI at first): it does not read KIND_TAG.
MODEL_VIEW = "workflowType=machine_learning"
RESOLVED = "_resolved"  # suffix of a param whose value `mlflow run` logged differently (see step_run)
EXPERIMENT_NOTE = ("Knowledge Translation (kt-mlflow): `kt main` runs generate -> train -> evaluate as child runs. "
                   "Open the **Model training** view (switch at the top left) to see them.")
_QUIET = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


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
    _tag_experiment_kind(experiment_id)
    return experiment_id


def choose_experiment(experiment: Optional[str], default: str) -> None:
    """The experiment of a step run: ``experiment``, else $MLFLOW_EXPERIMENT_NAME / _ID, else ``default``.

    Nothing changes inside a run (a nested step, or the run that `mlflow run` made).
    """
    if os.environ.get("MLFLOW_RUN_ID") or mlflow.active_run():
        return
    if experiment or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        use_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or default)


def ui_url(experiment_id: str, run_id: Optional[str] = None) -> Optional[str]:
    """The experiment's (or run's) page in the MLflow UI, in its model-training view; None unless the
    tracking URI is an MLflow server (http/https)."""
    uri = mlflow.get_tracking_uri() or ""
    if not uri.startswith(("http://", "https://")):
        return None
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    query = MODEL_VIEW
    try:
        from mlflow.utils.workspace_context import get_request_workspace

        workspace = get_request_workspace()
        if workspace and workspace != "default":
            query += f"&workspace={urllib.parse.quote(workspace, safe='')}"
    except ImportError:
        pass
    return f"{url}?{query}"


_links = {"depth": 0, "before": None, "print": True}


@contextmanager
def _model_view_links() -> Iterator[bool]:
    """While step runs are open, MLflow's own end-of-run links (to the UI's GenAI view) are off; yields
    whether to print ours (to the model-training view) instead: not when the user silenced MLflow's."""
    if _links["depth"] == 0:
        before = os.environ.get(_QUIET)
        _links.update(before=before, print=(before or "").strip().lower() not in ("true", "1"))
        os.environ[_QUIET] = "true"
    _links["depth"] += 1
    try:
        yield bool(_links["print"])
    finally:
        _links["depth"] -= 1
        if _links["depth"] == 0:
            if _links["before"] is None:
                os.environ.pop(_QUIET, None)
            else:
                os.environ[_QUIET] = _links["before"]


def _same_value(logged: str, ours: str) -> bool:
    """Equal as MLflow params: the same string, number (``4`` / ``4.0``) or boolean (``true`` / ``True``);
    `mlflow run` logs an empty string as ``''`` (shell-quoted)."""
    if logged == "''":
        logged = ""
    if logged == ours or logged.lower() == ours.lower() in ("true", "false"):
        return True
    try:
        return float(logged) == float(ours)
    except ValueError:
        return False


@contextmanager
def step_run(step: str, params: Mapping[str, Any], run_name: Optional[str] = None, nested: bool = False,
             experiment: Optional[str] = None, family: str = "") -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one step (or the run `mlflow run` already created), tagged and with params.

    It goes to ``experiment``, else the environment's, else ``kt-<family>`` (see ``choose_experiment``).
    When it ends, its link in the UI's model-training view is printed (for a tracking server).
    """
    choose_experiment(experiment, f"kt-{family}" if family else "kt")
    # `mlflow run` created the run and passes it in $MLFLOW_RUN_ID, which start_run consumes.
    resumed = bool(os.environ.get("MLFLOW_RUN_ID")) and not mlflow.active_run()
    server = (mlflow.get_tracking_uri() or "").startswith(("http://", "https://"))
    run = None
    with _model_view_links() if server else nullcontext(False) as print_links:
        try:
            with mlflow.start_run(run_name=run_name or step, nested=nested) as run:
                if resumed and run_name:
                    mlflow.set_tag("mlflow.runName", run_name)  # `mlflow run` named it after the project
                mlflow.set_tag(STEP_TAG, step)
                # A run that `mlflow run` created and we resumed did not pass through the run-context plugin.
                mlflow.set_tags(KTRunContextProvider().tags())
                if run.info.experiment_id:
                    _tag_experiment_kind(run.info.experiment_id)
                # Under `mlflow run` the project params are already logged (as MLflow rendered them) and
                # MLflow forbids changing a param: log the ones it does not have and, where its value is not
                # the one used (`arch` when the recipe picks the architecture, a name left empty and
                # derived), the one used as NAME_resolved.
                logged = MlflowClient().get_run(run.info.run_id).data.params
                ours = flat_params(params)
                mlflow.log_params({k: v for k, v in ours.items() if k not in logged})
                mlflow.log_params({k + RESOLVED: v for k, v in ours.items()
                                   if k in logged and not _same_value(logged[k], v)})
                yield run
        finally:
            if print_links and run is not None:  # also for a failed run, as MLflow does
                name = run_name or (run.info.run_name if resumed else step)
                print(f"🏃 View run {name} at: {ui_url(run.info.experiment_id, run.info.run_id)}", flush=True)
                print(f"🧪 View experiment at: {ui_url(run.info.experiment_id)}", flush=True)


def _tag_experiment_kind(experiment_id: str) -> None:
    """Mark the experiment as model development (the UI of some MLflow versions reads it) and describe it."""
    tags = mlflow.get_experiment(experiment_id).tags
    client = MlflowClient()
    if not tags.get(KIND_TAG):
        client.set_experiment_tag(experiment_id, KIND_TAG, MODEL_DEVELOPMENT)
    if not tags.get(NOTE_TAG):
        client.set_experiment_tag(experiment_id, NOTE_TAG, EXPERIMENT_NOTE)


def find_finished_run(step: str, params: Mapping[str, Any], experiment_id: str) -> Optional[mlflow.entities.Run]:
    """The newest FINISHED run of ``step`` in the experiment whose params equal ``params``.

    This is MLflow's multistep-workflow pattern: a step rerun with the same inputs is reused. A run's
    value is its ``NAME_resolved`` param where it has one (see ``step_run``).
    """
    wanted = flat_params(params)
    client = MlflowClient()
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{STEP_TAG}` = '{step}'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            continue
        got = run.data.params
        if all(got.get(k + RESOLVED, got.get(k)) == v for k, v in wanted.items()):
            return run
    return None


def log_family(family) -> None:
    """The family of the active run, whole: ``family.yaml`` and the ``family_digest`` param."""
    spec = family_spec(family)
    mlflow.log_dict(spec, "family.yaml")
    mlflow.log_param("family_digest", spec_digest(spec))
