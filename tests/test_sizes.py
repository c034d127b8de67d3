"""One translator for many sizes: a channel_set translator trained on pair sets of several hidden widths."""
from pathlib import Path

import pytest
import torch
import yaml

from kt_mlflow import cli
from kt_mlflow.blocks import create_family, family_spec
from kt_mlflow.config import CompressConfig, GenerateConfig, TrainConfig
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import network_accuracy
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation.evaluator import EvalSettings, run_comparison
from kt_mlflow.pairs.generate import generate_pairs
from kt_mlflow.pairs.store import load_split
from kt_mlflow.training.train import size_groups, train_translator
from kt_mlflow.translators import Translator, create_translator
from kt_mlflow.translators.swap import compress_checkpoint

FAMILY = create_family("paper_mnist")
SIZES = [[6, 3], [8, 4]]


def _large(family, p: int, seed: int = 0):
    """``p`` random large blocks of ``family``, stacked (every key, so one of them is a whole block)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(p, *v.shape, generator=g) if v.is_floating_point() else v.expand(p)
             for k, v in family.large_block().state_dict().items()}
    return {k: (v.abs() + 0.5 if "running_var" in k else v) for k, v in state.items()}


def test_a_multi_size_translator_writes_every_size_asked_and_refuses_what_it_cannot():
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=16, sizes=SIZES)
    assert tr.sizes == ((6, 3), (8, 4)) and tr.net.core.max_small_hidden == 4
    for large_hidden, small_hidden in ((6, 3), (6, 2), (8, 4), (12, 3), (8, 1)):   # trained and unseen sizes
        out = tr.translate_batch(_large(FAMILY.resized(large_hidden), 2), small_hidden=small_hidden)
        assert tuple(out["conv1.weight"].shape) == (2, small_hidden, 6, 3, 3)
        assert tuple(out["conv2.weight"].shape) == (2, 6, small_hidden, 3, 3)
        assert all(torch.isfinite(v).all() for v in out.values())
    # without small_hidden: the family's own small size, whatever the large block's
    assert tuple(tr.translate_batch(_large(FAMILY.resized(8), 1))["conv1.weight"].shape) == (1, 3, 6, 3, 3)
    one = {k: v[0] for k, v in _large(FAMILY.resized(12), 1).items()}
    assert tuple(tr.translate(one, small_hidden=4)["conv2.weight"].shape) == (6, 4, 3, 3)
    with pytest.raises(KTError, match="small hidden widths 1 to 4, not 5"):
        tr.translate(one, small_hidden=5)
    single = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=16)
    with pytest.raises(KTError, match="hidden 3 from hidden 6 only, not 2 from 6; train one on pair sets of several"):
        single.translate({k: v[0] for k, v in _large(FAMILY, 1).items()}, small_hidden=2)
    with pytest.raises(KTError, match="only the channel_set translator serves several sizes"):
        create_translator("mixer", FAMILY, depth=1, width=16, sizes=SIZES)


def test_each_size_keeps_the_channel_symmetries():
    """At every size (trained or not) the large block's hidden order changes nothing."""
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=2, width=16, sizes=SIZES)
    fam = FAMILY.resized(12)
    large = _large(fam, 3)
    perm = torch.stack([torch.randperm(12) for _ in range(3)])
    moved = fam.prototype("large").permute_hidden(large, perm)
    for m in (2, 4):
        base, same = tr.translate_batch(large, small_hidden=m), tr.translate_batch(moved, small_hidden=m)
        for k in base:
            torch.testing.assert_close(same[k], base[k], rtol=1e-5, atol=1e-5)
    # sizes are not one map cut to length: the size embedding moves the shared channels
    two, four = tr.translate_batch(large, small_hidden=2), tr.translate_batch(large, small_hidden=4)
    assert (two["conv1.weight"] - four["conv1.weight"][:, :2]).abs().max() > 1e-4


