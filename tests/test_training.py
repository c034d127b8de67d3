from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch

from kt_mlflow.blocks import create_family, flatten_block
from kt_mlflow.config import PairSchedule, TrainConfig
from kt_mlflow.data import load_dataset
from kt_mlflow.engine import network_accuracy
from kt_mlflow.errors import KTError
from kt_mlflow.evaluation.finetune import finetune_curves
from kt_mlflow.pairs.store import load_split
from kt_mlflow.recipes import RECIPES
from kt_mlflow.training.augment import mask_and_noise
from kt_mlflow.training.task_loss import TaskLoss, perturb_params
from kt_mlflow.training.train import NonFiniteLoss, train_translator

TINY = dict(depth=1, width=16, token_hidden=32, channel_hidden=32, val_every=2, device="cpu")


@pytest.fixture(scope="module")
def setup(tiny_pairs):
    return (create_family("paper_mnist"), load_split(tiny_pairs, "train"), load_split(tiny_pairs, "val"),
            load_dataset("digits"))


def test_masking_and_noise_have_the_asked_strength():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    assert abs(float((mask_and_noise(x, 0.3, 0.0) == 0).float().mean()) - 0.3) < 0.01
    assert abs(float((mask_and_noise(x, 0.0, 0.2) - 1).std()) - 0.2) < 0.01
    for bad, flag in (((1.0, 0.0, "source"), "--mask-ratio"), ((-0.1, 0.0, "source"), "--mask-ratio"),
                      ((0.1, -1.0, "source"), "--noise-std"), ((0.1, 0.1, "nowhere"), "--augment-on")):
        with pytest.raises(KTError, match=flag):
            TrainConfig(mask_ratio=bad[0], noise_std=bad[1], augment_on=bad[2]).validate()


def test_training_lowers_the_loss_and_keeps_the_best_translator(setup):
    family, train, val, data = setup
    result = train_translator(TrainConfig(epochs=6, **TINY), family, train, val, data, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    validated = [h for h in result.history if "val_acc_mean" in h]
    assert [i for i, h in enumerate(result.history) if "val_acc_mean" in h] == [1, 3, 5]
    assert result.best["val_acc_mean"] == max(h["val_acc_mean"] for h in validated)
    # the kept translator is the best one: evaluating it again gives the logged best score
    small = result.translator.translate_batch(val.part("large"))
    acc = network_accuracy(family, val.part("begin"), small, val.part("last"), data)
    assert abs(float(acc.mean()) - result.best["val_acc_mean"]) < 1e-3


def test_select_holdout_picks_the_epoch_on_held_out_training_pairs(setup):
    family, train, val, data = setup
    cfg = TrainConfig(epochs=4, select_holdout=3, **TINY)
    result = train_translator(cfg, family, train, val, data, progress=False)
    held = train.subset(torch.arange(len(train) - 3, len(train)))
    acc = network_accuracy(family, held.part("begin"), result.translator.translate_batch(held.part("large")),
                           held.part("last"), data)
    assert abs(float(acc.mean()) - result.best["val_acc_mean"]) < 1e-3
    with pytest.raises(KTError, match="leaves no training pairs"):
        train_translator(TrainConfig(epochs=1, select_holdout=len(train), **TINY), family, train, val, data,
                         progress=False)


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - {"paper"}))
def test_every_recipe_trains(setup, recipe):
    family, train, val, data = setup
    result = train_translator(TrainConfig(recipe=recipe, epochs=2, **TINY), family, train, val, data, progress=False)
    assert np.isfinite(result.history[-1]["train_loss"])
    r = RECIPES[recipe]
    assert ("task_loss" in result.history[-1]) == (r.distill > 0 or r.feature_match > 0)
    assert result.translator.arch == (r.arch or "mixer")


