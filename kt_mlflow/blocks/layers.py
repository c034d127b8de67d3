"""Layers that hold ``members`` independent copies of themselves side by side.

Every tensor keeps the member axis folded into dim 0 (conv weights ``(members*out, in, k, k)``,
BN vectors ``(members*C,)``, linear weights ``(members*out, in)``) and activations carry it folded
into the channel axis ``(B, members*C, H, W)``. With ``members=1`` these are exactly the ordinary
PyTorch layers, so one model definition serves a user's single network and the vectorised trainer
that trains K networks in one process: grouped convolutions keep the members apart, and
``BatchNorm2d`` over ``members*C`` channels keeps running statistics per member.

On a CPU the trainer switches a stacked network to interleaved activations (``set_interleaved``:
channel ``c*members + m``), where convolutions run ``native.member_conv2d``; parameters and state
dicts stay member major in both layouts.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .native import (
    member_conv2d,
    member_conv2d_shift_relu,
    member_linear,
    member_order,
    stacked_order,
)
from .native_ops import batch_norm_relu, batch_stats, bn_input_grad


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity; its backward hands the gradient on in channels-last memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def channels_last_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, with its gradient laid out channels-last like the activations.

    A flatten (or a strided slice: see ``subsample``) hands back a gradient in the default layout;
    BatchNorm's and ReLU's CPU backward passes on channels-last activations with such a gradient take
    a strided path about five times slower (13.5 against 2.8 ms for BN + ReLU on 128 x 96 x 14 x 14).
    Put before a flatten, one copy of the gradient turns them back into the fast path."""
    return _ChannelsLastGrad.apply(x) if x.requires_grad and x.dim() == 4 else x


class _Subsample(torch.autograd.Function):
    """``x[:, :, ::s, ::s]``; its backward scatters into a channels-last zero tensor (no layout copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int) -> torch.Tensor:
        ctx.shape, ctx.s = x.shape, s
        return x[:, :, ::s, ::s]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _spread(grad, ctx.shape, ctx.s), None


def _spread(grad: torch.Tensor, shape: torch.Size, s: int) -> torch.Tensor:
    """``grad`` at every ``s``-th position of a channels-last zero tensor of ``shape``."""
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last).zero_()
    out[:, :, ::s, ::s] = grad
    return out


def subsample(x: torch.Tensor, s: int) -> torch.Tensor:
    """Every ``s``-th position of ``(B, C, H, W)``, with a channels-last gradient (see ``channels_last_grad``)."""
    if s == 1:
        return x
    return _Subsample.apply(x, s) if x.requires_grad else x[:, :, ::s, ::s]


class _Fork(torch.autograd.Function):
    """``(x, x[:, :, ::s, ::s])``: a block's input, read whole by its first conv and added back subsampled.
    Backward adds the subsampled gradient into the whole one's kept positions, in place (a tensor made
    for this node alone), where ``subsample`` and autograd's sum of the two take two whole passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: int):
        ctx.s, ctx.shape = s, x.shape
        return x.view_as(x), x[:, :, ::s, ::s]

    @staticmethod
    def backward(ctx, g: Optional[torch.Tensor], g_sub: Optional[torch.Tensor]):
        s = ctx.s
        if g is None:   # the whole input unused: subsample's backward
            return _spread(g_sub, ctx.shape, s), None
        if not (g.is_contiguous(memory_format=torch.channels_last) or g.is_contiguous()):
            g = g.clone(memory_format=torch.channels_last)   # e.g. expanded: no element of its own to add to
        if g_sub is not None:
            g[:, :, ::s, ::s] += g_sub
        return g, None


def fork(x: torch.Tensor, s: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x, subsample(x, s))``, one gradient pass fewer when ``x`` wants a gradient (see ``_Fork``). The
    first output's gradient is written into: feed it to a layer (whose backward makes it), not to a loss."""
    if s == 1 or not x.requires_grad:
        return x, subsample(x, s)
    return _Fork.apply(x, s)


