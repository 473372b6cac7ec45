"""MDT-dist: few-step distillation of a 3-D flow model by Marginal-Data Transport distillation
(Zhou, Yi, Fang et al. 2025, "Few-step Flow for 3D Generation via Marginal-Data Transport
Distillation", arXiv:2509.04406; code: github.com/Zanue/MDT-dist, ``FlowMDTTrainer``).

Rectified flow ``x_t = (1 - t) x0 + t eps`` (t = 1 noise), teacher velocity ``v(x_t, t)``.
The student learns the marginal-data transport ``F(x_t, t) = x_t - t u(x_t, t)`` that maps
any point of the teacher's ODE straight to its data end, ``u`` being the AVERAGE velocity over
[0, t]. Integrating the teacher's velocity is intractable, so the paper optimises two
surrogates:

* Velocity Matching (VM, sec. 3.2): along the teacher's ODE, ``dF/dt = 0`` gives
  ``u = v - t du/dt``; the discrete form (the code's ``distill_type='discrete'``) takes the
  teacher's Euler step ``x_{t-D} = x_t - D v(x_t, t)`` and the finite difference
  ``du/dt ~ (sg(u(x_t, t)) - u(x_{t-D}, t - D)) / D`` (normalised, ``du/dt / (|du/dt| + c)``
  per sample, the code's ``d_norm``), and regresses
  ``L_VM = || u(x_t, t) - sg(v(x_t, t) - t du/dt) ||^2`` on noised DATA.
* Velocity Distillation (VD, sec. 3.3): the student's one-step sample ``x_fake = z - u(z, 1)``
  is re-noised and the same VM residual ``r = u - (v - t du/dt)`` (the student's implied
  instantaneous velocity minus the teacher's, i.e. a difference of x0-predictions divided by
  t: a probability-density-distillation direction as in DMD) is evaluated there without
  gradient and pushed into the generator: ``L_VD = || r + u(z, 1) - sg(u(z, 1)) ||^2``, whose
  gradient w.r.t. ``u(z, 1)`` is ``2 r``.

The student is a velocity-prediction denoiser on the same path: its ``velocity`` output IS
the average velocity, since ``path.to_x0_eps`` then gives ``x0 = x_t - t u`` (the transport),
and the core ``EulerSampler`` with 1 or 2 steps is exactly the paper's few-step sampler
(TRELLIS's FlowEulerSampler without its time rescaling).

The teacher here is a small structured-latent 3-D flow: a 3-D conv U-Net velocity net over a
dense voxel latent (a truncated signed distance on an R^3 grid; TRELLIS's sparse-structure
stage is a flow over a 16^3 latent grid too, ours has no VAE) of a procedural shape family
(boxes, spheres, tori with random sizes and offsets), trained by ``core.pretrain``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.base import Logs, Losses, Objective, ObjectiveConfig
from fewstep.core.paths import RectifiedFlow
from fewstep.core.samplers import EulerSampler, Sampler

# ---------------------------------------------------------------------------------------------
# Procedural shapes (the data of the 3-D teacher)
# ---------------------------------------------------------------------------------------------


def _box_sdf(p: Tensor, half: Tensor) -> Tensor:
    """Exact box SDF: p (..., 3) relative to the centre, half sizes (3,)."""
    q = p.abs() - half
    return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0)


def _sphere_sdf(p: Tensor, r: float) -> Tensor:
    return p.norm(dim=-1) - r


def _torus_sdf(p: Tensor, major: float, minor: float, axis: int) -> Tensor:
    """Torus around ``axis`` through the origin."""
    others = [i for i in range(3) if i != axis]
    ring = p[..., others].norm(dim=-1) - major
    return torch.stack([ring, p[..., axis]], -1).norm(dim=-1) - minor


def _draw_box(g: torch.Generator) -> tuple:
    return ("box", 0.25 + 0.35 * torch.rand(3, generator=g))


def _draw_sphere(g: torch.Generator) -> tuple:
    return ("sphere", 0.3 + 0.4 * float(torch.rand(1, generator=g)))


def _draw_torus(g: torch.Generator) -> tuple:
    major = 0.35 + 0.25 * float(torch.rand(1, generator=g))
    minor = 0.12 + 0.13 * float(torch.rand(1, generator=g))
    return ("torus", major, minor, int(torch.randint(0, 3, (1,), generator=g)))


# Shape class -> (parameter draw, SDF of points relative to the centre).
SHAPES: dict[str, tuple] = {
    "box": (_draw_box, lambda p, s: _box_sdf(p, s[1])),
    "sphere": (_draw_sphere, lambda p, s: _sphere_sdf(p, s[1])),
    "torus": (_draw_torus, lambda p, s: _torus_sdf(p, s[1], s[2], s[3])),
}
SHAPE_CLASSES = tuple(SHAPES)


def voxel_grid(resolution: int) -> Tensor:
    """Vertex positions (R, R, R, 3) in [-1, 1]^3, indexed [x, y, z]."""
    ax = torch.linspace(-1.0, 1.0, resolution)
    return torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)


def procedural_shapes(
    n: int, resolution: int = 16, trunc: float = 0.25, seed: int = 0, offset: float = 0.15
) -> tuple[Tensor, Tensor]:
    """``n`` shapes, classes cycling box, sphere, torus, with random sizes and centre offsets
    up to ``offset``: latents (n, 1, R, R, R) = clamp(SDF / trunc, -1, 1) (negative inside)
    and class labels (n,)."""
    if resolution < 4 or resolution % 2:
        raise ValueError(f"resolution must be an even number >= 4, got {resolution}")
    if n < 1:
        raise ValueError(f"need n >= 1 shapes, got {n}")
    g = torch.Generator().manual_seed(seed)
    p = voxel_grid(resolution)
    xs, labels = [], []
    for i in range(n):
        k = i % len(SHAPES)
        draw, sdf = SHAPES[SHAPE_CLASSES[k]]
        c = offset * (2 * torch.rand(3, generator=g) - 1)
        xs.append(sdf(p - c, draw(g)))
        labels.append(k)
    x = (torch.stack(xs) / trunc).clamp(-1, 1)[:, None]
    return x, torch.tensor(labels)


# ---------------------------------------------------------------------------------------------
# The velocity network (teacher and student)
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of the network time (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


class _ResBlock3d(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added as a per-channel FiLM shift/scale."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.n1 = nn.GroupNorm(min(8, cin), cin)
        self.c1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, 2 * cout)
        self.n2 = nn.GroupNorm(min(8, cout), cout)
        self.c2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.t(temb)[:, :, None, None, None].chunk(2, 1)
        h = self.n2(h) * (1 + scale) + shift
        return self.skip(x) + self.c2(F.silu(h))


class VoxelVelocityNet(nn.Module):
    """A two-level 3-D conv U-Net ``net(x (B, 1, R, R, R), time (B,), cond) -> (B, 1, R, R, R)``
    (unconditional: ``cond`` is ignored); R must be even."""

    def __init__(self, channels: int = 32, time_dim: int = 64):
        super().__init__()
        c = channels
        self.time_dim = time_dim
        self.temb = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU())
        self.inp = nn.Conv3d(1, c, 3, padding=1)
        self.enc = _ResBlock3d(c, c, time_dim)
        self.down = nn.Conv3d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = _ResBlock3d(2 * c, 2 * c, time_dim)
        self.up = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.dec = _ResBlock3d(2 * c, c, time_dim)
        self.out = nn.Conv3d(c, 1, 3, padding=1)

    def forward(self, x: Tensor, time: Tensor, cond: Any = None) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[-1] % 2:
            raise ValueError(f"expected voxels (B, 1, R, R, R) with even R, got {tuple(x.shape)}")
        temb = self.temb(timestep_embedding(time, self.time_dim))
        h0 = self.enc(self.inp(x), temb)
        h = self.mid(self.down(h0), temb)
        h = self.dec(torch.cat([self.up(h), h0], 1), temb)
        return self.out(F.silu(h))


# ---------------------------------------------------------------------------------------------
# MDT-dist losses (pure functions)
# ---------------------------------------------------------------------------------------------


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


def vm_target(
    v_teacher: Tensor,
    u: Tensor,
    u_prev: Tensor,
    t: Tensor,
    interval: float,
    d_norm: bool = True,
    c: float = 0.1,
) -> Tensor:
    """MDT-dist VM target ``v - t du/dt`` (discrete form): v_teacher, u = u(x_t, t) and
    u_prev = u(x_{t-D}, t-D) (B, ...), t (B,) -> (B, ...), all without gradient;
    ``du/dt = (u - u_prev) / D``, divided by (its per-sample norm + c) when ``d_norm``."""
    d = (u.detach() - u_prev.detach()) / interval
    if d_norm:
        d = d / (_per_sample_norm(d) + c)
    return (v_teacher - t.reshape(-1, *([1] * (u.ndim - 1))).to(u) * d).detach()


def vm_loss(u: Tensor, target: Tensor) -> Tensor:
    """L_VM = mean ||u(x_t, t) - target||^2 (elementwise mean)."""
    return (u - target.detach()).pow(2).mean()


def vd_loss(u_one: Tensor, u_fake: Tensor, target_fake: Tensor) -> Tensor:
    """L_VD = mean ||(u_fake - target_fake) + u_one - sg(u_one)||^2: u_one (B, ...) is the
    student's one-step output at (z, t=1) (with gradient); u_fake / target_fake are the VM
    pair on the re-noised one-step sample (no gradient). d L / d u_one = 2 r / numel."""
    r = (u_fake - target_fake).detach()
    return (r + u_one - u_one.detach()).pow(2).mean()


def sample_times(z: Tensor, interval: float, mean: float = 1.0, std: float = 1.0) -> Tensor:
    """MDT-dist's training times from standard normals z (B,): logit-normal(mean, std)
    rescaled to [D, 1] so that t - D >= 0 (the code's ``sample_t``, sigma_min = 0)."""
    return interval + (1.0 - interval) * torch.sigmoid(mean + std * z)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


@dataclass
class MDTConfig(ObjectiveConfig):
    """MDT-dist settings (the defaults of the paper's code)."""

    interval: float = 0.01  # D, the teacher's Euler step for the discrete du/dt
    lambda_vm: float = 1.0  # weight of velocity matching
    lambda_vd: float = 1.0  # weight of velocity distillation
    d_norm: bool = True  # normalise du/dt per sample: du/dt / (|du/dt| + d_norm_c)
    d_norm_c: float = 0.1  # the constant c of that normalisation
    t_mean: float = 1.0  # logit-normal location of the training times
    t_std: float = 1.0  # logit-normal scale of the training times


class MDTDist(Objective):
    """MDT-dist (VM + VD) as a core objective: one role, the student, a velocity denoiser
    initialised from the teacher; batches carry real samples (VM noises data)."""

    name: ClassVar[str] = "mdt_dist"
    config_cls: ClassVar[type[ObjectiveConfig]] = MDTConfig
    roles: ClassVar[tuple[str, ...]] = ("student",)
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = "MDT-dist: velocity matching + velocity distillation (3-D flows)"

    def __init__(self, teacher: Denoiser, config: MDTConfig | None = None):
        super().__init__(teacher, config)
        cfg = self.config
        if not isinstance(teacher.path, RectifiedFlow):
            raise ValueError(
                f"MDT-dist needs a rectified-flow teacher, got path {teacher.path.name!r}"
            )
        if not 0.0 < cfg.interval < 1.0:
            raise ValueError(f"interval must be in (0, 1), got {cfg.interval}")
        if cfg.lambda_vm < 0 or cfg.lambda_vd < 0 or cfg.lambda_vm + cfg.lambda_vd == 0:
            raise ValueError("need lambda_vm, lambda_vd >= 0 and not both 0")

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        if student.prediction != "velocity" or not isinstance(student.path, RectifiedFlow):
            raise ValueError(
                "the MDT-dist student must predict 'velocity' on a rectified flow (its output "
                f"is the average velocity), got {student.prediction!r} on {student.path.name!r}"
            )
        return {"student": student}

    @torch.no_grad()
    def teacher_velocity(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.teacher.predict(x_t, t, cond, kind="velocity")

    def vm_pair(
        self, student: Denoiser, x0: Tensor, eps: Tensor, t: Tensor, cond: Any
    ) -> tuple[Tensor, Tensor]:
        """(u(x_t, t) with gradient, its VM target) for data x0, noise eps, times t (B,)."""
        cfg = self.config
        x_t = self.path.noise(x0, t, eps)
        v = self.teacher_velocity(x_t, t, cond)
        u = student(x_t, t, cond)
        with torch.no_grad():
            dt = t.reshape(-1, *([1] * (x_t.ndim - 1))).new_tensor(cfg.interval)
            u_prev = student(x_t - dt * v, t - cfg.interval, cond)
        return u, vm_target(v, u, u_prev, t, cfg.interval, cfg.d_norm, cfg.d_norm_c)

    def losses(
        self, roles: dict[str, nn.Module], batch: Batch, update: list[str], step: int
    ) -> tuple[Losses, Logs]:
        cfg, student = self.config, roles["student"]
        x0, cond, rng = batch.x, batch.cond, batch.rng
        if x0 is None:
            raise ValueError("MDT-dist needs real samples in the batch (velocity matching)")
        eps = rng.randn_like(x0)
        t = sample_times(rng.randn(), cfg.interval, cfg.t_mean, cfg.t_std).to(x0)
        loss = x0.new_zeros(())
        logs: Logs = {}
        if cfg.lambda_vm > 0:
            u, target = self.vm_pair(student, x0, eps, t, cond)
            l_vm = vm_loss(u, target)
            loss = loss + cfg.lambda_vm * l_vm
            logs["loss_vm"] = float(l_vm.detach())
        if cfg.lambda_vd > 0:
            z = rng.randn_like(x0)
            one = torch.ones(x0.shape[0], device=x0.device)
            u_one = student(z, one, cond)
            x_fake = (z - u_one).detach()  # x0 = x_1 - 1 * u(x_1, 1): the one-step sample
            with torch.no_grad():
                u_f, target_f = self.vm_pair(student, x_fake, eps, t, cond)
            l_vd = vd_loss(u_one, u_f, target_f)
            loss = loss + cfg.lambda_vd * l_vd
            logs["loss_vd"] = float(l_vd.detach())
        return {"student": loss}, logs

    def student_sampler(self) -> Sampler:
        """Deterministic Euler with the student's average velocity (the paper's sampler)."""
        return EulerSampler(steps=max(1, self.config.student_steps))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def occupancy(x: Tensor) -> Tensor:
    """(B, 1, R, R, R) latents -> (B, R^3) bool occupancy (SDF < 0)."""
    return (x < 0).flatten(1)


def nearest_iou(samples: Tensor, reference: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Per sample, the best occupancy IoU against ``reference`` latents and its index."""
    a, b = occupancy(samples).float(), occupancy(reference).float()
    best, idx = [], []
    for s in a.split(chunk):
        inter = s @ b.t()
        union = s.sum(1, keepdim=True) + b.sum(1)[None] - inter
        iou = inter / union.clamp_min(1.0)
        v, i = iou.max(1)
        best.append(v)
        idx.append(i)
    return torch.cat(best), torch.cat(idx)


def sample_quality(samples: Tensor, reference: Tensor, labels: Tensor, held_out: Tensor) -> dict:
    """Quality of generated latents: nearest-training-shape occupancy IoU (mean), the class
    histogram of a 1-nearest-neighbour (IoU) classifier and its total-variation distance from
    the data's class frequencies, and MMD^2 (core.metrics.mmd) on the latents against a
    held-out set."""
    from fewstep.core.metrics import mmd

    iou, idx = nearest_iou(samples, reference)
    k = len(SHAPE_CLASSES)
    hist = torch.bincount(labels[idx], minlength=k).float() / len(idx)
    ref = torch.bincount(labels, minlength=k).float() / len(labels)
    return {
        "nearest_iou": float(iou.mean()),
        "class_hist": {c: float(h) for c, h in zip(SHAPE_CLASSES, hist, strict=True)},
        "class_tv": float(0.5 * (hist - ref).abs().sum()),
        "mmd": mmd(samples.flatten(1), held_out.flatten(1)),
    }


@torch.no_grad()
def generate(denoiser: Denoiser, noise: Tensor, steps: int, batch: int = 64) -> Tensor:
    """Euler samples (the teacher's ``steps``-step ODE; the student's few-step sampler)."""
    sampler = EulerSampler(steps=steps)
    return torch.cat([sampler.sample(denoiser, z).x for z in noise.split(batch)])


@torch.no_grad()
def seconds_per_sample(denoiser: Denoiser, noise: Tensor, steps: int, repeats: int = 3) -> float:
    """Median wall-clock seconds per sample of ``generate`` over ``repeats`` runs."""
    times = []
    generate(denoiser, noise[:2], steps)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(denoiser, noise, steps)
        times.append((time.perf_counter() - t0) / len(noise))
    return sorted(times)[len(times) // 2]
