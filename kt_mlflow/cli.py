"""The ``kt`` command: one subcommand per MLflow-project entry point, with the same parameter names.

Example:
    kt generate --n-pairs 32 --n-val 8 --dataset digits --output kt-pairs
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from .errors import KTError


def _none_or(kind: Callable):
    """MLflow-project params cannot be absent; '' and 'none' mean 'not given'."""
    def parse(text: str):
        return None if text in ("", "none", "None") else kind(text)
    return parse


def _int(text: str) -> int:
    """An integer; MLflow passes its float-typed params as e.g. '3.0'."""
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_common(p: argparse.ArgumentParser) -> None:
    """Parameters that mean the same in every step."""
    p.add_argument("--dataset", default="digits", help="digits (bundled, offline) or mnist")
    p.add_argument("--data-root", type=_none_or(str), default=None, help="folder with MNIST IDX files")
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--experiment-name", type=_none_or(str), default=None, help="MLflow experiment")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="train translation pairs (large block, small block)")
    add_common(p)
    p.add_argument("--output", default="kt-pairs", help="pair folder (resumed if it exists)")
    p.add_argument("--family", default="paper_mnist", help="block family (language pair)")
    p.add_argument("--n-pairs", type=_int, default=32, help="training pairs in the whole dataset")
    p.add_argument("--n-val", type=_int, default=8, help="held-out validation networks")
    p.add_argument("--start-index", type=_int, default=0, help="first global pair index of this worker")
    p.add_argument("--count", type=_none_or(_int), default=None, help="pairs for this worker (default: all)")
    p.add_argument("--members", type=_int, default=16, help="networks trained at once (= pairs per shard)")
    p.add_argument("--epochs", type=_int, default=3, help="base-network epochs (paper: 10)")
    p.add_argument("--small-epochs", type=_int, default=3, help="small-block epochs (paper: 10)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=_int, default=128)
    p.add_argument("--flip", type=_bool, default=True, help="random horizontal flips")
    p.set_defaults(func=_generate)


def _generate(a: argparse.Namespace) -> None:
    from .pairs.generate import GenerateConfig
    from .pairs.step import run_generate
    from .pairs.trainer import Protocol

    cfg = GenerateConfig(
        output=a.output, family=a.family, dataset=a.dataset, data_root=a.data_root, n_pairs=a.n_pairs,
        n_val=a.n_val, seed=a.seed, start_index=a.start_index, count=a.count, members=a.members,
        device=a.device, protocol=Protocol(a.epochs, a.small_epochs, a.lr, a.momentum, a.batch_size, a.flip),
    )
    run_id = run_generate(cfg, experiment=a.experiment_name)
    print(f"generate run: {run_id}")


PARSERS: List[Callable] = [_generate_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kt", description="Knowledge Translation with MLflow")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KTError as e:
        print(f"kt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
