"""The native library's other training ops (``member_conv.cpp``): BatchNorm + ReLU in two passes each
way, the task loss's input gathered in one pass, the leaky ReLU gradient in one pass, and dropout masks
from a counter-based hash. Each computes what the PyTorch expression it replaces computes (tests in
``tests/test_native_ops.py``); ``native.available()`` says whether the library built.

Example:
    >>> import torch
    >>> from kt_mlflow.blocks.native_ops import dropout_mask
    >>> dropout_mask((4, 5), 0.5, torch.Generator().manual_seed(0)).shape  # doctest: +SKIP
    torch.Size([4, 5])
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..errors import KTError
from .native import DTYPES, available, check, kernel, library


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _bn_call(name: str, z: torch.Tensor, *tensors: Optional[torch.Tensor]) -> None:
    n, c = z.numel() // z.shape[1], z.shape[1]
    threads = max(1, min(torch.get_num_threads(), n // 4096))
    kernel(name, z.dtype)(*(_ptr(t) for t in (z, *tensors)), n, c, threads)


def batch_stats(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of channels-last ``(B, C, H, W)``, in one pass (double
    sums), in ``z``'s dtype; no gradient."""
    check(z)
    z = z.detach().contiguous(memory_format=torch.channels_last)
    c, count = z.shape[1], z.numel() // z.shape[1]
    s1, s2 = (torch.empty(c, dtype=torch.float64) for _ in range(2))
    _bn_call("bn_sums", z, None, None, None, s1, s2)
    mean = s1 / count
    return mean.to(z.dtype), (s2 / count - mean * mean).clamp_min(0).to(z.dtype)


def bn_input_grad(weight: torch.Tensor, invstd: torch.Tensor, mean: torch.Tensor, d_weight: torch.Tensor,
                  d_bias: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BN's input gradient is per channel an affine map ``gain * g + a * z + c`` of the
    output gradient ``g`` and the input ``z`` (``count`` values per channel): returns (gain, a, c)."""
    gain = weight * invstd
    a = -gain * invstd * d_weight / count
    return gain, a, -gain * d_bias / count - a * mean


class _BatchNormReLU(torch.autograd.Function):
    """``relu(batch_norm(z))`` in training mode over channels-last ``z``; also returns the batch mean and
    biased variance (for the running statistics)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        mean, var = batch_stats(z)
        invstd = torch.rsqrt(var + eps)
        scale = (weight * invstd).contiguous()
        shift = (bias - mean * scale).contiguous()
        y = torch.empty_like(z, memory_format=torch.channels_last)
        _bn_call("bn_apply", z, None, None, None, scale, shift, None, y)
        ctx.save_for_backward(z, weight, mean, invstd, scale, shift)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _mean, _var):
        z, weight, mean, invstd, scale, shift = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        c = z.shape[1]
        count = z.numel() // c
        s1, s2 = (torch.empty(c, dtype=torch.float64) for _ in range(2))
        _bn_call("bn_sums", z, g, scale, shift, s1, s2)
        d_bias = s1.to(z.dtype)
        d_weight = (invstd.double() * (s2 - mean.double() * s1)).to(z.dtype)
        gain, a, b = bn_input_grad(weight, invstd, mean, d_weight, d_bias, count)   # on the masked gradient
        dz = torch.empty_like(z, memory_format=torch.channels_last)
        _bn_call("bn_apply", z, g, scale, shift, gain.contiguous(), a.contiguous(), b.contiguous(), dz)
        return dz, d_weight, d_bias, None


