"""The search space of a sweep: ranges given on the command line, checked before any work starts.

Each trial samples depth, width, mask ratio, noise level, epoch count and learning rate; the hidden
widths follow the width (token_hidden = token_mult * width, channel_hidden = channel_mult * width).
A range with low == high is a fixed value (still recorded as a trial parameter).

Example:
    >>> space = SearchSpace(depth_min=1, depth_max=2, width_min=8, width_max=16)
    >>> space.validate()
    >>> space.width_options()
    [8, 16]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ..errors import KTError
from ..training.augment import TARGETS
from ..training.train import TrainConfig
from ..translators import ARCHITECTURES


def parse_choices(text: Optional[str]) -> Optional[List[int]]:
    """'8,16,32' -> [8, 16, 32]; '' or None -> None (use --width-min/--width-max)."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "none":
        return None
    try:
        values = [int(float(v)) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise KTError(f"--width-choices must be whole numbers separated by commas, got {text!r}.") from None
    return values


@dataclass
class SearchSpace:
    """Ranges searched by a sweep plus the fixed training settings of every trial."""

    depth_min: int = 2
    depth_max: int = 8
    width_min: int = 32
    width_max: int = 128
    width_choices: Optional[Sequence[int]] = None   # overrides width_min/width_max when given
    token_mult: int = 2
    channel_mult: int = 4
    mask_max: float = 0.3
    noise_max: float = 0.05
    epochs_min: int = 20
    epochs_max: int = 200
    lr_min: float = 1e-3
    lr_max: float = 1e-3
    # fixed for every trial
    arch: str = "mixer"
    recipe: str = "paper"
    dropout: float = 0.1
    batch_size: int = 64
    weight_decay: float = 0.0
    augment_on: str = "source"
    val_every: int = 5
    seed: int = 0
    device: str = "auto"

    def width_options(self) -> Optional[List[int]]:
        return sorted(set(int(w) for w in self.width_choices)) if self.width_choices else None

    def validate(self) -> None:
        """Every bad range as a one-line KTError (nothing has been trained or connected yet)."""
        def rng(name: str, lo, hi, min_ok) -> None:
            if lo < min_ok:
                raise KTError(f"--{name}-min must be >= {min_ok}, got {lo}.")
            if lo > hi:
                raise KTError(f"--{name}-min ({lo}) is larger than --{name}-max ({hi}); swap them.")

        rng("depth", self.depth_min, self.depth_max, 1)
        rng("epochs", self.epochs_min, self.epochs_max, 1)
        if self.width_choices is not None:
            if not self.width_options() or min(self.width_options()) < 1:
                raise KTError(f"--width-choices must be positive whole numbers, got {list(self.width_choices)}.")
        else:
            rng("width", self.width_min, self.width_max, 1)
        if not (self.lr_min > 0 and math.isfinite(self.lr_max)):
            raise KTError(f"--lr-min must be > 0 and --lr-max finite, got {self.lr_min} and {self.lr_max}.")
        if self.lr_min > self.lr_max:
            raise KTError(f"--lr-min ({self.lr_min}) is larger than --lr-max ({self.lr_max}); swap them.")
        if not 0.0 <= self.mask_max < 1.0:
            raise KTError(f"--mask-max must be in [0, 1) (a mask ratio), got {self.mask_max}.")
        if not (self.noise_max >= 0 and math.isfinite(self.noise_max)):
            raise KTError(f"--noise-max must be >= 0 (a standard deviation), got {self.noise_max}.")
        for name in ("token_mult", "channel_mult", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise KTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.augment_on not in TARGETS:
            raise KTError(f"--augment-on must be one of {', '.join(TARGETS)}, got {self.augment_on!r}.")
        ARCHITECTURES.get(self.arch)  # an unknown name fails with the list of known ones
        # the fixed settings are checked the way `kt train` checks them
        self.config({"depth": self.depth_min, "width": (self.width_options() or [self.width_min])[0],
                     "mask_ratio": 0.0, "noise_std": 0.0, "epochs": self.epochs_min, "lr": self.lr_min}).validate()

    def sample(self, trial) -> Dict[str, object]:
        """Ask an Optuna trial for one point of the space."""
        params: Dict[str, object] = {"depth": trial.suggest_int("depth", self.depth_min, self.depth_max)}
        if self.width_options():
            params["width"] = trial.suggest_categorical("width", self.width_options())
        else:
            params["width"] = trial.suggest_int("width", self.width_min, self.width_max, log=True)
        params["mask_ratio"] = trial.suggest_float("mask_ratio", 0.0, self.mask_max)
        params["noise_std"] = trial.suggest_float("noise_std", 0.0, self.noise_max)
        params["epochs"] = trial.suggest_int("epochs", self.epochs_min, self.epochs_max)
        params["lr"] = trial.suggest_float("lr", self.lr_min, self.lr_max, log=True)
        return params

    def config(self, params: Dict[str, object]) -> TrainConfig:
        """The TrainConfig of one trial."""
        width = int(params["width"])
        return TrainConfig(
            arch=self.arch, depth=int(params["depth"]), width=width, token_hidden=self.token_mult * width,
            channel_hidden=self.channel_mult * width, dropout=self.dropout, recipe=self.recipe,
            epochs=int(params["epochs"]), batch_size=self.batch_size, lr=float(params["lr"]),
            weight_decay=self.weight_decay, mask_ratio=float(params["mask_ratio"]),
            noise_std=float(params["noise_std"]), augment_on=self.augment_on,
            val_every=self.val_every, seed=self.seed, device=self.device,
        )

    def as_params(self) -> Dict[str, object]:
        out = dict(asdict(self))
        out["width_choices"] = ",".join(map(str, self.width_options())) if self.width_options() else ""
        return out
