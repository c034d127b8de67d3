"""`kt sweep` in one process: range checks, unreachable storage, NaN trials, the champion rule."""
from __future__ import annotations

import math
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import free_port, synthetic_pairs
from mlflow.tracking import MlflowClient

from kt_mlflow import cli
from kt_mlflow.config import SweepConfig
from kt_mlflow.errors import KTError
from kt_mlflow.steps.sweep import run_sweep
from kt_mlflow.sweep import study as st
from kt_mlflow.tracking import champion as ch

TINY = dict(depth_min=1, depth_max=2, width_min=8, width_max=16, epochs_min=2, epochs_max=3, val_every=1,
            mask_max=0.1, noise_max=0.01, device="cpu", dataset="digits")


def main(argv):
    """``kt sweep ARGV`` in this process."""
    return cli.main(["sweep", *argv])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return synthetic_pairs(tmp_path_factory.mktemp("sweep-pairs") / "pairs")


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


# -- ranges and storage: one-line errors before any work ------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(depth_min=4, depth_max=2), "--depth-min (4) is larger than --depth-max (2)"),
    (dict(epochs_min=10, epochs_max=5), "--epochs-min (10) is larger than --epochs-max (5)"),
    (dict(width_min=64, width_max=32), "--width-min (64) is larger than --width-max (32)"),
    (dict(depth_min=0), "--depth-min must be >= 1"),
    (dict(noise_max=-0.1), "--noise-max must be >= 0"),
    (dict(mask_max=1.0), "--mask-max must be in [0, 1)"),
    (dict(mask_max=-0.2), "--mask-max must be in [0, 1)"),
    (dict(lr_min=1e-2, lr_max=1e-3), "--lr-min (0.01) is larger than --lr-max (0.001)"),
    (dict(lr_min=0.0), "--lr-min must be > 0"),
    (dict(width_choices="0,8"), "--width-choices must be positive"),
    (dict(augment_on="nowhere"), "--augment-on must be one of"),
])
def test_bad_ranges_are_one_line_errors_before_any_work(tmp_path, kwargs, message):
    db = tmp_path / "never.db"
    with pytest.raises(KTError) as err:
        run_sweep(SweepConfig(**kwargs, pairs=str(tmp_path / "no-pairs"), storage=f"sqlite:///{db}", n_trials=1))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not db.exists(), "the storage must not be touched before the ranges are checked"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="grid"), "--sampler must be one of"),
    (dict(pruner="hyperband"), "--pruner must be one of"),
    (dict(n_trials=None, timeout=None), "give --n-trials or --timeout"),
    (dict(heartbeat_interval=0), "--heartbeat-interval must be >= 1"),
    (dict(heartbeat_interval=5, grace_period=5), "--grace-period (5) must exceed --heartbeat-interval (5)"),
])
def test_bad_worker_settings(tmp_path, kwargs, message):
    with pytest.raises(KTError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("-", r"\-")):
        run_sweep(SweepConfig(pairs="x", storage=f"sqlite:///{tmp_path / 'never.db'}", **{"n_trials": 1, **kwargs}))


