"""``kt sweep``: an Optuna study over translators, tracked in MLflow, shared by many workers.

Every trial trains a translator on the same pairs and is scored by functional validation accuracy
(mean over the held-out networks). One MLflow parent run per worker, one nested child run per trial;
at the end the study's best translator is registered and becomes ``champion`` if it beats the
current one on the same validation networks.

Example (two workers, one study)::

    kt sweep --pairs kt-pairs --study-name s1 --storage postgresql://user@db/optuna --n-trials 10 --worker 0 &
    kt sweep --pairs kt-pairs --study-name s1 --storage postgresql://user@db/optuna --n-trials 10 --worker 1
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Dict, List, Optional

from ..errors import KTError
from ..training.recipes import RECIPES, get_recipe
from .space import SearchSpace, parse_choices


def run_sweep(space: SearchSpace, pairs: str, dataset: str = "digits", data_root: Optional[str] = None,
              study_name: str = "kt-sweep", storage: str = "sqlite:///kt-optuna.db", sampler: str = "tpe",
              pruner: str = "median", n_trials: Optional[int] = 20, timeout: Optional[float] = None,
              heartbeat_interval: int = 10, grace_period: Optional[int] = None, max_retry: int = 3,
              pruner_startup_trials: int = 2, worker: int = 0, registered_name: Optional[str] = None,
              experiment: Optional[str] = None) -> str:
    """Run this worker's share of the study inside an MLflow parent run; returns the parent run id."""
    # every check that needs no I/O first, then the storage, then the data
    space.validate()
    from .study import validate_choices
    validate_choices(sampler, pruner, heartbeat_interval, grace_period, max_retry, n_trials, timeout)
    if pruner_startup_trials < 0:
        raise KTError(f"--pruner-startup-trials must be >= 0, got {pruner_startup_trials}.")
    if worker < 0:
        raise KTError(f"--worker must be >= 0, got {worker}.")

    import mlflow
    import optuna

    from ..blocks import create_family
    from ..data import load_dataset
    from ..device import pick_device
    from ..evaluation.functional import network_accuracy
    from ..tracking.models import default_name, load_translator
    from ..tracking.runs import flat_params, step_run
    from ..tracking.datasets import log_pair_input
    from ..training.step import load_pairs
    from ..training.train import NonFiniteLoss, train_translator
    from . import study as st

    db = st.open_storage(storage, heartbeat_interval, grace_period, max_retry)
    folder, train, val = load_pairs(pairs, dataset)
    family = create_family(train.settings["family"])
    data = load_dataset(dataset, data_root)
    device = pick_device(space.device)
    name = registered_name or default_name(family.name, get_recipe(space.recipe).arch or space.arch)
    digest = st.val_digest(folder, dataset)
    from ..pairs.store import digest as folder_digest
    pairs_digest = folder_digest(folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = st.load_study(study_name, db, st.make_sampler(sampler, space.seed + worker),
                          st.make_pruner(pruner, pruner_startup_trials))
    example = {k: v[:1] for k, v in val.part("large").items()}
    val_large = val.part("large")

    def rescore(uri: str) -> float:
        translator = load_translator(uri, device=str(device))
        acc = network_accuracy(family, val.part("begin"), translator.translate_batch(val_large), val.part("last"),
                               data, device=device)
        return float(acc.mean())

    def objective(trial: optuna.Trial) -> float:
        params = space.sample(trial)
        cfg = space.config(params)
        retry_of = trial.user_attrs.get("trial_number")   # a re-queued copy inherits the failed trial's attrs
        trial.set_user_attr("trial_number", trial.number)
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                               tags={"kt.step": "sweep-trial", "kt.study": study_name, "kt.trial": str(trial.number),
                                     **({"kt.retry_of_trial": str(retry_of)} if retry_of is not None else {})})
        run_id = run.info.run_id
        trial.set_user_attr(st.RUN_ID_ATTR, run_id)
        status = "FAILED"
        try:
            mlflow.log_params(flat_params({**cfg.as_params(), "trial_number": trial.number,
                                           **{f"trial.{k}": v for k, v in params.items()}}))

            def on_epoch(epoch: int, metrics: Dict[str, float]) -> None:
                mlflow.log_metrics(metrics, step=epoch)
                if "val_acc_mean" in metrics:
                    trial.report(metrics["val_acc_mean"], epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned by the {pruner} pruner at epoch {epoch} "
                                                 f"(val_acc_mean {metrics['val_acc_mean']:.2f}%)")

            try:
                result = train_translator(cfg, family, train, val, data, on_epoch=on_epoch, progress=False)
            except NonFiniteLoss as e:
                raise optuna.TrialPruned(f"non-finite loss: {e}") from None
            score = float(result.best["val_acc_mean"])
            mlflow.log_metrics({**{f"best_{k}": v for k, v in result.best.items()}, "score": score})
            from ..tracking.models import log_translator
            log_translator(result.translator, example, None)
            model = mlflow.last_logged_model()
            trial.set_user_attr(st.MODEL_URI_ATTR, f"models:/{model.model_id}")
            trial.set_user_attr(st.MODEL_TAGS_ATTR, result.translator.config_tags())
            mlflow.set_tags({st.STATE_TAG: "complete", st.SCORE_TAG: repr(score)})
            status = "FINISHED"
            print(f"sweep: trial {trial.number} complete: {score:.2f}% ({_describe(params)})", flush=True)
            return score
        except optuna.TrialPruned as e:
            reason = str(e) or "pruned"
            mlflow.set_tags({st.STATE_TAG: "pruned", st.REASON_TAG: reason[:4000]})
            trial.set_user_attr("prune_reason", reason[:500])
            status = "FINISHED"
            print(f"sweep: trial {trial.number} pruned: {reason} ({_describe(params)})", flush=True)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            mlflow.set_tags({st.STATE_TAG: "failed", st.REASON_TAG: reason[:4000]})
            print(f"sweep: trial {trial.number} failed: {reason[:300]} ({_describe(params)})", flush=True)
            raise
        except BaseException:
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status=status)

    params = {**space.as_params(), "pairs": pairs, "dataset": dataset, "data_root": data_root,
              "study_name": study_name, "storage": st.redact(storage), "sampler": sampler, "pruner": pruner,
              "pruner_startup_trials": pruner_startup_trials, "n_trials": n_trials, "timeout": timeout,
              "heartbeat_interval": heartbeat_interval, "grace_period": grace_period, "max_retry": max_retry,
              "worker": worker, "registered_name": name, "family": family.name, "n_train_pairs": len(train),
              "n_val": len(val)}
    with step_run("sweep", params, run_name=f"sweep-{study_name}-w{worker}", experiment=experiment) as parent:
        mlflow.set_tags({"kt.study": study_name, "kt.worker": f"{socket.gethostname()}:{os.getpid()}",
                         "kt.storage": st.redact(storage), st.VAL_DIGEST_TAG: digest, st.PAIRS_DIGEST_TAG: pairs_digest})
        _log_input_retrying(lambda: log_pair_input(folder, pairs, "training"))
        print(f"sweep: worker {worker} joins study {study_name!r} at {st.redact(storage)} "
              f"({len(study.get_trials(deepcopy=False))} trials so far; device {device}; "
              f"n_trials {n_trials}, timeout {timeout})", flush=True)
        study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), gc_after_trial=True)
        st.log_study_report(study)
        try:
            best = study.best_trial
        except ValueError:
            print(f"sweep: study {study_name!r} has no complete trial yet; nothing registered", flush=True)
            return parent.info.run_id
        mlflow.log_params(flat_params({f"best_{k}": v for k, v in best.params.items()}))
        mlflow.log_metric("best_score", float(best.value))
        mlflow.set_tags({"kt.best_trial": str(best.number), "kt.best_run_id": best.user_attrs.get(st.RUN_ID_ATTR, "")})
        version, wins, reason = st.register_best(study, name, digest, pairs_digest, rescore)
        mlflow.set_tags({"kt.best_model_version": version, "kt.champion_moved": str(wins)})
        print(f"sweep: best trial {best.number} of study {study_name!r}: {best.value:.2f}% "
              f"({_describe(best.params)}); registered {name} version {version}; "
              f"{'champion -> version ' + version if wins else 'champion unchanged'}: {reason}", flush=True)
        return parent.info.run_id


