"""A translator that knows which channel each weight connects: equivariant by construction.

A residual block's channels carry no fixed meaning from one trained network to the next: permuting
the residual channels (with the blocks around it) or the large block's hidden channels leaves the
network's function unchanged. A Mixer over fixed token positions has to learn that from examples;
this translator cannot get it wrong. It reads the large block as a grid of edges (hidden channel h,
residual channel r), each edge holding conv1's kernel h<-r and conv2's kernel r<-h (plus BN shifts
when the source is BN-aware), mixes every edge with the means over its row, its column and the whole
grid (a permutation-equivariant layer), and writes small hidden channel m as a learned soft choice
over large hidden channels: ``conv1'[m, r] = sum_h a[m, h] f1(e[h, r], q_m)`` and likewise conv2'.
So the output follows any permutation of the residual channels and ignores any of the hidden ones.

Example:
    >>> net = ChannelSetTranslator(72, 10, 36, 9, src_shapes=((6, 6, 3, 3), (6, 6, 3, 3)),
    ...                            dst_shapes=((3, 6, 3, 3), (6, 3, 3, 3)), depth=2, width=32)
    >>> net(torch.zeros(4, 72, 10)).shape
    torch.Size([4, 36, 9])
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.native_ops import Dropout
from ..errors import KTError
from .linear import Linear, linear


class EdgeLayer(nn.Module):
    """e[h, r] += MLP([e[h, r], mean_r e[h], mean_h e[:, r], mean e]): equivariant in h and r."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(Linear(4 * width, hidden), nn.GELU(), Dropout(dropout), Linear(hidden, width))

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # (B, H, R, C)
        x = self.norm(e)
        row, col = x.mean(2, keepdim=True), x.mean(1, keepdim=True)
        # The first layer on the concatenation, split by part: each mean goes through its own slice of the
        # weights once, not once per edge, and is broadcast after (the same function, no (B, H, R, 4C) input).
        first, act, drop, last = self.mlp
        w_x, w_row, w_col, w_all = first.weight.split(x.shape[-1], dim=1)
        z = linear(x, w_x)
        z += linear(row, w_row)           # in place: no product needs z for its gradient
        z += linear(col, w_col)
        z += linear(row.mean(1, keepdim=True), w_all, first.bias)
        return e + last(drop(act(z)))


