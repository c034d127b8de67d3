"""``kt register``: log and register a translator saved on disk, e.g. one ``kt train`` kept when the
tracking server went away after training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlflow
import torch

from ..config import RegisterConfig
from ..io import atomic_write_json
from ..paths import kept_translator_folder
from ..tracking.models import CANDIDATE, default_name, log_translator
from ..tracking.runs import log_family, step_run
from ..translators import Translator

KEPT = "kept.json"   # beside a kept translator: its registered name, tags and best metrics


def keep_translator(translator: Translator, name: str, tags: Dict[str, str], metrics: Dict[str, float]) -> Path:
    """Save a trained translator in the data home with what registering it needs; returns the folder."""
    folder = kept_translator_folder(name)
    translator.save(folder)
    atomic_write_json(folder / KEPT, {"registered_name": name, "tags": tags, "metrics": metrics})
    return folder


def run_register(cfg: RegisterConfig, *, experiment: Optional[str] = None,
                 nested: bool = False) -> Tuple[str, Optional[str]]:
    """Log ``cfg.translator`` in a run of its own and register it (alias candidate); returns (run id, version)."""
    cfg.validate()
    folder = Path(cfg.translator)
    translator = Translator.load(folder)
    kept = json.loads((folder / KEPT).read_text()) if (folder / KEPT).is_file() else {}
    name = cfg.registered_name or kept.get("registered_name") or default_name(translator.family.name, translator.arch)
    with step_run("register", {**cfg.as_params(), "registered_name": name}, run_name=f"register {name}",
                  nested=nested, experiment=experiment, family=translator.family.name) as run:
        log_family(translator.family)
        if kept.get("metrics"):
            mlflow.log_metrics(kept["metrics"])
        example = {k: v[None] for k, v in translator.family.large_block().state_dict().items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point()}
        tags = {**kept.get("tags", {}), "kt.run_id": run.info.run_id}
        version = log_translator(translator, example, name, tags=tags, alias=CANDIDATE)
        print(f"register: {folder} registered as {name} version {version} (@{CANDIDATE})")
        return run.info.run_id, version
