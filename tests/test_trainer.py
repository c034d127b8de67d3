"""The vectorised trainer trains K networks exactly as K separate ordinary trainings would.

The reference here is written independently of the trainer: an ordinary ``members=1`` network in
the ordinary memory format, trained one batch after another on the batch order and flips of
``epoch_plans``. In float64 the two must agree to ~1e-9 after the whole protocol (float32 training
is chaotic: rounding noise grows to ~1e-2 relative within ~16 SGD steps, so float32 is checked for a
couple of steps only, with a looser tolerance).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kt_mlflow.blocks import KTNetwork, create_family, stack_states
from kt_mlflow.blocks.layers import set_interleaved
from kt_mlflow.blocks.native import available as native_available
from kt_mlflow.config import PairSchedule
from kt_mlflow.data import BUNDLED_MNIST, ImageData, load_dataset
from kt_mlflow.engine import accuracy_members, epoch_plans
from kt_mlflow.pairs.make import train_pairs

MNIST_ROOT = BUNDLED_MNIST
SEEDS = [11, 2024, 7]


@pytest.fixture(scope="module")
def mnist() -> ImageData:
    """A slice of real MNIST (the bundled digits set where the MNIST files are absent)."""
    if (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file() or (MNIST_ROOT / "t10k-images-idx3-ubyte").is_file():
        d = load_dataset("mnist", str(MNIST_ROOT))
    else:  # pragma: no cover - depends on the checkout
        d = load_dataset("digits")
    return ImageData(d.name, d.train_x[:512], d.train_y[:512], d.test_x[:500], d.test_y[:500])


def as_double(d: ImageData) -> ImageData:
    return ImageData(d.name, d.train_x.double(), d.train_y, d.test_x.double(), d.test_y)


def fit_one(net, params, data: ImageData, seed: int, phase: int, epochs: int, p: PairSchedule) -> None:
    """The textbook loop: one ordinary network, its own batch order and flips."""
    opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum)
    n = len(data.train_x)
    for perm, flip in epoch_plans(seed, phase, epochs, n):
        for start in range(0, n, p.batch_size):
            i = perm[start: start + p.batch_size]
            xb = data.train_x[i]
            if p.flip:
                xb = torch.where(flip[start: start + p.batch_size, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), data.train_y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy_one(net, x, y) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean() * 100)


def reference_pair(family, seed: int, data: ImageData, p: PairSchedule):
    base_state, small_state = family.init_pair(seed)
    dtype = data.train_x.dtype
    net = family.base_network()
    net.load_state_dict(base_state)
    net = net.to(dtype).train()
    fit_one(net, net.parameters(), data, seed, 0, p.epochs, p)
    base_acc = accuracy_one(net, data.test_x, data.test_y)
    small = family.small_block()
    small.load_state_dict(small_state)
    comp = KTNetwork(net.begin, small.to(dtype), net.last)
    comp.train()
    for frozen in (comp.begin, comp.last):
        frozen.eval().requires_grad_(False)
    fit_one(comp, small.parameters(), data, seed, 1, p.small_epochs, p)
    small_acc = accuracy_one(comp, data.test_x, data.test_y)
    states = {"begin": net.begin.state_dict(), "large": net.block.state_dict(), "last": net.last.state_dict(),
              "small": small.state_dict()}
    return states, base_acc, small_acc


def assert_same_networks(out, refs, rtol: float, atol: float) -> None:
    for m, (states, _, _) in enumerate(refs):
        for part, ref in states.items():
            got = out[part][m]
            assert set(got) == set(ref), part
            for name, t in ref.items():
                where = f"member {m} {part}.{name}"
                torch.testing.assert_close(got[name], t, rtol=rtol, atol=atol, msg=lambda s, where=where: f"{where}: {s}")


def test_vectorised_equals_one_by_one_float64(mnist):
    """The whole protocol (2 + 2 epochs of 2 batches, 8 SGD steps) in float64: every parameter and BN
    statistic, with the native kernels (members interleaved) that generation uses on a CPU."""
    family, p = create_family("paper_mnist"), PairSchedule(epochs=2, small_epochs=2)
    data = as_double(ImageData(mnist.name, mnist.train_x[:256], mnist.train_y[:256], mnist.test_x, mnist.test_y))
    out = train_pairs(family, SEEDS, data, p, torch.device("cpu"), kernels="native")
    refs = [reference_pair(family, s, data, p) for s in SEEDS]
    assert out["large"][0]["conv1.weight"].dtype == torch.float64
    assert_same_networks(out, refs, rtol=1e-9, atol=1e-11)
    for m, (_, base_acc, small_acc) in enumerate(refs):
        assert float(out["base_acc"][m]) == pytest.approx(base_acc, abs=1e-4)
        assert float(out["small_acc"][m]) == pytest.approx(small_acc, abs=1e-4)
    # The members really are different networks, trained (not left at their initialisation).
    assert not torch.allclose(out["large"][0]["conv1.weight"], out["large"][1]["conv1.weight"])
    init = family.init_pair(SEEDS[0])[1]["conv1.weight"].double()
    assert (out["small"][0]["conv1.weight"] - init).abs().max() > 1e-3


@pytest.fixture(scope="module")
def f32_run(mnist):
    family, p = create_family("paper_mnist"), PairSchedule(epochs=1, small_epochs=1)
    data = ImageData(mnist.name, mnist.train_x[:256], mnist.train_y[:256], mnist.test_x, mnist.test_y)
    return family, data, p, train_pairs(family, SEEDS, data, p, torch.device("cpu"))


def test_vectorised_equals_one_by_one_float32_few_steps(f32_run):
    """float32, as generation runs: 2 base steps + 2 small-block steps agree to float tolerance.

    The tolerance is loose because torch's channels-last BatchNorm CPU kernel accumulates its
    per-channel sums naively in float32 (~1e-6 relative error against ~1e-7 for the contiguous
    kernel); the small BN-bias gradients come from sums that largely cancel, so after 2 steps the BN
    biases differ by up to ~2% of their (small) size, the conv weights by ~5e-4 of theirs.
    """
    family, data, p, out = f32_run
    refs = [reference_pair(family, s, data, p) for s in SEEDS]
    assert out["large"][0]["conv1.weight"].dtype == torch.float32
    assert_same_networks(out, refs, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_vectorised_without_flips(mnist, kernels):
    """Both layouts: grouped convolutions (``torch``, as on a GPU) and interleaved members (``native``)."""
    family, p = create_family("paper_mnist"), PairSchedule(epochs=1, small_epochs=1, flip=False, batch_size=100)
    data = as_double(ImageData(mnist.name, mnist.train_x[:200], mnist.train_y[:200], mnist.test_x[:200], mnist.test_y[:200]))
    out = train_pairs(family, SEEDS[:2], data, p, torch.device("cpu"), kernels=kernels)
    refs = [reference_pair(family, s, data, p) for s in SEEDS[:2]]
    assert_same_networks(out, refs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("interleaved", [False, True], ids=["member-major", "interleaved"])
def test_bn_running_stats_are_per_member(mnist, interleaved):
    """Each member's BN statistics see only that member's images, in both channel layouts."""
    assert native_available() or not interleaved, "the native kernels did not build (is g++ installed?)"
    family, k = create_family("paper_mnist"), 3
    singles = []
    for s in SEEDS:
        net = family.base_network()
        net.load_state_dict(family.init_pair(s)[0])
        singles.append(net.double().train())
    stacked = family.base_network(k)
    stacked.load_state_dict(stack_states([n.state_dict() for n in singles]))
    stacked = set_interleaved(stacked, interleaved).double().to(memory_format=torch.channels_last).train()
    x = mnist.train_x[:64].double()
    per_member = torch.stack([x * (m + 1) + m for m in range(k)], dim=1)  # (B, K, C, H, W): distinct inputs
    out = stacked(stacked.stack_input(per_member))
    for m, net in enumerate(singles):
        ref = net(per_member[:, m])
        torch.testing.assert_close(out.view(len(x), k, -1)[:, m], ref, rtol=1e-10, atol=1e-12)
    state = stacked.state_dict()
    for m, net in enumerate(singles):
        for name, t in net.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(state[name].chunk(k)[m], t, rtol=1e-10, atol=1e-12)
    # and the members' statistics do differ from one another
    rm = state["begin.bn.running_mean"].view(k, -1)
    assert not torch.allclose(rm[0], rm[1])


def test_accuracy_members_matches_single_network_evaluation(f32_run):
    family, data, _, out = f32_run
    k = len(SEEDS)

    def base_state(m):
        return {**{f"begin.{n}": t for n, t in out["begin"][m].items()},
                **{f"block.{n}": t for n, t in out["large"][m].items()},
                **{f"last.{n}": t for n, t in out["last"][m].items()}}

    stacked = family.base_network(k)
    stacked.load_state_dict(stack_states([base_state(m) for m in range(k)]))
    stacked = stacked.to(memory_format=torch.channels_last).train()
    acc = accuracy_members(stacked, data.test_x, data.test_y, k, chunk=128)
    assert stacked.training  # the caller's mode is restored
    for m in range(k):
        single = family.base_network()
        single.load_state_dict(base_state(m))
        assert float(acc[m]) == pytest.approx(accuracy_one(single, data.test_x, data.test_y), abs=1e-4)
        assert float(acc[m]) == pytest.approx(float(out["base_acc"][m]), abs=1e-4)
