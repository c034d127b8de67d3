"""The ``kt`` command: one subcommand per MLflow-project entry point, with the same parameter names.

Example:
    kt generate --n-pairs 32 --n-val 8 --dataset digits --output kt-pairs
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional

from .errors import KTError
from .training.recipes import RECIPES


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
    p.add_argument("--workers", type=_int, default=0,
                   help="processes training shards side by side, each with its own --members networks "
                        "(0: one per CPU core; 1 on a GPU)")
    p.add_argument("--kernels", default="auto", choices=("auto", "native", "torch"),
                   help="convolutions: native (CPU kernels built with the C++ compiler, members interleaved), "
                        "torch (grouped convolutions), auto (native on a CPU when they build)")
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
        workers=a.workers, kernels=a.kernels, device=a.device, protocol=Protocol(a.epochs, a.small_epochs, a.lr, a.momentum, a.batch_size, a.flip),
    )
    run_id = run_generate(cfg, experiment=a.experiment_name)
    print(f"generate run: {run_id}")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a translator and register it in MLflow")
    add_common(p)
    p.add_argument("--pairs", default="kt-pairs", help="pair folder or generate run id (runs:/ID)")
    p.add_argument("--arch", default="mixer",
                   help="translator architecture: mixer, mlp or channel_set (used unless the recipe names one)")
    p.add_argument("--recipe", default="paper", help=f"translation recipe: {', '.join(RECIPES)}")
    p.add_argument("--depth", type=_int, default=4, help="layers (paper: 24)")
    p.add_argument("--width", type=_int, default=64, help="embedding width C (paper: 128)")
    p.add_argument("--token-hidden", type=_int, default=128, help="token-mixing hidden width (paper: 256)")
    p.add_argument("--channel-hidden", type=_int, default=256, help="channel-mixing hidden width (paper: 512)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--epochs", type=_int, default=200, help="paper: 300 to 1000")
    p.add_argument("--batch-size", type=_int, default=64, help="paper: 4096 (with 300,000 pairs)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--mask-ratio", type=float, default=0.0, help="random masking probability p")
    p.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise sigma")
    p.add_argument("--augment-on", default="source", help="source, target or both")
    p.add_argument("--val-every", type=_int, default=10, help="epochs between functional validations")
    p.add_argument("--select-holdout", type=_int, default=0,
                   help="training pairs held out to pick the kept epoch (0: pick on the validation networks, "
                        "which then flatters their evaluation)")
    p.add_argument("--functional-bank", type=_int, default=512,
                   help="training images per pair whose begin-block features the functional loss precomputes "
                        "(fewer when the bank would pass 4 GB)")
    p.add_argument("--registered-name", type=_none_or(str), default=None,
                   help="registered model name (default kt-<family>-<arch>)")
    p.set_defaults(func=_train)


def train_config(a: argparse.Namespace):
    from .training.train import TrainConfig

    return TrainConfig(
        arch=a.arch, depth=a.depth, width=a.width, token_hidden=a.token_hidden, channel_hidden=a.channel_hidden,
        dropout=a.dropout, recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        weight_decay=a.weight_decay, mask_ratio=a.mask_ratio, noise_std=a.noise_std, augment_on=a.augment_on,
        val_every=a.val_every, seed=a.seed, device=a.device, select_holdout=a.select_holdout,
        functional_bank=a.functional_bank,
    )


def _train(a: argparse.Namespace) -> None:
    from .training.step import run_train

    run_id, version = run_train(train_config(a), a.pairs, a.dataset, a.data_root, a.registered_name, a.experiment_name)
    print(f"train run: {run_id}")


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="compress a saved base network with a registered translator")
    p.add_argument("--model", required=True, help="registered name, models:/NAME@alias, or runs:/ID/translator")
    p.add_argument("--input", required=True, help="state dict of a trained base network (torch.save or .safetensors)")
    p.add_argument("--output", required=True, help="where to write the compressed network's state dict")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_compress)


def _compress(a: argparse.Namespace) -> None:
    from pathlib import Path

    from .compress import compress_file

    compress_file(a.model, Path(a.input), Path(a.output), a.device)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a registered translator against the baselines")
    add_common(p)
    p.add_argument("--model", default="kt-paper_mnist-mixer", help="registered name or models:/NAME@alias")
    p.add_argument("--pairs", default="kt-pairs", help="pair folder or generate run id (its val split is used)")
    p.add_argument("--baselines", default="random,identity,uniform,l1", help="comma-separated baseline names")
    p.set_defaults(func=_evaluate)


def _evaluate(a: argparse.Namespace) -> None:
    from .evaluation.step import run_evaluate

    run_id, _ = run_evaluate(a.model, a.pairs, a.dataset, a.data_root, a.seed,
                             [b for b in a.baselines.split(",") if b], a.device, a.experiment_name)
    print(f"evaluate run: {run_id}")


def _main_parser(sub) -> None:
    p = sub.add_parser("main", help="the whole pipeline: generate -> train -> evaluate (child runs, reused)")
    add_common(p)
    p.add_argument("--family", default="paper_mnist")
    p.add_argument("--n-pairs", type=_int, default=64)
    p.add_argument("--n-val", type=_int, default=16)
    p.add_argument("--gen-epochs", type=_int, default=6, help="epochs for each network and small block")
    p.add_argument("--members", type=_int, default=16)
    p.add_argument("--recipe", default="best")
    p.add_argument("--epochs", type=_int, default=200, help="translator epochs")
    p.add_argument("--batch-size", type=_int, default=16, help="translator batch size (pairs per step)")
    p.add_argument("--registered-name", type=_none_or(str), default=None)
    p.set_defaults(func=_main)


def _main(a: argparse.Namespace) -> None:
    from .pairs.generate import GenerateConfig
    from .pairs.trainer import Protocol
    from .pipeline import run_main
    from .training.train import TrainConfig

    gen = GenerateConfig(output="kt-pairs", family=a.family, dataset=a.dataset, data_root=a.data_root,
                         n_pairs=a.n_pairs, n_val=a.n_val, seed=a.seed, members=a.members, device=a.device,
                         protocol=Protocol(epochs=a.gen_epochs, small_epochs=a.gen_epochs))
    train = TrainConfig(recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, device=a.device,
                        val_every=10)
    run_main(gen, train, a.registered_name, a.experiment_name)


def _sweep_parser(sub) -> None:
    from .sweep.step import add_parser

    add_parser(sub)


PARSERS: List[Callable] = [_generate_parser, _train_parser, _evaluate_parser, _sweep_parser, _compress_parser,
                           _main_parser]


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
