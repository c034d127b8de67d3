"""Data-free baselines: shapes, index selection, BN folding, and 'identity' == large block removed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kt_mlflow.blocks import KTNetwork, create_family, fold_bn, prefixed, stack_states
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import network_accuracy
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation.baselines import (
    BASELINES,
    identity,
    l1_selection,
    make_baseline,
    random_init,
    uniform_indices,
    uniform_selection,
)

EPS = 1e-5


def stacked_large(family, n: int, seed: int = 0) -> dict:
    """``n`` large blocks with random weights and non-trivial BN parameters and statistics, stacked (P, ...)."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        s = family.large_block().state_dict()
        for k, v in s.items():
            if k.endswith("running_var") or k.endswith(".weight") and v.dim() == 1:
                s[k] = torch.rand(v.shape, generator=g) + 0.5
            elif v.is_floating_point():
                s[k] = torch.randn(v.shape, generator=g)
        states.append(s)
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def test_registry_names():
    assert BASELINES.names() == ["identity", "l1", "random", "uniform"]
    with pytest.raises(KTError, match="unknown baseline"):
        make_baseline("magic", create_family("paper_mnist"), stacked_large(create_family("paper_mnist"), 1))


@pytest.mark.parametrize("family_name", ["paper_mnist", "wide_mnist"])
@pytest.mark.parametrize("name", ["random", "identity", "uniform", "l1"])
def test_shapes_follow_family(family_name, name):
    fam = create_family(family_name)
    large = stacked_large(fam, 3)
    out = make_baseline(name, fam, large)
    expected = {k: (3, *v.shape) for k, v in fam.small_block().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_random_init_is_seeded_default_init():
    fam = create_family("paper_mnist")
    a, b, c = random_init(fam, 4, seed=7), random_init(fam, 4, seed=7), random_init(fam, 4, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert not torch.equal(a["conv1.weight"][0], a["conv1.weight"][1])  # every network its own draw
    torch.manual_seed(7)
    first = fam.small_block().state_dict()
    assert all(torch.equal(a[k][0], first[k]) for k in first)


def test_identity_is_all_zero():
    out = identity(create_family("paper_mnist"), 2)
    assert all(v.abs().sum() == 0 for v in out.values())


def test_fold_bn_matches_conv_then_bn():
    """BN(conv(x)) == conv(x; folded w) + shift, with shift = beta - mean * gamma / sqrt(var + eps)."""
    fam = create_family("paper_mnist")
    large = stacked_large(fam, 2, seed=1)
    folded = fold_bn(fam, large)[0]
    x = torch.randn(5, fam.width, 14, 14)
    for p in range(2):
        w = large["conv1.weight"][p]
        bn = nn.BatchNorm2d(fam.large_hidden).eval()
        bn.load_state_dict({k: large[f"bn1.{k}"][p] for k in bn.state_dict()})
        gamma, beta, mean, var = (large[f"bn1.{k}"][p] for k in ("weight", "bias", "running_mean", "running_var"))
        shift = beta - mean * gamma / torch.sqrt(var + EPS)
        want = bn(F.conv2d(x, w, padding=1))
        got = F.conv2d(x, folded["conv1.weight"][p], padding=1) + shift[None, :, None, None]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        scale2 = large["bn2.weight"][p] / torch.sqrt(large["bn2.running_var"][p] + EPS)
        torch.testing.assert_close(folded["conv2.weight"][p], large["conv2.weight"][p] * scale2[:, None, None, None])


def test_uniform_indices():
    assert uniform_indices(6, 3).tolist() == [0, 2, 4]
    assert uniform_indices(8, 4).tolist() == [0, 2, 4, 6]
    assert uniform_indices(7, 3).tolist() == [0, 3, 6]
    assert uniform_indices(6, 6).tolist() == list(range(6))
    with pytest.raises(KTError):
        uniform_indices(3, 6)


def unit_bn(large: dict) -> dict:
    """Set every BN so that folding multiplies by exactly 2 (gamma = 2 * sqrt(var + eps))."""
    out = dict(large)
    for bn in ("bn1", "bn2"):
        out[f"{bn}.running_var"] = torch.full_like(large[f"{bn}.running_var"], 1.0 - EPS)
        out[f"{bn}.weight"] = 2 * torch.sqrt(out[f"{bn}.running_var"] + EPS)
    return out


def labelled(fam, n: int) -> dict:
    """Conv weights whose value names their (network, out, in) position: 1000 p + 10 o + i."""
    large = unit_bn(stacked_large(fam, n))
    for key in ("conv1.weight", "conv2.weight"):
        w = large[key]
        p, o, i = torch.meshgrid(*(torch.arange(s) for s in w.shape[:3]), indexing="ij")
        large[key] = (1000 * p + 10 * o + i).float()[..., None, None].expand_as(w).clone()
    return large


def test_uniform_selection_picks_even_hidden_channels():
    fam = create_family("paper_mnist")  # hidden 6 -> 3
    large = labelled(fam, 2)
    out = uniform_selection(fam, large)
    keep = [0, 2, 4]
    for p in range(2):
        torch.testing.assert_close(out["conv1.weight"][p], 2 * large["conv1.weight"][p, keep])
        torch.testing.assert_close(out["conv2.weight"][p], 2 * large["conv2.weight"][p][:, keep])


def test_l1_selection_keeps_largest_folded_filters_consistently():
    fam = create_family("paper_mnist")
    large = labelled(fam, 2)
    norms = torch.tensor([[1.0, 9.0, 2.0, 8.0, 3.0, 7.0],   # network 0: keep 1, 3, 5
                          [9.0, 1.0, 8.0, 2.0, 7.0, 3.0]])  # network 1: keep 0, 2, 4
    large["conv1.weight"] = norms[:, :, None, None, None].expand_as(large["conv1.weight"]).clone()
    # A huge raw filter with a tiny BN scale must lose: ranking is on the folded weights.
    large["conv1.weight"][0, 0] = 1000.0
    large["bn1.weight"][0, 0] = 1e-4
    out = l1_selection(fam, large)
    folded = fold_bn(fam, large)[0]
    for p, keep in enumerate([[1, 3, 5], [0, 2, 4]]):
        torch.testing.assert_close(out["conv1.weight"][p], folded["conv1.weight"][p, keep])
        torch.testing.assert_close(out["conv2.weight"][p], folded["conv2.weight"][p][:, keep])


def test_selection_needs_bn_statistics():
    fam = create_family("paper_mnist")
    large = {k: v for k, v in stacked_large(fam, 1).items() if "running_var" not in k}
    with pytest.raises(KTError, match="BN statistics"):
        uniform_selection(fam, large)


def test_identity_equals_removing_the_large_block():
    fam = create_family("paper_mnist")
    n = 3
    g = torch.Generator().manual_seed(3)
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        base = fam.base_network().state_dict()
        for k, v in base.items():  # non-trivial BN statistics so the networks differ in what they predict
            if k.endswith("running_mean"):
                base[k] = 0.3 * torch.randn(v.shape, generator=g)
            elif k.endswith("running_var"):
                base[k] = torch.rand(v.shape, generator=g) + 0.5
        nets.append(base)
    begin = {k: torch.stack([prefixed(s, "begin")[k] for s in nets]) for k in prefixed(nets[0], "begin")}
    last = {k: torch.stack([prefixed(s, "last")[k] for s in nets]) for k in prefixed(nets[0], "last")}
    data = load_dataset("digits")
    acc = network_accuracy(fam, begin, identity(fam, n), last, data)

    removed = KTNetwork(fam.begin(n), nn.Identity(), fam.last(n), n).eval()
    removed.begin.load_state_dict(stack_states([prefixed(s, "begin") for s in nets]))
    removed.last.load_state_dict(stack_states([prefixed(s, "last") for s in nets]))
    compressed = fam.compressed_network(n).eval()
    compressed.begin.load_state_dict(removed.begin.state_dict())
    compressed.last.load_state_dict(removed.last.state_dict())
    compressed.block.load_state_dict(stack_states([{k: v[i] for k, v in identity(fam, n).items()} for i in range(n)]))
    x = data.test_x.repeat(1, n, 1, 1)
    with torch.no_grad():
        want, got = removed(x), compressed(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pred = want.view(len(x), n, -1).argmax(-1)
    want_acc = (pred == data.test_y[:, None]).float().mean(0) * 100
    torch.testing.assert_close(acc, want_acc, rtol=0, atol=1e-4)
    assert len(set(pred.flatten().tolist())) > 1  # a real comparison, not a constant prediction
