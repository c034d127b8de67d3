import subprocess
import sys
import threading
import time

import pytest
import torch

from kt_mlflow.blocks import create_family
from kt_mlflow.config import PairSchedule
from kt_mlflow.data import load_dataset
from kt_mlflow.device import cpu_cores
from kt_mlflow.errors import KTError
from kt_mlflow.pairs.make import train_pairs
from kt_mlflow.pairs.workers import ShardTrainer, resolve_workers

QUICK = PairSchedule(epochs=1, small_epochs=1)


class Counter:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k


def test_worker_processes_train_exactly_what_one_thread_trains_here():
    shards = {"a": [11, 12], "b": [13, 14, 15]}
    bar = Counter()
    with ShardTrainer("paper_mnist", "digits", None, QUICK, "cpu", workers=2) as trainer:
        assert trainer.workers == 2 and trainer.kernels == "native"  # the default on a CPU with g++
        got = dict(trainer.run(shards, bar))
    assert sorted(got) == ["a", "b"]
    assert bar.n == 5 * (QUICK.epochs + QUICK.small_epochs)  # every network-epoch reached the parent's bar
    family, data = create_family("paper_mnist"), load_dataset("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_cores() // 2))  # a worker's thread count
    try:
        for key, seeds in shards.items():
            ref = train_pairs(family, seeds, data, QUICK, torch.device("cpu"))
            for part in ("begin", "large", "last", "small"):   # came back packed (safetensors) whole
                assert [sorted(s) for s in got[key][part]] == [sorted(s) for s in ref[part]]
                for mine, theirs in zip(got[key][part], ref[part]):
                    for name, t in theirs.items():
                        torch.testing.assert_close(mine[name], t, atol=0, rtol=0)
            torch.testing.assert_close(got[key]["base_acc"], ref["base_acc"], atol=0, rtol=0)
            torch.testing.assert_close(got[key]["small_acc"], ref["small_acc"], atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)


def test_a_dead_worker_is_a_one_line_error():
    trainer = ShardTrainer("paper_mnist", "digits", None, PairSchedule(epochs=20, small_epochs=20), "cpu", workers=2)

    def kill_a_worker():
        deadline = time.time() + 60
        while not trainer.pool._processes and time.time() < deadline:
            time.sleep(0.05)
        next(iter(trainer.pool._processes.values())).kill()

    threading.Thread(target=kill_a_worker).start()
    with pytest.raises(KTError, match="worker process died .* rerun with fewer --workers"):
        list(trainer.run({"a": [1], "b": [2]}))
    trainer.close()


def test_worker_count():
    assert resolve_workers(0, torch.device("cpu")) == cpu_cores()
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert resolve_workers(0, torch.device("cuda")) == 1
    with pytest.raises(KTError, match="on cuda use --workers 1"):
        resolve_workers(2, torch.device("cuda"))
    with pytest.raises(KTError, match="--workers must be >= 0"):
        resolve_workers(-1, torch.device("cpu"))


_FAULTS = """
import resource, sys, torch
from kt_mlflow.blocks import create_family
from kt_mlflow.config import PairSchedule
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import keep_heap_for_good
from kt_mlflow.pairs.make import train_pairs
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    keep_heap_for_good()
family, data = create_family("paper_mnist"), load_dataset("mnist", None)
for seeds in ([0, 1, 2, 3], [4, 5, 6, 7]):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_pairs(family, seeds, data, PairSchedule(epochs=1, small_epochs=1), torch.device("cpu"), kernels="native")
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and Linux's fault counts")
def test_a_generate_worker_keeps_its_heap_between_shards():
    """A worker's second shard reuses the first one's pages: without ``keep_heap_for_good`` each phase's
    exit gives them back and the next one faults them in again (tens of thousands of faults a shard)."""
    runs = {how: subprocess.Popen([sys.executable, "-c", _FAULTS, how], stdout=subprocess.PIPE, text=True)
            for how in ("keep", "default")}   # side by side: one core each
    faults = {how: int(run.communicate()[0].split()[-1]) for how, run in runs.items()}
    assert all(run.returncode == 0 for run in runs.values())
    assert faults["keep"] * 20 < faults["default"], faults
