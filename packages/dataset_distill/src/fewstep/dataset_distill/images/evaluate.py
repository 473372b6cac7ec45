"""The field's evaluation protocol for a distilled image set (DC, DSA, DM, MTT, FTD).

Train ``repeats`` freshly initialised networks on the distilled images only, with SGD
(momentum 0.9, weight decay 5e-4, the learning rate divided by 10 halfway) and DSA
augmentation drawn per image, then measure accuracy on the held-out real test split; report
mean and standard deviation over the networks (``np.std`` as the papers: ddof 0), for each
architecture (cross-architecture generalisation: a set distilled with one network, evaluated on
others). The step size is the one the method learned (MTT, FTD) or ``EvalConfig.lr``.

The papers train 300 (DC) to 1,000 (DSA, MTT) epochs of batch 256; here the length is given in
SGD steps (``steps``), since an epoch of a 10-image set is a single step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.dataset_distill.images.augment import DSAConfig, augment
from fewstep.dataset_distill.images.data import ImageData
from fewstep.dataset_distill.images.nets import NetConfig, make_net


@dataclass
class EvalConfig:
    repeats: int = 3  # fresh networks trained per architecture (mean +- std over them)
    archs: tuple[str, ...] = ("convnet", "mlp", "resnet")  # architectures evaluated
    steps: int = 300  # SGD steps on the distilled set (lr / 10 after half)
    batch_size: int = 256  # training batch (the whole set when smaller)
    lr: float = 0.01  # step size when the method learned none
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    dsa: bool = True  # train with DSA augmentation (per-image parameters)


def train_classifier(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    dsa: DSAConfig | None,
    generator: torch.Generator,
) -> nn.Module:
    """SGD on (x (N, C, H, W), y (N,)) with the step size divided by 10 after half the steps;
    mini-batches walk through a fresh permutation each epoch. Returns ``net`` (trained in
    place)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"training step size must be a positive number, got {lr}")
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net.train()
    order: list[Tensor] = []
    for step in range(steps):
        if step == steps // 2:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        if not order:
            perm = torch.randperm(len(x), generator=generator).to(x.device)
            order = list(torch.split(perm, batch_size))
        idx = order.pop(0)
        xb = x[idx]
        if dsa is not None:
            xb = augment(xb, dsa, generator)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of ``net`` on (x, y)."""
    net.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    net.train()
    return correct / max(len(x), 1)


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def evaluate_synset(
    images: Tensor,
    labels: Tensor,
    data: ImageData,
    cfg: EvalConfig,
    net_cfg: NetConfig,
    dsa_cfg: DSAConfig,
    lr: float | None = None,
    seed: int = 0,
    archs: tuple[str, ...] | None = None,
) -> dict[str, dict]:
    """Test accuracy of networks trained on (images (M, C, H, W), labels (M,)) only.

    Returns ``{arch: {"mean", "std", "runs"}}`` (accuracies in [0, 1]). Network ``r`` of
    every architecture starts from seed ``seed * 1000 + r``, so methods evaluated with one
    seed see the same initialisations."""
    from fewstep.core.training import seed_global

    if cfg.repeats < 1:
        raise ValueError(f"eval.repeats must be >= 1, got {cfg.repeats}")
    step_size = cfg.lr if lr is None else float(lr)
    x = images.detach().to(data.x_test.device)
    y = labels.detach().to(data.x_test.device)
    out = {}
    for arch in archs or cfg.archs:
        runs = []
        for r in range(cfg.repeats):
            seed_global(seed * 1000 + r)
            net = make_net(net_cfg, data.channels, data.num_classes, data.image_size, arch)
            net = net.to(x.device)
            g = torch.Generator().manual_seed(seed * 1000 + r)
            train_classifier(
                net,
                x,
                y,
                cfg.steps,
                cfg.batch_size,
                step_size,
                cfg.momentum,
                cfg.weight_decay,
                dsa_cfg if cfg.dsa else None,
                g,
            )
            runs.append(accuracy(net, data.x_test, data.y_test))
        mean, std = _mean_std(runs)
        out[arch] = {"mean": mean, "std": std, "runs": runs}
    return out
