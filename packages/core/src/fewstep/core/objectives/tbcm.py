"""TBCM: trajectory-backward consistency model (data-free continuous-time CD).

Tang et al., "Image-Free Timestep Distillation via Continuous-Time Consistency with
Trajectory-Sampled Pairs" (2025; public code hustvl/TBCM). sCM's continuous-time
consistency distillation (``scm.py``) where the training pairs (x_t, dx_t/dt) are not real
data noised to t but points of the teacher's own sampling trajectory from noise, with the
teacher velocity computed there anyway: no data, no VAE encoding, and training points from
the distribution the student meets at inference.

Pairs are drawn as in the reference code (``compute_refer_route`` and
``sample_ordered_timesteps_from_ref``): a reference route of ``route_steps`` angles from the
top of the range down to its bottom (uniform in the teacher path's native time: the
teacher's own sampling grid, mapped to TrigFlow angles); per trajectory the route keeps its
first angle and draws one uniform angle inside each following interval (``route_jitter``).
The teacher runs from TrigFlow noise sd z along the route with exact TrigFlow DDIM steps
x <- cos(dt) x - sin(dt) dx/dt, and every visited point after the first is a training pair
(batch x (route_steps - 1) pairs per step). The sCM loss is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.objectives.common import sample_shape
from fewstep.core.objectives.scm import SCM, SCMConfig
from fewstep.core.objectives.trigflow import path_angle


@dataclass
class TBCMConfig(SCMConfig):
    route_steps: int = 8  # teacher steps per trajectory: route_steps - 1 pairs per sample
    route_jitter: bool = True  # one uniform angle per route interval, else the fixed grid


def repeat_cond(cond, k: int):
    """A batched condition (tensor, dict of tensors or None) repeated k times along dim 0."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: repeat_cond(v, k) for key, v in cond.items()}
    return torch.cat([cond] * k, dim=0)


class TBCM(SCM):
    name = "tbcm"
    config_cls = TBCMConfig
    needs_data = False
    summary = "data-free sCM on pairs from the teacher's own sampling trajectory (Tang 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        if self.config.route_steps < 2:
            raise ValueError(f"route_steps must be >= 2, got {self.config.route_steps}")

    def reference_route(self) -> Tensor:
        """(route_steps,) decreasing angles: the teacher path's uniform native grid."""
        path, n = self.teacher.path, self.config.route_steps
        s = path.fraction_to_t(torch.linspace(1.0, 0.0, n))
        lo, hi = self.teacher_view.path.t_min, self.teacher_view.path.t_max
        return path_angle(path, s, self.config.sigma_data).clamp(lo, hi)

    def route(self, batch: Batch) -> Tensor:
        """(B, route_steps) per-sample angles: the first reference angle, then one angle in
        each following reference interval (uniform when ``route_jitter``)."""
        ref = self.reference_route().to(batch.rng.device)
        n = ref.shape[0]
        hi, lo = ref[:-1], ref[1:]
        u = batch.rng.rand(n - 1) if self.config.route_jitter else torch.zeros(batch.size, n - 1)
        inner = lo + u.to(ref) * (hi - lo)
        return torch.cat([ref[:1].expand(batch.size, 1), inner], dim=1)

    def teacher_velocity(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """dx/dt of the teacher's probability-flow ODE in TrigFlow (= sd F_teacher)."""
        return self.teacher_view(x, t, cond)

    def training_points(self, roles, batch: Batch):
        view = self.teacher_view
        route = self.route(batch)
        noise = batch.rng.randn(*sample_shape(batch))
        x = view.path.noise(torch.zeros_like(noise), route[:, 0], noise)  # sd sin(t0) z
        xs, ts, vs = [], [], []
        with torch.no_grad():
            for i in range(route.shape[1]):
                t = route[:, i]
                v = self.teacher_velocity(x, t, batch.cond)
                if i > 0:
                    xs.append(x)
                    ts.append(t)
                    vs.append(v)
                if i + 1 < route.shape[1]:
                    x0, eps = view.path.to_x0_eps(v, "velocity", x, t)
                    x = view.path.noise(x0, route[:, i + 1], eps)
        k = len(xs)
        return torch.cat(xs), torch.cat(ts), torch.cat(vs), repeat_cond(batch.cond, k)
