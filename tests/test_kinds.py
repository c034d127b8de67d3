"""Every block kind against textbook PyTorch modules (float64): values, gradients, BN statistics;
the translator's folded view, the hidden-channel symmetry, and selection as exact pruning."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kt_mlflow.blocks import create_family, fold_members, stack_states, unstack_state
from kt_mlflow.evaluation.baselines import l1_selection, make_baseline, uniform_selection
from kt_mlflow.translators import create_translator, tokens

FAMILIES = Path(__file__).resolve().parents[1] / "projects" / "families"
ALL = ["paper_mnist", "rgb32", *(str(FAMILIES / f"{n}.yaml") for n in ("prune_basic", "kernel5", "mlp_patch"))]


def fam_of(name):
    return create_family(name)


# -- textbook modules: the ordinary layers, written as the paper and the transformer literature do --
class TextbookConvBlock(nn.Module):
    def __init__(self, width, hidden, kernel, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(width, hidden, kernel, padding=kernel // 2, bias=False)
        self.conv2 = nn.Conv2d(hidden, width, kernel, padding=kernel // 2, bias=False)
        self.bn1, self.bn2 = (nn.BatchNorm2d(hidden), nn.BatchNorm2d(width)) if bn else (nn.Identity(), nn.Identity())

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class TextbookMLPBlock(nn.Module):
    """On tokens ``(B, N, d)``: x + Linear(GELU(Linear(LayerNorm(x))))."""

    def __init__(self, width, hidden, norm):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def textbook_state(kind_state):
    """A kt block state (Linear layers as 1x1 convs) -> the textbook module's state."""
    return {k: v[..., 0, 0] if k.startswith("fc") and k.endswith("weight") else v for k, v in kind_state.items()}


def textbook_for(fam, which):
    kind, hidden = (fam.large, fam.large_hidden) if which == "large" else (fam.small, fam.small_hidden)
    if kind == "mlp":
        return TextbookMLPBlock(fam.width, hidden, fam.large_norm if which == "large" else fam.small_norm)
    return TextbookConvBlock(fam.width, hidden, (fam.large_kernel if which == "large" else fam.small_kernel) or fam.kernel,
                             bn=kind == "basic")


