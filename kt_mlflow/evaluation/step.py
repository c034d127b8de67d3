"""``evaluate`` as a tracked MLflow step: a registered translator against the data-free baselines."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pandas as pd

from ..tracking.datasets import log_pair_input, resolve_pairs
from ..tracking.models import load_translator, model_uri
from ..tracking.runs import step_run
from .compare import summary_table
from .evaluator import DEFAULT_BASELINES, EvalSettings, run_comparison
from .plots import log_evaluation


def run_evaluate(model: str, pairs: str, dataset: str = "digits", data_root: Optional[str] = None, seed: int = 0,
                 baselines: Sequence[str] = DEFAULT_BASELINES, device: str = "auto",
                 experiment: Optional[str] = None, nested: bool = False) -> Tuple[str, pd.DataFrame]:
    """Evaluate translator ``model`` on the validation networks of ``pairs``; returns (run id, summary)."""
    settings = EvalSettings(pairs=pairs, dataset=dataset, data_root=data_root, baselines=list(baselines),
                            seed=seed, device=device)
    params = {"model": model, "model_uri": model_uri(model), "pairs": pairs, "dataset": dataset,
              "data_root": data_root, "seed": seed, "baselines": ",".join(baselines), "device": device}
    with step_run("evaluate", params, run_name="evaluate", nested=nested, experiment=experiment) as run:
        translator = load_translator(model)
        log_pair_input(resolve_pairs(pairs), pairs, "evaluation")
        df = run_comparison(translator, settings)
        logged = log_evaluation(df)
        summary = summary_table(df)
        with pd.option_context("display.width", 120, "display.precision", 2):
            print(summary.to_string())
        print(f"evaluate: KT closes {logged.metrics.get('gap_closed', float('nan')):.3f} of the gap between a "
              f"random small block and the trained one ({len(df['network'].unique())} held-out networks)")
        return run.info.run_id, summary