def test_grad_clip_cuts_every_step_and_paper_does_not_clip(setup, monkeypatch):
    """``recipe_grad_clip``: every step's gradient norm is cut to at most the recipe's value; ``paper``
    (Adam as published) never clips; ``best`` clips at 1."""
    family, train, val, data = setup
    seen, real = [], torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):  # record each step's norm before and after the real clipping
        params = list(params)
        before = float(real(params, max_norm))
        seen.append((before, float(torch.cat([p.grad.flatten() for p in params]).norm()), max_norm))
        return torch.tensor(before)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train_translator(TrainConfig(recipe="paper", epochs=1, **TINY), family, train, val, data, progress=False)
    assert seen == []
    assert RECIPES["best"].as_params()["recipe_grad_clip"] == 1.0
    # ``best`` with a tiny limit (a recipe's name must be one of the config's choices, so patch ``best`` itself)
    monkeypatch.setitem(RECIPES, "best", replace(RECIPES["best"], grad_clip=1e-3))
    train_translator(TrainConfig(recipe="best", epochs=1, batch_size=4, **TINY), family, train, val, data,
                     progress=False)
    assert len(seen) == -(-len(train) // 4) and {m for *_, m in seen} == {1e-3}
    assert min(before for before, *_ in seen) > 1e-3  # every step was cut ...
    assert all(abs(after - 1e-3) < 1e-6 for _, after, _ in seen)  # ... to exactly the limit


def _check_by_hand(family, loss, kl, feat, nets, small, images):
    """Both terms of ``TaskLoss`` computed with ordinary modules: each base network in ``nets``
    (per pair: begin, large, last states) with its own translated block ``small[j]``."""
    kls, feats = [], []
    with torch.no_grad():
        for j, states in enumerate(nets):
            base = family.base_network().eval()
            for part, state in zip(("begin", "block", "last"), states):
                getattr(base, part).load_state_dict(state)
            block = family.small_block().eval()
            block.load_state_dict({k: v[j] for k, v in small.items()})
            f = base.begin(images)
            student_feat, teacher_feat = block(f), base.block(f)
            student, teacher = base.last(student_feat), base.last(teacher_feat)
            kls.append(torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                                  reduction="sum"))
            feats.append((student_feat - teacher_feat)[:, :, ::2, ::2].pow(2).sum())  # where the last block reads
    n = len(nets) * len(images)
    torch.testing.assert_close(kl, torch.stack(kls).sum() / n, rtol=1e-4, atol=1e-5)
    n_feat = n * family.width * 7 * 7
    torch.testing.assert_close(feat, torch.stack(feats).sum() / n_feat / loss.out_scale, rtol=1e-4, atol=1e-6)


def _bank_images(data, pick):
    """The images a ``TaskLoss(bank=40, seed=3)`` draws with indices ``pick``."""
    return data.train_x[torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(3))[:40]][pick]


def test_task_bank_is_a_train_option(setup):
    """``kt train --task-bank N``: N training images per pair in the task loss's bank."""
    from kt_mlflow.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--task-bank", "40"]))
    assert cfg.task_bank == 40
    family, train, _, data = setup
    assert TaskLoss(family, train, data, torch.device("cpu"), bank=cfg.task_bank, seed=0).pre.shape[1] == 40
    with pytest.raises(KTError, match="--task-bank"):
        TrainConfig(task_bank=0).validate()


def test_task_loss_is_each_pairs_own_network(setup):
    """Both terms equal a hand computation with ordinary modules: the pair's own begin/last around the
    translated block, its own base network as teacher, its large block's output as feature target."""
    family, train, _, data = setup
    loss = TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3)
    idx = torch.tensor([5, 2])
    small = {k: torch.randn(2, *v.shape) * 0.2 for k, v in family.small_block().state_dict().items()}
    kl, feat = loss(small, idx, 12, torch.Generator().manual_seed(9))
    images = _bank_images(data, torch.randint(40, (12,), generator=torch.Generator().manual_seed(9)))
    nets = [[{k: v[i] for k, v in train.part(name).items()} for name in ("begin", "large", "last")] for i in idx.tolist()]
    _check_by_hand(family, loss, kl, feat, nets, small, images)
    # A teacher given explicitly (here: the pairs' own large blocks) is computed on the fly, same values.
    own = {k: v[idx] for k, v in train.part("large").items()}
    again = loss(small, idx, 12, torch.Generator().manual_seed(9), own)
    torch.testing.assert_close(again[0], kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again[1], feat, rtol=1e-4, atol=1e-6)
    # ... and a different teacher gives a different target
    moved = loss(small, idx, 12, torch.Generator().manual_seed(9), perturb_params(own, 0.5, torch.Generator()))
    assert abs(float(moved[1] - feat)) > 1e-4


