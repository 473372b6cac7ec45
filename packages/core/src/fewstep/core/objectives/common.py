"""Small pieces shared by objectives: time draws, noising, the denoising loss, student
samples with backward simulation, one teacher ODE step, and Jacobian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.paths import Path
from fewstep.core.samplers import EulerSampler, FewStepSampler


def check_choice(name: str, value, allowed) -> None:
    """A config field that must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def step_fractions(name: str, steps: int, fractions: tuple[float, ...] = ()) -> list[float]:
    """The student's step start fractions 1 = f_0 > f_1 > ... > 0 of the path (1 = noise):
    ``fractions`` (a config's ``student_times``) or ``steps`` uniform ones 1, 1 - 1/steps, ...;
    ``name`` (the objective) is named in the error for anything else."""
    if not fractions and steps < 1:
        raise ValueError(f"{name}: student_steps must be >= 1, got {steps}")
    fr = [float(f) for f in fractions] or [1.0 - i / steps for i in range(steps)]
    if fr[0] != 1.0 or any(b >= a for a, b in zip(fr, fr[1:], strict=False)) or fr[-1] <= 0:
        raise ValueError(
            f"{name}: student_times must begin at 1.0 and strictly decrease inside (0, 1]; "
            f"got {tuple(fr)}"
        )
    return fr


def euler_grid(path: Path, steps: int, fractions: tuple[float, ...] = ()) -> EulerSampler:
    """A deterministic few-step sampler (DDIM; Euler on rectified flow) on the student's step
    fractions (``step_fractions``)."""
    fr = step_fractions("euler_grid", steps, fractions)
    return EulerSampler(times=[float(path.fraction_to_t(f)) for f in fr])


def sample_times(path: Path, batch: Batch, frac_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """(B,) times uniform over a fraction range (lo, hi) of the path's time domain."""
    if len(frac_range) != 2 or not 0.0 <= frac_range[0] <= frac_range[1] <= 1.0:
        raise ValueError(f"a time range must be (lo, hi) with 0 <= lo <= hi <= 1, got {frac_range}")
    lo, hi = frac_range
    u = batch.rng.rand()
    return path.fraction_to_t(lo + (hi - lo) * u).to(batch.rng.device)


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014): mean -log sigmoid(D(fake)),
    written softplus(-D(fake)) for stability."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's side: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def noised(path: Path, x0: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """(x_t, eps) with fresh noise from the batch's generator."""
    eps = batch.rng.randn_like(x0).to(x0)
    return path.noise(x0, t.to(x0), eps), eps


def denoising_loss(model: Denoiser, x0: Tensor, cond, batch: Batch) -> Tensor:
    """The standard diffusion / flow-matching loss in the model's own parameterization:
    mean || f(x_t, t) - target(x0, eps) ||^2 with t from the path's training density
    (Ho 2020 eq. 14 for eps; Salimans & Ho 2022 for v; Lipman 2023 eq. 23 for velocity)."""
    path = model.path
    t = path.sample_t(batch.size, batch.rng.rand()).to(x0.device)
    x_t, eps = noised(path, x0, t, batch)
    target = path.from_x0_eps(x0, eps, model.prediction, t)
    return F.mse_loss(model(x_t, t, cond), target)


# ------------------------------------------------------------------- batches and wrappers


def sample_shape(batch: Batch) -> tuple[int, ...]:
    """Shape of one sample: ``extras['sample_shape']`` (set by the trainer) or x's."""
    shape = batch.extras.get("sample_shape")
    if shape is None and batch.x is not None:
        shape = tuple(batch.x.shape[1:])
    if shape is None:
        raise ValueError("batch needs x or extras['sample_shape'] to know the sample shape")
    return tuple(shape)


