"""Logged figures open offline: plotly.js is inside every HTML file, nothing is fetched from the network."""
from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pandas as pd
import plotly.graph_objects as go

from kt_mlflow.evaluation.plots import log_evaluation
from kt_mlflow.tracking.figures import figure_html

# What makes a browser fetch something: a script, stylesheet, image or frame from another host.
FETCH = re.compile(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", re.I)


def assert_offline(html: str) -> None:
    assert not FETCH.search(html), FETCH.search(html).group(0)
    assert "@import url(" not in html
    assert len(html) > 1_000_000 and "plotly" in html.lower()  # plotly.js itself is inlined


def test_figure_html_is_self_contained():
    html = figure_html(go.Figure(go.Bar(x=["a"], y=[1])))
    assert_offline(html)
    assert FETCH.search('<script src="https://cdn.plot.ly/plotly-3.0.1.min.js"></script>')  # the check can fail


def test_evaluation_figures_logged_to_mlflow_are_offline(tmp_path):
    df = pd.DataFrame({"method": ["random", "kt", "trained"] * 2, "network": [0, 0, 0, 1, 1, 1],
                       "seed": [0, 0, 0, 1, 1, 1], "accuracy": [50.0, 70.0, 90.0, 40.0, 80.0, 85.0]})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    with mlflow.start_run() as run:
        logged = log_evaluation(df)
    assert sorted(logged.figures.values()) == ["accuracy_buckets.html", "scatter_kt.html"]
    for path in logged.figures.values():
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, dst_path=str(tmp_path))
        assert_offline(Path(local).read_text())
