"""Pair-generation throughput: the vectorised generator against the plain way.

The plain way is how a pair is usually produced: one network at a time, written in ordinary PyTorch
modules (``PlainNet``: conv/BN/ReLU/max-pool as usual, contiguous memory format), a
``torch.utils.data.DataLoader`` (batch 128, shuffle, a random horizontal
flip per sample in the Dataset's ``__getitem__`` as torchvision transforms do, ``num_workers=0``),
SGD lr 0.01 momentum 0.9. Both ways run the full protocol on the same data (real MNIST, by default the
bundled test set split 8,000 / 2,000): base network for ``--epochs`` epochs, then the small block for
``--small-epochs`` epochs with begin/last frozen in eval mode; both evaluate test accuracy after each phase.

The vectorised generator is timed three ways: one process training ``--members`` networks at once
with every core's thread (``train_pairs``), and one worker process per core, each training
``--members`` networks at once with one thread (``ShardTrainer``), with the grouped convolutions
(``--kernels torch``) and with the native kernels, members interleaved: ``kt generate``'s default on a
CPU. Worker processes are started, like every way here, before the timed rounds. The plain way runs
in a process of its own, as a user's script would: no way inherits another's allocator state (the
generator tunes glibc's ``malloc`` while it trains, which can leave an ordinary loop in the same process
page-faulting more, up to twice as slow).

    python benchmarks/generate_throughput.py                       # 1+1 epochs; 5 rounds
    python benchmarks/generate_throughput.py --epochs 10 --small-epochs 10 --members 32
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kt_mlflow.blocks import create_family
from kt_mlflow.config import PairSchedule
from kt_mlflow.data import load_dataset
from kt_mlflow.device import cpu_cores
from kt_mlflow.pairs.make import train_pairs
from kt_mlflow.pairs.workers import ShardTrainer


class FlipDataset(Dataset):
    """In-memory images; a random horizontal flip per sample, applied on access."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, flip: bool) -> None:
        self.x, self.y, self.flip = x, y, flip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i]
        if self.flip and torch.rand(1).item() < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


