"""torchrun jobs on CPU (gloo): the same pairs and the same translator as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import mlflow
import pytest
import torch

from kt_mlflow.blocks import create_family
from kt_mlflow.distributed import World, world
from kt_mlflow.errors import KTError

REPO = Path(__file__).resolve().parents[1]
GEN = ["--dataset", "digits", "--n-pairs", "8", "--n-val", "2", "--members", "2", "--epochs", "1",
       "--small-epochs", "1"]


def _two_cores() -> None:
    """Both sides of a comparison on the same two cores: one thread per rank or per worker, whatever the
    machine (a shard's bits depend on its thread count)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def _env(tmp_path: Path) -> Dict[str, str]:
    return {**os.environ, "KT_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


def torchrun(args: List[str], tmp_path: Path, ranks: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "kt_mlflow", *args]
    return subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_two_cores, cwd=tmp_path, **kw)


def mlflow_run(entry: str, args: List[str], tmp_path: Path) -> subprocess.Popen:
    """``mlflow run`` of an MLproject entry point; ``args`` are flags, passed as ``-P`` params."""
    params = [f"{a[2:].replace('-', '_')}={b}" for a, b in zip(args[::2], args[1::2])]
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           *[x for p in params for x in ("-P", p)]]
    return subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_two_cores, cwd=tmp_path)


