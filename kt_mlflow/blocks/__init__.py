"""Block families ("language pairs"): a base network's begin/large/last blocks and the small block.

Families are data: a registry entry names the block kinds and their sizes, and everything else
(shapes, token layouts, parameter counts) is derived from it.

Example:
    >>> from kt_mlflow.blocks import create_family
    >>> fam = create_family("paper_mnist")
    >>> net = fam.base_network()              # begin + large + last, an ordinary nn.Module
    >>> small = fam.small_block()
    >>> sum(p.numel() for p in small.parameters())
    324
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import KTError
from ..family_file import fields_to_spec, looks_like_file, read_spec, spec_to_fields
from ..registry import Registry
from .kind import TwoLayerBlock
from .mlp import MLPBlock, PatchBegin, PoolLast
from .resnet import BasicBlock, BeginBlock, BottleneckBlock, KTNetwork, LastBlock, stem_out_size

BLOCKS = Registry("block kind")
FAMILIES = Registry("block family")

# Every kind is built from (width, hidden, kernel, norm, members); each reads what it needs.
BLOCKS.register("basic")(lambda width, hidden, kernel, norm, members: BasicBlock(width, hidden, kernel, members))
BLOCKS.register("bottleneck")(lambda width, hidden, kernel, norm, members: BottleneckBlock(width, hidden, kernel, members))
BLOCKS.register("mlp")(lambda width, hidden, kernel, norm, members: MLPBlock(width, hidden, norm, members))

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class BlockFamily:
    """A base network (begin + large + last) and the small block that replaces its large block."""

    name: str
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 6
    large_hidden: int = 6
    small_hidden: int = 3
    last_width: int = 12
    kernel: int = 3
    large: str = "basic"
    small: str = "bottleneck"
    begin_kind: str = "conv"      # or "patch": a patch embedding (``patch`` x ``patch``)
    patch: int = 4
    large_kernel: int = 0         # 0: ``kernel``
    small_kernel: int = 0
    large_norm: bool = True       # an mlp block's pre-LayerNorm
    small_norm: bool = True
    last_kind: str = "conv"       # or "pool": LayerNorm, mean over positions, linear

    def config(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @property
    def grid(self) -> int:
        """The side of the begin block's output: the positions every block works on."""
        return self.image_size // self.patch if self.begin_kind == "patch" else stem_out_size(self.image_size)

    @property
    def kernels_differ(self) -> bool:
        """Whether the large and the small block have different kernel sizes (a 5x5 block into a 3x3 one)."""
        kernels = lambda which: {s[2:] for s in self.weight_shapes(which).values()}  # noqa: E731
        return kernels("large") != kernels("small")

    @property
    def native_kernels(self) -> bool:
        """Whether generation can use the native member-interleaved convolutions ('same' convs only)."""
        return self.begin_kind == "conv"

    def resized(self, large_hidden: Optional[int] = None, small_hidden: Optional[int] = None) -> "BlockFamily":
        """The same family with other hidden widths (a multi-size translator's view of one size).

        Example:
            >>> create_family("paper_mnist").resized(12, 5).weight_shapes("small")["conv1.weight"]
            (5, 6, 3, 3)
        """
        for name, value in (("large", large_hidden), ("small", small_hidden)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise KTError(f"the {name} block's hidden width must be a whole number >= 1, got {value!r}.")
        return dataclasses.replace(self, large_hidden=large_hidden or self.large_hidden,
                                   small_hidden=small_hidden or self.small_hidden)

    def same_but_sizes(self, other: "BlockFamily") -> bool:
        """True when ``other`` differs from this family in its hidden widths at most."""
        return self.resized(other.large_hidden, other.small_hidden) == other

    def hidden_of(self, state: Mapping[str, torch.Tensor], which: str = "large") -> int:
        """The hidden width of a ``which`` block's state dict (its first layer's outputs); a one-line
        error when the layer is missing. Stacked states (a leading network axis) are read too."""
        key = next(iter(self.prototype(which).layers))
        if key not in state:
            raise KTError(f"not a {self.name} {which} block: missing {key}; translate a trained block of this family.")
        ref = self.prototype(which).state_dict()[key]
        return int(state[key].shape[state[key].dim() - ref.dim()])

    # -- modules -------------------------------------------------------------------------------
    def begin(self, members: int = 1) -> nn.Module:
        if self.begin_kind == "patch":
            return PatchBegin(self.in_channels, self.width, self.patch, self.image_size, members)
        return BeginBlock(self.in_channels, self.width, self.kernel, members)

    def large_block(self, members: int = 1) -> TwoLayerBlock:
        return self.block("large", members)

    def small_block(self, members: int = 1) -> TwoLayerBlock:
        return self.block("small", members)

    def block(self, which: str, members: int = 1) -> TwoLayerBlock:
        """The ``'large'`` or ``'small'`` block by name."""
        if which not in ("large", "small"):
            raise KTError(f"block {which!r} is neither 'large' nor 'small'.")
        large = which == "large"
        return BLOCKS.create(self.large if large else self.small, width=self.width,
                             hidden=self.large_hidden if large else self.small_hidden,
                             kernel=(self.large_kernel if large else self.small_kernel) or self.kernel,
                             norm=self.large_norm if large else self.small_norm, members=members)

    def prototype(self, which: str) -> TwoLayerBlock:
        """A one-member ``which`` block to read shapes and constants from (built once, global RNG untouched)."""
        return _prototype(self, which)

    def last(self, members: int = 1) -> nn.Module:
        if self.last_kind == "pool":
            return PoolLast(self.width, self.num_classes, members)
        return LastBlock(self.width, self.last_width, self.grid, self.num_classes, members)

    def base_network(self, members: int = 1) -> KTNetwork:
        return KTNetwork(self.begin(members), self.large_block(members), self.last(members), members)

    def compressed_network(self, members: int = 1) -> KTNetwork:
        return KTNetwork(self.begin(members), self.small_block(members), self.last(members), members)

    def init_pair(self, seed: int) -> Tuple[State, State]:
        """Fresh (base network, small block) initialisations, a function of ``seed`` alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base, small = self.base_network(), self.small_block()
        return base.state_dict(), small.state_dict()

    # -- the translator's view -----------------------------------------------------------------
    def weight_shapes(self, which: str) -> Dict[str, Tuple[int, ...]]:
        """Shapes of the weights a translator reads (``which='large'``) or writes (``'small'``)."""
        block = self.prototype(which)
        state = block.state_dict()
        return {k: tuple(state[k].shape) for k in block.layers}

    def bn_of(self, which: str) -> Mapping[str, object]:
        return self.prototype(which).layers

    def check_block_state(self, state: Mapping[str, torch.Tensor], which: str) -> None:
        """One-line errors for a state dict that is not this family's ``which`` block."""
        ref = self.prototype(which).state_dict()
        check_state(state, {k: tuple(v.shape) for k, v in ref.items()}, f"a {self.name} {which} block",
                    "translate a trained, finite block of this family", extra_ok=True,
                    floats={k for k, v in ref.items() if v.is_floating_point()})

    def check_network_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """One-line errors for a state dict that is not a trained base network of this family."""
        ref = self.base_network().state_dict()
        check_state(state, {k: tuple(v.shape) for k, v in ref.items()}, f"a {self.name} base network",
                    f"build it with kt_mlflow.create_family({self.name!r}).base_network()",
                    floats={k for k, v in ref.items() if v.is_floating_point()})


def non_finite(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The keys of ``state`` whose float tensors hold a NaN or inf, sorted."""
    return sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, Tuple[int, ...]], what: str, fix: str,
                extra_ok: bool = False, floats: Collection[str] = ()) -> None:
    """The one state check: missing or unexpected keys, wrong shapes, NaN/inf, and (for ``floats``) a dtype
    other than a real float, each a one-line KTError: nothing is cast silently.

    Example:
        >>> check_state({"w": torch.zeros(2)}, {"w": (3,)}, "a toy block", "pass three weights")
        Traceback (most recent call last):
        kt_mlflow.errors.KTError: w has shape (2,), expected (3,) for a toy block; pass three weights.
    """
    missing = sorted(set(shapes) - set(state))
    unexpected = [] if extra_ok else sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise KTError(f"not {what}: missing {', '.join(missing[:4]) or 'nothing'}, unexpected "
                      f"{', '.join(unexpected[:4]) or 'nothing'}; {fix}.")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != tuple(shape):
            raise KTError(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(shape)} for {what}; {fix}.")
        if k in floats and not state[k].is_floating_point():
            raise KTError(f"{k} is {str(state[k].dtype).replace('torch.', '')}, expected real floating-point weights "
                          f"for {what}; {fix}.")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise KTError(f"{k} contains NaN or inf; {fix}.")


def _register(family: BlockFamily) -> None:
    FAMILIES.register(family.name)(lambda: family)


# The paper's pair (arXiv 2401.05772): 6-channel basic residual block -> 3-channel bottleneck.
_register(BlockFamily("paper_mnist"))
# A wider pair with the same structure, to keep code honest about shapes.
_register(BlockFamily("wide_mnist", width=8, large_hidden=8, small_hidden=4, last_width=16))
# RGB 32x32 input (CIFAR-10, or MNIST digits in colour), the paper's pair of block kinds.
_register(BlockFamily("rgb32", in_channels=3, image_size=32, width=8, large_hidden=8, small_hidden=4, last_width=16))


def create_family(name_or_path: str) -> BlockFamily:
    """A registered family by name, or the family a YAML/JSON file describes (see ``family_file``)."""
    if name_or_path in FAMILIES:
        return FAMILIES.create(name_or_path)
    if not looks_like_file(str(name_or_path)):
        raise KTError(f"unknown block family {name_or_path!r}; choose one of: {', '.join(FAMILIES.names())}, "
                      f"or pass a YAML/JSON family file (docs/usage.md).")
    path = Path(name_or_path).expanduser()
    return family_from_spec(read_spec(path), f"family file {path}")


def family_spec(family: BlockFamily) -> Dict[str, object]:
    """The family in the file schema (``family_file``): what pair sets, runs and translators store."""
    return fields_to_spec(family.config())


def family_from_spec(spec: Mapping[str, object], where: str = "family") -> BlockFamily:
    """The family a spec describes, checked; it needs no registry entry."""
    return BlockFamily(**spec_to_fields(spec, where, BLOCKS.names()))


def family_of(settings: Mapping[str, object]) -> BlockFamily:
    """The family of a pair set's settings: its stored spec, else (older sets) the registered name."""
    spec = settings.get("family_spec")
    return family_from_spec(spec, "the pair set's family") if spec else create_family(str(settings["family"]))


def is_registered(family: BlockFamily) -> bool:
    """True when ``family`` is exactly the registered family of its name."""
    return family.name in FAMILIES and FAMILIES.create(family.name) == family


def family_names() -> List[str]:
    return FAMILIES.names()


def stack_states(states: List[State]) -> State:
    """Fold K single-network state dicts into one ``members=K`` state dict (member axis in dim 0)."""
    out = {}
    for k in states[0]:
        t = states[0][k]
        out[k] = t.clone() if t.dim() == 0 else torch.cat([s[k] for s in states], dim=0)
    return out


def unstack_state(state: State, members: int) -> List[State]:
    """Split a ``members=K`` state dict back into K single-network state dicts."""
    out: List[State] = [{} for _ in range(members)]
    for k, t in state.items():
        parts = [t] * members if t.dim() == 0 else t.chunk(members, dim=0)
        for m in range(members):
            out[m][k] = parts[m].clone()
    return out


def fold_members(stacked: Mapping[str, torch.Tensor], index=slice(None)) -> State:
    """Per-network tensors ``(P, *shape)`` (rows ``index``) -> a ``members=len`` module's folded layout."""
    return {k: v[index].reshape(-1, *v.shape[2:]) if v.dim() > 1 else v[0] for k, v in stacked.items()}


def fold_bn(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> Tuple[State, State]:
    """The large blocks as two affine maps: (weights, per-channel shifts), BN or bias folded in
    (``TwoLayerBlock.fold``); tensors carry a leading ``(P,)`` network axis."""
    return family.prototype("large").fold(large)


def bn_output_stats(family: BlockFamily, large: Mapping[str, torch.Tensor]) -> State:
    """Per large-block layer, the mean and standard deviation of each output channel after its BN on the
    data the network was trained on, ``(P, o, 2)``: ``beta`` and ``|gamma| * sqrt(var / (var + eps))``.
    Data-free (they are BN's parameters and statistics), and they say how each channel is distributed,
    e.g. how often a hidden unit is on. A layer without BN gets zeros."""
    block = family.prototype("large")
    out = {}
    for key, bn in block.layers.items():
        block._check_keys(large, key, bn)
        w = large[key]
        if bn is None:
            out[key] = torch.zeros(*w.shape[:2], 2, dtype=w.dtype, device=w.device)
            continue
        var = large[f"{bn}.running_var"]
        std = large[f"{bn}.weight"].abs() * torch.sqrt(var / (var + getattr(block, bn).eps))
        out[key] = torch.stack([large[f"{bn}.bias"], std], -1)
    return out


@functools.lru_cache(maxsize=None)
def _prototype(family: BlockFamily, which: str) -> TwoLayerBlock:
    with torch.random.fork_rng(devices=[]):
        return family.block(which).requires_grad_(False)


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> State:
    """The entries of ``state`` under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


__all__ = [
    "BlockFamily", "KTNetwork", "create_family", "family_names", "family_spec", "family_from_spec", "family_of",
    "stack_states", "unstack_state", "prefixed",
    "fold_members", "fold_bn", "bn_output_stats",
    "BLOCKS", "FAMILIES",
]


def flatten_block(family: BlockFamily, which: str, stacked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stacked block state ``(P, ...)`` -> ``(P, N)``: its floating tensors in state-dict order."""
    block = family.prototype(which)
    keys = [k for k, v in block.state_dict().items() if v.is_floating_point()]
    return torch.cat([stacked[k].reshape(stacked[k].shape[0], -1).float() for k in keys], dim=1)


def unflatten_block(family: BlockFamily, which: str, flat: torch.Tensor) -> State:
    """``(P, N)`` -> stacked block state (floating tensors only); the inverse of ``flatten_block``."""
    block = family.prototype(which)
    shapes = [(k, v.shape) for k, v in block.state_dict().items() if v.is_floating_point()]
    n = sum(s.numel() for _, s in shapes)
    if flat.dim() != 2 or flat.shape[1] != n:
        raise KTError(f"expected flattened {family.name} {which}-block parameters of shape (batch, {n}), "
                      f"got {tuple(flat.shape)}.")
    out, start = {}, 0
    for k, s in shapes:
        out[k] = flat[:, start: start + s.numel()].reshape(flat.shape[0], *s)
        start += s.numel()
    return out
