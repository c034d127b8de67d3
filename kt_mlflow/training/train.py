"""The translator training loop: all pairs in memory as tensors on the device, Adam + cosine.

Every ``val_every`` epochs a functional validation translates each held-out network's large block,
assembles begin + small + last and measures test accuracy; the best translator by mean is kept.

Example:
    >>> result = train_translator(TrainConfig(epochs=50), family, train_pairs, val_pairs, data)  # doctest: +SKIP
    >>> result.best["val_acc_mean"]                                                               # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from ..blocks import BlockFamily, KTNetwork, fold_members
from ..device import pick_device
from ..errors import KTError
from ..evaluation.functional import network_accuracy
from ..pairs.store import PairSet
from ..translators import Translator, create_translator, tokens
from .augment import augment_pair, check_augmentation
from .recipes import get_recipe


class NonFiniteLoss(KTError):
    """The loss became NaN or inf (a sweep prunes such a trial)."""


@dataclass
class TrainConfig:
    arch: str = "mixer"
    depth: int = 4
    width: int = 64
    token_hidden: int = 128
    channel_hidden: int = 256
    dropout: float = 0.1
    recipe: str = "paper"
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    mask_ratio: float = 0.0
    noise_std: float = 0.0
    augment_on: str = "source"
    val_every: int = 10
    functional_pairs: int = 64     # pairs per step that get the functional loss
    functional_images: int = 64    # training images per step for the functional loss
    functional_bank: int = 512     # training images whose begin features are precomputed per pair
    select_holdout: int = 0        # training pairs held out to pick the best epoch (0: the validation networks)
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        check_augmentation(self.mask_ratio, self.noise_std, self.augment_on)
        get_recipe(self.recipe)
        if self.select_holdout < 0:
            raise KTError(f"--select-holdout must be >= 0, got {self.select_holdout}.")
        for name in ("depth", "width", "token_hidden", "channel_hidden", "epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise KTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise KTError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if self.lr <= 0 or self.weight_decay < 0:
            raise KTError("--lr must be > 0 and --weight-decay >= 0.")

    @property
    def resolved_arch(self) -> str:
        """The architecture trained: the recipe's when it needs one, else ``arch``."""
        return get_recipe(self.recipe).arch or self.arch

    def arch_kwargs(self) -> Dict[str, object]:
        kw = {"depth": self.depth, "width": self.width, "dropout": self.dropout}
        if self.resolved_arch == "mixer":
            kw.update(token_hidden=self.token_hidden, channel_hidden=self.channel_hidden)
        elif self.resolved_arch == "channel_set":
            kw.update(channel_hidden=self.channel_hidden)
        return kw

    def as_params(self) -> Dict[str, object]:
        return {**asdict(self), **get_recipe(self.recipe).as_params(), "resolved_arch": self.resolved_arch}


@dataclass
class TrainResult:
    translator: Translator
    best: Dict[str, float]
    history: List[Dict[str, float]] = field(default_factory=list)