def test_context_perturbation_is_a_network_with_other_begin_and_last_blocks(setup):
    """With ``context > 0`` both terms are those of a real network whose begin BN affine (scale a, shift
    d on the pre-ReLU output: gamma' = a gamma, beta' = a beta + d) and last block were perturbed, and
    whose teacher is recomputed: the shortcut on stored pre-ReLU features is exact."""
    family, train, _, data = setup
    loss = TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3, context=0.3)
    idx = torch.tensor([4, 1])
    small = {k: torch.randn(2, *v.shape) * 0.2 for k, v in family.small_block().state_dict().items()}
    kl, feat = loss(small, idx, 12, torch.Generator().manual_seed(9))
    # Replay the generator's draws in the loss's order: images, begin scale, begin shift, last block.
    gen = torch.Generator().manual_seed(9)
    images = _bank_images(data, torch.randint(40, (12,), generator=gen))
    c = family.width
    scale = (1 + 0.3 * torch.randn((2, 1, c, 1, 1), generator=gen)).clamp_min(0.1).view(2, c)
    shift = 0.3 * torch.randn((2, 1, c, 1, 1), generator=gen).view(2, c) * loss.pre_std[idx]
    last = perturb_params({k: v[idx] for k, v in train.part("last").items()}, 0.3, gen)
    nets = []
    for j, i in enumerate(idx.tolist()):
        begin = {k: v[i].clone() for k, v in train.part("begin").items()}
        begin["bn.bias"] = begin["bn.bias"] * scale[j] + shift[j]
        begin["bn.weight"] = begin["bn.weight"] * scale[j]
        nets.append([begin, {k: v[i] for k, v in train.part("large").items()}, {k: v[j] for k, v in last.items()}])
    _check_by_hand(family, loss, kl, feat, nets, small, images)
    # and it is not the unperturbed network's loss
    plain = TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3)(small, idx, 12,
                                                                                torch.Generator().manual_seed(9))
    assert abs(float(plain[0] - kl)) > 1e-4


