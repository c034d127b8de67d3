import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, kt

from kt_mlflow.config import GenerateConfig
from kt_mlflow.device import cpu_cores
from kt_mlflow.errors import KTError
from kt_mlflow.pairs.generate import generate_pairs, plan_shards
from kt_mlflow.pairs.store import load_split, sidecars, write_manifest
from kt_mlflow.pairs.workers import ARITHMETIC

QUICK = dict(dataset="digits", epochs=1, small_epochs=1)


def child_pids(pid: int) -> list:
    from pathlib import Path
    return [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (dead, waiting for its reparented parent to reap it) is not."""
    from pathlib import Path
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_shards_manifest_and_records(tiny_pairs):
    train, val = load_split(tiny_pairs, "train"), load_split(tiny_pairs, "val")
    assert len(train) == 8 and len(val) == 6
    assert train.tensors["large.conv1.weight"].shape == (8, 6, 6, 3, 3)
    assert train.tensors["small.conv2.weight"].shape == (8, 6, 3, 3, 3)
    assert [r["index"] for r in train.records] == list(range(8))
    assert not {r["seed"] for r in train.records} & {r["seed"] for r in val.records}
    manifest = json.loads((tiny_pairs / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 8 and manifest["splits"]["val"]["count"] == 6
    # trained networks beat chance on digits, and the trained small block is far from random
    assert min(r["base_acc"] for r in train.records) > 30


def test_plan_splits_workers_without_overlap():
    a = plan_shards(GenerateConfig(n_pairs=10, n_val=4, members=3, start_index=0, count=7))
    b = plan_shards(GenerateConfig(n_pairs=10, n_val=4, members=3, start_index=7, count=7))
    covered = [(s, f + i) for s, f, n in a + b for i in range(n)]
    assert sorted(covered) == sorted([("train", i) for i in range(10)] + [("val", i) for i in range(4)])


def test_two_workers_fill_one_folder(tmp_path):
    common = dict(output=str(tmp_path / "p"), n_pairs=3, n_val=2, members=2, **QUICK)
    generate_pairs(GenerateConfig(start_index=0, count=3, **common))
    generate_pairs(GenerateConfig(start_index=3, count=2, **common))
    train, val = load_split(tmp_path / "p", "train"), load_split(tmp_path / "p", "val")
    assert [r["index"] for r in train.records] == [0, 1, 2] and [r["index"] for r in val.records] == [0, 1]
    again = generate_pairs(GenerateConfig(**common))  # everything already there: nothing is redone
    assert again["pairs_made"] == 0 and again["pairs_skipped"] == 5


def test_bad_shards_and_settings_are_reported_by_name(tmp_path):
    out = tmp_path / "p"
    generate_pairs(GenerateConfig(output=str(out), n_pairs=2, n_val=1, members=2, **QUICK))
    with pytest.raises(KTError, match="other settings"):
        generate_pairs(GenerateConfig(output=str(out), n_pairs=2, n_val=1, members=2, dataset="digits", epochs=2))
    with pytest.raises(KTError, match="other bounds"):
        generate_pairs(GenerateConfig(output=str(out), n_pairs=2, n_val=1, members=1, **QUICK))
    shard = out / sidecars(out, "train")[0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(KTError, match=f"{shard.name} is truncated or corrupt"):
        load_split(out, "train")
    with pytest.raises(KTError, match="must be >= 0"):
        GenerateConfig(n_pairs=-1).validate()


def test_killed_run_resumes_without_losing_or_duplicating(tmp_path):
    args = ["generate", "--output", str(tmp_path / "p"), "--dataset", "digits", "--n-pairs", "6", "--n-val", "2",
            "--members", "2", "--epochs", "2", "--small-epochs", "2", "--seed", "3"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.Popen([sys.executable, "-m", "kt_mlflow.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "p").glob("train-*.json")):
        assert proc.poll() is None and time.time() < deadline, "generate ended before its first shard"
        time.sleep(0.1)
    workers = child_pids(proc.pid)  # one worker process per core by default
    assert len(workers) >= min(2, cpu_cores())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # the workers die with their parent instead of training on
    while any(alive(pid) for pid in workers):
        assert time.time() < deadline, "generate's worker processes outlived the killed run"
        time.sleep(0.1)
    done_before = len(sidecars(tmp_path / "p", "train"))
    assert done_before < 3, "the kill came too late to test resuming"
    result = kt(*args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{2 * done_before} already there" in result.stdout
    train = load_split(tmp_path / "p", "train")
    assert [r["index"] for r in train.records] == list(range(6))
    # resumed pairs are the very pairs an uninterrupted run makes
    ref = tmp_path / "ref"
    generate_pairs(GenerateConfig(output=str(ref), dataset="digits", n_pairs=6, n_val=2, members=2, seed=3,
                                  epochs=2, small_epochs=2))
    ref_train = load_split(ref, "train")
    for k, v in ref_train.tensors.items():
        torch.testing.assert_close(train.tensors[k], v, atol=0, rtol=0)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["digest"] == write_manifest(ref)["digest"]


def test_mlflow_project_generate_logs_run_dataset_and_artifacts(tmp_path, use_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    out = tmp_path / "pairs"
    out.mkdir()
    (out / "notes.txt").write_text("not a pair file")          # never uploaded with the pairs
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "generate", "--env-manager", "local",
           "--experiment-name", "gen-test", "-P", f"output={out}", "-P", "n_pairs=2", "-P", "n_val=1",
           "-P", "members=3", "-P", "epochs=1", "-P", "small_epochs=1", "-P", "workers=1",
           "-P", "kernels=torch", "-P", "dataset=digits"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("gen-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["n_pairs"] == "2" and run.data.params["epochs"] == "1"
    assert run.data.params["workers"] == "1" and run.data.metrics["workers"] == 1
    assert run.data.params["kernels"] == "torch" and run.data.metrics["native_kernels"] == 0
    assert run.data.metrics["pairs_made"] == 3 and run.data.metrics["pairs_per_min"] > 0
    images, inp = sorted(run.inputs.dataset_inputs, key=lambda i: i.dataset.source_type == "kt_pairs")
    assert images.dataset.name == "digits" and json.loads(images.dataset.profile)["train_images"] == 1437
    manifest = json.loads((out / "manifest.json").read_text())
    assert inp.dataset.digest == manifest["digest"] and inp.dataset.source_type == "kt_pairs"
    assert run.data.tags["kt.version"] == "0.1.0"  # run-context-provider plugin
    names = {a.path for a in client.list_artifacts(run.info.run_id, "pairs")}
    assert names == {f"pairs/{n}" for n in ("manifest.json", "train-00000000-00000001.safetensors",
                     "train-00000000-00000001.json", "val-00000000-00000000.safetensors", "val-00000000-00000000.json")}
    # a later step takes the pairs from the run id: downloaded once, cached by digest, then reused
    import kt_mlflow.tracking.datasets as ds

    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))
    folder = ds.resolve_pairs(run.info.run_id)
    assert folder == tmp_path / "home" / "pairs-cache" / manifest["digest"]
    assert len(load_split(folder, "train")) == 2
    monkeypatch.setattr(ds.mlflow.artifacts, "download_artifacts", lambda **kw: pytest.fail("downloaded again"))
    assert ds.resolve_pairs(f"runs:/{run.info.run_id}/pairs") == folder
    assert not [p for p in folder.parent.iterdir() if p != folder]        # no temporary copy left
    assert mlflow.get_tracking_uri() == use_server


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two training shards and one validation shard, made once; tests work on copies."""
    out = tmp_path_factory.mktemp("verified") / "p"
    summary = generate_pairs(GenerateConfig(output=str(out), n_pairs=4, n_val=2, members=2, **QUICK))
    return out, summary["digest"]


def _copy(small_set, tmp_path):
    import shutil

    shutil.copytree(small_set[0], tmp_path / "p")
    return tmp_path / "p", GenerateConfig(output=str(tmp_path / "p"), n_pairs=4, n_val=2, members=2, **QUICK)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_resume_verifies_skipped_shards_and_rebuilds_bad_ones(small_set, tmp_path, damage):
    out, cfg = _copy(small_set, tmp_path)
    shard = out / "train-00000002-00000003.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-64]))
    else:
        shard.unlink()                                   # its sidecar kept
    (out / ".train-00000000-00000001.safetensors.abc123.tmp").write_bytes(b"half a write")
    summary = generate_pairs(cfg)
    assert summary["pairs_made"] == 2 and summary["pairs_skipped"] == 4     # only the bad shard again
    assert summary["digest"] == small_set[1]
    assert not list(out.glob(".*.tmp"))                  # a killed write's leftovers are gone


def test_the_loader_names_a_hole_and_a_sidecar_pointing_elsewhere(small_set, tmp_path):
    out, _ = _copy(small_set, tmp_path)
    for suffix in (".json", ".safetensors"):
        (out / f"train-00000000-00000001{suffix}").unlink()
    with pytest.raises(KTError, match=r"train pairs 0\.\.1 are missing from .*rerun `kt generate`"):
        load_split(out, "train")
    out, _ = _copy(small_set, tmp_path / "b")
    for suffix in (".json", ".safetensors"):
        (out / f"train-00000002-00000003{suffix}").unlink()
    with pytest.raises(KTError, match=r"train pairs 2\.\.3 are missing .*its manifest records 4"):
        load_split(out, "train")
    out, _ = _copy(small_set, tmp_path / "c")
    sidecar = out / "val-00000000-00000001.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "file": "../../elsewhere.safetensors"}))
    with pytest.raises(KTError, match="names '../../elsewhere.safetensors', not its own shard"):
        load_split(out, "val")


def test_resume_reads_the_sidecars_once(small_set, tmp_path, monkeypatch):
    import kt_mlflow.pairs.generate as gen

    out, cfg = _copy(small_set, tmp_path)
    calls = []
    real = gen.sidecars
    monkeypatch.setattr(gen, "sidecars", lambda folder, split: calls.append(split) or real(folder, split))
    assert generate_pairs(cfg)["pairs_made"] == 0
    assert calls == ["train", "val"]


def test_sidecars_are_covered_by_the_digest_and_the_manifest_is_not_trusted(small_set, tmp_path):
    from kt_mlflow.pairs.store import digest
    from kt_mlflow.tracking.datasets import PairDataset

    out, _ = _copy(small_set, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "digest": "0" * 16, "splits": {}}))
    logged = PairDataset(out)                                       # what a run logs: from the sidecars
    assert logged.digest == small_set[1] and logged.profile["train_pairs"] == 4 and logged.profile["val_pairs"] == 2
    sidecar = out / "train-00000000-00000001.json"
    meta = json.loads(sidecar.read_text())
    meta["pairs"][0]["base_acc"] = 99.0                             # a record changed, the shard untouched
    sidecar.write_text(json.dumps(meta))
    assert digest(out) != small_set[1]
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "first"}))
    with pytest.raises(KTError, match=f"shard sidecar {sidecar} is corrupt"):
        digest(out)


