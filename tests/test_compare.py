"""Method comparison tables, figures, MLflow logging and the ``knowledge_translation`` evaluator."""
from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from kt_mlflow.blocks import create_family, prefixed
from kt_mlflow.data import load_dataset
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation import evaluator as kt_evaluator
from kt_mlflow.evaluation.baselines import make_baseline, uniform_selection
from kt_mlflow.evaluation.compare import bucket_counts, bucket_labels, compare_methods, summary_table
from kt_mlflow.evaluation.plots import bucket_figure, evaluation_metrics, log_evaluation, scatter_figure
from kt_mlflow.pairs.store import PairSet, load_split, write_shard

SETTINGS = {"family": "paper_mnist", "dataset": "digits", "seed": 0}


def hand_df() -> pd.DataFrame:
    rows = {"random": [40.0, 60.0], "uniform": [45.0, 65.0], "kt": [80.0, 60.0], "trained": [90.0, 90.0],
            "large": [92.0, 96.0]}
    return pd.DataFrame([{"method": m, "network": i, "seed": 10 + i, "accuracy": a}
                         for m, accs in rows.items() for i, a in enumerate(accs)])


def synthetic_tensors(n: int) -> dict:
    """``n`` freshly initialised networks and small blocks in the pair-shard layout (no training)."""
    fam = create_family("paper_mnist")
    inits = [fam.init_pair(100 + i) for i in range(n)]
    out = {}
    for part, module in (("begin", "begin"), ("large", "block"), ("last", "last")):
        for k in prefixed(inits[0][0], module):
            out[f"{part}.{k}"] = torch.stack([prefixed(b, module)[k] for b, _ in inits])
    for k in inits[0][1]:
        out[f"small.{k}"] = torch.stack([s[k] for _, s in inits])
    return out


def synthetic_pairs(n: int = 3) -> PairSet:
    return PairSet(dict(SETTINGS), synthetic_tensors(n), [{"index": i, "seed": 100 + i} for i in range(n)])


# -- tables ----------------------------------------------------------------------------------------


def test_summary_table_and_gap_closed():
    table = summary_table(hand_df())
    assert list(table.index) == ["random", "uniform", "kt", "trained", "large"]
    assert table.loc["random", "mean"] == 50.0 and table.loc["random", "std"] == 10.0
    assert (table.loc["kt", "min"], table.loc["kt", "max"], table.loc["kt", "mean"]) == (60.0, 80.0, 70.0)
    assert table.loc["kt", "gap_closed"] == pytest.approx((70 - 50) / (90 - 50))
    assert table.loc["uniform", "gap_closed"] == pytest.approx(5 / 40)
    assert table.loc["random", "gap_closed"] == 0.0 and table.loc["trained", "gap_closed"] == 1.0


def test_gap_closed_is_nan_without_random():
    df = hand_df()
    assert summary_table(df[df.method != "random"])["gap_closed"].isna().all()


def test_bucket_counts():
    df = pd.DataFrame({"method": ["a"] * 5 + ["b"], "accuracy": [0.0, 4.99, 5.0, 97.5, 100.0, 50.0]})
    counts = bucket_counts(df)
    assert list(counts.index) == bucket_labels(5) and len(counts) == 20
    assert list(counts.columns) == ["a", "b"]
    assert counts.loc["0-5", "a"] == 2 and counts.loc["5-10", "a"] == 1 and counts.loc["95-100", "a"] == 2
    assert counts.loc["50-55", "b"] == 1 and counts.to_numpy().sum() == 6
    assert list(bucket_counts(df, width=10).index)[-1] == "90-100"
    with pytest.raises(KTError, match="divide 100"):
        bucket_counts(df, width=7)


def test_compare_methods_rows():
    fam, val = create_family("paper_mnist"), synthetic_pairs(3)
    data = load_dataset("digits")
    methods = {name: make_baseline(name, fam, val.part("large")) for name in ("random", "uniform")}
    df = compare_methods(fam, val, data, methods)
    assert list(df.columns) == ["method", "network", "seed", "accuracy"]
    assert df.groupby("method", sort=False).size().to_dict() == {"random": 3, "uniform": 3, "trained": 3, "large": 3}
    assert df[df.method == "large"]["seed"].tolist() == [100, 101, 102]
    assert df["accuracy"].between(0, 100).all()
    bad = {"conv1.weight": methods["uniform"]["conv1.weight"][:2], "conv2.weight": methods["uniform"]["conv2.weight"][:2]}
    with pytest.raises(KTError, match="one small block per validation network"):
        compare_methods(fam, val, data, {"bad": bad})
    with pytest.raises(KTError, match="reserved"):
        compare_methods(fam, val, data, {"trained": methods["uniform"]})


# -- figures and logging ---------------------------------------------------------------------------


def test_bucket_figure_traces():
    fig = bucket_figure(hand_df())
    assert [t.name for t in fig.data] == ["random", "uniform", "kt", "trained", "large"]
    assert all(t.type == "bar" and list(t.x) == bucket_labels(5) and sum(t.y) == 2 for t in fig.data)
    assert fig.layout.barmode == "group"


