"""A LiDiff-style completion teacher trained on simulated streets, cached by config hash.

Training (LiDiff: Nunes et al., CVPR 2024, Sec. 3; code PRBonn/LiDiff ``models/models.py``
``training_step``): for each (partial scan, dense map) pair from :class:`CompletionPairs`,
the starting cloud x_init is the partial scan tiled ``repeat`` times (LiDiff: 10) and each of
its points is paired with one ground-truth point x_0 (see :data:`PAIRINGS`); the model
learns eps on the offsets y = x - x_init (:mod:`fewstep.lidar.model`) with

    L = ||eps_hat - eps||^2 + w_reg (mean(eps_hat)^2 + (std(eps_hat) - 1)^2),

LiDiff's noise regulariser with its weight 5; with probability ``uncond_prob`` (LiDiff 0.1)
the partial scan is zeroed (LiDiff's unconditional input) so classifier-free guidance is
available at sampling. Sampling (:func:`complete`) starts at x_init + eps and runs a core
sampler on the offsets (DDPM, 50 steps by default; LiDiff uses 50 DPM-Solver steps).

Why a pairing: in the offset form x_t = x_init + a_t (x_0 - x_init) + s_t eps every x_0 point
needs its x_init point. LiDiff pairs implicitly (it noises x_0 in place during training and
only uses x_init at sampling); an explicit coupling keeps training and sampling the same
process. ``assignment`` is the optimal one-to-one matching (scipy ``linear_sum_assignment``,
a minibatch-OT coupling; O(N^3), for the small N of CPU runs); ``knn`` pairs copy j of each
partial point with its j-th nearest ground-truth point (cheap, for large N).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial as bind
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from fewstep.core.cache import cache_key, cache_root, cached_module
from fewstep.core.models import Denoiser, GuidedDenoiser, ema_update_
from fewstep.core.samplers import DDPMSampler, Sampler
from fewstep.lidar.completion_data import CompletionPairs, PairsConfig
from fewstep.lidar.model import PointNetConfig, make_denoiser, pack_cond, repeat_partial
from fewstep.lidar.scenes import SceneConfig
from fewstep.lidar.sensor import DatasetConfig, LidarConfig, make_dataset

# ----------------------------------------------------------------------------- pairings


def pair_assignment(partial: np.ndarray, dense: np.ndarray, repeat: int) -> np.ndarray:
    """x_0 (repeat P, 3): ``dense`` reordered by the minimum-total-distance bijection to
    x_init = the partial scan (P, 3) tiled ``repeat`` times."""
    x_init = np.tile(partial, (repeat, 1))
    if len(dense) != len(x_init):
        raise ValueError(
            f"assignment needs as many dense points ({len(dense)}) as x_init ({len(x_init)})"
        )
    cost = np.linalg.norm(x_init[:, None] - dense[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty_like(x_init)
    out[rows] = dense[cols]
    return out


def pair_knn(partial: np.ndarray, dense: np.ndarray, repeat: int) -> np.ndarray:
    """x_0 (repeat P, 3): copy j of each partial point takes its j-th nearest dense point
    (copies are tiled as ``repeat_partial`` tiles them: copy j at rows [j P, (j + 1) P))."""
    if len(dense) == 0:
        raise ValueError("no ground-truth points to pair with")
    k = min(repeat, len(dense))
    _, idx = cKDTree(dense).query(partial, k=k)
    idx = np.asarray(idx).reshape(len(partial), k)
    return dense[np.concatenate([idx[:, j % k] for j in range(repeat)])]


# (partial (P, 3), dense (M, 3), repeat) -> x_0 (repeat P, 3) paired row by row with x_init
PAIRINGS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "assignment": pair_assignment,
    "knn": pair_knn,
}


# ----------------------------------------------------------------------------- config


def _small_dataset() -> DatasetConfig:
    return DatasetConfig(
        scene=SceneConfig(length=60.0, n_buildings=4, n_cars=4, n_poles=3, n_trees=3),
        lidar=LidarConfig(beams=16, horizontal_resolution=1.0, max_range=30.0),
        speed=10.0,
        map_extra_scans=2,
    )


@dataclass
class TeacherConfig:
    data: DatasetConfig = field(default_factory=_small_dataset)  # simulated streets
    n_sequences: int = 3  # streets (the last one is held out for evaluation)
    scans_per_seq: int = 8  # scans per street
    pairs: PairsConfig = field(
        default_factory=lambda: PairsConfig(max_range=20.0, n_partial=128, n_dense=1280)
    )  # crops and point counts; n_dense must equal repeat * n_partial
    repeat: int = 10  # x_init = partial scan tiled this many times (LiDiff: 10)
    pairing: str = "assignment"  # x_0 <-> x_init coupling, a key of PAIRINGS
    net: PointNetConfig = field(default_factory=PointNetConfig)  # the point network
    beta_start: float = 3.5e-5  # LiDiff's linear beta schedule start
    beta_end: float = 0.007  # LiDiff's linear beta schedule end
    train_steps: int = 600  # optimiser steps
    batch_size: int = 4  # pairs per step
    lr: float = 1e-3  # AdamW learning rate, after a 50-step linear warm-up
    reg_weight: float = 5.0  # LiDiff's noise-statistics regulariser weight
    uncond_prob: float = 0.1  # probability of zeroing the partial scan (CFG training)
    ema_decay: float = 0.995  # EMA of the weights; the EMA model is the teacher
    seed: int = 0  # seed of data draws, noise and initialisation

    def __post_init__(self):
        if self.pairing not in PAIRINGS:
            raise ValueError(
                f"unknown pairing {self.pairing!r}; expected one of {sorted(PAIRINGS)}"
            )
        if self.pairs.n_dense != self.repeat * self.pairs.n_partial:
            raise ValueError(
                f"pairs.n_dense ({self.pairs.n_dense}) must equal repeat * pairs.n_partial "
                f"({self.repeat} * {self.pairs.n_partial})"
            )
        if self.n_sequences < 2:
            raise ValueError("n_sequences must be >= 2 (the last street is held out)")


# ----------------------------------------------------------------------------- data


@dataclass
class PairTensors:
    offsets: torch.Tensor  # (K, N, 3) y_0 = x_0 - x_init
    cond: torch.Tensor  # (K, N + P, 3) pack_cond(x_init, partial)
    dense: list[torch.Tensor]  # K ground-truth clouds (n_dense, 3) for evaluation

    @property
    def n_points(self) -> int:
        return self.offsets.shape[1]

    def partial(self) -> torch.Tensor:
        return self.cond[:, self.n_points :]


def dataset_root(cfg: TeacherConfig) -> Path:
    """The simulated data set for ``cfg``, written once under the fewstep cache."""
    spec = {"data": asdict(cfg.data), "n": cfg.n_sequences, "scans": cfg.scans_per_seq}
    root = cache_root() / "lidar-data" / cache_key(spec)
    if not (root / "dataset.json").is_file():
        # written beside, then renamed: a killed or concurrent run never leaves half a set
        tmp = root.with_name(f".tmp-{root.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make_dataset(tmp, cfg.n_sequences, cfg.scans_per_seq, cfg.data)
        try:
            os.replace(tmp, root)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_pairs(data: CompletionPairs, indices: list[int], cfg: TeacherConfig) -> PairTensors:
    """Pair every item's tiled partial scan with its ground truth (``cfg.pairing``)."""
    offsets, conds, dense = [], [], []
    for i in indices:
        item = data[i]
        part = item["partial"].double()
        x_init = repeat_partial(part[None], cfg.repeat)[0].numpy()
        x0 = PAIRINGS[cfg.pairing](part.numpy(), item["dense"].double().numpy(), cfg.repeat)
        offsets.append(torch.from_numpy(x0 - x_init).float())
        conds.append(pack_cond(torch.from_numpy(x_init)[None], part[None])[0].float())
        dense.append(item["dense"])
    return PairTensors(torch.stack(offsets), torch.stack(conds), dense)


