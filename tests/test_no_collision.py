"""`mlflow run` of every step with default outputs leaves the project folder as it was.

MLflow runs a local project in place, so any default output under the working folder would land in
the source tree; and two settings must never share a pair folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["-P", "n_pairs=4", "-P", "n_val=2", "-P", "members=2"]


@pytest.fixture
def project(tmp_path) -> Path:
    """A clean git checkout of the project's tracked files (the developer's tree may be dirty)."""
    dest = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True)
    return dest


def mlflow_run(project: Path, env: dict, entry: str, *params: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", entry, "--env-manager", "local",
                          *params], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"mlflow run -e {entry} failed:\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_every_entry_point_keeps_the_project_folder_clean(project, tmp_path, tracking_server):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server, "KT_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    log = mlflow_run(project, env, "generate", "-P", "dataset=digits", *TINY, "-P", "epochs=1",
                     "-P", "small_epochs=1")
    log += mlflow_run(project, env, "main", *TINY, "-P", "gen_epochs=1", "-P", "epochs=2", "-P", "select_holdout=2")
    pair_folders = sorted(p.name for p in (tmp_path / "home" / "pairs").iterdir())
    assert len(pair_folders) == 2 and pair_folders[0].startswith("paper_mnist-digits-")
    assert pair_folders[1].startswith("paper_mnist-mnist-")
    mlflow.set_tracking_uri(tracking_server)
    gen = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`kt.step` = 'generate'",
                             order_by=["attributes.start_time ASC"])
    log += mlflow_run(project, env, "sweep", "-P", f"pairs={gen['run_id'].iloc[-1]}", "-P", "n_trials=1",
                      "-P", "epochs_min=1", "-P", "epochs_max=1", "-P", "depth_max=2", "-P", "width_max=32",
                      "-P", "val_every=1")
    assert (tmp_path / "home" / "optuna.db").is_file()
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=project, capture_output=True,
                            text=True, check=True).stdout
    assert [line for line in status.splitlines() if "__pycache__" not in line] == [], log[-3000:]
