"""``mlflow.models.evaluate`` plugin: a logged translator against the data-free baselines, on held-out pairs.

Registered (setup.cfg) under the entry point group ``mlflow.model_evaluator`` as ``knowledge_translation``.

Data contract. ``data`` is a pandas DataFrame with a column ``pairs``: a pair folder, ``runs:/<id>[/path]``
or a bare ``kt generate`` run id (one distinct value). Optional columns ``split``, ``dataset`` and
``data_root`` do the same as the config keys below; ``evaluator_config`` wins where both are given.

``evaluator_config`` keys (all optional):

- ``pairs``: as the column (then ``data`` may hold anything, e.g. ``pd.DataFrame({"pairs": [...]})``)
- ``split``: pair split to evaluate on, default ``"val"``
- ``dataset`` / ``data_root``: test images, default the dataset the pairs were generated on / None
- ``baselines``: baseline names to compare with, default ``["random", "identity", "uniform", "l1"]``
- ``seed``: seed of the ``random`` baseline, default 0
- ``device``: ``auto`` (default), ``cpu`` or ``cuda[:N]``
- ``metric_prefix``: prefix of every metric and artifact name, default ``""``
- ``model_uri``: load the translator from here instead of from the evaluated model's id

The translator's small blocks are the method ``kt``; metrics are ``{method}_acc_mean/std/min/max``,
``{method}_gap_closed`` and ``gap_closed`` (that of ``kt``), artifacts the per-network and summary
tables and the HTML figures (see ``plots.log_evaluation``).

Example:
    >>> result = mlflow.models.evaluate(                            # doctest: +SKIP
    ...     model="models:/kt-translator@latest", data=pd.DataFrame({"pairs": ["kt-pairs"]}),
    ...     model_type="knowledge_translation", evaluators=["knowledge_translation"],
    ...     evaluator_config={"knowledge_translation": {"dataset": "mnist", "data_root": "data/mnist"}})
    >>> result.metrics["gap_closed"]                                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import mlflow
import pandas as pd
import torch
from mlflow.models.evaluation.artifacts import JsonEvaluationArtifact, TextEvaluationArtifact
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator
from mlflow.tracking.artifact_utils import get_artifact_uri

from ..blocks import family_of
from ..config import DEFAULT_BASELINES
from ..data import ImageData, load_for
from ..device import pick_device
from ..errors import KTError
from ..pairs.store import PairSet, load_split
from .baselines import BASELINES, make_baseline
from .compare import compare_methods
from .plots import KT_METHOD, log_evaluation

MODEL_TYPE = "knowledge_translation"
CONFIG_KEYS = ("pairs", "split", "dataset", "data_root", "colour", "baselines", "seed", "device", "metric_prefix", "model_uri")
DATA_KEYS = ("pairs", "split", "dataset", "data_root")


def load_translator(model_uri: str) -> Any:
    """The translator behind ``model_uri`` (``kt_mlflow.tracking.models.load_translator``)."""
    from ..tracking.models import load_translator as _load

    return _load(model_uri)


@dataclass
class EvalSettings:
    """What one evaluation compares, merged from the data's columns and ``evaluator_config``."""

    pairs: str
    split: str = "val"
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    colour: bool = False
    baselines: List[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    seed: int = 0
    device: str = "auto"
    metric_prefix: str = ""
    model_uri: Optional[str] = None

    @classmethod
    def resolve(cls, frame: Optional[pd.DataFrame], config: Mapping[str, Any]) -> "EvalSettings":
        """Settings from a DataFrame's columns (one distinct value each) overridden by ``config``.

        Example:
            >>> EvalSettings.resolve(pd.DataFrame({"pairs": ["p"]}), {"split": "train"}).split
            'train'
        """
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise KTError(f"unknown evaluator_config keys {unknown}; use some of: {', '.join(CONFIG_KEYS)}.")
        values: Dict[str, Any] = {}
        if isinstance(frame, pd.DataFrame):
            for key in DATA_KEYS:
                if key in frame.columns:
                    distinct = frame[key].dropna().astype(str).unique().tolist()
                    if len(distinct) > 1:
                        raise KTError(f"data column {key!r} holds {len(distinct)} different values; evaluate one at a time.")
                    if distinct:
                        values[key] = distinct[0]
        values.update({k: v for k, v in config.items() if v is not None})
        if "pairs" not in values:
            raise KTError(
                "no pairs to evaluate on: pass data=pd.DataFrame({'pairs': [<pair folder or generate run id>]}) "
                "or evaluator_config={'pairs': ...}."
            )
        if isinstance(values.get("baselines"), str):
            values["baselines"] = [b for b in values["baselines"].split(",") if b]
        settings = cls(**values)
        settings.check_baselines()
        return settings

    def check_baselines(self) -> None:
        for name in self.baselines:
            if name not in BASELINES:
                raise KTError(f"unknown baseline {name!r}; choose from: {', '.join(BASELINES.names())}.")


def model_uri_of(model: Any, settings: EvalSettings, model_id: Optional[str] = None) -> str:
    """Where the translator lives: ``settings.model_uri``, else the evaluated model's logged-model id."""
    if settings.model_uri:
        return settings.model_uri
    meta = getattr(model, "metadata", None)
    model_id = model_id or getattr(meta, "model_id", None)
    if model_id:
        return f"models:/{model_id}"
    run_id, path = getattr(meta, "run_id", None), getattr(meta, "artifact_path", None)
    if run_id and path and "://" not in path and not path.startswith("/"):
        return f"runs:/{run_id}/{path}"
    raise KTError(
        "cannot tell which translator to evaluate; pass model='models:/<name>@<alias>' or "
        "evaluator_config={'model_uri': ...}."
    )


def translate_pairs(translator: Any, large: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The translator's stacked small blocks for stacked large blocks, as CPU float tensors."""
    with torch.no_grad():
        out = translator.translate_batch(dict(large))
    return {k: v.detach().to("cpu") for k, v in out.items()}


def sized_for_pairs(translator: Any, val: PairSet) -> Any:
    """A translator that serves several sizes, at the size of the pairs' family (else unchanged)."""
    if not getattr(translator, "sizes", ()) or "family_spec" not in val.settings:
        return translator
    family = family_of(val.settings)
    if not translator.family.same_but_sizes(family):
        return translator
    return translator.at_size(family.small_hidden, family.large_hidden)


def prepare_comparison(translator: Any, settings: EvalSettings) -> Tuple[PairSet, ImageData, Any]:
    """The held-out pairs, the test images and the translator at the pairs' size (``sized_for_pairs``)
    of a comparison, every mismatch refused in one line."""
    from ..tracking.datasets import resolve_pairs

    val = load_split(resolve_pairs(str(settings.pairs)), settings.split)
    translator = sized_for_pairs(translator, val)
    family = translator.family
    pair_family = val.settings.get("family")
    if pair_family and pair_family != family.name:
        raise KTError(
            f"the translator is for family {family.name} but the pairs are {pair_family}; "
            f"evaluate on pairs generated with --family {family.name}."
        )
    made_on = str(val.settings.get("dataset", "digits"))
    if settings.dataset and settings.dataset != made_on:
        raise KTError(f"the pairs in {settings.pairs} were generated on dataset {made_on!r}, not "
                      f"{settings.dataset!r}; pass --dataset {made_on} (and its --data-root).")
    data = load_for(family, made_on, settings.data_root, settings.colour, val.settings)
    return val, data, translator


def run_comparison(translator: Any, settings: EvalSettings,
                   prepared: Optional[Tuple[PairSet, ImageData, Any]] = None) -> pd.DataFrame:
    """Translate the pairs' large blocks and compare with the baselines and references, per network
    (``prepared``: what ``prepare_comparison`` returned, when the caller checked it before opening a run)."""
    from ..tracking.datasets import log_image_input

    val, data, translator = prepared or prepare_comparison(translator, settings)
    family = translator.family
    if mlflow.active_run() is not None:
        log_image_input(data, str(val.settings.get("dataset")), settings.data_root, "evaluation")
    large = val.part("large")
    methods = {name: make_baseline(name, family, large, seed=int(settings.seed)) for name in settings.baselines}
    methods[KT_METHOD] = translate_pairs(translator, large)
    return compare_methods(family, val, data, methods, device=pick_device(settings.device))


class KnowledgeTranslationEvaluator(ModelEvaluator):
    """Evaluates a logged KT translator: accuracy of translated small blocks vs baselines (see module doc)."""

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        return model_type == MODEL_TYPE or "pairs" in (evaluator_config or {})

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, extra_metrics=None,
                 custom_artifacts=None, predictions=None, **kwargs) -> EvaluationResult:
        frame = getattr(dataset, "features_data", None)
        settings = EvalSettings.resolve(frame, evaluator_config or {})
        translator = load_translator(model_uri_of(model, settings, kwargs.get("model_id")))
        df = run_comparison(translator, settings)
        logged = log_evaluation(df, prefix=settings.metric_prefix, run_id=run_id)
        config_path = f"{settings.metric_prefix}evaluation_config.json"
        mlflow.MlflowClient().log_dict(run_id, asdict(settings), config_path)
        artifacts = {name: JsonEvaluationArtifact(uri=get_artifact_uri(run_id, path))
                     for name, path in logged.tables.items()}
        artifacts["evaluation_config"] = JsonEvaluationArtifact(uri=get_artifact_uri(run_id, config_path),
                                                                content=asdict(settings))
        artifacts.update({name: TextEvaluationArtifact(uri=get_artifact_uri(run_id, path))
                          for name, path in logged.figures.items()})
        return EvaluationResult(metrics=logged.metrics, artifacts=artifacts, run_id=run_id)


__all__ = ["KnowledgeTranslationEvaluator", "EvalSettings", "MODEL_TYPE", "load_translator", "model_uri_of",
           "prepare_comparison", "run_comparison", "translate_pairs"]