def split_pairs(cfg: TeacherConfig) -> tuple[PairTensors, PairTensors]:
    """(train, held-out) pairs: all streets but the last, and the last."""
    root = dataset_root(cfg)
    data = CompletionPairs(root, cfg=replace(cfg.pairs, seed=cfg.seed))
    last = f"{cfg.n_sequences - 1:02d}"
    train = [i for i, (s, _) in enumerate(data.index) if s != last]
    held = [i for i, (s, _) in enumerate(data.index) if s == last]
    return build_pairs(data, train, cfg), build_pairs(data, held, cfg)


# ----------------------------------------------------------------------------- training


def null_partial(cond: torch.Tensor, n_points: int) -> torch.Tensor:
    """LiDiff's unconditional input: the partial scan zeroed, x_init kept."""
    out = cond.clone()
    out[:, n_points:] = 0
    return out


def lidiff_loss(
    eps_hat: torch.Tensor, eps: torch.Tensor, reg_weight: float
) -> tuple[torch.Tensor, dict]:
    """MSE(eps_hat, eps) + reg_weight (mean(eps_hat)^2 + (std(eps_hat) - 1)^2) (LiDiff Sec. 3,
    ``training_step``: the predicted noise is pushed to zero mean and unit std)."""
    mse = torch.nn.functional.mse_loss(eps_hat, eps)
    reg = eps_hat.mean() ** 2 + (eps_hat.std() - 1.0) ** 2
    return mse + reg_weight * reg, {"mse": float(mse.detach()), "reg": float(reg.detach())}


