"""Translators in the MLflow Model Registry: log + register, and pull by name.

MLflow reserves the alias name ``latest`` and resolves ``models:/NAME/latest`` to the newest version
itself; so ``load_translator("NAME")``, ``"models:/NAME@latest"`` and ``"models:/NAME/latest"`` all
mean the newest version, and any other alias is looked up as an alias: ``@candidate`` is the version
``kt train`` registered last, ``@champion`` the best one a sweep found (only sweeps move it).
"""
from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from ..blocks import flatten_block
from ..errors import KTError, first_line
from ..translators import Translator
from .pyfunc_loader import LOADER

ARTIFACT = "translator"      # the logged model's name (runs:/ID/translator) and its data folder
CANDIDATE = "candidate"      # alias of the version `kt train` registered last (MLflow reserves "latest")


def default_name(family: str, arch: str) -> str:
    return f"kt-{family}-{arch}"


def _is_path(text: str) -> bool:
    """A local model folder only when given as a path; registered names hold no '/'."""
    return text.startswith(("/", ".", "~")) or os.sep in text


def model_uri(name_or_uri: str) -> str:
    """A bare name is a registered model (its newest version), even where a folder of that name exists;
    ``@latest`` is spelled the way MLflow resolves it."""
    if "://" in name_or_uri or name_or_uri.startswith(("models:/", "runs:/")) or _is_path(name_or_uri):
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
                   tags: Optional[Dict[str, str]] = None, alias: Optional[str] = None) -> Optional[str]:
    """Log ``translator`` to the active run as the pyfunc model ``translator``; register it if a name is given.

    A registered version gets the translator's ``kt.*`` tags plus ``tags``, a description saying what it
    translates (see ``describe_version``) and, when given, ``alias`` (``kt train`` passes ``candidate``).
    Returns the new model version (as a string) or None when not registered.
    """
    family = translator.family
    example = flatten_block(family, "large", example_large).numpy().astype(np.float32)
    n_out = flatten_block(family, "small", translator.translate_batch(example_large)).shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, example.shape[1]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out))]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT  # copied into the model as its data folder, "translator"
        folder.mkdir()
        translator.save(folder)
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT, loader_module=LOADER, data_path=str(folder), signature=signature, input_example=example,
            pip_requirements=_requirements(), registered_model_name=registered_name, metadata={"kt": translator.config()},
        )
    if not registered_name:
        return None
    version = str(info.registered_model_version)
    run = mlflow.active_run()
    all_tags = {**translator.config_tags(), **(tags or {})}
    if run is not None:
        all_tags.setdefault("kt.run_id", run.info.run_id)
    annotate_version(registered_name, version, all_tags)
    if alias:
        set_alias(registered_name, alias, version)
    return version


def describe_version(tags: Dict[str, str]) -> str:
    """The model-version description (Markdown) the UI shows, from the version's ``kt.*`` tags."""
    family = tags.get("kt.family", "?")
    blocks = f"large block `{tags.get('kt.large', '?')}` -> small block `{tags.get('kt.small', '?')}`"
    lines = [f"Knowledge Translation translator for `{family}` networks ({blocks}): it maps the weights of a "
             f"trained large block to the weights of the small block that replaces it, without retraining.", ""]
    for label, key in (("recipe", "kt.recipe"), ("architecture", "kt.arch"), ("sweep study", "kt.study"),
                       ("sweep trial", "kt.trial")):
        if tags.get(key):
            lines.append(f"- {label}: `{tags[key]}`")
    if tags.get("kt.val_acc_mean"):
        lines.append(f"- validation accuracy: {tags['kt.val_acc_mean']}% (mean over the held-out networks, "
                     f"their large block replaced by the translated small block)")
    if tags.get("kt.run_id"):
        lines.append(f"- train run: `{tags['kt.run_id']}`")
    return "\n".join(lines)


def describe_model(name: str, family: str, arch: str) -> str:
    """The registered-model description (Markdown): what its versions are and what the aliases mean."""
    return (f"Knowledge Translation translators (kt-mlflow) for `{family}` networks, architecture `{arch}`: each "
            f"version maps a trained large block to its small block.\n\n"
            f"- `@{CANDIDATE}`: the version `kt train` registered last\n"
            f"- `@champion`: the best version a sweep found (moved only by `kt sweep`)\n"
            f"- `models:/{name}/latest`: the newest version\n\n"
            f"Load one with `kt_mlflow.load_translator(\"models:/{name}@{CANDIDATE}\")`.")


def annotate_version(name: str, version: str, tags: Dict[str, str]) -> None:
    """Tag a registered version, describe it, and describe its registered model when it has no description."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=describe_version(tags))
    if not (client.get_registered_model(name).description or "").strip():
        client.update_registered_model(name, description=describe_model(name, tags.get("kt.family", "?"),
                                                                        tags.get("kt.arch", "?")))


def load_translator(name_or_uri: str, device: str = "cpu") -> Translator:
    """Pull a translator by registered name, ``models:/NAME@alias``, ``runs:/ID/translator`` or a local model folder.

    A bare name (or ``@latest``) means the newest version; ``@candidate`` is the version ``kt train``
    registered last, ``@champion`` the best version a sweep found.

    Example:
        >>> tr = load_translator("kt-paper_mnist-channel_set")                  # doctest: +SKIP
        >>> tr = load_translator("models:/kt-paper_mnist-channel_set@candidate")  # doctest: +SKIP
        >>> small = tr.translate(large_block.state_dict())                      # doctest: +SKIP
    """
    uri = model_uri(name_or_uri)
    try:
        remote = "://" in uri or uri.startswith(("models:/", "runs:/"))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)) if remote else Path(uri).expanduser()
    except (MlflowException, OSError) as e:
        raise KTError(f"no translator at {uri} on tracking server {mlflow.get_tracking_uri()} "
                      f"({first_line(e)}); train one with `kt train --registered-name NAME`.") from None
    return Translator.load(translator_data(local, uri), device=device)


def translator_data(model: Path, uri: str) -> Path:
    """The folder of ``translator.json`` and ``translator.safetensors`` inside a logged model, read from
    its MLmodel as data: no code the model carries is imported, whatever its MLmodel names."""
    try:
        flavor = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise KTError(f"{uri} is not an MLflow model with a python_function flavor; pass a model logged "
                      f"by `kt train`.") from None
    # Translators logged as models from code (earlier kt-mlflow) keep the same two files as the artifact
    # "translator"; their code is never run here.
    rel = flavor.get("data") or (flavor.get("artifacts") or {}).get(ARTIFACT, {}).get("path")
    data = (model / str(rel)).resolve() if rel else None
    if data is None or not data.is_relative_to(model.resolve()) or not (data / "translator.json").is_file():
        raise KTError(f"{uri} is not a kt-mlflow translator model (no translator.json in its data); pass a "
                      f"model logged by `kt train`.")
    return data


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)
