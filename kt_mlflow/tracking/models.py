"""Translators in the MLflow Model Registry: log + register, and pull by name.

MLflow reserves the alias name ``latest`` and resolves ``models:/NAME/latest`` to the newest version
itself; so ``load_translator("NAME")``, ``"models:/NAME@latest"`` and ``"models:/NAME/latest"`` all
mean the newest version, and any other alias (``@champion``) is looked up as an alias.
"""
from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from ..blocks import flatten_block
from ..errors import KTError
from ..translators import Translator

PYFUNC_CODE = str(Path(__file__).with_name("translator_pyfunc.py"))


def default_name(family: str, arch: str) -> str:
    return f"kt-{family}-{arch}"


def model_uri(name_or_uri: str) -> str:
    """A bare name means its newest version; ``@latest`` is spelled the way MLflow resolves it."""
    if "://" in name_or_uri or name_or_uri.startswith(("models:/", "runs:/")) or Path(name_or_uri).is_dir():
        uri = name_or_uri
    else:
        uri = f"models:/{name_or_uri}/latest"
    if uri.startswith("models:/") and uri.lower().endswith("@latest"):
        uri = uri[: -len("@latest")] + "/latest"
    return uri


def _requirements() -> list:
    pins = [f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "mlflow", "safetensors", "numpy")]
    return pins + [f"kt-mlflow=={metadata.version('kt-mlflow')}"]


def log_translator(translator: Translator, example_large: Dict[str, torch.Tensor], registered_name: Optional[str],
                   tags: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Log ``translator`` to the active run as a pyfunc model; register it if a name is given.

    Returns the new model version (as a string) or None when not registered.
    """
    family = translator.family
    example = flatten_block(family, "large", example_large).numpy().astype(np.float32)
    n_out = flatten_block(family, "small", translator.translate_batch(example_large)).shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out))]))
    with tempfile.TemporaryDirectory() as tmp:
        translator.save(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name="translator", python_model=PYFUNC_CODE, artifacts={"translator": tmp}, signature=signature,
            input_example=example, pip_requirements=_requirements(), registered_model_name=registered_name,
            metadata={"kt": translator.config()},
        )
    if not registered_name:
        return None
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**translator.config_tags(), **(tags or {})}.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return version


def load_translator(name_or_uri: str, device: str = "cpu") -> Translator:
    """Pull a translator by registered name, ``models:/NAME@alias``, ``runs:/...`` or a local model folder.

    Example:
        >>> tr = load_translator("kt-paper_mnist-mixer")            # doctest: +SKIP
        >>> small = tr.translate(large_block.state_dict())          # doctest: +SKIP
    """
    uri = model_uri(name_or_uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise KTError(f"no translator at {uri} on tracking server {mlflow.get_tracking_uri()} "
                      f"({str(e).splitlines()[0][:160]}); train one with `kt train --registered-name NAME`.") from None
    model = pyfunc.unwrap_python_model()
    translator = getattr(model, "translator", None)
    if not isinstance(translator, Translator):
        raise KTError(f"{uri} is not a kt-mlflow translator model; pass a model logged by `kt train`.")
    translator.net.to(device)
    return translator


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)
