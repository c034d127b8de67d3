"""Named training protocols for held-out networks: how people train, beyond the paper's SGD with flips.

Each is a set of ``kt generate`` options (fields of ``GenerateConfig``, and ``seed_offset``) over its defaults (SGD 0.01,
momentum 0.9, batch 128, flips, 3 + 3 epochs). ``kt evaluate --suites adam,well_trained`` (or
``--suites shifted`` for all) makes those held-out networks when they are not there yet and scores the
translator on each. The optimiser, learning rates over a decade, epochs from 1 to the plateau, flips,
batch size and seeds all move.

Example:
    >>> PROTOCOLS["adam"]
    {'optimizer': 'adam', 'lr': 0.001}
"""
from __future__ import annotations

from typing import Dict

PROTOCOLS: Dict[str, Dict[str, object]] = {
    "sgd_lr0.003": {"lr": 0.003},
    "sgd_lr0.03": {"lr": 0.03},
    "adam": {"optimizer": "adam", "lr": 0.001},
    "adamw": {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01},
    "one_epoch": {"epochs": 1, "small_epochs": 1},
    "well_trained": {"epochs": 8, "small_epochs": 8, "flip": False, "lr_schedule": "cosine"},
    "no_flip": {"flip": False},
    "batch32": {"batch_size": 32},
    "other_seeds": {"seed_offset": 1},   # networks from the next seed range: --seed + 1
}
ALL_SHIFTED = "shifted"   # --suites shifted: every protocol above (--protocols shifted: all but other_seeds)
BASE_PROTOCOL = "base"    # in a --protocols mixture: the command's own options
