"""Reflow: straighten the teacher's probability-flow ODE by retraining on its own couplings.

Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow" (ICLR 2023), eq. 1 and alg. 1 (k-rectified flow): given the coupling
(Z, X0 = ODE_teacher(Z)) of noise and the teacher's ODE solution from it, train a velocity
field on the straight interpolation X_t = (1 - t) X0 + t Z with
    min_v  E_t,(Z, X0) || (Z - X0) - v(X_t, t) ||^2.
Because the coupling is deterministic, the retrained ("2-rectified") flow has nearly straight
trajectories and few Euler steps reproduce the teacher's ODE endpoint.

Lee, Lin & Fanti, "Improving the Training of Rectified Flows" (NeurIPS 2024; code
sangyun884/rfpp), sec. 3-4: one reflow round is enough; times are drawn from a U-shaped
density that concentrates on both ends (their ``t_dist.py``: an equal mixture of the
exponential density C e^{a f} on [0, 1] and its mirror, i.e.
    p(f) = a (e^{a f} + e^{a (1 - f)}) / (2 (e^a - 1)),   a = 4,
which is U-shaped around f = 1/2); the squared error is replaced by the pseudo-Huber
premetric sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) (over the whole sample, as in
iCT), and LPIPS-Huber adds a perceptual distance on the predicted clean sample,
    m = (1 - f) Huber(v_theta, Z - X0) + LPIPS(x0_theta, X0).
LPIPS needs downloaded VGG weights, which fewstep cannot fetch: ``metric="feature_huber"``
uses instead the pseudo-Huber distance between features of a fixed network, by default the
teacher's own ``features`` at path fraction ``feature_frac`` (set ``Reflow.feature_fn`` to
any ``fn(x0, cond) -> features`` to use another network).

Any path. Pairs are (z, x0) with x0 the teacher's ODE solution from the prior sample
``path.prior(z)``. The student is trained on the path's own interpolation of the pair,
x_t = alpha(t) x0 + sigma(t) eps*, with eps* = (prior(z) - alpha(t_max) x0) / sigma(t_max)
so that x_{t_max} is exactly the sampler's starting point. On rectified flow this is the
straight line above (eps* = z) and the loss on the student's velocity is Liu's eq. 1. On a VP
(or EDM) path the interpolation is a straight line in DDIM's coordinates (x / alpha against
sigma / alpha), so the student keeps the teacher's parameterization (e.g. eps on the VP path;
the loss is compared in ``loss_space``, by default the student's own) and DDIM, which is
Euler in those coordinates, follows it exactly. The student is sampled deterministically
with ``EulerSampler`` on its few-step grid (DDIM; on rectified flow plain Euler): a reflowed
model is an ODE whose straightness is what makes few steps work, and the re-noising
``FewStepSampler`` would throw the coupling away.

Pairs are generated once at build time (``num_pairs`` with ``pair_steps`` steps of the
teacher's ``solver``, labels drawn from the example batch's conditions for conditional
teachers) and kept as buffers of the frozen role ``pairs`` (checkpointed), or regenerated
per batch from the batch's noise and conditions (``online=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch, index_cond
from fewstep.core.models import Denoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import (
    euler_grid,
    first,
    sample_shape,
    step_fractions,
    unguided,
)
from fewstep.core.paths import PREDICTIONS, Path
from fewstep.core.samplers import EulerSampler, HeunSampler

Metric = Literal["l2", "huber", "feature_huber"]
F_EPS = 1e-5  # fractions are kept in [F_EPS, 1 - F_EPS] (rfpp's t_min / t_max)


@dataclass
class ReflowConfig(ObjectiveConfig):
    num_pairs: int = 4096  # offline: teacher (noise, sample) pairs generated at build time
    pair_steps: int = 16  # teacher ODE steps per pair
    solver: Literal["euler", "heun"] = "heun"  # teacher ODE solver for the pairs (euler = DDIM)
    online: bool = False  # regenerate the pairs every batch (batch noise and conditions)
    pair_seed: int = 0  # offline: seed of the pairs' noise and label draws
    pair_chunk: int = 4096  # offline: pairs per teacher call at build time
    t_density: Literal["u_shaped", "uniform"] = "u_shaped"  # training-time density (rfpp)
    u_shape_a: float = 4.0  # a of the U-shaped density (rfpp: 4)
    metric: Metric = "huber"  # l2 (Liu 2023), pseudo-Huber or feature-Huber (Lee 2024)
    huber_c: float = 0.0  # pseudo-Huber c; 0 = 0.00054 sqrt(d) (iCT, rfpp)
    loss_space: str = "native"  # prediction kind compared by the loss; native = student's own
    feature_weight: float = 1.0  # feature_huber: weight of the feature term
    feature_frac: float = 0.0  # feature_huber: path fraction of the teacher's features


# ----------------------------------------------------------------------------- pure math


def u_shaped_fraction(u: Tensor, a: float) -> Tensor:
    """(B, 2) uniforms -> (B,) path fractions from p(f) ∝ e^{a f} + e^{a (1 - f)} (rfpp).

    Column 0 picks the side, column 1 is inverted through the truncated exponential's CDF
    F(e) = (e^{a e} - 1) / (e^a - 1)."""
    e = torch.log1p(u[:, 1] * math.expm1(a)) / a
    f = torch.where(u[:, 0] < 0.5, e, 1.0 - e)
    return F_EPS + (1.0 - 2 * F_EPS) * f


def pseudo_huber_norm(a: Tensor, b: Tensor, c: float) -> Tensor:
    """(B,) sqrt(||a - b||^2 + c^2) - c over each whole sample (iCT; rfpp's Huber)."""
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def default_huber_c(x: Tensor) -> float:
    """0.00054 sqrt(d) for samples of d numbers (Song & Dhariwal 2023, iCT)."""
    return 0.00054 * math.sqrt(x[0].numel())


def pair_noise(path: Path, z: Tensor, x0: Tensor) -> Tensor:
    """eps* with alpha(t_max) x0 + sigma(t_max) eps* = path.prior(z): the pair's noise as
    the path's interpolation needs it to start where the sampler starts (= z on rectified
    flow, where alpha(t_max) = 0)."""
    t_max = torch.tensor(path.t_max)
    a, s = path.coeffs(t_max, x0)
    return (path.prior(z) - a * x0) / s


def per_sample(d: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over all but the batch dimension."""
    return d.float().flatten(1).mean(1)


# ------------------------------------------------------------------- pairs and samplers


def ode_solution(
    model: Denoiser, z: Tensor, cond: Any, steps: int, solver: str = "euler"
) -> Tensor:
    """The model's ODE solution from ``path.prior(z)`` with ``steps`` steps (no gradient)."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown ODE solver {solver!r}; expected 'euler' or 'heun'")
    sampler = EulerSampler(steps) if solver == "euler" else HeunSampler(steps)
    return sampler.sample(model, z, cond).x


class PairBuffer(nn.Module):
    """Teacher couplings as buffers (so checkpoints carry them): noise z (N, ...), the
    teacher's ODE solution x0 (N, ...) and, for conditional teachers, their conditions."""

    def __init__(self, z: Tensor, x0: Tensor, cond: Any = None):
        super().__init__()
        self.register_buffer("z", z.contiguous())
        self.register_buffer("x0", x0.contiguous())
        self.cond_keys: tuple[str, ...] | None = None  # None: tensor or no condition
        if isinstance(cond, dict):
            self.cond_keys = tuple(sorted(cond))
            for k in self.cond_keys:
                self.register_buffer(f"cond_{k}", cond[k].contiguous())
        elif cond is not None:
            self.register_buffer("cond", cond.contiguous())
        else:
            self.cond = None

    def __len__(self) -> int:
        return self.z.shape[0]

    def draw(self, idx: Tensor) -> tuple[Tensor, Tensor, Any]:
        idx = idx.to(self.z.device)
        if self.cond_keys is not None:
            cond = {k: getattr(self, f"cond_{k}")[idx] for k in self.cond_keys}
        else:
            cond = None if self.cond is None else self.cond[idx]
        return self.z[idx], self.x0[idx], cond


# ------------------------------------------------------------------------------ objective


class Reflow(Objective):
    name = "reflow"
    config_cls = ReflowConfig
    roles = ("student",)
    frozen_roles = ("pairs",)  # offline pairs only
    needs_data = False
    summary = "one reflow round on teacher ODE pairs, U-shaped t, pseudo-Huber (Liu 2023; Lee 2024)"

    #: ``fn(x0, cond) -> features`` for ``metric="feature_huber"``; None = teacher features
    feature_fn: Callable[[Tensor, Any], Tensor] | None = None

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        self.validate()

    def validate(self) -> None:
        cfg = self.config
        positive = {"num_pairs": cfg.num_pairs, "pair_steps": cfg.pair_steps}
        positive |= {"pair_chunk": cfg.pair_chunk, "student_steps": cfg.student_steps}
        for key, v in positive.items():
            if v < 1:
                raise ValueError(f"{self.name}: {key} must be >= 1, got {v}")
        if cfg.solver not in ("euler", "heun"):
            raise ValueError(f"{self.name}: solver must be 'euler' or 'heun', got {cfg.solver!r}")
        if cfg.t_density not in ("u_shaped", "uniform"):
            raise ValueError(
                f"{self.name}: t_density must be 'u_shaped' or 'uniform', got {cfg.t_density!r}"
            )
        if cfg.u_shape_a <= 0:
            raise ValueError(f"{self.name}: u_shape_a must be > 0, got {cfg.u_shape_a}")
        if cfg.metric not in ("l2", "huber", "feature_huber"):
            raise ValueError(
                f"{self.name}: metric must be 'l2', 'huber' or 'feature_huber', got {cfg.metric!r}"
            )
        if cfg.loss_space != "native" and cfg.loss_space not in PREDICTIONS:
            raise ValueError(
                f"{self.name}: loss_space must be 'native' or one of {PREDICTIONS}, "
                f"got {cfg.loss_space!r}"
            )
        if cfg.huber_c < 0 or not 0.0 <= cfg.feature_frac <= 1.0:
            raise ValueError(f"{self.name}: need huber_c >= 0 and feature_frac in [0, 1]")
        step_fractions(self.name, cfg.student_steps, cfg.student_times)

    # --- roles ------------------------------------------------------------------------------
    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        if type(student.path) is not type(self.path):
            raise ValueError(
                f"{self.name}: the student must live on the teacher's path "
                f"({self.path.name}), got {student.path.name}"
            )
        if self.config.metric == "feature_huber" and self.feature_fn is None:
            x = torch.zeros(1, *sample_shape(example), device=example.rng.device)
            try:
                self.features(x, first(example.cond))
            except NotImplementedError as err:
                raise ValueError(
                    f"{self.name}: metric='feature_huber' needs a teacher that exposes "
                    f"features ({err}) or Reflow.feature_fn set to fn(x0, cond) -> features"
                ) from err
        roles: dict[str, nn.Module] = {"student": student}
        if not self.config.online:
            roles["pairs"] = self.make_pairs(example)
        return roles

    @torch.no_grad()
    def make_pairs(self, example: Batch) -> PairBuffer:
        """``num_pairs`` teacher couplings from a fixed seed; conditional teachers get labels
        drawn with replacement from the example batch's conditions."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.pair_seed)
        device = example.rng.device
        z = torch.randn(cfg.num_pairs, *sample_shape(example), generator=gen).to(device)
        cond = None
        if example.cond is not None:
            n = example.size
            cond = index_cond(example.cond, torch.randint(0, n, (cfg.num_pairs,), generator=gen))
        x0 = torch.cat(
            [
                ode_solution(
                    self.teacher,
                    z[i : i + cfg.pair_chunk],
                    index_cond(cond, torch.arange(i, min(i + cfg.pair_chunk, cfg.num_pairs))),
                    cfg.pair_steps,
                    cfg.solver,
                )
                for i in range(0, cfg.num_pairs, cfg.pair_chunk)
            ]
        )
        return PairBuffer(z, x0, cond)

    def draw_pairs(self, roles, batch: Batch, step: int) -> tuple[Tensor, Tensor, Any]:
        """(z, x0, cond) for this batch: stored pairs, or fresh teacher solutions online."""
        cfg = self.config
        if cfg.online:
            z = batch.rng.randn(*sample_shape(batch))
            with torch.no_grad():
                x0 = ode_solution(self.teacher, z, batch.cond, cfg.pair_steps, cfg.solver)
            return z, x0, batch.cond
        pairs: PairBuffer = roles["pairs"]
        return pairs.draw(batch.rng.randint(0, len(pairs)))

    # --- the loss -----------------------------------------------------------------------------
    def draw_fractions(self, batch: Batch) -> Tensor:
        """(B,) path fractions (1 = noise) from the configured density."""
        cfg = self.config
        if cfg.t_density == "u_shaped":
            return u_shaped_fraction(batch.rng.rand(2), cfg.u_shape_a)
        return F_EPS + (1.0 - 2 * F_EPS) * batch.rng.rand()

    def features(self, x0: Tensor, cond: Any) -> Tensor:
        if self.feature_fn is not None:
            return self.feature_fn(x0, cond)
        t = self.path.fraction_to_t(self.config.feature_frac).to(x0.device).expand(x0.shape[0])
        return unguided(self.teacher).features(x0, t, cond)

    def flow_loss(
        self, student: Denoiser, z: Tensor, x0: Tensor, cond: Any, f: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Reflow loss on the pair's interpolation at path fractions ``f`` (Liu 2023 eq. 1
        with Lee 2024's premetrics). z, x0: (B, ...); f: (B,)."""
        cfg, path = self.config, self.path
        eps = pair_noise(path, z, x0)
        t = path.fraction_to_t(f).to(x0.device)
        x_t = path.noise(x0, t, eps)
        kind = student.prediction if cfg.loss_space == "native" else cfg.loss_space
        pred = student.predict(x_t, t, cond, kind=kind)
        target = path.from_x0_eps(x0, eps, kind, t)
        c = cfg.huber_c or default_huber_c(x0)
        logs: dict[str, float] = {}
        if cfg.metric == "l2":
            per = per_sample((pred - target).pow(2))
        else:
            per = pseudo_huber_norm(pred, target, c)
        if cfg.metric == "feature_huber":
            x0_hat = path.convert(pred, kind, "x0", x_t, t)
            fp, ft = self.features(x0_hat, cond), self.features(x0, cond)
            feat = pseudo_huber_norm(fp, ft.detach(), default_huber_c(fp))
            logs["feature_huber"] = feat.mean().item()
            per = (1.0 - f.to(per)) * per + cfg.feature_weight * feat
        loss = per.mean()
        logs["reflow_loss"] = loss.item()
        return loss, logs

    def losses(self, roles, batch, update, step):
        z, x0, cond = self.draw_pairs(roles, batch, step)
        loss, logs = self.flow_loss(roles["student"], z, x0, cond, self.draw_fractions(batch))
        return {"student": loss}, logs

    def student_sampler(self) -> EulerSampler:
        """Deterministic Euler / DDIM on the student's few-step grid (see module doc)."""
        return euler_grid(self.path, self.config.student_steps, self.config.student_times)