def test_task_loss_layouts_agree_float64(setup, monkeypatch):
    """On a CPU the task loss runs the native kernels, members interleaved; in float64 its losses, the
    gradients reaching the translated blocks and its banks equal the grouped-convolution layout's."""
    import dataclasses

    from kt_mlflow.blocks.native import available
    from kt_mlflow.training import task_loss

    assert available(), "the native kernels did not build (is g++ installed?)"
    family, train, _, data = setup
    train64 = type(train)(train.settings, {k: v.double() for k, v in train.tensors.items()}, train.records)
    data64 = dataclasses.replace(data, train_x=data.train_x.double())
    idx = torch.tensor([5, 2, 7])
    small = {k: torch.randn(3, *v.shape, dtype=torch.float64) * 0.2 for k, v in family.small_block().state_dict().items()}
    teacher = perturb_params({k: v[idx] for k, v in train64.part("large").items()}, 0.2, torch.Generator().manual_seed(1))
    runs = []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for native in (True, False):
            monkeypatch.setattr(task_loss, "use_native", lambda *a, on=native, **k: on)
            loss = TaskLoss(family, train64, data64, torch.device("cpu"), bank=40, seed=3, context=0.3, grad_leak=0.05)
            assert loss.native is native
            out = [loss.pre, loss.outs, loss.teacher]
            for large in (None, teacher):   # the stored teacher, and one computed on the fly
                leaf = {k: v.clone().requires_grad_() for k, v in small.items()}
                kl, feat = loss(leaf, idx, 12, torch.Generator().manual_seed(9), large)
                (kl + 2 * feat).backward()
                out += [kl, feat, *(leaf[k].grad for k in sorted(leaf))]
            runs.append(out)
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("context", [0.0, 0.3])
def test_a_task_loss_past_its_memory_budget_keeps_no_bank_and_gives_the_same_losses(setup, context):
    """At any pair count the bank stays within its budget: below MIN_BANK images per pair it keeps
    none (only the images) and computes each step's features, with the same values as the bank."""
    family, train, _, data = setup
    banked = TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3, context=context)
    need = len(train) * 40 * 4 * family.width * (14 ** 2 + 7 ** 2)   # what a 40-image bank takes
    assert banked.banked and banked.pre.shape[1] == 40
    assert TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3, bank_bytes=need // 2).pre.shape[1] == 20
    bare = TaskLoss(family, train, data, torch.device("cpu"), bank=40, seed=3, context=context, bank_bytes=need // 4)
    assert not bare.banked and not hasattr(bare, "pre") and len(bare.x) == 40
    torch.testing.assert_close(bare.pre_std, banked.pre_std)
    assert bare.out_scale == pytest.approx(banked.out_scale, rel=1e-6)
    idx = torch.tensor([4, 1, 6])
    small = {k: torch.randn(3, *v.shape) * 0.2 for k, v in family.small_block().state_dict().items()}
    for a, b in zip(banked(small, idx, 12, torch.Generator().manual_seed(9)),
                    bare(small, idx, 12, torch.Generator().manual_seed(9))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_perturbed_large_blocks_keep_statistics_and_have_the_asked_strength():
    family = create_family("paper_mnist")
    large = {k: v[None].expand(400, *v.shape).clone() for k, v in family.large_block().state_dict().items()}
    large["bn1.weight"] += 1.0  # non-zero everywhere so the relative change is measurable
    out = perturb_params(large, 0.2, torch.Generator().manual_seed(0))
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_var", "bn1.num_batches_tracked"):
        assert torch.equal(out[name], large[name])
    for name in ("conv1.weight", "bn1.weight"):
        rel = out[name] / large[name] - 1
        assert abs(float(rel.std()) - 0.2) < 0.01 and abs(float(rel.mean())) < 0.01


def test_non_finite_loss_is_reported(setup):
    family, train, val, data = setup
    with pytest.raises(NonFiniteLoss, match="lower --lr"):
        train_translator(TrainConfig(epochs=3, lr=1e12, **TINY), family, train, val, data, progress=False)


def test_logged_translator_predicts_through_pyfunc(setup, local_tracking):
    from kt_mlflow.tracking.models import load_translator, log_translator

    family, train, val, data = setup
    result = train_translator(TrainConfig(epochs=1, **TINY), family, train, val, data, progress=False)
    with mlflow.start_run():
        version = log_translator(result.translator, {k: v[:1] for k, v in val.part("large").items()}, "kt-unit")
    assert version == "1"
    pyfunc = mlflow.pyfunc.load_model("models:/kt-unit/latest")
    flat = flatten_block(family, "large", val.part("large")).numpy()
    out = pyfunc.predict(flat)
    expected = flatten_block(family, "small", result.translator.translate_batch(val.part("large"))).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    again = load_translator("models:/kt-unit@latest")
    assert again.config() == result.translator.config()


def test_finetune_curves_start_from_the_given_blocks(setup):
    family, train, val, data = setup
    curves = finetune_curves(family, val, data, {"trained": val.part("small")}, (0, 1), PairSchedule(batch_size=256))
    at0 = curves[curves.epoch == 0].sort_values("network")["accuracy"].to_numpy()
    acc = network_accuracy(family, val.part("begin"), val.part("small"), val.part("last"), data)
    np.testing.assert_allclose(at0, acc.numpy(), atol=1e-4)
    assert set(curves.epoch) == {0, 1}


def test_run_context_plugin_tags_new_runs(local_tracking):
    with mlflow.start_run() as run:
        pass
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["kt.version"] == "0.1.0" and tags["kt.torch"] == torch.__version__
    assert tags["kt.device"].startswith("cpu") or "NVIDIA" in tags["kt.device"]


def test_feature_mse_keeps_the_features_layout():
    """The task loss's feature term is ``F.mse_loss`` in value and gradient (float64), with the gradient
    laid out channels-last like the features (``mse_loss``'s CPU backward hands back NCHW)."""
    from kt_mlflow.training.task_loss import _Mse

    torch.manual_seed(0)
    a = torch.randn(5, 12, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    b = torch.randn_like(a)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    got, want = _Mse.apply(a1, b), torch.nn.functional.mse_loss(a2, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (g1,), (g2,) = torch.autograd.grad(got * 3, [a1]), torch.autograd.grad(want * 3, [a2])
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)
    assert g1.is_contiguous(memory_format=torch.channels_last)
