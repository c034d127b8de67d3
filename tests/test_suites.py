"""Shifted suites: `kt evaluate --suites` scores one translator on held-out networks trained other ways."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from kt_mlflow.blocks import create_family
from kt_mlflow.config import EvaluateConfig, GenerateConfig
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation.suites import WORST_TAG
from kt_mlflow.pairs.generate import generate_pairs
from kt_mlflow.pairs.store import sidecars
from kt_mlflow.protocols import PROTOCOLS
from kt_mlflow.steps.evaluate import run_evaluate
from kt_mlflow.tracking.models import log_translator
from kt_mlflow.translators import create_translator


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """Held-out networks only (no training pairs), made by Adam and by a one-epoch SGD protocol."""
    root = tmp_path_factory.mktemp("suites")
    made = {}
    for name, protocol in (("adam", dict(optimizer="adam", lr=0.003, lr_schedule="cosine")), ("short", {})):
        made[name] = root / name
        generate_pairs(GenerateConfig(output=str(made[name]), dataset="digits", n_pairs=0, n_val=4, members=4,
                                      epochs=1, small_epochs=1, **protocol))
    return made


def test_every_suite_is_scored_in_one_run_and_the_worst_is_a_metric(suites, tiny_pairs, local_tracking, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sidecars(suites["adam"], "val")[0]["settings"]["optimizer"] == "adam"
    assert "optimizer" not in sidecars(suites["short"], "val")[0]["settings"]
    family = create_family("paper_mnist")
    large = {k: v[None] for k, v in family.large_block().state_dict().items() if v.is_floating_point()}
    with mlflow.start_run():
        log_translator(create_translator("channel_set", family, bn_aware=True, depth=1, width=8), large, "kt-suites")
    spec = f"adam={suites['adam']},short={suites['short']}"
    run_id, _ = run_evaluate(EvaluateConfig(model="kt-suites", pairs=str(tiny_pairs), dataset="digits", suites=spec))
    run = mlflow.get_run(run_id)
    gaps = {"in_distribution": run.data.metrics["gap_closed"], "adam": run.data.metrics["suite_adam/gap_closed"],
            "short": run.data.metrics["suite_short/gap_closed"]}
    worst = min(gaps, key=gaps.get)
    assert run.data.metrics["worst_suite_gap_closed"] == pytest.approx(gaps[worst])
    assert run.data.tags[WORST_TAG] == worst
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id))
    table = pd.DataFrame(**json.loads((folder / "suites.json").read_text()))
    assert table["suite"].tolist() == ["in_distribution", "adam", "short"] and table["networks"].tolist() == [6, 4, 4]
    per_network = pd.DataFrame(**json.loads((folder / "suite_adam" / "per_network.json").read_text()))
    wide = per_network.pivot_table(index="network", columns="method", values="accuracy")
    assert table.loc[1, "below_random"] == int((wide["kt"] < wide["random"]).sum())
    assert table["below_random"].sum() == run.data.metrics["suites_below_random"]
    assert (folder / "suites.html").read_text().count("<script") >= 1 and (folder / "suite_short" / "summary.json").is_file()
    contexts = [i.tags[0].value for i in run.inputs.dataset_inputs if i.tags]
    assert {"suite adam", "suite short"} <= set(contexts)


@pytest.mark.parametrize("spec, problem", [("=x", "is not NAME=PAIRS"), ("in_distribution=x", "is not NAME=PAIRS"),
                                           ("bad name=x", "is not NAME=PAIRS"), ("a=x,a=y", "names 'a' twice"),
                                           ("adam,shifted", "names 'adam' twice"), ("adma", "'adma' is no protocol")])
def test_a_bad_suites_flag_is_one_line(spec, problem):
    with pytest.raises(KTError, match=problem):
        EvaluateConfig(suites=spec).validate()
    assert list(EvaluateConfig(suites="shifted").suite_pairs()) == list(PROTOCOLS)


def test_a_named_protocol_makes_its_held_out_networks_once(tiny_pairs, local_tracking, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))
    family = create_family("paper_mnist")
    large = {k: v[None] for k, v in family.large_block().state_dict().items() if v.is_floating_point()}
    with mlflow.start_run():
        log_translator(create_translator("channel_set", family, bn_aware=True, depth=1, width=8), large, "kt-named")
    cfg = EvaluateConfig(model="kt-named", pairs=str(tiny_pairs), dataset="digits", suites="one_epoch",
                         suite_networks=3, baselines="random")
    run_id, _ = run_evaluate(cfg)
    (folder,) = (tmp_path / "home" / "pairs").iterdir()
    (meta,) = sidecars(folder, "val")
    assert meta["count"] == 3 and meta["settings"]["epochs"] == 1 and meta["settings"]["small_epochs"] == 1
    assert "suite_one_epoch/gap_closed" in mlflow.get_run(run_id).data.metrics
    assert "3 pairs made" in capsys.readouterr().out
    run_evaluate(cfg)                                                  # the second run reuses them
    assert "0 pairs made, 3 already there" in capsys.readouterr().out
