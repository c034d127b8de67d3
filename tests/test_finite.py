"""Non-finite numbers never pass: generation, translator training and compression refuse them in one line."""
from __future__ import annotations

import math

import pytest
import torch

from kt_mlflow import cli
from kt_mlflow.blocks import create_family
from kt_mlflow.config import GenerateConfig, TrainConfig
from kt_mlflow.errors import KTError
from kt_mlflow.pairs.generate import generate_pairs
from kt_mlflow.training.train import check_finite
from kt_mlflow.translators import create_translator

FAMILY = create_family("paper_mnist")


@pytest.mark.parametrize("lr", [math.nan, math.inf, -1.0])
def test_a_learning_rate_must_be_a_finite_positive_number(lr, capsys):
    for config in (GenerateConfig(lr=lr), TrainConfig(lr=lr)):
        with pytest.raises(KTError, match="--lr must be a finite number > 0"):
            config.validate()
    assert cli.main(["generate", "--lr", str(lr)]) == 2
    assert capsys.readouterr().err.startswith("kt generate: error: --lr must be a finite number > 0")


def test_pairs_that_trained_to_nan_are_not_written(tmp_path):
    out = tmp_path / "p"
    with pytest.raises(KTError, match=r"train pairs 0\.\.1 trained to non-finite .*lower --lr") as err:
        generate_pairs(GenerateConfig(output=str(out), n_pairs=2, n_val=0, members=2, lr=1e6, epochs=1,
                                      small_epochs=1, dataset="digits", workers=1))
    assert "\n" not in str(err.value) and not list(out.glob("*.safetensors")) and not list(out.glob("*.json"))


def test_a_translator_with_a_nan_weight_is_refused():
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=8)
    check_finite(tr)
    with torch.no_grad():
        tr.net.core.embed.weight[0, 0] = math.nan
    with pytest.raises(KTError, match="core.embed.weight is not finite, so it is not registered"):
        check_finite(tr)


def _large_block(scale: float = 1.0, dtype=None):
    torch.manual_seed(0)
    state = FAMILY.large_block().state_dict()
    return {k: (v.float().normal_() * scale if v.is_floating_point() and "running_var" not in k else v).to(
        dtype or v.dtype) if v.is_floating_point() else v for k, v in state.items()}


def test_compression_refuses_non_float_weights_and_non_finite_results():
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=8)
    tr.translate(_large_block())                                          # finite, ordinary weights pass
    with pytest.raises(KTError, match="conv1.weight is int64, expected real floating-point weights"):
        tr.translate({**_large_block(), "conv1.weight": torch.ones(6, 6, 3, 3, dtype=torch.int64)})
    with pytest.raises(KTError, match="conv1.weight is complex64, expected real floating-point weights"):
        tr.translate({**_large_block(), "conv1.weight": torch.ones(6, 6, 3, 3, dtype=torch.complex64)})
    with pytest.raises(KTError, match="the translated small block's .* is not finite"):
        tr.translate(_large_block(scale=1e30))
