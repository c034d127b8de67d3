from pathlib import Path

import pytest
import torch

from kt_mlflow.blocks import create_family
from kt_mlflow.blocks.resnet import BasicBlock
from kt_mlflow.errors import KTError
from kt_mlflow.translators import MixerTranslator, Translator, create_translator, tokens

FAMILY_FILES = Path(__file__).resolve().parents[1] / "projects" / "families"


def test_token_layout_is_derived_from_the_family():
    paper, wide = create_family("paper_mnist"), create_family("wide_mnist")
    assert (tokens.layout(paper, "large").tokens, tokens.layout(paper, "small").tokens) == (72, 36)
    assert tokens.layout(paper, "large", bn_aware=True).dim == 10
    assert (tokens.layout(wide, "large").tokens, tokens.layout(wide, "small").tokens) == (128, 64)


def test_target_tokens_roundtrip():
    fam = create_family("paper_mnist")
    small = {k: torch.randn(5, *v.shape) for k, v in fam.small_block().state_dict().items()}
    back, shifts = tokens.decode_target(fam, tokens.encode_target(fam, small))
    assert shifts is None and all(torch.equal(back[k], small[k]) for k in small)  # a bottleneck holds no shifts


def test_bn_aware_tokens_carry_the_function_of_conv_plus_bn():
    fam = create_family("paper_mnist")
    block = fam.large_block().eval()
    block.bn1.running_mean.uniform_(-1, 1)
    block.bn1.running_var.uniform_(0.5, 2)
    block.bn1.weight.data.uniform_(0.5, 2)
    block.bn1.bias.data.uniform_(-1, 1)
    state = {k: v[None] for k, v in block.state_dict().items()}
    tok = tokens.encode_source(fam, state, bn_aware=True)  # (1, 72, 10)
    w = tok[0, :36, :9].reshape(6, 6, 3, 3)
    shift = tok[0, :36, 9].reshape(6, 6)[:, 0]
    x = torch.randn(2, 6, 14, 14)
    expected = block.bn1(block.conv1(x))
    got = torch.nn.functional.conv2d(x, w, padding=1) + shift[None, :, None, None]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bn_stats_tokens_carry_each_channels_distribution_after_bn():
    """With ``bn_stats`` every token also holds its output channel's mean and standard deviation after
    BN, which is what BN makes them on the training data: ``beta`` and ``|gamma|`` (up to eps)."""
    fam = create_family("paper_mnist")
    block = fam.large_block().train()
    with torch.no_grad():
        block.bn1.weight.uniform_(-2, 2)
        block.bn1.bias.uniform_(-1, 1)
    block.bn1.momentum = None  # running statistics = exact averages over the batches seen
    x = torch.randn(512, 6, 14, 14) * 3 + 1
    out = block.bn1(block.conv1(x))
    block.eval()
    state = {k: v[None] for k, v in block.state_dict().items()}
    tok = tokens.encode_source(fam, state, bn_aware=True, bn_stats=True)  # (1, 72, 12)
    assert tok.shape == (1, 72, 12) and tokens.layout(fam, "large", True, True).dim == 12
    torch.testing.assert_close(tok[0, :36, 9], tokens.encode_source(fam, state, bn_aware=True)[0, :36, 9])
    mean, std = tok[0, :36, 10].reshape(6, 6)[:, 0], tok[0, :36, 11].reshape(6, 6)[:, 0]
    torch.testing.assert_close(mean, out.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std, out.std((0, 2, 3)), atol=1e-3, rtol=1e-3)


def test_mixer_follows_the_spec_shapes():
    m = MixerTranslator(72, 9, 36, 9)  # paper defaults: 24 layers, 128, 256, 512
    assert len(m.layers) == 24 and m.embed.out_features == 128
    assert m.layers[0].token_mlp[0].in_features == 72 and m.layers[0].token_mlp[0].out_features == 256
    assert m.layers[0].channel_mlp[0].out_features == 512
    assert m(torch.zeros(2, 72, 9)).shape == (2, 36, 9)


@pytest.mark.parametrize("arch", ["mixer", "mlp", "channel_set"])
def test_translate_compress_save_load(tmp_path, arch):
    fam = create_family("paper_mnist")
    switches = arch == "channel_set"  # the rescale / bn_stats switches round-trip too
    tr = create_translator(arch, fam, bn_aware=True, rescale=switches, bn_stats=switches, depth=2, width=16)
    net = fam.base_network().eval()
    small = tr.translate(net.block.state_dict())
    assert {k: tuple(v.shape) for k, v in small.items()} == {"conv1.weight": (3, 6, 3, 3), "conv2.weight": (6, 3, 3, 3)}
    compressed = tr.compress(net)
    x = torch.randn(3, 1, 28, 28)
    assert compressed(x).shape == (3, 10)
    assert torch.equal(compressed.begin.conv.weight, net.begin.conv.weight)
    tr.save(tmp_path)
    again = Translator.load(tmp_path)
    assert again.config() == tr.config()
    torch.testing.assert_close(again.translate(net.block.state_dict())["conv1.weight"], small["conv1.weight"])


