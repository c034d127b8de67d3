"""`kt main` against a real tracking server: three child steps, and a rerun reuses what is finished."""
from conftest import kt

TINY = ["--dataset", "digits", "--n-pairs", "6", "--n-val", "4", "--members", "10", "--gen-epochs", "2",
        "--batch-size", "3", "--select-holdout", "2", "--experiment-name", "pipeline", "--registered-name", "kt-pipeline"]


def test_main_runs_the_steps_as_children_and_reuses_finished_ones(tmp_path, use_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))  # the default pair folder lands here

    first = kt("main", *TINY, "--epochs", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name("pipeline")

    def runs(step):
        return client.search_runs([exp.experiment_id], f"tags.`kt.step` = '{step}'")

    (parent,) = runs("main")
    children = {s: runs(s) for s in ("generate", "train", "evaluate")}
    assert all(len(r) == 1 for r in children.values())
    assert all(r[0].data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert parent.data.params["generate_run"] == children["generate"][0].info.run_id
    assert "kt_acc_mean" in children["evaluate"][0].data.metrics

    # Same parameters: nothing is rerun.
    again = kt("main", *TINY, "--epochs", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ("generate", "train", "evaluate"):
        assert f"main: reusing {step} run" in again.stdout
        assert len(runs(step)) == 1
    assert len(runs("main")) == 2

    # A translator parameter changed: the pairs are reused, training and evaluation are redone.
    changed = kt("main", *TINY, "--epochs", "4", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "main: reusing generate run" in changed.stdout and "reusing train" not in changed.stdout
    assert (len(runs("generate")), len(runs("train")), len(runs("evaluate"))) == (1, 2, 2)
    assert [v.version for v in client.search_model_versions("name = 'kt-pipeline'")].count("2") == 1
