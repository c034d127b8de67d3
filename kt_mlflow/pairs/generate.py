"""The ``generate`` step: train N (large block, small block) pairs by the KT protocol, K at a time.

Global pair indices ``[0, n_pairs)`` are training pairs and ``[n_pairs, n_pairs + n_val)`` are the
held-out validation networks (seeds from a disjoint range). ``start_index``/``count`` select a slice
of that index space, so several workers can fill one folder without overlap. Under torchrun each
rank takes every WORLD_SIZE-th shard of that plan, so no flag differs between ranks, and a rerun
with any number of ranks resumes the same folder.

Example:
    >>> from kt_mlflow.config import GenerateConfig
    >>> cfg = GenerateConfig(output="pairs", n_pairs=8, n_val=4)      # doctest: +SKIP
    >>> summary = generate_pairs(cfg)                                    # doctest: +SKIP
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..blocks import BlockFamily, family_spec, is_registered, non_finite
from ..config import GenerateConfig, PairSchedule
from ..device import cpu_share
from ..distributed import all_sum, barrier, world
from ..errors import KTError
from .store import (
    check_made_with,
    check_settings,
    remove_shard,
    remove_stale_temporaries,
    shard_is_whole,
    shard_tensors,
    sidecars,
    write_manifest,
    write_shard,
)
from .workers import ShardTrainer

VAL_SEED_OFFSET = 50_000_000  # validation seeds never meet training seeds below this many pairs


def pair_settings(cfg: GenerateConfig, family: BlockFamily) -> Dict[str, object]:
    """The settings every shard records: a family that is not exactly a registered one is stored whole,
    so the pair set can be read anywhere (and a changed family file cannot resume into it)."""
    settings = {**cfg.settings(), "family": family.name}
    if not is_registered(family):
        settings["family_spec"] = family_spec(family)
    return settings


def pair_seed(seed: int, split: str, index: int) -> int:
    return seed * 100_000_000 + (VAL_SEED_OFFSET if split == "val" else 0) + index


def plan_shards(cfg: GenerateConfig) -> List[Tuple[str, int, int]]:
    """(split, first index within split, count) for every shard of this worker's slice."""
    total = cfg.n_pairs + cfg.n_val
    lo = cfg.start_index
    hi = total if cfg.count is None else min(total, lo + cfg.count)
    plan = []
    for split, s_lo, s_hi in (("train", 0, cfg.n_pairs), ("val", cfg.n_pairs, total)):
        a, b = max(lo, s_lo), min(hi, s_hi)
        for first in range(a, b, cfg.members):
            plan.append((split, first - s_lo, min(cfg.members, b - first)))
    return plan


def _verified(folder: Path, plan: List[Tuple[str, int, int]],
              metas: Dict[str, List[dict]]) -> Tuple[set, List[dict]]:
    """The planned shards already on disk and whole, and the sidecars of planned shards that are not (a
    file missing, truncated or altered: to remove and make again), from the sidecars ``metas`` (read
    once: linear); a shard covering planned indices with other bounds is an error. Nothing is removed here."""
    by_bounds = {(split, m["first"], m["count"]): m for split, ms in metas.items() for m in ms}
    done, bad = set(), []
    for split, first, n in plan:
        meta = by_bounds.get((split, first, n))
        if meta is not None:
            if shard_is_whole(folder, meta):
                done.add((split, first, n))
            else:
                bad.append(meta)
            continue
        for other in metas[split]:
            lo, hi = other["first"], other["first"] + other["count"]
            if lo < first + n and first < hi:
                raise KTError(
                    f"{folder / other['file']} covers some of pairs {first}..{first + n - 1} with other bounds; "
                    f"rerun with the --members/--start-index used before, or another --output."
                )
    return done, bad


def _check_finite(tensors: Dict[str, torch.Tensor], split: str, first: int, n: int) -> None:
    bad = non_finite(tensors)
    if bad:
        raise KTError(f"{split} pairs {first}..{first + n - 1} trained to non-finite {bad[0]}; nothing of them is "
                      f"written: lower --lr (the shards made so far are kept).")


