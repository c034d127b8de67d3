"""Where kt-mlflow keeps what it makes: the data home, never the working or project folder.

The data home is ``$KT_HOME``, else ``$XDG_CACHE_HOME/kt-mlflow`` (``~/.cache/kt-mlflow``). A pair
folder's default name is a digest of the settings that made it, so two settings never share a
folder and a rerun with the same settings resumes the same one.

Example:
    >>> pairs_folder({"seed": 0}, "paper_mnist", "mnist").parent.name
    'pairs'
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping


def data_home() -> Path:
    """``$KT_HOME`` or the user cache folder's ``kt-mlflow``."""
    if os.environ.get("KT_HOME"):
        return Path(os.environ["KT_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kt-mlflow"


def settings_digest(settings: Mapping[str, Any]) -> str:
    """12 hex digits that change when any setting changes."""
    text = json.dumps({k: settings[k] for k in sorted(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pairs_folder(settings: Mapping[str, Any], family: str, dataset: str) -> Path:
    """``<data home>/pairs/<family>-<dataset>-<settings digest>``."""
    return data_home() / "pairs" / f"{family}-{dataset}-{settings_digest(settings)}"


def default_storage() -> str:
    """The sweep's default Optuna storage: one SQLite file in the data home."""
    return f"sqlite:///{data_home() / 'optuna.db'}"


def kept_translator_folder(name: str) -> Path:
    """Where ``kt train`` keeps a trained translator it could not log: ``<data home>/translators/NAME-<time>``."""
    import time

    return data_home() / "translators" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
