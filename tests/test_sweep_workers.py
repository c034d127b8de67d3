"""Many `kt sweep` workers, one study: PostgreSQL for Optuna, a real MLflow tracking server.

PostgreSQL must be reachable on 127.0.0.1:5432 (user postgres or root, trust auth): these tests fail,
they do not skip, when it is not. Each test gets a fresh database, dropped afterwards.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import psycopg2
import pytest
from conftest import synthetic_pairs
from mlflow.tracking import MlflowClient

from kt_mlflow.sweep import study as st
from kt_mlflow.tracking import champion as ch

PG_HOST, PG_PORT = "127.0.0.1", 5432
TINY = ["--depth-min", "1", "--depth-max", "2", "--width-min", "8", "--width-max", "16", "--epochs-min", "2",
        "--epochs-max", "3", "--val-every", "1", "--mask-max", "0.1", "--noise-max", "0.01", "--device", "cpu",
        "--dataset", "digits"]
STATES = optuna.trial.TrialState


def _admin():
    """A superuser connection to the `postgres` database; a clear failure (not a skip) when there is none."""
    errors = []
    for user in ("postgres", "root"):
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", connect_timeout=5)
            conn.autocommit = True
            return conn, user
        except psycopg2.OperationalError as e:
            errors.append(f"{user}: {str(e).strip().splitlines()[0]}")
    pytest.fail(f"PostgreSQL on {PG_HOST}:{PG_PORT} is unreachable ({'; '.join(errors)}); these tests need it.")


@pytest.fixture
def pg_url():
    conn, user = _admin()
    name = f"kt_sweep_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return synthetic_pairs(tmp_path_factory.mktemp("sweep-pairs") / "pairs")


# `python -m kt_mlflow sweep ARGS`, with the heavy imports done first (and, with KT_TEST_GATE, while an
# earlier worker still runs): then wait for the tracking server's /health and the gate file.
PRELUDE = """
import os, sys, time, urllib.request
os.cpu_count = lambda: 1     # pick_device uses every core; here two workers and a server share two busy ones
import kt_mlflow.cli, kt_mlflow.steps.sweep, kt_mlflow.sweep.study, kt_mlflow.tracking.models
import kt_mlflow.data, kt_mlflow.engine, optuna.visualization, sklearn.datasets, torch._dynamo
url, gate = os.environ["MLFLOW_TRACKING_URI"], os.environ.get("KT_TEST_GATE")
deadline = time.time() + 180
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=2).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("tracking server never came up")
        time.sleep(0.3)
while gate and not os.path.exists(gate):
    time.sleep(0.1)
sys.exit(kt_mlflow.cli.main(["sweep", *sys.argv[1:]]))
"""


def worker(tmp_path: Path, server: str, args, tag: str, gate: Path = None) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PYTHONUNBUFFERED": "1"}
    if gate is not None:
        env["KT_TEST_GATE"] = str(gate)
    out = open(tmp_path / f"{tag}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE, *args], env=env, cwd=tmp_path,
                            stdout=out, stderr=subprocess.STDOUT)
    _SPAWNED.append(proc)
    return proc


_SPAWNED: list = []


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    """A failing test must not leave its worker processes running (they are ours: kill them by pid)."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def finish(proc: subprocess.Popen, tmp_path: Path, tag: str, timeout: float = 240) -> str:
    proc.wait(timeout)
    text = (tmp_path / f"{tag}.log").read_text()
    assert proc.returncode == 0, f"worker {tag} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def trial_runs(client: MlflowClient, experiment: str, study: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`kt.study` = '{study}' and "
                                                                 f"tags.`kt.step` = 'sweep-trial'", max_results=1000)


