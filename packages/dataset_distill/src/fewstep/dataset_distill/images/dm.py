"""Dataset condensation with distribution matching (DM; Zhao & Bilen, WACV 2023).

The synthetic set is learned so that, in the embedding space of randomly initialised networks
``psi_theta``, the mean embedding of each class's synthetic images matches that of its real
images (DM Eq. 4, with DSA: one augmentation ``w`` per class for both sides):

    min_S  E_{theta, w} sum_c || mean_{x in T_c} psi_theta(A_w(x))
                              - mean_{s in S_c} psi_theta(A_w(s)) ||^2

A fresh network is drawn every iteration; it is never trained. The authors' code sums the
squared differences over embedding dimensions and classes, the loss written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.dataset_distill.images.augment import DSAConfig, apply_aug, sample_aug
from fewstep.dataset_distill.images.data import ImageData, init_synthetic, sample_class
from fewstep.dataset_distill.images.nets import NetConfig, make_net
from fewstep.dataset_distill.images.synset import Distilled, check_finite


@dataclass
class DMSettings:
    iterations: int = 1000  # random networks drawn (DM: 20,000)
    lr_img: float = 1.0  # SGD step on the synthetic pixels (momentum 0.5, as DM)
    batch_real: int = 64  # real images per class per iteration (DM: 256 of 5,000 per class)
    init: str = "real"  # synthetic initialisation: real or noise
    dsa: bool = True  # differentiable Siamese augmentation


def mean_embedding_distance(emb_real: Tensor, emb_syn: Tensor) -> Tensor:
    """DM Eq. 4 for one class: ``|| mean(emb_real, 0) - mean(emb_syn, 0) ||^2``;
    ``emb_real`` (n, F), ``emb_syn`` (m, F) -> scalar."""
    if emb_real.shape[1:] != emb_syn.shape[1:]:
        raise ValueError(
            f"embedding widths differ: real {tuple(emb_real.shape)} vs syn {tuple(emb_syn.shape)}"
        )
    return ((emb_real.mean(0) - emb_syn.mean(0)) ** 2).sum()


def distill_dm(
    data: ImageData,
    ipc: int,
    cfg: DMSettings,
    net_cfg: NetConfig,
    dsa_cfg: DSAConfig,
    generator: torch.Generator,
) -> Distilled:
    """DM's algorithm. Returns the synthetic set and the per-iteration loss (mean over
    classes)."""
    syn, labels = init_synthetic(data, ipc, cfg.init, generator)
    syn.requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=0.5)
    idx = data.class_indices()
    k, side = data.num_classes, data.image_size
    curve = []
    for it in range(cfg.iterations):
        net = make_net(net_cfg, data.channels, k, side).to(syn.device)
        net.requires_grad_(False)
        reals, syns = [], []
        for c in range(k):
            xr = sample_class(data, idx[c], cfg.batch_real, generator)
            xs = syn[c * ipc : (c + 1) * ipc]
            if cfg.dsa:
                aug = sample_aug(dsa_cfg, 1, side, generator, siamese=True)
                xr, xs = apply_aug(xr, aug, dsa_cfg), apply_aug(xs, aug, dsa_cfg)
            reals.append(xr)
            syns.append(xs)
        # one forward pass per side: the networks act on every image on its own (instance
        # norm), so embedding all classes together equals embedding them class by class
        with torch.no_grad():
            emb_real = net.embed(torch.cat(reals)).split([len(r) for r in reals])
        emb_syn = net.embed(torch.cat(syns)).split(ipc)
        loss = sum(mean_embedding_distance(r, s) for r, s in zip(emb_real, emb_syn, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append((it, float(loss.detach()) / k))
        check_finite("dm", it, curve[-1][1])
    return Distilled(syn.detach(), labels, None, curve, {})