def train_teacher_on(
    model: Denoiser, pairs: PairTensors, cfg: TeacherConfig
) -> tuple[Denoiser, list[float]]:
    """Train ``model`` (offsets, packed cond) with :func:`lidiff_loss`; returns (EMA, losses)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    path, n = model.path, pairs.n_points
    losses = []
    for step in range(cfg.train_steps):
        idx = torch.randint(0, len(pairs.offsets), (cfg.batch_size,), generator=gen)
        y0, cond = pairs.offsets[idx], pairs.cond[idx]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.uncond_prob
        cond = torch.where(drop[:, None, None], null_partial(cond, n), cond)
        t = path.sample_t(cfg.batch_size, torch.rand(cfg.batch_size, generator=gen))
        eps = torch.randn(y0.shape, generator=gen)
        loss, _ = lidiff_loss(model(path.noise(y0, t, eps), t, cond), eps, cfg.reg_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update_(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
    return ema.eval(), losses


def teacher_spec(cfg: TeacherConfig) -> dict:
    return {"kind": "lidiff-local-teacher", "config": asdict(cfg)}


def load_or_train_teacher(cfg: TeacherConfig | None = None) -> tuple[Denoiser, dict, bool]:
    """The teacher for ``cfg`` from the cache, or trained now and cached.
    Returns (EMA denoiser in eval mode, info, was_cached)."""
    cfg = cfg or TeacherConfig()
    torch.manual_seed(cfg.seed)
    model = make_denoiser(cfg.net, _path(cfg))

    def train(module) -> dict:
        t0 = time.perf_counter()
        train_pairs, _ = split_pairs(cfg)
        ema, losses = train_teacher_on(module, train_pairs, cfg)
        module.load_state_dict(ema.state_dict())
        k = max(1, len(losses) // 10)
        return {
            "train_seconds": time.perf_counter() - t0,
            "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])),
            "n_train_pairs": len(train_pairs.offsets),
        }

    model, info, cached = cached_module("lidar-teacher", teacher_spec(cfg), model, train)
    return model.eval().requires_grad_(False), info, cached


def _path(cfg: TeacherConfig):
    from fewstep.lidar.model import lidiff_path

    return lidiff_path(cfg.beta_start, cfg.beta_end)


# ----------------------------------------------------------------------------- sampling


def complete(
    denoiser: Denoiser,
    partial: torch.Tensor,
    repeat: int = 10,
    sampler: Sampler | None = None,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Complete (B, P, 3) partial scans: x_init + the sampled offsets, (B, repeat P, 3), and
    the NFE. ``guidance`` > 1 applies classifier-free guidance with the zeroed partial scan
    (LiDiff samples with w = 6)."""
    if partial.ndim != 3 or partial.shape[-1] != 3:
        raise ValueError(f"partial must be (B, P, 3), got {tuple(partial.shape)}")
    x_init = repeat_partial(partial.float(), repeat)
    cond = pack_cond(x_init, partial.float())
    model = denoiser
    if guidance != 1.0:
        model = GuidedDenoiser(denoiser, guidance, bind(null_partial, n_points=x_init.shape[1]))
    sampler = sampler or DDPMSampler(steps=50, generator=generator)
    noise = torch.randn(x_init.shape, generator=generator)
    out = sampler.sample(model, noise, cond)
    return x_init + out.x, out.nfe
