"""``evaluate`` as a tracked MLflow step: a registered translator against the data-free baselines."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Dict, Optional, Tuple

import pandas as pd

from ..blocks import BlockFamily, family_spec, is_registered
from ..config import IN_DISTRIBUTION, EvaluateConfig, default_pairs
from ..evaluation.compare import summary_table
from ..evaluation.evaluator import EvalSettings, prepare_comparison, run_comparison
from ..evaluation.plots import log_evaluation
from ..evaluation.suites import log_suites, suite_row
from ..io import atomic_write_json
from ..pairs.generate import GenerationJob
from ..paths import data_home
from ..tracking.datasets import log_pair_input, resolve_pairs
from ..tracking.models import load_translator, model_uri
from ..tracking.runs import log_family, step_run


def run_evaluate(cfg: EvaluateConfig, *, experiment: Optional[str] = None,
                 nested: bool = False) -> Tuple[str, pd.DataFrame]:
    """Evaluate translator ``cfg.model`` on the validation networks of ``cfg.pairs``; returns (run id, summary)."""
    cfg.validate()
    pairs = cfg.pairs or default_pairs(cfg.dataset, cfg.data_root)
    settings = EvalSettings(pairs=pairs, dataset=cfg.dataset, data_root=cfg.data_root, colour=cfg.colour,
                            baselines=cfg.baseline_names, seed=cfg.seed, device=cfg.device)
    settings.check_baselines()
    translator = load_translator(cfg.model)
    prepared = prepare_comparison(translator, settings)   # pairs and images checked before the run opens
    suites = {name: replace(settings, pairs=spec or suite_folder(cfg, name, translator.family))
              for name, spec in cfg.suite_pairs().items()}
    suites_prepared = {name: prepare_comparison(translator, s) for name, s in suites.items()}
    params = {**cfg.as_params(), "pairs": pairs, "model_uri": model_uri(cfg.model)}
    with step_run("evaluate", params, run_name=f"evaluate {cfg.model}", nested=nested, experiment=experiment,
                  family=translator.family.name) as run:
        log_family(translator.family)
        log_pair_input(resolve_pairs(pairs), pairs, "evaluation")
        df = run_comparison(translator, settings, prepared)
        logged = log_evaluation(df)
        summary = summary_table(df)
        with pd.option_context("display.width", 120, "display.precision", 2):
            print(summary.to_string())
        print(f"evaluate: KT closes {logged.metrics.get('gap_closed', float('nan')):.3f} of the gap between a "
              f"random small block and the trained one ({len(df['network'].unique())} held-out networks)")
        if suites:
            _evaluate_suites(translator, pairs, df, suites, suites_prepared)
        return run.info.run_id, summary


def suite_folder(cfg: EvaluateConfig, name: str, family: BlockFamily) -> str:
    """Protocol ``name``'s held-out networks for ``family``, made now unless a previous run made them."""
    if is_registered(family):
        label = family.name
    else:   # a family from a file: stored once as JSON in the data home, so generate can read it
        spec = family_spec(family)
        text = json.dumps(spec, sort_keys=True)
        path = data_home() / "families" / f"{family.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, spec)
        label = str(path)
    job = GenerationJob(cfg.suite_config(name, label))
    print(f"evaluate: suite {name}: held-out networks in {job.folder}")
    job.run()
    return str(job.folder)


def _evaluate_suites(translator, pairs: str, df: pd.DataFrame, suites: Dict[str, EvalSettings], prepared) -> None:
    """Each suite's comparison under ``suite_<name>/``, then the suites table, figure and worst suite."""
    rows = [suite_row(IN_DISTRIBUTION, pairs, df)]
    for name, settings in suites.items():
        log_pair_input(resolve_pairs(settings.pairs), settings.pairs, f"suite {name}")
        suite_df = run_comparison(translator, settings, prepared[name])
        log_evaluation(suite_df, prefix=f"suite_{name}/")
        rows.append(suite_row(name, settings.pairs, suite_df))
    metrics = log_suites(rows)
    with pd.option_context("display.width", 160, "display.precision", 2):
        print(pd.DataFrame(rows).drop(columns="pairs").to_string(index=False))
    print(f"evaluate: worst suite closes {metrics['worst_suite_gap_closed']:.3f} of the gap; "
          f"{int(metrics['suites_below_random'])} held-out network(s) below random init over all suites")
