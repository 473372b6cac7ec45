"""SlimFlow: a smaller one-step student through annealing reflow and flow-guided
distillation.

Zhu, Liu, Zhang, Lin, Wang & Zhang, "SlimFlow: Training Smaller One-Step Diffusion Models
with Rectified Flow" (ECCV 2024), sec. 4 (code yuanzhi-zhu/SlimFlow):

* annealing reflow (sec. 4.1, eq. 6): a small student that starts from random
  initialisation cannot inherit the large teacher's flow, so the reflow target anneals from
  1-rectified flow on the teacher's samples (noise independent of the sample) to the
  teacher's couplings: the pair's noise is
      z_beta = sqrt(1 - beta^2) z + beta eps,   eps ~ N(0, I) fresh,
  with beta(step) going from 1 to 0 over ``anneal_steps`` (cosine by default, as the
  authors' ``x0_randomness`` warm-up), and the student is trained on the reflow loss of
  ``reflow.Reflow`` with (z_beta, x0). The result is the small 2-rectified flow v_2.
* flow-guided distillation (sec. 4.2, eq. 8): the one-step student is regressed onto the
  ODE solution of v_2 from the same noise (InstaFlow's distillation), plus a term from the
  2-step flow of v_2: from the student's own one-step line, stop at a random fraction tau in
  ``guide_range`` (x_tau = alpha(tau) x0_theta + sigma(tau) eps_theta, detached), take one
  Euler / DDIM step of v_2 to clean data and regress the one-step prediction onto that:
      L = D(x0_theta(z), ODE[v_2](z)) + guide_weight * D(x0_theta(z), x0_{v_2}(x_tau, tau)).
  On rectified flow the second term is the authors' ``teacher_loss_new`` (the velocity
  difference of their code is the difference of the clean samples).

One trainer run as in ``instaflow.InstaFlow``: steps below ``reflow_steps`` anneal-reflow,
then the student is frozen into the role ``reflowed`` (v_2) and distilled. The student is the
network given to the trainer (a smaller, freshly initialised one, on the teacher's path);
``param_ratio`` is logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.objectives.common import euler_grid, sample_shape
from fewstep.core.objectives.instaflow import InstaFlow, InstaFlowConfig, sample_distance


@dataclass
class SlimFlowConfig(InstaFlowConfig):
    t_density: Literal["u_shaped", "uniform"] = "uniform"  # SlimFlow trains on uniform times
    metric: Literal["l2", "huber", "feature_huber"] = "l2"  # reflow premetric (SlimFlow: l2)
    anneal_steps: int = 200  # steps over which beta goes from 1 (random pairs) to 0 (teacher's)
    anneal: Literal["cosine", "linear", "exp"] = "cosine"  # shape of beta(step)
    guide_weight: float = 1.0  # weight of the flow-guided (2-step) term
    guide_range: tuple[float, float] = (0.2, 0.8)  # tau's range as path fractions (authors')


def anneal_beta(step: int, steps: int, kind: str) -> float:
    """beta(step) from 1 to 0 (SlimFlow's pair randomness; authors' x0_randomness)."""
    if steps <= 0:
        return 0.0
    r = min(step / steps, 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * r))
    if kind == "linear":
        return 1.0 - r
    if kind == "exp":
        return math.exp(-step / steps)
    raise ValueError(f"unknown anneal shape {kind!r}; expected cosine, linear or exp")


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SlimFlow(InstaFlow):
    name = "slimflow"
    config_cls = SlimFlowConfig
    summary = "smaller one-step student: annealing reflow, flow-guided distillation (Zhu 2024)"

    def validate(self) -> None:
        super().validate()
        cfg = self.config
        anneal_beta(0, 1, cfg.anneal)  # validates the shape name
        lo, hi = cfg.guide_range
        if cfg.anneal_steps < 0 or cfg.guide_weight < 0 or not 0.0 < lo <= hi < 1.0:
            raise ValueError(
                f"{self.name}: need anneal_steps >= 0, guide_weight >= 0 and "
                f"0 < guide_range[0] <= guide_range[1] < 1, got {cfg.anneal_steps}, "
                f"{cfg.guide_weight}, {cfg.guide_range}"
            )

    def build_roles(self, student, example):
        roles = super().build_roles(student, example)
        self.param_ratio = param_count(student) / max(param_count(self.teacher), 1)
        return roles

    def draw_pairs(self, roles, batch: Batch, step: int):
        """Teacher couplings with the noise annealed from independent to paired (eq. 6)."""
        z, x0, cond = super().draw_pairs(roles, batch, step)
        beta = anneal_beta(step, self.config.anneal_steps, self.config.anneal)
        if beta > 0:
            z = math.sqrt(1.0 - beta * beta) * z + beta * batch.rng.randn_like(z)
        return z, x0, cond

    def losses(self, roles, batch, update, step):
        losses, logs = super().losses(roles, batch, update, step)
        logs["param_ratio"] = self.param_ratio
        if self.stage(step) == "reflow":
            logs["anneal_beta"] = anneal_beta(step, self.config.anneal_steps, self.config.anneal)
        return losses, logs

    def distill_loss(self, roles, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Flow-guided distillation (eq. 8): distance to v_2's ODE solution plus distance to
        v_2's one-step completion of the student's own line from tau."""
        cfg, path = self.config, self.path
        student, reflowed = roles["student"], roles["reflowed"]
        z = batch.rng.randn(*sample_shape(batch))
        cond = batch.cond
        with torch.no_grad():
            target = euler_grid(path, cfg.target_steps).sample(reflowed, z, cond).x
        t_max = torch.full((z.shape[0],), path.t_max, device=z.device)
        x0_s, eps_s = student.x0_eps(path.prior(z), t_max, cond)
        lo, hi = cfg.guide_range
        tau = path.fraction_to_t(lo + (hi - lo) * batch.rng.rand()).to(z.device)
        with torch.no_grad():
            x_tau = path.noise(x0_s.detach(), tau, eps_s.detach())
            guide = reflowed.predict(x_tau, tau, cond, kind="x0")
        dist = sample_distance(x0_s, target, cfg.distill_metric, cfg.huber_c).mean()
        flow_guided = sample_distance(x0_s, guide, cfg.distill_metric, cfg.huber_c).mean()
        loss = dist + cfg.guide_weight * flow_guided
        return loss, {"distill_loss": dist.item(), "flow_guided_loss": flow_guided.item()}
