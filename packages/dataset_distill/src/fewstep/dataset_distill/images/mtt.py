"""Dataset distillation by matching training trajectories (MTT; Cazenavette et al., CVPR 2022).

1. **Expert trajectories** (the buffer): networks trained on the real data with SGD, their
   parameters saved after every epoch, ``theta*_0 .. theta*_E``. They are cached on disk as
   safetensors (one file per expert, keyed by everything that shapes them, including a
   fingerprint of the training images), so later runs reuse them.
2. **Distillation** (Alg. 1): per iteration pick an expert and a start epoch
   ``t < max_start_epoch``; a student starts at ``theta*_t`` and takes ``N = syn_steps`` SGD
   steps on mini-batches of the (DSA-augmented) synthetic set with a *learnable* step size
   ``alpha`` (Eq. 1: ``theta_{n+1} = theta_n - alpha grad l(A(b_n); theta_n)``), the steps
   kept differentiable; the loss is the normalised parameter distance to the expert's
   ``theta*_{t+M}`` (Eq. 2):

       L = || theta_hat_{t+N} - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2

   and both the pixels and ``alpha`` take SGD steps (momentum 0.5) on it.

FTD (``ftd.py``) reuses all of this with experts trained by sharpness-aware minimisation and an
exponential moving average of the synthetic images.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.dataset_distill.images.augment import DSAConfig, augment
from fewstep.dataset_distill.images.data import ImageData, fingerprint, init_synthetic
from fewstep.dataset_distill.images.evaluate import accuracy
from fewstep.dataset_distill.images.nets import (
    NetConfig,
    flat_params,
    functional_forward,
    make_net,
)
from fewstep.dataset_distill.images.synset import Distilled, check_finite

# (loss closure, parameters) -> the update direction for each parameter
GradFn = Callable[[Callable[[], Tensor], list[Tensor]], list[Tensor]]


@dataclass
class ExpertSettings:
    num_experts: int = 5  # expert trajectories in the buffer (MTT: 100)
    epochs: int = 15  # training epochs per expert, parameters saved after each (MTT: 50)
    lr: float = 0.03  # expert SGD step (MTT's lr_teacher: 0.01); the student's initial step
    batch_size: int = 64  # expert mini-batch (MTT: 256 of 50,000 images; 1,438 digits here)
    momentum: float = 0.0  # expert SGD momentum (MTT: 0)
    weight_decay: float = 0.0  # expert weight decay (MTT: 0)
    dsa: bool = True  # experts train with DSA augmentation (as MTT)
    seed: int = 0  # seed of the buffer (independent of the run's seed, so buffers are shared)


@dataclass
class MTTSettings:
    iterations: int = 300  # distillation iterations (MTT: 5,000)
    syn_steps: int = 30  # student steps N on synthetic data per iteration (MTT: 30-50)
    expert_epochs: int = 2  # expert epochs M the student's N steps should cover (MTT: 2)
    max_start_epoch: int = 12  # start epochs t drawn from 0 .. max_start_epoch - 1
    lr_img: float = 1000.0  # SGD step on the synthetic pixels (momentum 0.5; MTT: 1e3-1e5)
    lr_lr: float = 1e-5  # SGD step on the learnable student step size (momentum 0.5)
    lr_init: float = 0.0  # initial student step size (0: the experts' lr)
    batch_syn: int = 0  # synthetic mini-batch of a student step (0: the whole set)
    init: str = "real"  # synthetic initialisation: real or noise
    dsa: bool = True  # DSA on the student's batches (per-image parameters, as MTT)
    experts: ExpertSettings = field(default_factory=ExpertSettings)  # the expert buffer


# ----------------------------------------------------------------------- the pure pieces


def sgd_gradient(loss_fn: Callable[[], Tensor], params: list[Tensor]) -> list[Tensor]:
    """The plain gradient of ``loss_fn()`` with respect to ``params``."""
    return list(torch.autograd.grad(loss_fn(), params))


def param_distance_loss(student_end: Tensor, expert_start: Tensor, expert_target: Tensor) -> Tensor:
    """MTT Eq. 2, all (P,): ``|student_end - expert_target|^2 / |expert_start -
    expert_target|^2``. 1 when the student did not move, 0 when it reached the target."""
    denom = ((expert_start - expert_target) ** 2).sum()
    if not float(denom) > 0:
        raise ValueError("expert start and target parameters coincide; the expert did not train")
    return ((student_end - expert_target) ** 2).sum() / denom


def unroll_student(
    net: nn.Module,
    start: Tensor,
    images: Tensor,
    labels: Tensor,
    lr: Tensor,
    steps: int,
    batch: int,
    dsa: DSAConfig | None,
    generator: torch.Generator,
) -> Tensor:
    """``steps`` differentiable SGD steps of ``net``'s architecture from parameters ``start``
    (P,) on (images (M, C, H, W), labels (M,)) with step size ``lr`` (scalar tensor): MTT
    Eq. 1. Mini-batches of ``batch`` walk through random permutations of the set. Returns
    the final parameters (P,), a function of ``images`` and ``lr`` (graph kept)."""
    p = start.detach().clone().requires_grad_(True)
    chunks: list[Tensor] = []
    for _ in range(steps):
        if not chunks:
            perm = torch.randperm(len(images), generator=generator).to(images.device)
            chunks = list(torch.split(perm, batch))
        idx = chunks.pop()
        x = images[idx]
        if dsa is not None:
            x = augment(x, dsa, generator)
        ce = F.cross_entropy(functional_forward(net, p, x), labels[idx])
        (g,) = torch.autograd.grad(ce, p, create_graph=True)
        p = p - lr * g
    return p


# ----------------------------------------------------------------------- expert buffers


def train_expert(
    net: nn.Module,
    data: ImageData,
    cfg: ExpertSettings,
    dsa: DSAConfig | None,
    generator: torch.Generator,
    grad_fn: GradFn = sgd_gradient,
) -> Tensor:
    """Train ``net`` on the real training split for ``cfg.epochs`` epochs with SGD along
    ``grad_fn``'s direction (plain gradients for MTT, GSAM for FTD). Returns the trajectory
    (epochs + 1, P): the initial parameters and those after every epoch."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    traj = [flat_params(net)]
    x, y = data.x_train, data.y_train
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        for idx in torch.split(perm, cfg.batch_size):
            xb = x[idx] if dsa is None else augment(x[idx], dsa, generator)
            yb = y[idx]
            grads = grad_fn(lambda xb=xb, yb=yb: F.cross_entropy(net(xb), yb), params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.detach()
            opt.step()
        traj.append(flat_params(net))
    return torch.stack(traj)


def expert_buffer(
    data: ImageData,
    net_cfg: NetConfig,
    cfg: ExpertSettings,
    dsa_cfg: DSAConfig,
    grad_fn: GradFn = sgd_gradient,
    optimiser: dict | None = None,
    cache: Path | None = None,
) -> tuple[list[Tensor], dict]:
    """The expert trajectories ``[(epochs + 1, P)] * num_experts``, from the cache or trained
    now (each stored as soon as it is done, so an interrupted build resumes).

    ``optimiser``: a JSON-able description of ``grad_fn`` that keys the cache (e.g.
    ``{"name": "gsam", "rho": 0.01, "alpha": 0.3}``). Returns (trajectories, info) where info
    has the seconds spent training, the experts' final test accuracy and the cache folder."""
    from safetensors.torch import load_file, save

    from fewstep.core.cache import cache_key, cache_root
    from fewstep.core.io import atomic_write_bytes
    from fewstep.core.training import seed_global

    if cfg.num_experts < 1 or cfg.epochs < 1:
        raise ValueError(
            f"experts need num_experts >= 1 and epochs >= 1, got {cfg.num_experts}, {cfg.epochs}"
        )
    spec = {
        "kind": "mtt-expert",
        "version": 1,
        "data": fingerprint(data),
        "net": dataclasses.asdict(net_cfg),
        "experts": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_experts"},
        "dsa": dataclasses.asdict(dsa_cfg) if cfg.dsa else None,
        "optimiser": optimiser or {"name": "sgd"},
    }
    folder = (cache or cache_root() / "dataset_distill" / "experts") / cache_key(spec)
    folder.mkdir(parents=True, exist_ok=True)
    trajectories, accs, seconds = [], [], 0.0
    for i in range(cfg.num_experts):
        path = folder / f"expert_{i:03d}.safetensors"
        if path.exists():
            # a copy that owns its memory, independent of the file once loaded
            trajectories.append(load_file(str(path))["trajectory"].clone())
            meta = json.loads((folder / f"expert_{i:03d}.json").read_text())
            accs.append(meta["test_accuracy"])
            continue
        t0 = time.perf_counter()
        seed_global(cfg.seed * 100_003 + i)
        net = make_net(net_cfg, data.channels, data.num_classes, data.image_size)
        net = net.to(data.x_train.device)
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
        traj = train_expert(net, data, cfg, dsa_cfg if cfg.dsa else None, g, grad_fn)
        acc = accuracy(net, data.x_test, data.y_test)
        seconds += time.perf_counter() - t0
        atomic_write_bytes(path, save({"trajectory": traj.cpu().contiguous()}))
        atomic_write_bytes(
            folder / f"expert_{i:03d}.json",
            json.dumps({"spec": spec, "test_accuracy": acc}).encode(),
        )
        trajectories.append(traj.cpu())
        accs.append(acc)
    info = {
        "expert_train_seconds": seconds,
        "expert_test_accuracy": sum(accs) / len(accs),
        "expert_cache": str(folder),
    }
    return trajectories, info


# ----------------------------------------------------------------------- distillation


def check_windows(cfg: MTTSettings) -> None:
    """The latest target epoch must exist in the buffer."""
    last = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if cfg.max_start_epoch < 1 or cfg.expert_epochs < 1 or last > cfg.experts.epochs:
        raise ValueError(
            f"max_start_epoch - 1 + expert_epochs = {last} must be <= experts.epochs = "
            f"{cfg.experts.epochs} (and both >= 1): the target epoch must be in the buffer"
        )


def match_trajectories(
    data: ImageData,
    ipc: int,
    cfg: MTTSettings,
    net_cfg: NetConfig,
    dsa_cfg: DSAConfig,
    generator: torch.Generator,
    buffer: list[Tensor],
    ema_decay: float | None = None,
    method: str = "mtt",
) -> Distilled:
    """MTT Alg. 1 on a given expert ``buffer``. With ``ema_decay`` (FTD) the returned images
    are the exponential moving average ``e <- d e + (1 - d) S`` of the iterates (e_0 = S_0)."""
    check_windows(cfg)
    syn, labels = init_synthetic(data, ipc, cfg.init, generator)
    syn.requires_grad_(True)
    lr0 = cfg.lr_init or cfg.experts.lr
    syn_lr = torch.tensor(float(lr0), device=syn.device, requires_grad=True)
    opt_img = torch.optim.SGD([syn], lr=cfg.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=0.5)
    net = make_net(net_cfg, data.channels, data.num_classes, data.image_size).to(syn.device)
    net.requires_grad_(False)  # a template: parameters come from the flat vector
    batch = cfg.batch_syn or len(syn)
    ema = syn.detach().clone() if ema_decay is not None else None
    curve = []
    for it in range(cfg.iterations):
        traj = buffer[int(torch.randint(len(buffer), (1,), generator=generator))]
        t = int(torch.randint(cfg.max_start_epoch, (1,), generator=generator))
        start = traj[t].to(syn.device)
        target = traj[t + cfg.expert_epochs].to(syn.device)
        end = unroll_student(
            net,
            start,
            syn,
            labels,
            syn_lr,
            cfg.syn_steps,
            batch,
            dsa_cfg if cfg.dsa else None,
            generator,
        )
        loss = param_distance_loss(end, start, target)
        syn.grad, syn_lr.grad = torch.autograd.grad(loss, [syn, syn_lr])
        opt_img.step()
        opt_lr.step()
        if ema is not None:
            ema.mul_(ema_decay).add_(syn.detach(), alpha=1.0 - ema_decay)
        curve.append((it, float(loss.detach())))
        check_finite(method, it, curve[-1][1])
    images = ema if ema is not None else syn.detach()
    return Distilled(images, labels, float(syn_lr.detach()), curve, {})


def distill_mtt(
    data: ImageData,
    ipc: int,
    cfg: MTTSettings,
    net_cfg: NetConfig,
    dsa_cfg: DSAConfig,
    generator: torch.Generator,
) -> Distilled:
    """MTT: build (or load) the plain-SGD expert buffer, then match trajectories."""
    check_windows(cfg)
    buffer, info = expert_buffer(data, net_cfg, cfg.experts, dsa_cfg)
    out = match_trajectories(data, ipc, cfg, net_cfg, dsa_cfg, generator, buffer)
    out.info.update(info)
    return out