def test_two_workers_share_one_study(tmp_path, pg_url, tracking_server, pairs):
    study_name, experiment, model = "shared", "sweep-shared", "kt-sweep-shared"
    common = ["--pairs", str(pairs), "--study-name", study_name, "--storage", pg_url, "--n-trials", "2",
              "--experiment-name", experiment, "--registered-name", model, "--pruner", "none",
              "--heartbeat-interval", "2", *TINY]
    a = worker(tmp_path, tracking_server, [*common, "--worker", "0"], "a")
    b = worker(tmp_path, tracking_server, [*common, "--worker", "1"], "b")
    tracking = tracking_server
    logs = finish(a, tmp_path, "a") + finish(b, tmp_path, "b")

    study = optuna.load_study(study_name=study_name, storage=st.driver_url(pg_url))
    assert len(study.trials) == 4, "the study holds both workers' trials: 2 + 2"
    assert all(t.state == STATES.COMPLETE for t in study.trials)

    client = MlflowClient(tracking_uri=tracking)
    runs = trial_runs(client, experiment, study_name)
    by_trial = {}
    for r in runs:
        by_trial.setdefault(int(r.data.tags["kt.trial"]), []).append(r.info.run_id)
    assert sorted(by_trial) == [0, 1, 2, 3]
    for t in study.trials:
        assert by_trial[t.number] == [t.user_attrs[st.RUN_ID_ATTR]], "exactly one MLflow child run per trial"
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 2, "one parent run per worker"
    for p in parents:
        assert client.get_run(p).data.tags["kt.study"] == study_name

    champ = client.get_model_version_by_alias(model, "champion")
    assert float(champ.tags[ch.SCORE_TAG]) == study.best_value
    assert champ.run_id in {t.user_attrs[st.RUN_ID_ATTR] for t in study.trials if t.value == study.best_value}
    assert "registered kt-sweep-shared version" in logs


def test_killed_worker_trial_fails_by_heartbeat_and_is_retried(tmp_path, pg_url, tracking_server, pairs):
    study_name, experiment, model = "killed", "sweep-killed", "kt-sweep-killed"
    common = ["--pairs", str(pairs), "--study-name", study_name, "--storage", pg_url,
              "--experiment-name", experiment, "--registered-name", model, "--pruner", "none",
              "--heartbeat-interval", "1", "--grace-period", "2", "--max-retry", "1", *TINY]
    a = worker(tmp_path, tracking_server, [*common, "--n-trials", "3", "--worker", "0"], "a")
    gate = tmp_path / "go-b"
    b = worker(tmp_path, tracking_server, [*common, "--n-trials", "2", "--worker", "1"], "b", gate=gate)
    tracking = tracking_server
    storage = st.driver_url(pg_url)
    victim = None
    deadline = time.time() + 150
    while victim is None:
        assert a.poll() is None, f"worker a ended early:\n{(tmp_path / 'a.log').read_text()[-3000:]}"
        assert time.time() < deadline, "worker a never started a trial"
        try:
            running = optuna.load_study(study_name=study_name, storage=storage).get_trials(states=(STATES.RUNNING,))
        except KeyError:            # the study does not exist yet
            running = []
        victim = next((t for t in running if st.RUN_ID_ATTR in t.user_attrs), None)
        time.sleep(0.1)
    os.kill(a.pid, signal.SIGKILL)                  # mid-trial: no cleanup, no final heartbeat
    a.wait(30)

    study = optuna.load_study(study_name=study_name, storage=storage)
    assert study.trials[victim.number].state == STATES.RUNNING, "a killed worker leaves its trial RUNNING..."
    time.sleep(2.5)                                  # ... until the grace period has passed
    gate.touch()                                     # a later worker joins the study
    logs = finish(b, tmp_path, "b")

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.trials
    assert trials[victim.number].state == STATES.FAIL, "the heartbeat marked the killed trial FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == STATES.COMPLETE and retries[0].params == victim.params
    assert not [t for t in trials if t.state in (STATES.RUNNING, STATES.WAITING)], "the study is complete"
    assert sum(t.state == STATES.COMPLETE for t in trials) >= 2
    assert f"trial {victim.number} of study {study_name} stopped sending heartbeats" in logs

    client = MlflowClient(tracking_uri=tracking)
    dead = client.get_run(victim.user_attrs[st.RUN_ID_ATTR])
    assert dead.info.status == "FAILED" and dead.data.tags[st.STATE_TAG] == "failed"
    redo = client.get_run(retries[0].user_attrs[st.RUN_ID_ATTR])
    assert redo.data.tags[st.STATE_TAG] == "complete" and redo.data.tags["kt.retry_of_trial"] == str(victim.number)
    champ = client.get_model_version_by_alias(model, "champion")
    assert float(champ.tags[ch.SCORE_TAG]) == study.best_value
