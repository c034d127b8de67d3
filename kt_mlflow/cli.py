"""The ``kt`` command: one subcommand per step, its flags built from the step's config dataclass.

``--n-pairs`` is the field ``n_pairs`` of ``GenerateConfig``, with that field's default and help; the
MLproject entry points take the same names. Nothing heavy is imported until a step runs, so
``kt --help`` answers at once.

Example:
    kt generate --n-pairs 64 --n-val 16
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Dict, List, Optional

from . import __version__
from .config import (
    CompressConfig,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    MainConfig,
    RegisterConfig,
    SweepConfig,
    TrainConfig,
)
from .distributed import process_group, world
from .errors import KTError


@dataclass(frozen=True)
class Step:
    config: type
    run: str        # "module:function", imported when the step runs
    help: str
    example: str
    tracked: bool = True   # opens an MLflow run (and takes --experiment-name)
    distributed: bool = False  # may run as a torchrun job of many ranks


STEPS: Dict[str, Step] = {
    "generate": Step(GenerateConfig, "steps.generate:run_generate",
                     "train translation pairs (large block, small block), K networks at once",
                     "kt generate --n-pairs 64 --n-val 16", distributed=True),
    "train": Step(TrainConfig, "steps.train:run_train", "train a translator on pairs and register it in MLflow",
                  "kt train --pairs <generate run id> --recipe best", distributed=True),
    "evaluate": Step(EvaluateConfig, "steps.evaluate:run_evaluate",
                     "compare a registered translator with the data-free baselines on held-out networks",
                     "kt evaluate --model kt-paper_mnist-channel_set --pairs <generate run id>"),
    "sweep": Step(SweepConfig, "steps.sweep:run_sweep",
                  "Optuna study over translators; workers with the same study and storage cooperate",
                  "kt sweep --pairs <generate run id> --n-trials 8 --storage postgresql://USER@HOST/DB",
                  distributed=True),
    "register": Step(RegisterConfig, "steps.register:run_register",
                     "log and register a translator saved on disk (one kt train kept when it could not log it)",
                     "kt register --translator ~/.cache/kt-mlflow/translators/NAME-TIME"),
    "main": Step(MainConfig, "steps.main:run_main", "the quickstart: generate -> train -> evaluate as child runs",
                 "kt main"),
    "finetune": Step(FinetuneConfig, "steps.finetune:run_finetune",
                     "compress a saved base network, then fine-tune its small block on data beside random init "
                     "and selection", "kt finetune --model kt-paper_mnist-channel_set --input model.pt --output small.pt"),
    "compress": Step(CompressConfig, "steps.compress:run_compress",
                     "compress a saved base network with a registered translator (data-free)",
                     "kt compress --model kt-paper_mnist-channel_set --input model.pt --block layer1.0 --output small.pt",
                     tracked=False),
}


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """MLflow-project params cannot be absent; '' and 'none' mean 'not given'."""
    def parse(text: str) -> Any:
        return None if text in ("", "none", "None") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _int(text: str) -> int:
    """A whole number; MLflow passes its float-typed params as e.g. '3.0'."""
    try:
        value = float(text)
        if value == int(value):
            return int(value)
    except (ValueError, OverflowError):
        pass
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_PARSERS = {"int": _int, "float": float, "str": str, "bool": _bool}


def field_parser(annotation: str) -> Callable[[str], Any]:
    """The argparse type of a config field from its annotation ('int', 'Optional[float]', ...)."""
    if annotation.startswith("Optional["):
        return _none_or(_PARSERS[annotation[len("Optional["):-1]])
    return _PARSERS[annotation]


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line, as every other error is (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help).\n")


def _add_step(sub: argparse._SubParsersAction, name: str, step: Step) -> None:
    p = sub.add_parser(name, help=step.help, description=step.help, epilog=f"example: {step.example}",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(step.config):
        kwargs: Dict[str, Any] = {"type": field_parser(str(f.type)), "help": f.metadata.get("help") or " ",
                                  "dest": f.name}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        p.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    if step.tracked:
        p.add_argument("--experiment-name", type=_none_or(str), default=None,
                       help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else kt-<family>)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kt", description="Knowledge Translation (arXiv 2401.05772) with MLflow: compress a network's block "
                               "into a smaller one with a trained translator, no retraining.",
        epilog="examples:\n" + "\n".join(f"  {s.example}" for s in STEPS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kt-mlflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, step in STEPS.items():
        _add_step(sub, name, step)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    """The step's config dataclass from parsed arguments."""
    config = STEPS[args.command].config
    return config(**{f.name: getattr(args, f.name) for f in fields(config)})


def _runner(step: Step) -> Callable[..., Any]:
    module, function = step.run.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    step = STEPS[args.command]
    try:
        cfg = config_from_args(args)
        cfg.validate()
        if world().distributed and not step.distributed:
            raise KTError("runs in one process; start it without torchrun (generate, train and sweep take torchrun).")
        if (step.tracked or args.command == "compress") and world().is_main:
            from .tracking.server import check_tracking_server

            check_tracking_server()
        run = _runner(step)
        with process_group():
            result = run(cfg, experiment=args.experiment_name) if step.tracked else run(cfg)
    except KTError as e:
        rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None
        if not e.shown:
            print(f"kt {args.command}{f' (rank {rank})' if rank else ''}: error: {e}", file=sys.stderr)
        return 2
    if step.tracked and world().is_main:
        run_id = result[0] if isinstance(result, tuple) else result
        print(f"{args.command} run: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