def _log_input_retrying(log, attempts: int = 4) -> None:
    """Workers starting together may log the same pair dataset at once; the tracking server then
    refuses all but one (unique dataset key). Retry: the dataset exists by then and is just linked."""
    import random
    import time

    for attempt in range(attempts):
        try:
            log()
            return
        except Exception as e:  # MlflowException / RestException: input logging must not stop a sweep
            if attempt + 1 == attempts:
                print(f"sweep: could not log the pairs as run input ({str(e).splitlines()[0][:160]}); going on")
                return
            time.sleep(0.3 + random.random())


def _describe(params: Dict[str, object]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


# -- command line --------------------------------------------------------------------------------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _int, _none_or, add_common

    d = SearchSpace()
    add_common(p)
    p.add_argument("--pairs", default="kt-pairs", help="pair folder or generate run id (runs:/ID)")
    p.add_argument("--study-name", default="kt-sweep", help="Optuna study; workers with the same name cooperate")
    p.add_argument("--storage", default="sqlite:///kt-optuna.db",
                   help="Optuna storage URL: sqlite:///FILE (one machine) or postgresql://USER@HOST/DB (many)")
    p.add_argument("--n-trials", type=_none_or(_int), default=20, help="trials run by this worker ('' = no limit)")
    p.add_argument("--timeout", type=_none_or(float), default=None, help="seconds this worker starts trials for")
    p.add_argument("--sampler", default="tpe", help="tpe or random (seeded by --seed + --worker)")
    p.add_argument("--pruner", default="median", help="median, halving or none")
    p.add_argument("--pruner-startup-trials", type=_int, default=2, help="trials before the median pruner prunes")
    p.add_argument("--worker", type=_int, default=0, help="index of this worker (gives it its own sampler seed)")
    p.add_argument("--heartbeat-interval", type=_int, default=10, help="seconds between trial heartbeats")
    p.add_argument("--grace-period", type=_none_or(_int), default=None,
                   help="seconds without heartbeat before a trial counts as failed (default 2 x interval)")
    p.add_argument("--max-retry", type=_int, default=3, help="times a failed (killed) trial is re-queued")
    p.add_argument("--arch", default=d.arch, help="translator architecture: mixer, mlp or channel_set (unless the recipe names one)")
    p.add_argument("--recipe", default=d.recipe, help=f"translation recipe: {', '.join(RECIPES)}")
    p.add_argument("--depth-min", type=_int, default=d.depth_min)
    p.add_argument("--depth-max", type=_int, default=d.depth_max, help="paper: 24")
    p.add_argument("--width-min", type=_int, default=d.width_min, help="embedding width C, searched log-uniformly")
    p.add_argument("--width-max", type=_int, default=d.width_max, help="paper: 128")
    p.add_argument("--width-choices", default="", help="e.g. 32,64,128: search these widths instead of min..max")
    p.add_argument("--token-mult", type=_int, default=d.token_mult, help="token_hidden = token_mult x width")
    p.add_argument("--channel-mult", type=_int, default=d.channel_mult, help="channel_hidden = channel_mult x width")
    p.add_argument("--mask-max", type=float, default=d.mask_max, help="mask ratio searched in [0, mask-max]")
    p.add_argument("--noise-max", type=float, default=d.noise_max, help="noise sigma searched in [0, noise-max]")
    p.add_argument("--epochs-min", type=_int, default=d.epochs_min)
    p.add_argument("--epochs-max", type=_int, default=d.epochs_max, help="paper: 300 to 1000")
    p.add_argument("--lr-min", type=float, default=d.lr_min, help="learning rate searched log-uniformly")
    p.add_argument("--lr-max", type=float, default=d.lr_max)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--batch-size", type=_int, default=d.batch_size, help="paper: 4096 (with 300,000 pairs)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--augment-on", default=d.augment_on, help="source, target or both")
    p.add_argument("--val-every", type=_int, default=d.val_every, help="epochs between validations (pruning points)")
    p.add_argument("--registered-name", type=_none_or(str), default=None,
                   help="registered model name (default kt-<family>-<arch>)")
    p.set_defaults(func=_sweep)


def add_parser(subparsers) -> None:
    """Add ``kt sweep`` to the ``kt`` command's subparsers."""
    p = subparsers.add_parser("sweep", help="Optuna study over translators; many workers can share one study")
    _add_arguments(p)


def space_from_args(a: argparse.Namespace) -> SearchSpace:
    return SearchSpace(
        depth_min=a.depth_min, depth_max=a.depth_max, width_min=a.width_min, width_max=a.width_max,
        width_choices=parse_choices(a.width_choices), token_mult=a.token_mult, channel_mult=a.channel_mult,
        mask_max=a.mask_max, noise_max=a.noise_max, epochs_min=a.epochs_min, epochs_max=a.epochs_max,
        lr_min=a.lr_min, lr_max=a.lr_max, arch=a.arch, recipe=a.recipe, dropout=a.dropout, batch_size=a.batch_size,
        weight_decay=a.weight_decay, augment_on=a.augment_on, val_every=a.val_every, seed=a.seed, device=a.device,
    )


def _sweep(a: argparse.Namespace) -> None:
    run_id = run_sweep(
        space_from_args(a), a.pairs, a.dataset, a.data_root, a.study_name, a.storage, a.sampler, a.pruner,
        a.n_trials, a.timeout, a.heartbeat_interval, a.grace_period, a.max_retry, a.pruner_startup_trials,
        a.worker, a.registered_name, a.experiment_name,
    )
    print(f"sweep run: {run_id}")


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m kt_mlflow.sweep.step ARGS`` == ``kt sweep ARGS``."""
    from ..cli import main as cli_main

    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
