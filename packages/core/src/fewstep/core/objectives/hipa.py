"""HiPA: one-step generation by high-frequency-promoting low-rank adaptation.

Zhang & Hooi, "HiPA: Enabling One-Step Text-to-Image Diffusion Models via
High-Frequency-Promoting Adaptation" (arXiv 2311.18158, 2023). No code was released and the
full text was out of reach; what follows is the method as the abstract and public summaries
state it, with our own choices marked as such.

From the paper:
* the pretrained diffusion model stays frozen and only low-rank adaptors are trained
  (0.04 % of the parameters; 3.3 M on Stable Diffusion);
* the adapted model generates in ONE step from noise;
* one-step outputs lack high frequencies, so the adaptation loss couples a *spatial*
  (perceptual) loss with a *high-frequency-promoted* loss built from Fourier components and
  edge information. We write it as
      L(theta) = E_{z,c} [ D_sp(G(z, c), x_T) + lambda_hf D_hf(H G(z, c), H x_T) ]      (*)
  with G = G_theta the adapted model's one-step sample and x_T the frozen model's
  multi-step sample from the same noise z and prompt c (its ODE / DDIM endpoint). We could
  not check the paper's equation numbers, so (*) is cited as its "adaptation loss" (sec. 4),
  not by number.

Our choices (not verifiable against the paper):
* H is one or several fixed linear high-pass operators from ``HIGH_PASS``, each scaled to a
  peak gain of 1 so that ``hf_weight`` means the same for each (with several, D_hf is their
  mean): ``fft`` (Fourier components: all frequencies above ``fft_cutoff`` of Nyquist, taken
  on the mirror extension of the sample, i.e. a DCT-II high-pass, so that image borders are
  not edges), ``sobel`` (edge information: the two Sobel derivative responses; blind to the
  Nyquist checkerboard, hence the default pairs it with ``fft``) and ``laplacian``.
* D_sp and D_hf come from ``METRICS`` (l2, l1, pseudo-Huber). The paper's spatial term is
  perceptual (LPIPS), whose VGG weights fewstep cannot download.
* x_T is computed online for each batch, without gradient, by core's Euler (DDIM) or Heun
  sampler with ``teacher_steps`` steps, through the teacher as given (recipes pass their
  classifier-free-guided teacher).
* With ``decode_fn`` set (a recipe gives a differentiable VAE decoder) and ``pixel_space``
  on, both sides of (*) are decoded first, so the loss acts on images as the paper's does;
  otherwise on the samples as they are (latents, or pixels of a pixel-space model).
* G is the student sampler's one step (``FewStepSampler``: x0 predicted at the first student
  time from sigma(t_max) z), so that training and sampling agree.
* ``lora_rank`` > 0 freezes the student and injects peft LoRA adapters into its Linear / Conv
  layers (core runs); recipes that add adapters themselves (image-latent's ``--lora-rank``)
  leave it 0, and the trainer updates only the parameters that require grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.models import Denoiser
from fewstep.core.objectives.base import Objective, ObjectiveConfig
from fewstep.core.objectives.common import check_choice, sample_shape, step_fractions
from fewstep.core.samplers import EulerSampler, FewStepSampler, HeunSampler

# ------------------------------------------------------------------ high-pass operators


def _planes(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(..., H, W) -> ((N, 1, H, W), leading shape): every 2-D plane filtered on its own."""
    if x.ndim < 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(
            f"high-pass operators need samples with two spatial axes (..., H, W), H, W >= 2; "
            f"got shape {tuple(x.shape)}"
        )
    lead = tuple(x.shape[:-2])
    return x.reshape(-1, 1, *x.shape[-2:]), lead


def _filter(x: Tensor, kernels: Tensor) -> Tensor:
    """(..., H, W) -> (..., K, H, W): depthwise 3x3 filtering with K kernels (K, 3, 3) and
    mirror ('reflect') padding, which keeps a constant image constant at the border."""
    planes, lead = _planes(x)
    padded = F.pad(planes, (1, 1, 1, 1), mode="reflect")
    out = F.conv2d(padded, kernels.to(planes).unsqueeze(1))
    return out.reshape(*lead, kernels.shape[0], *x.shape[-2:])


# Sobel = [1, 2, 1]/4 smoothing across times [-1, 0, 1]/2 derivative along an axis, so each
# response is a smoothed central difference (peak gain 1, at a quarter of the sampling rate).
# It removes constants but, being a first derivative, passes a linear ramp's slope and
# nothing at the Nyquist frequency (a checkerboard): "edge" information, not a pure high-pass.
_SOBEL = torch.tensor(
    [[[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
     [[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]]
) / 8.0  # fmt: skip
# 4-neighbour Laplacian scaled to peak gain 1 (its response to a checkerboard is -8 x).
_LAPLACIAN = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]]) / 8.0


def sobel_high_pass(x: Tensor, cutoff: float = 0.0) -> Tensor:
    """(..., H, W) -> (..., 2, H, W): horizontal and vertical Sobel responses (edges).
    ``cutoff`` is unused (a fixed kernel)."""
    return _filter(x, _SOBEL)


