"""Plotly figures of a method comparison, and logging the whole comparison to an MLflow run.

Example:
    >>> df = compare_methods(fam, val, data, methods)            # doctest: +SKIP
    >>> with mlflow.start_run():                                  # doctest: +SKIP
    ...     logged = log_evaluation(df, prefix="val_")
    >>> logged.metrics["val_kt_acc_mean"]                         # doctest: +SKIP
    91.3
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import mlflow
import pandas as pd
import plotly.graph_objects as go

from ..errors import KTError
from ..tracking.figures import log_figure
from .compare import TRAINED, bucket_counts, summary_table

KT_METHOD = "kt"


def bucket_figure(df: pd.DataFrame, width: int = 5) -> go.Figure:
    """Grouped bars: how many networks of each method fall in each ``width``-point accuracy bucket.

    Example:
        >>> bucket_figure(df).data[0].name                         # doctest: +SKIP
        'random'
    """
    counts = bucket_counts(df, width)
    fig = go.Figure([go.Bar(name=m, x=list(counts.index), y=counts[m].tolist()) for m in counts.columns])
    fig.update_layout(barmode="group", title=f"Test accuracy of the assembled networks ({width}-point buckets)",
                      xaxis_title="accuracy (%)", yaxis_title="networks", legend_title="method")
    return fig


def scatter_figure(df: pd.DataFrame, method: str = KT_METHOD) -> go.Figure:
    """Per network: ``method``'s accuracy against the trained small block's, with the line y = x.

    Example:
        >>> [t.name for t in scatter_figure(df, "uniform").data]   # doctest: +SKIP
        ['uniform', 'y = x']
    """
    known = sorted(set(df["method"]))
    for name in (method, TRAINED):
        if name not in known:
            raise KTError(f"no rows for method {name!r} in the comparison; choose one of: {', '.join(known)}.")
    wide = df.pivot_table(index="network", columns="method", values="accuracy")
    x, y = wide[TRAINED], wide[method]
    lo = math.floor(min(x.min(), y.min())) - 1
    hi = math.ceil(max(x.max(), y.max())) + 1
    fig = go.Figure([
        go.Scatter(name=method, x=x.tolist(), y=y.tolist(), mode="markers", text=[f"network {i}" for i in wide.index]),
        go.Scatter(name="y = x", x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash", "color": "gray"}),
    ])
    fig.update_layout(title=f"{method} vs trained small block, per network",
                      xaxis_title="trained small block accuracy (%)", yaxis_title=f"{method} accuracy (%)")
    return fig


@dataclass
class LoggedEvaluation:
    """What ``log_evaluation`` wrote: metric values and artifact paths (relative to the run's root)."""

    metrics: Dict[str, float] = field(default_factory=dict)
    tables: Dict[str, str] = field(default_factory=dict)
    figures: Dict[str, str] = field(default_factory=dict)


def evaluation_metrics(df: pd.DataFrame, prefix: str = "") -> Dict[str, float]:
    """``{prefix}{method}_acc_mean/std/min/max`` and ``{prefix}{method}_gap_closed`` for every method,
    plus ``{prefix}gap_closed`` for the 'kt' method when present. NaN values are left out.

    Example:
        >>> df = pd.DataFrame({"method": ["random", "trained", "kt"], "accuracy": [50.0, 90.0, 80.0]})
        >>> evaluation_metrics(df)["gap_closed"]
        0.75
    """
    summary = summary_table(df)
    out: Dict[str, float] = {}
    for method, row in summary.iterrows():
        for stat in ("mean", "std", "min", "max"):
            out[f"{prefix}{method}_acc_{stat}"] = float(row[stat])
        out[f"{prefix}{method}_gap_closed"] = float(row["gap_closed"])
    if KT_METHOD in summary.index:
        out[f"{prefix}gap_closed"] = float(summary.loc[KT_METHOD, "gap_closed"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def log_evaluation(df: pd.DataFrame, prefix: str = "", run_id: Optional[str] = None) -> LoggedEvaluation:
    """Log a comparison to the active MLflow run (or ``run_id``): tables, metrics and HTML figures.

    Tables ``{prefix}per_network.json`` and ``{prefix}summary.json`` (``mlflow.log_table``), metrics
    from ``evaluation_metrics``, figures ``{prefix}accuracy_buckets.html`` and ``{prefix}scatter_kt.html`` (self-contained HTML).

    Example:
        >>> with mlflow.start_run():                              # doctest: +SKIP
        ...     log_evaluation(df)
    """
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise KTError("log_evaluation needs an MLflow run: call it inside `with mlflow.start_run():` or pass run_id.")
        run_id = active.info.run_id
    logged = LoggedEvaluation(metrics=evaluation_metrics(df, prefix))
    summary = summary_table(df).reset_index()
    for name, table in (("per_network", df), ("summary", summary)):
        path = f"{prefix}{name}.json"
        mlflow.log_table(table, path, run_id=run_id)
        logged.tables[name] = path
    if logged.metrics:
        mlflow.log_metrics(logged.metrics, run_id=run_id, synchronous=True)
    figures = {"accuracy_buckets": bucket_figure(df)}
    if TRAINED in set(df["method"]) and KT_METHOD in set(df["method"]):
        figures[f"scatter_{KT_METHOD}"] = scatter_figure(df, KT_METHOD)
    for name, fig in figures.items():
        path = f"{prefix}{name}.html"
        log_figure(fig, path, run_id=run_id)
        logged.figures[name] = path
    return logged


__all__ = ["bucket_figure", "scatter_figure", "evaluation_metrics", "log_evaluation", "LoggedEvaluation", "KT_METHOD"]
