"""Run the generation schedule for many shards: in this process, or one worker process per CPU core.

A stacked step of K small networks is a few hundred short operations; splitting each of them over two
threads gains less than giving each core its own K networks, its own operations and its own cache
(1.09x to 1.20x more pairs per minute on a 2-core CPU; ``benchmarks/generate_throughput.py`` times both
layouts side by side). So on a CPU the default is one worker process per core, each training K
networks at once with one thread. With one thread per worker, a shard's bits do not depend on how
many cores the machine has.

Example:
    >>> from kt_mlflow.config import PairSchedule
    >>> with ShardTrainer("paper_mnist", "digits", None, PairSchedule(1, 1), "cpu", 2) as t:  # doctest: +SKIP
    ...     for key, out in t.run({"a": [0, 1], "b": [2, 3]}):
    ...         print(key, out["base_acc"])
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, Hashable, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from safetensors.torch import load, save
from tqdm.auto import tqdm

from ..blocks import create_family
from ..blocks.native import use_native
from ..config import PairSchedule
from ..data import load_for
from ..device import cpu_share, pick_device
from ..engine import keep_heap_for_good
from ..errors import KTError
from .make import train_pairs
from .store import PARTS, shard_tensors

# The generator's arithmetic revision: raised whenever a change reorders its floating-point operations
# (so the same settings give other bits), so that no folder mixes shards of two revisions.
# 2 (2026-12-06): channels-last gradients, BN2 at the kept positions, input gradients as forward convs.
# 3 (2026-12-07): the head's eval-mode BN folded into its conv, its linear layer a native member conv.
# 4 (2026-12-07): training-mode BN + ReLU and BN2's statistics from native one-pass sums.
# 5 (2026-12-07): the large block's eval-mode BN + ReLU folded into its first conv (scale into the
#   weights, shift and ReLU in the conv's epilogue): the recorded accuracies.
# 6 (2026-12-07): forward convolutions over zero-padded images (no border path): a layer with 1, 7, 13, ...
#   output channels sums its last channel's border positions with fused multiply-adds too (the same bits
#   as revision 5 for every other layer, the bundled families' included).
# 7 (2026-12-07): the first block's shift gradient (its BN's) summed in the pooled backward kernel, per image.
# 8 (2026-12-08): the head's linear layer with the images as its positions: its weight gradient sums the
#   images in registers (fused multiply-adds), not image by image in memory.
ARITHMETIC = 8


def resolve_workers(workers: int, device: torch.device) -> int:
    """``workers=0`` (auto): one per CPU core of this rank on a CPU, 1 on a GPU (one process drives it)."""
    if workers < 0:
        raise KTError(f"--workers must be >= 0 (0: one per CPU core), got {workers}.")
    if device.type != "cpu":
        if workers > 1:
            raise KTError(f"--workers {workers} splits CPU cores; on {device} use --workers 1 (or 0).")
        return 1
    return workers or cpu_share()


class ShardTrainer:
    """``train_pairs`` for a batch of shards (each a list of seeds), on ``workers`` processes.

    ``workers=1`` trains in this process with a thread per core of this rank; more start that many
    processes, each with ``cores // workers`` threads, that load the dataset once and then train shard after shard.
    ``run`` yields ``(key, result)`` as shards finish, so the caller can write each at once; every
    network-epoch trained, here or in a worker, counts on ``bar``.
    """

    def __init__(self, family: str, dataset: str, data_root: Optional[str], schedule: PairSchedule,
                 device: str = "auto", workers: int = 0, kernels: str = "auto", colour: bool = False) -> None:
        self.device = pick_device(device)
        self.workers = resolve_workers(workers, self.device)
        # Resolved (and the native kernels built) here, once, before any worker starts.
        self.family = create_family(family)
        self.native = use_native(kernels, self.device, self.family.name, self.family.native_kernels)
        self.kernels = "native" if self.native else "torch"
        self.bar: Optional[tqdm] = None
        # Loaded here even for worker processes: a bad data folder is reported before anything starts.
        self.data, self.schedule = load_for(self.family, dataset, data_root, colour), schedule
        self.pool: Optional[ProcessPoolExecutor] = None
        self.threads = max(1, cpu_share() // self.workers) if self.workers > 1 else torch.get_num_threads()
        if self.workers > 1:
            ctx = mp.get_context("spawn")  # a fresh interpreter: no OpenMP or MKL state copied by fork
            self.progress = ctx.Queue()
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_start_worker,
                initargs=(family, dataset, data_root, colour, schedule, self.kernels, self.threads, self.progress,
                          os.getpid()),
            )

    @property
    def made_with(self) -> Dict[str, object]:
        """What decides a shard's bits besides its settings: the generator's arithmetic revision, kernels,
        device, and on a CPU threads per process."""
        made = {"arithmetic": ARITHMETIC, "kernels": self.kernels, "device": self.device.type}
        return {**made, "threads": self.threads} if self.device.type == "cpu" else made

    def run(self, shards: Mapping[Hashable, Sequence[int]], bar: Optional[tqdm] = None,
            schedules: Optional[Mapping[Hashable, PairSchedule]] = None) -> Iterator[Tuple[Hashable, Dict[str, object]]]:
        """``schedules``: a shard's own schedule where it is not this trainer's (a protocol mixture)."""
        self.bar, schedules = bar, schedules or {}
        if self.pool is None:
            for key, seeds in shards.items():
                yield key, train_pairs(self.family, list(seeds), self.data, schedules.get(key, self.schedule),
                                       self.device, bar=_Scaled(self.bar, len(seeds)), kernels=self.kernels)
            return
        pending: Dict[Future, Hashable] = {self.pool.submit(_train_shard, list(s), schedules.get(k)): k
                                           for k, s in shards.items()}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                self._drain_progress()
                for future in done:
                    yield pending.pop(future), unpack(future.result())
        except BrokenProcessPool:
            raise KTError(
                "a generate worker process died (out of memory?); finished shards are kept: rerun with "
                "fewer --workers or --members to resume."
            ) from None
        finally:
            for future in pending:
                future.cancel()
            self._drain_progress()

    def _drain_progress(self) -> None:
        while True:
            try:
                n = self.progress.get_nowait()
            except queue.Empty:
                return
            if self.bar is not None:
                self.bar.update(n)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> "ShardTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Scaled:
    """Counts one trainer epoch as ``n`` network-epochs on the shared progress bar."""

    def __init__(self, bar: Optional[tqdm], n: int) -> None:
        self.bar, self.n = bar, n

    def update(self, k: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(k * self.n)


class _QueueBar:
    """A worker's progress bar: network-epochs go to the parent, which owns the real bar."""

    def __init__(self, q, n: int) -> None:
        self.q, self.n = q, n

    def update(self, k: int = 1) -> None:
        self.q.put(k * self.n)


