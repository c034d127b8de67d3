"""Data-free baselines: small-block weights made from a large block without a translator.

Every function works on P networks at once: a stacked large-block state dict ``(P, ...)`` in (BN
parameters and running statistics included), a stacked small-block state dict ``(P, ...)`` out, with
the keys and shapes of ``family.small_block().state_dict()``.

- ``random``: a freshly initialised small block (the KT paper's baseline).
- ``identity``: the large block removed (a small block whose output equals its input).
- ``uniform``: weight selection (Xu et al., ICLR 2024), evenly spaced indices per shrunk dimension.
- ``l1``: magnitude channel selection (Li et al., 2017), hidden channels with the largest L1 norm.

The two selections read each large block as its two affine maps (``TwoLayerBlock.fold``: BN or
bias folded in, ``w * gamma / sqrt(var + eps)`` and ``beta - mean * gamma / sqrt(var + eps)``) and
write the kept part the same way: the shifts are kept where the small block holds them (BN or
biases: ``basic``, ``mlp``) and dropped where it has none (``bottleneck``). A kernel of another size
is cut (or zero-padded) around its centre.

Example:
    >>> from kt_mlflow.blocks import create_family
    >>> from kt_mlflow.evaluation.baselines import make_baseline
    >>> fam = create_family("paper_mnist")
    >>> large = {k: v[None] for k, v in fam.large_block().state_dict().items()}
    >>> make_baseline("uniform", fam, large)["conv1.weight"].shape
    torch.Size([1, 3, 6, 3, 3])
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from ..blocks import BlockFamily, fold_bn
from ..errors import KTError
from ..registry import Registry

State = Dict[str, torch.Tensor]

BASELINES = Registry("baseline")


def _networks(large: Mapping[str, torch.Tensor]) -> int:
    if not large:
        raise KTError("the large-block state dict is empty; pass pairs.part('large') of a pair set.")
    return next(iter(large.values())).shape[0]


def _conv_chain(family: BlockFamily) -> List[str]:
    """The weight layers of the small block in forward order; each must exist in the large block."""
    small, large = list(family.weight_shapes("small")), family.weight_shapes("large")
    missing = [k for k in small if k not in large]
    if missing:
        raise KTError(
            f"family {family.name}: small-block weights {', '.join(missing)} have no large-block counterpart; "
            f"selection baselines need matching layer names."
        )
    return small


def _fit_kernel(w: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    """``(P, o, i, k, k)`` -> ``(P, o, i, *size)``: cut around the centre, or zero-padded around it."""
    for axis, want in zip((3, 4), size):
        have = w.shape[axis]
        if have > want:
            w = w.narrow(axis, (have - want) // 2, want)
        elif have < want:
            pad = [0, 0] * (w.dim() - 1 - axis) + [(want - have) // 2, (want - have) // 2]
            w = torch.nn.functional.pad(w, pad)
    return w


def random_init(family: BlockFamily, n: int, seed: int = 0) -> State:
    """``n`` freshly initialised small blocks (PyTorch default init, as in pair generation), seeded.

    Example:
        >>> random_init(fam, 4, seed=0)["conv2.weight"].shape  # doctest: +SKIP
        torch.Size([4, 6, 3, 3, 3])
    """
    if n < 1:
        raise KTError(f"random_init needs n >= 1 networks, got {n}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        states = [family.small_block().state_dict() for _ in range(n)]
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def identity(family: BlockFamily, n: int) -> State:
    """``n`` small blocks with all-zero weights and shifts: ReLU(0 + x) = x for a conv block, x + 0 for mlp.

    A conv block's input comes after a ReLU (and max-pool), so it is non-negative and the zero block is
    exactly "large block removed".

    Example:
        >>> identity(fam, 2)["conv1.weight"].abs().sum()  # doctest: +SKIP
        tensor(0.)
    """
    if n < 1:
        raise KTError(f"identity needs n >= 1 networks, got {n}.")
    shapes = family.weight_shapes("small")
    block = family.prototype("small")
    return block.unfold({k: torch.zeros(n, *s) for k, s in shapes.items()}, {k: torch.zeros(n, s[0]) for k, s in shapes.items()})


def uniform_indices(large_size: int, small_size: int) -> torch.Tensor:
    """Evenly spaced indices as in Xu et al.'s weight selection: a stride when it divides, else linspace.

    Example:
        >>> uniform_indices(6, 3).tolist(), uniform_indices(8, 3).tolist()
        ([0, 2, 4], [0, 4, 7])
    """
    if small_size > large_size:
        raise KTError(f"cannot select {small_size} of {large_size} channels; the small block must not be wider.")
    if large_size % small_size == 0:
        return torch.arange(small_size) * (large_size // small_size)
    return torch.linspace(0, large_size - 1, small_size).round().long()


def uniform_selection(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> State:
    """Weight selection: evenly spaced indices along every shrunk channel dimension of the folded layers.

    The same (large, small) size always gives the same indices, so a hidden channel kept among layer 1's
    outputs (with its shift) is also kept among layer 2's inputs.

    Example:
        >>> uniform_selection(fam, pairs.part("large"))["conv2.weight"].shape  # doctest: +SKIP
        torch.Size([8, 6, 3, 3, 3])
    """
    shapes = family.weight_shapes("small")
    weights, shifts = fold_bn(family, large)
    out_w, out_t = {}, {}
    for key in _conv_chain(family):
        w, t = weights[key], shifts[key]
        for dim in (0, 1):
            if w.shape[dim + 1] != shapes[key][dim]:
                keep = uniform_indices(w.shape[dim + 1], shapes[key][dim]).to(w.device)
                w = w.index_select(dim + 1, keep)
                t = t.index_select(1, keep) if dim == 0 else t
        out_w[key], out_t[key] = _fit_kernel(w, shapes[key][2:]).contiguous(), t.contiguous()
    return family.prototype("small").unfold(out_w, out_t)


def l1_selection(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> State:
    """Magnitude channel selection: keep the hidden channels whose folded filters have the largest L1 norm.

    For layers ``a -> b``, channel j of a's outputs is kept by the L1 norm of a's (folded) filter j, and
    the same channels are kept among b's inputs (and a's shift j with it). Kept channels stay in their
    original order. Only hidden (inner) channel counts may shrink; no fine-tuning.

    Example:
        >>> l1_selection(fam, pairs.part("large"))["conv1.weight"].shape  # doctest: +SKIP
        torch.Size([8, 3, 6, 3, 3])
    """
    shapes = family.weight_shapes("small")
    weights, shifts = fold_bn(family, large)
    chain = _conv_chain(family)
    for i, key in enumerate(chain):
        fixed = ([0] if i == len(chain) - 1 else []) + ([1] if i == 0 else [])
        bad = [d for d in fixed if weights[key].shape[d + 1] != shapes[key][d]]
        if bad:
            raise KTError(
                f"l1 selection only shrinks hidden channels, but {key} also differs in dims {bad}; "
                f"use 'uniform' for family {family.name}."
            )
    w = {k: _fit_kernel(weights[k], shapes[k][2:]) for k in chain}
    t = {k: shifts[k] for k in chain}
    for key, nxt in zip(chain, chain[1:]):
        h = shapes[key][0]
        if w[key].shape[1] == h:
            continue
        keep = w[key].abs().flatten(2).sum(-1).topk(h, dim=-1).indices.sort(dim=-1).values  # (P, h)
        w[key] = torch.take_along_dim(w[key], keep[:, :, None, None, None], dim=1)
        t[key] = torch.take_along_dim(t[key], keep, dim=1)
        w[nxt] = torch.take_along_dim(w[nxt], keep[:, None, :, None, None], dim=2)
    return family.prototype("small").unfold({k: v.contiguous() for k, v in w.items()}, t)


BASELINES.register("random")(lambda family, large, seed=0: random_init(family, _networks(large), seed))
BASELINES.register("identity")(lambda family, large, seed=0: identity(family, _networks(large)))
BASELINES.register("uniform")(lambda family, large, seed=0: uniform_selection(family, large))
BASELINES.register("l1")(lambda family, large, seed=0: l1_selection(family, large))


def make_baseline(name: str, family: BlockFamily, large: Mapping[str, torch.Tensor], seed: int = 0) -> State:
    """Stacked small-block weights of baseline ``name`` ('random', 'identity', 'uniform', 'l1') for P networks."""
    factory = BASELINES.get(name)
    out = factory(family=family, large=large, seed=seed)
    ref = next((v for v in large.values() if v.is_floating_point()), None)
    if ref is None:
        return out
    return {k: v.to(device=ref.device, dtype=ref.dtype) if v.is_floating_point() else v for k, v in out.items()}


__all__ = [
    "BASELINES", "random_init", "identity", "uniform_indices", "uniform_selection", "l1_selection",
    "make_baseline",
]
