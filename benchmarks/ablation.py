"""Translation-quality ablation: the paper's recipe, each improvement alone, and all together.

Every recipe trains the same translator architecture on the same pairs with the same budget, and is
evaluated on the same held-out networks next to the data-free baselines; then the fine-tuning curves
compare the translation with random init and weight selection as a starting point. Everything is
logged to one MLflow run (tables + plotly figures) and printed as Markdown.

    python benchmarks/ablation.py --pairs PAIRS --dataset mnist    # the MNIST test set bundled with kt_mlflow
"""
from __future__ import annotations

import argparse
import sys
import time

import mlflow
import pandas as pd
import plotly.graph_objects as go

from kt_mlflow.blocks import create_family
from kt_mlflow.config import PairSchedule, TrainConfig
from kt_mlflow.data import load_dataset
from kt_mlflow.device import pick_device
from kt_mlflow.evaluation.baselines import make_baseline
from kt_mlflow.evaluation.compare import compare_methods, summary_table, to_markdown
from kt_mlflow.evaluation.finetune import finetune_curves, finetune_figure
from kt_mlflow.recipes import RECIPES
from kt_mlflow.tracking.datasets import load_pair_splits
from kt_mlflow.tracking.figures import log_figure
from kt_mlflow.training.train import train_translator

BASELINES = ("random", "identity", "uniform", "l1")


def bar_figure(summary: pd.DataFrame) -> go.Figure:
    fig = go.Figure(go.Bar(x=summary.index, y=summary["mean"],
                           error_y=dict(type="data", symmetric=False, array=summary["max"] - summary["mean"],
                                        arrayminus=summary["mean"] - summary["min"]),
                           text=[f"{g:.2f}" if pd.notna(g) else "" for g in summary["gap_closed"]]))
    fig.update_layout(title="Held-out accuracy per method (bars: mean, whiskers: min-max, label: gap closed)",
                      yaxis_title="test accuracy (%)")
    return fig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--task-bank", type=int, default=TrainConfig.task_bank,
                   help="training images per pair whose begin-block features the task loss keeps")
    p.add_argument("--finetune-epochs", default="0,1,2,5")
    p.add_argument("--finetune-from", default="best", help="recipe whose translation starts the fine-tuning")
    p.add_argument("--select-holdout", type=int, default=16,
                   help="training pairs held out to pick each translator's best epoch (0: pick on the evaluation "
                        "networks themselves, which flatters every row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.finetune_from not in a.recipes.split(","):
        p.error(f"--finetune-from {a.finetune_from} is not among --recipes {a.recipes}; add it or pick one of those.")
    print("command: python benchmarks/ablation.py " + " ".join(sys.argv[1:]), flush=True)

    _, train, val = load_pair_splits(a.pairs, a.dataset)
    family = create_family(train.settings["family"])
    data = load_dataset(a.dataset, a.data_root)
    device = pick_device(a.device)
    large = val.part("large")
    methods = {name: make_baseline(name, family, large, seed=a.seed) for name in BASELINES}
    mlflow.set_experiment("kt-ablation")
    with mlflow.start_run(run_name="ablation"):
        mlflow.log_params({**vars(a), "n_train_pairs": len(train) - a.select_holdout, "n_val": len(val)})
        for recipe in a.recipes.split(","):
            cfg = TrainConfig(recipe=recipe, epochs=a.epochs, batch_size=a.batch_size, depth=a.depth,
                              width=a.width, token_hidden=2 * a.width, channel_hidden=4 * a.width,
                              val_every=a.val_every, seed=a.seed, device=a.device, select_holdout=a.select_holdout,
                              task_bank=a.task_bank)
            start = time.perf_counter()
            result = train_translator(cfg, family, train, val, data)
            methods[f"kt_{recipe}"] = result.translator.translate_batch(large)
            mlflow.log_metric(f"kt_{recipe}_train_seconds", time.perf_counter() - start)
            print(f"{recipe}: best selection-set mean {result.best['val_acc_mean']:.2f} (epoch "
                  f"{int(result.best['epoch']) + 1}) in {time.perf_counter() - start:.0f} s",
                  flush=True)
        df = compare_methods(family, val, data, methods, device=device)
        summary = summary_table(df)
        mlflow.log_table(df, "ablation_per_network.json")
        mlflow.log_table(summary.reset_index(), "ablation_summary.json")
        log_figure(bar_figure(summary), "ablation.html")
        for method, row in summary.iterrows():
            mlflow.log_metrics({f"{method}_acc_mean": row["mean"], f"{method}_gap_closed": row["gap_closed"]})

        epochs = [int(e) for e in a.finetune_epochs.split(",")]
        inits = {"translation": methods[f"kt_{a.finetune_from}"], "random": methods["random"],
                 "uniform": methods["uniform"]}
        curves = finetune_curves(family, val, data, inits, epochs, PairSchedule(), device)
        mlflow.log_table(curves, "finetune_per_network.json")
        log_figure(finetune_figure(curves), "finetune.html")
        table = curves.groupby(["method", "epoch"])["accuracy"].mean().unstack("epoch")

    below = int((df[df.method == f"kt_{a.finetune_from}"].set_index("network")["accuracy"]
                 < df[df.method == "random"].set_index("network")["accuracy"]).sum())
    print("\n" + to_markdown(summary[["mean", "std", "min", "max", "gap_closed"]]))
    print(f"\nheld-out networks where kt_{a.finetune_from} is below random init: {below} of {len(val)}")
    print("\nfine-tuning (mean accuracy, % after N epochs):\n" + to_markdown(table))


if __name__ == "__main__":
    main()
