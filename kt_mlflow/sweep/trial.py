"""One sweep trial: sample a translator, train it in a nested MLflow run, report to Optuna, log the model."""
from __future__ import annotations

from typing import Any, Callable, Dict

import mlflow
import optuna

from ..config import SweepConfig
from ..distributed import broadcast_json
from ..errors import first_line
from ..pairs.store import PairSet
from ..tracking.champion import SCORE_TAG
from ..tracking.models import log_translator
from ..tracking.runs import flat_params
from ..training.train import NonFiniteLoss, StoppedByMain, TrainResult, train_translator
from . import study as st
from .space import describe, sample


class TrialRunner:
    """The Optuna objective of one worker: ``study.optimize(TrialRunner(...))``."""

    def __init__(self, cfg: SweepConfig, family, train: PairSet, val: PairSet, data) -> None:
        self.cfg, self.family, self.train, self.val, self.data = cfg, family, train, val, data
        self.example = {k: v[:1] for k, v in val.part("large").items()}

    def __call__(self, trial: optuna.Trial) -> float:
        params = sample(self.cfg, trial)
        retry_of = trial.user_attrs.get("trial_number")   # a re-queued copy inherits the failed trial's attrs
        trial.set_user_attr("trial_number", trial.number)
        tags = {"kt.step": "sweep-trial", "kt.study": self.cfg.study_name, "kt.trial": str(trial.number),
                **({"kt.retry_of_trial": str(retry_of)} if retry_of is not None else {})}
        run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags)
        trial.set_user_attr(st.RUN_ID_ATTR, run.info.run_id)
        status = "FAILED"
        try:
            score = self._fit(trial, params)
            status = "FINISHED"
            return score
        except optuna.TrialPruned as e:
            reason = str(e) or "pruned"
            mlflow.set_tags({st.STATE_TAG: "pruned", st.REASON_TAG: reason[:4000]})
            trial.set_user_attr("prune_reason", reason[:500])
            status = "FINISHED"
            print(f"sweep: trial {trial.number} pruned: {reason} ({describe(params)})", flush=True)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {first_line(e) if str(e) else ''}"
            mlflow.set_tags({st.STATE_TAG: "failed", st.REASON_TAG: reason[:4000]})
            print(f"sweep: trial {trial.number} failed: {reason[:300]} ({describe(params)})", flush=True)
            raise
        except BaseException:
            status = "KILLED"
            raise
        finally:
            mlflow.end_run(status=status)

    def _fit(self, trial: optuna.Trial, params: Dict[str, Any]) -> float:
        """Train the trial's translator (pruned on a bad intermediate score) and log it; returns its score."""
        cfg = self.cfg.trial_config(params)
        mlflow.log_params(flat_params({**cfg.as_params(), "trial_number": trial.number,
                                       **{f"trial.{k}": v for k, v in params.items()}}))
        broadcast_json(params)   # under torchrun the other ranks train this trial too (see follow_trials)
        try:
            result = train_translator(cfg, self.family, self.train, self.val, self.data,
                                      on_epoch=self._reporter(trial), progress=False)
        except NonFiniteLoss as e:
            raise optuna.TrialPruned(f"non-finite loss: {e}") from None
        score = self._log(trial, result)
        print(f"sweep: trial {trial.number} complete: {score:.2f}% ({describe(params)})", flush=True)
        return score

    def _reporter(self, trial: optuna.Trial) -> Callable[[int, Dict[str, float]], None]:
        pruner = self.cfg.pruner

        def on_epoch(epoch: int, metrics: Dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=epoch)
            if "val_acc_mean" in metrics:
                trial.report(metrics["val_acc_mean"], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by the {pruner} pruner at epoch {epoch} "
                                             f"(val_acc_mean {metrics['val_acc_mean']:.2f}%)")
        return on_epoch

    def _log(self, trial: optuna.Trial, result: TrainResult) -> float:
        score = float(result.best["val_acc_mean"])
        mlflow.log_metrics({**{f"best_{k}": v for k, v in result.best.items()}, "score": score})
        log_translator(result.translator, self.example, None)
        model = mlflow.last_logged_model()
        trial.set_user_attr(st.MODEL_URI_ATTR, f"models:/{model.model_id}")
        trial.set_user_attr(st.MODEL_TAGS_ATTR, result.translator.config_tags())
        mlflow.set_tags({st.STATE_TAG: "complete", SCORE_TAG: repr(score)})
        return score


def follow_trials(cfg: SweepConfig, family, train: PairSet, val: PairSet, data) -> int:
    """A torchrun rank other than 0: train each trial rank 0 samples, until it says the study is done.
    Returns how many trials this rank took part in."""
    n = 0
    while (params := broadcast_json()) is not None:
        n += 1
        try:
            train_translator(cfg.trial_config(params), family, train, val, data, progress=False)
        except (StoppedByMain, NonFiniteLoss):   # pruned or diverged: rank 0 reports it
            pass
    return n
