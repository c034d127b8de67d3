"""The native library's other training ops compute what the PyTorch expressions they replace compute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kt_mlflow.blocks import native, native_ops
from kt_mlflow.blocks.native import interleave
from kt_mlflow.errors import KTError


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the native kernels did not build: is a C++ compiler (g++) installed?"


def test_dropout_masks_keep_the_asked_share_reproducibly():
    """``dropout_mask``: 1/(1-p) with probability 1-p, else 0; the same mask for the same seed at any
    thread count, another for another seed; ``native_ops.Dropout`` is ``nn.Dropout`` with these masks."""
    threads = torch.get_num_threads()
    masks = []
    try:
        for n, seed in ((1, 1), (2, 1), (2, 2)):
            torch.set_num_threads(n)
            masks.append(native_ops.dropout_mask((1000, 1000), 0.3, torch.Generator().manual_seed(seed)))
    finally:
        torch.set_num_threads(threads)
    a, b, c = masks
    assert torch.equal(a, b) and not torch.equal(a, c)
    values = a.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-6)
    assert float((a > 0).float().mean()) == pytest.approx(0.7, abs=0.002)   # 1e6 draws: sd 0.00046
    rows = (a > 0).float().mean(1)
    assert float(rows.std()) == pytest.approx((0.7 * 0.3 / 1000) ** 0.5, rel=0.1)   # no clumping in rows
    drop = native_ops.Dropout(0.3)
    x = torch.randn(64, 256)
    torch.manual_seed(5)
    y = drop.train()(x)
    torch.manual_seed(5)
    assert torch.equal(y, drop(x))
    torch.manual_seed(5)
    assert torch.equal(y, x * native_ops.dropout_mask(x.shape, 0.3))
    assert torch.equal(drop.eval()(x), x) and torch.equal(native_ops.Dropout(0.0).train()(x), x)
    assert native_ops.Dropout(0.3).train()(x.double()).dtype == torch.float64   # other types: PyTorch's dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [False, True])
def test_gather_members_is_the_gather_affine_relu_and_interleave_it_replaces(dtype, affine):
    """One pass equals the five it replaces: bank entries (rows, picks), per-member scale and shift,
    ReLU, interleaved channels-last layout; repeated rows and picks allowed, bad ones refused."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(6, 9, 5, 7, 7, generator=g, dtype=dtype)
    rows, pick = torch.tensor([5, 0, 5, 2]), torch.tensor([8, 1, 1, 3, 0])
    scale = torch.rand(4, 5, generator=g, dtype=dtype) + 0.5 if affine else None
    shift = torch.randn(4, 5, generator=g, dtype=dtype) if affine else None
    for relu in (False, True):
        want = bank[rows[:, None], pick[None, :]]                                   # (k, n, C, H, W)
        if affine:
            want = want * scale[:, None, :, None, None] + shift[:, None, :, None, None]
        want = torch.relu(want) if relu else want
        want = interleave(want.transpose(0, 1).reshape(5, 4 * 5, 7, 7), 4)
        got = native_ops.gather_members(bank, rows, pick, scale, shift, relu)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)
        assert relu is False or bool((got >= 0).all())
    with pytest.raises(KTError, match="rows must lie in"):
        native_ops.gather_members(bank, torch.tensor([6]), pick)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("members", [5, 16, 21])
def test_a_batch_of_each_members_own_images_is_gathered_as_the_stacked_input(dtype, channels, members):
    """Rows per entry and member (``rows`` ``(N, K)``): generation's batches, ``images[idx]`` laid out as
    the interleaved network's input, bit for bit: fewer members than a vector's lanes, whole vectors of
    them (transposed in registers), and whole vectors and a remainder; 81 positions, not a multiple."""
    from kt_mlflow.blocks import create_family
    from kt_mlflow.blocks.layers import set_interleaved

    g = torch.Generator().manual_seed(1)
    images = torch.randn(40, channels, 9, 9, generator=g, dtype=dtype)
    idx = torch.randint(0, 40, (6, members), generator=g)
    got = native_ops.gather_members(images[:, None], idx, torch.zeros(6, dtype=torch.long))
    want = interleave(images[idx].reshape(6, members * channels, 9, 9), members)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    net = set_interleaved(create_family("paper_mnist").base_network(members), True)
    assert torch.equal(net.gather_input(images, idx), net.stack_input(images[idx]))
    with pytest.raises(KTError, match=r"rows per entry must be \(6, K\)"):
        native_ops.gather_members(images[:, None], idx[:4], torch.zeros(6, dtype=torch.long))

@pytest.mark.parametrize("threads", [1, 2])
def test_batch_norm_relu_equals_batch_norm_then_relu(threads):
    """The fused training-mode BN + ReLU equals ``F.batch_norm`` then ``F.relu`` in float64: output,
    batch statistics, and the gradients of the input, weight and bias (negative scales included, so
    the ReLU mask is not the input's sign); at one and two threads."""
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = (torch.randn(7, 10, 9, 9, dtype=torch.float64) * 2 + 0.7).contiguous(memory_format=torch.channels_last)
        w, b = torch.rand(10, dtype=torch.float64) * 3 - 1.5, torch.randn(10, dtype=torch.float64)
        z1, w1, b1 = (t.clone().requires_grad_() for t in (z, w, b))
        y, mean, var = native_ops.batch_norm_relu(z1, w1, b1, 1e-5)
        rm, rv = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
        z2, w2, b2 = (t.clone().requires_grad_() for t in (z, w, b))
        ref = F.relu(F.batch_norm(z2, rm, rv, w2, b2, True, 1.0, 1e-5))
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(mean, rm, rtol=0, atol=1e-12)
        n = z.numel() // 10
        torch.testing.assert_close(var * n / (n - 1), rv, rtol=0, atol=1e-12)   # rv: the unbiased one
        assert 0 < float((y == 0).double().mean()) < 1
        g = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(y, [z1, w1, b1], g), torch.autograd.grad(ref, [z2, w2, b2], g)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_leaky_relu_grad_has_the_bits_of_the_expression_it_replaces(dtype, layout):
    """One native pass: bit for bit ``where(z > 0, g, where(z < 0, slope * g, 0))``, zeros of z
    included, in z's layout whatever g's."""
    torch.manual_seed(0)
    z = torch.randn(6, 12, 9, 9, dtype=dtype)
    z.view(-1)[::5] = 0
    z = z.contiguous(memory_format=layout)
    g = torch.randn(6, 12, 9, 9, dtype=dtype)
    for grad in (g, g.contiguous(memory_format=torch.channels_last)):
        got = native_ops.leaky_relu_grad(z, grad, 0.05)
        assert torch.equal(got, torch.where(z > 0, grad, torch.where(z < 0, grad * 0.05, 0.0)))
        assert got.stride() == z.stride()
