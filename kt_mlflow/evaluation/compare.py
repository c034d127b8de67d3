"""Compare ways of making small blocks, network by network, against the trained small block.

``compare_methods`` gives one row per (method, network) with that network's test accuracy;
``summary_table`` and ``bucket_counts`` condense it as the KT paper reports results.

Example:
    >>> from kt_mlflow.evaluation.baselines import make_baseline
    >>> methods = {name: make_baseline(name, fam, val.part("large")) for name in ("random", "uniform")}  # doctest: +SKIP
    >>> df = compare_methods(fam, val, data, methods)          # doctest: +SKIP
    >>> summary_table(df).loc["uniform", "gap_closed"]          # doctest: +SKIP
    0.12
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from ..blocks import BlockFamily, check_state
from ..engine import network_accuracy
from ..errors import KTError
from ..pairs.store import PairSet

State = Dict[str, torch.Tensor]

TRAINED, LARGE, RANDOM = "trained", "large", "random"
COLUMNS = ["method", "network", "seed", "accuracy"]


def _check_stacked(family: BlockFamily, name: str, state: Mapping[str, torch.Tensor], n: int) -> None:
    shapes = {k: (n, *v.shape) for k, v in family.small_block().state_dict().items()}
    check_state(state, shapes, f"method {name!r}'s small blocks",
                "return a stacked small-block state dict, one small block per validation network", extra_ok=True)


def method_order(names: List[str]) -> List[str]:
    """Baselines first, then other methods in the given order, then the 'trained' and 'large' references."""
    refs = [n for n in (TRAINED, LARGE) if n in names]
    return [n for n in dict.fromkeys(names) if n not in refs] + refs


def compare_methods(family: BlockFamily, val: PairSet, data, methods: Mapping[str, Mapping[str, torch.Tensor]],
                    device: Optional[torch.device] = None) -> pd.DataFrame:
    """Test accuracy of every validation network with each method's small block in place of its large block.

    Returns columns method, network (position in ``val``), seed, accuracy (%); the methods, then
    'trained' (the small blocks trained in generation, ``val.part('small')``) and 'large' (the base network).

    Example:
        >>> compare_methods(fam, val, data, {"uniform": uniform_selection(fam, val.part("large"))})  # doctest: +SKIP
    """
    n = len(val)
    if n == 0:
        raise KTError("the validation pair set is empty; generate pairs with --n-val above 0.")
    reserved = {TRAINED, LARGE} & set(methods)
    if reserved:
        raise KTError(f"method names {sorted(reserved)} are reserved for the references; rename those methods.")
    begin, last = val.part("begin"), val.part("last")
    accs: Dict[str, torch.Tensor] = {}
    for name, state in methods.items():
        _check_stacked(family, name, state, n)
        accs[name] = network_accuracy(family, begin, dict(state), last, data, which="small", device=device)
    accs[TRAINED] = network_accuracy(family, begin, val.part("small"), last, data, which="small", device=device)
    accs[LARGE] = network_accuracy(family, begin, val.part("large"), last, data, which="large", device=device)
    seeds = [int(r.get("seed", -1)) for r in val.records]
    rows = [
        {"method": name, "network": i, "seed": seeds[i], "accuracy": float(acc[i])}
        for name, acc in accs.items() for i in range(n)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def _methods(df: pd.DataFrame) -> List[str]:
    missing = [c for c in ("method", "accuracy") if c not in df.columns]
    if missing:
        raise KTError(f"comparison table lacks columns {', '.join(missing)}; pass the output of compare_methods.")
    return method_order(list(df["method"]))


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean, std (population, ddof=0), min, max accuracy, n networks, and gap_closed.

    ``gap_closed = (mean_method - mean_random) / (mean_trained - mean_random)``: 0 is no better than a
    random small block, 1 matches the trained one; NaN when 'random' or 'trained' is absent.

    Example:
        >>> df = pd.DataFrame({"method": ["random", "trained", "kt"], "accuracy": [50.0, 90.0, 80.0]})
        >>> float(summary_table(df).loc["kt", "gap_closed"])
        0.75
    """
    order = _methods(df)
    acc = df.groupby("method", sort=False)["accuracy"]
    table = pd.DataFrame({
        "mean": acc.mean(), "std": acc.std(ddof=0), "min": acc.min(), "max": acc.max(), "n": acc.size(),
    }).reindex(order)
    table.index.name = "method"
    lo = table["mean"].get(RANDOM, np.nan)
    hi = table["mean"].get(TRAINED, np.nan)
    span = hi - lo
    table["gap_closed"] = (table["mean"] - lo) / span if np.isfinite(span) and span != 0 else np.nan
    return table


def bucket_labels(width: int = 5) -> List[str]:
    """'0-5', '5-10', ..., '95-100' for ``width=5`` (the last bucket includes 100)."""
    if width <= 0 or 100 % width:
        raise KTError(f"bucket width must divide 100 (e.g. 5 or 10), got {width}.")
    return [f"{lo}-{lo + width}" for lo in range(0, 100, width)]


def bucket_counts(df: pd.DataFrame, width: int = 5) -> pd.DataFrame:
    """How many networks of each method fall in each accuracy bucket: rows buckets, columns methods.

    Example:
        >>> df = pd.DataFrame({"method": ["kt", "kt", "kt"], "accuracy": [91.0, 94.9, 100.0]})
        >>> bucket_counts(df).loc[["90-95", "95-100"], "kt"].tolist()
        [2, 1]
    """
    labels = bucket_labels(width)
    order = _methods(df)
    idx = (df["accuracy"].to_numpy() // width).clip(0, len(labels) - 1).astype(int)
    cats = pd.Categorical.from_codes(idx, categories=labels)
    counts = pd.crosstab(cats, df["method"].to_numpy(), dropna=False)
    counts = counts.reindex(index=labels, columns=order, fill_value=0).astype(int)
    counts.index.name, counts.columns.name = "bucket", "method"
    return counts


__all__ = ["compare_methods", "summary_table", "bucket_counts", "bucket_labels", "method_order", "TRAINED", "LARGE", "RANDOM"]


def to_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """A DataFrame as a Markdown table (index included), for READMEs and logs; no extra dependency."""
    cols = [str(df.index.name or "")] + [str(c) for c in df.columns]
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([fmt(i)] + [fmt(v) for v in row]) + " |" for i, row in zip(df.index, df.to_numpy())]
    return "\n".join(lines)
