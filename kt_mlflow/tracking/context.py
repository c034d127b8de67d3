"""An MLflow run-context-provider plugin: every run gets the kt-mlflow, torch and device versions as tags."""
from __future__ import annotations

import torch
from mlflow.tracking.context.abstract_context import RunContextProvider


class KTRunContextProvider(RunContextProvider):
    """Tags runs with what decides reproducibility and speed: package versions and the accelerator."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict:
        from .. import __version__

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"
        return {"kt.version": __version__, "kt.torch": torch.__version__, "kt.device": device}
