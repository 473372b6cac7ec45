"""TwinFlow: one-step generation with self-adversarial flows.

Cheng, Sun, Li, Lin, "TwinFlow: Realizing One-step Generation on Large Models with
Self-adversarial Flows" (arXiv:2512.05150, 2025; ICLR 2026; code inclusionAI/TwinFlow).

One network, no frozen teacher at training time and no discriminator. The time axis is
extended to t in [-1, 1]: on positive times the network is the flow of the *data* (trained
by flow matching on real samples), on negative times it is the flow of its *own one-step
samples* (the "twin" fake trajectory), and the gap between the two velocity fields drives
the one-step generator, as DMD's real-minus-fake score does, but with both scores read from
the network being trained. The teacher only initialises the student; ``needs_data``.

Per step, with G(z) the network's one-step sample (its x0-prediction at t_max), x ~ data,
eps, z ~ N(0, I), and t drawn uniformly over the fractions [0, ``flow_t_max``]:
  L_real    = d(F(x_t, t),          target(x, eps, t))        flow matching on data
  L_adv     = d(F(x^f_t, -t),       target(sg G(z), eps, t))  flow matching on fakes (twin)
  L_rectify = d(G(z), sg(G(z) + clamp(dx)))                   velocity rectification
with dx = (x0^+(x^g_t, t) - x0^-(x^g_t, t)) / sigma(t) at a fresh noising x^g_t of sg G(z),
x0^+ / x0^- the network's x0-predictions on the positive / negative branch (no gradient),
and L = real_weight L_real + adv_weight L_adv + rectify_weight L_rectify. F is the network's
raw output, so the targets are in its own parameterization (velocity for flow models).

What we derived, and why (the reference code, ``src/methodes/twinflow/twinflow.py``, was
our source for the losses):
- Reference L_rectify (``dist_match`` + the ``e2e`` term) is d(F, sg(F - clamp(v^- - v^+)))
  on the velocity F of the one-step map of rectified flow, x = z - F. Since
  v = (x_t - x0) / t there, v^- - v^+ = (x0^+ - x0^-) / t and d on F equals d on x with the
  opposite shift: that is the dx above, written for any path with sigma(t) for t. Its
  direction is DMD's (towards the real x0-prediction, away from the fake one).
- d is the reference's default Barron-reweighted L2 with alpha = 1, i.e. per sample
  sqrt(mse + c^2) - c (Charbonnier on the per-sample RMS error; same gradient up to 2).
- Negative time: the network is evaluated with its network time negated (-c_noise(t)),
  while every path coefficient still uses |t| (``negative_time``). That needs a path whose
  network time is >= 0 (rectified flow, VP, TrigFlow; not EDM's log-sigma).
- fewstep's denoisers take one time, not TwinFlow's pair (t, target time); the one-step map
  is the positive branch at t_max, so the flow terms use times up to ``flow_t_max`` < 1
  and never train the generator's input time. For the same reason the paper's any-step
  (RCGM) consistency term and multi-step students are not available: 1 step only.
- The reference splits each batch in quarters (one-step, multi-step, any-step, adversarial);
  here every term uses the whole batch. Its CFG-baking "enhanced target" is not included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import noised, sample_times, student_x0
from fewstep.core.paths import Path
from fewstep.core.samplers import FewStepSampler


@dataclass
class TwinFlowConfig(ObjectiveConfig):
    flow_t_max: float = 0.8  # flow terms use path fractions [0, flow_t_max]; G lives at 1
    real_weight: float = 1.0  # weight of flow matching on data (positive times)
    adv_weight: float = 1.0  # weight of flow matching on the network's own samples (t < 0)
    rectify_weight: float = 0.5  # weight of the velocity rectification (reference: 0.5)
    clamp: float = 1.0  # elementwise clamp of the rectification step (reference: 1)
    metric: Literal["l2", "barron"] = "l2"  # per-sample distance (reference code: barron)
    barron_c: float = 1e-3  # Barron / Charbonnier scale c (reference: 1e-3)


METRICS = ("barron", "l2")


class _MirroredTime:
    """A path that equals ``base`` except that networks see -base.network_time(t)."""

    def __init__(self, base: Path):
        self._base = base

    def network_time(self, t: Tensor) -> Tensor:
        return -self._base.network_time(t)

    def __getattr__(self, name: str):
        if name == "_base":  # not set yet (e.g. during copying): no recursion
            raise AttributeError(name)
        return getattr(self._base, name)


@contextmanager
def negative_time(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` on the twin (negative-time) branch: every ``Denoiser`` inside it
    conditions its network on -c_noise(t) while all path coefficients still use t."""
    dens = [m for m in model.modules() if isinstance(m, Denoiser)]
    saved = [m.path for m in dens]
    try:
        for m in dens:
            m.path = _MirroredTime(m.path)
        yield model
    finally:
        for m, p in zip(dens, saved, strict=True):
            m.path = p


