"""The task loss: what a translated block does inside its pair's own network, on training images.

Only translator training sees images; translation stays data-free.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..blocks import BlockFamily, KTNetwork, fold_members
from ..distributed import all_sum
from ..pairs.store import PairSet
from .augment import Part, batch_noise


class TaskLoss:
    """What the translated block does, per pair, on training images (translator training only).

    Each pair's own begin and last blocks (frozen, eval-mode BN) sandwich the translated small block.
    Two terms: KL(base network || network with the translated block) on the predictions, and the MSE
    between the translated block's output features and the large block's (relative to the features'
    mean square) at the positions the last block reads (it reads every stride-th; the rest never
    reaches a prediction). The begin block's pre-ReLU output for a fixed bank of training images is
    computed once per pair, as are the large block's features and the teacher logits, so a step only
    runs the small and last blocks. Translation itself stays data-free.

    ``context > 0`` perturbs the networks around the block at every call: the begin block's BN affine
    (a positive per-channel scale and a shift, applied to the stored pre-ReLU output, exact because
    max-pooling commutes with both) and the last block's parameters, each by relative noise of that
    strength; the teacher is then recomputed. New surroundings every step, so the translator cannot
    learn the training networks' own begin/last blocks instead of the task. ``grad_leak`` is the small
    block's hidden-ReLU gradient below zero (see ``BottleneckBlock``).

    Under DistributedDataParallel each rank holds its own pairs' banks; ``pairs_total`` (all ranks'
    pairs) sizes them, and every random draw is made for the whole batch (``part``), so a rank computes
    exactly its rows of what one process would.
    """

    def __init__(self, family: BlockFamily, train: PairSet, data, device: torch.device, bank: int,
                 seed: int, chunk: int = 32, context: float = 0.0, grad_leak: float = 0.0,
                 pairs_total: Optional[int] = None) -> None:
        self.family, self.device, self.context, self.grad_leak = family, device, context, grad_leak
        self.stride = family.last().stride
        # Keep the feature banks within ~4 GB: fewer images per pair when there are many pairs (2,000
        # pairs of the paper's family still get 360 images each).
        side = family.grid  # begin-block output (pre-activation bank), then block output (strided)
        per_image = 4 * family.width * (side ** 2 + (-(-side // self.stride)) ** 2)
        bank = max(16, min(bank, (4 << 30) // max(1, (pairs_total or len(train)) * per_image)))
        pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:bank]
        x = data.train_x[pick].to(device)
        m, n = len(x), len(train)
        pres, outs, teacher = [], [], []

        def per_pair(t: torch.Tensor, k: int) -> torch.Tensor:  # (m, k*C, H, W) -> (k, m, C, H, W)
            return t.reshape(m, k, -1, *t.shape[2:]).transpose(0, 1)

        with torch.no_grad():
            for lo in range(0, n, chunk):
                sl = slice(lo, min(n, lo + chunk))
                k = sl.stop - sl.start
                net = family.base_network(k).to(device).eval()
                for part, name in (("begin", "begin"), ("block", "large"), ("last", "last")):
                    getattr(net, part).load_state_dict(fold_members({a: b.to(device) for a, b in train.part(name).items()}, sl))
                pre = net.begin.preactivation(net.stack_input(x[:, None].expand(-1, k, -1, -1, -1)))  # (m, k*C, H, W)
                out = net.block(net.begin.activate(pre), stride=self.stride)
                teacher.append(net.last(out, subsampled=True).view(m, k, -1).transpose(0, 1))  # (k, m, classes)
                pres.append(per_pair(pre, k))
                outs.append(per_pair(out, k))
        self.activate = type(net.begin).activate  # the begin block's output from its pre-activation
        self.pre, self.outs, self.teacher = torch.cat(pres), torch.cat(outs), torch.cat(teacher)
        self.pre_std = self.pre.transpose(1, 2).flatten(2).std(-1)                      # (P, C)
        square_sum, count = all_sum([float(self.outs.double().pow(2).sum()), float(self.outs.numel())])
        self.out_scale = max(square_sum / count, 1e-12)                               # over every rank's pairs
        self.large = {k: v.to(device) for k, v in train.part("large").items()}
        self.last = {k: v.to(device) for k, v in train.part("last").items()}
        self._nets: Dict[int, torch.nn.Module] = {}

    def _net(self, k: int) -> KTNetwork:
        if k not in self._nets:
            self._nets[k] = KTNetwork(torch.nn.Identity(), self.family.small_block(k), self.family.last(k), k)
            self._nets[k].to(self.device).eval()
            if hasattr(self._nets[k].block, "grad_leak"):
                self._nets[k].block.grad_leak = self.grad_leak
        return self._nets[k]

    def _teacher_block(self, k: int) -> torch.nn.Module:
        if -k not in self._nets:  # negative keys: large blocks, positive: small-block networks
            self._nets[-k] = self.family.large_block(k).to(self.device).eval()
        return self._nets[-k]

    def __call__(self, small: Dict[str, torch.Tensor], idx: torch.Tensor, n_images: int,
                 gen: torch.Generator, large: Optional[Dict[str, torch.Tensor]] = None,
                 part: Part = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prediction KL, relative feature MSE) of the translated ``small`` blocks of pairs ``idx``.

        ``large`` (stacked, one per pair in ``idx``) replaces the pairs' own large blocks as the teacher,
        e.g. perturbed copies; the teacher is then computed on the fly instead of read from the bank.
        """
        k = len(idx)
        pick = torch.randint(self.pre.shape[1], (n_images,), generator=gen).to(self.device)

        def members(t: torch.Tensor) -> torch.Tensor:  # (k, n, C, H, W) -> (n, k*C, H, W)
            return t.transpose(0, 1).reshape(n_images, -1, *t.shape[3:]).contiguous(memory_format=torch.channels_last)

        rows = (idx[:, None], pick[None, :])   # gather the k x n bank entries, not k whole banks
        pre = self.pre[rows]                                                            # (k, n, C, H, W)
        last = {a: b[idx] for a, b in self.last.items()}
        if self.context > 0:
            c = pre.shape[2]
            scale = (1 + self.context * self._noise((k, 1, c, 1, 1), gen, part)).clamp_min(0.1)
            shift = self.context * self._noise((k, 1, c, 1, 1), gen, part) * self.pre_std[idx][:, None, :, None, None]
            pre = pre * scale + shift
            last = perturb_params(last, self.context, gen, part)
            if large is None:
                large = {a: b[idx] for a, b in self.large.items()}
        net, feats, last = self._net(k), members(self.activate(pre)), fold_members(last)
        out = functional_call(net.block, fold_members(small), (feats,), {"stride": self.stride})
        student = functional_call(net.last, last, (out,), {"subsampled": True})
        if large is None:
            target = members(self.outs[rows])
            teacher = self.teacher[rows].transpose(0, 1).reshape(n_images * k, -1)
        else:
            with torch.no_grad():
                target = functional_call(self._teacher_block(k), fold_members(large), (feats,), {"stride": self.stride})
                teacher = functional_call(net.last, last, (target,), {"subsampled": True}).view(n_images * k, -1)
        kl = F.kl_div(F.log_softmax(student.view(n_images * k, -1), -1), F.log_softmax(teacher, -1),
                      log_target=True, reduction="batchmean")
        return kl, F.mse_loss(out, target) / self.out_scale

    def _noise(self, shape: Tuple[int, ...], gen: torch.Generator, part: Part) -> torch.Tensor:
        return batch_noise(shape, gen, part).to(self.device)


def perturb_params(state: Dict[str, torch.Tensor], strength: float, gen: torch.Generator,
                   part: Part = None) -> Dict[str, torch.Tensor]:
    """Nearby networks: every weight and bias (conv, linear, BN affine) multiplied by
    ``1 + strength * N(0, 1)`` element-wise, BN statistics kept. With a teacher recomputed from them,
    each is a new, slightly different network to translate: unlimited examples of the same task."""
    out = dict(state)
    for name, t in state.items():
        if t.is_floating_point() and name.endswith((".weight", ".bias")):  # not the BN running statistics
            noise = batch_noise(t.shape, gen, part).to(t.device, t.dtype)
            out[name] = t * (1 + strength * noise)
    return out
