"""The engine: K small networks trained and measured at once, as the members of one stacked network.

Each member has its own initialisation, its own data order and its own BN statistics; the loss is
the sum of the members' mean cross-entropies, so every member receives exactly the gradient it would
get alone and the optimiser (SGD, Adam or AdamW: element-wise) updates it exactly as it would alone. Generation,
evaluation and fine-tuning all run through here.
"""
from __future__ import annotations

import ctypes
import sys
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockFamily, fold_members
from .config import PairSchedule

State = Dict[str, torch.Tensor]


def _mix(seed: int, phase: int) -> int:
    """A generator seed for (network seed, training phase): distinct streams, reproducible anywhere."""
    return (seed * 6364136223846793005 + (phase + 1) * 1442695040888963407) % (2**63 - 1)


def epoch_plans(seed: int, phase: int, epochs: int, n: int) -> List[tuple]:
    """Per epoch, the sample order and the horizontal-flip mask of one network: its own data order."""
    g = torch.Generator().manual_seed(_mix(seed, phase))
    return [(torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5) for _ in range(epochs)]


class _KeepHeap:
    """Keep freed memory in the process heap while training (glibc only; elsewhere a no-op).

    A K=16 step allocates activations of ~40 MB; glibc serves blocks that large with fresh ``mmap``s
    and unmaps them on free, so every step page-faults (and zero-fills) them again: a third of the
    step time on a small CPU. Serving them from the heap and not trimming it reuses the same pages.
    The allocator's defaults come back when the outermost of nested uses exits.
    """

    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    DEFAULT_TRIM, DEFAULT_MMAP_MAX = 128 * 1024, 65536
    _depth = 0  # process-wide: nested uses (training inside train_pairs) must not restore early

    def __init__(self) -> None:
        self.libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
                    self.libc = libc
            except OSError:  # pragma: no cover
                pass

    def __enter__(self) -> "_KeepHeap":
        if self.libc is not None and _KeepHeap._depth == 0:
            self.libc.mallopt(self.M_MMAP_MAX, 0)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 1 << 30)
        _KeepHeap._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        _KeepHeap._depth -= 1
        if self.libc is not None and _KeepHeap._depth == 0:
            self.libc.mallopt(self.M_MMAP_MAX, self.DEFAULT_MMAP_MAX)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, self.DEFAULT_TRIM)


def keep_heap_for_good() -> None:
    """``_KeepHeap`` for the rest of this process's life, for a process that only trains (a generate
    worker): between trainings too, where each phase (base network, small block, accuracies) would
    otherwise fault its pages in again after the previous one's exit gave them back."""
    _KeepHeap().__enter__()


def make_optimizer(params: Iterable[nn.Parameter], schedule: PairSchedule) -> torch.optim.Optimizer:
    """The schedule's optimiser. Each is element-wise, so every member of a stacked network is updated
    exactly as it would be alone."""
    params, lr, wd = list(params), schedule.lr, schedule.weight_decay
    if schedule.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=schedule.momentum, weight_decay=wd)


_MOMENTS: Dict[str, object] = {}   # the last table, what it was made from, a weak reference to the images


def _moments(begin: nn.Module, x: torch.Tensor, images: torch.Tensor, flip: bool):
    """``begin.patch_moments(images)``, ``images`` being the dataset ``x`` (with its mirror images after
    it if ``flip``), kept for the next call on the same ``x`` (unchanged, alive): they depend on the
    images and the kernel size only, and a worker trains shard after shard on one dataset (0.4 s a shard
    for 16,000 MNIST images on one core)."""
    key = (x._version, flip, images.dtype, begin.kernel)
    ref = _MOMENTS.get("x")
    if ref is not None and ref() is x and _MOMENTS["key"] == key:
        return _MOMENTS["table"]
    table = begin.patch_moments(images)
    _MOMENTS.clear()
    _MOMENTS.update(x=weakref.ref(x, lambda _: _MOMENTS.clear()), key=key, table=table)
    return table


