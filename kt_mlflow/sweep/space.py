"""The search space of a sweep: depth, width, mask ratio, noise level, epochs and learning rate.

The ranges are fields of ``SweepConfig`` (``--depth-min`` ...); the hidden widths follow the width
(token_hidden = token_mult * width, channel_hidden = channel_mult * width). A range with low == high
is a fixed value (still recorded as a trial parameter).

Example:
    >>> from kt_mlflow.config import SweepConfig
    >>> import optuna
    >>> trial = optuna.trial.FixedTrial({"depth": 2, "width": 16, "mask_ratio": 0.1, "noise_std": 0.0,
    ...                                  "epochs": 20, "lr": 1e-3})
    >>> sample(SweepConfig(depth_min=1, depth_max=2, width_min=8, width_max=16), trial)["width"]
    16
"""
from __future__ import annotations

from typing import Any, Dict

from ..config import SweepConfig


def sample(cfg: SweepConfig, trial: Any) -> Dict[str, Any]:
    """Ask an Optuna trial for one point of the space."""
    params: Dict[str, Any] = {"depth": trial.suggest_int("depth", cfg.depth_min, cfg.depth_max)}
    if cfg.width_options():
        params["width"] = trial.suggest_categorical("width", cfg.width_options())
    else:
        params["width"] = trial.suggest_int("width", cfg.width_min, cfg.width_max, log=True)
    params["mask_ratio"] = trial.suggest_float("mask_ratio", 0.0, cfg.mask_max)
    params["noise_std"] = trial.suggest_float("noise_std", 0.0, cfg.noise_max)
    params["epochs"] = trial.suggest_int("epochs", cfg.epochs_min, cfg.epochs_max)
    params["lr"] = trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True)
    return params


def describe(params: Dict[str, Any]) -> str:
    """``depth 2, width 16, ...`` for log lines."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
