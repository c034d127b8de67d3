"""Your own model: a hand-written torchvision-style ResNet (its own names), trained briefly on real MNIST,
one block translated by module path (``kt compress --block``) or swapped in place (``swap_block``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO
from torch import nn

import kt_mlflow
from kt_mlflow.blocks import create_family, family_spec
from kt_mlflow.config import CompressConfig
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import network_accuracy
from kt_mlflow.errors import KTError
from kt_mlflow.steps.compress import load_state_dict, run_compress
from kt_mlflow.tracking.models import log_translator
from kt_mlflow.translators import create_translator
from kt_mlflow.translators.swap import TokenMLPBlock, compress_checkpoint, match_block


class Residual(nn.Module):
    """torchvision's BasicBlock (no downsample), with this user's own names."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_a, self.norm_a = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv_b, self.norm_b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.norm_b(self.conv_b(F.relu(self.norm_a(self.conv_a(x))))) + x)


class UserResNet(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(*[Residual(6) for _ in range(blocks)])
        self.head = nn.Sequential(nn.Conv2d(6, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(12 * 7 * 7, 10))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.test_x).argmax(1) == data.test_y).float().mean() * 100)


@pytest.fixture(scope="module")
def trained():
    """Two ResNets (one and two blocks) trained for one epoch on 4,000 real MNIST images, and a translator."""
    torch.manual_seed(0)
    data = load_dataset("mnist")
    models = {}
    for blocks in (1, 2):
        model = UserResNet(blocks)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for lo in range(0, 4000, 64):
            loss = F.cross_entropy(model(data.train_x[lo: lo + 64]), data.train_y[lo: lo + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[blocks] = model.eval()
    fam = create_family("paper_mnist")
    translator = create_translator("channel_set", fam, bn_aware=True, depth=1, width=16)
    return data, models, translator


def test_swapped_accuracy_equals_what_kt_reports_for_the_same_weights(trained):
    """One block: the user's network is begin + block + last under other names; its swapped accuracy is
    the accuracy kt's engine (what `kt evaluate` reports) gives the same begin, translated block and last."""
    data, models, translator = trained
    model = models[1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    user = UserResNet(1)
    user.load_state_dict(state)
    swapped = kt_mlflow.swap_block(user, "layers.0", translator)
    assert type(swapped.layers[0]).__name__ == "BottleneckBlock"
    fam = translator.family
    begin = {k: v[None] for k, v in zip(fam.begin().state_dict(), [state[k] for k in state if k.startswith("stem.")])}
    last = {k: v[None] for k, v in zip(fam.last().state_dict(), [state[k] for k in state if k.startswith("head.")])}
    small = {k: v[None] for k, v in swapped.layers[0].state_dict().items()}
    kt_acc = float(network_accuracy(fam, begin, small, last, data)[0])
    assert accuracy(swapped, data) == pytest.approx(kt_acc, abs=1e-3)  # the same images right (one is 0.05)
    assert accuracy(models[1], data) > 80  # the user's own network really learned MNIST


def test_kt_compress_block_keeps_the_other_keys_and_equals_swap_block(trained, tmp_path, local_tracking):
    data, models, translator = trained
    model = models[2]
    name = "kt-user-resnet"
    example = {k: v[None] for k, v in translator.family.large_block().state_dict().items()}
    version = log_translator(translator, example, name)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = run_compress(CompressConfig(model=f"models:/{name}/{version}", input=str(tmp_path / "model.pt"),
                                      output=str(tmp_path / "small.pt"), block="layers.1"))
    new = load_state_dict(tmp_path / "small.pt")
    old = model.state_dict()
    assert {k: v for k, v in new.items() if not k.startswith("layers.1.")}.keys() == \
        {k for k in old if not k.startswith("layers.1.")}
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("layers.1."))
    assert sorted(k for k in new if k.startswith("layers.1.")) == ["layers.1.conv1.weight", "layers.1.conv2.weight"]
    assert out["block_before"] > out["block_after"] == 324
    family = yaml.safe_load((tmp_path / "small.pt.family.yaml").read_text())
    assert family == family_spec(translator.family)
    # The written checkpoint loads into the user's model with the small block in place, and computes
    # what swap_block's model computes.
    user = UserResNet(2)
    user.load_state_dict(old)
    swapped = kt_mlflow.swap_block(user, "layers.1", kt_mlflow.load_translator(f"models:/{name}/{version}"))
    rebuilt = UserResNet(2)
    rebuilt.layers[1] = create_family(str(tmp_path / "small.pt.family.yaml")).small_block()
    rebuilt.load_state_dict(new)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(data.test_x[:256]), swapped(data.test_x[:256]))
    assert accuracy(rebuilt, data) == accuracy(swapped, data)


def test_a_block_of_another_structure_is_one_line_saying_found_and_expected(trained):
    data, models, translator = trained
    state = models[2].state_dict()
    with pytest.raises(KTError, match=r"block stem has 6 tensors .*expected a paper_mnist large block") as err:
        compress_checkpoint(state, "stem", translator)
    assert "\n" not in str(err.value)
    with pytest.raises(KTError, match="no tensors under 'layer9' in the checkpoint; its top-level modules are head, layers"):
        compress_checkpoint(state, "layer9", translator)
    with pytest.raises(KTError, match="has no submodule 'layers.7'"):
        kt_mlflow.swap_block(models[2], "layers.7", translator)
    wide = {k: torch.zeros(8, *v.shape[1:]) if k.endswith("conv_a.weight") else v
            for k, v in models[2].layers[0].state_dict().items()}
    with pytest.raises(KTError, match=r"conv_a.weight has shape \(8, 6, 3, 3\) where conv1.weight \(6, 6, 3, 3\) belongs"):
        match_block(wide, translator.family, "block layers.0")


def test_a_transformer_mlp_block_with_linear_layers_is_swapped_on_its_tokens():
    """An MLP block written with nn.Linear on (B, N, d) tokens: matched by shape, swapped for a token block."""
    fam = create_family(str(REPO / "projects" / "families" / "mlp_patch.yaml"))

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

        def forward(self, x):
            return x + self.mlp(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Mixer()])

        def forward(self, x):
            return self.blocks[0](x)

    torch.manual_seed(3)
    net = Net()
    tr = create_translator("mixer", fam, bn_aware=True, depth=1, width=16)
    large = match_block(net.blocks[0].state_dict(), fam, "blocks.0")
    assert tuple(large["fc1.weight"].shape) == (64, 16, 1, 1)
    want = tr.translate(large)
    swapped = kt_mlflow.swap_block(net, "blocks.0", tr)
    assert isinstance(swapped.blocks[0], TokenMLPBlock)
    x = torch.randn(2, 16, 16)  # (batch, tokens, d)
    block = fam.small_block().eval()
    block.load_state_dict(want)
    grid = x.transpose(1, 2).reshape(2, 16, 4, 4)  # the same tokens in kt's (B, C, H, W) layout
    with torch.no_grad():
        ref = block(grid).reshape(2, 16, 16).transpose(1, 2)
        torch.testing.assert_close(swapped(x), ref, rtol=1e-5, atol=1e-5)
