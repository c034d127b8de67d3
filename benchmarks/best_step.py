"""A `best` translator step: today's training step against the step as it was before its speed-ups.

Both ways train the same channel_set translator with the `best` recipe (task loss, perturbations) on
the same synthetic pairs of a family and the bundled MNIST images; they alternate in rounds of
``--steps`` steps and the median of the per-round ratios is printed. "Before" is the same loop with
the two formulations it replaced put back:

- the task loss read whole per-pair feature banks and then picked the step's images from them
  (``bank[idx][:, pick]``, a copy of every image of every pair in the batch), where it now gathers
  the k x n entries it uses;
- the channel_set translator wrote each (small channel, large channel, residual channel) kernel with
  the full write MLP and then took the choice-weighted sum, where it now splits the first layer
  and moves the last one outside the sum (the same function, M times fewer multiply-adds).

    python benchmarks/best_step.py --family paper_mnist --pairs 2048 --rounds 5 --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from synthetic import random_stack  # benchmarks/synthetic.py (scripts run from their folder)

from kt_mlflow.blocks import create_family
from kt_mlflow.config import TrainConfig
from kt_mlflow.data import load_for
from kt_mlflow.pairs.store import PairSet
from kt_mlflow.training import task_loss
from kt_mlflow.training.train import BatchShare, TranslatorFit
from kt_mlflow.translators.channel_set import ChannelSetTranslator


def synthetic_pairs(family, n: int) -> PairSet:
    """Random blocks of the family's shapes (a step's cost does not depend on the values)."""
    g, tensors = torch.Generator().manual_seed(0), {}
    for part, module in (("begin", family.begin()), ("large", family.large_block()), ("last", family.last()),
                         ("small", family.small_block())):
        tensors.update({f"{part}.{k}": v for k, v in random_stack(module, n, g, scale=0.3).items()})
    return PairSet({"family": family.name}, tensors, [{"index": i} for i in range(n)])


def _write_before(self, e, choice, queries):
    m, (b, h, r, _) = queries.shape[0], e.shape
    q = queries[None, :, None, None, :].expand(b, m, h, r, -1)
    kern = self.write(torch.cat([e[:, None].expand(-1, m, -1, -1, -1), q], -1))
    return torch.einsum("bmh,bmhrd->bmrd", choice, kern)


class _WholeBanks(torch.Tensor):
    """A bank tensor whose (rows, picks) gather goes the old way: all of each row first."""

    def __getitem__(self, key):   # returns plain tensors: no subclass overhead after the gather
        plain = self.as_subclass(torch.Tensor)
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], torch.Tensor) and key[0].dim() == 2:
            return plain[key[0][:, 0]][:, key[1][0]]
        return plain[key]


@contextmanager
def before(fit: TranslatorFit):
    task = fit.groups[0].task
    write, banks = ChannelSetTranslator._write, (task.pre, task.outs, task.teacher)
    ChannelSetTranslator._write = _write_before
    task.pre, task.outs, task.teacher = (t.as_subclass(_WholeBanks) for t in banks)
    try:
        yield
    finally:
        ChannelSetTranslator._write = write
        task.pre, task.outs, task.teacher = banks


def steps_per_s(fit: TranslatorFit, n: int, batch: int, start: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        rows = torch.randperm(fit.groups[0].n_pairs, generator=torch.Generator().manual_seed(i))[:batch]
        fit.step(BatchShare(rows, torch.arange(batch), batch, 1), torch.Generator().manual_seed(i), 0)
    return n / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="paper_mnist")
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    print("command: python benchmarks/best_step.py " + " ".join(sys.argv[1:]))
    family = create_family(a.family)
    cfg = TrainConfig(recipe="best", batch_size=a.batch_size, width=a.width, device="cpu")
    torch.manual_seed(0)
    fit = TranslatorFit(cfg, family, synthetic_pairs(family, a.pairs), load_for(family, "mnist", None), torch.device("cpu"))
    assert isinstance(fit.groups[0].task, task_loss.TaskLoss)
    steps_per_s(fit, 2, a.batch_size, 0)          # warm-up, both ways
    with before(fit):
        steps_per_s(fit, 2, a.batch_size, 0)
    ratios = []
    for r in range(a.rounds):
        with before(fit):
            old = steps_per_s(fit, a.steps, a.batch_size, 100 * r)
        new = steps_per_s(fit, a.steps, a.batch_size, 100 * r)
        ratios.append(new / old)
        print(f"round {r + 1}: before {1000 / old:7.1f} ms/step, now {1000 / new:7.1f} ms/step, ratio {new / old:.2f}x")
    print(f"median ratio (now / before): {statistics.median(ratios):.2f}x "
          f"(lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
