"""The residual family of the KT paper: a conv stem, a residual block, a conv+linear head.

``BasicBlock`` (two conv+BN, residual) is the large block; ``BottleneckBlock`` (conv -> ReLU -> conv,
no BN, residual) is the small one. Shapes come from the family's config, never from constants here.
Each block also knows its own function-preserving symmetries (used by the translation recipes).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kind import TwoLayerBlock
from .layers import (
    StackedBatchNorm2d,
    StackedLinear,
    channels_last_grad,
    conv,
    conv_bn_relu,
    conv_out_size,
    fork,
    subsample,
)
from .native import member_conv2d_max_pool
from .native_ops import gather_members, leaky_relu_grad


class BeginBlock(nn.Module):
    """conv(k) -> BN -> ReLU -> MaxPool(3, stride 2, pad 1).

    Two exact shortcuts keep BN off the block's largest tensor (full resolution, before pooling):
    in eval mode BN is folded into the conv (scaled weights, a shift added after pooling); in training,
    a caller that knows its batch's input patch moments (``patch_moments``) passes them, and the batch
    statistics of the conv's output follow from them in closed form (the conv is linear in its
    input), so BN is folded there too, with the same values, gradients and running statistics.
    """

    def __init__(self, cin: int, width: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.members, self.kernel = members, kernel
        self.conv = conv(cin, width, kernel, members=members)
        self.bn = StackedBatchNorm2d(width, members)

    def forward(self, x: torch.Tensor, moments: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None) -> torch.Tensor:
        if self.training and moments is None:
            # max-pool then ReLU: the same values and gradients as ReLU then max-pool (ReLU is monotone
            # and the pooling picks the same element), with the ReLU on a 4x smaller tensor.
            return F.relu(F.max_pool2d(self.bn(self.conv(x)), 3, stride=2, padding=1), inplace=True)
        return self._pooled(x, *self._folded(moments), relu=True)

    @staticmethod
    def activate(pre: torch.Tensor) -> torch.Tensor:
        """``preactivation`` -> the block's output."""
        return F.relu(pre)

    def preactivation(self, x: torch.Tensor, moments: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None) -> torch.Tensor:
        """max-pool(BN(conv(x))) before the ReLU, BN folded (running statistics in eval mode, the
        batch's from ``moments`` in training). ``forward`` is its ReLU."""
        return self._pooled(x, *self._folded(moments))

    def _folded(self, moments: Optional[Tuple[torch.Tensor, torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The conv weight with BN's scale folded in, and BN's shift (the batch's statistics from
        ``moments`` in training, the running ones in eval mode)."""
        if self.training:
            mean, var = self._batch_stats(*moments)
        else:
            mean, var = self.bn.running_mean, self.bn.running_var
        scale, shift = self.bn.folded(mean, var)
        return self.conv.weight * scale[:, None, None, None], shift  # keeps the conv weight's memory format

    def _pooled(self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """max-pool(conv(x; weight)) + shift, ReLU'd if ``relu``. A per-channel constant commutes with
        max-pooling, so the shift is added on the 4x smaller tensor."""
        if self.conv.interleaved and not x.requires_grad:  # fused: no full-resolution tensor in memory
            if relu:   # the shift and ReLU in the kernel's store too
                return member_conv2d_max_pool(x, weight, self.members, (3, 2, 1), shift)
            y = member_conv2d_max_pool(x, weight, self.members, (3, 2, 1))
        else:
            y = F.max_pool2d(self.conv.run(x, weight), 3, stride=2, padding=1)
        y = y + shift[:, None, None]
        return F.relu(y, inplace=True) if relu else y

    def _batch_stats(self, s1: torch.Tensor, s2: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The conv output's batch mean and (biased) variance from the input patches' moment sums.

        ``s1`` ``(members, P)`` and ``s2`` ``(members, P, P)`` sum the patches and their outer products
        over the batch and positions (``count`` patches per member), in float64 (see ``patch_moments``).
        Also updates the running statistics exactly as ``nn.BatchNorm2d`` does.
        """
        mu = s1 / count
        cov = (s2 / count - mu[:, :, None] * mu[:, None, :]).to(self.conv.weight.dtype)
        w = self.conv.weight.reshape(self.members, -1, mu.shape[-1])  # (members, out, P)
        mean = torch.einsum("kop,kp->ko", w, mu.to(w.dtype)).reshape(-1)
        var = torch.einsum("kop,kpq,koq->ko", w, cov, w).reshape(-1).clamp_min(0)
        self.bn.track(mean, var, count)
        return mean, var

    def patch_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per image ``(N, C, H, W)``: the sum of its conv patches ``(N, P)`` and of their outer products
        ``(N, P, P)``, in float64. Summing rows over a batch gives ``forward``'s ``moments``."""
        k, pad = self.kernel, self.kernel // 2
        h, w = images.shape[-2:]
        s1, s2 = [], []
        for chunk in F.pad(images, (pad, pad, pad, pad)).split(1024):  # chunks stay in cache
            # Patch element (c, i, j) over all positions is a shifted view; products of views are the
            # outer products summed over positions (cheaper than materialising the patches).
            views = [chunk[:, c, i: i + h, j: j + w] for c in range(chunk.shape[1]) for i in range(k) for j in range(k)]
            m2 = chunk.new_empty(len(chunk), len(views), len(views))
            for a, va in enumerate(views):
                for b in range(a, len(views)):
                    m2[:, a, b] = m2[:, b, a] = (va * views[b]).sum((-2, -1))
            s1.append(torch.stack([v.sum((-2, -1)) for v in views], 1))
            s2.append(m2)
        return torch.cat(s1).double(), torch.cat(s2).double()


class _ReluLeakyGrad(torch.autograd.Function):
    """One pass forward, where ``relu(x) + (leak - leak.detach())`` took four (and four backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, native: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope, ctx.native = slope, native
        return F.relu(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        if ctx.native:   # one pass, where the expression below takes five
            return leaky_relu_grad(x, g, ctx.slope), None, None
        return torch.where(x > 0, g, torch.where(x < 0, g * ctx.slope, 0.0)), None, None


def relu_leaky_grad(x: torch.Tensor, slope: float, native: bool = False) -> torch.Tensor:
    """``relu(x)`` in value; in gradient, ``slope`` where ``x < 0``, 1 where ``x > 0`` (0 at 0).
    ``native``: the backward pass in ``native_ops.leaky_relu_grad`` (CPU; the same bits)."""
    return _ReluLeakyGrad.apply(x, slope, native)


class BasicBlock(TwoLayerBlock):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + x): the paper's large block, and a pruned small one."""

    layers = {"conv1.weight": "bn1", "conv2.weight": "bn2"}
    holds_shifts = True

    def __init__(self, width: int, hidden: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(width, hidden, kernel, members=members)
        self.bn1 = StackedBatchNorm2d(hidden, members)
        self.conv2 = conv(hidden, width, kernel, members=members)
        self.bn2 = StackedBatchNorm2d(width, members)

    def forward(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """``stride``: return only every stride-th position (all a strided reader looks at). In eval
        mode conv2 then computes only those; in training BN2 needs its statistics over all positions."""
        x, skip = fork(x, stride)
        out = conv_bn_relu(self.conv1, self.bn1, x)
        if self.training:
            y = self.bn2.strided(self.conv2(out), stride)
        else:
            y = self.bn2(self.conv2(out, stride))  # a "same" conv at stride s: conv(x)[::s, ::s]
        return F.relu(y + skip, inplace=True)


class BottleneckBlock(TwoLayerBlock):
    """ReLU(conv(ReLU(conv(x))) + x) with a narrow hidden width and no BN: the paper's small block."""

    layers = {"conv1.weight": None, "conv2.weight": None}

    def __init__(self, width: int, hidden: int, kernel: int, members: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(width, hidden, kernel, members=members)
        self.conv2 = conv(hidden, width, kernel, members=members)
        # Gradient of the hidden ReLU below zero (the forward value is unchanged). A unit that is off
        # for every input gets no gradient through a plain ReLU and stays off for good; a translator
        # trained through this block can use a small leak to bring such units back.
        self.grad_leak = 0.0

    def forward(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """``stride``: compute only every stride-th output position (no BN, so exact in training too)."""
        x, skip = fork(x, stride)
        h = self.conv1(x)
        h = F.relu(h, inplace=True) if self.grad_leak == 0 else relu_leaky_grad(h, self.grad_leak, self.conv1.interleaved)
        y = self.conv2(h, stride)  # a "same" conv at stride s: conv(x)[::s, ::s]
        return F.relu(y + skip, inplace=True)

    @staticmethod
    def canonicalize(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One representative of the weights' symmetry class (same function, fixed scale and order).

        ReLU is positively homogeneous, so hidden channel j's input filter can be scaled by a > 0
        and its output weights by 1/a; we pick a so both have the same norm. Hidden channels can be
        permuted; we sort them by that (now invariant) norm, largest first. Leading batch axes allowed.
        """
        w1, w2 = state["conv1.weight"], state["conv2.weight"]  # (..., h, c, k, k), (..., c, h, k, k)
        n1 = w1.flatten(-3).norm(dim=-1).clamp_min(1e-12)  # (..., h)
        n2 = w2.transpose(-4, -3).flatten(-3).norm(dim=-1).clamp_min(1e-12)  # (..., h)
        a = (n2 / n1).sqrt()
        w1 = w1 * a[..., :, None, None, None]
        w2 = w2 / a[..., None, :, None, None]
        order = (n1 * n2).argsort(dim=-1, descending=True)
        w1 = torch.take_along_dim(w1, order[..., :, None, None, None], dim=-4)
        w2 = torch.take_along_dim(w2, order[..., None, :, None, None], dim=-3)
        return {**state, "conv1.weight": w1, "conv2.weight": w2}


class LastBlock(nn.Module):
    """conv1x1(stride 2) -> BN -> ReLU -> flatten -> Linear(num_classes)."""

    def __init__(self, width: int, last_width: int, spatial: int, num_classes: int, members: int = 1) -> None:
        super().__init__()
        self.members = members
        # A strided 1x1 conv is a subsampling then a 1x1 conv. Written that way because torch 2.14's CPU
        # backward of a strided 1x1 conv on channels-last input returns wrong weight gradients.
        self.stride = 2
        self.conv = conv(width, last_width, 1, members=members)
        self.bn = StackedBatchNorm2d(last_width, members)
        out = conv_out_size(spatial, 1, self.stride, 0)
        self.fc = StackedLinear(last_width * out * out, num_classes, members=members)

    def forward(self, x: torch.Tensor, subsampled: bool = False) -> torch.Tensor:
        """``subsampled``: ``x`` holds only every stride-th position already (see ``KTNetwork.forward``)."""
        if not subsampled:
            x = subsample(x, self.stride)
        x = conv_bn_relu(self.conv, self.bn, x)
        if self.conv.interleaved:  # each member's features in (C, H, W) order, read in place
            return self.fc.on_interleaved(x)
        return self.fc(channels_last_grad(x).reshape(x.shape[0], -1))


class KTNetwork(nn.Module):
    """begin -> block -> last. Input ``(B, members*C, H, W)``, output ``(B, members*num_classes)``."""

    interleaved = False  # the channel layout of the input and activations (``layers.set_interleaved``)

    def __init__(self, begin: nn.Module, block: nn.Module, last: nn.Module, members: int = 1) -> None:
        super().__init__()
        self.members = members
        self.begin, self.block, self.last = begin, block, last

    def stack_input(self, x: torch.Tensor) -> torch.Tensor:
        """Per-member images ``(B, members, C, H, W)`` -> this network's input, in its channel layout."""
        b, k, c, h, w = x.shape
        if self.interleaved:
            x = x.transpose(1, 2)
        return x.reshape(b, k * c, h, w).contiguous(memory_format=torch.channels_last)

    def gather_input(self, images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``stack_input(images[idx])``, ``idx`` ``(B, members)`` (each member's own images); interleaved
        (native kernels), in one pass where the gather and the layout copy take two."""
        if self.interleaved:
            return gather_members(images[:, None], idx, torch.zeros(len(idx), dtype=torch.long))
        return self.stack_input(images[idx])

    def forward(self, x: torch.Tensor, moments: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None) -> torch.Tensor:
        """``moments``: the batch's input patch moments, for the begin block's exact BN shortcut."""
        return self.tail(self.begin(x) if moments is None else self.begin(x, moments))

    def tail(self, begin: torch.Tensor) -> torch.Tensor:
        """block -> last on the begin block's output (networks sharing a begin block share its output)."""
        if not getattr(self.block, "takes_stride", False):  # any module, e.g. nn.Identity for "block removed"
            return self.last(self.block(begin))
        # The last block reads every stride-th position only, so the block computes no others.
        return self.last(self.block(begin, stride=self.last.stride), subsampled=True)


def stem_out_size(image_size: int) -> int:
    return conv_out_size(image_size, 3, 2, 1)
