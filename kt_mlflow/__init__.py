"""kt-mlflow: Knowledge Translation (arXiv 2401.05772) as an MLflow project and plugin.

Example:
    >>> import kt_mlflow
    >>> fam = kt_mlflow.create_family("paper_mnist")
    >>> tr = kt_mlflow.load_translator("kt-paper_mnist-channel_set")   # doctest: +SKIP
    >>> small_net = tr.compress(my_trained_base_network)                # doctest: +SKIP
    >>> my_resnet = kt_mlflow.swap_block(my_resnet, "layer1.0", tr)     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

from .errors import KTError

__version__ = "0.1.0"

# The face of the package, imported on first use: `kt --help` must not pay for torch and mlflow.
_LAZY = {"create_family": "blocks", "family_names": "blocks", "load_translator": "tracking.models",
         "swap_block": "translators.swap"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_family", "family_names", "load_translator", "swap_block", "KTError", "__version__"]
