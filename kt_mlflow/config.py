"""Every step's parameters, declared once: one dataclass per step, fields with their help text.

The ``kt`` command builds its flags from these fields (``--n-pairs`` from ``n_pairs``), the MLproject
entry points list the same names and defaults (a test holds them together), and each run logs
``as_params()``. This module imports no torch and no mlflow, so ``kt --help`` answers at once.

Example:
    >>> cfg = GenerateConfig(n_pairs=8, n_val=4)
    >>> cfg.validate()
    >>> cfg.as_params()["n_pairs"]
    8
"""
from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import KTError
from .family_file import looks_like_file
from .io import check_output_file, check_output_folder
from .paths import pairs_folder
from .protocols import ALL_SHIFTED, BASE_PROTOCOL, PROTOCOLS
from .recipes import RECIPES, get_recipe

AUGMENT_ON = ("source", "target", "both")
KERNELS = ("auto", "native", "torch")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
DEFAULT_BASELINES = ("random", "identity", "uniform", "l1")
ARCHS = ("mixer", "mlp", "channel_set")  # the translator registry's names (a test holds them equal)
SUITE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
IN_DISTRIBUTION = "in_distribution"   # the suite name of --pairs itself
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")  # what kt_mlflow.data reads


def option(default: Any = MISSING, help: str = "", choices: Optional[tuple] = None) -> Any:
    """A config field with the help text (and allowed values) its CLI flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_min(cfg: Any, names: str, low: float) -> None:
    for name in names.split():
        value = getattr(cfg, name)
        if value is not None and not value >= low:
            raise KTError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value}.")


def _check_choice(cfg: Any) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise KTError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                          f"got {getattr(cfg, f.name)!r}.")


def check_model_name(name: Optional[str], flag: str = "--registered-name") -> None:
    """MLflow's rules for a registered model name, checked before any work instead of after training."""
    if name is None:
        return
    norm = posixpath.normpath(name)
    if not name.strip() or "/" in name or ":" in name or norm != name or norm.startswith(".."):
        raise KTError(f"{flag} {name!r} is not a name MLflow accepts (no '/', ':' or '..', not empty); "
                      f"use e.g. kt-my-translator.")


class StepConfig:
    """What every step config does: check itself, and turn into MLflow params."""

    def validate(self) -> None:
        _check_choice(self)

    def as_params(self) -> Dict[str, Any]:
        return asdict(self)


OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class PairSchedule:
    """How one pair is trained (arXiv 2401.05772's pair training: SGD 0.01, momentum 0.9, batch 128, flips, 10 epochs)."""

    epochs: int = 3
    small_epochs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 128
    flip: bool = True
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"

    def as_params(self) -> Dict[str, Any]:
        """Every field; those added after pair sets were first recorded only when not at their default,
        so earlier sets keep their settings (and folders)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _LATER_FIELDS or getattr(self, f.name) != f.default}


_LATER_FIELDS = ("optimizer", "weight_decay", "lr_schedule")


@dataclass
class DataOptions(StepConfig):
    """Parameters that mean the same in every step."""

    dataset: str = option("mnist", "images: mnist (the bundled 10,000 real test images unless --data-root), digits, "
                                   "fashion_mnist, cifar10 or imagefolder (these three read --data-root)", DATASETS)
    data_root: Optional[str] = option(None, "folder with the dataset's files in torchvision's layout (downloaded "
                                            "there when empty), or class folders of images for imagefolder")
    colour: bool = option(False, "give each grayscale image random foreground and background colours (MNIST digits "
                                 "in colour, for RGB families such as rgb32)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu or cuda[:N]")


@dataclass
class GenerateConfig(DataOptions):
    output: Optional[str] = option(None, "pair folder (resumed if it exists; default: derived from the settings, "
                                         "under $KT_HOME/pairs)")
    family: str = option("paper_mnist", "block family: a registered name or a YAML/JSON family file")
    n_pairs: int = option(32, "training pairs in the whole pair set")
    n_val: int = option(8, "held-out validation networks")
    start_index: int = option(0, "first global pair index of this worker")
    count: Optional[int] = option(None, "pairs for this worker (default: all)")
    members: int = option(16, "networks trained at once (= pairs per shard)")
    workers: int = option(0, "processes training shards side by side (0: one per CPU core; 1 on a GPU)")
    kernels: str = option("auto", "convolutions: native (CPU kernels, members interleaved), torch (grouped), "
                                  "auto (native on a CPU where they build)", KERNELS)
    epochs: int = option(3, "base-network epochs (paper: 10)")
    small_epochs: int = option(3, "small-block epochs (paper: 10)")
    lr: float = option(0.01, "learning rate of each network (Adam and AdamW want about 0.001)")
    momentum: float = option(0.9, "SGD momentum")
    batch_size: int = option(128, "images per training step")
    flip: bool = option(True, "random horizontal flips")
    optimizer: str = option("sgd", "how each network is trained: sgd (the paper's), adam or adamw", OPTIMIZERS)
    weight_decay: float = option(0.0, "weight decay of each network's optimiser")
    lr_schedule: str = option("constant", "learning rate over each network's steps: constant or cosine (to 0)",
                              LR_SCHEDULES)

    protocols: str = option("", "a mixture: each shard trained by one of these protocols, drawn by its seed "
                                "(comma-separated names of kt_mlflow/protocols.py, 'base' for the options above, "
                                "'shifted' for all but other_seeds); empty: the options above for every pair")

    @property
    def schedule(self) -> PairSchedule:
        return PairSchedule(self.epochs, self.small_epochs, self.lr, self.momentum, self.batch_size, self.flip,
                            self.optimizer, self.weight_decay, self.lr_schedule)

    def protocol_names(self) -> List[str]:
        """``--protocols`` as a list of names (empty: no mixture)."""
        names: List[str] = []
        for name in (n.strip() for n in self.protocols.split(",") if n.strip()):
            expanded = [p for p in PROTOCOLS if "seed_offset" not in PROTOCOLS[p]] if name == ALL_SHIFTED else [name]
            for n in expanded:
                if n != BASE_PROTOCOL and (n not in PROTOCOLS or "seed_offset" in PROTOCOLS[n]):
                    raise KTError(f"--protocols {n!r} is no training protocol of a pair; name some of {BASE_PROTOCOL}, "
                                  f"{', '.join(p for p in PROTOCOLS if 'seed_offset' not in PROTOCOLS[p])} or {ALL_SHIFTED}.")
                if n in names:
                    raise KTError(f"--protocols names {n!r} twice; give each once.")
                names.append(n)
        return names

    def protocol_schedule(self, name: str) -> PairSchedule:
        """How a pair of protocol ``name`` is trained: these options with the protocol's over them."""
        return self.schedule if name == BASE_PROTOCOL else replace(self.schedule, **PROTOCOLS[name])

    def settings(self) -> Dict[str, Any]:
        """What makes pairs comparable: two runs with equal settings write interchangeable shards."""
        colour = {"colour": True} if self.colour else {}  # absent when off: earlier pair sets keep their digests
        mixture = {"protocols": ",".join(self.protocol_names())} if self.protocols else {}
        return {"family": self.family, "dataset": self.dataset, **colour, "seed": self.seed, **self.schedule.as_params(),
                **mixture}

    def folder(self) -> str:
        """``output``, or the folder these settings own in the data home (same settings, same folder)."""
        if self.output:
            return self.output
        settings = {**self.settings(), "data_root": self.data_root or "", "n_pairs": self.n_pairs,
                    "n_val": self.n_val, "members": self.members}
        label = self.family
        if looks_like_file(self.family):   # a family file: its name and its content make the folder
            label, path = Path(self.family).stem, Path(self.family).expanduser()
            settings["family_file"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        return str(pairs_folder(settings, label, self.dataset))

    def validate(self) -> None:
        super().validate()
        _check_min(self, "n_pairs n_val start_index workers", 0)
        _check_min(self, "members count epochs small_epochs batch_size", 1)
        if self.n_pairs + self.n_val == 0:
            raise KTError("nothing to generate: set --n-pairs and/or --n-val above 0.")
        if self.start_index >= self.n_pairs + self.n_val:
            raise KTError(f"--start-index {self.start_index} is past the last pair ({self.n_pairs + self.n_val - 1}).")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KTError(f"--lr must be a finite number > 0, got {self.lr}.")
        if not (0 <= self.momentum < 1):
            raise KTError(f"--momentum must be in [0, 1), got {self.momentum}.")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise KTError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}.")
        self.protocol_names()
        if self.output:
            check_output_folder(Path(self.output), "--output")

    def as_params(self) -> Dict[str, Any]:
        return {**asdict(self), "output": self.folder()}


