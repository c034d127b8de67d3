"""Pair shards on disk: safetensors (no pickle) plus a JSON sidecar per shard and a folder manifest.

Layout of a pair folder::

    train-00000000-00000015.safetensors   # tensors "large.conv1.weight" (P, 6, 6, 3, 3), "small.*", ...
    train-00000000-00000015.json          # settings, made_with, sha256, per pair: index, seed, base_acc, small_acc
    val-00000000-00000007.safetensors
    manifest.json                         # everything above, rebuilt from the sidecars after each run

A shard counts as finished only when its sidecar exists, and the sidecar is written (atomically)
after the shard, so a killed run leaves either a whole shard or none. The digest covers every shard
and every sidecar; readers rebuild the manifest from the sidecars rather than trust the one on disk. Workers that split one folder
with ``start_index``/``count`` never write the same file, and the manifest is rebuilt from sidecars.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import KTError
from ..io import atomic_write, atomic_write_json, sha256_file

SPLITS = ("train", "val")
SIDECAR_KEYS = {"split": str, "first": int, "count": int, "file": str, "sha256": str, "settings": dict, "pairs": list}
PARTS = ("begin", "large", "last", "small")


def shard_tensors(out: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """``train_pairs``' per-network states as a shard's tensors: ``"part.name"`` -> ``(P, *shape)``."""
    return {f"{part}.{name}": torch.stack([state[name] for state in out[part]])
            for part in PARTS for name in out[part][0]}


def shard_name(split: str, first: int, last: int) -> str:
    return f"{split}-{first:08d}-{last:08d}"


@dataclass
class PairSet:
    """All pairs of one split, stacked: ``tensors["large.conv1.weight"]`` is ``(P, ...)``."""

    settings: Dict[str, object]
    tensors: Dict[str, torch.Tensor]
    records: List[Dict[str, object]]

    def __len__(self) -> int:
        return len(self.records)

    def part(self, name: str) -> Dict[str, torch.Tensor]:
        """The stacked state dict of one part ('begin', 'large', 'last' or 'small')."""
        p = name + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def subset(self, index: torch.Tensor) -> "PairSet":
        return PairSet(self.settings, {k: v[index] for k, v in self.tensors.items()},
                       [self.records[i] for i in index.tolist()])


def write_shard(folder: Path, split: str, first: int, tensors: Mapping[str, torch.Tensor],
                records: List[Dict[str, object]], settings: Mapping[str, object],
                made_with: Optional[Mapping[str, object]] = None) -> Path:
    """Write one shard and then its sidecar, each atomically. ``made_with``: what else decides the
    shard's bits (kernels, threads, device), which a resume must match."""
    name = shard_name(split, first, first + len(records) - 1)
    shard = folder / f"{name}.safetensors"
    atomic_write(shard, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    atomic_write_json(folder / f"{name}.json", {
        "split": split, "first": first, "count": len(records), "file": shard.name,
        "sha256": sha256_file(shard), "size": shard.stat().st_size, "settings": dict(settings),
        **({"made_with": dict(made_with)} if made_with else {}), "pairs": records,
    })
    return shard


def sidecars(folder: Path, split: str) -> List[Dict[str, object]]:
    """Finished shards of ``split`` in index order; overlapping shards are an error."""
    out = []
    for path in sorted(Path(folder).glob(f"{split}-*.json")):
        try:
            meta = json.loads(path.read_text())
            ok = isinstance(meta, dict) and all(isinstance(meta.get(k), t) for k, t in SIDECAR_KEYS.items())
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok or meta["first"] < 0 or meta["count"] != len(meta["pairs"]):
            raise KTError(f"shard sidecar {path} is corrupt; delete it (and its .safetensors) and rerun generate.")
        out.append(meta)
    out.sort(key=lambda m: m["first"])
    for a, b in zip(out, out[1:]):
        if a["first"] + a["count"] > b["first"]:
            raise KTError(
                f"shards {a['file']} and {b['file']} in {folder} overlap; they were written with different "
                f"--shard-size values: delete one of them."
            )
    return out


def shard_is_whole(folder: Path, meta: Mapping[str, object]) -> bool:
    """The sidecar's shard is there, inside the folder, with the size and checksum it recorded."""
    shard = _shard_path(folder, meta)
    if shard is None or not shard.is_file():
        return False
    if "size" in meta and shard.stat().st_size != meta["size"]:
        return False
    return sha256_file(shard) == meta["sha256"]


def remove_shard(folder: Path, meta: Mapping[str, object]) -> None:
    """Delete a bad shard's sidecar (first: the shard no longer counts), then the shard itself."""
    name = _own_name(meta)
    for path in (folder / f"{name}.json", folder / f"{name}.safetensors"):
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files that killed writes left (``.<file name>.<random>.tmp``); returns how many."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _own_name(meta: Mapping[str, object]) -> str:
    first = int(meta["first"])
    return shard_name(str(meta["split"]), first, first + int(meta["count"]) - 1)


def _shard_path(folder: Path, meta: Mapping[str, object]) -> Optional[Path]:
    """The shard a sidecar names, or None unless that is the shard's own name (never a path elsewhere)."""
    own = f"{_own_name(meta)}.safetensors"
    return Path(folder) / own if meta.get("file") == own else None


def check_settings(folder: Path, settings: Mapping[str, object],
                   metas: Optional[Mapping[str, List[Dict[str, object]]]] = None) -> None:
    """Refuse to mix pairs made under different settings in one folder (``metas``: its sidecars by split,
    when the caller has read them already)."""
    for split in SPLITS:
        for meta in (metas[split] if metas is not None else sidecars(folder, split)):
            if meta["settings"] != dict(settings):
                diff = sorted(k for k in set(meta["settings"]) | set(settings)
                              if meta["settings"].get(k) != settings.get(k))
                raise KTError(
                    f"{folder} holds pairs made with other settings ({', '.join(diff)} differ, e.g. {meta['file']}); "
                    f"use another --output folder or the same settings."
                )


def check_made_with(folder: Path, made_with: Mapping[str, object], metas: Mapping[str, List[Dict[str, object]]],
                    fix: str) -> None:
    """Refuse to resume a folder whose shards were made by another arithmetic revision of the generator,
    other kernels, threads or device (other bits); sidecars from before ``made_with`` was recorded are
    taken as they are. ``fix``: what to rerun with."""
    for split in SPLITS:
        for meta in metas[split]:
            old = meta.get("made_with")
            if old is None or old == dict(made_with):
                continue
            revision = old.get("arithmetic", 1)   # sidecars of revision 1 did not record it
            if revision != made_with.get("arithmetic"):
                raise KTError(f"{folder} holds shards made by the generator's arithmetic revision {revision} (e.g. "
                              f"{meta['file']}), this kt-mlflow makes revision {made_with.get('arithmetic')}, which "
                              f"gives other bits: finish it with the kt-mlflow that began it, or use another --output.")
            raise KTError(f"{folder} holds shards made with {_shown(old)} (e.g. {meta['file']}), this run would use "
                          f"{_shown(made_with)}, which gives other bits: {fix}, or use another --output.")


def _shown(made_with: Mapping[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(made_with.items()) if k != "arithmetic")


def load_split(folder: Path, split: str, device: Optional[torch.device] = None) -> PairSet:
    """Load and verify every finished shard of ``split``; a bad shard is reported by name."""
    folder = Path(folder)
    metas = sidecars(folder, split)
    if not metas:
        raise KTError(f"no {split} pair shards in {folder}; run `kt generate --output {folder}` first.")
    _check_complete(folder, split, metas)
    parts: Dict[str, List[torch.Tensor]] = {}
    records: List[Dict[str, object]] = []
    for meta in metas:
        shard = _shard_path(folder, meta)
        if shard is None:
            raise KTError(f"sidecar {_own_name(meta)}.json in {folder} names {meta.get('file')!r}, not its own shard; "
                          f"delete it and rerun generate.")
        if not shard.is_file():
            raise KTError(f"pair shard {shard} is missing but listed by its sidecar; rerun generate to rebuild it.")
        if sha256_file(shard) != meta["sha256"]:
            raise KTError(f"pair shard {shard} is truncated or corrupt (checksum mismatch); delete it and rerun generate.")
        try:
            tensors = load_file(str(shard), device=str(device or "cpu"))
        except (SafetensorError, OSError) as e:
            raise KTError(f"pair shard {shard} cannot be read ({e}); delete it and rerun generate.") from None
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
        records.extend(meta["pairs"])
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    return PairSet(metas[0]["settings"], tensors, records)


def _check_complete(folder: Path, split: str, metas: List[Dict[str, object]]) -> None:
    """Every index of the split from 0 on, up to what the manifest recorded: a hole is named."""
    expected = 0
    for meta in metas:
        if meta["first"] != expected:
            raise KTError(f"{split} pairs {expected}..{meta['first'] - 1} are missing from {folder}; rerun "
                          f"`kt generate` with its settings and --output {folder} to make them.")
        expected = meta["first"] + meta["count"]
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())["splits"][split]["count"]
        except (ValueError, KeyError, TypeError):
            raise KTError(f"{manifest} is corrupt; rerun `kt generate` with --output {folder} to rebuild it.") from None
        if recorded > expected:
            raise KTError(f"{split} pairs {expected}..{recorded - 1} are missing from {folder} (its manifest "
                          f"records {recorded}); rerun `kt generate` with its settings and --output {folder}.")


def digest(folder: Path, metas: Optional[Mapping[str, List[Dict[str, object]]]] = None) -> str:
    """A short digest of every finished shard and its sidecar (changes when any pair or record changes)."""
    h = hashlib.sha256()
    for split in SPLITS:
        for meta in (metas[split] if metas is not None else sidecars(folder, split)):
            h.update(meta["sha256"].encode())
            h.update(hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).digest())
    return h.hexdigest()[:16]


def manifest_of(folder: Path) -> Dict[str, object]:
    """The manifest of ``folder`` as its sidecars say (what ``manifest.json`` holds when nothing was altered)."""
    folder = Path(folder)
    by_split = {split: sidecars(folder, split) for split in SPLITS}
    manifest: Dict[str, object] = {"digest": digest(folder, by_split), "splits": {}}
    for split in SPLITS:
        metas = by_split[split]
        if metas:
            manifest["settings"] = metas[0]["settings"]
        manifest["splits"][split] = {
            "count": sum(m["count"] for m in metas),
            "shards": [{k: m[k] for k in ("file", "first", "count", "sha256")} for m in metas],
            "pairs": [dict(p, shard=m["file"]) for m in metas for p in m["pairs"]],
        }
    return manifest


def write_manifest(folder: Path) -> Dict[str, object]:
    """Rebuild ``manifest.json`` from the sidecars (safe to call from any worker at any time)."""
    manifest = manifest_of(folder)
    atomic_write_json(Path(folder) / "manifest.json", manifest)
    return manifest
