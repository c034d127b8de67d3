"""Shifted evaluation suites: one translator on held-out networks trained other ways, side by side.

A suite is a pair set whose validation networks were made by another training protocol (another
optimiser, learning rate, epoch count, flips, batch size or seed range; ``kt generate`` options).
Each suite gets its own per-network comparison (logged under ``suite_<name>/``), one row of the
``suites`` table and one bar of the ``suites`` figure; the worst suite's gap closed is a metric.

Example:
    >>> row = suite_row("adam", "runs:/abc/pairs", df)          # doctest: +SKIP
    >>> row["gap_closed"], row["below_random"]                   # doctest: +SKIP
    (0.81, 0)
"""
from __future__ import annotations

from typing import Dict, List

import mlflow
import pandas as pd
import plotly.graph_objects as go

from ..tracking.figures import log_figure
from .compare import RANDOM, TRAINED, summary_table
from .plots import KT_METHOD

WORST_TAG = "kt.worst_suite"


def suite_row(name: str, pairs: str, df: pd.DataFrame) -> Dict[str, object]:
    """One suite's line: KT against random init and the trained small block, and how many held-out
    networks KT leaves below their own random-init accuracy."""
    summary = summary_table(df)
    wide = df.pivot_table(index="network", columns="method", values="accuracy")
    stat = lambda method, col: float(summary.loc[method, col]) if method in summary.index else float("nan")  # noqa: E731
    return {
        "suite": name, "pairs": pairs, "networks": int(wide.shape[0]),
        "kt_mean": stat(KT_METHOD, "mean"), "kt_min": stat(KT_METHOD, "min"),
        "random_mean": stat(RANDOM, "mean"), "trained_mean": stat(TRAINED, "mean"),
        "large_mean": stat("large", "mean"), "gap_closed": stat(KT_METHOD, "gap_closed"),
        "below_random": int((wide[KT_METHOD] < wide[RANDOM]).sum()) if RANDOM in wide else -1,
    }


def suites_figure(table: pd.DataFrame) -> go.Figure:
    """Gap closed per suite (bars), KT's mean accuracy in each bar's label."""
    fig = go.Figure([go.Bar(x=table["suite"].tolist(), y=table["gap_closed"].tolist(),
                            text=[f"KT {m:.1f}%" for m in table["kt_mean"]], textposition="outside")])
    fig.update_layout(title="Gap closed by KT on each held-out suite (1 = the trained small block)",
                      xaxis_title="suite", yaxis_title="gap closed")
    return fig


def log_suites(rows: List[Dict[str, object]]) -> Dict[str, float]:
    """Log the suites table and figure to the active run, and the worst suite as metric and tag."""
    table = pd.DataFrame(rows)
    mlflow.log_table(table, "suites.json")
    log_figure(suites_figure(table), "suites.html")
    worst = table.loc[table["gap_closed"].idxmin()] if table["gap_closed"].notna().any() else table.iloc[0]
    metrics = {"worst_suite_gap_closed": float(worst["gap_closed"]), "suites_below_random": float(table["below_random"].sum())}
    mlflow.log_metrics(metrics)
    mlflow.set_tag(WORST_TAG, str(worst["suite"]))
    return metrics