class _StridedBatchNorm(torch.autograd.Function):
    """Training-mode BN with batch statistics over every position, output at every ``s``-th position only.

    Exact algebra instead of normalising the whole tensor and slicing: the statistics need all of ``z``,
    the output a quarter of it; and since the gradient is zero off the kept positions, BN's backward
    ``w / sd * (g - mean(g) - xhat * mean(g * xhat))`` is, off them, an affine map of ``z`` per channel
    (one pass), plus ``w / sd * g`` on them. Returns (output, batch mean, biased batch variance)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int, eps: float, native: bool):
        if native:   # one pass of sums (BN's kernel also writes the whole normalised tensor, unused here)
            mean, var = batch_stats(z)
            invstd = torch.rsqrt(var + eps)
        else:        # BN's own statistics kernel (var_mean over the same positions is 13x slower on channels-last z)
            _, mean, invstd = torch.native_batch_norm(z, None, None, None, None, True, 0.0, eps)
            var = invstd.pow(-2) - eps
        scale = weight * invstd
        y = z[:, :, ::s, ::s] * scale[:, None, None] + (bias - mean * scale)[:, None, None]
        ctx.save_for_backward(z, weight, mean, invstd)
        ctx.s = s
        ctx.mark_non_differentiable(mean, var)
        return y.contiguous(memory_format=torch.channels_last), mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _mean, _var):
        z, weight, mean, invstd = ctx.saved_tensors
        s, n = ctx.s, z.numel() // z.shape[1]
        xhat = (z[:, :, ::s, ::s] - mean[:, None, None]) * invstd[:, None, None]
        d_bias, d_weight = grad.sum((0, 2, 3)), (grad * xhat).sum((0, 2, 3))
        gain, a, c = bn_input_grad(weight, invstd, mean, d_weight, d_bias, n)   # dz = a * z + c off the kept positions
        dz = torch.addcmul(c[:, None, None], z, a[:, None, None])       # channels-last like z
        dz[:, :, ::s, ::s] += grad * gain[:, None, None]
        return dz, d_weight, d_bias, None, None, None


class StackedConv2d(nn.Conv2d):
    """``members`` convolutions: grouped (member major) or native (interleaved; 'same' padding only)."""

    interleaved = False

    def forward(self, x: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        return self.run(x, self.weight, stride)

    def run(self, x: torch.Tensor, weight: torch.Tensor, stride: Optional[int] = None) -> torch.Tensor:
        """This layer's convolution with another ``weight`` (e.g. BN-scaled) and/or ``stride``."""
        stride = self.stride[0] if stride is None else stride
        if self.interleaved:
            y = member_conv2d(x, weight, self.groups, stride)
            return y if self.bias is None else y + member_order(self.bias, self.groups)[:, None, None]
        return F.conv2d(x, weight, self.bias, stride, self.padding, groups=self.groups)

    def shift_relu(self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``relu(self.run(x, weight) + shift)``, ``shift`` in the activations' channel order. Interleaved,
        bias-free and with only ``x`` wanting a gradient: one native pass (shift and ReLU in the epilogue)."""
        frozen = not torch.is_grad_enabled() or not (weight.requires_grad or shift.requires_grad)
        if self.interleaved and self.bias is None and frozen:
            return member_conv2d_shift_relu(x, weight.detach(), self.groups, shift.detach(), self.stride[0])
        return F.relu(self.run(x, weight) + shift[:, None, None], inplace=True)


class StackedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` over ``members*C`` channels; statistics and parameters per member in both layouts."""

    interleaved = False

    def __init__(self, channels: int, members: int = 1) -> None:
        super().__init__(channels * members)
        self.members = members

    def channels(self, v: torch.Tensor) -> torch.Tensor:
        """A member-major per-channel vector in the activations' channel order."""
        return member_order(v, self.members) if self.interleaved and self.members > 1 else v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.interleaved or self.members == 1:  # one member: both layouts are the same
            return super().forward(x)
        # The buffers stay member major; F.batch_norm updates interleaved copies, written back after.
        mean, var = self.channels(self.running_mean), self.channels(self.running_var)
        momentum = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y = F.batch_norm(x, mean, var, self.channels(self.weight), self.channels(self.bias), self.training,
                         momentum, self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.copy_(stacked_order(mean, self.members))
                self.running_var.copy_(stacked_order(var, self.members))
        return y

    def folded(self, mean: torch.Tensor, var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """BN with these member-major statistics as ``x * scale + shift``: ``scale`` member major (to fold
        into the conv before), ``shift`` in the activations' channel order (to add after)."""
        scale = self.weight * torch.rsqrt(var + self.eps)
        return scale, self.channels(self.bias - mean * scale)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``; in training on interleaved activations, BN and ReLU as one native op
        (``native_ops.batch_norm_relu``: two passes each way instead of seven), running statistics as here."""
        if not (self.training and self.interleaved and x.dim() == 4 and self.track_running_stats):
            return F.relu(self(x), inplace=True)
        y, mean, var = batch_norm_relu(x, self.channels(self.weight), self.channels(self.bias), self.eps)
        self.track(stacked_order(mean, self.members), stacked_order(var, self.members), x.numel() // x.shape[1])
        return y

    def strided(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """``self(x)[:, :, ::s, ::s]`` in training mode (batch statistics over every position, running
        statistics updated as ``nn.BatchNorm2d`` does), normalising only the positions returned."""
        if not self.training or s == 1 or x.dim() != 4:
            return self(x)[:, :, ::s, ::s]
        y, mean, var = _StridedBatchNorm.apply(x.contiguous(memory_format=torch.channels_last),
                                               self.channels(self.weight), self.channels(self.bias), s, self.eps,
                                               self.interleaved)
        if self.interleaved:
            mean, var = stacked_order(mean, self.members), stacked_order(var, self.members)
        self.track(mean, var, x.numel() // x.shape[1])
        return y

    @torch.no_grad()
    def track(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Update the running statistics from a batch's member-major mean and biased variance over
        ``count`` values per channel, exactly as ``nn.BatchNorm2d`` does (for statistics computed
        elsewhere: a strided output, the first block's patch moments)."""
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
        self.running_var.mul_(1 - m).add_(var.detach() * (count / max(count - 1, 1)), alpha=m)


def conv_bn_relu(conv: StackedConv2d, bn: StackedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(bn(conv(x)))``. In eval mode BN is a per-channel affine map: its scale folds into the conv's
    weights and its shift, with the ReLU, into the conv's epilogue (``StackedConv2d.shift_relu``)."""
    if bn.training:
        return bn.relu(conv(x))
    scale, shift = bn.folded(bn.running_mean, bn.running_var)
    return conv.shift_relu(x, conv.weight * scale[:, None, None, None], shift)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, members: int = 1) -> StackedConv2d:
    """A bias-free 'same'-padded convolution, ``members`` copies in one grouped conv."""
    return StackedConv2d(
        cin * members, cout * members, kernel, stride=stride, padding=kernel // 2, groups=members, bias=False
    )


def set_interleaved(module: nn.Module, on: bool) -> nn.Module:
    """Switch every stacked layer of ``module`` to interleaved activations (``on``) or member major."""
    for m in module.modules():
        if hasattr(type(m), "interleaved"):
            m.interleaved = on
    return module


class StackedLinear(nn.Module):
    """``members`` independent ``Linear(cin, cout)`` layers; input ``(B, members*cin)``."""

    def __init__(self, cin: int, cout: int, members: int = 1) -> None:
        super().__init__()
        self.cin, self.cout, self.members = cin, cout, members
        self.weight = nn.Parameter(torch.empty(members * cout, cin))
        self.bias = nn.Parameter(torch.empty(members * cout))
        # Same distribution as nn.Linear's default, member by member.
        bound = 1.0 / math.sqrt(cin)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def on_interleaved(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of member-interleaved channels-last features ``(B, C*members, H, W)``, each
        member's flattened in ``(C, H, W)`` order (``native.member_linear``: no transposed copy)."""
        return member_linear(x, self.weight, self.members) + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = self.weight.view(self.members, self.cout, self.cin)
        y = torch.einsum("bmi,moi->bmo", x.reshape(b, self.members, self.cin), w)
        return (y + self.bias.view(self.members, self.cout)).reshape(b, self.members * self.cout)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