def default_pairs(dataset: str, data_root: Optional[str]) -> str:
    """The pair folder that ``kt generate`` fills with its default settings on this dataset."""
    return GenerateConfig(dataset=dataset, data_root=data_root).folder()


@dataclass
class ArchOptions(StepConfig):
    """The translator and how it is trained, where a sweep keeps them fixed."""

    arch: str = option("", "translator architecture: mixer, mlp or channel_set (default: the recipe's, else mixer)")
    recipe: str = option("paper", "translation recipe (docs/recipes.md)", tuple(RECIPES))
    dropout: float = option(0.1, "translator dropout")
    batch_size: int = option(64, "pairs per step (paper: 4096 with 300,000 pairs)")
    weight_decay: float = option(0.0, "Adam weight decay")
    augment_on: str = option("source", "where masking and noise apply", AUGMENT_ON)
    val_every: int = option(10, "epochs between validations (the sweep's pruning points)")
    select_holdout: int = option(0, "training pairs held out to pick the kept epoch (0: pick on the validation "
                                    "networks, which then flatters their evaluation)")
    task_bank: int = option(512, "training images per pair whose begin-block features the task loss keeps (fewer "
                                 "past 4 GB; below 16 per pair none, and each step computes its features)")
    task_pairs: int = option(64, "pairs per step that get the task loss")
    task_images: int = option(64, "training images per step for the task loss")
    pairs: Optional[str] = option(None, "pair folder or generate run id (default: the folder `kt generate` "
                                        "fills with its default settings); several, comma-separated, of one "
                                        "family at different hidden widths: one translator for every size")
    registered_name: Optional[str] = option(None, "registered model name (default kt-<family>-<arch>)")

    @staticmethod
    def pair_specs(pairs: str) -> List[str]:
        """``--pairs`` as a list: one pair set, or several (comma-separated)."""
        specs = [p.strip() for p in pairs.split(",")]
        if not all(specs):
            raise KTError(f"--pairs {pairs!r} has an empty item; give pair folders or run ids separated by commas.")
        return specs

    @property
    def resolved_arch(self) -> str:
        """The architecture trained: the recipe's when it needs one, else ``arch``."""
        return get_recipe(self.recipe).arch or self.arch or ARCHS[0]

    def validate(self) -> None:
        super().validate()
        get_recipe(self.recipe)
        if self.arch and self.arch not in ARCHS:
            raise KTError(f"unknown --arch {self.arch!r}; choose one of: {', '.join(ARCHS)} (or leave it empty).")
        _check_min(self, "batch_size val_every task_bank task_pairs task_images", 1)
        _check_min(self, "select_holdout weight_decay", 0)
        if self.pairs:
            self.pair_specs(self.pairs)
        if not 0.0 <= self.dropout < 1.0:
            raise KTError(f"--dropout must be in [0, 1), got {self.dropout}.")
        check_model_name(self.registered_name)


@dataclass
class TrainConfig(DataOptions, ArchOptions):
    depth: int = option(4, "translator layers (paper: 24)")
    width: int = option(64, "embedding width C (paper: 128)")
    token_hidden: int = option(128, "token-mixing hidden width (paper: 256)")
    channel_hidden: int = option(256, "channel-mixing hidden width (paper: 512)")
    epochs: int = option(200, "translator epochs (paper: 300 to 1000)")
    lr: float = option(1e-3, "Adam learning rate")
    mask_ratio: float = option(0.0, "random masking probability p")
    noise_std: float = option(0.0, "Gaussian noise sigma")

    def arch_kwargs(self) -> Dict[str, Any]:
        kw: Dict[str, Any] = {"depth": self.depth, "width": self.width, "dropout": self.dropout}
        if self.resolved_arch == "mixer":
            kw.update(token_hidden=self.token_hidden, channel_hidden=self.channel_hidden)
        elif self.resolved_arch == "channel_set":
            kw.update(channel_hidden=self.channel_hidden)
        return kw

    def validate(self) -> None:
        super().validate()
        _check_min(self, "depth width token_hidden channel_hidden epochs", 1)
        _check_min(self, "noise_std", 0)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise KTError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KTError(f"--lr must be a finite number > 0, got {self.lr}.")

    def as_params(self) -> Dict[str, Any]:
        return {**asdict(self), **get_recipe(self.recipe).as_params(), "arch": self.resolved_arch}


