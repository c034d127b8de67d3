"""Data-free baselines: small-block weights made from a large block without a translator.

Every function works on P networks at once: a stacked large-block state dict ``(P, ...)`` in (BN
parameters and running statistics included), a stacked small-block state dict ``(P, ...)`` out, with
the keys and shapes of ``family.small_block().state_dict()``.

- ``random``: a freshly initialised small block (the KT paper's baseline).
- ``identity``: the large block removed (a small block whose output equals its input).
- ``uniform``: weight selection (Xu et al., ICLR 2024), evenly spaced indices per shrunk dimension.
- ``l1``: magnitude channel selection (Li et al., 2017), hidden channels with the largest L1 norm.

The two selections fold each BN into the conv before it first (``w * gamma / sqrt(var + eps)``). The
BN shift ``beta - mean * gamma / sqrt(var + eps)`` is dropped: the small block has no bias to hold it.

Example:
    >>> from kt_mlflow.blocks import create_family
    >>> from kt_mlflow.evaluation.baselines import make_baseline
    >>> fam = create_family("paper_mnist")
    >>> large = {k: v[None] for k, v in fam.large_block().state_dict().items()}
    >>> make_baseline("uniform", fam, large)["conv1.weight"].shape
    torch.Size([1, 3, 6, 3, 3])
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch

from ..blocks import BlockFamily
from ..blocks import fold_bn as fold_bn_weights
from ..errors import KTError
from ..registry import Registry

State = Dict[str, torch.Tensor]

BASELINES = Registry("baseline")


def _networks(large: Mapping[str, torch.Tensor]) -> int:
    if not large:
        raise KTError("the large-block state dict is empty; pass pairs.part('large') of a pair set.")
    return next(iter(large.values())).shape[0]


def _small_shapes(family: BlockFamily) -> Dict[str, torch.Size]:
    """Shapes of every small-block tensor; only conv weights can be derived from a large block."""
    shapes = {k: v.shape for k, v in family.small_block().state_dict().items()}
    extra = sorted(set(shapes) - set(family.weight_shapes("small")))
    if extra:
        raise KTError(
            f"family {family.name}'s small block has parameters besides conv weights ({', '.join(extra)}); "
            f"the data-free baselines only fill conv weights: use 'random' for it."
        )
    return shapes


def _conv_chain(family: BlockFamily) -> List[str]:
    """The conv weights of the small block in forward order; each must exist in the large block."""
    small, large = list(family.weight_shapes("small")), family.weight_shapes("large")
    missing = [k for k in small if k not in large]
    if missing:
        raise KTError(
            f"family {family.name}: small-block weights {', '.join(missing)} have no large-block counterpart; "
            f"selection baselines need matching conv names."
        )
    return small


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
    """``n`` small blocks with all-zero weights: ReLU(conv2(ReLU(conv1 x)) + x) = ReLU(x) = x.

    The block's input comes after a ReLU (and max-pool), so it is non-negative and the zero block is
    exactly "large block removed".

    Example:
        >>> identity(fam, 2)["conv1.weight"].abs().sum()  # doctest: +SKIP
        tensor(0.)
    """
    if n < 1:
        raise KTError(f"identity needs n >= 1 networks, got {n}.")
    return {k: torch.zeros(n, *shape) for k, shape in _small_shapes(family).items()}


def fold_bn(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> State:
    """The large block's conv weights with the following BN's scale folded in, ``(P, out, in, k, k)``.

    ``w' = w * gamma / sqrt(running_var + eps)`` per output channel; the BN shift is not kept.

    Example:
        >>> fold_bn(fam, pairs.part("large"))["conv1.weight"].shape  # doctest: +SKIP
        torch.Size([8, 6, 6, 3, 3])
    """
    return fold_bn_weights(family, large)[0]


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
    """Weight selection: evenly spaced indices along every shrunk dimension of the BN-folded weights.

    The same (large, small) size always gives the same indices, so a hidden channel kept among conv1's
    outputs is also kept among conv2's inputs.

    Example:
        >>> uniform_selection(fam, pairs.part("large"))["conv2.weight"].shape  # doctest: +SKIP
        torch.Size([8, 6, 3, 3, 3])
    """
    shapes = _small_shapes(family)
    folded = fold_bn(family, large)
    out: State = {}
    for key in _conv_chain(family):
        w = folded[key]
        for dim, size in enumerate(shapes[key]):
            if w.shape[dim + 1] != size:
                w = w.index_select(dim + 1, uniform_indices(w.shape[dim + 1], size).to(w.device))
        out[key] = w.contiguous()
    return out


def l1_selection(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> State:
    """Magnitude channel selection: keep the hidden channels whose BN-folded filters have the largest L1 norm.

    For consecutive convs ``a -> b``, channel j of a's outputs is kept by the L1 norm of a's (folded)
    filter j, and the same channels are kept among b's inputs. Kept channels stay in their original
    order. Only hidden (inner) channel counts may shrink; no fine-tuning.

    Example:
        >>> l1_selection(fam, pairs.part("large"))["conv1.weight"].shape  # doctest: +SKIP
        torch.Size([8, 3, 6, 3, 3])
    """
    shapes = _small_shapes(family)
    folded = fold_bn(family, large)
    chain = _conv_chain(family)
    for i, key in enumerate(chain):
        fixed = ([0] if i == len(chain) - 1 else []) + ([1] if i == 0 else []) + list(range(2, len(shapes[key])))
        bad = [d for d in fixed if folded[key].shape[d + 1] != shapes[key][d]]
        if bad:
            raise KTError(
                f"l1 selection only shrinks hidden channels, but {key} also differs in dims {bad}; "
                f"use 'uniform' for family {family.name}."
            )
    out = {k: folded[k] for k in chain}
    for key, nxt in zip(chain, chain[1:]):
        h = shapes[key][0]
        if out[key].shape[1] == h:
            continue
        keep = out[key].abs().flatten(2).sum(-1).topk(h, dim=-1).indices.sort(dim=-1).values  # (P, h)
        out[key] = torch.take_along_dim(out[key], keep[:, :, None, None, None], dim=1)
        out[nxt] = torch.take_along_dim(out[nxt], keep[:, None, :, None, None], dim=2)
    return {k: v.contiguous() for k, v in out.items()}


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
    "BASELINES", "random_init", "identity", "fold_bn", "uniform_indices", "uniform_selection", "l1_selection",
    "make_baseline",
]