def laplacian_high_pass(x: Tensor, cutoff: float = 0.0) -> Tensor:
    """(..., H, W) -> (..., 1, H, W): the 4-neighbour Laplacian / 8 (zero on constants and
    linear ramps away from the border). ``cutoff`` is unused (a fixed kernel)."""
    return _filter(x, _LAPLACIAN)


def radial_frequency(h: int, w: int, device=None) -> Tensor:
    """(H, W) radial frequency of each 2-D FFT bin as a fraction of the Nyquist frequency
    (0 at DC, 1 at the half-sample rate along one axis, sqrt(2) in the corner)."""
    fy = torch.fft.fftfreq(h, device=device).abs() / 0.5
    fx = torch.fft.fftfreq(w, device=device).abs() / 0.5
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def fft_high_pass(x: Tensor, cutoff: float = 0.25) -> Tensor:
    """(..., H, W) -> (..., 1, H, W): x with every Fourier component at radial frequency
    <= ``cutoff`` (fraction of the Nyquist frequency, in (0, sqrt 2)) removed.

    The transform is taken of x's mirror extension (2H, 2W) and cropped back, i.e. a DCT-II
    high-pass: a plain FFT assumes x periodic and would count the jump between opposite
    borders (any ramp or gradient) as a high-frequency edge."""
    if not 0.0 < cutoff < math.sqrt(2.0):
        raise ValueError(f"fft high-pass cutoff must lie in (0, sqrt(2)), got {cutoff}")
    planes, lead = _planes(x)
    h, w = x.shape[-2:]
    ext = torch.cat([planes, planes.flip(-2)], dim=-2)
    # half precision has no FFT on CPU: compute in float32 at least
    ext = torch.cat([ext, ext.flip(-1)], dim=-1).to(torch.promote_types(x.dtype, torch.float32))
    mask = radial_frequency(2 * h, 2 * w, device=x.device) > cutoff
    out = torch.fft.ifft2(torch.fft.fft2(ext) * mask).real[..., :h, :w].to(x.dtype)
    return out.reshape(*lead, 1, h, w)


HighPass = Callable[[Tensor, float], Tensor]
HIGH_PASS: dict[str, HighPass] = {
    "fft": fft_high_pass,
    "sobel": sobel_high_pass,
    "laplacian": laplacian_high_pass,
}


def high_pass(name: str) -> HighPass:
    """The registered operator ``name``; unknown names list the available ones."""
    if name not in HIGH_PASS:
        raise ValueError(f"unknown high-pass operator {name!r}; available: {sorted(HIGH_PASS)}")
    return HIGH_PASS[name]


# ------------------------------------------------------------------------------ metrics


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean squared difference over each sample."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def l1_distance(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean absolute difference over each sample."""
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def huber_distance(a: Tensor, b: Tensor) -> Tensor:
    """(B,) pseudo-Huber sqrt(||a - b||^2 + c^2) - c over each sample, c = 0.00054 sqrt(d)
    (iCT's constant, as reflow uses), divided by sqrt(d) so it scales like the other two."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d)
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(1)
    return (torch.sqrt(sq + c * c) - c) / math.sqrt(d)


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l2": l2_distance,
    "l1": l1_distance,
    "huber": huber_distance,
}


def hf_distance(
    a: Tensor, b: Tensor, operators: Sequence[str], metric: str, cutoff: float
) -> Tensor:
    """(B,) D_hf(H a, H b) averaged over the ``operators`` (the high-frequency term of (*))."""
    dist = METRICS[metric]
    terms = [dist(high_pass(op)(a, cutoff), high_pass(op)(b, cutoff)) for op in operators]
    return torch.stack(terms).mean(0)


def hipa_loss(
    pred: Tensor,
    target: Tensor,
    hf_weight: float,
    operators: Sequence[str] = ("fft", "sobel"),
    spatial_metric: str = "l2",
    hf_metric: str = "l1",
    cutoff: float = 0.25,
) -> tuple[Tensor, Tensor, Tensor]:
    """HiPA's adaptation loss (*) per sample: (total, spatial, high-frequency), each (B,).
    pred: the one-step output (B, ..., H, W); target: the teacher endpoint, same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    spatial = METRICS[spatial_metric](pred, target)
    hf = hf_distance(pred, target, operators, hf_metric, cutoff)
    return spatial + hf_weight * hf, spatial, hf


# ---------------------------------------------------------------------------- adapters


