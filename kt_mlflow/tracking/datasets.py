"""Pair folders as MLflow datasets, so the UI shows which runs made and used which pairs.

``PairShardSource`` is registered as an ``mlflow.dataset_source`` plugin (see setup.cfg): a logged
dataset input can be turned back into its pair folder with ``mlflow.data.get_source(...).load()``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlflow
import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.types import Schema, TensorSpec

from ..errors import KTError, first_line
from ..pairs import store
from ..paths import data_home

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PAIRS_ARTIFACT = "pairs"
DIGEST_TAG = "kt.pairs_digest"   # a generate run's pair-set digest


def resolve_pairs(spec: str) -> Path:
    """A pair folder from a path, ``runs:/<run_id>[/path]``, or a bare generate run id."""
    if RUN_ID.match(spec):
        spec = f"runs:/{spec}/{PAIRS_ARTIFACT}"
    if spec.startswith("runs:/"):
        parts = spec[len("runs:/"):].split("/", 1)
        uri = spec if len(parts) == 2 and parts[1] else f"runs:/{parts[0]}/{PAIRS_ARTIFACT}"
        try:
            return _fetch(uri, parts[0], uri.endswith(f"/{PAIRS_ARTIFACT}"))
        except KTError:
            raise
        except Exception as e:  # MlflowException, OSError: the message is MLflow's
            raise KTError(f"cannot fetch pairs from {uri} ({first_line(e)}); pass a generate run id or a folder.") from None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise KTError(f"pairs {spec!r} is neither a folder nor a generate run id (runs:/<id>); run `kt generate` first.")
    return path


def _fetch(uri: str, run_id: str, whole_set: bool) -> Path:
    """A generate run's pair set, downloaded once into ``<data home>/pairs-cache/<digest>`` and reused
    while its digest matches the run's (other artifact paths are downloaded each time)."""
    digest = mlflow.MlflowClient().get_run(run_id).data.tags.get(DIGEST_TAG) if whole_set else None
    if not digest:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    cache = data_home() / "pairs-cache" / digest
    if (cache / "manifest.json").is_file() and store.digest(cache) == digest:
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{digest}.", dir=cache.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        if store.digest(local) != digest:
            raise KTError(f"the pairs of {uri} have digest {store.digest(local)}, but the run recorded {digest}; "
                          f"they were changed after the run: generate them again.")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(local, cache)
    return cache


