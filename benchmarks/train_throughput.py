"""Translator-training throughput: pairs held in memory as tensors vs one file per pair through a DataLoader.

The published KT code stores every block as its own file and reads them back through a DataLoader each
epoch; kt-mlflow keeps the whole pair set as tensors on the device. Both loops below train the same
Mixer on the same pairs with the same batch size and Adam; only the data path differs.

    python benchmarks/train_throughput.py --pairs 512 --epochs 3
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from synthetic import random_stack  # benchmarks/synthetic.py (scripts run from their folder)
from torch.utils.data import DataLoader, Dataset

from kt_mlflow.blocks import create_family
from kt_mlflow.training.train import param_loss
from kt_mlflow.translators import create_translator, tokens


def synthetic_pairs(family, n: int, seed: int):
    """Random large/small blocks with the family's shapes (throughput does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    return random_stack(family.large_block(), n, g), random_stack(family.small_block(), n, g)


class PairFiles(Dataset):
    """The published way: one file per pair, read and tokenised in __getitem__."""

    def __init__(self, folder: Path, n: int, family) -> None:
        self.folder, self.n, self.family = folder, n, family

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        large = torch.load(self.folder / f"large_{i}.pt", weights_only=True)
        small = torch.load(self.folder / f"small_{i}.pt", weights_only=True)
        src = tokens.encode_source(self.family, {k: v[None] for k, v in large.items()})[0]
        dst = tokens.encode_target(self.family, {k: v[None] for k, v in small.items()})[0]
        return src, dst


def train_loop(translator, batches, family, epochs: int) -> float:
    opt = torch.optim.Adam(translator.net.parameters(), lr=1e-3)
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for src, dst in batches():
            loss = param_loss(family, translator.net(src), dst)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(src)
    return seen / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the file-per-pair loop")
    a = p.parse_args(argv)
    print("command: python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]))
    torch.manual_seed(0)
    family = create_family("paper_mnist")
    large, small = synthetic_pairs(family, a.pairs, 0)
    kw = dict(depth=a.depth, width=a.width, token_hidden=2 * a.width, channel_hidden=4 * a.width)

    folder = Path(tempfile.mkdtemp(prefix="kt-pair-files-"))
    try:
        for i in range(a.pairs):
            torch.save({k: v[i].clone() for k, v in large.items()}, folder / f"large_{i}.pt")
            torch.save({k: v[i].clone() for k, v in small.items()}, folder / f"small_{i}.pt")
        loader = DataLoader(PairFiles(folder, a.pairs, family), batch_size=a.batch_size, shuffle=True,
                            num_workers=a.workers)
        files_rate = train_loop(create_translator("mixer", family, **kw), lambda: loader, family, a.epochs)
    finally:
        shutil.rmtree(folder)

    src, dst = tokens.encode_source(family, large), tokens.encode_target(family, small)

    def in_memory():
        order = torch.randperm(a.pairs)
        for s in range(0, a.pairs, a.batch_size):
            idx = order[s: s + a.batch_size]
            yield src[idx], dst[idx]

    memory_rate = train_loop(create_translator("mixer", family, **kw), in_memory, family, a.epochs)
    print(f"file per pair + DataLoader: {files_rate:8.1f} pairs/s")
    print(f"in-memory tensors         : {memory_rate:8.1f} pairs/s")
    print(f"ratio (in-memory / files) : {memory_rate / files_rate:8.2f}x")


if __name__ == "__main__":
    main()
