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
# One input channel takes its own weight-gradient tiles (a row of up to 3 taps): 3, 5 (3 + 2) and 7
# (3 + 3 + 1) wide kernels, stride 2 and a remainder of members. Output counts of 10 and 13 at one
# position and 5 at stride 2: the forward's split of each block of outputs into narrower tiles.
SHAPES = [(1, 1, 6, 3, 1, 28), (3, 6, 6, 3, 1, 14), (16, 6, 6, 3, 1, 14), (19, 6, 3, 3, 2, 13),
          (8, 3, 6, 3, 2, 14), (16, 6, 12, 1, 1, 7), (5, 2, 7, 5, 2, 9), (4, 6, 3, 5, 1, 10),
          (17, 1, 4, 5, 2, 11), (3, 1, 7, 7, 1, 9), (2, 1, 3, 1, 1, 6), (8, 6, 10, 1, 1, 1),
          (9, 3, 13, 3, 1, 5), (16, 6, 5, 3, 2, 7)]


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


@pytest.mark.parametrize("members,cin,cout,size,pool", [(1, 1, 6, 28, (3, 2, 1)), (16, 1, 6, 28, (3, 2, 1)),
                                                       (19, 2, 3, 13, (3, 2, 1)), (16, 1, 7, 12, (3, 1, 1)),
                                                       (17, 1, 6, 11, (2, 2, 0)), (16, 2, 6, 9, (1, 2, 0))])
def test_fused_conv_max_pool_equals_conv_then_pool(members, cin, cout, size, pool):
    """Pools whose windows overlap (a position in up to 9 of them), tile the image, or skip positions
    (in no window: no gradient); float64 against PyTorch, and the same output without a gradient wanted."""
    torch.manual_seed(0)
    x = torch.randn(3, members * cin, size, size, dtype=torch.float64)
    x[0, :, :8] = 0  # blank rows, as in MNIST: equal maxima, where the first one must win
    w = torch.randn(members * cout, cin, 3, 3, dtype=torch.float64, requires_grad=True)
    ref = F.max_pool2d(F.conv2d(x, w, None, 1, 1, groups=members), *pool)
    g = torch.randn_like(ref)
    (gw,) = torch.autograd.grad(ref, (w,), g)
    out = native.member_conv2d_max_pool(interleave(x, members), w, members, pool)
    (gwi,) = torch.autograd.grad(out, (w,), interleave(g, members))
    torch.testing.assert_close(deinterleave(out, members), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gwi, gw, rtol=1e-12, atol=1e-11)
    with torch.no_grad():   # no argmax kept
        assert torch.equal(native.member_conv2d_max_pool(interleave(x, members), w, members, pool), out)


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
    shift = torch.randn(16 * 6, dtype=torch.float64, requires_grad=True)
    threads, results = torch.get_num_threads(), []
    try:
        torch.set_num_threads(2)
        for openmp in (1, 0):
            monkeypatch.setattr(lib, "kt_openmp", lambda on=openmp: on)
            out, pooled = member_conv2d(x, w, 16, 2), native.member_conv2d_max_pool(img, w0, 16)
            relu = native.member_conv2d_max_pool(img, w0, 16, (3, 2, 1), shift)
            grads = torch.autograd.grad(out.sum() + pooled.sum() + (relu * pooled).sum(), (x, w, w0, shift))
            results.append((out, pooled, relu, *grads))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)



@pytest.mark.parametrize("members,cout,size", [(16, 6, 28), (19, 3, 13)])
def test_fused_conv_max_pool_shift_relu_equals_its_parts(members, cout, size):
    torch.manual_seed(1)
    x = torch.randn(3, members, size, size, dtype=torch.float64)
    x[0, :, :8] = 0
    w = torch.randn(members * cout, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(members * cout, dtype=torch.float64, requires_grad=True)   # member-major, as the layer's
    ref = F.relu(F.max_pool2d(F.conv2d(x, w, None, 1, 1, groups=members), 3, 2, 1) + shift[:, None, None])
    assert 0 < (ref == 0).double().mean() < 1   # the ReLU both passes and blocks
    g = torch.randn_like(ref)
    gw, gs = torch.autograd.grad(ref, (w, shift), g)
    order = interleave(torch.arange(members * cout)[None, :, None, None], members).flatten()
    out = native.member_conv2d_max_pool(interleave(x, members), w, members, (3, 2, 1), shift[order])
    gwi, gsi = torch.autograd.grad(out, (w, shift), interleave(g, members))
    torch.testing.assert_close(deinterleave(out, members), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gwi, gw, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(gsi, gs, rtol=1e-12, atol=1e-11)
    with torch.no_grad():   # no argmax kept
        assert torch.equal(native.member_conv2d_max_pool(interleave(x, members), w, members, (3, 2, 1), shift[order]), out)

@pytest.mark.parametrize("members,cin,cout,kernel,stride,size", [(3, 6, 6, 3, 1, 14), (19, 6, 3, 3, 2, 13), (16, 6, 12, 1, 1, 7)])
def test_member_conv_shift_relu_equals_conv_then_shift_then_relu(members, cin, cout, kernel, stride, size):
    """The conv with its epilogue (a per-channel shift, then ReLU) equals ``relu(conv + shift)`` in
    float64: value and input gradient; it refuses a weight or shift that wants a gradient."""
    torch.manual_seed(0)
    x = torch.randn(4, members * cin, size, size, dtype=torch.float64)
    w = torch.randn(members * cout, cin, kernel, kernel, dtype=torch.float64)
    shift = torch.randn(members * cout, dtype=torch.float64)
    x1, x2 = interleave(x, members).requires_grad_(), x.clone().requires_grad_()
    y = native.member_conv2d_shift_relu(x1, w, members, interleave(shift[None, :, None, None], members).flatten(), stride)
    ref = F.relu(F.conv2d(x2, w, None, stride, kernel // 2, groups=members) + shift[:, None, None])
    torch.testing.assert_close(deinterleave(y, members), ref, rtol=1e-12, atol=1e-12)
    assert 0 < float((ref == 0).double().mean()) < 1
    g = torch.randn_like(ref)
    gx, = torch.autograd.grad(y, x1, interleave(g, members))
    torch.testing.assert_close(deinterleave(gx, members), torch.autograd.grad(ref, x2, g)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="no gradient to the weight or the shift"):
        native.member_conv2d_shift_relu(x1, w.requires_grad_(), members, shift, stride)


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("b,threads", [(6, 1), (6, 2), (5, 2)])
def test_member_linear_equals_stacked_linear_after_a_flatten(members, b, threads):
    """The head read in place (a 1x1 member conv whose positions are the images, split in one part per
    thread where the batch divides) equals ``StackedLinear`` on the member-major flattened features, in
    float64: values, weight and input gradients; the input gradient comes back channels-last."""
    from kt_mlflow.blocks.layers import StackedLinear

    torch.manual_seed(0)
    c, h, w, out = 4, 3, 5, 7
    lin = StackedLinear(c * h * w, out, members).double()
    x = torch.randn(b, members * c, h, w, dtype=torch.float64, requires_grad=True)     # member major
    xi = interleave(x.detach(), members).requires_grad_()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want, got = lin(x.reshape(b, -1)), lin.on_interleaved(xi)
        grad = torch.randn_like(want)
        gw_want, gx_want = torch.autograd.grad(want, [lin.weight, x], grad)
        gw_got, gx_got = torch.autograd.grad(got, [lin.weight, xi], grad)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
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
