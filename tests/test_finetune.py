"""`kt finetune`: the user's network compressed, its small block fine-tuned beside random init and selection."""
from __future__ import annotations

import mlflow
import pytest
import torch

from kt_mlflow.blocks import create_family, prefixed
from kt_mlflow.config import FinetuneConfig
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import network_accuracy
from kt_mlflow.errors import KTError
from kt_mlflow.pairs.store import load_split
from kt_mlflow.steps.finetune import run_finetune
from kt_mlflow.tracking.models import load_translator, log_translator
from kt_mlflow.translators import create_translator


def _accuracy(family, state, data) -> float:
    parts = [{k: v[None] for k, v in prefixed(state, p).items()} for p in ("begin", "block", "last")]
    return float(network_accuracy(family, *parts, data)[0])


def test_finetune_writes_the_tuned_network_and_logs_every_starting_points_curve(tiny_pairs, local_tracking, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    family, data = create_family("paper_mnist"), load_dataset("digits")
    val = load_split(tiny_pairs, "val")
    network = {f"{new}.{k}": v[0] for old, new in (("begin", "begin"), ("large", "block"), ("last", "last"))
               for k, v in val.part(old).items()}
    torch.save(network, tmp_path / "model.pt")
    torch.manual_seed(0)
    large = {k: v[:1] for k, v in val.part("large").items()}
    with mlflow.start_run():
        log_translator(create_translator("channel_set", family, bn_aware=True, depth=1, width=8), large, "kt-tune")
    cfg = FinetuneConfig(model="kt-tune", input=str(tmp_path / "model.pt"), output=str(tmp_path / "small.pt"),
                         dataset="digits", epochs=2, batch_size=64)
    run_id, curves = run_finetune(cfg)
    assert sorted(curves["method"].unique()) == ["kt", "l1", "random"] and sorted(curves["epoch"].unique()) == [0, 1, 2]
    acc = curves.set_index(["method", "epoch"])["accuracy"]
    start = _accuracy(family, load_translator("kt-tune").compress_state(network).state_dict(), data)
    assert acc["kt", 0] == pytest.approx(start, abs=1e-3)                 # epoch 0 is kt compress's network
    tuned = torch.load(tmp_path / "small.pt", weights_only=True)
    assert _accuracy(family, tuned, data) == pytest.approx(acc["kt", 2], abs=1e-3)   # what was written is what scored
    assert acc["kt", 2] != acc["kt", 0] and acc["random", 2] != acc["random", 0]
    history = mlflow.MlflowClient().get_metric_history(run_id, "kt_acc")
    assert [(m.step, round(m.value, 3)) for m in history] == [(e, round(acc["kt", e], 3)) for e in (0, 1, 2)]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"finetune_curves.json", "finetune.html"} <= artifacts


def test_finetune_refuses_bad_input_before_the_run(tmp_path, local_tracking):
    with pytest.raises(KTError, match="--input is required"):
        FinetuneConfig(output=str(tmp_path / "o.pt")).validate()
    with pytest.raises(KTError, match="--lr must be a finite number"):
        FinetuneConfig(input="m.pt", output=str(tmp_path / "o.pt"), lr=float("nan")).validate()
    with pytest.raises(KTError, match="no network file at"):
        run_finetune(FinetuneConfig(input=str(tmp_path / "missing.pt"), output=str(tmp_path / "o.pt")))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