class GenerationJob:
    """One worker's (or rank's) share of ``cfg``, checked: everything that can be refused (data, device,
    workers, kernels, a folder of other settings or other bits) is refused here, before any MLflow run
    opens or anything is written; ``run`` then trains and writes."""

    def __init__(self, cfg: GenerateConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.trainer = ShardTrainer(cfg.family, cfg.dataset, cfg.data_root, cfg.schedule, cfg.device, cfg.workers,
                                    cfg.kernels, cfg.colour)
        self.folder = Path(cfg.folder())
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = pair_settings(cfg, self.trainer.family)
        self.metas = {split: sidecars(self.folder, split) for split in ("train", "val")}
        check_settings(self.folder, self.settings, self.metas)
        rank = world()
        self.plan = plan_shards(cfg)[rank.rank::rank.size]   # this rank's share: every WORLD_SIZE-th shard
        self.done, self.bad = _verified(self.folder, self.plan, self.metas)
        if len(self.done) < len(self.plan):   # a rank that writes nothing mixes no bits, whatever made the folder
            check_made_with(self.folder, self.trainer.made_with, self.metas, _same_bits(self.metas))

    def run(self, on_shard=None) -> Dict[str, object]:
        """Generate (or resume) the shards into the folder; returns a summary dict (the job's, on rank 0)."""
        cfg, folder, trainer, rank = self.cfg, self.folder, self.trainer, world()
        if rank.is_main:
            remove_stale_temporaries(folder)
        barrier()   # before any rank writes: a temporary file from now on is a live one
        plan = self.plan
        for meta in self.bad:   # its sidecar first: the shard no longer counts, and is made again
            remove_shard(folder, meta)
        todo = {(split, first, n): [pair_seed(cfg.seed, split, first + i) for i in range(n)]
                for split, first, n in plan if (split, first, n) not in self.done}
        protocols = {key: shard_protocol(cfg, *key[:2]) for key in todo} if cfg.protocols else {}
        schedules = {key: cfg.protocol_schedule(name) for key, name in protocols.items()}
        total = sum(len(seeds) * _epochs(schedules.get(key, cfg.schedule)) for key, seeds in todo.items())
        bar = tqdm(total=total, unit="net-epoch", dynamic_ncols=True,
                   desc="generate" if not rank.distributed else f"generate rank {rank.rank}", position=rank.local_rank)
        made, start = 0, time.perf_counter()
        with trainer:
            for (split, first, n), out in trainer.run(todo, bar, schedules):
                records = _records(out, first, todo[split, first, n], protocols.get((split, first, n)))
                tensors = shard_tensors(out)
                _check_finite(tensors, split, first, n)
                write_shard(folder, split, first, tensors, records, self.settings, trainer.made_with)
                made += n
                if on_shard is not None:
                    on_shard(made, time.perf_counter() - start, records)
        bar.close()
        barrier()   # every rank's shards are written: rank 0 may now read them all
        elapsed = time.perf_counter() - start
        made, planned = (int(v) for v in all_sum([made, sum(n for _, _, n in plan)]))
        if not rank.is_main:
            return {"pairs_made": made, "seconds": elapsed}
        return self._summary(write_manifest(folder), made, planned, elapsed)

    def _summary(self, manifest: Dict[str, object], made: int, planned: int, elapsed: float) -> Dict[str, object]:
        trainer, size = self.trainer, world().size
        summary = {
            "pairs_made": made, "pairs_skipped": planned - made, "seconds": elapsed, "ranks": size,
            "pairs_per_min": 60.0 * made / elapsed if made else 0.0, "digest": manifest["digest"],
            "n_train_total": manifest["splits"]["train"]["count"], "n_val_total": manifest["splits"]["val"]["count"],
            "device": str(trainer.device), "workers": trainer.workers, "native_kernels": trainer.kernels == "native",
        }
        for split in ("train", "val"):
            pairs = manifest["splits"][split]["pairs"]
            for key in ("base_acc", "small_acc"):
                if pairs:
                    summary[f"{split}_{key}_mean"] = sum(p[key] for p in pairs) / len(pairs)
        print(
            f"generate: {made} pairs made, {summary['pairs_skipped']} already there, in {elapsed:.1f} s "
            f"({summary['pairs_per_min']:.1f} pairs/min on {trainer.device}, {_processes(size, trainer.workers)}, "
            f"{trainer.kernels} kernels); folder {self.folder} holds "
            f"{summary['n_train_total']} train + {summary['n_val_total']} val pairs, digest {manifest['digest']}"
        )
        return summary


def generate_pairs(cfg: GenerateConfig, on_shard=None) -> Dict[str, object]:
    """Generate (or resume) this worker's shards into ``cfg.output``; returns a summary dict."""
    return GenerationJob(cfg).run(on_shard)


def shard_protocol(cfg: GenerateConfig, split: str, first: int) -> str:
    """The protocol that trains the shard of ``split`` starting at ``first``: drawn uniformly from
    ``--protocols`` by the seed and the shard alone, so any rank or rerun draws the same."""
    return random.Random(f"{cfg.seed}:{split}:{first}").choice(cfg.protocol_names())


def _epochs(schedule: PairSchedule) -> int:
    return schedule.epochs + schedule.small_epochs


def _records(out: Dict[str, object], first: int, seeds: List[int],
             protocol: Optional[str] = None) -> List[Dict[str, object]]:
    mixture = {"protocol": protocol} if protocol else {}
    return [{"index": first + i, "seed": seed, "base_acc": round(float(out["base_acc"][i]), 4),
             "small_acc": round(float(out["small_acc"][i]), 4), **mixture} for i, seed in enumerate(seeds)]


def _same_bits(metas: Dict[str, List[dict]]) -> str:
    """How to resume with the kernels, device and threads the folder's shards were made with."""
    old = next((m["made_with"] for ms in metas.values() for m in ms if "made_with" in m), {})
    fix = f"rerun with --kernels {old.get('kernels')} --device {old.get('device')}"
    threads = old.get("threads")
    if threads:
        workers = cpu_share() // int(threads)
        fix += f" --workers {workers}" if workers >= 1 else f" on a machine with {threads}+ cores"
        fix += f" ({threads} thread(s) per worker)"
    return fix


def _processes(ranks: int, workers: int) -> str:
    return f"{workers} worker(s)" if ranks == 1 else f"{ranks} ranks x {workers} worker(s)"
