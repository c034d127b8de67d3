"""The translator's MLflow pyfunc flavor: MLflow imports this module of the installed package
(``loader_module``) and hands it the model's data folder, which holds only ``translator.json`` and
``translator.safetensors``. Nothing stored with the model is imported or unpickled.

``predict`` takes a batch of flattened large-block parameters ``(N, n_large)`` (float tensors of the
block's state dict in order, see ``kt_mlflow.blocks.flatten_block``) and returns the small-block
parameters ``(N, n_small)``.

Example:
    >>> model = mlflow.pyfunc.load_model("models:/kt-paper_mnist-channel_set/1")   # doctest: +SKIP
    >>> model.predict(flat_large_blocks).shape                                      # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..blocks import flatten_block, unflatten_block
from ..translators import Translator

LOADER = __name__


class TranslatorModel:
    """What ``mlflow.pyfunc.load_model`` wraps: the translator and a NumPy ``predict``."""

    def __init__(self, translator: Translator) -> None:
        self.translator = translator

    def predict(self, model_input: Any, params: Optional[dict] = None) -> np.ndarray:
        array = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        family = self.translator.family
        large = unflatten_block(family, "large", torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        return flatten_block(family, "small", self.translator.translate_batch(large)).numpy()


def _load_pyfunc(data_path: str) -> TranslatorModel:
    return TranslatorModel(Translator.load(Path(data_path)))
