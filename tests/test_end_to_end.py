"""The MLflow project's entry points against a real tracking server: generate -> train -> evaluate,
then a fresh process pulls the translator by name and compresses a saved network."""
import json
import subprocess
import sys

import torch
from conftest import REPO, kt


def mlflow_run(entry, params, cwd, experiment="e2e"):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_generate_train_evaluate_then_compress_in_a_fresh_process(tmp_path, use_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mlflow_run("generate", {"output": tmp_path / "pairs", "dataset": "digits", "n_pairs": 6, "n_val": 4,
                            "members": 10, "epochs": 4, "small_epochs": 4}, tmp_path)
    exp = client.get_experiment_by_name("e2e")
    (gen,) = client.search_runs([exp.experiment_id], "tags.`kt.step` = 'generate'")
    mlflow_run("train", {"pairs": gen.info.run_id, "dataset": "digits", "epochs": 4, "val_every": 2, "depth": 1,
                         "width": 16, "registered_name": "kt-e2e"}, tmp_path)
    (train,) = client.search_runs([exp.experiment_id], "tags.`kt.step` = 'train'")
    assert "best_val_acc_mean" in train.data.metrics
    assert train.data.metrics["best_epoch"] in (1, 3)  # validated after epochs 1 and 3 (val_every 2)
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [0, 1, 2, 3]
    version = client.get_model_version("kt-e2e", "1")
    assert version.run_id == train.info.run_id and version.tags["kt.family"] == "paper_mnist"
    mlflow_run("evaluate", {"model": "models:/kt-e2e@latest", "pairs": gen.info.run_id, "dataset": "digits"},
               tmp_path)
    (ev,) = client.search_runs([exp.experiment_id], "tags.`kt.step` = 'evaluate'")
    for method in ("kt", "random", "identity", "uniform", "l1", "trained"):
        assert f"{method}_acc_mean" in ev.data.metrics
    assert "gap_closed" in ev.data.metrics
    table_path = client.download_artifacts(ev.info.run_id, "per_network.json", str(tmp_path))
    table = json.loads(open(table_path).read())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    kt_rows = {r["network"]: r["accuracy"] for r in rows if r["method"] == "kt"}
    assert len(kt_rows) == 4

    # A user's saved network: validation network 2 (begin + large + last), as a state dict.
    from kt_mlflow.pairs.store import load_split
    from kt_mlflow.tracking.datasets import resolve_pairs

    val = load_split(resolve_pairs(gen.info.run_id), "val")
    state = {f"{part}.{k}": v[2] for part, name in (("begin", "begin"), ("block", "large"), ("last", "last"))
             for k, v in val.part(name).items()}
    torch.save(state, tmp_path / "net.pt")
    res = kt("compress", "--model", "kt-e2e", "--input", str(tmp_path / "net.pt"),
             "--output", str(tmp_path / "small.pt"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "parameters 6724 -> 6376" in res.stdout

    # Fresh process: load the compressed network and measure it exactly as evaluate did.
    check = (
        "import torch, sys; from kt_mlflow.blocks import create_family; from kt_mlflow.data import load_dataset;"
        "net = create_family('paper_mnist').compressed_network();"
        f"net.load_state_dict(torch.load(r'{tmp_path / 'small.pt'}', weights_only=True)); net.eval();"
        "d = load_dataset('digits');"
        "print((net(d.test_x).argmax(1) == d.test_y).float().mean().item() * 100)"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert abs(float(out.stdout.strip().splitlines()[-1]) - kt_rows[2]) < 1e-3

    # Errors are one line and name what was expected.
    wrong = {k: v for k, v in state.items() if not k.startswith("last.")}
    torch.save(wrong, tmp_path / "wrong.pt")
    res = kt("compress", "--model", "kt-e2e", "--input", str(tmp_path / "wrong.pt"), "--output",
             str(tmp_path / "x.pt"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]  # (MLflow's download progress bar may come before it)
    assert last.startswith("kt compress: error:") and "not a paper_mnist base network" in last
    res = kt("compress", "--model", "no-such-model", "--input", str(tmp_path / "net.pt"), "--output",
             str(tmp_path / "x.pt"), cwd=tmp_path)
    assert res.returncode == 2 and "no translator at models:/no-such-model" in res.stderr
