"""CTMSR: consistency training for one-step super-resolution, with distribution trajectory
matching (You et al., "Consistency Trajectory Matching for One-Step Generative
Super-Resolution", ICCV 2025, arXiv 2503.20349; official code LabShuHangGU/CTMSR,
``basicsr/models/sr_edm_unet_real_model.py``, ``optimize_parameters``).

No teacher: the student learns the PF-ODE of ``trajectory.py`` (from y + kappa eps to HR)
by consistency training (CT) on HR / LR pairs, then a DTM term pulls the distribution of
its SR outputs towards that of HR images.

Consistency function (CTMSR's EDMUNet with sigma_min = 0; the same c_skip / c_out as core's
``ConsistencyFunction``, Song et al. 2023 appendix C), with sigma = sigma(t):

    f(x_t, t, y) = c_skip x_t + c_out F(x_t, t, y),
    c_skip = sd^2 / ((k sigma)^2 + sd^2),  c_out = k sigma / sqrt((k sigma)^2 + sd^2),

k = 10 (the code's sigma / 0.1), sd = 0.5; at t = 0, c_skip = 1 and c_out = 0, so
f(x, 0, y) = x exactly (the boundary condition).

Consistency training (Song et al. 2023 alg. 3, eq. 10; CTMSR sec. 3.2): on the grid
t_i = i / N draw i in {0, ..., N-1} and one eps; with x_{t_i}, x_{t_{i+1}} built from the
same (x0, y, eps),

    L_CT = d( f_theta(x_{t_{i+1}}, t_{i+1}, y),  sg f_theta-(x_{t_i}, t_i, y) ),

theta- the target weights. CTMSR copies the student into the target every step (iCT, Song
& Dhariwal 2023: no EMA target; ``target_ema = 0``) and anneals N linearly from s0 = 4 to
s1 = 3 over training. Its d is 0.5 LPIPS + 0.5 Charbonnier; LPIPS needs downloaded VGG
weights, so here d is the pseudo-Huber metric (= Charbonnier, sqrt(r^2 + c^2) - c) or L2.

Distribution trajectory matching (CTMSR sec. 3.3; the code's ``loss_type == 'dtm'``):
let x^ = the student's SR output (the CT prediction above, as in the code), and noise both
it and the HR image along the trajectory at one time t_d with one shared eps':
z_t = x_t(x^, y, eps'), x_t = x_t(x0, y, eps'). A frozen consistency model D (a snapshot
of the student, refreshed every ``dtm_refresh`` steps: the code's ``self_iterative`` with
``time_scale``) maps each back to the end of its PF-ODE trajectory. Their difference

    g = D(z_t, t_d, y) - D(x_t, t_d, y)

says how the ODE trajectories through the SR outputs end elsewhere than those through HR
images (the x0-form of DMD's fake-minus-real score difference, here read off one network
at the two distributions' trajectory points). DTM descends along -g:

    L_DTM = 0.5 w || x^ - sg(x^ - g) ||^2,   d L_DTM / d x^ = w g,
    w = 1 / mean|x^ - x0| per image ("improved" weighting; "simple" = 1),

added as L = L_CT + lambda L_DTM (lambda = 1.6) once ``step >= dtm_start`` (CTMSR
fine-tunes a CT-trained model with DTM). The code measures this with LPIPS; here with the
squared error, whose gradient is exactly w g. t_d: grid points i / N, i >= 1, inside
``dtm_t_range`` (CTMSR: t_min 0.1, t_max 0.5, which with N = 3 or 4 is t_d = 1 / N).

Public code, not the paper's text, is what this follows where they could differ (the
paper's full text was not available here, only its abstract).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import ema_update_, frozen_copy
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import check_choice, step_fractions
from fewstep.core.objectives.consistency import pseudo_huber
from fewstep.image.sr import trajectory as traj
from fewstep.image.sr.trajectory import TrajectoryConfig


@dataclass
class CTMSRConfig(ObjectiveConfig):
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)  # LR -> HR PF-ODE
    intervals_start: int = 4  # grid intervals N at step 0 (CTMSR s0 = 4)
    intervals_end: int = 3  # N at the last step, linear in between (CTMSR s1 = 3)
    total_steps: int = 0  # steps the N schedule spans (recipes set train.steps); 0 = constant
    target_ema: float = 0.0  # target <- EMA of the student; 0 copies it each step (CTMSR, iCT)
    metric: Literal["huber", "l2"] = "huber"  # CT distance d (huber = Charbonnier-like)
    huber_c: float = 1e-3  # pseudo-Huber c
    boundary_scale: float = 10.0  # k in c_skip / c_out (CTMSR: sigma / 0.1)
    sigma_data: float = 0.5  # sd in c_skip / c_out (CTMSR 0.5)
    dtm_weight: float = 1.6  # lambda of L_DTM (CTMSR 1.6); 0 = consistency training only
    dtm_start: int = 500  # first step with DTM (pure CT before: CTMSR fine-tunes a CT model)
    dtm_refresh: int = 1000  # steps between student snapshots into D (CTMSR time_scale)
    dtm_t_range: tuple[float, float] = (0.1, 0.5)  # [lo, hi) of the DTM times (t_min, t_max)
    dtm_weighting: Literal["improved", "simple"] = "improved"  # w = 1 / mean|x^ - x0| or 1
    dtm_source: Literal["ct_prediction", "one_step"] = "ct_prediction"  # which SR output x^


# ----------------------------------------------------------------------------- pure math


def boundary_coefficients(sigma: Tensor, k: float, sd: float) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) for noise levels ``sigma`` (any shape): sd^2 / ((k s)^2 + sd^2) and
    k s / sqrt((k s)^2 + sd^2) (CM appendix C with sigma_min = 0; CTMSR's EDMUNet)."""
    ks = k * sigma
    denom = ks * ks + sd * sd
    return sd * sd / denom, ks / denom.sqrt()


