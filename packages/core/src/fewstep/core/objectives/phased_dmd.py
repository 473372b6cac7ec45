"""Phased DMD: few-step distribution matching with one expert per SNR phase.

Fan et al., "Phased DMD: Few-step Distribution Matching Distillation via Score Matching
within Subintervals" (arXiv 2510.27684, 2025).

The path is cut at fractions 1 = f_0 > f_1 > ... > f_{K-1} > f_K = 0 (``student_times``,
default uniform over ``student_steps``). The student is a mixture of K experts routed by time:
expert k maps the state x_{f_k} to x_{f_{k+1}} by predicting (x0^, eps^) at f_k and stepping

    ode:  x_s = alpha_s x0^ + sigma_s eps^       (DDIM = Euler on the flow; deterministic)
    sde:  x_s = alpha_s x0^ + sigma_s eps, eps ~ N(0, I)

with s = t(f_{k+1}); the last expert outputs x0^ itself. At sampling the experts chain: a
K-step student whose step k uses expert k. Expert k is trained on inputs made by the experts
before it (run from noise without gradient) with DMD on the distribution of its *output* x_s
(progressive distribution matching). Diffusing x_s further to tau > s,

    x_tau = (alpha_tau / alpha_s) x_s + sigma_{tau|s} eps,
    sigma_{tau|s}^2 = sigma_tau^2 - (alpha_tau sigma_s / alpha_s)^2,             (1)

matches p_tau of the teacher for every tau > s iff the phase output matches the teacher's
marginal at s. The reverse-KL gradient moved onto x_s is, up to the positive factor
alpha_tau^2 / (alpha_s sigma_tau^2) that DMD's normaliser replaces (DMD eqs. 7-8),

    grad_{x_s} = w (x0_fake(x_tau) - x0_real(x_tau)),  w = 1 / mean|x0^ - x0_real|.   (2)

Score matching within subintervals: phase k's fake score only models tau in its subinterval
and sees noisy samples x_s, not clean ones. Denoising score matching with the transition
kernel (1) (Vincent 2011) has the marginal score as minimiser, i.e. the eps-target
sigma_tau eps / sigma_{tau|s}; weighted by r^2 = (sigma_{tau|s} / sigma_tau)^2 (a time
weight: same minimiser, bounded variance as tau -> s) the residual is

    r (f_eps(x_tau) - sigma_tau eps / sigma_{tau|s}) = r f_eps(x_tau) - eps,          (3)

applied in the fake score's own parameterization (for clean x_s it is the usual denoising
loss). Subintervals are ``nested`` (tau in [f_{k+1}, 1], the paper's reverse nested
intervals) or ``phase`` (tau in [f_{k+1}, f_k]). One fake score per phase.

Phases are drawn at random per step (``phase_steps = 0``, all experts train together) or
trained one after another (``phase_steps = N``: phase k during steps [kN, (k+1)N), the last
continuing), the paper's progressive schedule.

``RoutedDenoiser`` (a sample-wise mixture of expert denoisers routed by time or by class
label) lives here and is shared with ``multi_student``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch, index_cond
from fewstep.core.models import Denoiser, _batch_t, trainable_copy
from fewstep.core.objectives.common import sample_shape, sample_times, step_fractions, unguided
from fewstep.core.objectives.dmd2 import DMD2, DMD2Config, dmd_loss
from fewstep.core.paths import Path
from fewstep.core.samplers import EulerSampler, FewStepSampler, Sampler

Route = Literal["time", "label"]


# ------------------------------------------------------------------------ routing denoiser


class RoutedDenoiser(Denoiser):
    """A sample-wise mixture of expert denoisers: sample i goes to expert ``route(t, cond)[i]``.

    ``route="time"``: ``bounds`` are the K-1 native times between K experts; expert 0 owns
    the noisiest times (t > bounds[0]), expert k owns (bounds[k], bounds[k-1]] (Phased DMD).
    ``route="label"``: ``cond`` holds integer class labels; expert ``partition[label]``, or
    ``label % K`` when ``partition`` is empty, owns them (Multi-Student Distillation).
    All experts share the path and the parameterization; the experts are plain submodules,
    so checkpoints and EMA copies need nothing special.
    """

    def __init__(
        self,
        experts: Sequence[Denoiser],
        route: Route = "time",
        bounds: Sequence[float] = (),
        partition: Sequence[int] = (),
    ):
        experts = list(experts)
        if not experts:
            raise ValueError("RoutedDenoiser needs at least one expert")
        head = experts[0]
        super().__init__(head.path, head.prediction)
        for e in experts[1:]:
            if e.prediction != head.prediction or type(e.path) is not type(head.path):
                raise ValueError(
                    "RoutedDenoiser experts must share path and prediction; got "
                    f"{head.path.name}/{head.prediction} and {e.path.name}/{e.prediction}"
                )
        self.experts = nn.ModuleDict({str(i): e for i, e in enumerate(experts)})
        if route not in ("time", "label"):
            raise ValueError(f"unknown route {route!r}; expected 'time' or 'label'")
        self.route = route
        k = len(experts)
        self.bounds = tuple(sorted((float(b) for b in bounds), reverse=True))
        if route == "time" and len(self.bounds) != k - 1:
            raise ValueError(f"route='time' with {k} experts needs {k - 1} bounds, got {bounds}")
        self.partition = tuple(int(p) for p in partition)
        bad = [p for p in self.partition if not 0 <= p < k]
        if bad:
            raise ValueError(f"partition entries must be expert indices in [0, {k}); got {bad}")

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_index(self, t: Tensor, cond: Any = None) -> Tensor:
        """(B,) long: the expert of each sample."""
        if self.route == "time":
            if not self.bounds:
                return torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
            asc = torch.tensor(self.bounds[::-1], dtype=t.dtype, device=t.device)
            # number of bounds strictly below t; expert 0 is above all of them
            return (len(self.bounds) - torch.bucketize(t.contiguous(), asc, right=False)).long()
        if not isinstance(cond, Tensor):
            raise ValueError(
                "route='label' needs integer class labels as the condition (a (B,) tensor); "
                f"got {type(cond).__name__}"
            )
        labels = cond.long().reshape(cond.shape[0], -1)[:, 0]
        if not self.partition:
            return torch.remainder(labels, self.num_experts)
        if labels.min() < 0 or labels.max() >= len(self.partition):
            raise ValueError(
                f"labels must lie in [0, {len(self.partition)}) for partition "
                f"{self.partition}; got {labels.min().item()}..{labels.max().item()}"
            )
        table = torch.tensor(self.partition, dtype=torch.long, device=labels.device)
        return table[labels]

    def _dispatch(self, method: str, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        t = _batch_t(t, x_t)
        idx = self.expert_index(t, cond)
        lo, hi = int(idx.min()), int(idx.max())

        def call(k: int):
            expert = self.experts[str(k)]
            return expert if method == "forward" else getattr(expert, method)

        if lo == hi:  # the whole batch belongs to one expert
            return call(lo)(x_t, t, cond)
        out: Tensor | None = None
        for k in range(lo, hi + 1):
            rows = (idx == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = call(k)(x_t[rows], t[rows], index_cond(cond, rows))
            if out is None:
                out = y.new_zeros((x_t.shape[0], *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        assert out is not None
        return out

    def forward(self, x_t, t, cond=None):
        return self._dispatch("forward", x_t, t, cond)

    def features(self, x_t, t, cond=None):
        return self._dispatch("features", x_t, t, cond)


# ------------------------------------------------------------------------- path transitions


def state_coeffs(path: Path, t: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma) of a state at native times t (B,), broadcast against ``like``;
    t=None means clean data (alpha=1, sigma=0)."""
    if t is None:
        one = torch.ones(like.shape[0], *([1] * (like.ndim - 1)), device=like.device)
        return one.to(like), torch.zeros_like(one).to(like)
    return path.coeffs(t, like)


