"""``kt sweep``: an Optuna study over translators, tracked in MLflow, shared by many workers.

Every trial trains a translator on the same pairs and is scored by validation accuracy (mean over
the held-out networks). One MLflow parent run per worker, one nested child run per trial; at the end
the study's best translator is registered and becomes ``champion`` if it beats the current one on
the same validation networks.

Under torchrun a worker's trials train on all its ranks (DistributedDataParallel): rank 0 samples,
reports and logs, and tells the other ranks each trial's parameters.

Example (two workers, one study)::

    kt sweep --pairs RUN_ID --study-name s1 --storage postgresql://user@db/optuna --n-trials 10 --worker 0 &
    kt sweep --pairs RUN_ID --study-name s1 --storage postgresql://user@db/optuna --n-trials 10 --worker 1
"""
from __future__ import annotations

import os
import random
import socket
import time
from typing import Callable, Optional

import mlflow
import optuna

from ..blocks import family_of
from ..config import SweepConfig, default_pairs
from ..data import load_for
from ..device import pick_device
from ..distributed import broadcast_json, world
from ..engine import network_accuracy
from ..errors import KTError, first_line
from ..pairs.store import digest as folder_digest
from ..paths import default_storage
from ..redact import redact
from ..sweep import study as st
from ..sweep.space import describe
from ..sweep.trial import TrialRunner, follow_trials
from ..tracking import champion
from ..tracking.datasets import load_pair_splits, log_pair_input
from ..tracking.models import default_name, load_translator
from ..tracking.runs import flat_params, log_family, step_run
from ..training.train import check_training


def _rescorer(family, val, data, device) -> Callable[[str], float]:
    """Scores another translator on this sweep's validation networks (to compare with the champion)."""
    def rescore(uri: str) -> float:
        translator = load_translator(uri, device=str(device))
        acc = network_accuracy(family, val.part("begin"), translator.translate_batch(val.part("large")),
                               val.part("last"), data, device=device)
        return float(acc.mean())
    return rescore


def _log_input_retrying(log: Callable[[], None], attempts: int = 4) -> None:
    """Workers starting together may log the same pair dataset at once; the tracking server then
    refuses all but one (unique dataset key). Retry: the dataset exists by then and is just linked."""
    for attempt in range(attempts):
        try:
            log()
            return
        except Exception as e:  # MlflowException / RestException: input logging must not stop a sweep
            if attempt + 1 == attempts:
                print(f"sweep: could not log the pairs as run input ({first_line(e)}); going on")
                return
            time.sleep(0.3 + random.random())


def _register(study: optuna.Study, name: str, val_digest: str, pairs_digest: str, rescore) -> None:
    """Register the study's best translator (once) and move ``champion`` to it if it wins."""
    best = study.best_trial
    mlflow.log_params(flat_params({f"best_{k}": v for k, v in best.params.items()}))
    mlflow.log_metric("best_score", float(best.value))
    run_id, uri = best.user_attrs.get(st.RUN_ID_ATTR), best.user_attrs.get(st.MODEL_URI_ATTR)
    if not run_id or not uri:
        raise KTError(f"best trial {best.number} of study {study.study_name} has no logged translator "
                      f"(user attrs {st.RUN_ID_ATTR}/{st.MODEL_URI_ATTR} missing); rerun the sweep with a new study.")
    mlflow.set_tags({"kt.best_trial": str(best.number), "kt.best_run_id": run_id})
    tags = {**best.user_attrs.get(st.MODEL_TAGS_ATTR, {}), champion.SCORE_TAG: repr(float(best.value)),
            champion.VAL_DIGEST_TAG: val_digest, champion.PAIRS_DIGEST_TAG: pairs_digest,
            "kt.val_acc_mean": f"{best.value:.2f}", "kt.study": study.study_name, "kt.trial": str(best.number),
            "kt.run_id": run_id}
    version = champion.register_version(name, run_id, uri, tags)
    wins, reason = champion.move_champion(name, version, float(best.value), val_digest, rescore)
    mlflow.set_tags({"kt.best_model_version": version, "kt.champion_moved": str(wins)})
    print(f"sweep: best trial {best.number} of study {study.study_name!r}: {best.value:.2f}% "
          f"({describe(best.params)}); registered {name} version {version}; "
          f"{'champion -> version ' + version if wins else 'champion unchanged'}: {reason}", flush=True)


def run_sweep(cfg: SweepConfig, *, experiment: Optional[str] = None, nested: bool = False) -> str:
    """Run this worker's share of the study inside an MLflow parent run; returns the parent run id."""
    cfg.validate()   # every check that needs no I/O first, then the storage, then the data
    storage = cfg.storage or default_storage()
    db = st.open_storage(storage, cfg.heartbeat_interval, cfg.grace_period, cfg.max_retry) if world().is_main else None
    pairs = cfg.pairs or default_pairs(cfg.dataset, cfg.data_root)
    folder, train, val = load_pair_splits(pairs, cfg.dataset)
    family = family_of(train.settings)
    data = load_for(family, cfg.dataset, cfg.data_root, cfg.colour, train.settings)
    device = pick_device(cfg.device)
    check_training(cfg.first_trial(), family, train, val)   # what every trial would refuse, before a run opens
    if not world().is_main:
        follow_trials(cfg, family, train, val, data)
        return ""
    name = cfg.registered_name or default_name(family.name, cfg.resolved_arch)
    val_digest, pairs_digest = st.val_digest(folder, cfg.dataset), folder_digest(folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = st.load_study(cfg.study_name, db, cfg.sampler, cfg.seed, cfg.worker,
                          st.make_pruner(cfg.pruner, cfg.pruner_startup_trials))
    st.fail_stale(study)
    params = {**cfg.as_params(), "pairs": pairs, "storage": redact(storage), "registered_name": name,
              "family": family.name, "n_train_pairs": len(train), "n_val": len(val)}
    with step_run("sweep", params, run_name=f"sweep {cfg.study_name} worker {cfg.worker}", nested=nested,
                  experiment=experiment, family=family.name) as parent:
        mlflow.set_tags({"kt.study": cfg.study_name, "kt.worker": f"{socket.gethostname()}:{os.getpid()}",
                         "kt.storage": redact(storage), champion.VAL_DIGEST_TAG: val_digest,
                         champion.PAIRS_DIGEST_TAG: pairs_digest})
        log_family(family)
        _log_input_retrying(lambda: log_pair_input(folder, pairs, "training"))
        print(f"sweep: worker {cfg.worker} joins study {cfg.study_name!r} at {redact(storage)} "
              f"({len(study.get_trials(deepcopy=False))} trials so far; device {device}; "
              f"n_trials {cfg.n_trials}, timeout {cfg.timeout})", flush=True)
        try:
            study.optimize(TrialRunner(cfg, family, train, val, data), n_trials=cfg.n_trials, timeout=cfg.timeout,
                           catch=(Exception,), gc_after_trial=True)
        finally:
            broadcast_json(None)   # the other ranks' follow_trials ends
            st.fail_stale(study)
        st.log_study_report(study)
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            print(f"sweep: study {cfg.study_name!r} has no complete trial yet; nothing registered", flush=True)
        else:
            _register(study, name, val_digest, pairs_digest, _rescorer(family, val, data, device))
        return parent.info.run_id
