"""``kt compress``: pull a translator by name and compress a user's saved network, data-free."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..blocks import family_spec, prefixed
from ..config import CompressConfig, family_file_of
from ..errors import KTError
from ..io import atomic_write
from ..tracking.models import load_translator
from ..translators.swap import compress_checkpoint, sized, split_checkpoint


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise KTError(f"no network file at {path}; pass the state dict saved with torch.save(net.state_dict(), PATH).")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        raise KTError(f"{path} is not a readable state dict ({type(e).__name__}); save it with "
                      f"torch.save(net.state_dict(), PATH) or safetensors.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KTError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; save net.state_dict().")
    return state


def save_state_dict(state: Dict[str, torch.Tensor], path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if Path(path).suffix == ".safetensors":
        atomic_write(Path(path), lambda tmp: save_file(state, str(tmp)))
    else:
        atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def compress_file(model: str, network: Path, output: Path, device: str = "cpu",
                  small_hidden: Optional[int] = None) -> Dict[str, int]:
    """Translate ``network``'s large block with translator ``model``; write the compressed network."""
    state = load_state_dict(network)
    translator = load_translator(model, device).sized_for(prefixed(state, "block"), small_hidden)
    compressed = translator.compress_state(state)
    base = translator.family.base_network()
    save_state_dict(compressed.state_dict(), output)
    before = sum(p.numel() for p in base.parameters())
    after = sum(p.numel() for p in compressed.parameters())
    block_before = sum(p.numel() for p in base.block.parameters())
    block_after = sum(p.numel() for p in compressed.block.parameters())
    print(f"compress: {network} -> {output}: parameters {before} -> {after} "
          f"(block {block_before} -> {block_after}, {100 * (1 - after / before):.1f}% fewer) "
          f"with translator {model} ({translator.family.name})")
    return {"params_before": before, "params_after": after, "block_before": block_before, "block_after": block_after}


def compress_block_file(model: str, network: Path, block: str, output: Path, device: str = "cpu",
                        small_hidden: Optional[int] = None) -> Dict[str, int]:
    """Translate the block at module path ``block`` of any checkpoint; write the checkpoint with the small
    block in its place and the small block's family (``<output>.family.yaml``) beside it."""
    state = load_state_dict(network)
    translator = sized(load_translator(model, device), split_checkpoint(state, block)[0], small_hidden)
    new = compress_checkpoint(state, block, translator)
    save_state_dict(new, output)
    family_file = family_file_of(str(output))
    atomic_write(family_file, lambda tmp: Path(tmp).write_text(yaml.safe_dump(family_spec(translator.family),
                                                                             sort_keys=False)))
    before, after = sum(v.numel() for v in state.values()), sum(v.numel() for v in new.values())
    prefix = block + "."
    block_before = sum(v.numel() for k, v in state.items() if k.startswith(prefix))
    block_after = sum(v.numel() for k, v in new.items() if k.startswith(prefix))
    print(f"compress: {network} -> {output}: block {block} {block_before} -> {block_after} numbers, checkpoint "
          f"{before} -> {after} ({100 * (1 - after / before):.1f}% fewer) with translator {model} "
          f"({translator.family.name}); family in {family_file}")
    return {"params_before": before, "params_after": after, "block_before": block_before, "block_after": block_after}


def run_compress(cfg: CompressConfig) -> Dict[str, int]:
    """``kt compress``: no MLflow run of its own (it reads the registry, writes the output files)."""
    cfg.validate()
    if cfg.block:
        return compress_block_file(cfg.model, Path(cfg.input), cfg.block, Path(cfg.output), cfg.device, cfg.small_hidden)
    return compress_file(cfg.model, Path(cfg.input), Path(cfg.output), cfg.device, cfg.small_hidden)
