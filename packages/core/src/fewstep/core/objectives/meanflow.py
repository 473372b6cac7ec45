"""MeanFlow as a distillation objective, and the flow-map student it trains.

Geng, Deng, Bai, Kolter & He, "Mean Flows for One-step Generative Modeling" (NeurIPS 2025);
Hu et al., "MeanFlow Transformers with Representation Autoencoders" (MF-RAE, 2025,
sony/mf-rae; also NVIDIA FastGen ``mean_flow.py``).

A flow map jumps along the probability-flow ODE dx/dt = v(x, t) from time t to r < t:
x_r = x_t - (t - r) u(x_t, t, r) with the average velocity u = 1/(t - r) int_r^t v dtau
(MeanFlow eqs. 1-3, eq. 12 for sampling). Differentiating (t - r) u in t gives the MeanFlow
identity (eq. 6)
    u(x_t, t, r) = v(x_t, t) - (t - r) du/dt,     du/dt = v d_x u + d_t u   (eq. 8),
and the loss || u_theta - sg(u_tgt) ||^2 with u_tgt = v - (t - r)(v d_x u_theta + d_t u_theta)
(eqs. 9-10), the total derivative taken as one Jacobian-vector product with tangents
(v, 1, 0) on (x, t, r) (``common.jvp``: exact forward mode, or finite differences). Here v is
the *teacher's* velocity (distillation) at x_t taken either from the teacher's own ODE run
from the prior (data-free) or from noised real data. The loss carries MeanFlow's adaptive
weight sg(1 / (||delta||^2 + c)^p) (sec. 4.3), and (t, r) are two draws from a logit-normal
(or uniform) density, sorted, with r = t for all but a fraction of the batch (tab. 1a); of
the r != t draws a fraction can take r = t_min (FastGen's "consistency" bucket), which trains
the one-step jump directly. In exact mode the JVP runs attention on its math kernel (the fused
kernels have no forward-mode rule).

MF-RAE's two additions, both as one trainer run switched by step:
  * consistency mid-training (CMT, MF-RAE sec. 3): for the first ``cmt_steps`` steps,
    regress u(x_t, t, r) on the teacher's ODE jump (x_t - x_r) / (t - r), a trajectory-aware
    initialisation before the MeanFlow loss;
  * bootstrapping after ``bootstrap_after``: v is no longer the teacher's. ``'data'`` is
    MF-RAE's post-training with the one-point velocity estimator a'(t) x0 + s'(t) eps of noised
    data (plain MeanFlow training); ``'self'`` uses the student's own instantaneous velocity
    sg(u(x_t, t, t)), a teacher-free self-distillation of its learnt field.

Student network. ``FlowMapDenoiser`` gives any denoiser the second time r without knowing its
architecture: a forward hook on its time-embedding submodule (``time_mlp`` of ToyMLP,
``time_embedding`` of diffusers UNets, ...) adds a learned embedding of the gap (t - r) whose
last layer is zero-initialised, so at initialisation the student is the teacher at every r
(the warm start from the teacher). The gap's sinusoidal features are low-frequency (at most
2 cycles over the path), since du/dt differentiates them. The network's raw output at
(x_t, t, r) is read, through the exact conversions at time t, as a pair (x0^, eps^), and the
jump re-noises it to r:
    x_r = a(r) x0^ + s(r) eps^,   i.e.   u = [a(t) - a(r)]/(t - r) x0^ + [s(t) - s(r)]/(t - r) eps^,
so u is in the path's native velocity units, u(x, t, t) = a'(t) x0^ + s'(t) eps^ is the
instantaneous velocity, and an untrained student jumps exactly like DDIM. On rectified flow
u is the network's velocity output itself. Losses are measured in path-fraction time
(u * (t_max - t_min)), which is rectified flow's unit and keeps discrete-VP time (0..999)
well scaled for finite differences and the adaptive weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    check_choice,
    jvp,
    noised,
    ode_step,
    sample_shape,
    unguided,
)
from fewstep.core.paths import Path, _bcast
from fewstep.core.samplers import FlowMapSampler
from fewstep.core.toy import sinusoidal_embedding, sinusoidal_frequencies

# names of time-embedding submodules, in order of preference (ToyMLP, diffusers UNets,
# ADM-style nets, DiT, diffusers transformers)
TIME_MODULES = ("time_mlp", "time_embedding", "time_embed", "t_embedder", "time_text_embed")


# ------------------------------------------------------------------------ time helpers


def span(path: Path) -> float:
    """t_max - t_min: native time per unit of path fraction."""
    return float(path.t_max) - float(path.t_min)


def to_native(path: Path, f: Tensor) -> Tensor:
    """Path fractions (differentiable, any shape) -> native times."""
    return float(path.t_min) + span(path) * f


def secant_slopes(path: Path, t: Tensor, r: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """([a(t) - a(r)] / (t - r), [s(t) - s(r)] / (t - r)) broadcast against ``like``; the
    derivatives a'(t), s'(t) where r = t. Computed in float64 (no cancellation)."""
    td, rd = t.double(), r.double()
    gap = td - rd
    small = gap.abs() <= 1e-7 * span(path)
    safe = torch.where(small, torch.ones_like(gap), gap)
    da = torch.where(small, path.d_alpha(td), (path.alpha(td) - path.alpha(rd)) / safe)
    ds = torch.where(small, path.d_sigma(td), (path.sigma(td) - path.sigma(rd)) / safe)
    return _bcast(da.to(like.dtype), like), _bcast(ds.to(like.dtype), like)


def draw_fractions(
    batch: Batch, density: Literal["uniform", "logit_normal"], mean: float, std: float
) -> Tensor:
    """(B,) path fractions in (0, 1) from ``density`` (logit-normal: sigmoid(N(mean, std)))."""
    u = batch.rng.rand()
    if density == "uniform":
        return u
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-6, 1 - 1e-6) - 1.0)
    return torch.sigmoid(mean + std * z)


# ---------------------------------------------------------------------- the student net


def find_time_module(module: nn.Module) -> str:
    """Qualified name of the time-embedding submodule (one of ``TIME_MODULES``)."""
    names = [n for n, _ in module.named_modules()]
    for wanted in TIME_MODULES:
        for name in names:
            if name.split(".")[-1] == wanted:
                return name
    raise ValueError(
        f"found no time-embedding submodule named one of {TIME_MODULES} in "
        f"{type(module).__name__}; pass time_module='<qualified name>' (the submodule whose "
        "(B, D) output is the time embedding)"
    )


def _embed_width(module: nn.Module, name: str) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"cannot infer the width of time module {name!r} (no nn.Linear inside); pass "
            "embed_dim=<its output width>"
        )
    return linears[-1].out_features


class FlowMapDenoiser(Denoiser):
    """A flow-map student u(x_t, t, r) around any denoiser ``base`` (see the module doc).

    ``forward(x_t, t, cond, r=None)`` is the base's raw prediction with the gap embedding of
    (t - r) added to its time embedding (r = t when omitted, so ``predict`` gives the
    instantaneous model); ``average_velocity`` and ``jump`` are the flow map. The hook is
    registered only for the duration of a call, so copies (EMA, frozen targets) and
    ``torch.func`` transforms see a plain module."""

    def __init__(
        self,
        base: Denoiser,
        time_module: str | None = None,
        embed_dim: int | None = None,
        gap_features: int = 32,
        gap_hidden: int = 128,
        gap_max_freq: float = 2.0,
    ):
        super().__init__(base.path, base.prediction)
        self.base = base
        self.time_module = time_module or find_time_module(base)
        try:
            target = base.get_submodule(self.time_module)
        except AttributeError:
            raise ValueError(
                f"{type(base).__name__} has no submodule {self.time_module!r}"
            ) from None
        width = embed_dim or _embed_width(target, self.time_module)
        self.register_buffer(
            "gap_freqs", sinusoidal_frequencies(gap_features, gap_max_freq), persistent=False
        )
        self.gap_embed = nn.Sequential(
            nn.Linear(gap_features, gap_hidden), nn.SiLU(), nn.Linear(gap_hidden, width)
        )
        nn.init.zeros_(self.gap_embed[-1].weight)
        nn.init.zeros_(self.gap_embed[-1].bias)
        param = next(base.parameters(), None)
        if param is not None:
            self.to(param.device)

    @property
    def evals_per_call(self) -> int:  # type: ignore[override]
        return self.base.evals_per_call

    def forward(self, x_t, t, cond=None, r=None):
        t = _batch_t(t, x_t)
        r = t if r is None else _batch_t(r, x_t)
        gap = (t - r) / span(self.path)
        emb = self.gap_embed(sinusoidal_embedding(gap, self.gap_freqs))

        def add_gap(module, args, out):
            if out.shape[:2] != emb.shape:
                raise ValueError(
                    f"time module {self.time_module!r} returned shape {tuple(out.shape)}; "
                    f"the gap embedding is {tuple(emb.shape)} (expected (batch, width, ...); "
                    "a guided base doubles the batch: use the unguided network)"
                )
            return out + emb.to(out.dtype).reshape(out.shape[0], -1, *([1] * (out.ndim - 2)))

        handle = self.base.get_submodule(self.time_module).register_forward_hook(add_gap)
        try:
            return self.base(x_t, t, cond)
        finally:
            handle.remove()

    def average_velocity(self, x_t: Tensor, t, r, cond=None) -> Tensor:
        """u(x_t, t, r) in native velocity units: (x_t - x_r) / (t - r)."""
        t, r = _batch_t(t, x_t), _batch_t(r, x_t)
        x0, eps = self.path.to_x0_eps(self(x_t, t, cond, r=r), self.prediction, x_t, t)
        da, ds = secant_slopes(self.path, t, r, x_t)
        return da * x0 + ds * eps

    def jump(self, x_t: Tensor, t, r, cond=None) -> Tensor:
        """x_r = x_t - (t - r) u(x_t, t, r) (MeanFlow eq. 12)."""
        t, r = _batch_t(t, x_t), _batch_t(r, x_t)
        return x_t - _bcast(t - r, x_t) * self.average_velocity(x_t, t, r, cond)


def as_flow_map(student: Denoiser, time_module=None, gap_features=32, gap_hidden=128):
    """The student as a ``FlowMapDenoiser`` (unchanged if it already is one)."""
    if isinstance(student, FlowMapDenoiser):
        return student
    return FlowMapDenoiser(unguided(student), time_module, None, gap_features, gap_hidden)


def fraction_velocity(student: FlowMapDenoiser, cond) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """fn(x, s, q) = u(x, t(s), t(r(q))) in path-fraction units, s, q fractions (B,)."""
    path = student.path
    scale = span(path)

    def fn(x: Tensor, s: Tensor, q: Tensor) -> Tensor:
        return scale * student.average_velocity(x, to_native(path, s), to_native(path, q), cond)

    return fn


# --------------------------------------------------------------------------- the math


def meanflow_target(
    u_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x_t: Tensor,
    t: Tensor,
    r: Tensor,
    v: Tensor,
    mode: Literal["exact", "finite_difference"] = "exact",
    fd_eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """(u(x_t, t, r), sg(u_tgt)) with u_tgt = v - (t - r)(v d_x u + d_t u) (MeanFlow eq. 10).

    x_t, v: (B, ...); t, r: (B,); the total derivative is one JVP with tangents (v, 1, 0).
    u carries the gradient; the target is detached."""
    u, dudt = jvp(u_fn, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)), mode, fd_eps)
    return u, (v - _bcast(t - r, v) * dudt).detach()


def adaptive_l2(delta: Tensor, p: float, c: float) -> tuple[Tensor, Tensor]:
    """(mean_i sg(w_i) ||delta_i||^2, ||delta_i||^2) with w = 1 / (||delta||^2 + c)^p
    (MeanFlow sec. 4.3; p = 0 is the plain squared L2). delta: (B, ...)."""
    sq = delta.float().pow(2).flatten(1).sum(1)
    w = (sq.detach() + c).pow(-p)
    return (w * sq).mean(), sq


@torch.no_grad()
def teacher_ode(
    teacher: Denoiser,
    x: Tensor,
    t: Tensor,
    r: Tensor,
    steps: int,
    cond,
    solver: Literal["euler", "heun"] = "euler",
) -> Tensor:
    """x at native times r (B,) from x at t (B,) in ``steps`` teacher ODE steps equally
    spaced in native time (``common.ode_step``; 'euler' is DDIM). r = t returns x."""
    for i in range(steps):
        a = t + (r - t) * (i / steps)
        b = t + (r - t) * ((i + 1) / steps)
        x = ode_step(teacher, x, a, b, cond, solver)
    return x


@torch.no_grad()
def prior_states(
    teacher: Denoiser, batch: Batch, t: Tensor, steps: int, solver="euler"
) -> tuple[Tensor, Tensor]:
    """(x_t on the teacher's ODE from a prior draw, the prior draw x_{t_max}); t native (B,)."""
    path = teacher.path
    noise = batch.rng.randn(*sample_shape(batch))
    x_top = path.prior(noise)
    t_top = torch.full_like(t, float(path.t_max))
    return teacher_ode(teacher, x_top, t_top, t, steps, batch.cond, solver), x_top


# ---------------------------------------------------------------------- the objective


@dataclass
class MeanFlowConfig(ObjectiveConfig):
    # x_t: on the teacher's ODE from the prior (data-free) or noised real data
    x_source: Literal["teacher_ode", "data"] = "teacher_ode"
    x_ode_steps: int = 8  # teacher steps from the prior to t (x_source='teacher_ode')
    teacher_solver: Literal["euler", "heun"] = "euler"  # teacher ODE steps (euler == DDIM)
    t_density: Literal["uniform", "logit_normal"] = "logit_normal"  # (t, r) draw (MeanFlow tab. 1c)
    logit_mean: float = -0.4  # logit-normal location (MeanFlow: -0.4)
    logit_std: float = 1.0  # logit-normal scale (MeanFlow: 1.0)
    r_neq_t: float = 0.25  # fraction of the batch with r != t (MeanFlow tab. 1a: 25 %)
    r_zero: float = 0.0  # of those, fraction with r = t_min (FastGen's consistency bucket)
    adaptive_p: float = 1.0  # adaptive loss weight power p (0 = plain L2; MeanFlow: 1)
    adaptive_c: float = 1e-3  # adaptive loss weight constant c
    jvp_mode: Literal["exact", "finite_difference"] = "exact"  # du/dt by forward AD or FD
    fd_eps: float = 1e-4  # finite-difference step, in path fractions (toy nets vary fast in t)
    cmt_steps: int = 0  # consistency mid-training for steps [0, cmt_steps) (MF-RAE); 0 = off
    cmt_ode_steps: int = 16  # teacher steps per CMT jump from t to r
    bootstrap_after: int = -1  # from this step on, v is not the teacher's; -1 = never
    bootstrap_velocity: Literal["self", "data"] = "self"  # self: sg(u(x_t,t,t)); data: a'x0+s'eps
    time_module: str | None = None  # student's time-embedding submodule (None = auto-detect)
    gap_features: int = 32  # sinusoidal features of the gap (t - r)
    gap_hidden: int = 128  # hidden width of the gap embedding MLP


def check_flow_map_sampling(cfg: ObjectiveConfig, name: str) -> None:
    """Student steps / times valid for a ``FlowMapSampler``."""
    if cfg.student_steps < 1:
        raise ValueError(f"{name}: student_steps must be >= 1, got {cfg.student_steps}")
    if cfg.student_times:
        FlowMapSampler(cfg.student_times)  # validates


def flow_map_sampler(cfg: ObjectiveConfig) -> FlowMapSampler:
    if cfg.student_times:
        return FlowMapSampler(cfg.student_times)
    return FlowMapSampler.uniform(cfg.student_steps)


class MeanFlow(Objective):
    name = "meanflow"
    config_cls = MeanFlowConfig
    roles = ("student",)
    summary = "MeanFlow average-velocity distillation via the JVP identity, CMT init (Geng 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        check_choice("x_source", cfg.x_source, ("teacher_ode", "data"))
        check_choice("t_density", cfg.t_density, ("uniform", "logit_normal"))
        check_choice("jvp_mode", cfg.jvp_mode, ("exact", "finite_difference"))
        check_choice("bootstrap_velocity", cfg.bootstrap_velocity, ("self", "data"))
        check_choice("teacher_solver", cfg.teacher_solver, ("euler", "heun"))
        if not 0.0 <= cfg.r_neq_t <= 1.0 or not 0.0 <= cfg.r_zero <= 1.0:
            raise ValueError(
                f"r_neq_t and r_zero must be in [0, 1], got {cfg.r_neq_t} and {cfg.r_zero}"
            )
        if cfg.x_ode_steps < 1 or cfg.cmt_ode_steps < 1:
            raise ValueError("x_ode_steps and cmt_ode_steps must be >= 1")
        if cfg.cmt_steps < 0:
            raise ValueError(f"cmt_steps must be >= 0, got {cfg.cmt_steps}")
        if cfg.bootstrap_after >= 0 and cfg.bootstrap_after < cfg.cmt_steps:
            raise ValueError(
                f"bootstrap_after ({cfg.bootstrap_after}) must come after the consistency "
                f"mid-training steps ({cfg.cmt_steps}), or be -1 (never)"
            )
        if cfg.adaptive_p < 0 or cfg.adaptive_c <= 0 or cfg.fd_eps <= 0:
            raise ValueError("need adaptive_p >= 0, adaptive_c > 0 and fd_eps > 0")
        check_flow_map_sampling(cfg, self.name)

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        cfg = self.config
        boot_data = cfg.bootstrap_after >= 0 and cfg.bootstrap_velocity == "data"
        return cfg.x_source == "data" or boot_data

    def build_roles(self, student, example):
        cfg = self.config
        return {"student": as_flow_map(student, cfg.time_module, cfg.gap_features, cfg.gap_hidden)}

    def student_sampler(self):
        return flow_map_sampler(self.config)

    def stage(self, step: int) -> str:
        """'cmt' (consistency mid-training), 'distill' (teacher v) or 'bootstrap'."""
        cfg = self.config
        if step < cfg.cmt_steps:
            return "cmt"
        if 0 <= cfg.bootstrap_after <= step:
            return "bootstrap"
        return "distill"

    def draw_t_r(self, batch: Batch, r_neq_t: float) -> tuple[Tensor, Tensor]:
        """(t, r) as path fractions (B,), t >= r: two sorted draws; r = t except for a
        ``r_neq_t`` fraction, of which a ``r_zero`` fraction has r = 0 (t_min)."""
        cfg = self.config
        a = draw_fractions(batch, cfg.t_density, cfg.logit_mean, cfg.logit_std)
        b = draw_fractions(batch, cfg.t_density, cfg.logit_mean, cfg.logit_std)
        s, q = torch.maximum(a, b), torch.minimum(a, b)
        q = torch.where(batch.rng.rand() < cfg.r_zero, torch.zeros_like(q), q)
        return s, torch.where(batch.rng.rand() < r_neq_t, q, s)

    def _data(self, batch: Batch) -> Tensor:
        if batch.x is None:
            raise ValueError(
                "meanflow with x_source='data' or bootstrap_velocity='data' needs real data x "
                "in the batch"
            )
        return batch.x

    @torch.no_grad()
    def states(self, batch: Batch, s: Tensor) -> Tensor:
        """x_t at path fractions s: on the teacher's ODE from the prior, or noised data."""
        cfg = self.config
        t = to_native(self.path, s)
        if cfg.x_source == "data":
            return noised(self.path, self._data(batch), t, batch)[0]
        return prior_states(self.teacher, batch, t, cfg.x_ode_steps, cfg.teacher_solver)[0]

    @torch.no_grad()
    def teacher_velocity(self, x: Tensor, s: Tensor, cond) -> Tensor:
        """The teacher's dx/dt at fractions s, in path-fraction units."""
        t = to_native(self.path, s)
        return span(self.path) * self.teacher.predict(x, t, cond, kind="velocity")

    def losses(self, roles, batch, update, step):
        cfg = self.config
        student = roles["student"]
        stage = self.stage(step)
        u_fn = fraction_velocity(student, batch.cond)
        if stage == "cmt":
            return self.cmt_loss(u_fn, batch)
        s, q = self.draw_t_r(batch, cfg.r_neq_t)
        if stage == "bootstrap" and cfg.bootstrap_velocity == "data":
            # MF-RAE post-training: the one-point estimate of v from one (x0, eps) pair
            x0 = self._data(batch)
            t = to_native(self.path, s)
            x_t, eps = noised(self.path, x0, t, batch)
            v = span(self.path) * self.path.from_x0_eps(x0, eps, "velocity", t)
        else:
            x_t = self.states(batch, s)
            if stage == "bootstrap":
                with torch.no_grad():
                    v = u_fn(x_t, s, s)
            else:
                v = self.teacher_velocity(x_t, s, batch.cond)
        u, target = meanflow_target(u_fn, x_t, s, q, v, cfg.jvp_mode, cfg.fd_eps)
        loss, sq = adaptive_l2(u - target, cfg.adaptive_p, cfg.adaptive_c)
        logs = {
            "mf_loss": loss.item(),
            "mf_sq_err": sq.mean().item(),
            "stage_bootstrap": float(stage == "bootstrap"),
        }
        return {"student": loss}, logs

    def cmt_loss(self, u_fn, batch: Batch):
        """Consistency mid-training: u(x_t, t, r) against the teacher's jump (x_t - x_r)/(t - r)."""
        cfg = self.config
        s, q = self.draw_t_r(batch, 1.0)
        x_t = self.states(batch, s)
        with torch.no_grad():
            x_r = teacher_ode(
                self.teacher,
                x_t,
                to_native(self.path, s),
                to_native(self.path, q),
                cfg.cmt_ode_steps,
                batch.cond,
                cfg.teacher_solver,
            )
            gap = _bcast(s - q, x_t)
            wide = gap > 1e-6
            jumps = (x_t - x_r) / torch.where(wide, gap, torch.ones_like(gap))
            target = torch.where(wide, jumps, self.teacher_velocity(x_t, s, batch.cond))
        loss = F.mse_loss(u_fn(x_t, s, q).float(), target.float())
        return {"student": loss}, {"cmt_loss": loss.item()}
