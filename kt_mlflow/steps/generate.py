"""``generate`` as a tracked MLflow step: params, throughput metrics, shards as artifacts, dataset input.

Under torchrun every rank trains its share of the shards and rank 0 alone talks to MLflow: it opens
the run, and logs the shards, the manifest and the dataset input once every rank has finished.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

import mlflow

from ..config import GenerateConfig
from ..distributed import world
from ..pairs.generate import GenerationJob
from ..tracking.datasets import DIGEST_TAG, PAIRS_ARTIFACT, PairDataset, PairShardSource, log_image_input
from ..tracking.runs import log_family, step_run


def run_generate(cfg: GenerateConfig, *, experiment: Optional[str] = None, nested: bool = False) -> str:
    """Generate (or resume) pairs inside an MLflow run; returns the run id (rank 0's; '' on other ranks)."""
    job = GenerationJob(cfg)   # every refusal (family, data, device, folder) before the run opens
    family, data, folder = job.trainer.family, job.trainer.data, job.folder
    if not world().is_main:
        job.run()
        return ""
    name = f"pairs {family.name} {cfg.n_pairs}+{cfg.n_val}"
    with step_run("generate", cfg.as_params(), run_name=name, nested=nested, experiment=experiment,
                  family=family.name) as run:
        log_family(family)
        log_image_input(data, cfg.dataset, cfg.data_root, "training")

        def on_shard(made: int, seconds: float, records) -> None:
            mlflow.log_metrics({"pairs_made": made, "pairs_per_min": 60.0 * made / max(seconds, 1e-9)}, step=made)

        summary = job.run(on_shard=on_shard)
        # At the last step, so the job's totals (all ranks) are what the UI shows.
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))},
                           step=summary["pairs_made"])
        mlflow.set_tag(DIGEST_TAG, summary["digest"])
        log_pair_files(folder)
        uri = f"runs:/{run.info.run_id}/{PAIRS_ARTIFACT}"
        mlflow.log_input(PairDataset(folder, source=PairShardSource(uri)), context="generated")
        return run.info.run_id


def pair_files(folder: Path) -> List[str]:
    """The files of a pair set, by its manifest: each shard, its sidecar and the manifest itself."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    return [*shards, *(Path(f).with_suffix(".json").name for f in shards), "manifest.json"]


def log_pair_files(folder: Path) -> None:
    """Log the pair set's own files as the run's ``pairs`` artifacts, and nothing else the folder holds
    (linked into a staging folder beside it, copied where links cannot be made)."""
    with tempfile.TemporaryDirectory(prefix=".kt-log-", dir=folder.parent) as tmp:
        for name in pair_files(folder):
            try:
                os.link(folder / name, Path(tmp) / name)
            except OSError:
                shutil.copy2(folder / name, Path(tmp) / name)
        mlflow.log_artifacts(tmp, PAIRS_ARTIFACT)
