"""Your own model: translate the block at a module path of any network or checkpoint, your names kept.

A user's block is matched to the translator family's large block by structure, not by name: its
tensors in state-dict order (module registration order) must have the large block's shapes, with a
``Linear`` weight ``(out, in)`` standing for kt's 1x1 layer ``(out, in, 1, 1)``. So a torchvision
``BasicBlock`` (``conv1``, ``bn1``, ``conv2``, ``bn2``) or a transformer's MLP (``norm``, ``fc1``,
``fc2``, under any names) fits without renaming.

Example:
    >>> tr = kt_mlflow.load_translator("kt-paper_mnist-channel_set")        # doctest: +SKIP
    >>> model = swap_block(model, "layer1.0", tr)                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import BlockFamily
from ..errors import KTError

State = Dict[str, torch.Tensor]


def _describe(state: Mapping[str, torch.Tensor], limit: int = 6) -> str:
    items = [f"{k} {tuple(v.shape)}" for k, v in state.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} tensors)" if len(items) > limit else "")


def match_block(state: Mapping[str, torch.Tensor], family: BlockFamily, where: str) -> State:
    """A user's block state (their names, state-dict order) -> the family's large-block state (kt names).

    One line says what was found and what was expected when the structure differs.
    """
    want = family.prototype("large").state_dict()
    got = list(state.items())
    expected = f"expected a {family.name} large block ({family.large}): {_describe(want)}"
    if len(got) != len(want):
        raise KTError(f"{where} has {len(got)} tensors ({_describe(state)}); {expected}.")
    out = {}
    for (name, t), (key, ref) in zip(got, want.items()):
        if tuple(t.shape) == tuple(ref.shape):
            out[key] = t
        elif t.dim() == 2 and tuple(t.shape) + (1, 1) == tuple(ref.shape):  # nn.Linear for a 1x1 layer
            out[key] = t[..., None, None]
        else:
            raise KTError(f"{where}: {name} has shape {tuple(t.shape)} where {key} {tuple(ref.shape)} belongs; {expected}.")
        if t.is_floating_point() != ref.is_floating_point():
            raise KTError(f"{where}: {name} is {t.dtype} where {key} is {ref.dtype}; {expected}.")
    return out


class TokenMLPBlock(nn.Module):
    """The small ``mlp`` block on tokens ``(..., d)``, as transformers hold them: x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, width: int, hidden: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def small_module(family: BlockFamily, small: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain PyTorch module computing the translated small block: kt's block for conv kinds
    (``(B, C, H, W)``), ``TokenMLPBlock`` for ``mlp`` (tokens ``(..., d)``, Linear weights)."""
    if family.small != "mlp":
        block = family.small_block()
        block.load_state_dict(small)
        return block
    block = TokenMLPBlock(family.width, family.small_hidden, family.small_norm)
    block.load_state_dict({k: v[..., 0, 0] if v.dim() == 4 else v for k, v in small.items()})
    return block


def split_checkpoint(state: Mapping[str, torch.Tensor], block: str) -> Tuple[State, State]:
    """(the block's tensors without the prefix, every other tensor) of a checkpoint."""
    prefix = block.rstrip(".") + "."
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not inside:
        tops = sorted({k.split(".")[0] for k in state})[:8]
        raise KTError(f"no tensors under {block!r} in the checkpoint; its top-level modules are {', '.join(tops)}: "
                      f"pass --block as a module path such as layer1.0.")
    return inside, {k: v for k, v in state.items() if not k.startswith(prefix)}


def sized(translator, state: Mapping[str, torch.Tensor], small_hidden: Optional[int] = None):
    """The translator at the size of a user's block (read by structure: the tensor where the large
    block's first layer sits) and ``small_hidden``; unchanged sizes for a one-size translator."""
    if not translator.sizes:
        return translator.at_size(small_hidden)
    ref = translator.family.prototype("large")
    keys = list(ref.state_dict())
    tensors = list(state.values())
    at = keys.index(next(iter(ref.layers)))
    hidden = int(tensors[at].shape[0]) if len(tensors) == len(keys) and tensors[at].dim() else None
    return translator.at_size(small_hidden, hidden)


def compress_checkpoint(state: Mapping[str, torch.Tensor], block: str, translator,
                        small_hidden: Optional[int] = None) -> State:
    """Any checkpoint with the block at ``block`` translated: its keys replaced by the small block's
    (under the same prefix, the small block's own names, Linear shapes for ``mlp``), the rest kept.
    ``small_hidden``: the small block's hidden width, for a translator that serves several sizes."""
    inside, rest = split_checkpoint(state, block)
    translator = sized(translator, inside, small_hidden)
    large = match_block(inside, translator.family, f"block {block}")
    small = small_module(translator.family, translator.translate(large)).state_dict()
    return {**rest, **{f"{block}.{k}": v for k, v in small.items()}}


def swap_block(model: nn.Module, path: str, translator, small_hidden: Optional[int] = None) -> nn.Module:
    """Replace submodule ``path`` of ``model`` by the translated small block; returns ``model`` in eval mode.
    ``small_hidden``: the small block's hidden width, for a translator that serves several sizes.

    Example:
        >>> model = swap_block(my_resnet, "layer1.0", kt_mlflow.load_translator("kt-paper_mnist-channel_set"))  # doctest: +SKIP
    """
    try:
        old = model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise KTError(f"the model has no submodule {path!r}; some of its modules: {', '.join(names)}.") from None
    translator = sized(translator, old.state_dict(), small_hidden)
    large = match_block(old.state_dict(), translator.family, f"module {path} ({type(old).__name__})")
    new = small_module(translator.family, translator.translate(large))
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new = new.to(ref.device, ref.dtype)
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model.eval()
