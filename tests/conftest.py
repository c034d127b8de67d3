"""Shared fixtures: real MNIST files, a real MLflow tracking server on 127.0.0.1, tiny pair sets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import kt_mlflow.data

REPO = Path(__file__).resolve().parents[1]
MNIST_ROOT = Path(kt_mlflow.data.__file__).resolve().parent / "mnist"  # the real MNIST test set, bundled


@pytest.fixture(scope="session")
def mnist_root() -> str:
    """The bundled MNIST folder, read as a ``data_root`` (the same images as ``load_dataset("mnist")``)."""
    if not (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the bundled MNIST test set is missing from {MNIST_ROOT}; reinstall kt-mlflow")
    return str(MNIST_ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, temporary artifact root) on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(autouse=True)
def fresh_mlflow_state(monkeypatch, tmp_path):
    """No experiment or run leaks between tests (mlflow.set_experiment() sets MLFLOW_EXPERIMENT_ID),
    and MLflow writes into the test's own folder (its working folder too) unless a test picks a store."""
    import mlflow
    from mlflow.tracking import fluent

    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)   # a local store's ./mlruns lands in the test's folder, not the checkout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/default-mlflow.db")
    mlflow.set_tracking_uri(None)
    while mlflow.active_run():
        mlflow.end_run()
    fluent._active_experiment_id = None
    yield
    while mlflow.active_run():
        mlflow.end_run()
    fluent._active_experiment_id = None
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(var, None)   # MLflow sets some of them itself; monkeypatch restores only what it set


@pytest.fixture
def use_server(tracking_server, monkeypatch):
    """Point this process and its children at the tracking server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    mlflow.set_tracking_uri(None)


@pytest.fixture
def local_tracking(tmp_path, monkeypatch):
    """A throw-away SQLite tracking store for tests that need MLflow but not a server."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def kt(*args: str, cwd: Path, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `kt` CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "kt_mlflow.cli", *args], cwd=cwd, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """8 training pairs + 6 validation networks on the bundled digits (no MLflow), made once."""
    from kt_mlflow.config import GenerateConfig
    from kt_mlflow.pairs.generate import generate_pairs

    out = tmp_path_factory.mktemp("pairs") / "digits"
    generate_pairs(GenerateConfig(output=str(out), dataset="digits", n_pairs=8, n_val=6, members=7,
                                  epochs=4, small_epochs=4))
    return out


SYNTHETIC_SETTINGS = {"family": "paper_mnist", "dataset": "digits", "seed": 0, "epochs": 0, "small_epochs": 0,
                      "lr": 0.01, "momentum": 0.9, "batch_size": 128, "flip": True}


def synthetic_pairs(folder: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """Untrained (freshly initialised) pairs in the on-disk layout of `kt generate`: instant, offline."""
    import torch

    from kt_mlflow.blocks import create_family
    from kt_mlflow.pairs.store import write_manifest, write_shard

    family = create_family("paper_mnist")
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 10_000)):
        states = []
        for i in range(n):
            base, small = family.init_pair(offset + i)
            states.append({**{k.replace("block.", "large.", 1): v for k, v in base.items()},
                           **{f"small.{k}": v for k, v in small.items()}})
        tensors = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        records = [{"index": i, "seed": offset + i, "base_acc": 10.0, "small_acc": 10.0} for i in range(n)]
        write_shard(folder, split, 0, tensors, records, SYNTHETIC_SETTINGS)
    write_manifest(folder)
    return folder


# The registered markers (setup.cfg) follow from what a test uses, so no test can forget its own.
_MARK_BY_FIXTURE = {"mnist_root": "mnist", "tracking_server": "server", "pg_url": "postgres"}
_MARK_BY_MODULE = {"test_native": "native", "test_sweep_workers": "postgres", "test_data": "mnist",
                   "test_trainer": "mnist", "test_no_collision": "mnist"}


def pytest_collection_modifyitems(items):
    for item in items:
        names = {_MARK_BY_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in _MARK_BY_FIXTURE}
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in _MARK_BY_MODULE:
            names.add(_MARK_BY_MODULE[module])
        for name in sorted(names):
            item.add_marker(getattr(pytest.mark, name))