def add_lora_(module: nn.Module, rank: int, alpha: float = 0.0, targets: Sequence[str] = ()):
    """Freeze ``module`` and inject trainable peft LoRA adapters into its Linear / Conv layers
    (``targets``: names or name suffixes; () = all); returns the adapted module."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:  # pragma: no cover - the test environment has peft
        raise ImportError(
            "objective 'hipa' with lora_rank > 0 needs peft: pip install 'fewstep-core[lora]'"
        ) from err
    from fewstep.core.objectives.vsd import lora_targets

    module.requires_grad_(False)
    names = lora_targets(module, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=names, lora_dropout=0.0)
    module = inject_adapter_in_model(config, module)
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return module


# ---------------------------------------------------------------------------- objective

Solver = Literal["euler", "heun"]
TEACHER_SAMPLERS = {"euler": EulerSampler, "heun": HeunSampler}


@dataclass
class HiPAConfig(ObjectiveConfig):
    teacher_steps: int = 25  # teacher ODE steps for the target x_T (paper: multi-step sampler)
    solver: Solver = "euler"  # teacher solver: euler (= DDIM) or heun
    spatial_metric: str = "l2"  # D_sp: l2, l1 or huber (the paper's LPIPS is not available)
    hf_metric: str = "l1"  # D_hf on the high-passed samples: l2, l1 or huber
    high_pass: tuple[str, ...] = ("fft", "sobel")  # H: operators from HIGH_PASS, averaged
    fft_cutoff: float = 0.25  # fft: frequencies above this fraction of Nyquist are kept
    hf_weight: float = 1.0  # lambda_hf: weight of the high-frequency term
    pixel_space: bool = True  # decode both sides with decode_fn (when set) before the loss
    lora_rank: int = 0  # > 0: freeze the student and train peft LoRA adapters of this rank
    lora_alpha: float = 0.0  # LoRA scale numerator (0 = the rank)
    lora_targets: tuple[str, ...] = ()  # Linear/Conv layer names (suffixes) to adapt; () = all


class HiPA(Objective):
    name = "hipa"
    config_cls = HiPAConfig
    roles = ("student",)
    needs_data = False
    summary = "one-step LoRA adaptation to the teacher's ODE endpoint, spatial + high-pass loss"

    #: differentiable ``fn(x) -> decoded`` (e.g. a VAE decoder), or None: the loss acts on x
    decode_fn: Callable[[Tensor], Tensor] | None = None

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if cfg.teacher_steps < 1:
            raise ValueError(f"hipa: teacher_steps must be >= 1, got {cfg.teacher_steps}")
        check_choice("hipa: solver", cfg.solver, tuple(TEACHER_SAMPLERS))
        check_choice("hipa: spatial_metric", cfg.spatial_metric, tuple(METRICS))
        check_choice("hipa: hf_metric", cfg.hf_metric, tuple(METRICS))
        if not cfg.high_pass:
            raise ValueError(f"hipa: high_pass needs at least one of {sorted(HIGH_PASS)}")
        for op in cfg.high_pass:
            high_pass(op)
        if not 0.0 < cfg.fft_cutoff < math.sqrt(2.0):
            raise ValueError(f"hipa: fft_cutoff must lie in (0, sqrt(2)), got {cfg.fft_cutoff}")
        if cfg.hf_weight < 0:
            raise ValueError(f"hipa: hf_weight must be >= 0, got {cfg.hf_weight}")
        if cfg.lora_rank < 0:
            raise ValueError(f"hipa: lora_rank must be >= 0, got {cfg.lora_rank}")
        fr = step_fractions(self.name, cfg.student_steps, cfg.student_times)
        if len(fr) != 1:
            raise ValueError(
                f"hipa trains a one-step model; set student_steps=1 (got {len(fr)} steps)"
            )

    def build_roles(self, student: Denoiser, example) -> dict[str, nn.Module]:
        cfg = self.config
        if cfg.lora_rank:
            student = add_lora_(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        return {"student": student}

    # --- the two sides of (*) -------------------------------------------------------------
    def teacher_sampler(self) -> EulerSampler:
        return TEACHER_SAMPLERS[self.config.solver](self.config.teacher_steps)

    @torch.no_grad()
    def teacher_endpoint(self, z: Tensor, cond) -> Tensor:
        """x_T: the frozen teacher's multi-step ODE sample from noise z (no gradient)."""
        return self.teacher_sampler().sample(self.teacher, z, cond).x

    def one_step(self, student: Denoiser, z: Tensor, cond) -> Tensor:
        """G_theta(z, c): the student's one-step sample from z, with gradient."""
        x, _, _ = self.student_sampler().rollout(student, z, cond)
        return x

    def to_loss_space(self, x: Tensor) -> Tensor:
        if self.config.pixel_space and self.decode_fn is not None:
            return self.decode_fn(x)
        return x

    def losses(self, roles, batch, update, step):
        cfg = self.config
        z = batch.rng.randn(*sample_shape(batch))
        target = self.teacher_endpoint(z, batch.cond)
        with torch.no_grad():
            target = self.to_loss_space(target)
        pred = self.to_loss_space(self.one_step(roles["student"], z, batch.cond))
        total, spatial, hf = hipa_loss(
            pred, target, cfg.hf_weight, cfg.high_pass, cfg.spatial_metric, cfg.hf_metric,
            cfg.fft_cutoff,
        )  # fmt: skip
        loss = total.mean()
        logs = {"hipa_loss": loss.item(), "hipa_spatial": spatial.mean().item()}
        logs["hipa_hf"] = hf.mean().item()
        return {"student": loss}, logs

    def student_sampler(self) -> FewStepSampler:
        return FewStepSampler(step_fractions(self.name, 1, self.config.student_times))
