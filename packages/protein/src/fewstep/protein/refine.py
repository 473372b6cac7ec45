"""Teacher refinement: fine-tune the flow-matching teacher on its own plausible samples
before SiD distils it.

Why: SiD matches the teacher's *temperature-1* distribution (its scores), but this teacher's
quality comes from its low-temperature sampler: its ODE / temperature-1 samples clash in
~95 % of backbones and have no helices, its sc 0.45 samples in ~44 % with Proteina-like
helix content (BENCHMARKS.md, "Protein backbones", sessions 11-12). A student that matches
the scores inherits the temperature-1 defects however long it trains. Fine-tuning the
teacher on its own filtered low-temperature samples moves it towards what its sampler
produces, so SiD's target is closer to the distribution users sample (measured: its
few-step samples gain helices and lose clashes; its ODE samples still clash, BENCHMARKS.md
session 13).

The protein paper's code distils such a teacher in its rebuttal configuration
(LY-Xie/SiD_Protein, ``broteina_distillation_filtered.yaml`` loads a checkpoint named for
fine-tuning on filtered designable samples instead of the base checkpoint). Our filter is
the offline geometry we can check on CPU (no clash, bonds near 3.8 Å); with local
inverse-folding/folding weights (``designability``) a designability filter is the paper's.

Real fragments can be mixed in (``real_fraction``) to keep the data's strands and spread,
which the low-temperature sampler under-produces; measured, they made the refined teacher's
few-step samples worse (``RefineConfig.real_fraction``), and SiDA's adversarial term on the
real fragments restores the spread instead. The refined teacher is cached by the teacher's
spec plus this config.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep.protein.model import BackboneDenoiser


@dataclass
class RefineConfig:
    enabled: bool = True  # fine-tune the teacher on its filtered samples before SiD
    samples: int = 512  # backbones drawn from the teacher to build the refinement set
    # how they are drawn: the teacher through the students' noise-modulated K-step sampler
    # (measured better than its 400-step sc SDE on bonds, clashes and SSE, and 13x cheaper)
    # or Proteina's sc SDE (the teacher's own sampler)
    sampler: Literal["noise_modulated", "proteina_sc"] = "noise_modulated"
    sample_steps: int = 32  # K (noise_modulated) or Euler steps (proteina_sc)
    noise_scale: float = 0.45  # low-temperature noise of either sampler (paper / Proteina)
    max_bond_outliers: float = 0.05  # keep: at most this fraction of CA-CA bonds off 3.8±0.2 Å
    clash_distance: float = 3.0  # keep: no CA pair >= 3 apart in sequence closer than this (Å)
    # share of real fragments in the fine-tuning set. 0.5 vs 0 (K = 20 teacher-as-student,
    # noise 0.45, 32 samples): clash 0.66 vs 0.38, SSE TV 0.26 vs 0.21, Rg 0.95 vs 1.04
    real_fraction: float = 0.0
    steps: int = 1500  # fine-tuning steps (flow matching, the teacher's loss)
    batch_size: int = 32  # fragments per step
    lr: float = 2e-4  # AdamW learning rate (a fifth of the teacher's peak)
    warmup_steps: int = 50  # learning-rate warmup
    ema_decay: float = 0.99  # EMA of the fine-tuned weights (the refined teacher)
    seed: int = 0  # sampling and training draws

    def __post_init__(self):
        if self.samples < 1 or self.sample_steps < 1 or self.steps < 1:
            raise ValueError(
                "refine samples, sample_steps and steps must be >= 1; got "
                f"{self.samples}, {self.sample_steps}, {self.steps}"
            )
        if not 0.0 <= self.real_fraction < 1.0:
            raise ValueError(f"refine real_fraction must be in [0, 1), got {self.real_fraction}")


def plausible(ca: Tensor, max_bond_outliers: float = 0.05, clash_distance: float = 3.0) -> Tensor:
    """(N,) bool: which (N, L, 3) Å CA traces have no clash (two CAs at least 3 apart in
    sequence closer than ``clash_distance``, the ``metrics.clash_rate`` test) and at most
    ``max_bond_outliers`` of their consecutive CA-CA distances outside 3.8 ± 0.2 Å
    (``metrics.ca_ca_deviation``)."""
    from fewstep.protein.metrics import CA_CA

    if ca.ndim != 3 or ca.shape[-1] != 3:
        raise ValueError(f"expected (N, L, 3) CA coordinates, got {tuple(ca.shape)}")
    bonds = (ca[:, 1:] - ca[:, :-1]).norm(dim=-1)
    bond_ok = ((bonds - CA_CA).abs() > 0.2).float().mean(dim=1) <= max_bond_outliers
    dist = torch.cdist(ca, ca)
    far = torch.ones_like(dist[0], dtype=torch.bool).triu(diagonal=3)
    clash = ((dist < clash_distance) & far).flatten(1).any(dim=1)
    return bond_ok & ~clash


def refinement_set(
    teacher: BackboneDenoiser, cfg: RefineConfig, real: Tensor
) -> tuple[Tensor, dict]:
    """(fragments Å, info): the teacher's plausible samples plus real fragments so that they
    make up ``real_fraction`` of the set."""
    from fewstep.protein.recipes.sid import SID
    from fewstep.protein.sampling import NoiseModulatedSampler, paper_times
    from fewstep.protein.teacher import ProteinaSampler

    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.sampler == "noise_modulated":
        sampler = NoiseModulatedSampler(paper_times(cfg.sample_steps), cfg.noise_scale, gen)
    else:
        sampler = ProteinaSampler(cfg.sample_steps, 2.0, "sc", cfg.noise_scale, gen)
    with torch.no_grad():
        x, seconds = SID.generate(sampler, teacher, cfg.samples, real.shape[1], 64, cfg.seed)
    keep = plausible(x, cfg.max_bond_outliers, cfg.clash_distance)
    if not keep.any():
        raise ValueError(
            f"none of the teacher's {cfg.samples} samples passed the refinement filter "
            f"(bond outliers <= {cfg.max_bond_outliers}, no CA pair < {cfg.clash_distance} Å)"
        )
    kept = x[keep]
    n_real = round(cfg.real_fraction / (1.0 - cfg.real_fraction) * len(kept))
    idx = torch.randperm(len(real), generator=gen)[: min(n_real, len(real))]
    data = torch.cat([kept, real[idx].float()])
    info = {"generated": cfg.samples, "kept": int(keep.sum()), "real": len(idx),
            "sample_seconds": seconds}  # fmt: skip
    return data, info


def refine_teacher(
    teacher: BackboneDenoiser, teacher_cfg, cfg: RefineConfig, real: Tensor, progress=False
) -> tuple[BackboneDenoiser, dict]:
    """(refined frozen teacher, info): ``teacher`` fine-tuned with its own flow-matching loss
    and augmentation on ``refinement_set``."""
    from fewstep.protein.teacher import train_teacher

    t0 = time.perf_counter()
    data, info = refinement_set(teacher, cfg, real)
    ft = dataclasses.replace(
        teacher_cfg, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, ema_decay=cfg.ema_decay, seed=cfg.seed,
    )  # fmt: skip
    refined = train_teacher(ft, ca=data, progress=progress, init=teacher)
    info["refine_seconds"] = time.perf_counter() - t0
    return refined, info


def load_refined_teacher(
    teacher_cfg, cfg: RefineConfig, progress: bool = False
) -> tuple[BackboneDenoiser, dict]:
    """(frozen refined teacher, info), cached under ``cache_root()/"protein"`` by the
    teacher's spec and ``cfg``; the base teacher is loaded (or trained) first."""
    from fewstep.core.cache import cached_module
    from fewstep.protein.model import build_denoiser
    from fewstep.protein.teacher import load_teacher, load_training_fragments, teacher_spec

    def train(module: BackboneDenoiser) -> dict:
        base, _ = load_teacher(teacher_cfg, progress=progress)
        real = load_training_fragments(teacher_cfg.length, teacher_cfg.stride)
        refined, info = refine_teacher(base, teacher_cfg, cfg, real, progress)
        module.load_state_dict(refined.state_dict())
        return info

    spec = {**teacher_spec(teacher_cfg), "refine": dataclasses.asdict(cfg)}
    module, info, cached = cached_module("protein", spec, build_denoiser(teacher_cfg.model), train)
    return module.eval().requires_grad_(False), {**info, "cached": cached}
