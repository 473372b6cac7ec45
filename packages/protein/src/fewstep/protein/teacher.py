"""The flow-matching CA-backbone teacher: trained by core's Trainer on real fragments,
cached by its config, sampled with Proteina's Euler integrator.

Training (Proteina, Geffner et al. 2025, sec. 3 and ``training_ca.yaml``): CA fragments in
nm, centre of mass removed, a uniformly random rotation per sample at every step, times from
Proteina's mixture (2 % uniform, else t_P ~ Beta(1.9, 1); ``model.ProteinaFlow``), and the
flow-matching loss on the velocity, which equals Proteina's 1 / (1 - t_P)^2-weighted
clean-sample loss (``model`` docstring).

Sampling (Proteina ``R3NFlowMatcher.full_simulation``): Euler steps on its "log" time
schedule (``schedule_p`` = 2: steps crowd near the data), N = 400 by default (dt = 0.0025 in
Proteina's inference config). ``mode="sc"`` is Proteina's stochastic sampler: the SDE
dx = [v + g s] dt_P + sqrt(2 g noise_scale dt_P) dW with the score s from the velocity and
g = 1 / (t_P + 0.01) ("1/t"), where ``noise_scale`` < 1 is its low-temperature option
(``sc_scale_noise``); the last steps (t_P > 0.99) are plain Euler. The noise is centred.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.base import Objective
from fewstep.core.samplers import Sample, Sampler
from fewstep.core.training import TrainConfig
from fewstep.protein.model import (
    NM_PER_ANGSTROM,
    BackboneDenoiser,
    BackboneTransformerConfig,
    build_denoiser,
    centre,
)

MODEL_VERSION = "protein-ca-teacher-v2"  # bump when the network or training changes


def _teacher_net() -> BackboneTransformerConfig:
    # the pair-value attention and the EGNN coordinate head cut the CA-CA outliers and
    # clashes of a small CPU teacher (BENCHMARKS.md, "Protein backbones")
    return BackboneTransformerConfig(pair_values=True, coord_head=True)


@dataclass
class TeacherConfig:
    length: int = 64  # residues per training fragment
    stride: int = 16  # residues between fragment starts in a chain
    model: BackboneTransformerConfig = field(default_factory=_teacher_net)  # net
    steps: int = 7000  # training steps (~20 CPU minutes on one thread at the default size)
    batch_size: int = 32  # fragments per step
    lr: float = 1e-3  # AdamW learning rate (after a linear warmup)
    warmup_steps: int = 200  # learning-rate warmup
    lr_decay: Literal["none", "linear", "cosine"] = "cosine"  # then down to 0 at the last step
    ema_decay: float = 0.999  # EMA of the weights; the EMA is the teacher
    seed: int = 0  # initialisation and training draws
    sample_steps: int = 400  # Euler steps when sampling (Proteina: dt = 0.0025)
    schedule_p: float = 2.0  # Proteina "log" schedule exponent (decades of step-size range)
    # Proteina's low-temperature SDE by default: on this teacher it halves the CA-CA outliers
    # and clashes of the ODE and gives it secondary structure (Proteina, sec. 3.3 / App.)
    sample_mode: Literal["vf", "sc"] = "sc"  # ODE (vf) or Proteina's low-temperature SDE (sc)
    noise_scale: float = 0.45  # sc mode: scale of the injected noise (Proteina sc_scale_noise)


# ------------------------------------------------------------------------- augmentation


def random_rotations(q: Tensor) -> Tensor:
    """(B, 3, 3) proper rotations from (B, 4) standard normals: the normalised quaternion
    of an isotropic Gaussian is uniform on S^3, so the rotations are uniform on SO(3)
    (Shoemake 1992). Returned matrices have det +1."""
    if q.ndim != 2 or q.shape[-1] != 4:
        raise ValueError(f"expected (B, 4) normals, got {tuple(q.shape)}")
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).view(-1, 3, 3)  # fmt: skip


@dataclass
class AugmentedFragments:
    """Trainer data source: uniform draws of fragments (Å in, nm out), each centred and
    rotated by its own uniformly random rotation, all from the step's generator (so resumed
    runs see the same batches)."""

    ca: Tensor  # (N, L, 3) CA coordinates in Å
    rotate: bool = True  # random rotation per sample and step

    def __post_init__(self):
        if self.ca.ndim != 3 or self.ca.shape[-1] != 3 or len(self.ca) == 0:
            raise ValueError(f"expected (N, L, 3) fragments with N > 0, got {tuple(self.ca.shape)}")
        self.nm = centre(self.ca.float() * NM_PER_ANGSTROM)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.nm.shape[1:])

    def __call__(self, rng: StepRNG):
        x = self.nm[rng.randint(0, len(self.nm)).cpu()]
        if self.rotate:
            rot = random_rotations(rng.randn(4).cpu())
            x = x @ rot.transpose(-1, -2)
        return x, None


def load_training_fragments(length: int, stride: int) -> Tensor:
    """(N, length, 3) Å CA fragments of the real chains shipped in MDAnalysisTests."""
    from fewstep.protein.structures import load_fragments

    frags = load_fragments(length=length, stride=stride)
    if len(frags) == 0:
        raise ValueError(f"no fragments of length {length} in the default structures")
    return frags.ca


# ---------------------------------------------------------------------------- training


class FlowMatchingObjective(Objective):
    """Core's denoising loss (velocity MSE on the model's path, Lipman 2023 eq. 23) as a
    trainer objective, so the teacher gets core's EMA, checkpoints and exact resume."""

    name = "flow_matching"
    needs_data = True
    summary = "conditional flow matching on CA fragments (Proteina)"

    def build_roles(self, student, example):
        return {"student": student}

    def losses(self, roles, batch: Batch, update, step):
        from fewstep.core.objectives.common import denoising_loss

        loss = denoising_loss(roles["student"], batch.x, batch.cond, batch)
        return {"student": loss}, {}