class PlainBasic(nn.Module):
    """The large block as it is usually written: conv-BN-ReLU-conv-BN, add the input, ReLU."""

    def __init__(self, width: int, hidden: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, hidden, k, padding=k // 2, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(), nn.Conv2d(hidden, width, k, padding=k // 2, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class PlainBottleneck(nn.Module):
    """The small block as it is usually written: conv-ReLU-conv, add the input, ReLU."""

    def __init__(self, width: int, hidden: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, hidden, k, padding=k // 2, bias=False), nn.ReLU(),
                                  nn.Conv2d(hidden, width, k, padding=k // 2, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class PlainNet(nn.Module):
    """One network of the family in ordinary PyTorch modules (no member axis, no shortcuts)."""

    def __init__(self, f) -> None:
        super().__init__()
        if (f.large, f.small) != ("basic", "bottleneck"):
            raise SystemExit(f"the plain baseline knows the basic/bottleneck blocks, not {f.large}/{f.small}")
        k, side = f.kernel, (f.image_size + 1) // 2
        self.begin = nn.Sequential(nn.Conv2d(f.in_channels, f.width, k, padding=k // 2, bias=False),
                                   nn.BatchNorm2d(f.width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.block = PlainBasic(f.width, f.large_hidden, k)
        self.last = nn.Sequential(nn.Conv2d(f.width, f.last_width, 1, stride=2, bias=False), nn.BatchNorm2d(f.last_width),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(f.last_width * ((side + 1) // 2) ** 2, f.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.begin(x)))


def plain_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.inference_mode():
        correct = sum(int((net(x[i: i + 1000]).argmax(1) == y[i: i + 1000]).sum()) for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def plain_fit(net, params, loader, epochs: int, p: PairSchedule) -> None:
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum)
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()


def plain_pair(family, seed: int, data, p: PairSchedule):
    """One pair the ordinary way."""
    torch.manual_seed(seed)
    net = PlainNet(family).train()
    loader = DataLoader(FlipDataset(data.train_x, data.train_y, p.flip), batch_size=p.batch_size, shuffle=True, num_workers=0)
    plain_fit(net, net.parameters(), loader, p.epochs, p)
    base_acc = plain_accuracy(net, data.test_x, data.test_y)
    small = PlainBottleneck(family.width, family.small_hidden, family.kernel)
    net.begin.eval().requires_grad_(False)
    net.last.eval().requires_grad_(False)
    net.block = small.train()
    plain_fit(net, small.parameters(), loader, p.small_epochs, p)
    net.block.train(False)
    small_acc = plain_accuracy(net, data.test_x, data.test_y)
    return base_acc, small_acc


_PLAIN = {}


def _plain_start(family: str, data_root, threads: int) -> None:
    torch.set_num_threads(threads)
    _PLAIN.update(family=create_family(family), data=load_dataset("mnist", data_root))


def _plain_round(seeds, p: PairSchedule):
    """Seconds for ``plain_pair`` of each seed in turn (in the plain way's own process), and the accuracies."""
    t0 = time.perf_counter()
    accs = [plain_pair(_PLAIN["family"], s, _PLAIN["data"], p) for s in seeds]
    return time.perf_counter() - t0, accs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None,
                    help="folder with the MNIST IDX files (default: the MNIST test set bundled with kt_mlflow)")
    ap.add_argument("--family", default="paper_mnist")
    ap.add_argument("--epochs", type=int, default=1, help="base-network epochs")
    ap.add_argument("--small-epochs", type=int, default=1, help="small-block epochs")
    ap.add_argument("--plain", type=int, default=3, help="networks trained the plain way per round (one after another)")
    ap.add_argument("--members", type=int, default=16, help="networks trained at once by train_pairs")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each timing every way side by side")
    ap.add_argument("--threads", type=int, default=cpu_cores(), help="torch intra-op threads (plain, one process)")
    ap.add_argument("--workers", type=int, default=0, help="worker processes of the per-core layout (0: one per core)")
    args = ap.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["generate_throughput.py", *argv]))

    torch.set_num_threads(args.threads)
    family = create_family(args.family)
    data = load_dataset("mnist", args.data_root)
    p = PairSchedule(epochs=args.epochs, small_epochs=args.small_epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(data.train_x)} train / "
          f"{len(data.test_x)} test MNIST images, family {family.name}, protocol {p.as_params()}")

    # Rounds alternate the ways so that drift in the machine's speed (other tenants, frequency) hits
    # them alike; each ratio reported is the median of its per-round ratios. One untimed pass of each way
    # first: one-time costs (process start, allocator, oneDNN kernel selection) would otherwise fall on
    # whichever way runs first.
    cpu = torch.device("cpu")
    pools = {k: ShardTrainer(family.name, "mnist", args.data_root, p, "cpu", args.workers, kernels=k)
             for k in ("torch", "native")}
    torch.set_num_threads(args.threads)  # ShardTrainer's device pick sets every core; --threads decides here
    w = pools["native"].workers
    print(f"per-core layout: {w} worker processes x {args.members} networks, "
          f"{max(1, cpu_cores() // w)} thread(s) each")

    def per_core(kernels: str, first: int):
        shards = {i: list(range(first + args.members * i, first + args.members * (i + 1))) for i in range(w)}
        return [o for _, o in pools[kernels].run(shards)]

    # name -> (networks per round, run(round) -> list of train_pairs outputs)
    ways = {
        f"one process, {args.members} networks, native kernels":
            (args.members, lambda r: [train_pairs(family, list(range(args.members * r, args.members * (r + 1))),
                                                  data, p, cpu, kernels="native")]),
        f"{w} workers x {args.members} networks, torch kernels":
            (w * args.members, lambda r: per_core("torch", 10_000 + 1000 * r)),
        f"{w} workers x {args.members} networks, native kernels (kt generate's default)":
            (w * args.members, lambda r: per_core("native", 10_000 + 1000 * r)),
    }
    plain = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_plain_start,
                                initargs=(args.family, args.data_root, args.threads))
    plain.submit(_plain_round, [999], p).result()
    for _, run in ways.values():
        run(args.rounds)  # seeds no timed round uses

    def timed(fn, networks: int):
        t0 = time.perf_counter()
        out = fn()
        return 60.0 * networks / (time.perf_counter() - t0), out

    ratios = {name: [] for name in ways}
    for r in range(args.rounds):
        seconds, accs = plain.submit(_plain_round, [1000 + args.plain * r + i for i in range(args.plain)], p).result()
        rate_plain = 60.0 * args.plain / seconds
        line = [f"round {r + 1}: plain {args.plain} networks {rate_plain:7.2f} pairs/min (acc base "
                f"{sum(a[0] for a in accs) / len(accs):.2f}%, small {sum(a[1] for a in accs) / len(accs):.2f}%)"]
        for name, (networks, run) in ways.items():
            rate, outs = timed(lambda run=run, r=r: run(r), networks)
            ratios[name].append(rate / rate_plain)
            base = sum(float(o["base_acc"].mean()) for o in outs) / len(outs)
            small = sum(float(o["small_acc"].mean()) for o in outs) / len(outs)
            line.append(f"{name} {rate:7.2f} pairs/min (acc base {base:.2f}%, small {small:.2f}%) {ratios[name][-1]:.2f}x")
        print(" | ".join(line), flush=True)
    for pool in pools.values():
        pool.close()
    plain.shutdown()
    for name, rs in ratios.items():
        print(f"ratio {name} / plain, median of {args.rounds} rounds: {statistics.median(rs):.2f}x "
              f"(min {min(rs):.2f}x, max {max(rs):.2f}x)")

if __name__ == "__main__":
    main()