def test_cli_prints_range_error_in_one_line(capsys):
    assert main(["--depth-min", "3", "--depth-max", "1", "--storage", "sqlite:////nonexistent/x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kt sweep: error: --depth-min (3) is larger than --depth-max (1)") and "\n" not in err


def test_width_choices_parse():
    def options(text):
        return SweepConfig(width_choices=text).width_options()

    assert options("16, 8,32") == [8, 16, 32] and options("") is None and options("none") is None
    with pytest.raises(KTError, match="--width-choices must be whole numbers"):
        options("8,wide")
    space = SweepConfig(width_choices="32,8,8")
    space.validate()
    assert space.width_options() == [8, 32]


def test_unreachable_postgres_is_one_line_error(tmp_path):
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/optuna"   # nothing listens there
    with pytest.raises(KTError) as err:
        st.open_storage(url)
    text = str(err.value)
    assert text.startswith("cannot reach Optuna storage postgresql://postgres:***@127.0.0.1:") and "\n" not in text
    assert "secret" not in text
    # through the CLI, with valid ranges, before the pairs are even looked at
    assert main(["--pairs", str(tmp_path / "missing"), "--storage", url, "--n-trials", "1"]) == 2


def test_unreachable_postgres_via_cli(tmp_path, capsys):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/optuna"
    assert main(["--pairs", str(tmp_path / "missing"), "--storage", url, "--n-trials", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kt sweep: error: cannot reach Optuna storage postgresql://postgres@127.0.0.1:")
    assert "\n" not in err


def test_sqlite_in_missing_folder():
    with pytest.raises(KTError, match="folder /nonexistent/deeper does not exist"):
        st.open_storage("sqlite:////nonexistent/deeper/x.db")


# -- NaN trials are pruned, the worker goes on --------------------------------------------------------

def test_nonfinite_loss_prunes_the_trial(pairs, tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = SweepConfig(**{**TINY, "depth_min": 1, "depth_max": 1, "epochs_min": 3, "epochs_max": 3,
                           "lr_min": 1e25, "lr_max": 1e25}, pairs=str(pairs), study_name="nan", storage=storage,
                        n_trials=2, pruner="none")
    parent = run_sweep(space, experiment="sweep-nan")
    study = optuna.load_study(study_name="nan", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all("non-finite loss" in t.user_attrs["prune_reason"] for t in study.trials)
    client = MlflowClient()
    for t in study.trials:
        run = client.get_run(t.user_attrs[st.RUN_ID_ATTR])
        assert run.data.tags[st.STATE_TAG] == "pruned" and "non-finite loss" in run.data.tags[st.REASON_TAG]
        assert run.data.tags["mlflow.parentRunId"] == parent
    out = capsys.readouterr().out
    assert "pruned: non-finite loss: translator loss became" in out
    assert "no complete trial yet; nothing registered" in out
    assert client.get_run(parent).info.status == "FINISHED"


# -- one worker end to end (SQLite): child runs, report artifacts, champion -----------------------------

def test_single_worker_sqlite_end_to_end(pairs, tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    parent = run_sweep(SweepConfig(**TINY, pairs=str(pairs), study_name="one", storage=storage, n_trials=2,
                                   pruner="median", registered_name="kt-sweep-unit"), experiment="sweep-one")
    study = optuna.load_study(study_name="one", storage=storage)
    assert len(study.trials) == 2
    client = MlflowClient()
    children = client.search_runs([client.get_experiment_by_name("sweep-one").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[st.RUN_ID_ATTR] for t in study.trials)
    for r in children:
        assert r.data.tags[st.STATE_TAG] in ("complete", "pruned") and "train_loss" in r.data.metrics
    arts = {a.path for a in client.list_artifacts(parent)} | {a.path for a in client.list_artifacts(parent, "plots")}
    assert {"trials.json", "plots/optimization_history.html", "plots/parallel_coordinate.html",
            "plots/slice.html"} <= arts
    run = client.get_run(parent)
    assert run.data.tags["kt.study"] == "one"
    assert math.isclose(run.data.metrics["best_score"], study.best_value)
    champ = client.get_model_version_by_alias("kt-sweep-unit", "champion")
    assert champ.run_id == study.best_trial.user_attrs[st.RUN_ID_ATTR]
    assert float(champ.tags[ch.SCORE_TAG]) == study.best_value
    assert "champion -> version 1: no champion of kt-sweep-unit yet" in capsys.readouterr().out


# -- the champion rule ---------------------------------------------------------------------------------

def _version(client: MlflowClient, name: str, score=None, digest=None) -> str:
    v = client.create_model_version(name, source="file:///tmp/kt-nothing-here")
    if score is not None:
        client.set_model_version_tag(name, v.version, ch.SCORE_TAG, repr(score))
    if digest is not None:
        client.set_model_version_tag(name, v.version, ch.VAL_DIGEST_TAG, digest)
    return str(v.version)


def test_champion_rule(tracking):
    client = MlflowClient()
    name = "kt-champion-rule"
    client.create_registered_model(name)
    v1 = _version(client, name, 50.0, "aaa")
    assert ch.decide_champion(name, v1, 50.0, "aaa") == (True, f"no champion of {name} yet")
    client.set_registered_model_alias(name, "champion", v1)
    assert ch.decide_champion(name, v1, 50.0, "aaa")[0] is False                       # already champion
    v2 = _version(client, name, 60.0, "aaa")
    wins, reason = ch.decide_champion(name, v2, 60.0, "aaa")
    assert wins and "beats the champion version 1 (50.00%, its recorded score" in reason
    wins, reason = ch.decide_champion(name, v2, 50.0, "aaa")                          # a tie does not win
    assert not wins and "does not beat" in reason
    wins, reason = ch.decide_champion(name, v2, 40.0, "aaa")
    assert not wins
    # other validation networks: the champion is re-scored on ours
    seen = []
    wins, reason = ch.decide_champion(name, v2, 55.0, "bbb", rescore=lambda uri: seen.append(uri) or 70.0)
    assert seen == [f"models:/{name}/1"] and not wins and "re-scored" in reason
    wins, reason = ch.decide_champion(name, v2, 75.0, "bbb", rescore=lambda uri: 70.0)
    assert wins
    def broken(uri):
        raise RuntimeError("shape mismatch")
    wins, reason = ch.decide_champion(name, v2, 99.0, "bbb", rescore=broken)
    assert not wins and "cannot be re-scored" in reason and "shape mismatch" in reason
    wins, reason = ch.decide_champion(name, v2, 99.0, "bbb")                          # nothing to compare with
    assert not wins and "no comparable score" in reason


def test_move_champion_settles_on_the_best(tracking):
    client = MlflowClient()
    name = "kt-champion-race"
    client.create_registered_model(name)
    good, bad = _version(client, name, 80.0, "aaa"), _version(client, name, 30.0, "aaa")
    # a worse worker overwrote the alias after the better one had decided: the better one puts it back
    client.set_registered_model_alias(name, "champion", bad)
    holds, reason = ch.move_champion(name, good, 80.0, "aaa", settle=(0.0, 0.0))
    assert holds and "beats the champion version 2" in reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == good
    holds, reason = ch.move_champion(name, bad, 30.0, "aaa", settle=(0.0, 0.0))
    assert not holds and "does not beat" in reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == good


def test_a_restarted_worker_goes_on_sampling_instead_of_replaying(pairs, tracking, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = SweepConfig(**{**TINY, "epochs_min": 1, "epochs_max": 1}, pairs=str(pairs), study_name="restart",
                      storage=storage, n_trials=1, sampler="random", pruner="none")
    run_sweep(cfg, experiment="sweep-restart")
    run_sweep(cfg, experiment="sweep-restart")            # the same worker, started again
    first, second = optuna.load_study(study_name="restart", storage=storage).trials
    assert first.params != second.params
    assert st.sampler_seed(0, 0, 0) == 0 and st.sampler_seed(0, 0, 1) != st.sampler_seed(0, 0, 0)


def test_stale_trials_are_failed_when_a_worker_starts_and_stops(pairs, tracking, tmp_path, monkeypatch):
    import time

    import kt_mlflow.steps.sweep as sweep_step

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    db = st.open_storage(storage, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="stale", storage=db, direction="maximize")
    dead = study.ask()                                  # a trial whose worker died: one heartbeat, then none
    db.record_heartbeat(dead._trial_id)
    time.sleep(3)
    st.fail_stale(study)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    calls, real = [], st.fail_stale
    monkeypatch.setattr(sweep_step.st, "fail_stale", lambda s: calls.append(len(s.trials)) or real(s))
    run_sweep(SweepConfig(**{**TINY, "epochs_min": 1, "epochs_max": 1}, pairs=str(pairs), study_name="stale",
                          storage=storage, n_trials=1, heartbeat_interval=1, grace_period=2, pruner="none"),
              experiment="sweep-stale")
    assert len(calls) == 2                              # at the start, and at the stop after its trial
    states = [t.state for t in optuna.load_study(study_name="stale", storage=storage).trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]   # the retry ran