def train_teacher(
    cfg: TeacherConfig,
    ca: Tensor | None = None,
    progress: bool = False,
    init: BackboneDenoiser | None = None,
) -> BackboneDenoiser:
    """Train a teacher with core's Trainer on ``ca`` (N, L, 3) Å fragments (default: the
    real fragments of ``cfg.length``), from ``init``'s weights if given (fine-tuning);
    returns its EMA weights, frozen, in eval mode."""
    from fewstep.core.models import frozen_copy, trainable_copy
    from fewstep.core.training import Trainer

    ca = load_training_fragments(cfg.length, cfg.stride) if ca is None else ca
    model = build_denoiser(cfg.model, cfg.seed) if init is None else trainable_copy(init)
    train = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        lr_decay=cfg.lr_decay, ema_decay=cfg.ema_decay, seed=cfg.seed,
        log_every=max(cfg.steps // 20, 1), resume=False, progress=progress,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(FlowMatchingObjective(model), model, AugmentedFragments(ca), train, tmp)
        trainer.fit()
        best = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        teacher = frozen_copy(best).cpu()
    teacher.train_history = trainer.history  # type: ignore[attr-defined]
    return teacher


def teacher_spec(cfg: TeacherConfig) -> dict:
    """What the cached weights depend on (sampling options excluded)."""
    spec = dataclasses.asdict(cfg)
    for k in ("sample_steps", "schedule_p", "sample_mode", "noise_scale"):
        spec.pop(k)
    spec["model_version"] = MODEL_VERSION
    return spec


def load_teacher(cfg: TeacherConfig, progress: bool = False) -> tuple[BackboneDenoiser, dict]:
    """(frozen teacher, info) cached under ``cache_root()/"protein"`` by the config's hash;
    trained on first use."""
    from fewstep.core.cache import cached_module

    def train(module: BackboneDenoiser) -> dict:
        t0 = time.perf_counter()
        trained = train_teacher(cfg, progress=progress)
        module.load_state_dict(trained.state_dict())
        hist = [h["loss/student"] for h in trained.train_history if "loss/student" in h]
        return {"train_seconds": time.perf_counter() - t0, "final_loss": hist[-1] if hist else None}

    module, info, cached = cached_module(
        "protein", teacher_spec(cfg), build_denoiser(cfg.model), train
    )
    info = {**info, "cached": cached}
    return module.eval().requires_grad_(False), info


# ----------------------------------------------------------------------------- sampling


def proteina_times(steps: int, p: float = 2.0) -> Tensor:
    """(steps + 1,) decreasing core times from 1 (noise) to 0 (data) on Proteina's "log"
    schedule: t_P = 1 - logspace(-p, 0, steps + 1)[::-1], rescaled to [0, 1]; t = 1 - t_P."""
    if steps < 1 or p <= 0:
        raise ValueError(f"need steps >= 1 and p > 0, got steps={steps}, p={p}")
    tp = 1.0 - torch.logspace(-p, 0.0, steps + 1, dtype=torch.float64).flip(0)
    tp = (tp - tp.min()) / (tp.max() - tp.min())
    return (1.0 - tp).float()


def centred_normal(shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Standard normal (B, L, 3) with the centre of mass removed (Proteina's reference)."""
    return centre(torch.randn(shape, generator=generator))


class ProteinaSampler(Sampler):
    """Proteina's Euler integrator (module docstring): ``vf`` ODE or low-temperature ``sc``
    SDE on the "log" schedule. ``sample(denoiser, noise)`` centres the noise."""

    name = "proteina"

    def __init__(
        self,
        steps: int = 400,
        schedule_p: float = 2.0,
        mode: str = "vf",
        noise_scale: float = 0.45,
        generator: torch.Generator | None = None,
    ):
        if mode not in ("vf", "sc"):
            raise ValueError(f"sampling mode must be 'vf' or 'sc', got {mode!r}")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        self.times = proteina_times(steps, schedule_p)
        self.mode, self.noise_scale, self.generator = mode, noise_scale, generator

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, noise: Tensor, cond=None) -> Sample:
        path = denoiser.path
        x = centre(noise) * float(path.sigma(torch.tensor(1.0)))
        ts = self.times.tolist()
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            tb = _batch_t(t, x)
            v = denoiser.predict(x, tb, cond, kind="velocity")  # dx/dt (core time)
            h = t - t_next  # > 0, the step in Proteina's time t_P
            if self.mode == "vf" or t < 0.01:  # t_P > 0.99: Proteina switches to the ODE
                x = x - h * v
                continue
            score = denoiser.path.convert(v, "velocity", "score", x, tb)
            g = 1.0 / (1.0 - t + 0.01)  # Proteina "1/t" mode: g = 1 / (t_P + 0.01)
            z = centred_normal(tuple(x.shape), self.generator).to(x)
            x = x + (-v + g * score) * h + (2 * g * self.noise_scale * h) ** 0.5 * z
        return Sample(x, (len(ts) - 1) * denoiser.evals_per_call)


def teacher_sampler(
    cfg: TeacherConfig, generator: torch.Generator | None = None
) -> ProteinaSampler:
    return ProteinaSampler(
        cfg.sample_steps, cfg.schedule_p, cfg.sample_mode, cfg.noise_scale, generator
    )