def _canonical(family: BlockFamily, small: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    canon = getattr(type(family.small_block()), "canonicalize", None)
    if canon is None:
        raise KTError(f"recipe needs canonical targets, but block {family.small!r} defines no canonicalize().")
    return canon(small)


def _permuted(family: BlockFamily, large: Dict[str, torch.Tensor], gen: torch.Generator) -> Dict[str, torch.Tensor]:
    block = type(family.large_block())
    if not hasattr(block, "permute_hidden"):
        raise KTError(f"recipe needs hidden-channel permutations, but block {family.large!r} defines none.")
    p = next(iter(large.values())).shape[0]
    perm = torch.rand(p, family.large_hidden, generator=gen, device="cpu").argsort(-1).to(large["conv1.weight"].device)
    return block.permute_hidden(large, perm)


def param_loss(family: BlockFamily, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the small block's weight tensors of each tensor's MSE (the paper's loss)."""
    p, t = tokens.decode_target(family, pred), tokens.decode_target(family, target)
    return torch.stack([F.mse_loss(p[k], t[k]) for k in p]).mean()


class FunctionalLoss:
    """What the translated block does, per pair, on training images (translator training only).

    Each pair's own begin and last blocks (frozen, eval-mode BN) sandwich the translated small block.
    Two terms: KL(base network || network with the translated block) on the predictions, and the MSE
    between the translated block's output features and the large block's (relative to the features'
    mean square). Begin features, large-block features and teacher logits of a fixed bank of training
    images are computed once, so a step only runs the small and last blocks. Translation itself stays
    data-free.
    """

    def __init__(self, family: BlockFamily, train: PairSet, data, device: torch.device, bank: int,
                 seed: int, chunk: int = 32) -> None:
        self.family, self.device = family, device
        # Keep the feature banks within ~2 GB: fewer images per pair when there are many pairs.
        per_image = 2 * 4 * family.width * (data.train_x.shape[-1] // 2) ** 2
        bank = max(16, min(bank, (2 << 30) // max(1, len(train) * per_image)))
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:bank]
        x = data.train_x[pick].to(device)
        m, n = len(x), len(train)
        feats, outs, teacher = [], [], []

        def per_pair(t: torch.Tensor, k: int) -> torch.Tensor:  # (m, k*C, H, W) -> (k, m, C, H, W)
            return t.reshape(m, k, -1, *t.shape[2:]).transpose(0, 1)

        with torch.no_grad():
            for lo in range(0, n, chunk):
                sl = slice(lo, min(n, lo + chunk))
                k = sl.stop - sl.start
                net = family.base_network(k).to(device).eval()
                for part, name in (("begin", "begin"), ("block", "large"), ("last", "last")):
                    getattr(net, part).load_state_dict(fold_members({a: b.to(device) for a, b in train.part(name).items()}, sl))
                f = net.begin(x.expand(-1, k, -1, -1))                                   # (m, k*C, H, W)
                out = net.block(f)
                teacher.append(net.last(out).view(m, k, -1).transpose(0, 1))            # (k, m, classes)
                feats.append(per_pair(f, k))
                outs.append(per_pair(out, k))
        self.feats, self.outs, self.teacher = torch.cat(feats), torch.cat(outs), torch.cat(teacher)
        self.out_scale = float(self.outs.pow(2).mean().clamp_min(1e-12))
        self.last = {k: v.to(device) for k, v in train.part("last").items()}
        self._nets: Dict[int, KTNetwork] = {}

    def _net(self, k: int) -> KTNetwork:
        if k not in self._nets:
            self._nets[k] = KTNetwork(torch.nn.Identity(), self.family.small_block(k), self.family.last(k), k)
            self._nets[k].to(self.device).eval()
        return self._nets[k]

    def __call__(self, small: Dict[str, torch.Tensor], idx: torch.Tensor, n_images: int,
                 gen: torch.Generator, large: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction KL, relative feature MSE) of the translated ``small`` blocks of pairs ``idx``.

        ``large`` (stacked, one per pair in ``idx``) replaces the pairs' own large blocks as the teacher,
        e.g. perturbed copies; the teacher is then computed on the fly instead of read from the bank.
        """
        k = len(idx)
        pick = torch.randint(self.feats.shape[1], (n_images,), generator=gen).to(self.device)

        def members(bank: torch.Tensor) -> torch.Tensor:  # (P, m, C, H, W) -> (n, k*C, H, W)
            f = bank[idx][:, pick].transpose(0, 1)
            return f.reshape(n_images, -1, *f.shape[3:]).contiguous(memory_format=torch.channels_last)

        net, feats = self._net(k), members(self.feats)
        last = fold_members({a: b[idx] for a, b in self.last.items()})
        out = functional_call(net.block, fold_members(small), (feats,))
        student = functional_call(net.last, last, (out,))
        if large is None:
            target = members(self.outs)
            teacher = self.teacher[idx][:, pick].transpose(0, 1).reshape(n_images * k, -1)
        else:
            with torch.no_grad():
                target = functional_call(self._teacher_block(k), fold_members(large), (feats,))
                teacher = functional_call(net.last, last, (target,)).view(n_images * k, -1)
        kl = F.kl_div(F.log_softmax(student.view(n_images * k, -1), -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="batchmean")
        return kl, F.mse_loss(out, target) / self.out_scale

    def _teacher_block(self, k: int) -> torch.nn.Module:
        if -k not in self._nets:  # negative keys: large blocks, positive: small-block networks
            self._nets[-k] = self.family.large_block(k).to(self.device).eval()
        return self._nets[-k]


def perturb_large(large: Dict[str, torch.Tensor], strength: float, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """A new large block near each given one: conv weights and BN affine parameters multiplied by
    ``1 + strength * N(0, 1)`` element-wise (BN statistics kept). With a teacher recomputed from it,
    this is a new, slightly different network to translate: unlimited examples of the same task."""
    out = dict(large)
    for name, t in large.items():
        if t.is_floating_point() and name.endswith((".weight", ".bias")):  # not the BN running statistics
            noise = torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
            out[name] = t * (1 + strength * noise)
    return out


def train_translator(cfg: TrainConfig, family: BlockFamily, train: PairSet, val: PairSet, data,
                     on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
                     progress: bool = True) -> TrainResult:
    """Train a translator on ``train`` pairs; validate functionally on ``val`` networks.

    With ``cfg.select_holdout = N`` the last N training pairs are held out instead and validation (which
    picks the kept epoch) runs on them, so ``val`` is left for an evaluation that nothing was tuned on.
    """
    cfg.validate()
    if cfg.select_holdout:
        if cfg.select_holdout >= len(train):
            raise KTError(f"--select-holdout {cfg.select_holdout} leaves no training pairs (there are {len(train)}); "
                          f"hold out fewer.")
        n_fit = len(train) - cfg.select_holdout
        train, val = train.subset(torch.arange(n_fit)), train.subset(torch.arange(n_fit, len(train)))
    recipe = get_recipe(cfg.recipe)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    large = {k: v.to(device) for k, v in train.part("large").items()}
    small = {k: v.to(device) for k, v in train.part("small").items()}
    if recipe.canonical:
        small = _canonical(family, small)
    target = tokens.encode_target(family, small)                      # (P, T_out, D_out)
    source = tokens.encode_source(family, large, recipe.bn_aware)     # (P, T_in, D_in), reused without perms

    translator = create_translator(cfg.resolved_arch, family, bn_aware=recipe.bn_aware, **cfg.arch_kwargs())
    net = translator.net.to(device)
    if recipe.standardize:
        net.in_mean.copy_(source.mean((0, 1)))
        net.in_std.copy_(source.std((0, 1)).clamp_min(1e-6))
        net.out_mean.copy_(target.mean((0, 1)))
        net.out_std.copy_(target.std((0, 1)).clamp_min(1e-6))
    functional = (FunctionalLoss(family, train, data, device, cfg.functional_bank, cfg.seed)
                  if recipe.functional > 0 or recipe.features > 0 else None)

    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    val_large = {k: v for k, v in val.part("large").items()}
    best: Dict[str, float] = {"val_acc_mean": -math.inf}
    best_state = None
    history: List[Dict[str, float]] = []
    n = len(train)
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        net.train()
        order = torch.randperm(n, generator=gen).to(device)
        total, fn_total, steps = 0.0, 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start: start + cfg.batch_size]
            batch_large = None
            if recipe.perturb > 0:
                batch_large = perturb_large({k: v[idx] for k, v in large.items()}, recipe.perturb, gen)
            if recipe.perm_augment:
                batch_large = _permuted(family, batch_large or {k: v[idx] for k, v in large.items()}, gen)
            src = source[idx] if batch_large is None else tokens.encode_source(family, batch_large, recipe.bn_aware)
            src, dst = augment_pair(src, target[idx], cfg.mask_ratio, cfg.noise_std, cfg.augment_on)
            pred = net(src)
            loss = recipe.param * param_loss(family, pred, dst) if recipe.param > 0 else pred.new_zeros(())
            if functional is not None:
                sub = idx[: cfg.functional_pairs]
                teacher = None if recipe.perturb == 0 else {k: v[: len(sub)] for k, v in batch_large.items()}
                kl, feat = functional(tokens.decode_target(family, pred[: len(sub)]), sub, cfg.functional_images, gen,
                                      teacher)
                fn = recipe.functional * kl + recipe.features * feat
                loss = loss + fn
                fn_total += float(fn.detach())
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"translator loss became {float(loss.detach())} at epoch {epoch}; lower --lr or "
                                    f"the augmentation strength.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        sched.step()
        metrics = {"train_loss": total / steps, "lr": opt.param_groups[0]["lr"]}
        if functional is not None:
            metrics["functional_loss"] = fn_total / steps
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            acc = network_accuracy(family, val.part("begin"), translator.translate_batch(val_large),
                                   val.part("last"), data, device=device)
            metrics.update(val_acc_mean=float(acc.mean()), val_acc_min=float(acc.min()), val_acc_max=float(acc.max()))
            if metrics["val_acc_mean"] > best["val_acc_mean"]:
                best = {k: metrics[k] for k in ("val_acc_mean", "val_acc_min", "val_acc_max")}
                best["best_epoch"] = float(epoch)
                best_state = copy.deepcopy(net.state_dict())
        history.append(metrics)
        bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k in ("train_loss", "val_acc_mean")})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    net.load_state_dict(best_state)
    net.eval()
    return TrainResult(translator, best, history)