def test_translator_errors_are_one_line_and_say_what_was_expected(tmp_path):
    fam = create_family("paper_mnist")
    tr = create_translator("mixer", fam, depth=1, width=8)
    with pytest.raises(KTError, match="not a paper_mnist base network"):
        tr.compress(create_family("paper_mnist").compressed_network())
    with pytest.raises(KTError, match="choose one of: channel_set, mixer, mlp"):
        create_translator("transformer", fam)
    with pytest.raises(KTError, match="does not hold a saved translator"):
        Translator.load(tmp_path)


def test_compress_file_rejects_bad_networks(tmp_path, monkeypatch):
    from kt_mlflow.steps import compress

    fam = create_family("paper_mnist")
    tr = create_translator("mixer", fam, depth=1, width=8)
    monkeypatch.setattr("kt_mlflow.steps.compress.load_translator", lambda name, device="cpu": tr)
    good = fam.base_network().state_dict()
    torch.save(good, tmp_path / "net.pt")
    counts = compress.compress_file("any", tmp_path / "net.pt", tmp_path / "small.safetensors")
    assert counts["block_before"] == 672 and counts["block_after"] == 324
    assert set(compress.load_state_dict(tmp_path / "small.safetensors")) == set(fam.compressed_network().state_dict())
    torch.save(dict(good, **{"block.conv1.weight": torch.full((6, 6, 3, 3), float("inf"))}), tmp_path / "inf.pt")
    with pytest.raises(KTError, match="NaN or inf"):
        compress.compress_file("any", tmp_path / "inf.pt", tmp_path / "x.pt")
    torch.save(dict(good, **{"last.fc.weight": torch.zeros(10, 5)}), tmp_path / "shape.pt")
    with pytest.raises(KTError, match=r"last.fc.weight has shape \(10, 5\)"):
        compress.compress_file("any", tmp_path / "shape.pt", tmp_path / "x.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(KTError, match="not a state dict"):
        compress.compress_file("any", tmp_path / "list.pt", tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(KTError, match="not a readable state dict"):
        compress.compress_file("any", tmp_path / "junk.pt", tmp_path / "x.pt")


def _random_large_blocks(family, p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(p, *v.shape, generator=g) for k, v in family.large_block().state_dict().items()
             if v.is_floating_point()}
    return {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in state.items()}


@pytest.mark.parametrize("family_name", ["paper_mnist", "wide_mnist", str(FAMILY_FILES / "kernel5.yaml")],
                         ids=["paper_mnist", "wide_mnist", "kernel5"])
def test_channel_set_follows_the_block_symmetries(family_name):
    """Permuting the large block's hidden channels changes nothing; permuting its residual channels
    permutes the small block's residual channels the same way (inputs of conv1, outputs of conv2).
    Across kernel sizes (kernel5: 5x5 into 3x3) with the kernel map too."""
    fam = create_family(family_name)
    tr = create_translator("channel_set", fam, bn_aware=True, depth=2, width=16, kernel_map=fam.kernels_differ)
    with torch.no_grad():  # non-trivial standardisation and kernel map, as after training
        tr.net.in_mean.normal_()
        tr.net.out_std.uniform_(0.5, 2.0)
        if fam.kernels_differ:
            tr.net.core.kernel_map.weight.normal_()
    large = _random_large_blocks(fam, 4)
    base = tr.translate_batch(large)
    hidden = torch.stack([torch.randperm(fam.large_hidden) for _ in range(4)])
    same = tr.translate_batch(BasicBlock.permute_hidden(large, hidden))
    for k in base:
        torch.testing.assert_close(same[k], base[k], rtol=1e-5, atol=1e-5)
    r = torch.randperm(fam.width)
    moved = dict(large)
    moved["conv1.weight"] = large["conv1.weight"][:, :, r]
    for name in ("conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"):
        moved[name] = large[name][:, r]
    out = tr.translate_batch(moved)
    torch.testing.assert_close(out["conv1.weight"], base["conv1.weight"][:, :, r], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["conv2.weight"], base["conv2.weight"][:, r], rtol=1e-5, atol=1e-5)
    # and it is not a constant map: different blocks give different translations
    other = tr.translate_batch(_random_large_blocks(fam, 4, seed=1))
    assert (other["conv1.weight"] - base["conv1.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,bn_stats", [("mixer", False), ("channel_set", False), ("channel_set", True)])
def test_rescaled_translation_follows_the_scale_symmetries(arch, bn_stats):
    """With ``rescale`` the translation is equivariant to the function-preserving channel scalings:
    a residual channel scaled by a (conv1 inputs / a, BN2 affine * a) scales the small block's conv1
    inputs by 1/a and conv2 outputs by a; a hidden channel scaled by b (BN1 affine * b, conv2 inputs / b)
    changes nothing. Without it, the translation does change."""
    fam = create_family("paper_mnist")
    g = torch.Generator().manual_seed(4)
    large = _random_large_blocks(fam, 3)
    a = torch.rand(3, fam.width, generator=g) * 3 + 0.3
    b = torch.rand(3, fam.large_hidden, generator=g) * 3 + 0.3
    moved = dict(large)
    moved["conv1.weight"] = large["conv1.weight"] / a[:, None, :, None, None]
    moved["conv2.weight"] = large["conv2.weight"] / b[:, None, :, None, None]
    for name in ("weight", "bias"):
        moved[f"bn1.{name}"] = large[f"bn1.{name}"] * b
        moved[f"bn2.{name}"] = large[f"bn2.{name}"] * a
    for rescale in (True, False):
        tr = create_translator(arch, fam, bn_aware=True, rescale=rescale, bn_stats=bn_stats, depth=2, width=16)
        base, out = tr.translate_batch(large), tr.translate_batch(moved)
        want = {"conv1.weight": base["conv1.weight"] / a[:, None, :, None, None],
                "conv2.weight": base["conv2.weight"] * a[:, :, None, None, None]}
        close = all(torch.allclose(out[k], want[k], rtol=1e-4, atol=1e-5) for k in want)
        assert close == rescale
    with pytest.raises(KTError, match="bn_aware"):
        create_translator(arch, fam, rescale=True)
    with pytest.raises(KTError, match="bn_aware"):
        create_translator(arch, fam, bn_stats=True)


def test_channel_set_writes_what_the_soft_choice_over_written_kernels_gives():
    """The factorised write equals its textbook form in float64: for each small hidden channel m, the
    choice-weighted sum over large hidden channels h of write([e[h, r], q_m])."""
    from kt_mlflow.translators.channel_set import ChannelSetTranslator

    torch.manual_seed(0)
    net = ChannelSetTranslator(72, 10, 36, 9, src_shapes=((6, 6, 3, 3), (6, 6, 3, 3)),
                               dst_shapes=((3, 6, 3, 3), (6, 3, 3, 3)), depth=2, width=16).double()
    e = torch.randn(4, 6, 6, 16, dtype=torch.float64)
    choice = torch.rand(4, 3, 6, dtype=torch.float64).softmax(-1)
    q = net.queries[None, :, None, None, :].expand(4, 3, 6, 6, -1)
    written = net.write(torch.cat([e[:, None].expand(-1, 3, -1, -1, -1), q], -1))     # (B, M, H, R, 2D)
    want = torch.einsum("bmh,bmhrd->bmrd", choice, written)
    torch.testing.assert_close(net._write(e, choice, net.queries), want, rtol=1e-12, atol=1e-12)


def test_channel_set_edge_layer_is_its_first_layer_on_the_concatenated_means():
    """The edge layer runs each mean through its slice of the first layer's weights and broadcasts
    after; in float64 that is the textbook form, the MLP on [e, row mean, column mean, grid mean]
    concatenated for every edge: values and the gradients of the edges and every weight."""
    from kt_mlflow.translators.channel_set import EdgeLayer

    torch.manual_seed(0)
    layer = EdgeLayer(8, 20, dropout=0.0).double()
    e = torch.randn(3, 5, 4, 8, dtype=torch.float64, requires_grad=True)     # (B, H, R, C): H != R
    x = layer.norm(e)
    pooled = [x, x.mean(2, keepdim=True).expand_as(x), x.mean(1, keepdim=True).expand_as(x),
              x.mean((1, 2), keepdim=True).expand_as(x)]
    want = e + layer.mlp(torch.cat(pooled, -1))
    got = layer(e)
    upstream = torch.randn_like(got)
    params = (e, *layer.parameters())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), params), torch.autograd.grad((want * upstream).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2 * 3 * 6 * 6 * 5, 1 << 20])   # one pair, two pairs, all at once
