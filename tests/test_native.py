"""The native CPU convolutions (members interleaved) compute what grouped convolutions compute."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kt_mlflow.blocks import create_family, native, stack_states
from kt_mlflow.blocks.layers import set_interleaved
from kt_mlflow.blocks.native import deinterleave, interleave, member_conv2d, use_native
from kt_mlflow.errors import KTError


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the native kernels did not build: is a C++ compiler (g++) installed?"


# (members, in, out, kernel, stride, size): SIMD-wide and remainder member counts, 1x1 and 5x5 kernels,
# odd sizes with stride 2; float64 so any indexing slip shows far above rounding.
SHAPES = [(1, 1, 6, 3, 1, 28), (3, 6, 6, 3, 1, 14), (16, 6, 6, 3, 1, 14), (19, 6, 3, 3, 2, 13),
          (8, 3, 6, 3, 2, 14), (16, 6, 12, 1, 1, 7), (5, 2, 7, 5, 2, 9), (4, 6, 3, 5, 1, 10)]


@pytest.mark.parametrize("members,cin,cout,kernel,stride,size", SHAPES)
def test_member_conv_equals_grouped_conv(members, cin, cout, kernel, stride, size):
    torch.manual_seed(0)
    x = torch.randn(4, members * cin, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(members * cout, cin, kernel, kernel, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, w, None, stride, kernel // 2, groups=members)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), g)
    xi = interleave(x.detach(), members).requires_grad_()
    out = member_conv2d(xi, w, members, stride)
    assert out.is_contiguous(memory_format=torch.channels_last)
    gxi, gwi = torch.autograd.grad(out, (xi, w), interleave(g, members))
    torch.testing.assert_close(deinterleave(out, members), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deinterleave(gxi, members), gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gwi, gw, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("members,cin,cout,size", [(1, 1, 6, 28), (16, 1, 6, 28), (19, 2, 3, 13)])
def test_fused_conv_max_pool_equals_conv_then_pool(members, cin, cout, size):
    torch.manual_seed(0)
    x = torch.randn(3, members * cin, size, size, dtype=torch.float64)
    x[0, :, :8] = 0  # blank rows, as in MNIST: equal maxima, where the first one must win
    w = torch.randn(members * cout, cin, 3, 3, dtype=torch.float64, requires_grad=True)
    ref = F.max_pool2d(F.conv2d(x, w, None, 1, 1, groups=members), 3, 2, 1)
    g = torch.randn_like(ref)
    (gw,) = torch.autograd.grad(ref, (w,), g)
    out = native.member_conv2d_max_pool(interleave(x, members), w, members, (3, 2, 1))
    (gwi,) = torch.autograd.grad(out, (w,), interleave(g, members))
    torch.testing.assert_close(deinterleave(out, members), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gwi, gw, rtol=1e-12, atol=1e-11)


def test_threads_split_the_batch_without_changing_results():
    torch.manual_seed(0)
    x = interleave(torch.randn(7, 16 * 6, 14, 14), 16).requires_grad_()
    w = torch.randn(16 * 6, 6, 3, 3, requires_grad=True)
    g = torch.randn(7, 16 * 6, 14, 14).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = member_conv2d(x, w, 16)
            results.append((out, *torch.autograd.grad(out, (x, w), g)))
    finally:
        torch.set_num_threads(threads)
    (o1, gx1, gw1), (o3, gx3, gw3) = results
    assert torch.equal(o1, o3) and torch.equal(gx1, gx3)  # every image is computed by one thread
    torch.testing.assert_close(gw1, gw3, rtol=1e-5, atol=1e-5)  # partial sums per thread, added


def test_openmp_threads_and_python_threads_give_the_same_results(monkeypatch):
    """Built with OpenMP (g++ has it), the library splits the batch on PyTorch's own threads; without,
    a pool of Python threads runs the parts: the same outputs and gradients, bit for bit."""
    lib = native.library()
    assert lib.kt_openmp() == 1, "the kernels were built without OpenMP (g++ -fopenmp failed)"
    torch.manual_seed(0)
    x = interleave(torch.randn(7, 16 * 6, 14, 14, dtype=torch.float64), 16).requires_grad_()
    w = torch.randn(16 * 6, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    img = interleave(torch.randn(5, 16, 28, 28, dtype=torch.float64), 16)
    w0 = torch.randn(16 * 6, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    threads, results = torch.get_num_threads(), []
    try:
        torch.set_num_threads(2)
        for openmp in (1, 0):
            monkeypatch.setattr(lib, "kt_openmp", lambda on=openmp: on)
            out, pooled = member_conv2d(x, w, 16, 2), native.member_conv2d_max_pool(img, w0, 16)
            grads = torch.autograd.grad(out.sum() + pooled.sum(), (x, w, w0))
            results.append((out, pooled, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dropout_masks_keep_the_asked_share_reproducibly():
    """``dropout_mask``: 1/(1-p) with probability 1-p, else 0; the same mask for the same seed at any
    thread count, another for another seed; ``native.Dropout`` is ``nn.Dropout`` with these masks."""
    threads = torch.get_num_threads()
    masks = []
    try:
        for n, seed in ((1, 1), (2, 1), (2, 2)):
            torch.set_num_threads(n)
            masks.append(native.dropout_mask((1000, 1000), 0.3, torch.Generator().manual_seed(seed)))
    finally:
        torch.set_num_threads(threads)
    a, b, c = masks
    assert torch.equal(a, b) and not torch.equal(a, c)
    values = a.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7, rel=1e-6)
    assert float((a > 0).float().mean()) == pytest.approx(0.7, abs=0.002)   # 1e6 draws: sd 0.00046
    rows = (a > 0).float().mean(1)
    assert float(rows.std()) == pytest.approx((0.7 * 0.3 / 1000) ** 0.5, rel=0.1)   # no clumping in rows
    drop = native.Dropout(0.3)
    x = torch.randn(64, 256)
    torch.manual_seed(5)
    y = drop.train()(x)
    torch.manual_seed(5)
    assert torch.equal(y, drop(x))
    torch.manual_seed(5)
    assert torch.equal(y, x * native.dropout_mask(x.shape, 0.3))
    assert torch.equal(drop.eval()(x), x) and torch.equal(native.Dropout(0.0).train()(x), x)
    assert native.Dropout(0.3).train()(x.double()).dtype == torch.float64   # other types: PyTorch's dropout


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
        got = native.gather_members(bank, rows, pick, scale, shift, relu)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-15)
        assert relu is False or bool((got >= 0).all())
    with pytest.raises(KTError, match="rows must lie in"):
        native.gather_members(bank, torch.tensor([6]), pick)


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
        y, mean, var = native.batch_norm_relu(z1, w1, b1, 1e-5)
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


@pytest.mark.parametrize("threads", [1, 2])
def test_affine_relu_equals_the_affine_map_then_relu(threads):
    """``affine_relu`` (eval-mode BN + ReLU, or a bias + ReLU, one pass each way) equals
    ``relu(z * scale + shift)`` in float64, value and input gradient, negative scales included; it
    refuses a scale or shift that wants a gradient (it passes none to them)."""
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = (torch.randn(7, 10, 9, 9, dtype=torch.float64) * 2).contiguous(memory_format=torch.channels_last)
        scale, shift = torch.rand(10, dtype=torch.float64) * 3 - 1.5, torch.randn(10, dtype=torch.float64)
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        y = native.affine_relu(z1, scale, shift)
        ref = F.relu(z2 * scale[:, None, None] + shift[:, None, None])
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
        assert y.is_contiguous(memory_format=torch.channels_last) and 0 < float((y == 0).double().mean()) < 1
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(y, z1, g)[0], torch.autograd.grad(ref, z2, g)[0], rtol=0, atol=1e-12)
    finally:
        torch.set_num_threads(old)
    with pytest.raises(RuntimeError, match="no gradient to scale or shift"):
        native.affine_relu(z, scale.requires_grad_(), shift)


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
        got = native.leaky_relu_grad(z, grad, 0.05)
        assert torch.equal(got, torch.where(z > 0, grad, torch.where(z < 0, grad * 0.05, 0.0)))
        assert got.stride() == z.stride()


@pytest.mark.parametrize("members", [1, 3])
def test_member_linear_equals_stacked_linear_after_a_flatten(members):
    """The head read in place (1x1 member conv of one position) equals ``StackedLinear`` on the
    member-major flattened features, in float64: values, weight and input gradients; the input
    gradient comes back channels-last."""
    from kt_mlflow.blocks.layers import StackedLinear

    torch.manual_seed(0)
    c, h, w, out, b = 4, 3, 5, 7, 6
    lin = StackedLinear(c * h * w, out, members).double()
    x = torch.randn(b, members * c, h, w, dtype=torch.float64, requires_grad=True)     # member major
    xi = interleave(x.detach(), members).requires_grad_()
    want, got = lin(x.reshape(b, -1)), lin.on_interleaved(xi)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    grad = torch.randn_like(want)
    gw_want, gx_want = torch.autograd.grad(want, [lin.weight, x], grad)
    gw_got, gx_got = torch.autograd.grad(got, [lin.weight, xi], grad)
    torch.testing.assert_close(gw_got, gw_want, rtol=0, atol=1e-13)
    torch.testing.assert_close(deinterleave(gx_got, members), gx_want, rtol=0, atol=1e-13)
    assert gx_got.is_contiguous(memory_format=torch.channels_last)


def test_interleave_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3 * 4, 2, 2)  # 3 members, 4 channels
    y = interleave(x, 3)
    assert torch.equal(y[:, 1 * 3 + 2], x[:, 2 * 4 + 1])  # channel 1 of member 2
    assert torch.equal(deinterleave(y, 3), x)
    v = torch.arange(12.0)
    assert torch.equal(native.stacked_order(native.member_order(v, 3), 3), v)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["base", "compressed"])
@pytest.mark.parametrize("mode", ["train", "train-moments", "eval"])
def test_interleaved_network_equals_member_major(which, mode, k):
    """A whole stacked network in either layout: outputs, parameter gradients, BN statistics (float64)."""
    torch.manual_seed(2)
    fam = create_family("paper_mnist")
    nets = [getattr(fam, f"{which}_network")(members=k).double() for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            for name, b in net.named_buffers():
                if name.endswith("running_var"):
                    b.uniform_(0.5, 2)
                elif name.endswith("running_mean"):
                    b.normal_()
    nets[1].load_state_dict(nets[0].state_dict())
    set_interleaved(nets[1], True)
    for net in nets:
        net.train(mode != "eval")
    images = torch.randn(6, k, 1, 28, 28, dtype=torch.float64)
    moments = None
    if mode == "train-moments":
        s1, s2 = nets[0].begin.patch_moments(images.flatten(0, 1))
        s1, s2 = s1.view(6, k, -1).sum(0), s2.view(6, k, *s2.shape[1:]).sum(0)
        moments = (s1, s2, 6 * 28 * 28)
    outs = [net(net.stack_input(images), moments) for net in nets]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    if mode == "eval":
        return
    for out in outs:
        out.sin().sum().backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-10, msg=name)
    for (name, a), b in zip(nets[0].named_buffers(), nets[1].buffers()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def test_kernel_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert use_native("auto", cpu) and use_native("native", cpu) and not use_native("torch", cpu)
    assert not use_native("auto", torch.device("cuda"))  # resolving needs no GPU
    with pytest.raises(KTError, match="--kernels native runs on a CPU"):
        use_native("native", torch.device("cuda"))
    with pytest.raises(KTError, match="unknown --kernels 'fast'"):
        use_native("fast", cpu)
    monkeypatch.setattr(native, "available", lambda: False)  # as on a machine without a compiler
    assert not use_native("auto", cpu)
    with pytest.raises(KTError, match="needs a C\\+\\+ compiler"):
        use_native("native", cpu)


def test_a_missing_compiler_leaves_the_grouped_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()  # the next use loads the cached build again


def test_a_failing_build_is_reported_not_cached(monkeypatch, tmp_path, caplog):
    compiler = tmp_path / "g++"
    compiler.write_text("#!/bin/sh\necho 'fatal error: something broke' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("KT_CACHE_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()
    assert "something broke" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


def test_an_unwritable_cache_is_reported(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KT_CACHE_DIR", str(blocker / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is None
    finally:
        native.library.cache_clear()
    assert "KT_CACHE_DIR" in caplog.text


FAMILY_FILES = Path(__file__).resolve().parents[1] / "projects" / "families"


@pytest.mark.parametrize("family", [str(FAMILY_FILES / "kernel5.yaml"), str(FAMILY_FILES / "prune_basic.yaml"), "rgb32"],
                         ids=["kernel5", "prune_basic", "rgb32"])
def test_native_kernels_compute_the_new_conv_families(family):
    """Interleaved members through the native kernels == grouped convolutions (float64, training step)."""
    assert native.available(), "the native kernels did not build: is a C++ compiler (g++) installed?"
    fam, k = create_family(family), 3
    torch.manual_seed(2)
    state = stack_states([fam.init_pair(s)[0] for s in range(k)])
    nets = []
    for on in (False, True):
        net = set_interleaved(fam.base_network(k).double(), on).train()
        net.load_state_dict(state)
        nets.append(net.to(memory_format=torch.channels_last))
    x = torch.randn(4, k, fam.in_channels, fam.image_size, fam.image_size, dtype=torch.float64)
    outs = [net(net.stack_input(x)) for net in nets]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
    for out in outs:
        out.sin().sum().backward()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-8, msg=name)