def first(cond):
    """The first element of a batched condition (tensor or dict of tensors), or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: first(v) for k, v in cond.items()}
    return cond[:1]


def unguided(d: Denoiser) -> Denoiser:
    """The conditional network under a CFG wrapper (fake scores are never guided)."""
    return getattr(d, "base", d)


def student_x0(
    student: Denoiser, sampler: FewStepSampler, batch: Batch, backward_simulation: bool = True
) -> tuple[Tensor, Tensor]:
    """A student sample x0 (with gradient if enabled) and the time it was predicted from.

    One-step students predict from pure noise. Multi-step students start, when
    ``backward_simulation``, from their own state at a random one of their steps, reached by
    running the student from noise without gradient (DMD2 sec. 4.4); otherwise from step 0."""
    noise = batch.rng.randn(*sample_shape(batch))
    times = sampler.native_times(student.path)
    k = 0
    if len(times) > 1 and backward_simulation:
        k = batch.rng.shared_randint(0, len(times))
    with torch.no_grad():
        x_t, t, _ = sampler.rollout(student, noise, batch.cond, upto=k, fresh=batch.rng.randn_like)
    if t is None:  # unreachable: k < len(times)
        raise RuntimeError("backward simulation ran past the last student step")
    t = t.expand(x_t.shape[0]).to(x_t)
    return student.predict(x_t, t, batch.cond, kind="x0"), t


# ------------------------------------------------------------------------------- teacher ODE

Solver = Literal["euler", "heun"]


def ode_step(
    model: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond, solver: Solver = "euler"
) -> Tensor:
    """One step of the probability-flow ODE from t to t_next (per-sample times, (B,)).

    ``euler`` is DDIM (exact for any path: re-noise the predicted x0 with the predicted eps
    at t_next); ``heun`` is Heun's second-order step on the path's velocity dx/dt."""
    path = model.path
    x0, eps = model.x0_eps(x, t, cond)
    if solver == "euler":
        return path.noise(x0, t_next, eps)
    if solver != "heun":
        raise ValueError(f"unknown ODE solver {solver!r}; expected 'euler' or 'heun'")
    d = path.from_x0_eps(x0, eps, "velocity", t)
    dt = (t_next - t).reshape(-1, *([1] * (x.ndim - 1)))
    d2 = model.predict(x + dt * d, t_next, cond, kind="velocity")
    return x + dt * 0.5 * (d + d2)


# ------------------------------------------------------------------------------------ JVPs


def jvp(
    fn: Callable[..., Tensor],
    primals: tuple[Tensor, ...],
    tangents: tuple[Tensor, ...],
    mode: Literal["exact", "finite_difference"] = "exact",
    fd_eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """(fn(*primals), d/dh fn(primals + h tangents) at h = 0).

    ``exact`` uses forward-mode AD (``torch.func.jvp``), which every network built from
    standard torch ops supports; ``finite_difference`` uses the central difference
    (fn(p + e v) - fn(p - e v)) / 2e, for networks with ops lacking forward-mode rules
    (sCM, Lu & Song 2024, sec. 4, discusses both). In ``exact`` mode both outputs carry
    gradients to the parameters; the finite-difference tangent carries none. sCM and MeanFlow
    detach the tangent anyway (it enters a stop-gradient target).

    Exact mode runs scaled-dot-product attention on its math kernel: the fused CPU/CUDA
    kernels have no forward-mode rule (diffusers UNets with attention, transformers).

    The exact tangent is the network's derivative at a point. Networks that embed time at a
    large scale (diffusers UNets see 1000 t, ToyMLP has 100-cycle features) wiggle in t on a
    scale far finer than their trajectories curve: on the digits teacher the exact total
    derivative along the ODE is ~20x the one measured along the trajectory itself. A central
    difference over a step of 1e-2 to 5e-2 of the path is then the useful (smooth) tangent;
    the 2-D suite and the digits recipe use it for sCM and MeanFlow."""
    if mode == "exact":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(fn, primals, tangents)
    if mode != "finite_difference":
        raise ValueError(f"unknown jvp mode {mode!r}; expected 'exact' or 'finite_difference'")
    out = fn(*primals)
    with torch.no_grad():
        plus = fn(*(p + fd_eps * v for p, v in zip(primals, tangents, strict=True)))
        minus = fn(*(p - fd_eps * v for p, v in zip(primals, tangents, strict=True)))
    return out, (plus - minus) / (2 * fd_eps)
