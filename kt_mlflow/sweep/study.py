"""Optuna plumbing for sweeps: storage by URL (with heartbeats), sampler, pruner, champion, plots.

Workers that pass the same ``--study-name`` and ``--storage`` share one study. The storage records a
heartbeat for every running trial; when a worker dies, the next worker to start a trial marks the
silent trial FAIL and (``RetryHeartbeatStaleTrialCallback``) queues a copy with the same parameters.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import KTError
from ..pairs import store

DEFAULT_STORAGE = "sqlite:///kt-optuna.db"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
CHAMPION = "champion"
RUN_ID_ATTR = "mlflow_run_id"          # trial user attr: the trial's MLflow child run
MODEL_URI_ATTR = "model_uri"           # trial user attr: the trial's logged translator
MODEL_TAGS_ATTR = "model_tags"         # trial user attr: the translator's registry tags
SCORE_TAG, VAL_DIGEST_TAG, PAIRS_DIGEST_TAG = "kt.sweep_score", "kt.val_digest", "kt.pairs_digest"
STATE_TAG, REASON_TAG = "kt.trial_state", "kt.trial_reason"


def redact(url: str) -> str:
    """The storage URL without its password, for messages and params."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def validate_choices(sampler: str, pruner: str, heartbeat_interval: int, grace_period: Optional[int],
                     max_retry: int, n_trials: Optional[int], timeout: Optional[float]) -> None:
    if sampler not in SAMPLERS:
        raise KTError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")
    if pruner not in PRUNERS:
        raise KTError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}.")
    if heartbeat_interval < 1:
        raise KTError(f"--heartbeat-interval must be >= 1 second, got {heartbeat_interval}.")
    if grace_period is not None and grace_period <= heartbeat_interval:
        raise KTError(f"--grace-period ({grace_period}) must be longer than --heartbeat-interval ({heartbeat_interval}).")
    if max_retry < 0:
        raise KTError(f"--max-retry must be >= 0, got {max_retry}.")
    if n_trials is not None and n_trials < 1:
        raise KTError(f"--n-trials must be >= 1 (or empty for no limit), got {n_trials}.")
    if timeout is not None and timeout <= 0:
        raise KTError(f"--timeout must be > 0 seconds (or empty for no limit), got {timeout}.")
    if n_trials is None and timeout is None:
        raise KTError("give --n-trials or --timeout (or both); otherwise this worker would never stop.")


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
        print(f"sweep: could not mark MLflow run {run_id} failed ({str(e).splitlines()[0][:160]})")


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
                      f"({str(e.__cause__ or e).splitlines()[0][:160]}); e.g. pip install psycopg2-binary.") from None
    except Exception as e:  # sqlalchemy.exc.OperationalError / ArgumentError and friends
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise KTError(f"cannot reach Optuna storage {shown} ({first[:200]}); check --storage "
                      f"(host, port, database, user) and that the database server is running.") from None


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


