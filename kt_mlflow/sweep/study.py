"""Optuna plumbing for sweeps: storage by URL (with heartbeats), sampler, pruner, the study report.

Workers that pass the same ``--study-name`` and ``--storage`` share one study. The storage records a
heartbeat for every running trial; when a worker dies, the next worker to start a trial marks the
silent trial FAIL and (``RetryHeartbeatStaleTrialCallback``) queues a copy with the same parameters.
"""
from __future__ import annotations

import hashlib
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from ..errors import KTError, first_line
from ..pairs import store
from ..redact import redact
from ..tracking.figures import log_figure

RUN_ID_ATTR = "mlflow_run_id"          # trial user attr: the trial's MLflow child run
MODEL_URI_ATTR = "model_uri"           # trial user attr: the trial's logged translator
MODEL_TAGS_ATTR = "model_tags"         # trial user attr: the translator's registry tags
STATE_TAG, REASON_TAG = "kt.trial_state", "kt.trial_reason"


def _mark_mlflow_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Close the MLflow child run of a trial whose worker stopped sending heartbeats."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    print(f"sweep: trial {trial.number} of study {study.study_name} stopped sending heartbeats "
          f"(its worker died); marked FAIL" + (f", MLflow run {run_id} marked FAILED" if run_id else ""))
    if not run_id:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, STATE_TAG, "failed")
        client.set_tag(run_id, REASON_TAG, "worker stopped sending heartbeats (killed?); trial retried")
        client.set_terminated(run_id, "FAILED")
    except Exception as e:  # the study must go on even if the tracking server hiccups
        print(f"sweep: could not mark MLflow run {run_id} failed ({first_line(e)})")


def driver_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) with an installed driver: SQLAlchemy's default for that
    scheme may be psycopg 3 while only psycopg2 (a dependency of this package) is installed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    try:
        import psycopg  # noqa: F401
        return f"postgresql+psycopg://{rest}"
    except ImportError:
        return f"postgresql+psycopg2://{rest}"


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: Optional[int] = None,
                 max_retry: int = 3) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats; an unreachable database is a one-line KTError."""
    shown, url = redact(url), driver_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def failed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _mark_mlflow_failed(study, trial)
        retry(study, trial)

    engine_kwargs: Dict[str, object] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise KTError(f"cannot open Optuna storage {url}: folder {folder} does not exist.")
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                      heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                      heartbeat_stale_trial_callback=failed)
            except (IntegrityError, ProgrammingError):
                # workers that start at once on a fresh database race to create Optuna's tables; the
                # loser sees a duplicate table / key and simply tries again (create_all skips what exists)
                if attempt == 5:
                    raise
                time.sleep(0.2 + random.random())
    except ImportError as e:
        raise KTError(f"Optuna storage {shown} needs a database driver that is not installed "
                      f"({first_line((e.__cause__ or e), 160)}); e.g. pip install psycopg2-binary.") from None
    except Exception as e:  # sqlalchemy.exc.OperationalError / ArgumentError and friends
        raise KTError(f"cannot reach Optuna storage {shown} ({first_line(e, 200)}); check --storage "
                      f"(host, port, database, user) and that the database server is running.") from None


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose workers stopped sending heartbeats (and retry them), now rather than only
    when some worker next starts a trial: sweep workers call it when they start and when they stop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def sampler_seed(seed: int, worker: int, trials_so_far: int) -> int:
    """A worker's sampler seed: its own, and a new one for each state of the study it joins, so that a
    restarted worker goes on sampling instead of replaying the parameters it drew before."""
    return seed + worker + 1_000_003 * trials_so_far


def make_sampler(name: str, seed: Optional[int]) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, startup_trials: int = 2) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def load_study(name: str, storage: optuna.storages.BaseStorage, sampler: str, seed: int, worker: int,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study or join it, with this worker's sampler seeded by the trials it finds
    (``sampler_seed``); a study made for minimising is refused."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(),
                                    pruner=pruner, direction="maximize", load_if_exists=True)
        study.sampler = make_sampler(sampler, sampler_seed(seed, worker, len(study.get_trials(deepcopy=False))))
    except Exception as e:
        raise KTError(f"cannot create or load study {name!r} ({first_line(e, 200)}).") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise KTError(f"study {name!r} exists but minimises; sweeps maximise accuracy: use another --study-name.")
    return study


def val_digest(folder: Path, dataset: str) -> str:
    """Identifies the validation networks and test images a score was measured on."""
    h = hashlib.sha256(dataset.encode())
    for meta in store.sidecars(Path(folder), "val"):
        h.update(meta["sha256"].encode())
    return h.hexdigest()[:16]


# -- study report -------------------------------------------------------------------------------------

def trials_table(study: optuna.Study):
    """``study.trials_dataframe()`` with JSON-friendly columns (times as ISO strings, durations in s)."""
    df = study.trials_dataframe()
    for col in df.columns:
        kind = str(df[col].dtype)
        if kind.startswith("datetime"):
            df[col] = df[col].astype(str)
        elif kind.startswith("timedelta"):
            df[col] = df[col].dt.total_seconds()
        elif kind == "object":
            df[col] = df[col].map(lambda v: v if v is None or isinstance(v, (str, int, float, bool)) else str(v))
    return df


def log_study_report(study: optuna.Study, log: Callable[[str], None] = print) -> None:
    """Trials table and Optuna's plotly figures as artifacts of the active (parent) run."""
    from optuna import visualization as vis

    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    if trials:
        mlflow.log_table(trials_table(study), "trials.json")
    mlflow.log_metrics({"n_trials": len(trials), "n_complete": len(complete),
                        "n_pruned": sum(t.state == states.PRUNED for t in trials),
                        "n_failed": sum(t.state == states.FAIL for t in trials)})
    if not complete:
        log("sweep: no complete trial yet; no plots")
        return
    plots = {"optimization_history": vis.plot_optimization_history, "parallel_coordinate": vis.plot_parallel_coordinate,
             "slice": vis.plot_slice, "param_importances": vis.plot_param_importances}
    for name, plot in plots.items():
        if name == "param_importances" and len(complete) < 2:
            log(f"sweep: param importances need >= 2 complete trials, the study has {len(complete)}; skipped")
            continue
        try:
            log_figure(plot(study), f"plots/{name}.html")
        except Exception as e:  # e.g. every parameter fixed: nothing to rank
            log(f"sweep: plot {name} skipped ({first_line(e)})")