def test_chunked_choice_gelu_has_the_plain_expressions_values_and_gradients(chunk, monkeypatch):
    """``ChoiceGelu`` (chunks formed in cache, formed again in the backward pass) in float64 against the
    plain broadcast expression: values and the gradients of the edges, the queries and the choice."""
    from kt_mlflow.translators.channel_set import ChoiceGelu

    monkeypatch.setattr(ChoiceGelu, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    edge = torch.randn(5, 6, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)     # (B, H, R, F)
    query = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)          # (M, F)
    choice = torch.randn(5, 3, 6, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    upstream = torch.randn(5, 3, 6, 5, generator=g, dtype=torch.float64)
    got = ChoiceGelu.apply(edge, query, choice)
    grads = torch.autograd.grad((got * upstream).sum(), (edge, query, choice))
    want = torch.einsum("bmh,bmhrf->bmrf", choice, torch.nn.functional.gelu(edge[:, None] + query[None, :, None, None]))
    wants = torch.autograd.grad((want * upstream).sum(), (edge, query, choice))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ChoiceGelu.apply, (edge, query, choice))


def test_channel_set_kernel_map_starts_at_zero_and_adds_the_chosen_edges_linear_view():
    """The kernel map (5x5 into 3x3) is zero at init, so the translator starts as the plain one; trained,
    it adds the soft choice over large hidden channels of a linear map of each edge's own numbers."""
    from kt_mlflow.translators.channel_set import ChannelSetTranslator

    shapes = dict(src_shapes=((6, 6, 5, 5), (6, 6, 5, 5)), dst_shapes=((3, 6, 3, 3), (6, 3, 3, 3)), depth=2, width=16)
    torch.manual_seed(0)
    plain = ChannelSetTranslator(72, 26, 36, 9, **shapes).double()
    torch.manual_seed(0)
    mapped = ChannelSetTranslator(72, 26, 36, 9, kernel_map=True, **shapes).double()
    x = torch.randn(3, 72, 26, dtype=torch.float64)
    torch.testing.assert_close(mapped(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        mapped.kernel_map.weight.normal_()
    # the same soft choice as the plain net, from the same edge features, applied to the raw edges
    conv1, conv2 = x[:, :36].reshape(3, 6, 6, 26), x[:, 36:].reshape(3, 6, 6, 26).transpose(1, 2)
    edges = torch.cat([conv1, conv2], -1)
    e = plain.norm(plain.layers(plain.embed(edges)))
    choice = torch.einsum("mc,bhc->bmh", plain.queries, plain.key(e.mean(2))).div(16 ** 0.5).softmax(-1)
    extra = torch.einsum("bmh,bhrc->bmrc", choice, edges) @ mapped.kernel_map.weight.T      # (B, M, R, 18)
    want = plain(x) + torch.cat([extra[..., :9].reshape(3, 18, 9), extra[..., 9:].transpose(1, 2).reshape(3, 18, 9)], 1)
    torch.testing.assert_close(mapped(x), want, rtol=1e-12, atol=1e-12)
    assert (mapped(x) - plain(x)).abs().max() > 1e-3


@pytest.mark.parametrize("rows,cin,cout", [(1152, 64, 256), (1152, 256, 64), (200, 9, 32)])
def test_onednn_linear_equals_f_linear(rows, cin, cout):
    """The translators' ``Linear`` (oneDNN's float32 CPU product, each gradient one product) computes
    ``F.linear``'s value and gradients to float32 rounding, on 2-D and batched inputs; its output takes
    in-place additions (no view for autograd), as the channel_set edge layers make."""
    from kt_mlflow.translators import linear

    assert linear.available(), "this PyTorch has no oneDNN linear op: the translators fall back to F.linear"
    torch.manual_seed(0)
    x = torch.randn(rows // 8, 8, cin, requires_grad=True)
    w, b = torch.randn(cout, cin, requires_grad=True), torch.randn(cout, requires_grad=True)
    extra = torch.randn(rows // 8, 1, cout, requires_grad=True)
    outs, grads = [], []
    for fn in (linear.linear, torch.nn.functional.linear):
        y = fn(x, w, b)
        y += extra                           # in place, as EdgeLayer adds its mean terms
        outs.append(y)
        grads.append(torch.autograd.grad((y * y.detach().cos()).sum(), [x, w, b, extra]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-4)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert not torch.equal(grads[0][1], torch.zeros_like(w))


def test_onednn_linear_leaves_float64_small_batches_and_layers_to_f_linear(monkeypatch):
    """Float64 and batches of fewer than ``MIN_ROWS`` rows take ``F.linear`` itself (bit for bit), as
    does every call where oneDNN is missing; ``Linear`` keeps ``nn.Linear``'s state dict."""
    from kt_mlflow.translators import linear

    torch.manual_seed(0)
    layer = linear.Linear(12, 7)
    assert set(layer.state_dict()) == {"weight", "bias"}
    small = torch.randn(linear.MIN_ROWS - 1, 12)
    assert torch.equal(layer(small), torch.nn.functional.linear(small, layer.weight, layer.bias))
    wide = layer.double()
    x64 = torch.randn(300, 12, dtype=torch.float64)
    assert torch.equal(wide(x64), torch.nn.functional.linear(x64, wide.weight, wide.bias))
    monkeypatch.setattr(linear, "available", lambda: False)
    x = torch.randn(300, 12, dtype=torch.float64).float()
    layer = linear.Linear(12, 7)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