@dataclass
class EvaluateConfig(DataOptions):
    model: str = option("kt-paper_mnist-channel_set", "registered name, models:/NAME@alias or runs:/ID/translator")
    pairs: Optional[str] = option(None, "pair folder or generate run id whose val networks are evaluated "
                                        "(default: the folder `kt generate` fills with its default settings)")
    baselines: str = option(",".join(DEFAULT_BASELINES), "comma-separated baselines: random, identity, uniform, l1")
    suites: str = option("", "held-out networks trained other ways, scored in the same run: protocol names "
                             "(or 'shifted' for all) and NAME=PAIRS items, comma-separated (docs/usage.md#shifted-suites)")
    suite_networks: int = option(32, "held-out networks per named protocol suite")

    @property
    def baseline_names(self) -> List[str]:
        return [b for b in self.baselines.split(",") if b]

    def suite_pairs(self) -> Dict[str, Optional[str]]:
        """``--suites`` as {name: pairs}, in the order given; pairs None: a named protocol's held-out
        networks (``protocols.PROTOCOLS``), made when not there yet."""
        out: Dict[str, Optional[str]] = {}
        for item in (i.strip() for i in self.suites.split(",") if i.strip()):
            name, sep, pairs = item.partition("=")
            named = [] if sep else list(PROTOCOLS) if name == ALL_SHIFTED else [name]
            if not sep and not set(named) <= set(PROTOCOLS):
                raise KTError(f"--suites {name!r} is no protocol; name one of {', '.join(PROTOCOLS)} (or "
                              f"{ALL_SHIFTED} for all), or give NAME=PAIRS.")
            if sep and (not pairs or not SUITE_NAME.match(name) or name == IN_DISTRIBUTION):
                raise KTError(f"--suites item {item!r} is not NAME=PAIRS with a name of letters, digits, "
                              f"'_', '-' or '.' (not {IN_DISTRIBUTION!r}); e.g. --suites adam=<run id>,long=<folder>.")
            for n in named or [name]:
                if n in out:
                    raise KTError(f"--suites names {n!r} twice; give each suite once.")
                out[n] = pairs if sep else None
        return out

    def suite_config(self, name: str, family: str) -> GenerateConfig:
        """The ``kt generate`` settings of protocol ``name``'s held-out networks for ``family``."""
        options = dict(PROTOCOLS[name])
        seed = self.seed + int(options.pop("seed_offset", 0))
        return GenerateConfig(dataset=self.dataset, data_root=self.data_root, colour=self.colour, device=self.device,
                              seed=seed, family=family, n_pairs=0, n_val=self.suite_networks, **options)

    def validate(self) -> None:
        super().validate()
        _check_min(self, "suite_networks", 1)
        self.suite_pairs()


