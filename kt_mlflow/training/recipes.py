"""Named translation recipes: the paper's, and switches that use the structure of the problem.

Each switch is recorded as an MLflow param. ``paper`` reproduces KT_SPEC.md: conv weights only,
parameter MSE, mask/noise augmentation, the Mixer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict

from ..errors import KTError


@dataclass(frozen=True)
class Recipe:
    name: str
    bn_aware: bool = False        # fold BN into conv, feed the shifts too
    canonical: bool = False       # regress canonical (order, scale) small-block weights
    perm_augment: bool = False    # permute the large block's hidden channels (function-preserving)
    standardize: bool = False     # per-feature standardisation of translator inputs and outputs
    functional: float = 0.0       # weight of the functional (distillation) loss; 0 = parameter MSE only

    def as_params(self) -> Dict[str, object]:
        return {f"recipe_{k}" if k != "name" else "recipe": v for k, v in asdict(self).items()}


PAPER = Recipe("paper")
RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    PAPER,
    replace(PAPER, name="bn_aware", bn_aware=True, standardize=True),
    replace(PAPER, name="canonical", canonical=True, standardize=True),
    replace(PAPER, name="perm_augment", perm_augment=True, standardize=True),
    replace(PAPER, name="functional", functional=1.0, standardize=True),
    Recipe("best", bn_aware=True, canonical=True, perm_augment=True, standardize=True, functional=1.0),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KTError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}.")
    return RECIPES[name]
