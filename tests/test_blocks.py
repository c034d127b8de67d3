import copy

import pytest
import torch

from kt_mlflow.blocks import (
    create_family,
    family_names,
    flatten_block,
    fold_members,
    stack_states,
    unflatten_block,
    unstack_state,
)
from kt_mlflow.blocks.resnet import BasicBlock, BeginBlock, BottleneckBlock
from kt_mlflow.errors import KTError


def test_paper_family_matches_the_spec():
    fam = create_family("paper_mnist")
    large, small = fam.large_block().state_dict(), fam.small_block().state_dict()
    assert large["conv1.weight"].numel() == large["conv2.weight"].numel() == 324
    assert sum(1 for k in large if k.startswith("bn") and not k.endswith("num_batches_tracked")) == 8
    assert tuple(small["conv1.weight"].shape) == (3, 6, 3, 3)
    assert tuple(small["conv2.weight"].shape) == (6, 3, 3, 3)
    assert fam.base_network()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert fam.last().fc.cin == 12 * 7 * 7


def test_families_derive_shapes_from_config():
    assert "wide_mnist" in family_names()
    wide = create_family("wide_mnist")
    assert tuple(wide.small_block().state_dict()["conv1.weight"].shape) == (4, 8, 3, 3)
    assert wide.compressed_network()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(KTError, match="choose one of"):
        create_family("nope")


def _textbook_begin(block: BeginBlock, x: torch.Tensor) -> torch.Tensor:
    """conv -> BN -> ReLU -> max-pool with the ordinary modules, in the spec's order."""
    return torch.nn.functional.max_pool2d(torch.relu(block.bn(block.conv(x))), 3, 2, 1)