def test_saved_sizes_come_back(tmp_path):
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=16, sizes=SIZES)
    tr.save(tmp_path / "t")
    back = Translator.load(tmp_path / "t")
    assert back.sizes == tr.sizes
    large = _large(FAMILY.resized(8), 2)
    for k, v in tr.translate_batch(large, small_hidden=4).items():
        torch.testing.assert_close(back.translate_batch(large, small_hidden=4)[k], v)


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory, tiny_pairs):
    """Pairs of paper_mnist at (6 -> 3) (the session's tiny pairs) and, from a family file of the same
    name, (8 -> 4), on digits."""
    root = tmp_path_factory.mktemp("sizes")
    (root / "paper_mnist_8.yaml").write_text(yaml.safe_dump(family_spec(FAMILY.resized(8, 4))))
    generate_pairs(GenerateConfig(output=str(root / "eight"), family=str(root / "paper_mnist_8.yaml"), dataset="digits",
                                  n_pairs=6, n_val=3, members=9, workers=1, epochs=1, small_epochs=1))
    return root, [tiny_pairs, root / "eight"]


def test_training_on_two_sizes_validates_each_and_serves_both(two_sizes):
    _, folders = two_sizes
    trains, vals = [load_split(f, "train") for f in folders], [load_split(f, "val") for f in folders]
    data = load_dataset("digits")
    cfg = TrainConfig(recipe="best", epochs=2, val_every=1, batch_size=4, depth=1, width=16, channel_hidden=16,
                      task_images=8, device="cpu")
    result = train_translator(cfg, FAMILY, trains, vals, data, progress=False)
    best, tr = result.best, result.translator
    assert tr.sizes == ((6, 3), (8, 4))
    assert best["val_acc_mean"] == pytest.approx((best["val_acc_mean_6to3"] + best["val_acc_mean_8to4"]) / 2)
    # each size's score is what its held-out networks reach with the kept translator at that size
    for (h, m), val in zip(tr.sizes, vals):
        fam = FAMILY.resized(h, m)
        small = tr.translate_batch(val.part("large"), small_hidden=m)
        acc = network_accuracy(fam, val.part("begin"), small, val.part("last"), data)
        assert float(acc.mean()) == pytest.approx(best[f"val_acc_mean_{h}to{m}"], abs=1e-3)
    # evaluation picks the pairs' size, baselines included
    df = run_comparison(tr, EvalSettings(pairs=str(folders[1]), dataset="digits", baselines=["random", "l1"]))
    assert set(df["method"]) >= {"kt", "random", "l1"} and len(df[df["method"] == "kt"]) == 3
    assert df[df["method"] == "kt"]["accuracy"].mean() == pytest.approx(best["val_acc_mean_8to4"], abs=1e-3)


def test_size_groups_refuse_other_families_and_a_size_twice(two_sizes):
    _, folders = two_sizes
    six, eight = load_split(folders[0], "train"), load_split(folders[1], "train")
    assert [(f.large_hidden, f.small_hidden) for f, _ in size_groups(FAMILY, [six, eight])] == [(6, 3), (8, 4)]
    with pytest.raises(KTError, match=r"the same size \(6, 3\); give each size once"):
        size_groups(FAMILY, [six, six])
    with pytest.raises(KTError, match="differ in more than their hidden widths"):
        size_groups(create_family("wide_mnist"), [six, eight])
    with pytest.raises(KTError, match="--pairs 'a,,b' has an empty item"):
        TrainConfig(pairs="a,,b").validate()