def train_members(
    net: nn.Module,
    params: Iterable[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: Sequence[int],
    phase: int,
    epochs: int,
    schedule: PairSchedule,
    bar: Optional[tqdm] = None,
    on_epoch: Optional[Callable[[int], None]] = None,
) -> None:
    """Train the stacked ``net`` (members = len(seeds)) by ``schedule``; modes (train/eval) are the caller's choice.

    ``on_epoch(epoch)`` runs after each epoch (e.g. to measure accuracy along the way).
    """
    k, n = len(seeds), len(x)
    opt = make_optimizer(params, schedule)
    steps = epochs * -(-n // schedule.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule.lr_schedule == "cosine" else None
    plans = [epoch_plans(s, phase, epochs, n) for s in seeds]
    # Every image and its mirror image, once: a flip is then a choice of index, and one gather builds
    # the whole (b, K, C, H, W) batch in the stacked network's member-major order.
    images = torch.cat([x, x.flip(-1)]) if schedule.flip else x
    labels = torch.cat([y, y]) if schedule.flip else y
    # A training begin block takes its BN statistics from per-image patch moments (exact, and it keeps
    # BN off the largest activation): tabulate them once, sum the batch's rows each step.
    table = _moments(net.begin, x, images, schedule.flip) if net.begin.training and hasattr(net.begin, "patch_moments") else None
    positions = images.shape[-2] * images.shape[-1]
    with _KeepHeap():
        for epoch in range(epochs):
            order = torch.stack([p[epoch][0] for p in plans])  # (K, n)
            if schedule.flip:
                order = order + n * torch.stack([p[epoch][1] for p in plans]).long()
            order = order.t().contiguous().to(x.device)  # (n, K): row i = every member's i-th sample
            for start in range(0, n, schedule.batch_size):
                idx = order[start: start + schedule.batch_size]  # (b, K)
                moments = None
                if table is not None:
                    moments = (table[0][idx].sum(0), table[1][idx].sum(0), idx.shape[0] * positions)
                out = net(net.gather_input(images, idx), moments)  # (b, K*classes)
                b = out.shape[0]
                # mean over b*K, times K: the sum of the members' own mean losses.
                loss = F.cross_entropy(out.view(b * k, -1), labels[idx].view(b * k)) * k
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
            if bar is not None:
                bar.update(1)
            if on_epoch is not None:
                on_epoch(epoch)


@torch.inference_mode()
def accuracy_members(net: nn.Module, x: torch.Tensor, y: torch.Tensor, members: int,
                     chunk: Optional[int] = None) -> torch.Tensor:
    """Test accuracy (in %) of each member of a stacked network on the same images."""
    return shared_begin_accuracy([net], x, y, members, chunk)[0]


@torch.inference_mode()
def shared_begin_accuracy(nets: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, members: int,
                          chunk: Optional[int] = None) -> List[torch.Tensor]:
    """``accuracy_members`` of stacked networks that share one begin block (the same module): its output
    is computed once per chunk for all of them. ``chunk``: images at a time (default 32 on a CPU, where a
    chunk's activations then stay in the core's cache; 1024 elsewhere). With the native kernels each
    image's outputs are the same bits whatever the chunk.

    Example:
        >>> base_acc, small_acc = shared_begin_accuracy([base, compressed], tx, ty, 16)  # doctest: +SKIP
    """
    if any(n.begin is not nets[0].begin for n in nets):
        raise ValueError("shared_begin_accuracy needs networks that share one begin block")
    modes = [(m, m.training) for n in nets for m in n.modules()]   # per module: a frozen part stays in eval mode
    for n in nets:
        n.eval()
    correct = [torch.zeros(members, device=x.device) for _ in nets]
    chunk = chunk or (32 if x.device.type == "cpu" else 1024)
    with _KeepHeap():   # the chunks' activations reuse the same pages
        for start in range(0, len(x), chunk):
            xb, yb = x[start: start + chunk], y[start: start + chunk, None]
            begin = nets[0].begin(nets[0].stack_input(xb[:, None].expand(-1, members, -1, -1, -1)))
            for n, c in zip(nets, correct):
                c += (n.tail(begin).view(len(xb), members, -1).argmax(-1) == yb).sum(0)   # (b, K) hits
    for module, training in modes:
        module.training = training
    return [c * 100.0 / len(x) for c in correct]


@torch.no_grad()
def network_accuracy(family: BlockFamily, begin: State, block: State, last: State, data,
                     which: str = "small", device: Optional[torch.device] = None, chunk: int = 64) -> torch.Tensor:
    """Test accuracy (%) of each network ``begin[i] -> block[i] -> last[i]``; tensors are ``(P, ...)``.

    ``which`` says whether ``block`` is the family's 'small' or 'large' block. Networks are evaluated
    ``chunk`` at a time as members of one stacked network.

    Example:
        >>> acc = network_accuracy(fam, pairs.part("begin"), small, pairs.part("last"), data)  # doctest: +SKIP
    """
    device = device or torch.device("cpu")
    n = next(iter(block.values())).shape[0]
    tx, ty = data.test_x.to(device), data.test_y.to(device)
    out = []
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        k = sl.stop - sl.start
        net = family.base_network(k) if which == "large" else family.compressed_network(k)
        net.begin.load_state_dict(fold_members(begin, sl))
        net.block.load_state_dict(fold_members(block, sl))
        net.last.load_state_dict(fold_members(last, sl))
        net = net.to(device, memory_format=torch.channels_last)
        out.append(accuracy_members(net, tx, ty, k))
    return torch.cat(out).cpu()
