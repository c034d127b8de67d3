"""The engine: each member of a stacked network trains exactly as it would alone, whatever the optimiser."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kt_mlflow.blocks import create_family
from kt_mlflow.config import GenerateConfig, PairSchedule
from kt_mlflow.data import load_dataset
from kt_mlflow.pairs.make import train_pairs


def _float64_digits(n: int = 96):
    data = load_dataset("digits")
    return dataclasses.replace(data, train_x=data.train_x[:n].double(), train_y=data.train_y[:n],
                               test_x=data.test_x[:64].double(), test_y=data.test_y[:64])


@pytest.mark.parametrize("optimizer, lr, lr_schedule", [("sgd", 0.01, "cosine"), ("adam", 0.003, "constant"),
                                                         ("adamw", 0.003, "cosine")])
def test_stacked_members_train_as_they_would_alone(optimizer, lr, lr_schedule):
    family, data = create_family("paper_mnist"), _float64_digits()
    schedule = PairSchedule(epochs=2, small_epochs=1, lr=lr, batch_size=32, optimizer=optimizer,
                            weight_decay=0.01, lr_schedule=lr_schedule)
    together = train_pairs(family, [3, 5], data, schedule, torch.device("cpu"), kernels="torch")
    for i, seed in enumerate((3, 5)):
        alone = train_pairs(family, [seed], data, schedule, torch.device("cpu"), kernels="torch")
        for part in ("begin", "large", "last", "small"):
            for key, value in alone[part][0].items():
                torch.testing.assert_close(together[part][i][key], value, rtol=1e-9, atol=1e-11)
    sgd = train_pairs(family, [3], data, dataclasses.replace(schedule, optimizer="sgd", lr=0.01),
                      torch.device("cpu"), kernels="torch")
    assert optimizer == "sgd" or not torch.allclose(sgd["large"][0]["conv1.weight"], together["large"][0]["conv1.weight"])


def test_new_protocol_options_keep_earlier_settings_and_enter_the_settings_when_used():
    plain = GenerateConfig().settings()
    assert "optimizer" not in plain and "lr_schedule" not in plain and "weight_decay" not in plain
    adam = GenerateConfig(optimizer="adam", lr=0.001, lr_schedule="cosine").settings()
    assert adam["optimizer"] == "adam" and adam["lr_schedule"] == "cosine" and "weight_decay" not in adam
    assert GenerateConfig(optimizer="adam").folder() != GenerateConfig().folder()


def test_measuring_accuracy_leaves_every_modules_mode_as_it_was():
    from kt_mlflow.engine import accuracy_members

    family, data = create_family("paper_mnist"), load_dataset("digits")
    net = family.compressed_network(2).train()
    net.begin.eval()                                   # frozen, as fine-tuning keeps it
    before = {name: m.training for name, m in net.named_modules()}
    accuracy_members(net, data.test_x[:16], data.test_y[:16], 2)
    assert {name: m.training for name, m in net.named_modules()} == before and not net.begin.training


@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_networks_sharing_a_begin_block_are_measured_as_each_alone(kernels):
    from kt_mlflow.blocks.layers import set_interleaved
    from kt_mlflow.engine import accuracy_members, shared_begin_accuracy

    family, data = create_family("paper_mnist"), load_dataset("digits")
    torch.manual_seed(0)
    base = set_interleaved(family.base_network(3), kernels == "native").to(memory_format=torch.channels_last)
    small = family.small_block(3).to(memory_format=torch.channels_last)
    comp = set_interleaved(type(base)(base.begin, small, base.last, 3), kernels == "native")
    base.train()
    comp.block.train()
    x, y = data.test_x[:300], data.test_y[:300]   # chunks of 128: a short last one
    both = shared_begin_accuracy([base, comp], x, y, 3, chunk=128)
    alone = [accuracy_members(net, x, y, 3, chunk=128) for net in (base, comp)]
    assert all(torch.equal(a, b) for a, b in zip(both, alone)) and not torch.equal(both[0], both[1])
    assert base.training and comp.block.training   # modes come back
    if kernels == "native":   # the default chunk (32 on a CPU) measures the same bits
        assert all(torch.equal(a, b) for a, b in zip(shared_begin_accuracy([base, comp], x, y, 3), both))
    with pytest.raises(ValueError, match="share one begin block"):
        shared_begin_accuracy([base, family.compressed_network(3)], x, y, 3)


def test_a_protocol_mixture_trains_each_shard_by_its_drawn_protocol(tmp_path):
    from kt_mlflow.pairs.generate import generate_pairs, shard_protocol
    from kt_mlflow.pairs.store import load_split, sidecars

    common = dict(dataset="digits", n_pairs=6, n_val=2, members=1, epochs=1, small_epochs=1, workers=1)
    mixed = GenerateConfig(output=str(tmp_path / "mixed"), protocols="base,adam", **common)
    generate_pairs(mixed)
    metas = sidecars(tmp_path / "mixed", "train") + sidecars(tmp_path / "mixed", "val")
    drawn = [m["pairs"][0]["protocol"] for m in metas]
    assert set(drawn) == {"base", "adam"} and all(m["settings"]["protocols"] == "base,adam" for m in metas)
    assert drawn[0] == shard_protocol(mixed, "train", 0)
    adam = GenerateConfig(output=str(tmp_path / "adam"), optimizer="adam", lr=0.001, **common)
    generate_pairs(adam)
    base = GenerateConfig(output=str(tmp_path / "base"), **common)
    generate_pairs(base)
    pure = {name: load_split(tmp_path / name, "train") for name in ("adam", "base")}
    got = load_split(tmp_path / "mixed", "train")
    for i, name in enumerate(drawn[:6]):                 # each mixed pair is the pure protocol's pair, bit for bit
        for key, value in got.tensors.items():
            assert torch.equal(value[i], pure[name].tensors[key][i]), (i, name, key)
    with pytest.raises(Exception, match="'other_seeds' is no training protocol of a pair"):
        GenerateConfig(protocols="base,other_seeds").validate()


def test_patch_moments_are_kept_for_the_same_images_only(monkeypatch):
    from kt_mlflow import engine

    begin = create_family("paper_mnist").begin(2)
    made = []
    monkeypatch.setattr(begin, "patch_moments", lambda images: made.append(len(images)) or (images.sum(), images.clone()))
    x = torch.randn(6, 1, 28, 28)
    flipped = torch.cat([x, x.flip(-1)])
    first = engine._moments(begin, x, flipped, True)
    assert engine._moments(begin, x, torch.cat([x, x.flip(-1)]), True) is first and len(made) == 1   # kept
    engine._moments(begin, x, x, False)                            # without flips: another table
    x.mul_(2)                                                      # the same tensor, new values
    again = engine._moments(begin, x, torch.cat([x, x.flip(-1)]), True)
    assert len(made) == 3 and torch.equal(again[1], torch.cat([x, x.flip(-1)]))
    other = x.clone()                                              # the same values, another dataset
    engine._moments(begin, other, other, False)
    assert len(made) == 4
    del x, other, again, first
    import gc
    gc.collect()
    assert engine._MOMENTS == {}                                   # freed with its dataset


def test_a_second_shard_in_one_process_trains_as_the_first():
    family, data = create_family("paper_mnist"), _float64_digits(64)
    schedule = PairSchedule(epochs=1, small_epochs=1, batch_size=32)
    first = train_pairs(family, [1, 2], data, schedule, torch.device("cpu"), kernels="torch")
    second = train_pairs(family, [1, 2], data, schedule, torch.device("cpu"), kernels="torch")  # kept moments
    for part in ("begin", "large", "last", "small"):
        for a, b in zip(first[part], second[part]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(first["base_acc"], second["base_acc"])
