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
from ..translators import Translator, create_translator, rescale, tokens
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
        if self.functional_bank < 1:
            raise KTError(f"--functional-bank must be >= 1 (training images per pair), got {self.functional_bank}.")
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
    mean square) at the positions the last block reads (it reads every stride-th; the rest never
    reaches a prediction). The begin block's pre-ReLU output for a fixed bank of training images is
    computed once per pair, as are the large block's features and the teacher logits, so a step only
    runs the small and last blocks. Translation itself stays data-free.

    ``context > 0`` perturbs the networks around the block at every call: the begin block's BN affine
    (a positive per-channel scale and a shift, applied to the stored pre-ReLU output, exact because
    max-pooling commutes with both) and the last block's parameters, each by relative noise of that
    strength; the teacher is then recomputed. New surroundings every step, so the translator cannot
    learn the training networks' own begin/last blocks instead of the task. ``grad_leak`` is the small
    block's hidden-ReLU gradient below zero (see ``BottleneckBlock``).
    """

    def __init__(self, family: BlockFamily, train: PairSet, data, device: torch.device, bank: int,
                 seed: int, chunk: int = 32, context: float = 0.0, grad_leak: float = 0.0) -> None:
        self.family, self.device, self.context, self.grad_leak = family, device, context, grad_leak
        self.stride = family.last().stride
        # Keep the feature banks within ~4 GB: fewer images per pair when there are many pairs (2,000
        # pairs of the paper's family still get 360 images each).
        side = data.train_x.shape[-1] // 2  # begin-block output (pre-ReLU bank), then block output (strided)
        per_image = 4 * family.width * (side ** 2 + (-(-side // self.stride)) ** 2)
        bank = max(16, min(bank, (4 << 30) // max(1, len(train) * per_image)))
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:bank]
        x = data.train_x[pick].to(device)
        m, n = len(x), len(train)
        pres, outs, teacher = [], [], []

        def per_pair(t: torch.Tensor, k: int) -> torch.Tensor:  # (m, k*C, H, W) -> (k, m, C, H, W)
            return t.reshape(m, k, -1, *t.shape[2:]).transpose(0, 1)

        with torch.no_grad():
            for lo in range(0, n, chunk):
                sl = slice(lo, min(n, lo + chunk))
                k = sl.stop - sl.start
                net = family.base_network(k).to(device).eval()
                for part, name in (("begin", "begin"), ("block", "large"), ("last", "last")):
                    getattr(net, part).load_state_dict(fold_members({a: b.to(device) for a, b in train.part(name).items()}, sl))
                pre = net.begin.preactivation(x.expand(-1, k, -1, -1))                  # (m, k*C, H, W)
                out = net.block(F.relu(pre), stride=self.stride)
                teacher.append(net.last(out, subsampled=True).view(m, k, -1).transpose(0, 1))  # (k, m, classes)
                pres.append(per_pair(pre, k))
                outs.append(per_pair(out, k))
        self.pre, self.outs, self.teacher = torch.cat(pres), torch.cat(outs), torch.cat(teacher)
        self.pre_std = self.pre.transpose(1, 2).flatten(2).std(-1)                      # (P, C)
        self.out_scale = float(self.outs.pow(2).mean().clamp_min(1e-12))
        self.large = {k: v.to(device) for k, v in train.part("large").items()}
        self.last = {k: v.to(device) for k, v in train.part("last").items()}
        self._nets: Dict[int, torch.nn.Module] = {}

    def _net(self, k: int) -> KTNetwork:
        if k not in self._nets:
            self._nets[k] = KTNetwork(torch.nn.Identity(), self.family.small_block(k), self.family.last(k), k)
            self._nets[k].to(self.device).eval()
            if hasattr(self._nets[k].block, "grad_leak"):
                self._nets[k].block.grad_leak = self.grad_leak
        return self._nets[k]

    def _teacher_block(self, k: int) -> torch.nn.Module:
        if -k not in self._nets:  # negative keys: large blocks, positive: small-block networks
            self._nets[-k] = self.family.large_block(k).to(self.device).eval()
        return self._nets[-k]

    def __call__(self, small: Dict[str, torch.Tensor], idx: torch.Tensor, n_images: int,
                 gen: torch.Generator, large: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction KL, relative feature MSE) of the translated ``small`` blocks of pairs ``idx``.

        ``large`` (stacked, one per pair in ``idx``) replaces the pairs' own large blocks as the teacher,
        e.g. perturbed copies; the teacher is then computed on the fly instead of read from the bank.
        """
        k = len(idx)
        pick = torch.randint(self.pre.shape[1], (n_images,), generator=gen).to(self.device)

        def members(t: torch.Tensor) -> torch.Tensor:  # (k, n, C, H, W) -> (n, k*C, H, W)
            return t.transpose(0, 1).reshape(n_images, -1, *t.shape[3:]).contiguous(memory_format=torch.channels_last)

        pre = self.pre[idx][:, pick]                                                    # (k, n, C, H, W)
        last = {a: b[idx] for a, b in self.last.items()}
        if self.context > 0:
            c = pre.shape[2]
            scale = (1 + self.context * self._noise((k, 1, c, 1, 1), gen)).clamp_min(0.1)
            shift = self.context * self._noise((k, 1, c, 1, 1), gen) * self.pre_std[idx][:, None, :, None, None]
            pre = pre * scale + shift
            last = perturb_params(last, self.context, gen)
            if large is None:
                large = {a: b[idx] for a, b in self.large.items()}
        net, feats, last = self._net(k), members(F.relu(pre)), fold_members(last)
        out = functional_call(net.block, fold_members(small), (feats,), {"stride": self.stride})
        student = functional_call(net.last, last, (out,), {"subsampled": True})
        if large is None:
            target = members(self.outs[idx][:, pick])
            teacher = self.teacher[idx][:, pick].transpose(0, 1).reshape(n_images * k, -1)
        else:
            with torch.no_grad():
                target = functional_call(self._teacher_block(k), fold_members(large), (feats,), {"stride": self.stride})
                teacher = functional_call(net.last, last, (target,), {"subsampled": True}).view(n_images * k, -1)
        kl = F.kl_div(F.log_softmax(student.view(n_images * k, -1), -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="batchmean")
        return kl, F.mse_loss(out, target) / self.out_scale

    def _noise(self, shape: Tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(self.device)


def perturb_params(state: Dict[str, torch.Tensor], strength: float, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Nearby networks: every weight and bias (conv, linear, BN affine) multiplied by
    ``1 + strength * N(0, 1)`` element-wise, BN statistics kept. With a teacher recomputed from them,
    each is a new, slightly different network to translate: unlimited examples of the same task."""
    out = dict(state)
    for name, t in state.items():
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

    translator = create_translator(cfg.resolved_arch, family, bn_aware=recipe.bn_aware, rescale=recipe.rescale,
                                   bn_stats=recipe.bn_stats, **cfg.arch_kwargs())
    net = translator.net.to(device)
    source, scales = translator.encode(large)                        # (P, T_in, D_in), reused without perms
    small_keys = tokens.layout(family, "small").keys

    def targets(rows: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Target tokens of pairs ``rows``, in the coordinates the translator writes in."""
        sm = {k: v[rows] for k, v in small.items()}
        return tokens.encode_target(family, sm if scale is None else rescale.small_to_rescaled(sm, small_keys, scale))

    target = targets(torch.arange(len(train), device=device), scales)  # (P, T_out, D_out)
    if recipe.standardize:
        net.in_mean.copy_(source.mean((0, 1)))
        net.in_std.copy_(source.std((0, 1)).clamp_min(1e-6))
        net.out_mean.copy_(target.mean((0, 1)))
        net.out_std.copy_(target.std((0, 1)).clamp_min(1e-6))
    functional = (FunctionalLoss(family, train, data, device, cfg.functional_bank, cfg.seed,
                                  context=recipe.context, grad_leak=recipe.grad_leak)
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
                batch_large = perturb_params({k: v[idx] for k, v in large.items()}, recipe.perturb, gen)
            if recipe.perm_augment:
                batch_large = _permuted(family, batch_large or {k: v[idx] for k, v in large.items()}, gen)
            if batch_large is None:
                src, sc, dst = source[idx], None if scales is None else scales[idx], target[idx]
            else:
                src, sc = translator.encode(batch_large)
                dst = target[idx] if sc is None else targets(idx, sc)
            src, dst = augment_pair(src, dst, cfg.mask_ratio, cfg.noise_std, cfg.augment_on)
            pred = net(src)
            loss = recipe.param * param_loss(family, pred, dst) if recipe.param > 0 else pred.new_zeros(())
            if functional is not None:
                sub = idx[: cfg.functional_pairs]
                teacher = None if recipe.perturb == 0 else {k: v[: len(sub)] for k, v in batch_large.items()}
                kl, feat = functional(translator.decode(pred[: len(sub)], None if sc is None else sc[: len(sub)]), sub,
                                      cfg.functional_images, gen, teacher)
                fn = recipe.functional * kl + recipe.features * feat
                loss = loss + fn
                fn_total += float(fn.detach())
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"translator loss became {float(loss.detach())} at epoch {epoch}; lower --lr or "
                                    f"the augmentation strength.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
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