def run_textbook(module, x, kind):
    if kind != "mlp":
        return module(x)
    b, c, h, w = x.shape  # positions as tokens
    return module(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


KINDS = [("paper_mnist", "large"), ("paper_mnist", "small"), (str(FAMILIES / "prune_basic.yaml"), "small"),
         (str(FAMILIES / "kernel5.yaml"), "large"), (str(FAMILIES / "mlp_patch.yaml"), "large"),
         (str(FAMILIES / "mlp_patch.yaml"), "small")]


@pytest.mark.parametrize("family, which", KINDS, ids=lambda v: Path(str(v)).stem)
@pytest.mark.parametrize("training", [True, False])
def test_stacked_block_equals_textbook_modules(family, which, training):
    """K stacked members == K textbook modules: outputs, parameter gradients and BN running statistics."""
    fam, k = fam_of(family), 3
    torch.manual_seed(0)
    singles = [fam.block(which).double() for _ in range(k)]
    for s in singles:  # non-trivial BN / LayerNorm affines, BN statistics and biases
        for name, t in s.state_dict().items():
            if t.is_floating_point() and t.dim() == 1:
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith(("weight", "running_var")) else torch.randn_like(t) * 0.3)
    stacked = fam.block(which, k).double().train(training)
    stacked.load_state_dict(stack_states([s.state_dict() for s in singles]))
    books = []
    for s in singles:
        book = textbook_for(fam, which).double().train(training)
        book.load_state_dict(textbook_state(s.state_dict()))
        books.append(book)
    kind = fam.large if which == "large" else fam.small
    x = torch.relu(torch.randn(4, k * fam.width, 7, 7, dtype=torch.float64))
    out = stacked(x)
    ref = torch.cat([run_textbook(b, x[:, i * fam.width:(i + 1) * fam.width], kind) for i, b in enumerate(books)], 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    got = unstack_state({n: p.grad for n, p in stacked.named_parameters()}, k)
    for i, b in enumerate(books):
        want = {n: p.grad for n, p in b.named_parameters()}
        for name in want:
            torch.testing.assert_close(textbook_state(got[i])[name], want[name], rtol=1e-9, atol=1e-9, msg=name)
    got = unstack_state(stacked.state_dict(), k)
    for i, b in enumerate(books):
        for name, t in b.state_dict().items():
            if "running" in name:
                torch.testing.assert_close(got[i][name], t, rtol=1e-10, atol=1e-10, msg=name)


def test_patch_begin_and_pool_last_equal_textbook_modules():
    """Patch embedding + token-mixing MLP, then LayerNorm + mean + Linear, written on (B, tokens, C)."""
    fam, k = fam_of(str(FAMILIES / "mlp_patch.yaml")), 2
    torch.manual_seed(1)
    begins, lasts = [fam.begin().double() for _ in range(k)], [fam.last().double() for _ in range(k)]
    for m in begins + lasts:
        for t in m.parameters():  # non-trivial LayerNorm affines
            t.data.add_(torch.randn_like(t) * 0.1)
    begin, last = fam.begin(k).double(), fam.last(k).double()
    begin.load_state_dict(stack_states([b.state_dict() for b in begins]))
    last.load_state_dict(stack_states([m.state_dict() for m in lasts]))
    x = torch.randn(3, k, 28, 28, dtype=torch.float64)
    out = last(begin(x))
    out.sum().backward()
    for i in range(k):
        b, m = begins[i], lasts[i]
        t = F.conv2d(x[:, i:i + 1], b.embed.weight, b.embed.bias, stride=fam.patch).flatten(2).transpose(1, 2)
        ln = F.layer_norm(t, (fam.width,), b.norm.weight, b.norm.bias).transpose(1, 2)   # (B, C, tokens)
        t = t + F.linear(F.gelu(F.linear(ln, b.mix1.weight, b.mix1.bias)), b.mix2.weight, b.mix2.bias).transpose(1, 2)
        logits = F.linear(F.layer_norm(t, (fam.width,), m.norm.weight, m.norm.bias).mean(1), m.fc.weight, m.fc.bias)
        torch.testing.assert_close(out[:, i * 10:(i + 1) * 10], logits, rtol=1e-10, atol=1e-10)
        logits.sum().backward()
    grads = unstack_state({n: p.grad for n, p in begin.named_parameters()}, k)
    for i, b in enumerate(begins):
        for n, p in b.named_parameters():
            torch.testing.assert_close(grads[i][n], p.grad, rtol=1e-9, atol=1e-9, msg=n)


def _trained_like(fam, which, n, seed=0):
    """``n`` stacked blocks with random weights and non-trivial BN statistics / biases / LayerNorm."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        s = fam.block(which).state_dict()
        for name, t in s.items():
            if not t.is_floating_point():
                continue
            if "running_var" in name:
                s[name] = torch.rand(t.shape, generator=g) + 0.5
            elif name.endswith("weight") and t.dim() == 1:  # BN / LayerNorm scales, negative ones too
                s[name] = torch.randn(t.shape, generator=g)
            else:
                s[name] = torch.randn(t.shape, generator=g) * 0.5
        states.append({k: v.double() if v.is_floating_point() else v for k, v in s.items()})
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def _run(fam, which, state, x):
    block = fam.block(which, len(next(iter(state.values())))).double().eval()
    block.load_state_dict(fold_members(state))
    return block(x)


@pytest.mark.parametrize("family, which", KINDS, ids=lambda v: Path(str(v)).stem)
def test_folded_view_is_the_blocks_function(family, which):
    """``unfold(fold(state))`` computes what ``state`` computes, for every kind that holds shifts."""
    fam = fam_of(family)
    state = _trained_like(fam, which, 2)
    proto = fam.prototype(which)
    weights, shifts = proto.fold(state)
    x = torch.relu(torch.randn(3, 2 * fam.width, 7, 7, dtype=torch.float64))
    if not proto.holds_shifts:
        assert all(float(t.abs().max()) == 0 for t in shifts.values())
    torch.testing.assert_close(_run(fam, which, proto.unfold(weights, shifts), x), _run(fam, which, state, x))


@pytest.mark.parametrize("family", ["paper_mnist", str(FAMILIES / "mlp_patch.yaml")], ids=["basic", "mlp"])
def test_hidden_permutation_preserves_function(family):
    fam = fam_of(family)
    state = _trained_like(fam, "large", 2)
    perm = torch.stack([torch.randperm(fam.large_hidden) for _ in range(2)])
    permuted = fam.prototype("large").permute_hidden(state, perm)
    x = torch.relu(torch.randn(3, 2 * fam.width, 7, 7, dtype=torch.float64))
    assert not torch.equal(permuted[list(fam.weight_shapes("large"))[0]], state[list(fam.weight_shapes("large"))[0]])
    torch.testing.assert_close(_run(fam, "large", permuted, x), _run(fam, "large", state, x))


@pytest.mark.parametrize("family", [str(FAMILIES / "prune_basic.yaml"), str(FAMILIES / "mlp_patch.yaml")],
                         ids=["basic", "mlp"])
@pytest.mark.parametrize("select", [uniform_selection, l1_selection], ids=["uniform", "l1"])
def test_selection_into_a_block_that_holds_shifts_is_exact_pruning(family, select):
    """A selected small block computes the large block with the other hidden channels removed (zeroed)."""
    fam = fam_of(family)
    large = _trained_like(fam, "large", 2)
    small = select(fam, large)
    (k1, bn1), (k2, _) = list(fam.prototype("large").layers.items())
    kept_rows = small[k1].flatten(2)  # identify the kept channels by their folded filters
    folded = fam.prototype("large").fold(large)[0][k1].flatten(2)
    masked = dict(large)
    for p in range(2):
        keep = [int((folded[p] - row).abs().sum(-1).argmin()) for row in kept_rows[p]]
        drop = torch.ones(fam.large_hidden, dtype=torch.bool)
        drop[keep] = False
        masked[k2] = masked[k2].clone()
        masked[k2][p][:, drop] = 0
    x = torch.relu(torch.randn(3, 2 * fam.width, 7, 7, dtype=torch.float64))
    torch.testing.assert_close(_run(fam, "small", small, x), _run(fam, "large", masked, x))


def test_selection_cuts_a_larger_kernel_around_its_centre():
    fam = fam_of(str(FAMILIES / "kernel5.yaml"))
    large = _trained_like(fam, "large", 2)
    folded = fam.prototype("large").fold(large)[0]
    out = uniform_selection(fam, large)
    torch.testing.assert_close(out["conv2.weight"], folded["conv2.weight"][:, :, [0, 2, 4], 1:4, 1:4])
    assert tuple(l1_selection(fam, large)["conv1.weight"].shape) == (2, 3, 6, 3, 3)


@pytest.mark.parametrize("family", ALL, ids=lambda v: Path(v).stem)
def test_identity_is_the_block_removed(family):
    fam = fam_of(family)
    large = _trained_like(fam, "large", 2)
    x = torch.relu(torch.randn(3, 2 * fam.width, 7, 7, dtype=torch.float64))
    state = {k: v.double() if v.is_floating_point() else v for k, v in make_baseline("identity", fam, large).items()}
    torch.testing.assert_close(_run(fam, "small", state, x), x)


@pytest.mark.parametrize("family", ALL, ids=lambda v: Path(v).stem)
@pytest.mark.parametrize("arch", ["mixer", "mlp", "channel_set"])
def test_every_translator_writes_a_loadable_small_block_for_every_family(family, arch):
    fam = fam_of(family)
    tr = create_translator(arch, fam, bn_aware=True, depth=1, width=16)
    small = tr.translate(fam.large_block().state_dict())
    block = fam.small_block()
    block.load_state_dict(small)  # strict: every key, every shape
    lay = tokens.layout(fam, "small")
    assert lay.extra == int(fam.prototype("small").holds_shifts)
    assert all(torch.isfinite(v).all() for v in small.values() if v.is_floating_point())


@pytest.mark.parametrize("family", ALL, ids=lambda v: Path(v).stem)
def test_target_tokens_round_trip_through_the_folded_view(family):
    fam = fam_of(family)
    small = {k: v.float() if v.is_floating_point() else v for k, v in _trained_like(fam, "small", 3).items()}
    weights, shifts = tokens.decode_target(fam, tokens.encode_target(fam, small))
    want_w, want_t = fam.prototype("small").fold(small)
    for k in weights:
        torch.testing.assert_close(weights[k], want_w[k])
        if shifts is not None:
            torch.testing.assert_close(shifts[k], want_t[k])
