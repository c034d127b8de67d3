"""Sweeps: Optuna studies over translators, tracked in MLflow, shared by many workers (``kt sweep``)."""
from .space import SearchSpace

__all__ = ["SearchSpace", "run_sweep", "add_parser"]


def __getattr__(name: str):
    if name in ("run_sweep", "add_parser"):
        from . import step
        return getattr(step, name)
    raise AttributeError(name)
