"""Dataset condensation with gradient matching (DC; Zhao, Mopuri & Bilen, ICLR 2021), with
differentiable Siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

The synthetic set S is learned so that, along the training of freshly initialised networks,
the gradient of the loss on S matches the gradient on the real data T, class by class
(DC Alg. 1; with DSA, Eq. 4: one augmentation ``w`` per class shared by the real and the
synthetic batch):

    min_S  E_theta0 [ sum_t sum_c D( grad_theta L(A_w(S_c); theta_t),
                                     grad_theta L(A_w(T_c); theta_t) ) ]

D is DC's layer-wise distance (Eq. 10), summed over layers l and output nodes i,
``d(A, B) = sum_i (1 - <A_i, B_i> / (|A_i| |B_i|))`` with a conv kernel's gradient reshaped to
(out, in*kh*kw); bias and normalisation gradients (1-D) are left out, as in the authors' code.
Between the ``outer_loop`` image updates the network takes ``inner_loop`` epochs of SGD on the
current synthetic set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.dataset_distill.images.augment import DSAConfig, apply_aug, augment, sample_aug
from fewstep.dataset_distill.images.data import ImageData, init_synthetic, sample_class
from fewstep.dataset_distill.images.nets import NetConfig, make_net
from fewstep.dataset_distill.images.synset import Distilled, check_finite

# DC's (outer_loop, inner_loop) per images-per-class (the authors' ``get_loops``)
DC_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}


@dataclass
class DCSettings:
    iterations: int = 100  # fresh networks (outer iterations; DC: 1,000)
    outer_loop: int = 0  # image updates per network (0: DC's table, 1/10/50 at ipc 1/10/50)
    inner_loop: int = 0  # network epochs on the synthetic set between them (0: 1/50/10)
    lr_img: float = 0.1  # SGD step on the synthetic pixels (momentum 0.5)
    lr_net: float = 0.01  # SGD step of the network's inner updates
    batch_real: int = 256  # real images per class per matching step
    init: str = "real"  # synthetic initialisation: real or noise
    dsa: bool = True  # differentiable Siamese augmentation while matching


def loops(ipc: int, outer: int = 0, inner: int = 0) -> tuple[int, int]:
    """(outer_loop, inner_loop): the given values, or DC's table (nearest smaller ipc)."""
    key = max([k for k in DC_LOOPS if k <= ipc], default=1)
    o, i = DC_LOOPS[key]
    return outer or o, inner or i


def _as_matrix(g: Tensor) -> Tensor | None:
    """A parameter gradient as (out nodes, fan-in), or None for 1-D (bias, norm) ones."""
    if g.ndim == 1:
        return None
    return g.reshape(g.shape[0], -1)


def layer_distance(g_real: Sequence[Tensor], g_syn: Sequence[Tensor]) -> Tensor:
    """DC Eq. 10: sum over layers and output nodes of ``1 - cos(g_real_i, g_syn_i)``.

    ``g_real``, ``g_syn``: per-parameter gradients with matching shapes (conv (O, I, k, k),
    linear (O, I), 1-D ignored). Returns a scalar; 0 when every row points the same way,
    2 per row when opposite. 1e-6 in the denominator as in the authors' code."""
    total = g_syn[0].new_zeros(())
    for a, b in zip(g_real, g_syn, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        ma, mb = _as_matrix(a), _as_matrix(b)
        if ma is None:
            continue
        cos = (ma * mb).sum(-1) / (ma.norm(dim=-1) * mb.norm(dim=-1) + 1e-6)
        total = total + (1.0 - cos).sum()
    return total


def gradient_match_loss(
    net: nn.Module, x_real: Tensor, y_real: Tensor, x_syn: Tensor, y_syn: Tensor
) -> Tensor:
    """``D(grad L(x_syn), grad L(x_real))`` for the parameters of ``net``; the real gradient
    is a constant, the synthetic one keeps its graph (``create_graph``) so the distance is
    differentiable in ``x_syn``."""
    params = [p for p in net.parameters() if p.requires_grad]
    g_real = torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)
    g_real = [g.detach() for g in g_real]
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
    return layer_distance(g_real, g_syn)


def distill_dc(
    data: ImageData,
    ipc: int,
    cfg: DCSettings,
    net_cfg: NetConfig,
    dsa_cfg: DSAConfig,
    generator: torch.Generator,
) -> Distilled:
    """DC / DSA Alg. 1. Returns the synthetic set and the per-iteration mean class loss."""
    syn, labels = init_synthetic(data, ipc, cfg.init, generator)
    syn.requires_grad_(True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=0.5)
    outer, inner = loops(ipc, cfg.outer_loop, cfg.inner_loop)
    idx = data.class_indices()
    k, side = data.num_classes, data.image_size
    curve = []
    for it in range(cfg.iterations):
        net = make_net(net_cfg, data.channels, k, side).to(syn.device)
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        total = 0.0
        for ol in range(outer):
            loss = syn.new_zeros(())
            for c in range(k):
                xr = sample_class(data, idx[c], cfg.batch_real, generator)
                xs = syn[c * ipc : (c + 1) * ipc]
                if cfg.dsa:
                    aug = sample_aug(dsa_cfg, 1, side, generator, siamese=True)
                    xr, xs = apply_aug(xr, aug, dsa_cfg), apply_aug(xs, aug, dsa_cfg)
                yr = torch.full((len(xr),), c, device=xr.device)
                loss = loss + gradient_match_loss(net, xr, yr, xs, labels[c * ipc : (c + 1) * ipc])
            (syn.grad,) = torch.autograd.grad(loss, [syn])  # the network's grads stay clean
            opt_img.step()
            total += float(loss.detach()) / k
            if ol == outer - 1:
                break
            x_inner, y_inner = syn.detach(), labels
            for _ in range(inner):  # one epoch of batches of 256 over the synthetic set
                perm = torch.randperm(len(x_inner), generator=generator).to(syn.device)
                for b in torch.split(perm, 256):
                    xb = x_inner[b]
                    if cfg.dsa:
                        xb = augment(xb, dsa_cfg, generator)
                    opt_net.zero_grad(set_to_none=True)
                    F.cross_entropy(net(xb), y_inner[b]).backward()
                    opt_net.step()
        curve.append((it, total / outer))
        check_finite("dc", it, total)
    return Distilled(syn.detach(), labels, None, curve, {"outer_loop": outer, "inner_loop": inner})
