"""The translator training loop: all pairs in memory as tensors on the device, Adam + cosine.

Every ``val_every`` epochs a validation translates each held-out network's large block, assembles
begin + small + last and measures test accuracy; the best translator by mean is kept.

Example:
    >>> result = train_translator(TrainConfig(epochs=50), family, train_pairs, val_pairs, data)  # doctest: +SKIP
    >>> result.best["val_acc_mean"]                                                               # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..blocks import BlockFamily
from ..config import TrainConfig
from ..device import pick_device
from ..engine import network_accuracy
from ..errors import KTError
from ..pairs.store import PairSet
from ..recipes import get_recipe
from ..translators import Translator, create_translator, tokens
from .augment import augment_pair
from .task_loss import TaskLoss, perturb_params

State = Dict[str, torch.Tensor]
EpochHook = Callable[[int, Dict[str, float]], None]


class NonFiniteLoss(KTError):
    """The loss became NaN or inf (a sweep prunes such a trial)."""


@dataclass
class TrainResult:
    translator: Translator
    best: Dict[str, float]
    history: List[Dict[str, float]] = field(default_factory=list)


def _canonical(family: BlockFamily, small: State) -> State:
    canon = getattr(type(family.small_block()), "canonicalize", None)
    if canon is None:
        raise KTError(f"recipe needs canonical targets, but block {family.small!r} defines no canonicalize().")
    return canon(small)


def _permuted(family: BlockFamily, large: State, gen: torch.Generator) -> State:
    """Each large block with its hidden channels in a random order (the same function)."""
    ref = next(iter(large.values()))
    perm = torch.rand(ref.shape[0], family.large_hidden, generator=gen, device="cpu").argsort(-1).to(ref.device)
    return family.prototype("large").permute_hidden(large, perm)


def param_loss(family: BlockFamily, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the small block's weight (and shift) tensors of each tensor's MSE (the paper's loss)."""
    (pw, ps), (tw, ts) = tokens.decode_target(family, pred), tokens.decode_target(family, target)
    pairs = [(pw[k], tw[k]) for k in pw] + ([(ps[k], ts[k]) for k in ps] if ps is not None else [])
    return torch.stack([F.mse_loss(a, b) for a, b in pairs]).mean()


def split_holdout(train: PairSet, val: PairSet, holdout: int) -> Tuple[PairSet, PairSet]:
    """With ``holdout = N`` the last N training pairs pick the kept epoch, so ``val`` stays untouched."""
    if not holdout:
        return train, val
    if holdout >= len(train):
        raise KTError(f"--select-holdout {holdout} leaves no training pairs (there are {len(train)}); hold out fewer.")
    n_fit = len(train) - holdout
    return train.subset(torch.arange(n_fit)), train.subset(torch.arange(n_fit, len(train)))