@pytest.mark.parametrize("members", [1, 3])
def test_begin_block_bn_shortcuts_are_exact(members):
    """Eval-mode folding and train-mode statistics from patch moments equal BatchNorm2d: outputs,
    gradients and running statistics (float64), for one and for several members."""
    torch.manual_seed(0)
    fast = BeginBlock(2, 4, 3, members=members).double()  # two input channels: patches mix channels
    ref = BeginBlock(2, 4, 3, members=members).double()
    with torch.no_grad():
        fast.bn.weight.uniform_(-1.5, 1.5)  # negative scales too: folding must not rely on the sign
        fast.bn.bias.normal_()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(5, 2 * members, 12, 12, dtype=torch.float64) * 2 + 0.5
    # Moments per member: each member sees its own images (here: its own channel pair).
    per_image = [fast.patch_moments(x[:, 2 * m: 2 * m + 2]) for m in range(members)]
    moments = (torch.stack([s1.sum(0) for s1, _ in per_image]), torch.stack([s2.sum(0) for _, s2 in per_image]), 5 * 144)
    out_fast, out_ref = fast(x, moments), _textbook_begin(ref, x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out_ref)
    out_fast.backward(g)
    out_ref.backward(g)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast.bn, name), getattr(ref.bn, name), rtol=1e-10, atol=1e-10)
    fast.eval()
    ref.eval()
    torch.testing.assert_close(fast(x), _textbook_begin(ref, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_last_block_equals_the_textbook_head(interleaved, training):
    """The head with its eval-mode BN folded into the 1x1 conv (and, interleaved, the linear layer
    reading the features in place) equals conv -> BN -> ReLU -> flatten -> Linear with the ordinary
    modules, member by member (float64): outputs, and gradients of the input and every parameter."""
    from kt_mlflow.blocks.layers import set_interleaved
    from kt_mlflow.blocks.native import available, interleave
    from kt_mlflow.blocks.resnet import LastBlock

    if interleaved and not available():
        pytest.fail("the native kernels did not build on this machine (a C++ compiler is needed)")
    torch.manual_seed(0)
    k, c, wide, side = 3, 4, 5, 8
    head = LastBlock(c, wide, side, 10, members=k).double()
    with torch.no_grad():
        head.bn.weight.uniform_(-1.5, 1.5)
        head.bn.bias.normal_()
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    head = set_interleaved(head, interleaved).train(training)
    x = torch.randn(6, k * c, side, side, dtype=torch.float64)
    xin = (interleave(x, k) if interleaved else x).requires_grad_()
    out = head(xin)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [xin, *head.parameters()], g)
    for m in range(k):
        conv = torch.nn.Conv2d(c, wide, 1, stride=2, bias=False).double()
        bn, fc = torch.nn.BatchNorm2d(wide).double().train(training), torch.nn.Linear(wide * 16, 10).double()
        rows = slice(m * wide, (m + 1) * wide)
        with torch.no_grad():
            conv.weight.copy_(head.conv.weight[rows])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(head.bn, name)[rows])
            fc.weight.copy_(head.fc.weight[m * 10:(m + 1) * 10])
            fc.bias.copy_(head.fc.bias[m * 10:(m + 1) * 10])
        xm = x[:, m * c:(m + 1) * c].clone().requires_grad_()
        want = fc(torch.relu(bn(conv(xm))).flatten(1))
        torch.testing.assert_close(out[:, m * 10:(m + 1) * 10], want, rtol=1e-10, atol=1e-10)
        gm = g[:, m * 10:(m + 1) * 10]
        gx, gconv, gbn_w, gbn_b, gfc_w, gfc_b = torch.autograd.grad(
            want, [xm, conv.weight, bn.weight, bn.bias, fc.weight, fc.bias], gm)
        got_x = grads[0][:, m::k] if interleaved else grads[0][:, m * c:(m + 1) * c]
        torch.testing.assert_close(got_x, gx, rtol=1e-10, atol=1e-10)
        params = dict(zip([n for n, _ in head.named_parameters()], grads[1:]))
        torch.testing.assert_close(params["conv.weight"][rows], gconv, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(params["bn.weight"][rows], gbn_w, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(params["bn.bias"][rows], gbn_b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(params["fc.weight"][m * 10:(m + 1) * 10], gfc_w, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(params["fc.bias"][m * 10:(m + 1) * 10], gfc_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("interleaved", [False, True])
def test_frozen_eval_blocks_equal_the_modules_that_learn(interleaved):
    """With their parameters frozen in eval mode (the task loss's networks, generation's step 3), the
    head's and the large block's BN + ReLU run in the conv's epilogue when interleaved (scale folded into
    the weights, shift and ReLU applied before the store): the same values and input gradients as the
    member-major modules with learnable parameters (float64)."""
    from kt_mlflow.blocks.layers import set_interleaved
    from kt_mlflow.blocks.native import deinterleave, interleave
    from kt_mlflow.blocks.resnet import LastBlock

    torch.manual_seed(0)
    k, c, wide, side = 3, 4, 5, 8
    head, block = LastBlock(c, wide, side, 10, members=k).double(), BasicBlock(c, 3, 3, members=k).double()
    with torch.no_grad():
        for bn in (head.bn, block.bn1, block.bn2):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    refs = [copy.deepcopy(m).eval() for m in (head, block)]
    head, block = (set_interleaved(m, interleaved).eval().requires_grad_(False) for m in (head, block))
    x = torch.randn(6, k * c, side, side, dtype=torch.float64)
    xin = (interleave(x, k) if interleaved else x).requires_grad_()
    x_ref = x.clone().requires_grad_()
    for fast, ref in ((head(xin), refs[0](x_ref)), (block(xin, stride=2), refs[1](x_ref, stride=2))):
        g = torch.randn_like(ref)
        gi = interleave(g, k) if fast.dim() == 4 and interleaved else g
        gx, = torch.autograd.grad(fast, xin, gi)
        if fast.dim() == 4 and interleaved:
            fast = deinterleave(fast, k)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
        gx_ref, = torch.autograd.grad(ref, x_ref, g)
        torch.testing.assert_close(deinterleave(gx, k) if interleaved else gx, gx_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("which", ["base", "compressed"])
@pytest.mark.parametrize("training", [True, False])
def test_network_computes_only_the_positions_the_last_block_reads(which, training):
    """``KTNetwork`` asks the block for every stride-th position only: same outputs, gradients and BN
    statistics as the whole block followed by the last block's own subsampling (float64)."""
    torch.manual_seed(1)
    fam = create_family("paper_mnist")
    nets = [getattr(fam, f"{which}_network")(members=2).double().train(training) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(5, 2, 28, 28, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    fast = nets[0](x)
    slow = nets[1].last(nets[1].block(nets[1].begin(x)))
    torch.testing.assert_close(fast, slow)
    fast.sin().sum().backward()
    slow.sin().sum().backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(nets[0].named_buffers(), nets[1].buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_strided_batch_norm_is_batch_norm_then_subsampling(interleaved, momentum):
    """``StackedBatchNorm2d.strided`` (statistics over every position, only the kept ones normalised, its
    backward as an affine map of the input) against ``nn.BatchNorm2d`` then ``[::2, ::2]``, float64:
    outputs, gradients of input, weight and bias (through a ReLU and a subsampled residual, as in the
    block), running statistics over three steps, in both channel layouts."""
    from kt_mlflow.blocks.layers import StackedBatchNorm2d, member_order, set_interleaved, subsample

    torch.manual_seed(0)
    members, c = 3, 4
    fast = StackedBatchNorm2d(c, members).double()
    fast.momentum = momentum
    ref = torch.nn.BatchNorm2d(members * c, momentum=momentum).double()
    with torch.no_grad():
        fast.weight.uniform_(-1.5, 1.5)
        fast.bias.normal_()
    ref.load_state_dict(fast.state_dict())
    set_interleaved(fast, interleaved)
    for _ in range(3):
        z = (torch.randn(5, members * c, 9, 10, dtype=torch.float64) * 2 + 0.5).requires_grad_()
        res = torch.randn(5, members * c, 9, 10, dtype=torch.float64, requires_grad=True)
        z_cl = z.contiguous(memory_format=torch.channels_last)
        if interleaved:   # the same channels, in interleaved order for the fast layer
            order = member_order(torch.arange(members * c), members)
            z_in, res_in = z_cl[:, order], res[:, order].contiguous(memory_format=torch.channels_last)
        else:
            z_in, res_in = z_cl, res
        out = torch.relu(fast.strided(z_in, 2) + subsample(res_in, 2))
        want = torch.relu(ref(z)[:, :, ::2, ::2] + res[:, :, ::2, ::2])
        if interleaved:
            want = want[:, order]
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(want)
        got_grads = torch.autograd.grad(out, (z, res, fast.weight, fast.bias), g)
        want_grads = torch.autograd.grad(want, (z, res, ref.weight, ref.bias), g)
        for name, a, b in zip(("input", "residual", "weight", "bias"), got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("used", ["both", "whole", "subsampled", "expanded"])
def test_fork_gives_a_block_input_and_its_subsample_with_their_summed_gradient(used):
    """``fork``'s one in-place add equals autograd's sum of the whole and the subsampled gradient, bit for
    bit, with either output unused, and with a whole gradient it must not write into (an expanded one)."""
    from kt_mlflow.blocks.layers import fork

    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    a = torch.randn(3, 4, 9, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    b = torch.randn(3, 4, 5, 5, dtype=torch.float64)

    def loss(whole, skip):   # as in a block, the whole input's gradient is made by the layer reading it
        terms = {"both": [(whole * a).sum(), (skip * b).sum()], "whole": [(whole * a).sum()],
                 "subsampled": [(skip * b).sum()], "expanded": [whole.sum(), (skip * b).sum()]}[used]
        return sum(terms)

    whole, skip = fork(x, 2)
    assert torch.equal(whole, x) and torch.equal(skip, x[:, :, ::2, ::2])
    (got,) = torch.autograd.grad(loss(whole, skip), x)
    (want,) = torch.autograd.grad(loss(x, x[:, :, ::2, ::2]), x)
    assert torch.equal(got, want)


def test_init_pair_is_a_function_of_the_seed():
    fam = create_family("paper_mnist")
    a, b, c = fam.init_pair(1), fam.init_pair(1), fam.init_pair(2)
    assert torch.equal(a[0]["block.conv1.weight"], b[0]["block.conv1.weight"])
    assert not torch.equal(a[0]["block.conv1.weight"], c[0]["block.conv1.weight"])


def test_stacked_network_computes_each_member():
    fam = create_family("paper_mnist")
    states = [fam.init_pair(s)[0] for s in range(3)]
    net = fam.base_network(3)
    net.load_state_dict(stack_states(states))
    net.eval()
    x = torch.randn(4, 3, 28, 28)
    out = net(x).view(4, 3, 10)
    for m in range(3):
        solo = fam.base_network()
        solo.load_state_dict(unstack_state(net.state_dict(), 3)[m])
        solo.eval()
        torch.testing.assert_close(solo(x[:, m: m + 1]), out[:, m], atol=1e-5, rtol=1e-5)


def test_fold_members_matches_stack_states():
    fam = create_family("paper_mnist")
    states = [fam.small_block().state_dict() for _ in range(3)]
    per_net = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    for k, v in fold_members(per_net).items():
        assert torch.equal(v, stack_states(states)[k])


def test_large_block_hidden_permutation_preserves_function():
    fam = create_family("paper_mnist")
    block = fam.large_block().eval()
    for bn in (block.bn1, block.bn2):  # non-trivial BN statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    state = {k: v[None] for k, v in block.state_dict().items()}
    perm = torch.tensor([[3, 1, 5, 0, 2, 4]])
    permuted = BasicBlock.permute_hidden(state, perm)
    other = fam.large_block().eval()
    other.load_state_dict({k: v[0] for k, v in permuted.items()})
    x = torch.relu(torch.randn(2, 6, 14, 14))
    assert not torch.equal(permuted["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(other(x), block(x), atol=1e-5, rtol=1e-5)


def test_small_block_canonical_form_preserves_function_and_is_unique():
    fam = create_family("paper_mnist")
    block = fam.small_block()
    state = {k: v[None] for k, v in block.state_dict().items()}
    canon = BottleneckBlock.canonicalize(state)
    # a rescaled + permuted copy has the same canonical form
    a = torch.tensor([2.0, 0.5, 3.0])
    order = torch.tensor([2, 0, 1])
    w1 = (state["conv1.weight"][0] * a[:, None, None, None])[order]
    w2 = (state["conv2.weight"][0] / a[None, :, None, None])[:, order]
    canon2 = BottleneckBlock.canonicalize({"conv1.weight": w1[None], "conv2.weight": w2[None]})
    for k in canon:
        torch.testing.assert_close(canon[k], canon2[k], atol=1e-5, rtol=1e-5)
    other = fam.small_block()
    other.load_state_dict({k: v[0] for k, v in canon.items()})
    x = torch.relu(torch.randn(2, 6, 14, 14))
    torch.testing.assert_close(other(x), block(x), atol=1e-5, rtol=1e-5)


def test_flatten_roundtrip_and_shape_errors():
    fam = create_family("paper_mnist")
    large = {k: v[None] for k, v in fam.large_block().state_dict().items()}
    flat = flatten_block(fam, "large", large)
    assert flat.shape == (1, 2 * 324 + 8 * 6)
    back = unflatten_block(fam, "large", flat)
    assert all(torch.equal(back[k], large[k].float()) for k in back)
    with pytest.raises(KTError, match=r"shape \(batch, 696\)"):
        unflatten_block(fam, "large", torch.zeros(1, 5))


def test_check_block_state_errors_name_the_problem():
    fam = create_family("paper_mnist")
    state = fam.large_block().state_dict()
    with pytest.raises(KTError, match="missing conv2.weight"):
        fam.check_block_state({k: v for k, v in state.items() if k != "conv2.weight"}, "large")
    bad = dict(state, **{"conv1.weight": torch.full((6, 6, 3, 3), float("nan"))})
    with pytest.raises(KTError, match="NaN or inf"):
        fam.check_block_state(bad, "large")
    with pytest.raises(KTError, match=r"expected \(6, 6, 3, 3\)"):
        fam.check_block_state(dict(state, **{"conv1.weight": torch.zeros(3, 6, 3, 3)}), "large")


def test_small_block_grad_leak_changes_gradients_only():
    """``grad_leak``: same outputs; below zero the hidden ReLU passes ``slope`` times the gradient, so a
    small block whose hidden units are all off still gets a gradient (none with a plain ReLU)."""
    torch.manual_seed(0)
    blocks = [BottleneckBlock(4, 2, 3).double() for _ in range(2)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    with torch.no_grad():
        for b in blocks:
            b.conv1.weight.copy_(-b.conv1.weight.abs())  # every unit off on non-negative inputs
    blocks[1].grad_leak = 0.1
    x = torch.rand(3, 4, 6, 6, dtype=torch.float64)
    outs = [b(x) for b in blocks]
    torch.testing.assert_close(outs[0], outs[1])
    for out in outs:
        out.sum().backward()
    assert blocks[0].conv1.weight.grad.abs().max() == 0
    assert blocks[1].conv1.weight.grad.abs().max() > 0
    from kt_mlflow.blocks.resnet import relu_leaky_grad
    z = torch.tensor([-2.0, -0.5, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = relu_leaky_grad(z, 0.1)
    y.sum().backward()
    torch.testing.assert_close(y, torch.relu(z))
    torch.testing.assert_close(z.grad, torch.tensor([0.1, 0.1, 1.0, 1.0], dtype=torch.float64))
    # the same bits as the two-term textbook form, zeros included (gradient ``slope`` at 0)
    z = torch.randn(64, dtype=torch.float32).mul(3).round().div(3).requires_grad_()
    g = torch.randn(64)
    leak = 0.05 * z.clamp(max=0)
    plain = torch.relu(z) + (leak - leak.detach())
    (want,) = torch.autograd.grad(plain, z, g)
    (got,) = torch.autograd.grad(relu_leaky_grad(z, 0.05), z, g)
    assert torch.equal(relu_leaky_grad(z, 0.05), plain) and torch.equal(got, want) and bool((z == 0).any())


@pytest.mark.parametrize("interleaved", [False, True])
def test_batch_norm_and_relu_backward_passes_get_channels_last_gradients(interleaved):
    """Every BN and ReLU backward of a training step reads its gradient in the activations' channels-last
    layout: PyTorch's CPU kernels take a path about five times slower for a gradient in the default
    layout (what a strided slice or the head's flatten hands back without ``subsample``)."""
    from kt_mlflow.blocks.layers import set_interleaved

    fam = create_family("paper_mnist")
    net = set_interleaved(fam.base_network(members=3), interleaved).to(memory_format=torch.channels_last).train()
    net.interleaved = interleaved
    x = torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    out = net(x)
    seen, stack, done = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in done:
            continue
        done.add(node)
        if type(node).__name__.startswith(("NativeBatchNormBackward", "ThresholdBackward", "ReluBackward")):
            node.register_prehook(lambda grads, node=node: seen.append((type(node).__name__, grads[0].dim() != 4 or
                                  grads[0].is_contiguous(memory_format=torch.channels_last))))
        stack.extend(n for n, _ in node.next_functions)
    out.sum().backward()
    assert len(seen) >= 3 and all(ok for _, ok in seen), seen