def batch_norm_relu(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """``relu(F.batch_norm(z, training=True))`` over ``(B, C, H, W)`` with ``weight`` and ``bias`` in
    ``z``'s channel order: two passes forward (the statistics' sums, then the affine map and ReLU) and
    two backward, where BN and ReLU take four and three. Returns ``(y, batch mean, biased batch variance)``;
    the running statistics are the caller's. Float32/float64 CPU tensors, once the library is built.
    """
    check(z)
    z = z.contiguous(memory_format=torch.channels_last)
    return _BatchNormReLU.apply(z, weight.to(z.dtype).contiguous(), bias.to(z.dtype).contiguous(), eps)


def leaky_relu_grad(z: torch.Tensor, g: torch.Tensor, slope: float) -> torch.Tensor:
    """The gradient of ReLU with ``slope`` below zero, in one pass: ``g`` where ``z > 0``, ``slope * g``
    where ``z < 0``, 0 where ``z == 0``. ``z`` dense (contiguous or channels-last); ``g`` is laid out as it."""
    check(z)
    fmt = torch.channels_last if z.dim() == 4 and not z.is_contiguous() else torch.contiguous_format
    if not z.is_contiguous(memory_format=fmt):
        raise RuntimeError("leaky_relu_grad takes a contiguous or channels-last z")
    g = g.contiguous(memory_format=fmt)
    out = torch.empty_like(z, memory_format=fmt)
    n = z.numel()
    threads = max(1, min(torch.get_num_threads(), n // 16384))
    kernel("leaky_grad", z.dtype)(z.data_ptr(), g.data_ptr(), slope, out.data_ptr(), n, threads)
    return out


def gather_members(bank: torch.Tensor, rows: torch.Tensor, pick: torch.Tensor, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """Entries ``bank[rows[m], pick[n]]`` of a per-pair bank ``(R, Bk, C, H, W)`` as the interleaved,
    channels-last input ``(N, C*K, H, W)`` of a ``K = len(rows)``-member network, each value ``v * scale
    + shift`` (per member and channel, ``(K, C)``) and ReLU'd if ``relu``: in one pass, where a gather, a
    multiply, an add, a ReLU and a layout copy make five. ``rows`` ``(N, K)`` takes a row per entry and
    member: ``bank[rows[n, m], pick[n]]``. No gradient flows through it.

    Example:
        >>> bank = torch.randn(5, 4, 2, 3, 3)
        >>> out = gather_members(bank, torch.tensor([4, 0]), torch.tensor([1, 2, 3]))
        >>> torch.equal(out[:, 0::2], bank[4, 1:]) and torch.equal(out[:, 1::2], bank[0, 1:])
        True
    """
    r, b, c, h, w = bank.shape
    k, n = rows.shape[-1], len(pick)
    if rows.dim() == 2 and len(rows) != n:
        raise KTError(f"gather_members: rows per entry must be ({n}, K), got {tuple(rows.shape)}.")
    if bank.dtype not in DTYPES or bank.device.type != "cpu":
        raise KTError(f"gather_members takes float32 or float64 CPU banks, got {bank.dtype} on {bank.device}.")
    bank, rows, pick = bank.contiguous(), rows.to(torch.long).contiguous(), pick.to(torch.long).contiguous()
    if k and n and not (0 <= int(rows.min()) and int(rows.max()) < r and 0 <= int(pick.min()) and int(pick.max()) < b):
        raise KTError(f"gather_members: rows must lie in [0, {r}) and picks in [0, {b}).")
    affine = [None if v is None else v.to(bank.dtype).expand(k, c).contiguous() for v in (scale, shift)]
    out = torch.empty((n, h, w, c, k), dtype=bank.dtype)
    threads = max(1, min(torch.get_num_threads(), n))
    kernel("gather_members", bank.dtype)(
        bank.data_ptr(), rows.data_ptr(), pick.data_ptr(), *(0 if v is None else v.data_ptr() for v in affine),
        out.data_ptr(), b, c, h * w, k, n, k if rows.dim() == 2 else 0, int(relu), threads)
    return out.view(n, h, w, c * k).permute(0, 3, 1, 2)


def dropout_mask(shape: Sequence[int], p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A float32 CPU dropout mask: ``1 / (1 - p)`` with probability ``1 - p`` (to 2^-24), else 0.

    Drawn by a counter-based hash from one seed that ``generator`` (default: torch's) provides, so
    ``torch.manual_seed`` makes it reproducible. On a 32 x 6 x 6 x 256 tensor (two threads) it takes
    about 1 ms against 2.4 to 3.3 ms for ``bernoulli_``.
    """
    keep = round((1.0 - p) * (1 << 24))
    seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=generator))
    out = torch.empty(shape, dtype=torch.float32)
    n = out.numel()
    threads = max(1, min(torch.get_num_threads(), n // 65536))
    library().kt_dropout_mask_f32(out.data_ptr(), n, keep, (1 << 24) / max(keep, 1), seed, threads)
    return out


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` whose masks on float32 CPU tensors come from ``dropout_mask`` (elsewhere, or
    without the native library: PyTorch's own). The same regulariser; other random draws."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0 or self.inplace or x.device.type != "cpu"
                or x.dtype != torch.float32 or not available()):
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p)