def test_kt_train_on_two_sizes_then_compress_at_a_size_never_trained(two_sizes, tmp_path, local_tracking):
    """`kt train --pairs A,B` registers one translator; `kt compress --small-hidden 2` writes a block of
    hidden 2 (never trained) from a network of the 8-wide set, and `--block` does the same by module path."""
    import mlflow

    root, folders = two_sizes
    assert cli.main(["train", "--pairs", ",".join(map(str, folders)), "--dataset", "digits", "--recipe", "best",
                     "--epochs", "1", "--batch-size", "4", "--depth", "1", "--width", "8", "--channel-hidden", "8",
                     "--task-images", "8", "--registered-name", "kt-sizes"]) == 0
    run = mlflow.search_runs(experiment_names=["kt-paper_mnist"], output_format="list")[0]
    assert {"best_val_acc_mean_6to3", "best_val_acc_mean_8to4"} <= set(run.data.metrics)
    assert len(run.inputs.dataset_inputs) >= 2   # both pair sets logged as inputs
    val = load_split(folders[1], "val")
    parts = {f"{part}.{k}": v[0] for part in ("begin", "block", "last")
             for k, v in val.part("large" if part == "block" else part).items()}
    net = {k: parts[k] for k in FAMILY.resized(8, 4).base_network().state_dict()}   # module order, as torch.save writes
    torch.save(net, tmp_path / "net.pt")
    assert cli.main(["compress", "--model", "kt-sizes", "--input", str(tmp_path / "net.pt"), "--output",
                     str(tmp_path / "small.pt"), "--small-hidden", "2"]) == 0
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    assert tuple(small["block.conv1.weight"].shape) == (2, 6, 3, 3)
    compressed = create_family("paper_mnist").resized(8, 2).compressed_network()
    compressed.load_state_dict(small)   # a complete network of the new size
    assert cli.main(["compress", "--model", "kt-sizes", "--input", str(tmp_path / "net.pt"), "--output",
                     str(tmp_path / "by_path.pt"), "--block", "block", "--small-hidden", "2"]) == 0
    by_path = torch.load(tmp_path / "by_path.pt", weights_only=True)
    torch.testing.assert_close(by_path["block.conv1.weight"], small["block.conv1.weight"])
    assert yaml.safe_load(Path(f"{tmp_path / 'by_path.pt'}.family.yaml").read_text())["small"]["hidden"] == 2
    with pytest.raises(KTError, match="--small-hidden must be >= 1"):
        CompressConfig(model="m", input="i", output=str(tmp_path / "o.pt"), small_hidden=0).validate()


def test_compress_checkpoint_reads_the_users_block_size():
    tr = create_translator("channel_set", FAMILY, bn_aware=True, depth=1, width=8, sizes=SIZES)
    user = {f"stage.{k}": v[0] for k, v in _large(FAMILY.resized(12), 1).items()}
    user["num_batches_tracked"] = torch.tensor(1)
    out = compress_checkpoint(user, "stage", tr, small_hidden=5 - 1)
    assert tuple(out["stage.conv1.weight"].shape) == (4, 6, 3, 3) and "num_batches_tracked" in out


def test_two_ranks_split_every_size_and_walk_the_same_batches(two_sizes, tmp_path):
    """Under torchrun each rank holds every r-th pair of each size; per global batch (one size) the
    ranks' rows rebuild it, and one pass covers every pair of every size once."""
    import torch.distributed as dist

    from kt_mlflow.distributed import World
    from kt_mlflow.training.train import TranslatorFit

    _, folders = two_sizes
    sets = [load_split(f, "train") for f in folders]
    cfg = TrainConfig(recipe="equivariant", batch_size=4, depth=1, width=8, device="cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)  # for DDP
    try:
        fits = [TranslatorFit(cfg, FAMILY, sets, None, torch.device("cpu"), World(r, 2, r, 2)) for r in (0, 1)]
    finally:
        dist.destroy_process_group()
    assert [[len(g.source) for g in f.groups] for f in fits] == [[4, 3], [4, 3]]
    seen = {0: [], 1: []}
    for shares in zip(*(f.shares(torch.Generator().manual_seed(3)) for f in fits)):
        assert len({s.group for s in shares}) == 1
        rebuilt = torch.full((shares[0].total,), -1)
        for r, share in enumerate(shares):
            rebuilt[share.pos] = share.rows * 2 + r
        assert (rebuilt >= 0).all()
        seen[shares[0].group] += rebuilt.tolist()
    assert sorted(seen[0]) == list(range(8)) and sorted(seen[1]) == list(range(6))