def twin_metric(a: Tensor, b: Tensor, metric: str = "barron", c: float = 1e-3) -> Tensor:
    """Mean over samples of d(a_i, b_i), a, b: (B, ...). ``l2``: the mean squared error;
    ``barron``: sqrt(mse_i + c^2) - c, whose gradient equals (up to a factor 2) that of the
    reference's Barron-reweighted L2 with alpha = 1, mse_i * sg((mse_i / c^2 + 1)^-1/2) / c."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    if metric == "l2":
        return mse.mean()
    if metric == "barron":
        return ((mse + c * c).sqrt() - c).mean()
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def rectify_step(x0_pos: Tensor, x0_neg: Tensor, sigma: Tensor, clamp: float) -> Tensor:
    """The rectification shift of a one-step sample: clamp((x0^+ - x0^-) / sigma(t)),
    the reference's v^- - v^+ on rectified flow. x0_*: (B, ...); sigma: broadcastable."""
    return ((x0_pos - x0_neg) / sigma).clamp(-clamp, clamp)


class TwinFlow(Objective):
    name = "twinflow"
    config_cls = TwinFlowConfig
    roles = ("student",)
    needs_data = True
    summary = "one network: flow on data at t > 0, on its own samples at t < 0 (Cheng 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.student_steps != 1 or cfg.student_times not in ((), (1.0,)):
            raise ValueError(
                "twinflow trains a one-step generator at t_max (fewstep denoisers have no "
                "target-time input for the paper's any-step map): student_steps must be 1 "
                f"and student_times empty, got {cfg.student_steps} and {cfg.student_times}"
            )
        if not 0.0 < cfg.flow_t_max < 1.0:
            raise ValueError(
                f"flow_t_max must be in (0, 1) (the generator owns fraction 1), got "
                f"{cfg.flow_t_max}"
            )
        if cfg.metric not in METRICS:
            raise ValueError(f"unknown metric {cfg.metric!r}; expected one of {METRICS}")
        weights = (cfg.real_weight, cfg.adv_weight, cfg.rectify_weight)
        if min(weights) < 0 or not cfg.clamp > 0:
            raise ValueError(
                f"weights must be >= 0 and clamp > 0, got {weights} and clamp={cfg.clamp}"
            )
        check_mirrorable(self.path)

    def student_sampler(self):
        return FewStepSampler([1.0])

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        return {"student": student}

    def flow_loss(self, model: Denoiser, x0: Tensor, cond, batch: Batch, twin: bool) -> Tensor:
        """Flow matching of ``model`` on samples x0 at path fractions [0, flow_t_max], on
        the positive branch or (``twin``) the negative one, in the model's parameterization."""
        cfg = self.config
        t = sample_times(self.path, batch, (0.0, cfg.flow_t_max))
        x_t, eps = noised(self.path, x0, t, batch)
        target = self.path.from_x0_eps(x0, eps, model.prediction, t)
        if twin:
            with negative_time(model):
                pred = model(x_t, t, cond)
        else:
            pred = model(x_t, t, cond)
        return twin_metric(pred, target, cfg.metric, cfg.barron_c)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        if batch.x is None:
            raise ValueError("twinflow needs real data in the batch (batch.x is None)")
        model = roles["student"]
        logs = {}
        x_gen, _ = student_x0(model, self.student_sampler(), batch, backward_simulation=False)

        real = self.flow_loss(model, batch.x, batch.cond, batch, twin=False)
        adv = self.flow_loss(model, x_gen.detach(), batch.cond, batch, twin=True)

        t = sample_times(self.path, batch, (0.0, cfg.flow_t_max))
        x_t, _ = noised(self.path, x_gen.detach(), t, batch)
        with torch.no_grad():
            x0_pos = model.predict(x_t, t, batch.cond, kind="x0")
            with negative_time(model):
                x0_neg = model.predict(x_t, t, batch.cond, kind="x0")
            _, sigma = self.path.coeffs(t, x_t)
            step_x = rectify_step(x0_pos, x0_neg, sigma, cfg.clamp)
        rectify = twin_metric(x_gen, (x_gen + step_x).detach(), cfg.metric, cfg.barron_c)

        logs.update(
            real_loss=real.item(),
            adv_loss=adv.item(),
            rectify_loss=rectify.item(),
            rectify_step=step_x.abs().mean().item(),
        )
        loss = cfg.real_weight * real + cfg.adv_weight * adv + cfg.rectify_weight * rectify
        return {"student": loss}, logs


def check_mirrorable(path: Path, points: int = 64) -> None:
    """The twin branch negates the network time, so it must be >= 0 on the path (and > 0
    past t_min) for the negative branch to be a distinct input."""
    t = path.fraction_to_t(torch.linspace(0.0, 1.0, points))
    nt = path.network_time(t)
    if not (nt[0] >= 0 and (nt[1:] > 0).all()):
        raise ValueError(
            f"twinflow needs a path whose network time is positive after t_min (it negates it "
            f"for the twin branch); path {path.name!r} maps times to "
            f"[{float(nt.min()):.3g}, {float(nt.max()):.3g}]"
        )