def load_study(name: str, storage: optuna.storages.BaseStorage, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Create the study or join it; a study made for minimising is refused."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    except Exception as e:
        raise KTError(f"cannot create or load study {name!r} ({str(e).splitlines()[0][:200]}).") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise KTError(f"study {name!r} exists but minimises; sweeps maximise accuracy: use another --study-name.")
    return study


def val_digest(folder: Path, dataset: str) -> str:
    """Identifies the validation networks and test images a score was measured on."""
    h = hashlib.sha256(dataset.encode())
    for meta in store.sidecars(Path(folder), "val"):
        h.update(meta["sha256"].encode())
    return h.hexdigest()[:16]


# -- champion -------------------------------------------------------------------------------------------

def current_champion(name: str):
    """The model version holding the ``champion`` alias, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide_champion(name: str, version: str, score: float, digest: str,
                    rescore: Optional[Callable[[str], float]] = None) -> Tuple[bool, str]:
    """Should ``version`` (score ``score`` on the networks ``digest``) become the champion?

    The current champion's score counts when it was measured on the same validation networks (same
    digest tag); otherwise ``rescore(model_uri)`` measures it on ours. Only a strictly higher score wins.
    """
    champ = current_champion(name)
    if champ is None:
        return True, f"no {CHAMPION} of {name} yet"
    if str(champ.version) == str(version):
        return False, f"version {version} already is the {CHAMPION}"
    theirs: Optional[float] = None
    if champ.tags.get(VAL_DIGEST_TAG) == digest and champ.tags.get(SCORE_TAG):
        theirs = float(champ.tags[SCORE_TAG])
        where = "its recorded score on the same validation networks"
    elif rescore is not None:
        try:
            theirs = float(rescore(f"models:/{name}/{champ.version}"))
            where = "re-scored on this sweep's validation networks"
        except Exception as e:
            return False, (f"the {CHAMPION} (version {champ.version}) was scored on other validation networks and "
                           f"cannot be re-scored on these ({str(e).splitlines()[0][:120]}); alias kept")
    if theirs is None or not math.isfinite(theirs):
        return False, f"the {CHAMPION} (version {champ.version}) has no comparable score; alias kept"
    if score > theirs:
        return True, f"{score:.2f}% beats the {CHAMPION} version {champ.version} ({theirs:.2f}%, {where})"
    return False, f"{score:.2f}% does not beat the {CHAMPION} version {champ.version} ({theirs:.2f}%, {where})"


def register_best(study: optuna.Study, name: str, digest: str, pairs_digest: str,
                  rescore: Optional[Callable[[str], float]] = None) -> Optional[Tuple[str, bool, str]]:
    """Register the study's best trial's translator (once) and move ``champion`` if it wins.

    Returns (version, became champion, reason) or None when the study has no complete trial.
    """
    try:
        best = study.best_trial
    except ValueError:
        return None
    run_id, uri = best.user_attrs.get(RUN_ID_ATTR), best.user_attrs.get(MODEL_URI_ATTR)
    if not run_id or not uri:
        raise KTError(f"best trial {best.number} of study {study.study_name} has no logged translator "
                      f"(user attrs {RUN_ID_ATTR}/{MODEL_URI_ATTR} missing).")
    client = MlflowClient()
    existing = []
    try:
        existing = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")]
    except MlflowException:
        pass
    if existing:
        version = str(min(int(v.version) for v in existing))
    else:
        version = str(mlflow.register_model(uri, name).version)
        tags = {**best.user_attrs.get(MODEL_TAGS_ATTR, {}), SCORE_TAG: repr(float(best.value)),
                VAL_DIGEST_TAG: digest, PAIRS_DIGEST_TAG: pairs_digest, "kt.val_acc_mean": f"{best.value:.2f}",
                "kt.study": study.study_name, "kt.trial": str(best.number), "kt.run_id": run_id}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
    wins, reason = move_champion(name, version, float(best.value), digest, rescore)
    return version, wins, reason


def move_champion(name: str, version: str, score: float, digest: str,
                  rescore: Optional[Callable[[str], float]] = None, rounds: int = 4,
                  settle: Tuple[float, float] = (0.5, 1.5)) -> Tuple[bool, str]:
    """Point ``champion`` at ``version`` if it wins; returns (it holds the alias now, first decision's reason).

    Workers that finish together may all see the same old champion and write the alias at once (the
    server may also refuse one of two simultaneous writes). So each winner writes, waits a moment and
    decides again: a better version written meanwhile stops it; a worse one written over it is replaced.
    """
    client = MlflowClient()
    wins, reason = decide_champion(name, version, score, digest, rescore)
    first = reason
    for _ in range(rounds):
        if not wins:
            break
        try:
            client.set_registered_model_alias(name, CHAMPION, version)
        except MlflowException:
            pass                    # a concurrent write won this round; look again
        time.sleep(settle[0] + random.random() * (settle[1] - settle[0]))
        wins, reason = decide_champion(name, version, score, digest, rescore)
    champ = current_champion(name)
    return champ is not None and str(champ.version) == str(version), first


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
            mlflow.log_figure(plot(study), f"plots/{name}.html")
        except Exception as e:  # e.g. every parameter fixed: nothing to rank
            log(f"sweep: plot {name} skipped ({str(e).splitlines()[0][:160]})")
