"""A translator trained while the tracking server went away is kept on disk, and `kt register` logs it later."""
from __future__ import annotations

import mlflow
import pytest
import torch

import kt_mlflow.steps.train as train_step
from kt_mlflow.config import RegisterConfig, TrainConfig
from kt_mlflow.errors import KTError
from kt_mlflow.steps.register import run_register
from kt_mlflow.steps.train import run_train
from kt_mlflow.tracking.models import load_translator
from kt_mlflow.translators import Translator


def test_a_translator_that_could_not_be_logged_is_kept_and_registered_later(tiny_pairs, local_tracking, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setenv("KT_HOME", str(tmp_path / "home"))

    def server_gone(*args, **kwargs):
        raise ConnectionError("Connection refused by 127.0.0.1:5000")

    monkeypatch.setattr(train_step, "log_translator", server_gone)
    cfg = TrainConfig(pairs=str(tiny_pairs), dataset="digits", epochs=2, val_every=1, depth=1, width=8,
                      registered_name="kt-kept", device="cpu")
    with pytest.raises(KTError, match=r"could not be logged \(Connection refused .*\); it is kept in .*kt register") as err:
        run_train(cfg)
    assert "\n" not in str(err.value)
    assert "kt train: error: the trained translator could not be logged" in capsys.readouterr().err
    (kept,) = (tmp_path / "home" / "translators").iterdir()
    assert kept.name.startswith("kt-kept-") and (kept / "translator.safetensors").is_file()
    monkeypatch.undo()
    mlflow.set_tracking_uri(local_tracking)

    run_id, version = run_register(RegisterConfig(translator=str(kept)))
    assert version == "1"
    back, saved = load_translator("models:/kt-kept@candidate"), Translator.load(kept)
    for k, v in saved.net.state_dict().items():
        torch.testing.assert_close(back.net.state_dict()[k], v)
    run = mlflow.get_run(run_id)
    assert run.data.tags["kt.step"] == "register" and "best_val_acc_mean" in run.data.metrics


def test_register_needs_a_saved_translator(tmp_path):
    with pytest.raises(KTError, match="holds no translator.json"):
        RegisterConfig(translator=str(tmp_path)).validate()
    with pytest.raises(KTError, match="holds no translator.json"):
        RegisterConfig().validate()