def test_scatter_figure_traces():
    fig = scatter_figure(hand_df(), "kt")
    assert [t.name for t in fig.data] == ["kt", "y = x"]
    assert list(fig.data[0].x) == [90.0, 90.0] and list(fig.data[0].y) == [80.0, 60.0]
    assert fig.data[1].x[0] == fig.data[1].y[0] and fig.data[1].x[1] == fig.data[1].y[1]
    with pytest.raises(KTError, match="no rows for method 'l1'"):
        scatter_figure(hand_df(), "l1")


def test_log_evaluation_metrics_and_artifacts(local_tracking):
    mlflow.set_experiment("kt-eval-test")
    df = hand_df()
    with mlflow.start_run() as run:
        logged = log_evaluation(df, prefix="val_")
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    for method in ("random", "uniform", "kt", "trained", "large"):
        for stat in ("mean", "std", "min", "max"):
            assert f"val_{method}_acc_{stat}" in metrics
        assert f"val_{method}_gap_closed" in metrics
    assert metrics["val_gap_closed"] == pytest.approx(0.5)
    assert metrics["val_kt_acc_mean"] == 70.0
    assert metrics == pytest.approx(logged.metrics)
    files = {f.path for f in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"val_per_network.json", "val_summary.json", "val_accuracy_buckets.html", "val_scatter_kt.html"} <= files
    assert not {f for f in files if "scatter" in f} - {"val_scatter_kt.html"}  # one scatter: KT against trained
    with pytest.raises(KTError, match="needs an MLflow run"):
        log_evaluation(df)


def test_evaluation_metrics_skip_nan():
    df = hand_df()
    metrics = evaluation_metrics(df[df.method != "trained"])
    assert "kt_acc_mean" in metrics and "gap_closed" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())


# -- the mlflow.models.evaluate plugin -------------------------------------------------------------


class UniformTranslator:
    """A deterministic stand-in for a trained translator: weight selection."""

    def __init__(self, family):
        self.family = family

    def translate_batch(self, large):
        return uniform_selection(self.family, large)


def test_settings_contract():
    frame = pd.DataFrame({"pairs": ["a", "a"], "dataset": ["mnist", None]})
    s = kt_evaluator.EvalSettings.resolve(frame, {"baselines": "random,l1", "data_root": "/d"})
    assert (s.pairs, s.dataset, s.data_root, s.baselines, s.split) == ("a", "mnist", "/d", ["random", "l1"], "val")
    with pytest.raises(KTError, match="no pairs"):
        kt_evaluator.EvalSettings.resolve(pd.DataFrame({"x": [1]}), {})
    with pytest.raises(KTError, match="different values"):
        kt_evaluator.EvalSettings.resolve(pd.DataFrame({"pairs": ["a", "b"]}), {})
    with pytest.raises(KTError, match="unknown evaluator_config"):
        kt_evaluator.EvalSettings.resolve(frame, {"pairz": "a"})
    with pytest.raises(KTError, match="unknown baseline"):
        kt_evaluator.EvalSettings.resolve(frame, {"baselines": ["magic"]})


def test_evaluator_through_mlflow_evaluate(local_tracking, tmp_path, monkeypatch):
    from mlflow.models.evaluation.evaluator_registry import _model_evaluation_registry as registry

    if not registry.is_registered("knowledge_translation"):  # entry point missing: not pip-installed
        registry.register("knowledge_translation", kt_evaluator.KnowledgeTranslationEvaluator)
    folder = tmp_path / "pairs"
    folder.mkdir()
    n = 3
    write_shard(folder, "val", 0, synthetic_tensors(n), [{"index": i, "seed": 100 + i} for i in range(n)], SETTINGS)

    class ToyModel(mlflow.pyfunc.PythonModel):  # never called: the evaluator only needs its id
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    fam = create_family("paper_mnist")
    asked = []
    monkeypatch.setattr(kt_evaluator, "load_translator", lambda uri: asked.append(uri) or UniformTranslator(fam))
    mlflow.set_experiment("kt-evaluator-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="translator", python_model=ToyModel(), pip_requirements=[],
                                       registered_model_name="kt-toy")
    with mlflow.start_run() as run:
        result = mlflow.models.evaluate(
            model="models:/kt-toy@latest", data=pd.DataFrame({"pairs": [str(folder)]}),
            model_type="knowledge_translation", evaluators=["knowledge_translation"],
            evaluator_config={"knowledge_translation": {"baselines": ["random", "uniform"], "device": "cpu"}},
        )
    assert asked == [f"models:/{info.model_id}"]
    m = result.metrics
    assert m["kt_acc_mean"] == m["uniform_acc_mean"] and m["gap_closed"] == m["uniform_gap_closed"]
    assert {"random_acc_mean", "trained_acc_mean", "large_acc_mean"} <= set(m)
    assert "identity_acc_mean" not in m
    assert {"per_network", "summary", "accuracy_buckets", "scatter_kt", "evaluation_config"} <= set(result.artifacts)
    table = result.artifacts["per_network"].content
    assert len(table["data"]) == 5 * n
    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["kt_acc_mean"] == pytest.approx(m["kt_acc_mean"])
    assert np.isclose(load_split(folder, "val").part("large")["conv1.weight"].shape[0], n)
