"""Linear layers whose float32 CPU products run on oneDNN: the translators' matmuls at the CPU's full width.

PyTorch computes a float32 CPU matmul with MKL's sgemm, which on x86 CPUs other than Intel's runs
its AVX2 code; oneDNN, which ships inside PyTorch, chooses its kernels by the CPU's own features
(AVX-512 where there is some). The same products, other float rounding; on a GPU, in float64 or
without oneDNN, ``F.linear``. docs/performance.md has the measured gain.

Example:
    >>> layer = Linear(64, 256)
    >>> layer(torch.randn(32, 6, 6, 64)).shape
    torch.Size([32, 6, 6, 256])
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 128   # fewer rows: oneDNN's fixed cost per call (~12 us) outweighs its speed (docs/performance.md)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this PyTorch has oneDNN's linear op (a private op: probed once, else ``F.linear``)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(_product(x, w, None), F.linear(x, w)))
    except RuntimeError:
        return False


def _product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN; strided (transposed) operands are read in place."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` for 2-D ``x``; each gradient one oneDNN product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        out_f, in_f = weight.shape
        gx = _product(g, weight.t(), None) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            # the narrower side as the product's rows: oneDNN reads the other operand transposed in place
            # (measured 1.5x faster than the other order; docs/performance.md)
            gw = (_product(x.t(), g.t(), None).t() if in_f < out_f else _product(g.t(), x.t(), None)).contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` with its float32 CPU products (and their gradients) on oneDNN where it is available."""
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and rows >= MIN_ROWS and available():
        # A strided weight (a slice of a wider layer) would take oneDNN's slow path: copied first. The
        # leading axes come back as torch.matmul puts them back (``_unsafe_view``: no view for autograd),
        # so callers may add into the output in place without autograd copying its gradient.
        y = _OneDnnLinear.apply(x.reshape(rows, x.shape[-1]), weight.contiguous(), bias)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
