"""Plotly figures as self-contained HTML artifacts: readable offline and in an offline MLflow UI.

``mlflow.log_figure`` writes HTML that loads plotly.js from a CDN, so a machine without internet
shows a blank page; here plotly.js is inlined into every file instead.
"""
from __future__ import annotations

from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient


def figure_html(fig) -> str:
    """The figure as one HTML page with plotly.js inside (no network request when opened)."""
    return fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})


def log_figure(fig, path: str, run_id: Optional[str] = None) -> None:
    """Log ``fig`` as the HTML artifact ``path`` of ``run_id`` (default: the active run)."""
    if run_id is None:
        mlflow.log_text(figure_html(fig), path)
    else:
        MlflowClient().log_text(run_id, figure_html(fig), path)
