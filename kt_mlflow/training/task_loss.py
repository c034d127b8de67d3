"""The task loss: what a translated block does inside its pair's own network, on training images.

Only translator training sees images; translation stays data-free.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..blocks import BlockFamily, KTNetwork, fold_members
from ..blocks.layers import set_interleaved
from ..blocks.native import use_native
from ..blocks.native_ops import gather_members
from ..distributed import all_sum
from ..pairs.store import PairSet
from .augment import Part, batch_noise

BANK_BYTES = 4 << 30   # the feature banks' memory budget
MIN_BANK = 16          # fewer images per pair than this: no bank, features computed per step


class TaskLoss:
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

    On a CPU the networks run the native member-interleaved convolutions (``blocks.native``), as
    generation does: the same function, other float rounding.

    Under DistributedDataParallel each rank holds its own pairs' banks; ``pairs_total`` (all ranks'
    pairs) sizes them, and every random draw is made for the whole batch (``part``), so a rank computes
    exactly its rows of what one process would.
    """

    def __init__(self, family: BlockFamily, train: PairSet, data, device: torch.device, bank: int,
                 seed: int, chunk: int = 32, context: float = 0.0, grad_leak: float = 0.0,
                 pairs_total: Optional[int] = None, bank_bytes: int = BANK_BYTES) -> None:
        self.family, self.device, self.context, self.grad_leak = family, device, context, grad_leak
        self.stride = family.last().stride
        self.native = use_native("auto", device, family.name, family.native_kernels)
        # The feature banks stay within ``bank_bytes``: fewer images per pair when there are many pairs (2,000
        # pairs of the paper's family still get 360 images each); past MIN_BANK images per pair, no bank:
        # each step computes its pairs' begin-block features for its images (memory: the images only).
        side = family.grid  # begin-block output (pre-activation bank), then block output (strided)
        per_image = 4 * family.width * (side ** 2 + (-(-side // self.stride)) ** 2)
        fits = bank_bytes // max(1, (pairs_total or len(train)) * per_image)
        self.banked = fits >= MIN_BANK
        bank = min(bank, fits) if self.banked else bank
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:bank]
        self.x = data.train_x[pick].to(device)
        self.begin = {k: v.to(device) for k, v in train.part("begin").items()}
        self.large = {k: v.to(device) for k, v in train.part("large").items()}
        self.last = {k: v.to(device) for k, v in train.part("last").items()}
        self._nets: Dict[object, torch.nn.Module] = {}
        n = len(train)
        pres, outs, teacher, stds, square_sum, count = [], [], [], [], 0.0, 0
        with torch.no_grad():
            for lo in range(0, n, chunk):
                idx = torch.arange(lo, min(n, lo + chunk), device=device)
                pre = self._preactivation(idx, self.x)                                # (k, m, C, H, W)
                out, logits = self._teacher(idx, pre, {a: b[idx] for a, b in self.last.items()})
                stds.append(pre.transpose(1, 2).flatten(2).std(-1))                    # (k, C)
                square_sum, count = square_sum + float(out.double().pow(2).sum()), count + out.numel()
                if self.banked:
                    pres.append(pre)
                    outs.append(out)
                    teacher.append(logits)
        self.pre_std = torch.cat(stds)                                                  # (P, C)
        if self.banked:
            # contiguous: a step gathers its entries in place (``gather_members``), never copying a bank
            self.pre, self.outs, self.teacher = (torch.cat(t).contiguous() for t in (pres, outs, teacher))
        square_sum, count = all_sum([square_sum, float(count)])
        self.out_scale = max(square_sum / count, 1e-12)                               # over every rank's pairs

    def _base(self, k: int) -> KTNetwork:
        if ("base", k) not in self._nets:
            net = self.family.base_network(k).to(self.device).eval()
            self._nets["base", k] = set_interleaved(net, self.native)
        return self._nets["base", k]

    def _preactivation(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The begin block's pre-activation output of pairs ``idx`` on images ``x``: ``(k, m, C, H, W)``."""
        k, net = len(idx), self._base(len(idx))
        with torch.no_grad():
            net.begin.load_state_dict(fold_members(self.begin, idx))
            pre = net.begin.preactivation(net.stack_input(x[:, None].expand(-1, k, -1, -1, -1)))  # (m, k*C, H, W)
        return _pairs(pre, k, self.native)

    def _teacher(self, idx: torch.Tensor, pre: torch.Tensor,
                 last: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The large blocks' (strided) outputs ``(k, m, C, h, w)`` and the teacher logits ``(k, m, classes)``."""
        k, m, net = len(idx), pre.shape[1], self._base(len(idx))
        with torch.no_grad():
            net.block.load_state_dict(fold_members({a: b[idx] for a, b in self.large.items()}))
            net.last.load_state_dict(fold_members(last))
            out = net.block(net.begin.activate(_members(pre, self.native)), stride=self.stride)
            logits = net.last(out, subsampled=True).view(m, k, -1).transpose(0, 1)
        return _pairs(out, k, self.native), logits

    def _net(self, k: int) -> KTNetwork:
        if k not in self._nets:
            self._nets[k] = KTNetwork(torch.nn.Identity(), self.family.small_block(k), self.family.last(k), k)
            set_interleaved(self._nets[k].to(self.device).eval(), self.native)
            if hasattr(self._nets[k].block, "grad_leak"):
                self._nets[k].block.grad_leak = self.grad_leak
        return self._nets[k]

    def _teacher_block(self, k: int) -> torch.nn.Module:
        if -k not in self._nets:  # negative keys: large blocks, positive: small-block networks
            self._nets[-k] = set_interleaved(self.family.large_block(k).to(self.device).eval(), self.native)
        return self._nets[-k]

    def __call__(self, small: Dict[str, torch.Tensor], idx: torch.Tensor, n_images: int,
                 gen: torch.Generator, large: Optional[Dict[str, torch.Tensor]] = None,
                 part: Part = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction KL, relative feature MSE) of the translated ``small`` blocks of pairs ``idx``.

        ``large`` (stacked, one per pair in ``idx``) replaces the pairs' own large blocks as the teacher,
        e.g. perturbed copies; the teacher is then computed on the fly instead of read from the bank.
        """
        k = len(idx)
        pick = torch.randint(len(self.x), (n_images,), generator=gen).to(self.device)
        last = {a: b[idx] for a, b in self.last.items()}
        if large is None and not self.banked:   # no stored teacher: the pairs' own, computed now
            large = {a: b[idx] for a, b in self.large.items()}
        scale = shift = None
        if self.context > 0:
            c = self.pre_std.shape[1]
            scale = (1 + self.context * self._noise((k, c), gen, part)).clamp_min(0.1)
            shift = self.context * self._noise((k, c), gen, part) * self.pre_std[idx]
            last = perturb_params(last, self.context, gen, part)
            if large is None:
                large = {a: b[idx] for a, b in self.large.items()}
        net, feats, last = self._net(k), self._features(idx, pick, scale, shift), fold_members(last)
        out = functional_call(net.block, fold_members(small), (feats,), {"stride": self.stride})
        student = functional_call(net.last, last, (out,), {"subsampled": True})
        if large is None:
            target = self._gathered(self.outs, idx, pick)
            teacher = _entries(self.teacher, idx, pick).transpose(0, 1).reshape(n_images * k, -1)
        else:
            with torch.no_grad():
                target = functional_call(self._teacher_block(k), fold_members(large), (feats,), {"stride": self.stride})
                teacher = functional_call(net.last, last, (target,), {"subsampled": True}).view(n_images * k, -1)
        kl = F.kl_div(F.log_softmax(student.view(n_images * k, -1), -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="batchmean")
        return kl, _Mse.apply(out, target) / self.out_scale

    def _features(self, idx: torch.Tensor, pick: torch.Tensor, scale: Optional[torch.Tensor],
                  shift: Optional[torch.Tensor]) -> torch.Tensor:
        """The block's input for images ``pick`` of pairs ``idx``, in the networks' layout: the begin
        block's output, its BN affine perturbed by ``scale``/``shift`` ``(k, C)`` (or not: None)."""
        if self.banked and self.native:   # the conv families' begin block: ReLU (BeginBlock.activate)
            return gather_members(self.pre, idx, pick, scale, shift, relu=True)
        pre = _entries(self.pre, idx, pick) if self.banked else self._preactivation(idx, self.x[pick])
        if scale is not None:
            pre = pre * scale[:, None, :, None, None] + shift[:, None, :, None, None]
        return _members(self._base(len(idx)).begin.activate(pre), self.native)

    def _gathered(self, bank: torch.Tensor, idx: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """Bank entries of pairs ``idx`` for images ``pick`` in the networks' layout (k x n entries, not k banks)."""
        if self.native:
            return gather_members(bank, idx, pick)
        return _members(_entries(bank, idx, pick), self.native)

    def _noise(self, shape: Tuple[int, ...], gen: torch.Generator, part: Part) -> torch.Tensor:
        return batch_noise(shape, gen, part).to(self.device)


class _Mse(torch.autograd.Function):
    """``F.mse_loss(a, b)`` for a target ``b`` without gradient, its gradient laid out as ``a`` is.

    ``mse_loss``'s CPU backward returns a contiguous (NCHW) gradient for channels-last features, and
    every layer below then mixes layouts: the block's ReLU backward alone took 0.6 ms per step instead of 0.04.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a - b
        ctx.save_for_backward(d)
        return d.square().mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (d,) = ctx.saved_tensors
        return d * (2 * g / d.numel()), None


def _entries(bank: torch.Tensor, idx: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """A per-pair bank's entries for pairs ``idx`` and images ``pick``: ``(len(idx), len(pick), ...)``."""
    return bank[idx[:, None], pick[None, :]]


def _members(t: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Per-pair tensors ``(k, n, C, H, W)`` -> a ``k``-member network's layout ``(n, k*C, H, W)``,
    channels-last: member major, or ``interleaved`` (channel ``c*k + m``, see ``layers.set_interleaved``)."""
    k, n, c, h, w = t.shape
    if interleaved:   # one copy: (n, H, W, C, k) in memory is the interleaved channels-last tensor
        return t.permute(1, 3, 4, 2, 0).reshape(n, h, w, c * k).permute(0, 3, 1, 2)
    return t.transpose(0, 1).reshape(n, k * c, h, w).contiguous(memory_format=torch.channels_last)


def _pairs(y: torch.Tensor, k: int, interleaved: bool = False) -> torch.Tensor:
    """A ``k``-member network's activations ``(n, k*C, H, W)`` -> per pair ``(k, n, C, H, W)`` (``_members``' inverse)."""
    n, kc, h, w = y.shape
    if interleaved:
        return y.reshape(n, kc // k, k, h, w).permute(2, 0, 1, 3, 4)
    return y.reshape(n, k, kc // k, h, w).transpose(0, 1)


def perturb_params(state: Dict[str, torch.Tensor], strength: float, gen: torch.Generator,
                   part: Part = None) -> Dict[str, torch.Tensor]:
    """Nearby networks: every weight and bias (conv, linear, BN affine) multiplied by
    ``1 + strength * N(0, 1)`` element-wise, BN statistics kept. With a teacher recomputed from them,
    each is a new, slightly different network to translate: unlimited examples of the same task."""
    out = dict(state)
    for name, t in state.items():
        if t.is_floating_point() and name.endswith((".weight", ".bias")):  # not the BN running statistics
            noise = batch_noise(t.shape, gen, part).to(t.device, t.dtype)
            out[name] = t * (1 + strength * noise)
    return out
