"""The translator as an MLflow pyfunc, logged as *code* (models-from-code), so loading it unpickles nothing.

``predict`` takes a batch of flattened large-block parameters ``(N, n_large)`` (float tensors of the
block's state dict in order, see ``kt_mlflow.blocks.flatten_block``) and returns the small-block
parameters ``(N, n_small)``.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class TranslatorPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from kt_mlflow.translators import Translator

        self.translator = Translator.load(Path(context.artifacts["translator"]))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from kt_mlflow.blocks import flatten_block, unflatten_block

        array = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        family = self.translator.family
        large = unflatten_block(family, "large", torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        return flatten_block(family, "small", self.translator.translate_batch(large)).numpy()


mlflow.models.set_model(TranslatorPyfunc())