_WORKER: Dict[str, object] = {}


def _start_worker(family: str, dataset: str, data_root: Optional[str], colour: bool, schedule: PairSchedule,
                  kernels: str, threads: int, progress, parent: int) -> None:
    if sys.platform.startswith("linux"):
        # Die with the parent: a killed generate run must not leave workers training on its cores.
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    torch.set_num_threads(threads)
    keep_heap_for_good()
    fam = create_family(family)
    _WORKER.update(family=fam, data=load_for(fam, dataset, data_root, colour), schedule=schedule,
                   kernels=kernels, progress=progress)


def _train_shard(seeds: Sequence[int], schedule: Optional[PairSchedule] = None) -> bytes:
    w = _WORKER
    return pack(train_pairs(w["family"], list(seeds), w["data"], schedule or w["schedule"], torch.device("cpu"),
                            bar=_QueueBar(w["progress"], len(seeds)), kernels=w["kernels"]))


# A shard's result crosses to the parent as one safetensors blob of its shard tensors: pickled as is,
# each of its ~450 small per-network tensors would go through a shared-memory file of its own, which
# the parent maps on the cores the workers train on.
def pack(out: Mapping[str, object]) -> bytes:
    """``train_pairs``' result as bytes (``unpack`` inverts it, the same tensors bit for bit)."""
    return save({**shard_tensors(out), "base_acc": out["base_acc"], "small_acc": out["small_acc"]})


def unpack(blob: bytes) -> Dict[str, object]:
    """``pack``'s bytes back as ``train_pairs``' result: per-network state lists and both accuracies."""
    flat = load(blob)
    out: Dict[str, object] = {"base_acc": flat.pop("base_acc"), "small_acc": flat.pop("small_acc")}
    for part in PARTS:
        out[part] = [{} for _ in range(len(out["base_acc"]))]
    for key, stacked in flat.items():
        part, name = key.split(".", 1)
        for state, t in zip(out[part], stacked.unbind(0)):
            state[name] = t
    return out
