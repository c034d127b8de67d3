"""The translator training loop: all pairs in memory as tensors on the device, Adam + cosine.

Every ``val_every`` epochs a validation translates each held-out network's large block, assembles
begin + small + last and measures test accuracy; the best translator by mean is kept.

Under torchrun the same loop runs as DistributedDataParallel: rank r holds training pairs r, r + W,
r + 2W, ... (and their task-loss banks) on its device, every rank walks the same global batches and
computes the loss terms of its own pairs in them, weighted so that the averaged gradient is the one
process's gradient; rank 0 validates and keeps the best translator.

Example:
    >>> result = train_translator(TrainConfig(epochs=50), family, train_pairs, val_pairs, data)  # doctest: +SKIP
    >>> result.best["val_acc_mean"]                                                               # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..blocks import BlockFamily, family_of, non_finite
from ..config import TrainConfig
from ..device import pick_device
from ..distributed import World, all_sum, any_rank, world
from ..engine import network_accuracy
from ..errors import KTError
from ..pairs.store import PairSet
from ..recipes import get_recipe
from ..translators import Translator, create_translator, tokens
from .augment import Part, augment_pair, batch_noise
from .task_loss import BANK_BYTES, TaskLoss, perturb_params

State = Dict[str, torch.Tensor]
EpochHook = Callable[[int, Dict[str, float]], None]


class NonFiniteLoss(KTError):
    """The loss became NaN or inf (a sweep prunes such a trial)."""


class StoppedByMain(KTError):
    """Rank 0 stopped this training after an epoch (its epoch hook raised, e.g. a pruned sweep trial)."""


@dataclass
class TrainResult:
    translator: Translator
    best: Dict[str, float]
    history: List[Dict[str, float]] = field(default_factory=list)


def _canonicalizer(family: BlockFamily):
    canon = getattr(type(family.small_block()), "canonicalize", None)
    if canon is None:
        raise KTError(f"recipe needs canonical targets, but block {family.small!r} defines no canonicalize().")
    return canon


def _canonical(family: BlockFamily, small: State) -> State:
    return _canonicalizer(family)(small)


def _check_ranks(n_pairs: int, ranks: int) -> None:
    if n_pairs < ranks:
        raise KTError(f"{n_pairs} training pairs cannot be split over {ranks} ranks; start at most "
                      f"{n_pairs} ranks or hold out fewer pairs.")


def check_training(cfg: TrainConfig, family: BlockFamily, train: Union[PairSet, Sequence[PairSet]],
                   val: Union[PairSet, Sequence[PairSet], None]) -> None:
    """What ``train_translator`` would refuse, found in moments: before any training or MLflow run."""
    cfg.validate()
    sets = size_groups(family, train)
    for _, pairs in sets:
        fit, _ = split_holdout(pairs, None, cfg.select_holdout)
        _check_ranks(len(fit), world().size)
    pick_device(cfg.device)
    recipe = get_recipe(cfg.recipe)
    if recipe.canonical:
        _canonicalizer(family)
    create_translator(cfg.resolved_arch, family, bn_aware=recipe.bn_aware, rescale=recipe.rescale,
                      bn_stats=recipe.bn_stats, **_arch_kwargs(cfg, family, sets))


def _permuted(family: BlockFamily, large: State, gen: torch.Generator, part: Part = None) -> State:
    """Each large block with its hidden channels in a random order (the same function)."""
    ref = next(iter(large.values()))
    perm = batch_noise((ref.shape[0], family.large_hidden), gen, part, uniform=True).argsort(-1).to(ref.device)
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


@dataclass(frozen=True)
class BatchShare:
    """This rank's pairs in one global batch: their local rows and their positions in the batch."""

    rows: torch.Tensor
    pos: torch.Tensor
    total: int          # pairs in the global batch
    ranks: int
    group: int = 0      # the size group every pair of the batch comes from

    def weight(self, n: int, of: int) -> float:
        """What a mean over this rank's first ``n`` of the batch's first ``of`` pairs counts for, so that
        the ranks' average is the mean over all ``of`` (1 in one process)."""
        return self.ranks * n / of

    def part(self, n: int, of: int) -> Part:
        return self.pos[:n], of