def test_a_resume_with_other_kernels_threads_or_device_is_refused(small_set, tmp_path):
    out, cfg = _copy(small_set, tmp_path)
    made_with = sidecars(out, "train")[0]["made_with"]
    assert made_with["device"] == "cpu" and made_with["kernels"] in ("native", "torch") and made_with["threads"] >= 1
    for meta in sidecars(out, "train"):                             # as if made on a 64-core machine, one process
        path = out / meta["file"].replace(".safetensors", ".json")
        path.write_text(json.dumps({**meta, "made_with": {**made_with, "threads": 64}}))
    (out / "val-00000000-00000001.safetensors").unlink()            # a shard left to make: bits would mix
    with pytest.raises(KTError, match=r"made with device cpu, kernels \w+, threads 64 .*gives other bits: rerun with "
                                      r"--kernels \w+ --device cpu .*\(64 thread\(s\) per worker\), or use another --output"):
        generate_pairs(cfg)


def test_a_resume_into_shards_of_another_arithmetic_revision_is_refused(small_set, tmp_path):
    """Shards made before the generator's arithmetic changed (revision 1 did not record its number) have
    other bits: a complete folder is used as it is, a resume that would write into it is refused."""
    out, cfg = _copy(small_set, tmp_path)
    made_with = sidecars(out, "train")[0]["made_with"]
    assert made_with["arithmetic"] == ARITHMETIC >= 2
    for meta in sidecars(out, "train"):
        path = out / meta["file"].replace(".safetensors", ".json")
        path.write_text(json.dumps({**meta, "made_with": {k: v for k, v in made_with.items() if k != "arithmetic"}}))
    summary = generate_pairs(cfg)                                   # complete: nothing to mix
    assert summary["pairs_made"] == 0 and summary["pairs_skipped"] == 6
    assert sidecars(out, "train")[0]["made_with"] == {k: v for k, v in made_with.items() if k != "arithmetic"}
    (out / "train-00000002-00000003.safetensors").write_bytes(b"damaged")   # a shard to remake: bits would mix
    with pytest.raises(KTError, match=f"arithmetic revision 1 .*makes revision {ARITHMETIC}, which gives other bits: "
                                      "finish it with the kt-mlflow that began it, or use another --output"):
        generate_pairs(cfg)
