"""`kt main --family FILE` end to end, offline, on real MNIST, for a family file of each new kind."""
from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest

from kt_mlflow.config import MainConfig
from kt_mlflow.steps.main import run_main

FAMILIES = Path(__file__).resolve().parents[1] / "projects" / "families"
CASES = {  # family file -> what else its quickstart needs
    "prune_basic": {}, "kernel5": {}, "mlp_patch": {}, "rgb32": {"colour": True},
}


@pytest.mark.parametrize("name", list(CASES))
def test_main_runs_every_new_kind_of_family_end_to_end(name, tmp_path, local_tracking, monkeypatch):
    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))
    cfg = MainConfig(family=str(FAMILIES / f"{name}.yaml"), n_pairs=4, n_val=2, members=3, gen_epochs=1, epochs=2,
                     batch_size=2, select_holdout=1, **CASES[name])
    parent = mlflow.get_run(run_main(cfg))
    children = {r.data.tags["kt.step"]: r for r in mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list")}
    assert set(children) == {"generate", "train", "evaluate"}
    metrics = children["evaluate"].data.metrics
    for method in ("kt", "random", "identity", "uniform", "l1", "trained"):
        assert 0 <= metrics[f"{method}_acc_mean"] <= 100, method
    assert math.isfinite(metrics["gap_closed"])
    assert metrics["trained_acc_mean"] > 30  # the small blocks really trained on real MNIST
    image_inputs = [i.dataset for i in children["generate"].inputs.dataset_inputs if i.dataset.name.startswith("mnist")]
    assert [d.name for d in image_inputs] == (["mnist-colour-32"] if name == "rgb32" else ["mnist"])
    # across kernel sizes (only kernel5 here) channel_set carries the kernel map, recorded on the model
    [version] = mlflow.MlflowClient().search_model_versions(f"run_id = '{children['train'].info.run_id}'")
    assert version.tags.get("kt.arch.kernel_map") == ("True" if name == "kernel5" else None)
