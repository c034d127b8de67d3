import mlflow
import numpy as np
import pytest
import torch

from kt_mlflow.blocks import create_family, flatten_block
from kt_mlflow.data import load_dataset
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation import network_accuracy
from kt_mlflow.evaluation.finetune import finetune_curves
from kt_mlflow.pairs.store import load_split
from kt_mlflow.pairs.trainer import Protocol
from kt_mlflow.training.augment import check_augmentation, mask_and_noise
from kt_mlflow.training.recipes import RECIPES
from kt_mlflow.training.train import NonFiniteLoss, TrainConfig, train_translator

TINY = dict(depth=1, width=16, token_hidden=32, channel_hidden=32, val_every=2, device="cpu")


@pytest.fixture(scope="module")
def setup(tiny_pairs):
    return (create_family("paper_mnist"), load_split(tiny_pairs, "train"), load_split(tiny_pairs, "val"),
            load_dataset("digits"))


def test_masking_and_noise_have_the_asked_strength():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    assert abs(float((mask_and_noise(x, 0.3, 0.0) == 0).float().mean()) - 0.3) < 0.01
    assert abs(float((mask_and_noise(x, 0.0, 0.2) - 1).std()) - 0.2) < 0.01
    for bad in ((1.0, 0.0, "source"), (-0.1, 0.0, "source"), (0.1, -1.0, "source"), (0.1, 0.1, "nowhere")):
        with pytest.raises(KTError):
            check_augmentation(*bad)


def test_training_lowers_the_loss_and_keeps_the_best_translator(setup):
    family, train, val, data = setup
    result = train_translator(TrainConfig(epochs=6, **TINY), family, train, val, data, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    validated = [h for h in result.history if "val_acc_mean" in h]
    assert [i for i, h in enumerate(result.history) if "val_acc_mean" in h] == [1, 3, 5]
    assert result.best["val_acc_mean"] == max(h["val_acc_mean"] for h in validated)
    # the kept translator is the best one: evaluating it again gives the logged best score
    small = result.translator.translate_batch(val.part("large"))
    acc = network_accuracy(family, val.part("begin"), small, val.part("last"), data)
    assert abs(float(acc.mean()) - result.best["val_acc_mean"]) < 1e-3


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - {"paper"}))
def test_every_recipe_trains(setup, recipe):
    family, train, val, data = setup
    result = train_translator(TrainConfig(recipe=recipe, epochs=2, **TINY), family, train, val, data, progress=False)
    assert np.isfinite(result.history[-1]["train_loss"])
    assert ("functional_loss" in result.history[-1]) == (RECIPES[recipe].functional > 0)


def test_non_finite_loss_is_reported(setup):
    family, train, val, data = setup
    with pytest.raises(NonFiniteLoss, match="lower --lr"):
        train_translator(TrainConfig(epochs=3, lr=1e12, **TINY), family, train, val, data, progress=False)


def test_logged_translator_predicts_through_pyfunc(setup, local_tracking):
    from kt_mlflow.tracking.models import load_translator, log_translator

    family, train, val, data = setup
    result = train_translator(TrainConfig(epochs=1, **TINY), family, train, val, data, progress=False)
    with mlflow.start_run():
        version = log_translator(result.translator, {k: v[:1] for k, v in val.part("large").items()}, "kt-unit")
    assert version == "1"
    pyfunc = mlflow.pyfunc.load_model("models:/kt-unit/latest")
    flat = flatten_block(family, "large", val.part("large")).numpy()
    out = pyfunc.predict(flat)
    expected = flatten_block(family, "small", result.translator.translate_batch(val.part("large"))).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    again = load_translator("models:/kt-unit@latest")
    assert again.config() == result.translator.config()


def test_finetune_curves_start_from_the_given_blocks(setup):
    family, train, val, data = setup
    curves = finetune_curves(family, val, data, {"trained": val.part("small")}, (0, 1), Protocol(batch_size=256))
    at0 = curves[curves.epoch == 0].sort_values("network")["accuracy"].to_numpy()
    acc = network_accuracy(family, val.part("begin"), val.part("small"), val.part("last"), data)
    np.testing.assert_allclose(at0, acc.numpy(), atol=1e-4)
    assert set(curves.epoch) == {0, 1}


def test_run_context_plugin_tags_new_runs(local_tracking):
    with mlflow.start_run() as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["kt.version"] == "0.1.0" and tags["kt.torch"] == torch.__version__
    assert tags["kt.device"].startswith("cpu") or "NVIDIA" in tags["kt.device"]
