"""``Translator``: turns a trained large block into a small block (and a network into a compressed one)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..blocks import BlockFamily, KTNetwork, create_family, family_from_spec, non_finite, prefixed
from ..errors import KTError
from ..family_file import fields_to_spec
from ..io import atomic_write, atomic_write_json
from . import rescale, tokens

State = Dict[str, torch.Tensor]


class TranslatorNet(nn.Module):
    """An architecture from the registry wrapped in per-feature input/output standardisation."""

    def __init__(self, core: nn.Module, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.register_buffer("out_mean", torch.zeros(out_dim))
        self.register_buffer("out_std", torch.ones(out_dim))

    def forward(self, x: torch.Tensor, small_hidden: Optional[int] = None) -> torch.Tensor:
        x = (x - self.in_mean) / self.in_std
        out = self.core(x) if small_hidden is None else self.core(x, small_hidden=small_hidden)
        return out * self.out_std + self.out_mean


class Translator:
    """A translator network bound to a block family and a token encoding.

    A ``channel_set`` translator built with ``sizes=[[H, M], ...]`` (arch kwarg) serves several sizes:
    ``at_size`` gives a view of the same net for large hidden H and small hidden M, and ``translate``
    takes ``small_hidden`` (the large block's own hidden width is read from its weights).
    """

    def __init__(self, family: BlockFamily, arch: str, arch_kwargs: Mapping[str, Any], bn_aware: bool = False,
                 net: Optional[TranslatorNet] = None, rescale: bool = False, bn_stats: bool = False) -> None:
        from . import ARCHITECTURES

        if (rescale or bn_stats) and not bn_aware:
            raise KTError("rescale and bn_stats read BN-folded blocks; use them together with bn_aware.")
        self.family, self.arch, self.arch_kwargs, self.bn_aware = family, arch, dict(arch_kwargs), bn_aware
        self.rescale, self.bn_stats = rescale, bn_stats
        if self.sizes and arch != "channel_set":
            raise KTError(f"only the channel_set translator serves several sizes, not {arch}; train with "
                          f"--arch channel_set (or the best recipe).")
        src, dst = tokens.layout(family, "large", bn_aware, bn_stats), tokens.layout(family, "small")
        self.net = net or TranslatorNet(
            ARCHITECTURES.create(arch, in_tokens=src.tokens, in_dim=src.dim, out_tokens=dst.tokens, out_dim=dst.dim,
                                 src_shapes=src.shapes, dst_shapes=dst.shapes, **self.arch_kwargs), src.dim, dst.dim)

    @property
    def sizes(self) -> Tuple[Tuple[int, int], ...]:
        """The (large hidden, small hidden) sizes trained for; empty: the family's one size only."""
        return tuple((int(h), int(m)) for h, m in self.arch_kwargs.get("sizes", ()))

    def at_size(self, small_hidden: Optional[int] = None, large_hidden: Optional[int] = None) -> "Translator":
        """This translator (the same net) for another size; a one-line error when it serves one size only."""
        family = self.family.resized(large_hidden, small_hidden)
        if family == self.family:
            return self
        if not self.sizes:
            raise KTError(f"this translator writes {self.family.name} blocks of hidden {self.family.small_hidden} from "
                          f"hidden {self.family.large_hidden} only, not {family.small_hidden} from {family.large_hidden}; "
                          f"train one on pair sets of several sizes (kt train --pairs A,B,...).")
        view = copy.copy(self)
        view.family = family
        return view

    def sized_for(self, large: Mapping[str, torch.Tensor], small_hidden: Optional[int] = None) -> "Translator":
        """The view that translates these large blocks (kt names, one or stacked) into ``small_hidden``."""
        return self.at_size(small_hidden, self.family.hidden_of(large) if self.sizes else None)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The net on input tokens, writing this view's small size."""
        return self.net(x, small_hidden=self.family.small_hidden) if self.sizes else self.net(x)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def config(self) -> Dict[str, Any]:
        return {"family": self.family.name, "family_config": self.family.config(), "arch": self.arch,
                "arch_kwargs": self.arch_kwargs, "bn_aware": self.bn_aware, "rescale": self.rescale,
                "bn_stats": self.bn_stats}

    def config_tags(self) -> Dict[str, str]:
        """The config as flat strings (registry tags, searchable in the UI)."""
        return {"kt.family": self.family.name, "kt.large": self.family.large, "kt.small": self.family.small,
                "kt.arch": self.arch, "kt.bn_aware": str(self.bn_aware),
                "kt.rescale": str(self.rescale), "kt.bn_stats": str(self.bn_stats),
                **{f"kt.arch.{k}": str(v) for k, v in self.arch_kwargs.items()}}

    # -- translation ---------------------------------------------------------------------------
    def encode(self, large: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Stacked large blocks -> the net's input tokens, and the residual scales ``decode`` needs
        (None unless the translator works in balanced scale coordinates)."""
        large = {k: v.to(self.device, torch.float32) for k, v in large.items()}
        if self.rescale:
            return tokens.encode_rescaled(self.family, large, self.bn_stats)
        return tokens.encode_source(self.family, large, self.bn_aware, self.bn_stats), None

    def decode(self, out: torch.Tensor, scales: Optional[torch.Tensor]) -> State:
        """The net's output tokens -> stacked small-block weights for the original networks."""
        weights, shifts = tokens.decode_target(self.family, out)
        if scales is not None:
            weights, shifts = rescale.small_to_original(weights, shifts, tokens.layout(self.family, "small").keys, scales)
        return self.family.prototype("small").unfold(weights, shifts)

    @torch.no_grad()
    def translate_batch(self, large: Mapping[str, torch.Tensor], small_hidden: Optional[int] = None) -> State:
        """Stacked large blocks ``(P, ...)`` -> stacked small blocks ``(P, ...)`` (data-free)."""
        tr = self.sized_for(large, small_hidden)
        tr.net.eval()
        x, scales = tr.encode(large)
        return {k: v.cpu() for k, v in tr.decode(tr.run(x), scales).items()}

    def translate(self, large_block_state: Mapping[str, torch.Tensor], small_hidden: Optional[int] = None) -> State:
        """One large block's state dict -> one small block's state dict (of hidden ``small_hidden``, where
        the translator serves several sizes; default: its family's)."""
        tr = self.sized_for(large_block_state, small_hidden)
        tr.family.check_block_state(large_block_state, "large")
        out = tr.translate_batch({k: v[None] for k, v in large_block_state.items()})
        bad = non_finite(out)
        if bad:
            raise KTError(f"the translated small block's {bad[0]} is not finite: the large block's weights lie far "
                          f"outside those the translator was trained on; compress a trained block of this family.")
        return {k: v[0].contiguous() for k, v in out.items()}

    def compress(self, network: nn.Module, small_hidden: Optional[int] = None) -> KTNetwork:
        """A trained base network (begin + large + last) -> the same network with the small block."""
        return self.compress_state(network.state_dict(), small_hidden)

    def compress_state(self, state: Mapping[str, torch.Tensor], small_hidden: Optional[int] = None) -> KTNetwork:
        """A trained base network's state dict -> the compressed network (checked first, one-line errors)."""
        tr = self.sized_for(prefixed(state, "block"), small_hidden)
        tr.family.check_network_state(state)
        compressed = tr.family.compressed_network()
        compressed.begin.load_state_dict(prefixed(state, "begin"))
        compressed.last.load_state_dict(prefixed(state, "last"))
        compressed.block.load_state_dict(tr.translate(prefixed(state, "block")))
        return compressed.eval()

    # -- persistence (safetensors + JSON: nothing is unpickled) ----------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        atomic_write(folder / "translator.safetensors",
                     lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                                           str(tmp)))
        atomic_write_json(folder / "translator.json", self.config())

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> "Translator":
        folder = Path(folder)
        try:
            config = json.loads((folder / "translator.json").read_text())
            weights = load_file(str(folder / "translator.safetensors"), device=device)
        except (OSError, ValueError) as e:
            raise KTError(f"{folder} does not hold a saved translator ({e}); save one with Translator.save.") from None
        family = (family_from_spec(fields_to_spec(config["family_config"]), f"{folder}/translator.json")
                  if "family_config" in config else create_family(config["family"]))
        tr = cls(family, config["arch"], config["arch_kwargs"], config["bn_aware"],
                 rescale=config.get("rescale", False), bn_stats=config.get("bn_stats", False))
        tr.net.load_state_dict(weights)
        tr.net.to(device).eval()
        return tr


def create_translator(arch: str, family: BlockFamily, bn_aware: bool = False, rescale: bool = False,
                      bn_stats: bool = False, **arch_kwargs: Any) -> Translator:
    """A fresh (untrained) translator of architecture ``arch`` for ``family``."""
    from . import ARCHITECTURES

    ARCHITECTURES.get(arch)  # unknown names fail here with the list of known ones
    return Translator(family, arch, arch_kwargs, bn_aware, rescale=rescale, bn_stats=bn_stats)
