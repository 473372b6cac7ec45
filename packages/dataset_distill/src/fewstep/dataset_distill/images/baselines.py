"""Coreset baselines at the same images-per-class budget: a random subset, and herding.

Herding (Welling, ICML 2009; the greedy form of Rebuffi et al., iCaRL, CVPR 2017, Alg. 4, used
as the coreset baseline of DC/DM/MTT) picks, per class, the images whose running feature mean
tracks the class mean: with L2-normalised features ``phi`` and class mean ``mu``,

    p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||.

Features are a ConvNet's embedding after training on the whole real training split (cached).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.dataset_distill.images.augment import DSAConfig
from fewstep.dataset_distill.images.data import ImageData, fingerprint
from fewstep.dataset_distill.images.nets import NetConfig, make_net


def random_subset(y: Tensor, num_classes: int, ipc: int, generator: torch.Generator) -> Tensor:
    """Indices of ``ipc`` distinct random images per class, in class order: (K*ipc,)."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(y.cpu() == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} images; ipc={ipc} needs {ipc}")
        out.append(idx[torch.randperm(len(idx), generator=generator)[:ipc]])
    return torch.cat(out)


def herding(features: Tensor, m: int) -> Tensor:
    """Greedy herding order of ``m`` rows of ``features`` (n, F): indices (m,) into it.

    Features are L2-normalised first (iCaRL); each step adds the row that brings the running
    mean of the chosen rows closest to the mean of all rows; no row is chosen twice."""
    n = len(features)
    if not 1 <= m <= n:
        raise ValueError(f"herding needs 1 <= m <= {n} (number of rows), got {m}")
    phi = torch.nn.functional.normalize(features.double(), dim=1)
    mu = phi.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(n, dtype=torch.bool)
    for k in range(1, m + 1):
        dist = ((mu[None] - (total[None] + phi) / k) ** 2).sum(1)
        dist[~free] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total = total + phi[i]
    return torch.tensor(chosen, dtype=torch.long)


def herding_subset(features: Tensor, y: Tensor, num_classes: int, ipc: int) -> Tensor:
    """Herding per class: indices (K*ipc,) into the rows of ``features`` (N, F), class order."""
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(y.cpu() == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"class {c} has {len(idx)} images; ipc={ipc} needs {ipc}")
        out.append(idx[herding(features[idx].cpu(), ipc)])
    return torch.cat(out)


@dataclass
class HerdingSettings:
    feature_steps: int = 600  # SGD steps of the feature network on the real training split
    feature_lr: float = 0.01  # its step size (momentum 0.9, weight decay 5e-4, DSA)
    feature_batch: int = 256  # its batch


def feature_net(
    data: ImageData, net_cfg: NetConfig, cfg: HerdingSettings, dsa_cfg: DSAConfig | None
) -> tuple[nn.Module, dict]:
    """The network whose embedding herding selects in: ``net_cfg`` trained on the whole real
    training split, cached by (data fingerprint, network, settings). Returns (net, info)."""
    from fewstep.core.cache import cached_module
    from fewstep.core.training import seed_global
    from fewstep.dataset_distill.images.evaluate import accuracy, train_classifier

    spec = {
        "kind": "herding-features",
        "data": fingerprint(data),
        "net": dataclasses.asdict(net_cfg),
        "settings": dataclasses.asdict(cfg),
        "dsa": dataclasses.asdict(dsa_cfg) if dsa_cfg is not None else None,
    }
    seed_global(0)
    net = make_net(net_cfg, data.channels, data.num_classes, data.image_size)

    def train(m: nn.Module) -> dict:
        m.to(data.x_train.device)
        g = torch.Generator().manual_seed(0)
        train_classifier(
            m, data.x_train, data.y_train, cfg.feature_steps, cfg.feature_batch,
            cfg.feature_lr, 0.9, 5e-4, dsa_cfg, g,
        )  # fmt: skip
        return {"test_accuracy": accuracy(m, data.x_test, data.y_test)}

    with torch.random.fork_rng(devices=[]):
        net, info, _ = cached_module("dataset_distill/herding", spec, net, train)
    return net.to(data.x_train.device), info


@torch.no_grad()
def embed_all(net: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    """``net.embed`` of every image of ``x`` (N, C, H, W), in eval mode: (N, F)."""
    net.eval()
    return torch.cat([net.embed(x[i : i + batch]) for i in range(0, len(x), batch)])
