"""``kt compress``: pull a translator by name and compress a user's saved network, data-free."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

from .errors import KTError
from .io import atomic_write


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
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise KTError(f"{path}: parameter {k} contains NaN or inf; compress a trained, finite network.")
    return state


def save_state_dict(state: Dict[str, torch.Tensor], path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if Path(path).suffix == ".safetensors":
        atomic_write(Path(path), lambda tmp: save_file(state, str(tmp)))
    else:
        atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def compress_file(model: str, network: Path, output: Path, device: str = "cpu") -> Dict[str, int]:
    """Translate ``network``'s large block with translator ``model``; write the compressed network."""
    from .tracking.models import load_translator

    state = load_state_dict(network)
    translator = load_translator(model, device)
    base = translator.family.base_network()
    missing = sorted(set(base.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(base.state_dict()))
    if missing or unexpected:
        raise KTError(f"{network} is not a {translator.family.name} base network (missing {missing[:3]}, "
                      f"unexpected {unexpected[:3]}); translator {model} expects "
                      f"kt_mlflow.create_family({translator.family.name!r}).base_network().")
    for k, v in base.state_dict().items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise KTError(f"{network}: {k} has shape {tuple(state[k].shape)}, translator {model} expects {tuple(v.shape)} "
                          f"(family {translator.family.name}).")
    base.load_state_dict(state)
    compressed = translator.compress(base)
    save_state_dict(compressed.state_dict(), output)
    before = sum(p.numel() for p in base.parameters())
    after = sum(p.numel() for p in compressed.parameters())
    block_before = sum(p.numel() for p in base.block.parameters())
    block_after = sum(p.numel() for p in compressed.block.parameters())
    print(f"compress: {network} -> {output}: parameters {before} -> {after} "
          f"(block {block_before} -> {block_after}, {100 * (1 - after / before):.1f}% fewer) "
          f"with translator {model} ({translator.family.name})")
    return {"params_before": before, "params_after": after, "block_before": block_before, "block_after": block_after}


