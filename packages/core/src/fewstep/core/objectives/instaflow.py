"""InstaFlow: reflow, then distil the reflowed flow into one step.

Liu, Zhang, Ma, Peng & Liu, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation" (ICLR 2024), sec. 3 and fig. 4 (code gnobitab/InstaFlow):

* stage 1 (reflow, their eq. 3, = Liu et al. 2023 eq. 1): train the student on the
  teacher's ODE couplings (z, x0) exactly as ``reflow.Reflow`` does (U-shaped times and
  pseudo-Huber of Lee et al. 2024 available);
* stage 2 (distillation, their eq. 4): the reflowed model v_k becomes a frozen role and the
  student is trained to reach its ODE solution from the same noise in one step,
      min_theta E_z D( ODE[v_k](z), z + v_theta(z, t_max) ),
  i.e. D(x0_theta(prior(z), t_max), ODE[v_k](z)) in the sample space, with D the squared
  error or the pseudo-Huber distance (InstaFlow uses LPIPS, which fewstep cannot download).
  The ODE target is solved online with ``target_steps`` Euler (DDIM) steps of the frozen
  reflowed model.

One trainer run: steps below ``reflow_steps`` are stage 1; at the last of them the student
is copied into the frozen role ``reflowed`` (``after_update``), which is checkpointed, so a
run resumed after the switch keeps the same target. The student continues from its
reflowed weights (InstaFlow initialises the distilled model from 2-rectified flow).
Sampling: one Euler / DDIM step from the prior (``common.euler_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, frozen_copy
from fewstep.core.objectives.common import euler_grid, sample_shape
from fewstep.core.objectives.reflow import (
    Reflow,
    ReflowConfig,
    default_huber_c,
    per_sample,
    pseudo_huber_norm,
)


@dataclass
class InstaFlowConfig(ReflowConfig):
    reflow_steps: int = 300  # stage 1 (reflow) steps; the remaining steps distil
    target_steps: int = 8  # Euler (DDIM) steps of the reflowed model for the distillation target
    distill_metric: Literal["l2", "huber"] = "l2"  # D in stage 2 (squared error or pseudo-Huber)


def sample_distance(pred: Tensor, target: Tensor, metric: str, c: float = 0.0) -> Tensor:
    """(B,) D(pred, target): mean squared error or pseudo-Huber over each sample."""
    if metric == "l2":
        return per_sample((pred - target).pow(2))
    if metric == "huber":
        return pseudo_huber_norm(pred, target, c or default_huber_c(pred))
    raise ValueError(f"unknown distillation metric {metric!r}; expected 'l2' or 'huber'")


class InstaFlow(Reflow):
    name = "instaflow"
    config_cls = InstaFlowConfig
    roles = ("student",)
    frozen_roles = ("pairs", "reflowed")
    needs_data = False
    summary = "reflow, then one-step distillation of the reflowed flow (Liu et al. 2024)"

    def validate(self) -> None:
        super().validate()
        cfg = self.config
        if cfg.reflow_steps < 0 or cfg.target_steps < 1:
            raise ValueError(
                f"{self.name}: need reflow_steps >= 0 and target_steps >= 1, got "
                f"{cfg.reflow_steps} and {cfg.target_steps}"
            )
        if cfg.distill_metric not in ("l2", "huber"):
            raise ValueError(
                f"{self.name}: distill_metric must be 'l2' or 'huber', got {cfg.distill_metric!r}"
            )
        if cfg.student_steps != 1 or len(cfg.student_times) > 1:
            raise ValueError(f"{self.name} trains a one-step student; set student_steps=1")

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        roles = super().build_roles(student, example)
        roles["reflowed"] = frozen_copy(student)  # overwritten at the end of stage 1
        return roles

    def stage(self, step: int) -> str:
        return "reflow" if step < self.config.reflow_steps else "distill"

    def one_step(self, student: Denoiser, z: Tensor, cond) -> Tensor:
        """The student's one-step sample x0_theta(prior(z), t_max) (with gradient)."""
        t = torch.full((z.shape[0],), self.path.t_max, device=z.device)
        return student.predict(self.path.prior(z), t, cond, kind="x0")

    def distill_loss(self, roles, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """InstaFlow eq. 4: D(one-step student, ODE[reflowed](z))."""
        cfg = self.config
        z = batch.rng.randn(*sample_shape(batch))
        sampler = euler_grid(self.path, cfg.target_steps)
        with torch.no_grad():
            target = sampler.sample(roles["reflowed"], z, batch.cond).x
        pred = self.one_step(roles["student"], z, batch.cond)
        loss = sample_distance(pred, target, cfg.distill_metric, cfg.huber_c).mean()
        return loss, {"distill_loss": loss.item()}

    def losses(self, roles, batch, update, step):
        if self.stage(step) == "reflow":
            return super().losses(roles, batch, update, step)
        loss, logs = self.distill_loss(roles, batch)
        return {"student": loss}, logs

    def after_update(self, roles, updated, step):
        if step == self.config.reflow_steps - 1:  # end of stage 1: freeze the reflowed flow
            roles["reflowed"].load_state_dict(roles["student"].state_dict())