def _moments(xs: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation over the pairs and tokens of every tensor and rank."""
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    d = flat.shape[-1]
    sums = torch.tensor(all_sum([float(len(flat)), *flat.sum(0).tolist(), *flat.pow(2).sum(0).tolist()]),
                        dtype=torch.float64, device=flat.device)   # one all-reduce: count, sums, sums of squares
    n, s, ss = float(sums[0]), sums[1: d + 1], sums[d + 1:]
    mean = s / n
    var = ((ss - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0)
    return mean.float(), var.sqrt().float()


def size_groups(family: BlockFamily, train: Union[PairSet, Sequence[PairSet]]) -> List[Tuple[BlockFamily, PairSet]]:
    """``train`` as (family, pairs) per size: one set is ``family``'s; several sets (pairs of one family at
    several hidden widths, for a translator that serves them all) each carry their own family."""
    if isinstance(train, PairSet):
        return [(family, train)]
    groups = [(family_of(t.settings), t) for t in train]
    for fam, _ in groups:
        if not family.same_but_sizes(fam):
            raise KTError(f"pair sets of family {fam.name} ({fam.large} {fam.large_hidden} -> {fam.small} "
                          f"{fam.small_hidden}) and {family.name} differ in more than their hidden widths; a "
                          f"translator serves several sizes of one family: train on pairs of one family.")
    sizes = [(f.large_hidden, f.small_hidden) for f, _ in groups]
    if len(set(sizes)) != len(sizes):
        raise KTError(f"two pair sets have the same size {max(sizes, key=sizes.count)}; give each size once "
                      f"(or merge the sets when generating).")
    return groups


class PairGroup:
    """One size's training pairs on the device: blocks, the net's input and target tokens, the task loss."""

    def __init__(self, fit: "TranslatorFit", translator: Translator, train: PairSet, data, device: torch.device,
                 bank_bytes: int) -> None:
        w, recipe = fit.world, fit.recipe
        self.recipe = recipe
        self.translator, self.family, self.n_pairs = translator, translator.family, len(train)
        mine = train.subset(torch.arange(w.rank, self.n_pairs, w.size)) if w.distributed else train
        self.large = {k: v.to(device) for k, v in mine.part("large").items()}
        small = {k: v.to(device) for k, v in mine.part("small").items()}
        self.small = _canonical(self.family, small) if recipe.canonical else small
        self.source, self.scales = translator.encode(self.large)   # (P, T_in, D_in), reused without perms
        self.target = self.targets(torch.arange(len(mine), device=device), self.scales)  # (P, T_out, D_out)
        self.task = (TaskLoss(self.family, mine, data, device, fit.cfg.task_bank, fit.cfg.seed, context=recipe.context,
                              grad_leak=recipe.grad_leak, pairs_total=self.n_pairs, bank_bytes=bank_bytes)
                     if recipe.distill > 0 or recipe.feature_match > 0 else None)

    def targets(self, rows: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Target tokens of pairs ``rows``, in the coordinates the translator writes in."""
        return tokens.encode_target(self.family, {k: v[rows] for k, v in self.small.items()}, scale)

    def batch(self, idx: torch.Tensor, gen: torch.Generator, part: Part):
        """(source tokens, scales, target tokens, perturbed large blocks or None) of pairs ``idx``."""
        recipe, batch_large = self.recipe, None
        if recipe.perturb > 0:
            batch_large = perturb_params({k: v[idx] for k, v in self.large.items()}, recipe.perturb, gen, part)
        if recipe.perm_augment:
            batch_large = _permuted(self.family, batch_large or {k: v[idx] for k, v in self.large.items()}, gen, part)
        if batch_large is None:
            return self.source[idx], None if self.scales is None else self.scales[idx], self.target[idx], None
        src, sc = self.translator.encode(batch_large)
        return src, sc, self.target[idx] if sc is None else self.targets(idx, sc), batch_large