def consistency_loss(pred: Tensor, target: Tensor, metric: str, c: float) -> Tensor:
    """d(pred, target): mean pseudo-Huber sqrt(r^2 + c^2) - c, or mean squared error."""
    if metric == "huber":
        return pseudo_huber(pred, target, c)
    return (pred.float() - target.float()).pow(2).mean()


def num_intervals(step: int, total: int, start: int, end: int) -> int:
    """Grid intervals N at ``step``: ``start`` moving linearly (in equal stages) to ``end``
    over ``total`` steps (CTMSR's improved_timesteps_schedule_*_linear); start if total <= 0."""
    if total <= 0 or start == end:
        return start
    stages = abs(start - end) + 1
    per = max(total // stages, 1)
    moved = step // per
    return max(start - moved, end) if end < start else min(start + moved, end)


def dtm_gradient(d_sr: Tensor, d_hr: Tensor) -> Tensor:
    """g = D(z_t) - D(x_t): where trajectories through SR outputs end minus where those
    through HR images end. (B, C, H, W)."""
    return d_sr - d_hr


def dtm_weights(sr: Tensor, hr: Tensor, kind: str, eps: float = 1e-8) -> Tensor:
    """(B, 1, 1, 1) per-image weights: 1 / mean|x^ - x0| ("improved", CTMSR's
    ``weight_type``; eps guards an exact match) or ones ("simple"); no gradient."""
    if kind == "simple":
        return torch.ones(sr.shape[0], *([1] * (sr.ndim - 1)), device=sr.device, dtype=sr.dtype)
    mad = (sr.detach() - hr).abs().flatten(1).mean(1).clamp_min(eps)
    return (1.0 / mad).reshape(-1, *([1] * (sr.ndim - 1)))


def dtm_loss(sr: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
    """0.5 mean(w (x^ - sg(x^ - g))^2): its gradient in x^ is w g / numel, so descent moves
    x^ along -g (CTMSR's DTM with the squared error as the distance)."""
    target = (sr - grad).detach()
    return 0.5 * (weight * (sr.float() - target.float()).pow(2)).mean()


# ----------------------------------------------------------------------- model and sampling


class SRConsistencyFunction(nn.Module):
    """f(x_t, t, y) = c_skip(sigma(t)) x_t + c_out(sigma(t)) net(x_t, t, y): the HR estimate
    at the end of the PF-ODE trajectory through x_t. Shapes (B, C, H, W), t (B,) or scalar."""

    def __init__(
        self, net: nn.Module, trajectory: TrajectoryConfig, k: float = 10.0, sd: float = 0.5
    ):
        super().__init__()
        self.net = net
        self.trajectory = trajectory
        self.k, self.sd = k, sd

    def forward(self, x_t: Tensor, t: Tensor | float, y: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        c_skip, c_out = boundary_coefficients(traj.sigma(t, self.trajectory), self.k, self.sd)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        out = self.net(x_t, t, y)
        return c_skip.reshape(shape).to(x_t) * x_t + c_out.reshape(shape).to(out) * out


@torch.no_grad()
def sample_sr(
    f: SRConsistencyFunction, y: Tensor, times: tuple[float, ...], generator: torch.Generator
) -> Tensor:
    """Consistency sampling from y (B, C, H, W): x_1 = y + kappa eps, x0 = f(x_1, 1); then for
    each later time t (decreasing fractions after ``times[0] = 1``) re-noise x0 along the
    trajectory to x_t and predict again (Song et al. 2023 alg. 1). len(times) = NFE."""
    times = tuple(step_fractions("ctmsr", len(times), times))

    def noise():
        return torch.randn(y.shape, generator=generator).to(y)

    x0 = f(traj.prior(y, noise(), f.trajectory), 1.0, y)
    for t in times[1:]:
        x0 = f(traj.forward(x0, y, t, noise(), f.trajectory), t, y)
    return x0


def sampling_times(cfg: ObjectiveConfig, steps: int | None = None) -> tuple[float, ...]:
    """The student's step fractions: ``steps`` uniform ones if given, else the config's."""
    if steps is not None:
        return tuple(step_fractions("ctmsr", steps))
    return tuple(step_fractions("ctmsr", cfg.student_steps, cfg.student_times))


# ------------------------------------------------------------------------------ objective


class CTMSR(Objective):
    name = "ctmsr"
    config_cls = CTMSRConfig
    roles = ("student",)
    frozen_roles = ("target", "dtm_model")
    needs_data = True
    summary = "consistency training LR+noise -> HR with distribution trajectory matching"

    def __init__(self, config: CTMSRConfig | None = None):
        super().__init__(None, config)  # distillation-free: no teacher
        cfg = self.config
        check_choice("metric", cfg.metric, ("huber", "l2"))
        check_choice("dtm_weighting", cfg.dtm_weighting, ("improved", "simple"))
        check_choice("dtm_source", cfg.dtm_source, ("ct_prediction", "one_step"))
        if min(cfg.intervals_start, cfg.intervals_end) < 1:
            raise ValueError(
                f"intervals_start and intervals_end must be >= 1, got "
                f"{cfg.intervals_start}, {cfg.intervals_end}"
            )
        lo, hi = cfg.dtm_t_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"dtm_t_range must be [lo, hi) with 0 <= lo < hi <= 1, got {lo, hi}")
        if cfg.dtm_refresh < 1 or cfg.dtm_weight < 0 or not 0 <= cfg.target_ema < 1:
            raise ValueError(
                "need dtm_refresh >= 1, dtm_weight >= 0 and 0 <= target_ema < 1; got "
                f"{cfg.dtm_refresh}, {cfg.dtm_weight}, {cfg.target_ema}"
            )

    @property
    def path(self):
        raise AttributeError("CTMSR has no core noise path; its trajectory is sr/trajectory.py")

    def wrap(self, net: nn.Module) -> SRConsistencyFunction:
        cfg = self.config
        return SRConsistencyFunction(net, cfg.trajectory, cfg.boundary_scale, cfg.sigma_data)

    def build_roles(self, student: nn.Module, example: Batch) -> dict[str, nn.Module]:
        _check_batch(example)
        return {
            "student": student,
            "target": frozen_copy(student),
            "dtm_model": frozen_copy(student),
        }

    def student_denoiser(self, roles):
        return self.wrap(roles["student"])

    def student_sampler(self):
        raise NotImplementedError("CTMSR samples with fewstep.image.sr.ctmsr.sample_sr")

    def intervals(self, step: int) -> int:
        cfg = self.config
        return num_intervals(step, cfg.total_steps, cfg.intervals_start, cfg.intervals_end)

    def dtm_active(self, step: int) -> bool:
        return self.config.dtm_weight > 0 and step >= self.config.dtm_start

    def dtm_times(self, n: int, batch: Batch) -> Tensor:
        """(B,) DTM times: grid points i / n, i >= 1, in [lo, hi), one drawn per image."""
        lo, hi = self.config.dtm_t_range
        cand = [i / n for i in range(1, n + 1) if lo <= i / n < hi]
        if not cand:
            raise ValueError(
                f"no point of the {n}-interval grid lies in dtm_t_range [{lo}, {hi}); widen it"
            )
        idx = batch.rng.randint(0, len(cand))
        return torch.tensor(cand, dtype=torch.float32)[idx.cpu()]

    def losses(self, roles, batch: Batch, update, step):
        cfg, tcfg = self.config, self.config.trajectory
        hr, y = _check_batch(batch)
        n = self.intervals(step)
        i = batch.rng.randint(0, n).to(hr.device).float()
        t_lo, t_hi = i / n, (i + 1) / n
        eps = batch.rng.randn_like(hr).to(hr)
        x_lo = traj.forward(hr, y, t_lo, eps, tcfg)
        x_hi = traj.forward(hr, y, t_hi, eps, tcfg)
        with torch.no_grad():
            target = self.wrap(roles["target"])(x_lo, t_lo, y)
        student = self.wrap(roles["student"])
        pred = student(x_hi, t_hi, y)
        ct = consistency_loss(pred, target, cfg.metric, cfg.huber_c)
        logs = {"ct_loss": ct.item(), "intervals": float(n)}
        loss = ct
        if self.dtm_active(step):
            if cfg.dtm_source == "one_step":
                sr = student(traj.prior(y, batch.rng.randn_like(hr).to(hr), tcfg), 1.0, y)
            else:
                sr = pred
            t_d = self.dtm_times(n, batch).to(hr.device)
            eps_d = batch.rng.randn_like(hr).to(hr)
            d = self.wrap(roles["dtm_model"])
            with torch.no_grad():
                g = dtm_gradient(
                    d(traj.forward(sr.detach(), y, t_d, eps_d, tcfg), t_d, y),
                    d(traj.forward(hr, y, t_d, eps_d, tcfg), t_d, y),
                )
            dtm = dtm_loss(sr, g, dtm_weights(sr, hr, cfg.dtm_weighting))
            loss = loss + cfg.dtm_weight * dtm
            logs.update(dtm_loss=dtm.item(), dtm_grad_abs=g.abs().mean().item())
        return {"student": loss}, logs

    def after_update(self, roles, updated, step):
        cfg = self.config
        if cfg.target_ema == 0:
            _copy_(roles["target"], roles["student"])
        else:
            ema_update_(roles["target"], roles["student"], cfg.target_ema)
        done = step + 1  # updates so far; D is the student as DTM starts, then every refresh
        if (
            cfg.dtm_weight > 0
            and done >= cfg.dtm_start
            and (done - cfg.dtm_start) % cfg.dtm_refresh == 0
        ):
            _copy_(roles["dtm_model"], roles["student"])


@torch.no_grad()
def _copy_(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers <- src's, exactly."""
    for a, b in zip(dst.state_dict().values(), src.state_dict().values(), strict=True):
        a.copy_(b)


def _check_batch(batch: Batch) -> tuple[Tensor, Tensor]:
    """(HR, y): the batch's x and cond, (B, C, H, W) each."""
    hr, y = batch.x, batch.cond
    if hr is None or not isinstance(y, Tensor) or hr.ndim != 4 or y.shape != hr.shape:
        got = (None if hr is None else tuple(hr.shape), getattr(y, "shape", type(y).__name__))
        raise ValueError(
            "CTMSR needs batches with x = HR images and cond = bicubic-upsampled LR images, "
            f"both (B, C, H, W) of one shape; got x, cond = {got}"
        )
    return hr, y


__all__ = [
    "CTMSR",
    "CTMSRConfig",
    "SRConsistencyFunction",
    "boundary_coefficients",
    "consistency_loss",
    "dtm_gradient",
    "dtm_loss",
    "dtm_weights",
    "num_intervals",
    "sample_sr",
    "sampling_times",
]
