"""Bad input is one line, refused before any MLflow run opens or any work is done."""
from __future__ import annotations

import dataclasses

import mlflow
import pytest
import torch
from conftest import synthetic_pairs

from kt_mlflow.blocks import create_family
from kt_mlflow.cli import main
from kt_mlflow.config import EvaluateConfig, GenerateConfig, RegisterConfig, TrainConfig
from kt_mlflow.data import load_for
from kt_mlflow.errors import KTError
from kt_mlflow.steps.evaluate import run_evaluate
from kt_mlflow.steps.generate import run_generate
from kt_mlflow.tracking.models import log_translator
from kt_mlflow.translators import create_translator


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_generate_into_a_folder_of_other_settings_opens_no_run(local_tracking, tmp_path):
    folder = synthetic_pairs(tmp_path / "pairs")                         # made with 0 epochs
    with pytest.raises(KTError, match="holds pairs made with other settings .*epochs"):
        run_generate(GenerateConfig(output=str(folder), n_pairs=4, n_val=2, dataset="digits", epochs=1))
    assert _runs() == []


def test_evaluate_on_pairs_of_another_dataset_opens_no_run(local_tracking, tmp_path):
    family = create_family("paper_mnist")
    large = {k: v[None] for k, v in family.large_block().state_dict().items() if v.is_floating_point()}
    with mlflow.start_run():
        log_translator(create_translator("channel_set", family, depth=1, width=8), large, "kt-refusals")
    logged = len(_runs())
    folder = synthetic_pairs(tmp_path / "pairs")                         # generated on digits
    with pytest.raises(KTError, match="generated on dataset 'digits', not 'mnist'; pass --dataset digits"):
        run_evaluate(EvaluateConfig(model="kt-refusals", pairs=str(folder), dataset="mnist"))
    assert len(_runs()) == logged


@pytest.mark.parametrize("name", ["team/kt", "kt:1", "..", "./kt"])
def test_a_registered_name_mlflow_refuses_is_refused_before_training(name, tmp_path, capsys):
    with pytest.raises(KTError, match="not a name MLflow accepts"):
        TrainConfig(registered_name=name).validate()
    with pytest.raises(KTError, match="not a name MLflow accepts"):
        RegisterConfig(translator=str(tmp_path), registered_name=name).validate()
    folder = synthetic_pairs(tmp_path / "pairs")
    assert main(["train", "--pairs", str(folder), "--dataset", "digits", "--registered-name", name]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kt train: error: --registered-name") and not (tmp_path / "mlruns").exists()


def test_labels_past_the_familys_classes_are_refused_by_name():
    five = dataclasses.replace(create_family("paper_mnist"), num_classes=5)
    with pytest.raises(KTError, match="digits .* has 10 classes, but family paper_mnist classifies 5; set input.classes: 10"):
        load_for(five, "digits")
    assert load_for(create_family("paper_mnist"), "digits").train_y.max() == torch.tensor(9)


def test_train_refusals_open_no_run(local_tracking, tmp_path):
    from kt_mlflow.steps.train import run_train

    folder = synthetic_pairs(tmp_path / "pairs")                         # 4 training pairs
    with pytest.raises(KTError, match="--select-holdout 4 leaves no training pairs"):
        run_train(TrainConfig(pairs=str(folder), dataset="digits", select_holdout=4, epochs=1))
    assert _runs() == []


@pytest.mark.parametrize("argv", [["generate", "--n-pairs", "inf"], ["train", "--epochs", "1e400"],
                                  ["evaluate", "--colour", "maybe"], ["generat"]])
def test_bad_flags_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and ": error: " in line and line.endswith("--help).")


def test_main_needs_pairs_to_train_on():
    from kt_mlflow.config import MainConfig

    with pytest.raises(KTError, match="--n-pairs 16 leaves no pairs to train on after --select-holdout 16"):
        MainConfig(n_pairs=16).validate()
    MainConfig(n_pairs=17).validate()


def test_a_sweep_whose_every_trial_would_fail_opens_no_run(local_tracking, tmp_path):
    from kt_mlflow.config import SweepConfig
    from kt_mlflow.steps.sweep import run_sweep

    folder = synthetic_pairs(tmp_path / "pairs")
    cfg = SweepConfig(pairs=str(folder), dataset="digits", select_holdout=4, n_trials=1,
                      storage=f"sqlite:///{tmp_path}/optuna.db")
    with pytest.raises(KTError, match="--select-holdout 4 leaves no training pairs"):
        run_sweep(cfg)
    assert _runs() == []