class TranslatorFit:
    """One translator, this rank's training pairs as tensors on the device, and one optimisation step.

    ``train``: one pair set, or several of one family at different hidden widths (``size_groups``): the
    translator then serves every size, and each batch comes from one size.
    """

    def __init__(self, cfg: TrainConfig, family: BlockFamily, train: Union[PairSet, Sequence[PairSet]], data,
                 device: torch.device, ranks: Optional[World] = None) -> None:
        self.cfg, self.family, self.recipe = cfg, family, get_recipe(cfg.recipe)
        self.world = ranks or world()
        recipe, sets = self.recipe, size_groups(family, train)
        for _, pairs in sets:
            _check_ranks(len(pairs), self.world.size)
        self.translator = create_translator(cfg.resolved_arch, family, bn_aware=recipe.bn_aware, rescale=recipe.rescale,
                                            bn_stats=recipe.bn_stats, **_arch_kwargs(cfg, family, sets))
        self.net = self.translator.net.to(device)
        total = sum(len(p) for _, p in sets)
        self.groups = [PairGroup(self, self.translator.at_size(f.small_hidden, f.large_hidden), pairs, data, device,
                                 BANK_BYTES * len(pairs) // total) for f, pairs in sets]
        if recipe.standardize:
            self._standardize()
        self.model = self.net
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                                                 broadcast_buffers=False)
        # The fused kernel (one pass per tensor) took a fifth of the for-each Adam's time on a CPU.
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    fused=device.type in ("cpu", "cuda"))

    def _standardize(self) -> None:
        net = self.net
        with torch.no_grad():
            for (mean, std), xs in (((net.in_mean, net.in_std), [g.source for g in self.groups]),
                                    ((net.out_mean, net.out_std), [g.target for g in self.groups])):
                m, s = _moments(xs)
                mean.copy_(m)
                std.copy_(s.clamp_min(1e-6))

    def step(self, share: BatchShare, gen: torch.Generator, epoch: int) -> Tuple[float, float]:
        """One Adam step on this rank's pairs of a batch; returns their (loss, task loss) share.

        A rank with no pair in the batch still runs one pair at weight 0: every rank takes part in
        each gradient all-reduce."""
        cfg, recipe, group = self.cfg, self.recipe, self.groups[share.group]
        k = len(share.rows)
        if k == 0:
            share = BatchShare(share.rows.new_zeros(1), share.pos.new_zeros(1), share.total, share.ranks, share.group)
        idx = share.rows.to(group.source.device)
        src, sc, dst, batch_large = group.batch(idx, gen, share.part(len(idx), share.total))
        src, dst = augment_pair(src, dst, cfg.mask_ratio, cfg.noise_std, cfg.augment_on, gen,
                                share.part(len(idx), share.total))
        pred = self.model(src, **_size_kwargs(group))
        loss = 0.0 * pred.sum()   # every parameter in the graph, whichever terms this rank has
        if recipe.param > 0:
            loss = loss + share.weight(k, share.total) * recipe.param * param_loss(group.family, pred, dst)
        task = 0.0
        n_sub = min(cfg.task_pairs, share.total)
        k_sub = int((share.pos[:k] < n_sub).sum())
        if group.task is not None and k_sub:
            teacher = None if recipe.perturb == 0 else {a: b[:k_sub] for a, b in batch_large.items()}
            small = group.translator.decode(pred[:k_sub], None if sc is None else sc[:k_sub])
            kl, feat = group.task(small, idx[:k_sub], cfg.task_images, gen, teacher, part=share.part(k_sub, n_sub))
            term = share.weight(k_sub, n_sub) * (recipe.distill * kl + recipe.feature_match * feat)
            loss, task = loss + term, float(term.detach())
        if any_rank(not bool(torch.isfinite(loss))):   # every rank stops at the same step
            value = float(loss.detach())
            raise NonFiniteLoss(f"translator loss became {value if not math.isfinite(value) else 'non-finite on another rank'} "
                                f"at epoch {epoch}; lower --lr or the augmentation strength.")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), recipe.grad_clip)
        self.opt.step()
        return float(loss.detach()), task

    def shares(self, gen: torch.Generator) -> List[BatchShare]:
        """This rank's part of each batch of one pass over all ranks' pairs in a random order (with
        several sizes: each size's batches, all of them in a random order)."""
        w, size, out = self.world, self.cfg.batch_size, []
        for g, group in enumerate(self.groups):
            order = torch.randperm(group.n_pairs, generator=gen)
            for lo in range(0, group.n_pairs, size):
                batch = order[lo: lo + size]
                pos = (batch % w.size == w.rank).nonzero().flatten()
                out.append(BatchShare(batch[pos] // w.size, pos, len(batch), w.size, g))
        if len(self.groups) > 1:
            out = [out[i] for i in torch.randperm(len(out), generator=gen)]
        return out

    def epoch(self, epoch: int, gen: torch.Generator) -> Dict[str, float]:
        """One pass over the pairs; returns the epoch's mean losses (over every rank)."""
        self.net.train()
        shares = self.shares(gen)
        # Each step draws from its own generator, so a rank with nothing to draw for stays in step.
        base = int(torch.randint(2 ** 62, (), generator=gen))
        losses = [self.step(share, torch.Generator().manual_seed(base + i), epoch) for i, share in enumerate(shares)]
        loss, task = (v / self.world.size for v in all_sum([sum(a for a, _ in losses), sum(b for _, b in losses)]))
        metrics = {"train_loss": loss / len(losses), "lr": self.opt.param_groups[0]["lr"]}
        if any(g.task is not None for g in self.groups):
            metrics["task_loss"] = task / len(losses)
        return metrics


def _arch_kwargs(cfg: TrainConfig, family: BlockFamily, groups: Sequence[Tuple[BlockFamily, PairSet]]) -> Dict[str, object]:
    """The config's arch kwargs, plus what the pairs decide: a multi-size translator's ``sizes`` where
    there are several groups, and channel_set's ``kernel_map`` where the two blocks' kernels differ."""
    kw = cfg.arch_kwargs()
    if cfg.resolved_arch == "channel_set" and family.kernels_differ:
        kw["kernel_map"] = True
    if len(groups) > 1:
        kw["sizes"] = [[f.large_hidden, f.small_hidden] for f, _ in groups]
    return kw


def _size_kwargs(group: PairGroup) -> Dict[str, int]:
    return {"small_hidden": group.family.small_hidden} if group.translator.sizes else {}


def check_finite(translator: Translator) -> None:
    """Refuse a translator with a NaN or inf weight (one line), e.g. after a run that diverged."""
    bad = non_finite(translator.net.state_dict())
    if bad:
        raise KTError(f"the trained translator's {bad[0]} is not finite, so it is not registered; lower --lr or "
                      f"the augmentation strength and train again.")


def validate_translator(translator: Translator, family: BlockFamily, val: PairSet, data,
                        device: torch.device) -> Dict[str, float]:
    """Mean, min and max test accuracy of the ``val`` networks with their large blocks translated."""
    acc = network_accuracy(family, val.part("begin"), translator.translate_batch(val.part("large")),
                           val.part("last"), data, device=device)
    return {"val_acc_mean": float(acc.mean()), "val_acc_min": float(acc.min()), "val_acc_max": float(acc.max())}


def validate_sizes(fit: TranslatorFit, vals: Sequence[PairSet], data, device: torch.device) -> Dict[str, float]:
    """``validate_translator`` per size; with several, the mean over sizes (each size counts once),
    the lowest minimum, the highest maximum, and each size's mean as ``val_acc_mean_<H>to<M>``."""
    scores = [validate_translator(g.translator, g.family, v, data, device) for g, v in zip(fit.groups, vals)]
    if len(scores) == 1:
        return scores[0]
    out = {"val_acc_mean": sum(s["val_acc_mean"] for s in scores) / len(scores),
           "val_acc_min": min(s["val_acc_min"] for s in scores), "val_acc_max": max(s["val_acc_max"] for s in scores)}
    out.update({f"val_acc_mean_{g.family.large_hidden}to{g.family.small_hidden}": s["val_acc_mean"]
                for g, s in zip(fit.groups, scores)})
    return out


def train_translator(cfg: TrainConfig, family: BlockFamily, train: Union[PairSet, Sequence[PairSet]],
                     val: Union[PairSet, Sequence[PairSet], None], data,
                     on_epoch: Optional[EpochHook] = None, progress: bool = True) -> TrainResult:
    """Train a translator on ``train`` pairs; validate on ``val`` networks (see ``split_holdout``).

    Several pair sets (lists, ``val[i]`` the held-out networks of ``train[i]``): one translator for all
    their sizes (``size_groups``). Under torchrun every rank calls this with the same arguments; rank 0's
    result holds the kept translator and its scores, the other ranks' only their own copy of the last weights."""
    cfg.validate()
    single = isinstance(train, PairSet)
    trains, vals = ([train], [val]) if single else (list(train), list(val or [None] * len(train)))
    split = [split_holdout(t, v, cfg.select_holdout) for t, v in zip(trains, vals)]
    trains, vals = [t for t, _ in split], [v for _, v in split]
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fit = TranslatorFit(cfg, family, trains[0] if single else trains, data, device)
    main = fit.world.is_main
    torch.manual_seed(cfg.seed + fit.world.rank)   # dropout: each rank its own masks
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(fit.opt, T_max=cfg.epochs)
    best: Dict[str, float] = {"val_acc_mean": -math.inf}
    best_state, history = None, []
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", dynamic_ncols=True, disable=not (progress and main))
    for epoch in bar:
        metrics = fit.epoch(epoch, gen)
        sched.step()
        stop = None
        if main:
            try:
                if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                    metrics.update(validate_sizes(fit, vals, data, device))
                    if metrics["val_acc_mean"] > best["val_acc_mean"]:
                        best = {k: v for k, v in metrics.items() if k.startswith("val_acc_")}
                        best["epoch"] = float(epoch)
                        best_state = copy.deepcopy(fit.net.state_dict())
                bar.set_postfix({k: round(v, 4) for k, v in metrics.items() if k in ("train_loss", "val_acc_mean")})
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
            except BaseException as e:  # e.g. a pruned trial: every rank leaves the loop after this epoch
                stop = e
        history.append(metrics)
        if any_rank(stop is not None):
            raise stop if stop is not None else StoppedByMain(f"rank 0 stopped the training after epoch {epoch}.")
    if main and best_state is None:
        raise NonFiniteLoss("no validation gave a finite accuracy; the translator diverged: lower --lr and train again.")
    if best_state is not None:
        fit.net.load_state_dict(best_state)
    fit.net.eval()
    return TrainResult(fit.translator, best, history)