class ChannelSetTranslator(nn.Module):
    """(B, T_in, D_in) tokens of a two-conv block -> (B, T_out, D_out) tokens of a narrower one."""

    def __init__(self, in_tokens: int, in_dim: int, out_tokens: int, out_dim: int,
                 src_shapes: Sequence[Tuple[int, ...]] = (), dst_shapes: Sequence[Tuple[int, ...]] = (),
                 depth: int = 4, width: int = 64, channel_hidden: int = 128, dropout: float = 0.0,
                 sizes: Sequence[Sequence[int]] = (), kernel_map: bool = False, **_: object) -> None:
        super().__init__()
        if len(src_shapes) != 2 or len(dst_shapes) != 2:
            raise KTError("the channel_set translator needs a block of two convs (in -> hidden -> in) on both sides.")
        (hid, res), (res2, hid2) = src_shapes[0][:2], src_shapes[1][:2]
        (m, res3), (res4, m2) = dst_shapes[0][:2], dst_shapes[1][:2]
        if not (hid == hid2 and res == res2 == res3 == res4 and m == m2):
            raise KTError(f"channel_set translator: block shapes {src_shapes} -> {dst_shapes} are not "
                          f"in -> hidden -> in convs with the same residual width.")
        self.hidden, self.residual, self.small_hidden, self.out_dim = hid, res, m, out_dim
        # Several sizes: the small block's hidden width M is an input. Small channel j of any size reads
        # query j (nested: a size uses the first M), shifted by an embedding of (log M, log H).
        self.sizes = tuple(tuple(int(v) for v in s) for s in sizes)
        self.edge_dim = 2 * in_dim
        self.embed = Linear(self.edge_dim, width)
        self.layers = nn.Sequential(*[EdgeLayer(width, channel_hidden, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        n_queries = max([m, *(s[1] for s in self.sizes)])
        self.queries = nn.Parameter(torch.randn(n_queries, width) / width ** 0.5)  # one per small hidden channel
        if self.sizes:
            self.size_embed = Linear(2, width)
        self.key = Linear(width, width)
        self.write = nn.Sequential(Linear(2 * width, channel_hidden), nn.GELU(), Linear(channel_hidden, 2 * out_dim))
        # A linear path from the chosen large edges' own numbers (kernel positions, shifts) to the written
        # ones: across kernel sizes the small kernel is mostly a fixed linear view of the large one,
        # which the normalised edge features above carry only indirectly. Zero at init.
        self.kernel_map = Linear(self.edge_dim, 2 * out_dim, bias=False) if kernel_map else None
        if self.kernel_map is not None:
            nn.init.zeros_(self.kernel_map.weight)

    @property
    def max_small_hidden(self) -> int:
        return self.queries.shape[0]

    def _queries(self, h: int, m: int) -> torch.Tensor:
        if not self.sizes:
            if (h, m) != (self.hidden, self.small_hidden):
                raise KTError(f"this channel_set translator writes hidden {self.small_hidden} from hidden {self.hidden} "
                              f"only, not {m} from {h}; train one on pair sets of several sizes (docs/usage.md).")
            return self.queries
        if not 1 <= m <= self.max_small_hidden:
            raise KTError(f"this translator writes small hidden widths 1 to {self.max_small_hidden}, not {m}; "
                          f"choose a size in that range, or train on pairs with larger small blocks.")
        size = torch.tensor([math.log(m), math.log(h)], dtype=self.queries.dtype, device=self.queries.device)
        return self.queries[:m] + self.size_embed(size)

    def forward(self, x: torch.Tensor, small_hidden: Optional[int] = None) -> torch.Tensor:
        b, r = x.shape[0], self.residual
        h, m = x.shape[1] // (2 * r), small_hidden or self.small_hidden
        q = self._queries(h, m)
        conv1 = x[:, : h * r].reshape(b, h, r, -1)                  # kernel h <- r
        conv2 = x[:, h * r:].reshape(b, r, h, -1).transpose(1, 2)   # kernel r <- h, as (h, r)
        edges = torch.cat([conv1, conv2], -1)                       # (B, H, R, 2*D_in)
        e = self.norm(self.layers(self.embed(edges)))               # (B, H, R, C)
        # Soft choice of large hidden channels for each small one, from each hidden channel's summary.
        logits = torch.einsum("mc,bhc->bmh", q, self.key(e.mean(2))) / e.shape[-1] ** 0.5
        choice = logits.softmax(-1)                                           # (B, M, H)
        kern = self._write(e, choice, q)                                      # (B, M, R, 2*D)
        if self.kernel_map is not None:
            kern = kern + self.kernel_map(torch.einsum("bmh,bhrc->bmrc", choice, edges))
        k1, k2 = kern[..., : self.out_dim], kern[..., self.out_dim:]
        return torch.cat([k1.reshape(b, m * r, -1), k2.transpose(1, 2).reshape(b, r * m, -1)], 1)

    def _write(self, e: torch.Tensor, choice: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``sum_h choice[m, h] write([e[h, r], q_m])`` without forming the (M, H, R, 2C) input: the first
        layer splits into an edge term and a query term, and the last layer, linear with weights summing
        to one, moves outside the sum. The same function in M times fewer multiply-adds."""
        first, _, last = self.write
        w_edge, w_query = first.weight.split(e.shape[-1], dim=1)
        edge, query = linear(e, w_edge), linear(queries, w_query, first.bias)               # (B, H, R, F), (M, F)
        return last(ChoiceGelu.apply(edge, query, choice))                                # act is nn.GELU()


class ChoiceGelu(torch.autograd.Function):
    """``y[b, m, r] = sum_h choice[b, m, h] gelu(edge[b, h, r] + query[m])``, a few pairs at a time.

    The plain expression holds the (B, M, H, R, F) activations for the backward pass (536 MB per step
    of 32 pairs for a 64 x 16 edge grid); here each chunk of pairs is formed in cache and formed again
    in the backward pass, so memory stays (B, H, R, F) and every pass over the big tensor is one that
    stays in cache. Exactly the same function and gradients (float64 test against the plain expression).
    """

    CHUNK = 1 << 20   # elements of the (pairs, M, H, R, F) tensor formed at once

    @staticmethod
    def _chunks(edge: torch.Tensor, query: torch.Tensor):
        per_pair = query.shape[0] * edge[0].numel()
        step = max(1, ChoiceGelu.CHUNK // per_pair)
        for lo in range(0, edge.shape[0], step):
            sl = slice(lo, lo + step)
            yield sl, edge[sl, None] + query[None, :, None, None]              # (b, M, H, R, F)

    @staticmethod
    def forward(ctx, edge: torch.Tensor, query: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(edge, query, choice)
        out = edge.new_empty(edge.shape[0], query.shape[0], *edge.shape[2:])
        for sl, z in ChoiceGelu._chunks(edge, query):
            out[sl] = torch.einsum("bmh,bmhrf->bmrf", choice[sl], F.gelu(z))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        edge, query, choice = ctx.saved_tensors
        d_edge, d_query, d_choice = torch.empty_like(edge), torch.zeros_like(query), torch.empty_like(choice)
        for sl, z in ChoiceGelu._chunks(edge, query):
            g = grad[sl]                                                           # (b, M, R, F)
            d_choice[sl] = torch.einsum("bmrf,bmhrf->bmh", g, F.gelu(z))
            dz = torch.ops.aten.gelu_backward(choice[sl, :, :, None, None] * g[:, :, None], z)
            torch.sum(dz, 1, out=d_edge[sl])
            # pairs first, then positions: each sum over contiguous rows (one sum over (0, 2, 3) took 20x longer)
            d_query += dz.sum(0).flatten(1, 2).sum(1)
        return d_edge, d_query, d_choice