@dataclass
class SweepConfig(DataOptions, ArchOptions):
    study_name: str = option("kt-sweep", "Optuna study; workers with the same name and storage cooperate")
    storage: Optional[str] = option(None, "Optuna storage: sqlite:///FILE (one machine) or postgresql://USER@HOST/DB "
                                          "(many; default: SQLite in $KT_HOME)")
    n_trials: Optional[int] = option(20, "trials run by this worker ('' = no limit)")
    timeout: Optional[float] = option(None, "seconds this worker starts trials for")
    sampler: str = option("tpe", "Optuna sampler (seeded by --seed + --worker)", SAMPLERS)
    pruner: str = option("median", "pruner of trials on their validation scores", PRUNERS)
    pruner_startup_trials: int = option(2, "trials before the median pruner prunes")
    worker: int = option(0, "index of this worker (gives it its own sampler seed)")
    heartbeat_interval: int = option(10, "seconds between trial heartbeats")
    grace_period: Optional[int] = option(None, "seconds without heartbeat before a trial fails (default 2 x interval)")
    max_retry: int = option(3, "times a failed (killed) trial is re-queued")
    depth_min: int = option(2, "translator layers searched from")
    depth_max: int = option(8, "translator layers searched to (paper: 24)")
    width_min: int = option(32, "embedding width searched log-uniformly from")
    width_max: int = option(128, "embedding width searched to (paper: 128)")
    width_choices: str = option("", "e.g. 32,64,128: search these widths instead of min..max")
    token_mult: int = option(2, "token_hidden = token_mult x width")
    channel_mult: int = option(4, "channel_hidden = channel_mult x width")
    mask_max: float = option(0.3, "mask ratio searched in [0, mask-max]")
    noise_max: float = option(0.05, "noise sigma searched in [0, noise-max]")
    epochs_min: int = option(20, "translator epochs searched from")
    epochs_max: int = option(200, "translator epochs searched to (paper: 300 to 1000)")
    lr_min: float = option(1e-3, "learning rate searched log-uniformly from")
    lr_max: float = option(1e-3, "learning rate searched to")

    def width_options(self) -> Optional[List[int]]:
        """The widths of --width-choices, sorted, or None to search --width-min..--width-max."""
        text = self.width_choices.replace(";", ",").strip()
        if not text or text.lower() == "none":
            return None
        try:
            return sorted({int(float(v)) for v in text.split(",") if v.strip()})
        except ValueError:
            raise KTError(f"--width-choices must be whole numbers separated by commas, got {text!r}.") from None

    def validate(self) -> None:
        super().validate()
        if self.pairs and len(self.pair_specs(self.pairs)) > 1:
            raise KTError("kt sweep searches on one pair set; pass one --pairs (kt train takes several sizes).")
        for name, low in (("depth", 1), ("epochs", 1), ("width", 1)):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo < low:
                raise KTError(f"--{name}-min must be >= {low}, got {lo}.")
            if lo > hi:
                raise KTError(f"--{name}-min ({lo}) is larger than --{name}-max ({hi}); swap them.")
        if self.width_options() is not None and (not self.width_options() or min(self.width_options()) < 1):
            raise KTError(f"--width-choices must be positive whole numbers, got {self.width_choices!r}.")
        if not (self.lr_min > 0 and math.isfinite(self.lr_max)):
            raise KTError(f"--lr-min must be > 0 and --lr-max finite, got {self.lr_min} and {self.lr_max}.")
        if self.lr_min > self.lr_max:
            raise KTError(f"--lr-min ({self.lr_min}) is larger than --lr-max ({self.lr_max}); swap them.")
        if not 0.0 <= self.mask_max < 1.0:
            raise KTError(f"--mask-max must be in [0, 1) (a mask ratio), got {self.mask_max}.")
        if not (self.noise_max >= 0 and math.isfinite(self.noise_max)):
            raise KTError(f"--noise-max must be >= 0 (a standard deviation), got {self.noise_max}.")
        _check_min(self, "token_mult channel_mult heartbeat_interval n_trials", 1)
        _check_min(self, "pruner_startup_trials worker max_retry", 0)
        if self.timeout is not None and not self.timeout > 0:
            raise KTError(f"--timeout must be > 0 seconds (or empty for no limit), got {self.timeout}.")
        if self.n_trials is None and self.timeout is None:
            raise KTError("give --n-trials or --timeout (or both); otherwise this worker would never stop.")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise KTError(f"--grace-period ({self.grace_period}) must exceed --heartbeat-interval "
                          f"({self.heartbeat_interval}), or a live trial would count as failed.")
        self.first_trial().validate()

    def first_trial(self) -> TrainConfig:
        """A trial at the low end of every searched range: what every trial's checks see."""
        return self.trial_config({"depth": self.depth_min, "width": (self.width_options() or [self.width_min])[0],
                                  "mask_ratio": 0.0, "noise_std": 0.0, "epochs": self.epochs_min, "lr": self.lr_min})

    def trial_config(self, params: Dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: the fixed settings plus the sampled ``params``."""
        width = int(params["width"])
        fixed = {f.name: getattr(self, f.name) for f in fields(ArchOptions) if f.name != "registered_name"}
        common = {f.name: getattr(self, f.name) for f in fields(DataOptions)}
        return TrainConfig(**common, **fixed, depth=int(params["depth"]), width=width,
                           token_hidden=self.token_mult * width, channel_hidden=self.channel_mult * width,
                           epochs=int(params["epochs"]), lr=float(params["lr"]),
                           mask_ratio=float(params["mask_ratio"]), noise_std=float(params["noise_std"]))


@dataclass
class MainConfig(DataOptions):
    """The quickstart: generate -> train -> evaluate, sized to show KT working in a few CPU minutes."""

    output: Optional[str] = option(None, "pair folder (default: derived from the settings, under $KT_HOME/pairs)")
    family: str = option("paper_mnist", "block family: a registered name or a YAML/JSON family file")
    n_pairs: int = option(128, "training pairs")
    n_val: int = option(16, "held-out validation networks")
    members: int = option(16, "networks trained at once")
    gen_epochs: int = option(3, "epochs of each base network and of each small block")
    recipe: str = option("best", "translation recipe (docs/recipes.md)", tuple(RECIPES))
    epochs: int = option(100, "translator epochs")
    batch_size: int = option(16, "translator batch size (pairs per step)")
    select_holdout: int = option(16, "training pairs held out to pick the kept epoch, so that the evaluation "
                                     "is on networks nothing was tuned on")
    registered_name: Optional[str] = option(None, "registered model name (default kt-<family>-<arch>)")

    def generate_config(self) -> GenerateConfig:
        return GenerateConfig(dataset=self.dataset, data_root=self.data_root, colour=self.colour, seed=self.seed,
                              device=self.device, output=self.output, family=self.family, n_pairs=self.n_pairs, n_val=self.n_val,
                              members=self.members, epochs=self.gen_epochs, small_epochs=self.gen_epochs)

    def train_config(self, pairs: str) -> TrainConfig:
        return TrainConfig(dataset=self.dataset, data_root=self.data_root, colour=self.colour, seed=self.seed,
                           device=self.device, recipe=self.recipe, epochs=self.epochs, batch_size=self.batch_size, pairs=pairs,
                           select_holdout=self.select_holdout, registered_name=self.registered_name)

    def validate(self) -> None:
        super().validate()
        self.generate_config().validate()
        self.train_config("").validate()
        if self.n_pairs <= self.select_holdout:
            raise KTError(f"--n-pairs {self.n_pairs} leaves no pairs to train on after --select-holdout "
                          f"{self.select_holdout}; make more pairs or hold out fewer.")


@dataclass
class RegisterConfig(StepConfig):
    """Log and register a translator saved on disk (e.g. one ``kt train`` kept when it could not log it)."""

    translator: str = option("", "folder holding translator.json and translator.safetensors")
    registered_name: Optional[str] = option(None, "registered model name (default: the one saved with it, "
                                                  "else kt-<family>-<arch>)")

    def validate(self) -> None:
        super().validate()
        check_model_name(self.registered_name)
        if not self.translator or not (Path(self.translator) / "translator.json").is_file():
            raise KTError(f"--translator {self.translator} holds no translator.json; pass the folder "
                          f"`kt train` printed (or one written by Translator.save).")


@dataclass
class FinetuneConfig(DataOptions):
    """Compress a saved base network, then fine-tune the small block on data, beside other starting points."""

    model: str = option("kt-paper_mnist-channel_set", "registered name, models:/NAME@alias or runs:/ID/translator")
    input: str = option("", "state dict of a trained base network (kt's module names: begin.*, block.*, last.*)")
    output: str = option("", "where to write the compressed network with its fine-tuned small block")
    epochs: int = option(5, "fine-tuning epochs of the small block (begin and last stay frozen)")
    baselines: str = option("random,l1", "other starting points fine-tuned alongside: random, identity, uniform, l1")
    lr: float = option(0.01, "SGD learning rate")
    batch_size: int = option(128, "images per step")

    @property
    def baseline_names(self) -> List[str]:
        return [b for b in self.baselines.split(",") if b]

    def validate(self) -> None:
        super().validate()
        _check_min(self, "epochs batch_size", 1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KTError(f"--lr must be a finite number > 0, got {self.lr}.")
        if not self.input:
            raise KTError("--input is required: the state dict of the trained base network to compress.")
        if not self.output:
            raise KTError("--output is required: where to write the fine-tuned compressed network.")
        check_output_file(Path(self.output), "--output")


@dataclass
class CompressConfig(StepConfig):
    model: str = option(help="registered name, models:/NAME@alias, or runs:/ID/translator")
    input: str = option(help="state dict of a trained base network, or with --block any checkpoint "
                             "(torch.save or .safetensors)")
    output: str = option(help="where to write the compressed network's state dict")
    block: Optional[str] = option(None, "module path of the block to translate in any checkpoint, e.g. layer1.0 "
                                        "(its other tensors kept; the small block's family written beside --output)")
    device: str = option("cpu", "cpu or cuda[:N]")
    small_hidden: Optional[int] = option(None, "the small block's hidden width, for a translator trained on "
                                               "several sizes (default: the size of its family)")

    def validate(self) -> None:
        super().validate()
        _check_min(self, "small_hidden", 1)
        check_output_file(Path(self.output), "--output")
        if self.block:
            check_output_file(family_file_of(self.output), "the family file")


def family_file_of(output: str) -> Path:
    """Where ``kt compress --block`` writes the small block's family: beside the compressed checkpoint."""
    return Path(f"{output}.family.yaml")