class PairShardSource(DatasetSource):
    """Where a pair folder lives: a local path or a ``runs:/`` artifact URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "kt_pairs"

    def load(self) -> Path:
        """Download (if needed) and return the local pair folder."""
        return resolve_pairs(self.uri)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith("kt-pairs:")

    @classmethod
    def _resolve(cls, raw_source: Any) -> "PairShardSource":
        return cls(raw_source[len("kt-pairs:"):])

    def to_dict(self) -> Dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: Dict[Any, Any]) -> "PairShardSource":
        return cls(source_dict["uri"])


class PairDataset(Dataset):
    """A folder of pair shards; its digest and profile come from the sidecars (``manifest.json`` is not trusted)."""

    def __init__(self, folder: Path, source: Optional[PairShardSource] = None, name: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self.manifest = store.manifest_of(self.folder)
        settings = self.manifest.get("settings", {})
        super().__init__(
            source=source or PairShardSource(str(self.folder.resolve())),
            name=name or f"kt-pairs-{settings.get('family', 'unknown')}-{settings.get('dataset', '')}",
            digest=self.manifest["digest"],
        )

    def _compute_digest(self) -> str:
        return store.digest(self.folder)

    def to_dict(self) -> Dict[str, str]:
        base = super().to_dict()
        base.update({"schema": json.dumps(ui_schema(self.schema)) if self.schema else "",
                     "profile": json.dumps(self.profile)})
        return base

    @property
    def profile(self) -> Dict[str, Any]:
        prof: Dict[str, Any] = {}
        for split, info in self.manifest["splits"].items():
            prof[f"{split}_pairs"] = info["count"]
            for key in ("base_acc", "small_acc"):
                vals = [p[key] for p in info["pairs"]]
                if vals:
                    prof[f"{split}_{key}_mean"] = round(sum(vals) / len(vals), 3)
        return prof

    @property
    def schema(self) -> Optional[Schema]:
        metas = store.sidecars(self.folder, "train") or store.sidecars(self.folder, "val")
        if not metas:
            return None
        from safetensors import safe_open

        with safe_open(str(self.folder / metas[0]["file"]), framework="np") as f:
            specs = []
            for key in sorted(f.keys()):
                t = f.get_slice(key)
                specs.append(TensorSpec(np.dtype(t.get_dtype().lower().replace("f32", "float32").replace("i64", "int64")),
                                        (-1, *t.get_shape()[1:]), key))
        return Schema(specs)


def ui_schema(schema: Schema) -> Dict[str, Any]:
    """``schema`` in the form the MLflow UI's dataset drawer lists as a table (``{"mlflow_colspec": [...]}``,
    one row per tensor, its type e.g. ``float32 [6, 1, 3, 3] per pair``); each row keeps the tensor spec.

    The UI shows ``{"mlflow_tensorspec": ...}`` only as "Array Datasource" and a bare list as
    "Unrecognized Schema Format".
    """
    rows = []
    for spec in schema.to_dict():
        tensor = spec.get("tensor-spec", {})
        dims = list(tensor.get("shape", []))[1:]  # dim 0 counts the pairs
        shape = f"[{', '.join(str(d) for d in dims)}]" if dims else "scalar"
        rows.append({"name": spec.get("name"), "type": f"{tensor.get('dtype', spec.get('type'))} {shape} per pair",
                     "tensor-spec": tensor})
    return {"mlflow_colspec": rows}


class ImageDataset(Dataset):
    """The images a step trained or measured networks on (``kt_mlflow.data.ImageData``), by digest."""

    def __init__(self, data, source: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        self.data = data
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(source)
        super().__init__(source=resolved, name=data.name, digest=data.digest)

    def _compute_digest(self) -> str:
        return self.data.digest

    def to_dict(self) -> Dict[str, str]:
        base = super().to_dict()
        base.update({"schema": json.dumps(ui_schema(self.schema)), "profile": json.dumps(self.profile)})
        return base

    @property
    def profile(self) -> Dict[str, Any]:
        d = self.data
        return {"train_images": len(d.train_x), "test_images": len(d.test_x),
                "classes": int(max(d.train_y.max(), d.test_y.max())) + 1, "image": list(d.train_x.shape[1:])}

    @property
    def schema(self) -> Schema:
        return Schema([TensorSpec(np.dtype("float32"), (-1, *self.data.train_x.shape[1:]), "image"),
                       TensorSpec(np.dtype("int64"), (-1,), "label")])


def log_image_input(data, dataset: str, data_root: Optional[str], context: str) -> None:
    """Log the images ``data`` (loaded from ``dataset``/``data_root``) as a run input."""
    from ..data import BUNDLED_MNIST

    where = str(Path(data_root).expanduser().resolve()) if data_root else \
        str(BUNDLED_MNIST) if dataset == "mnist" else f"kt_mlflow:{dataset}"
    mlflow.log_input(ImageDataset(data, where), context=context)


def log_pair_input(folder: Path, spec: str, context: str) -> None:
    """Log the pair set ``spec`` (folder, run id or ``runs:/`` URI, already fetched to ``folder``) as a run input."""
    if RUN_ID.match(spec):
        spec = f"runs:/{spec}/{PAIRS_ARTIFACT}"
    source = spec if spec.startswith("runs:/") else str(Path(folder).resolve())
    mlflow.log_input(PairDataset(folder, source=PairShardSource(source)), context=context)


def load_pair_splits(spec: str, dataset: str) -> Tuple[Path, store.PairSet, store.PairSet]:
    """(folder, train split, val split) from a folder or generate run id; checks the image dataset."""
    folder = resolve_pairs(spec)
    train, val = store.load_split(folder, "train"), store.load_split(folder, "val")
    made_on = train.settings.get("dataset")
    if made_on != dataset:
        raise KTError(f"the pairs in {spec} were generated on dataset {made_on!r}, not {dataset!r}; "
                      f"pass --dataset {made_on} (and its --data-root).")
    return folder, train, val