def one_process(args: List[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kt_mlflow", *args], env=_env(tmp_path), capture_output=True,
                          text=True, preexec_fn=_two_cores, cwd=tmp_path, timeout=600)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def runs_of(experiment: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def digest(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["digest"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The digest of the pair set one process makes (two workers, one thread each)."""
    tmp = tmp_path_factory.mktemp("one-process")
    done = one_process(["generate", *GEN, "--workers", "2", "--output", str(tmp / "pairs")], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return digest(tmp / "pairs")


def test_world_reads_torchruns_environment(monkeypatch):
    assert world() == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert world() == World(3, 4, 1, 2) and world().distributed and not world().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(KTError, match="RANK 4 / WORLD_SIZE 4"):
        world()


def test_torchrun_generate_equals_one_process(reference, tmp_path, use_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dist-gen")
    out = finish(mlflow_run("generate_torchrun", [*GEN, "--nproc-per-node", "2", "--output", str(tmp_path / "pairs")],
                            tmp_path))
    assert digest(tmp_path / "pairs") == reference
    assert out.count("generate run: ") == 1 and "2 ranks x 1 worker(s)" in out
    runs = runs_of("dist-gen")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"       # rank 0's run, and only it
    run = runs[0]
    assert run.data.tags["kt.pairs_digest"] == reference and run.data.metrics["pairs_made"] == 10
    logged = sorted(a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "pairs"))
    assert len(logged) == 11 and logged[-1] == "pairs/val-00000000-00000001.safetensors"   # 5 shards, once


def _ranks(launcher: int) -> Dict[int, int]:
    """pid of each rank torchrun started, by RANK."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or (d / "stat").read_text().split()[3] != str(launcher):
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


def test_a_killed_rank_fails_the_job_and_a_rerun_completes_it(reference, tmp_path, use_server):
    folder = tmp_path / "pairs"
    args = ["generate", *GEN, "--output", str(folder), "--experiment-name", "dist-killed"]
    job = torchrun(args, tmp_path)
    deadline = time.time() + 300
    while not list(folder.glob("*.json")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert job.poll() is None and list(folder.glob("*.json")), "the job must be running with a shard written"
    os.kill(_ranks(job.pid)[1], signal.SIGKILL)
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0 and "SIGKILL" in out
    shards = len(list(folder.glob("*.json")))                         # sidecars of whole shards (of 5)
    assert shards < 5, "the killed job must leave shards for the rerun to make"
    assert not (folder / "manifest.json").exists()
    (failed,) = runs_of("dist-killed")
    assert failed.info.status == "FAILED"                              # rank 0 was stopped, its run closed

    out = finish(torchrun(args, tmp_path))
    assert f"generate: {10 - 2 * shards} pairs made, {2 * shards} already there" in out
    assert digest(folder) == reference                                # nothing lost, nothing twice


TRAIN = ["--recipe", "best", "--dataset", "digits", "--epochs", "3", "--val-every", "3", "--batch-size", "2",
         "--dropout", "0", "--task-pairs", "3", "--task-images", "8", "--task-bank", "32", "--depth", "2",
         "--width", "16", "--channel-hidden", "32"]


def test_torchrun_train_equals_one_process(tiny_pairs, tmp_path, use_server):
    """Two DDP ranks, each holding half the pairs, train the translator one process trains (same global
    batches and seed): the same weights to float tolerance, registered once, by rank 0. With batches
    of 2, some hold pairs of one rank only (seed 0: the first two), so the other runs at weight 0."""
    from kt_mlflow.pairs.store import load_split
    from kt_mlflow.tracking.models import load_translator

    job = torchrun(["train", *TRAIN, "--pairs", str(tiny_pairs), "--registered-name", "kt-ddp",
                    "--experiment-name", "dist-train"], tmp_path)
    one = one_process(["train", *TRAIN, "--pairs", str(tiny_pairs), "--registered-name", "kt-one",
                       "--experiment-name", "one-train"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    out = finish(job)
    assert out.count("registered kt-ddp version 1") == 1
    assert len(runs_of("dist-train")) == 1
    ddp, ref = load_translator("models:/kt-ddp/1"), load_translator("models:/kt-one/1")
    for k, v in ref.net.state_dict().items():
        if k != "core.key.bias":  # softmax ignores it: its exact gradient is 0, and Adam scales rounding noise up
            torch.testing.assert_close(ddp.net.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    large = load_split(tiny_pairs, "val").part("large")
    for k, v in ref.translate_batch(large).items():
        torch.testing.assert_close(ddp.translate_batch(large)[k], v, rtol=1e-4, atol=1e-5, msg=k)
    (a,), (b,) = runs_of("dist-train"), runs_of("one-train")
    assert abs(a.data.metrics["train_loss"] - b.data.metrics["train_loss"]) < 1e-5
    assert a.data.metrics["best_val_acc_mean"] == pytest.approx(b.data.metrics["best_val_acc_mean"], abs=0.01)


def test_batch_shares_cover_each_global_batch_once(tiny_pairs, tmp_path):
    """Rank r's rows (pair r + W * row) at their positions rebuild every global batch exactly."""
    import torch.distributed as dist

    from kt_mlflow.config import TrainConfig
    from kt_mlflow.pairs.store import load_split
    from kt_mlflow.training.train import TranslatorFit

    train = load_split(tiny_pairs, "train")
    cfg = TrainConfig(recipe="paper", batch_size=3, depth=1, width=8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)  # for DDP
    try:
        fits = [TranslatorFit(cfg, create_family("paper_mnist"), train, None, torch.device("cpu"),
                              World(r, 2, r, 2)) for r in (0, 1)]
    finally:
        dist.destroy_process_group()
    assert [len(f.groups[0].source) for f in fits] == [4, 4]
    ranks = [f.shares(torch.Generator().manual_seed(5)) for f in fits]
    whole = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    for i, shares in enumerate(zip(*ranks)):
        rebuilt = torch.full((shares[0].total,), -1)
        for r, share in enumerate(shares):
            rebuilt[share.pos] = share.rows * 2 + r
        assert rebuilt.tolist() == whole[3 * i: 3 * i + 3].tolist()
    with pytest.raises(KTError, match="8 training pairs cannot be split over 9 ranks"):
        TranslatorFit(cfg, create_family("paper_mnist"), train, None, torch.device("cpu"), World(0, 9, 0, 9))


SWEEP = ["--dataset", "digits", "--n-trials", "2", "--depth-min", "1", "--depth-max", "1", "--width-min", "8",
         "--width-max", "16", "--epochs-min", "1", "--epochs-max", "2", "--val-every", "1", "--dropout", "0",
         "--pruner", "none", "--select-holdout", "2"]


def test_torchrun_sweep_trains_each_trial_on_every_rank(tiny_pairs, tmp_path, use_server):
    """A sweep worker of two ranks samples, scores and registers what one process does."""
    import optuna

    scores = {}
    for name, start in (("ddp", torchrun), ("one", None)):
        args = ["sweep", *SWEEP, "--pairs", str(tiny_pairs), "--study-name", name, "--experiment-name", f"sweep-{name}",
                "--storage", f"sqlite:///{tmp_path / name}.db", "--registered-name", f"kt-sweep-{name}"]
        if start is None:
            done = one_process(args, tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            finish(start(args, tmp_path))
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials
        scores[name] = [(t.params, t.value) for t in trials]
        assert len(runs_of(f"sweep-{name}")) == 3   # the worker's parent run and one run per trial
    for (params, ddp), (same, one) in zip(scores["ddp"], scores["one"]):
        assert params == same and ddp == pytest.approx(one, abs=0.5)