def diffuse_from(
    path: Path, x_s: Tensor, a_s: Tensor, s_s: Tensor, t: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward transition (1) from a state x_s = a_s x0 + s_s e to time t >= s:
    x_t = (a_t / a_s) x_s + sigma_{t|s} eps. Returns (x_t, a_t / a_s, sigma_{t|s})."""
    a_t, s_t = path.coeffs(t, x_s)
    a_ts = a_t / a_s
    s_ts = (s_t.square() - (a_ts * s_s).square()).clamp_min(0).sqrt()
    return a_ts * x_s + s_ts * eps, a_ts, s_ts


def subinterval_denoising_loss(
    model: Denoiser,
    x_s: Tensor,
    a_s: Tensor,
    s_s: Tensor,
    t: Tensor,
    cond: Any,
    batch: Batch,
) -> Tensor:
    """Denoising score matching from noisy states x_s (eq. 3), in the model's own
    parameterization: mean || r (f(x_t) - target) ||^2 with target the prediction whose eps
    part is sigma_t eps / sigma_{t|s}, r = sigma_{t|s} / sigma_t. For clean x_s (a_s=1,
    s_s=0) it is the standard denoising loss at times t.

    x_s, a_s, s_s: (B, ...) broadcastable; t: (B,) native times > s."""
    path = model.path
    eps = batch.rng.randn_like(x_s).to(x_s)
    x_t, _, s_ts = diffuse_from(path, x_s, a_s, s_s, t, eps)
    a_t, s_t = path.coeffs(t, x_s)
    resid_eps = (s_ts / s_t) * model.predict(x_t, t, cond, kind="eps") - eps
    # predictions are affine in eps at fixed (x_t, t): d(x0) = -(sigma / alpha) d(eps)
    resid = path.from_x0_eps(-(s_t / a_t) * resid_eps, resid_eps, model.prediction, t)
    return resid.square().mean()


# ------------------------------------------------------------------------------- objective


@dataclass
class PhasedDMDConfig(DMD2Config):
    student_steps: int = 2  # K: phases = experts = student NFE (when student_times is empty)
    phase_output: Literal["ode", "sde"] = "ode"  # expert step: own eps (DDIM) or fresh noise
    subinterval: Literal["nested", "phase"] = "nested"  # tau in [f_{k+1}, 1] or [f_{k+1}, f_k]
    phase_steps: int = 0  # 0: random phase per step; N: phase k on steps [kN, (k+1)N)


class PhasedDMD(DMD2):
    name = "phased_dmd"
    config_cls = PhasedDMDConfig
    roles = ("student", "fake_score")
    summary = "one expert per SNR phase, DMD with score matching inside each phase (Fan 2025)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        self.phase_fractions()  # checks student_steps / student_times
        if cfg.phase_output not in ("ode", "sde"):
            raise ValueError(f"phase_output must be 'ode' or 'sde', got {cfg.phase_output!r}")
        if cfg.subinterval not in ("nested", "phase"):
            raise ValueError(f"subinterval must be 'nested' or 'phase', got {cfg.subinterval!r}")
        if cfg.phase_steps < 0:
            raise ValueError(f"phase_steps must be >= 0, got {cfg.phase_steps}")
        if cfg.gan_weight > 0:
            raise ValueError("phased_dmd has no GAN head; set gan_weight=0 (or use dmd2)")

    def phase_fractions(self) -> list[float]:
        return step_fractions(self.name, self.config.student_steps, self.config.student_times)

    def native_times(self) -> list[Tensor]:
        return [self.path.fraction_to_t(f) for f in self.phase_fractions()]

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        k = len(self.phase_fractions())
        experts = [student] + [trainable_copy(student) for _ in range(k - 1)]
        bounds = [float(t) for t in self.native_times()[1:]]
        fakes = nn.ModuleDict({str(i): trainable_copy(unguided(self.teacher)) for i in range(k)})
        return {"student": RoutedDenoiser(experts, "time", bounds), "fake_score": fakes}

    def student_sampler(self) -> Sampler:
        if self.config.phase_output == "ode":
            return EulerSampler(times=[float(t) for t in self.native_times()])
        return FewStepSampler(self.phase_fractions())

    def phase(self, step: int, batch: Batch) -> int:
        k = len(self.phase_fractions())
        if self.config.phase_steps > 0:
            return min(step // self.config.phase_steps, k - 1)
        return batch.rng.shared_randint(0, k)

    def expert_step(self, x0: Tensor, eps: Tensor, t_next: Tensor | None, batch: Batch) -> Tensor:
        """The phase output at t_next (None = clean data) from the expert's (x0, eps)."""
        if t_next is None:
            return x0
        if self.config.phase_output == "sde":
            eps = batch.rng.randn_like(x0).to(x0)
        return self.path.noise(x0, _batch_t(t_next, x0), eps)

    def subinterval_fractions(self, k: int) -> tuple[float, float]:
        """The tau range of phase k as path fractions, clipped to ``t_range``."""
        fr = [*self.phase_fractions(), 0.0]
        lo = max(fr[k + 1], self.config.t_range[0])
        hi = min(1.0 if self.config.subinterval == "nested" else fr[k], self.config.t_range[1])
        return lo, max(lo, hi)

    def losses(self, roles, batch, update, step):
        student, fakes = roles["student"], roles["fake_score"]
        ts = self.native_times()
        k = self.phase(step, batch)
        t_next = ts[k + 1] if k + 1 < len(ts) else None
        cond = batch.cond
        noise = batch.rng.randn(*sample_shape(batch))
        with torch.no_grad():  # the earlier experts make this phase's input
            x = self.path.noise(torch.zeros_like(noise), _batch_t(ts[0], noise), noise)
            for i in range(k):
                x0, eps = student.x0_eps(x, _batch_t(ts[i], x), cond)
                x = self.expert_step(x0, eps, ts[i + 1], batch)
        with torch.set_grad_enabled("student" in update):
            x0_hat, eps_hat = student.x0_eps(x, _batch_t(ts[k], x), cond)
            x_s = self.expert_step(x0_hat, eps_hat, t_next, batch)
        a_s, s_s = state_coeffs(self.path, None if t_next is None else _batch_t(t_next, x), x)
        window = self.subinterval_fractions(k)
        fake = fakes[str(k)]
        losses, logs = {}, {"phase": float(k)}

        if "student" in update:
            tau = sample_times(self.path, batch, window)
            eps = batch.rng.randn_like(x_s).to(x_s)
            x_tau, _, _ = diffuse_from(self.path, x_s.detach(), a_s, s_s, tau, eps)
            with torch.no_grad():
                x0_real = self.teacher.predict(x_tau, tau, cond, kind="x0")
                x0_fake = fake.predict(x_tau, tau, cond, kind="x0")
            # eq. (2) through dmd_loss: shifting both targets by the same detached offset
            # keeps the direction x0_fake - x0_real and normalises by |x0^ - x0_real|
            off = (x_s - x0_hat).detach()
            loss, gnorm = dmd_loss(x_s, x0_real + off, x0_fake + off)
            losses["student"] = loss
            logs["dm_loss"] = loss.item()
            logs["dm_grad_norm"] = gnorm.mean().item()

        if "fake_score" in update:
            tau = sample_times(self.path, batch, window)
            loss = subinterval_denoising_loss(fake, x_s.detach(), a_s, s_s, tau, cond, batch)
            # every phase's fake score is in the role; only phase k's enters this step
            losses["fake_score"] = loss
            logs["fake_score_loss"] = loss.item()
        return losses, logs
