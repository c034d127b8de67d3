"""``evaluate`` as a tracked MLflow step: a registered translator against the data-free baselines."""
from __future__ import annotations

from typing import Optional, Tuple

import pandas as pd

from ..config import EvaluateConfig, default_pairs
from ..evaluation.compare import summary_table
from ..evaluation.evaluator import EvalSettings, prepare_comparison, run_comparison
from ..evaluation.plots import log_evaluation
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
        return run.info.run_id, summary