class TranslatorFit:
    """One translator, its training pairs as tensors on the device, and one optimisation step."""

    def __init__(self, cfg: TrainConfig, family: BlockFamily, train: PairSet, data, device: torch.device) -> None:
        self.cfg, self.family, self.recipe = cfg, family, get_recipe(cfg.recipe)
        recipe = self.recipe
        self.large = {k: v.to(device) for k, v in train.part("large").items()}
        small = {k: v.to(device) for k, v in train.part("small").items()}
        self.small = _canonical(family, small) if recipe.canonical else small
        self.translator = create_translator(cfg.resolved_arch, family, bn_aware=recipe.bn_aware,
                                            rescale=recipe.rescale, bn_stats=recipe.bn_stats, **cfg.arch_kwargs())
        self.net = self.translator.net.to(device)
        self.source, self.scales = self.translator.encode(self.large)   # (P, T_in, D_in), reused without perms
        self.target = self.targets(torch.arange(len(train), device=device), self.scales)  # (P, T_out, D_out)
        if recipe.standardize:
            self._standardize()
        self.task = (TaskLoss(family, train, data, device, cfg.task_bank, cfg.seed, context=recipe.context,
                              grad_leak=recipe.grad_leak)
                     if recipe.distill > 0 or recipe.feature_match > 0 else None)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def targets(self, rows: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Target tokens of pairs ``rows``, in the coordinates the translator writes in."""
        return tokens.encode_target(self.family, {k: v[rows] for k, v in self.small.items()}, scale)

    def _standardize(self) -> None:
        net = self.net
        net.in_mean.copy_(self.source.mean((0, 1)))
        net.in_std.copy_(self.source.std((0, 1)).clamp_min(1e-6))
        net.out_mean.copy_(self.target.mean((0, 1)))
        net.out_std.copy_(self.target.std((0, 1)).clamp_min(1e-6))

    def _batch(self, idx: torch.Tensor, gen: torch.Generator):
        """(source tokens, scales, target tokens, perturbed large blocks or None) of pairs ``idx``."""
        recipe, batch_large = self.recipe, None
        if recipe.perturb > 0:
            batch_large = perturb_params({k: v[idx] for k, v in self.large.items()}, recipe.perturb, gen)
        if recipe.perm_augment:
            batch_large = _permuted(self.family, batch_large or {k: v[idx] for k, v in self.large.items()}, gen)
        if batch_large is None:
            return self.source[idx], None if self.scales is None else self.scales[idx], self.target[idx], None
        src, sc = self.translator.encode(batch_large)
        return src, sc, self.target[idx] if sc is None else self.targets(idx, sc), batch_large

    def step(self, idx: torch.Tensor, gen: torch.Generator, epoch: int) -> Tuple[float, float]:
        """One Adam step on pairs ``idx``; returns (loss, task loss)."""
        cfg, recipe = self.cfg, self.recipe
        src, sc, dst, batch_large = self._batch(idx, gen)
        src, dst = augment_pair(src, dst, cfg.mask_ratio, cfg.noise_std, cfg.augment_on)
        pred = self.net(src)
        loss = recipe.param * param_loss(self.family, pred, dst) if recipe.param > 0 else pred.new_zeros(())
        task = 0.0
        if self.task is not None:
            sub = idx[: cfg.task_pairs]
            teacher = None if recipe.perturb == 0 else {k: v[: len(sub)] for k, v in batch_large.items()}
            small = self.translator.decode(pred[: len(sub)], None if sc is None else sc[: len(sub)])
            kl, feat = self.task(small, sub, cfg.task_images, gen, teacher)
            term = recipe.distill * kl + recipe.feature_match * feat
            loss, task = loss + term, float(term.detach())
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"translator loss became {float(loss.detach())} at epoch {epoch}; lower --lr or "
                                f"the augmentation strength.")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), recipe.grad_clip)
        self.opt.step()
        return float(loss.detach()), task

    def epoch(self, epoch: int, gen: torch.Generator) -> Dict[str, float]:
        """One pass over the pairs in a random order; returns the epoch's mean losses."""
        self.net.train()
        n = len(self.source)
        order = torch.randperm(n, generator=gen).to(self.source.device)
        losses = [self.step(order[lo: lo + self.cfg.batch_size], gen, epoch) for lo in range(0, n, self.cfg.batch_size)]
        metrics = {"train_loss": sum(loss for loss, _ in losses) / len(losses), "lr": self.opt.param_groups[0]["lr"]}
        if self.task is not None:
            metrics["task_loss"] = sum(t for _, t in losses) / len(losses)
        return metrics


def validate_translator(translator: Translator, family: BlockFamily, val: PairSet, data,
                        device: torch.device) -> Dict[str, float]:
    """Mean, min and max test accuracy of the ``val`` networks with their large blocks translated."""
    acc = network_accuracy(family, val.part("begin"), translator.translate_batch(val.part("large")),
                           val.part("last"), data, device=device)
    return {"val_acc_mean": float(acc.mean()), "val_acc_min": float(acc.min()), "val_acc_max": float(acc.max())}


def train_translator(cfg: TrainConfig, family: BlockFamily, train: PairSet, val: PairSet, data,
                     on_epoch: Optional[EpochHook] = None, progress: bool = True) -> TrainResult:
    """Train a translator on ``train`` pairs; validate on ``val`` networks (see ``split_holdout``)."""
    cfg.validate()
    train, val = split_holdout(train, val, cfg.select_holdout)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fit = TranslatorFit(cfg, family, train, data, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(fit.opt, T_max=cfg.epochs)
    best: Dict[str, float] = {"val_acc_mean": -math.inf}
    best_state, history = None, []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        metrics = fit.epoch(epoch, gen)
        sched.step()
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            metrics.update(validate_translator(fit.translator, family, val, data, device))
            if metrics["val_acc_mean"] > best["val_acc_mean"]:
                best = {k: metrics[k] for k in ("val_acc_mean", "val_acc_min", "val_acc_max")}
                best["epoch"] = float(epoch)
                best_state = copy.deepcopy(fit.net.state_dict())
        history.append(metrics)
        bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k in ("train_loss", "val_acc_mean")})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    fit.net.load_state_dict(best_state)
    fit.net.eval()
    return TrainResult(fit.translator, best, history)
