"""Motion Consistency Model (MCM): video consistency distillation with disentangled
motion-appearance learning.

Zhai et al., "Motion Consistency Model: Accelerating Video Diffusion with Disentangled
Motion-Appearance Distillation" (NeurIPS 2024); public code yhZhai/mcm (``main.py`` training
loop steps 6-12, ``utils/diffusion_misc.py::prepare_cd_target``). The student is an LCM-style
consistency function f_theta (core's ``ConsistencyDistillation``: boundary conditions, one
teacher ODE step, EMA target f_theta-, pseudo-Huber metric; Song et al. 2023 alg. 2 / eq. 7,
Luo et al. 2023 eq. 9) distilled from a video teacher trained on LOW-quality clips, with three
changes:

1. Disentangled motion distillation: the consistency distance acts only on a motion
   representation m of the two consistency outputs,
       L_mcd = d( m(f_theta(x_{t_{n+1}}, t_{n+1})), m(f_theta-(x^phi_{t_n}, t_n)) ),
   so the distillation stops pinning the frames' appearance to the low-quality teacher
   (``MOTIONS``: raw latent, frame difference, low/high-frequency components, local and
   global latent correlation; ``prepare_cd_target`` in the paper's code).
2. Frame adversarial learning: a discriminator on single frames tells high-quality IMAGE
   frames from frames of the student's estimate f_theta(x_{t_{n+1}}, t_{n+1}); the student
   adds ``adv_weight`` x its generator loss (``GAN_LOSSES``; the released scripts use the
   clipped WGAN loss with a gradient penalty of weight 1e-5 and 2 frames per clip drawn by
   temporal-segment sampling, TSN).
3. Mixed trajectory distillation: with probability ``mix_ratio`` (the scripts: 0.5) a
   sample's trajectory starts not from a low-quality training clip but from the student's own
   one-step generation f_theta-(z, T), z ~ N(0, I) (the "high-quality" domain the student
   samples from at inference), which is then noised to t_{n+1} and followed by the teacher ODE
   as usual (``cd_pred_x0_portion`` in the code).

Differences from the paper, by necessity of the domain: our teacher is a pixel-space DiT, so
the motion representations act on pixels rather than VAE latents; the discriminator is a small
CNN on raw frames trained from scratch, or (``disc_backbone = "teacher"``) a trained head on
the frozen features of the teacher's first DiT blocks, not DINO features with
text-conditioned heads; the paper's learnable "spatial head" representation is not included.

Shapes: videos are (B, T, C, H, W); frames (N, C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.models import Denoiser, frozen_copy
from fewstep.core.objectives.common import (
    check_choice,
    gan_discriminator_loss,
    gan_generator_loss,
    noised,
    unguided,
)
from fewstep.core.objectives.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    pseudo_huber,
)

# --------------------------------------------------------------- motion representations

FREQ_STOP = 0.25  # FreeInit Butterworth stop frequency (spatial and temporal), as MCM
FREQ_ORDER = 4  # Butterworth order, as MCM
LOCAL_RADIUS = 3  # local-correlation window radius in pixels (MCM: 7 on 32x32 latents)


def _check_video(x: Tensor, min_frames: int = 1) -> None:
    if x.ndim != 5 or x.shape[1] < min_frames:
        raise ValueError(f"expected videos (B, T >= {min_frames}, C, H, W), got {tuple(x.shape)}")


def motion_raw(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> itself: plain consistency distillation (MCM's ``raw``)."""
    _check_video(x)
    return x


def motion_diff(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> (B, T-1, C, H, W) temporal differences x_{k+1} - x_k (MCM's
    ``diff``): blind to anything static, so a static appearance change leaves it unchanged."""
    _check_video(x, 2)
    return x[:, 1:] - x[:, :-1]


def butterworth_lowpass(frames: int, height: int, width: int, device=None) -> Tensor:
    """(T, H, W) FreeInit Butterworth low-pass mask in unshifted FFT order (Wu et al.,
    "FreeInit", 2023; as MCM's ``get_free_init_freq_filter``):
        m = 1 / (1 + (d^2 / s^2)^order),
        d^2 = ((s / s_t) 2 f_t)^2 + (2 f_h)^2 + (2 f_w)^2,  f in [-1/2, 1/2) cycles/sample,
    with s = s_t = ``FREQ_STOP``. (MCM builds the same mask on the fftshift-ed grid index
    2 k / n - 1, which is 2 f after the shift.)"""
    ft, fh, fw = (torch.fft.fftfreq(n, device=device) for n in (frames, height, width))
    d2 = (2 * ft)[:, None, None] ** 2 + (2 * fh)[None, :, None] ** 2 + (2 * fw)[None, None] ** 2
    return 1.0 / (1.0 + (d2 / FREQ_STOP**2) ** FREQ_ORDER)


def _frequency_split(x: Tensor, low: bool) -> Tensor:
    _check_video(x)
    b, t, c, h, w = x.shape
    mask = butterworth_lowpass(t, h, w, x.device).to(torch.float32)
    if not low:
        mask = 1.0 - mask
    v = x.float().transpose(1, 2)  # (B, C, T, H, W): filter over (T, H, W)
    out = torch.fft.ifftn(torch.fft.fftn(v, dim=(-3, -2, -1)) * mask, dim=(-3, -2, -1)).real
    return out.transpose(1, 2).to(x.dtype)


def motion_freq_low(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> same shape: the spatio-temporal low-frequency component (MCM's
    ``freql``)."""
    return _frequency_split(x, low=True)


def motion_freq_high(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> same shape: the high-frequency component x - lowpass(x) (MCM's
    ``freqh``)."""
    return _frequency_split(x, low=False)


def motion_corr_local(x: Tensor, radius: int = LOCAL_RADIUS) -> Tensor:
    """(B, T, C, H, W) -> (B, T-1, (2r+1)^2, H, W): the local cost volume between
    consecutive frames, corr[k, d, p] = <x_k(p), x_{k+1}(p + d)> / sqrt(C) over offsets
    |d| <= r (MCM's ``lcor``, from GMFlow's ``local_correlation_softmax``). Offsets falling
    outside the frame read zeros (MCM masks them to -1e9; either way they match exactly
    between student and target, so the distance is the same)."""
    _check_video(x, 2)
    b, t, c, h, w = x.shape
    prev, nxt = x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)  # (B(T-1), C, H, W)
    k = 2 * radius + 1
    win = F.unfold(nxt, k, padding=radius).view(-1, c, k * k, h, w)
    corr = (prev[:, :, None] * win).sum(1) / math.sqrt(c)
    return corr.view(b, t - 1, k * k, h, w)


def motion_corr_global(x: Tensor) -> Tensor:
    """(B, T, C, H, W) -> (B, T-1, HW, HW): all-pairs correlation between consecutive frames,
    corr[k, p, q] = <x_k(p), x_{k+1}(q)> / sqrt(C) (MCM's ``gcor``, GMFlow's
    ``global_correlation_softmax``)."""
    _check_video(x, 2)
    b, t, c, h, w = x.shape
    prev = x[:, :-1].flatten(3)  # (B, T-1, C, HW)
    nxt = x[:, 1:].flatten(3)
    return torch.einsum("bkcp,bkcq->bkpq", prev, nxt) / math.sqrt(c)


MOTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "raw": motion_raw,
    "diff": motion_diff,
    "freq_low": motion_freq_low,
    "freq_high": motion_freq_high,
    "corr_local": motion_corr_local,
    "corr_global": motion_corr_global,
}


def get_motion(name: str) -> Callable[[Tensor], Tensor]:
    """The motion representation called ``name``; an unknown name lists the choices."""
    if name not in MOTIONS:
        raise KeyError(f"unknown motion representation {name!r}; choose from {sorted(MOTIONS)}")
    return MOTIONS[name]


def motion_distance(
    pred: Tensor, target: Tensor, motion: str, metric: str = "huber", huber_c: float = 1e-3
) -> Tensor:
    """d(m(pred), m(target)) for videos (B, T, C, H, W): pseudo-Huber (core's ``pseudo_huber``,
    LCM) or mean squared error on the motion representation (the MCM loss L_mcd)."""
    m = get_motion(motion)
    a, b = m(pred), m(target)
    if metric == "huber":
        return pseudo_huber(a, b, huber_c)
    if metric == "l2":
        return (a.float() - b.float()).pow(2).mean()
    raise ValueError(f"metric must be 'huber' or 'l2', got {metric!r}")


# ------------------------------------------------------------------ frame discriminator


class FrameDiscriminator(nn.Module):
    """A small PatchGAN-style CNN on single frames: (N, C, H, W) in [-1, 1] -> (N, P) patch
    logits (P = (H/4) (W/4)). Spectral normalisation (Miyato et al. 2018) keeps the
    from-scratch critic Lipschitz-bounded, which the clipped WGAN loss relies on (MCM's frozen
    DINO features play that role in the paper)."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        w = width
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, w, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(w, 2 * w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(2 * w, 1, 3, padding=1)),
        )  # fmt: skip

    def forward(self, frames: Tensor) -> Tensor:
        if frames.ndim != 4:
            raise ValueError(f"expected frames (N, C, H, W), got {tuple(frames.shape)}")
        return self.net(frames.float()).flatten(1)


class TeacherFeatureDiscriminator(nn.Module):
    """Frames (N, C, H, W) -> (N, P) token logits from frozen features: each frame as a static
    clip through the first ``depth`` blocks of a frozen copy of the video teacher's DiT (time
    0, no label), then a trained head (LayerNorm without affine, linear) per token. Our
    stand-in for MCM's frozen DINO features: features learnt on other data and frozen, so the
    critic judges what they encode rather than any pixel statistic (LADD, Sauer et al. 2024,
    likewise puts trained heads on its teacher's features). Real and fake frames are both
    static clips, so motion is no cue."""

    def __init__(self, dit: nn.Module, depth: int = 0):
        super().__init__()
        if not 0 <= depth <= len(dit.blocks):
            raise ValueError(f"disc_depth must be in [0, {len(dit.blocks)}], got {depth}")
        self.backbone = frozen_copy(dit)
        self.depth = depth or max(1, len(dit.blocks) // 2)
        self.norm = nn.LayerNorm(dit.cfg.dim, elementwise_affine=False)
        self.head = nn.Linear(dit.cfg.dim, 1)

    def forward(self, frames: Tensor) -> Tensor:
        if frames.ndim != 4:
            raise ValueError(f"expected frames (N, C, H, W), got {tuple(frames.shape)}")
        n, frames_per_clip = len(frames), self.backbone.cfg.frames
        clips = frames[:, None].expand(n, frames_per_clip, *frames.shape[1:])
        zero = torch.zeros(n, device=frames.device)
        h, _ = self.backbone.tokens(clips, zero, None, self.depth)
        return self.head(self.norm(h)).squeeze(-1)


DISC_BACKBONES = ("pixels", "teacher")


# GAN losses as in MCM main.py steps 10.2 (generator) and 12 (discriminator); logits are D's.
def wgan_generator(fake: Tensor) -> Tensor:
    return -fake.mean()


def wgan_discriminator(real: Tensor, fake: Tensor) -> Tensor:
    """Clipped WGAN critic loss mean(max(-1, -D(real))) + mean(max(-1, D(fake)))."""
    return real.neg().clamp_min(-1).mean() + fake.clamp_min(-1).mean()


def hinge_discriminator(real: Tensor, fake: Tensor) -> Tensor:
    """Hinge loss (Lim & Ye 2017) mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


# name -> (generator loss(fake logits), discriminator loss(real logits, fake logits));
# hinge's generator term is -D(fake) (MCM adds a constant 1, which changes no gradient)
GAN_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "wgan": (wgan_generator, wgan_discriminator),
    "hinge": (wgan_generator, hinge_discriminator),
    "bce": (gan_generator_loss, gan_discriminator_loss),  # core's non-saturating GAN
}


def gradient_penalty(disc: nn.Module, real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017, eq. 3) mean((||grad_x D(x_hat)|| - 1)^2) at
    x_hat = alpha real + (1 - alpha) fake, frames (N, C, H, W), alpha (N,). MCM applies it on
    DINO features with weight 1e-5; here on pixels."""
    a = alpha.view(-1, 1, 1, 1).to(real)
    x = (a * real + (1 - a) * fake.detach()).requires_grad_(True)
    (g,) = torch.autograd.grad(disc(x).sum(), x, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2).mean()


def segment_frames(videos: Tensor, k: int, u: Tensor) -> Tensor:
    """Temporal-segment sampling (TSN, Wang et al. 2016; MCM's ``tsn_sample``): split the T
    frames into ``k`` equal segments and take one frame of each at relative position
    u (B, k) in [0, 1). (B, T, C, H, W) -> (B k, C, H, W)."""
    b, t = videos.shape[:2]
    if not 1 <= k <= t:
        raise ValueError(f"frames per clip for the discriminator must be in [1, {t}], got {k}")
    edges = torch.arange(k + 1, device=videos.device) * t / k
    start, length = edges[:-1].floor(), (edges[1:].floor() - edges[:-1].floor())
    idx = (start + (u.to(videos.device) * length).floor()).long().clamp_max(t - 1)  # (B, k)
    rows = torch.arange(b, device=videos.device)[:, None].expand(b, k)
    return videos[rows, idx].flatten(0, 1)


# ------------------------------------------------------------------------------ objective


@dataclass
class MCMLossConfig(ConsistencyConfig):
    motion: str = "diff"  # motion representation the consistency distance acts on (MOTIONS)
    adv_weight: float = 1.0  # weight of the frame adversarial loss (MCM: disc_loss_weight 1)
    gan_loss: str = "wgan"  # wgan (clipped, the released scripts), hinge, or bce
    gp_weight: float = 1e-5  # gradient-penalty weight of the discriminator (MCM: 1e-5)
    disc_frames: int = 2  # frames per clip shown to the discriminator (TSN; MCM: 2)
    disc_start_step: int = 0  # steps of plain (motion) distillation before the GAN starts
    # the discriminator: "pixels" (a from-scratch CNN on frames) or "teacher" (a trained head
    # on the frozen features of the teacher's first ``disc_depth`` DiT blocks)
    disc_backbone: str = "pixels"
    disc_depth: int = 0  # "teacher": DiT blocks under the head (0: half of them, at least 1)
    mix_ratio: float = 0.5  # share of trajectories started from the student's generation


class MCMObjective(ConsistencyDistillation):
    """MCM: motion consistency distillation + frame discriminator + mixed trajectories.

    ``real_frames`` (N, C, H, W) in [-1, 1] are the high-quality image frames of the
    discriminator; they stay where they were given and are moved to the batch's device per
    step (index first), so the objective holds no device. Roles: ``student`` (the base
    denoiser that ``ConsistencyFunction`` wraps), ``discriminator``; frozen ``target`` (EMA).
    ``adv_weight = 0``, ``motion = "raw"`` and ``mix_ratio = 0`` is core's plain consistency
    distillation, draw for draw (tested)."""

    name = "mcm"
    config_cls = MCMLossConfig
    roles = ("student", "discriminator")
    frozen_roles = ("target",)
    needs_data = True
    summary = "MCM: motion-representation consistency distillation + frame GAN (Zhai 2024)"

    def __init__(self, teacher: Denoiser, config: MCMLossConfig | None = None, real_frames=None):
        super().__init__(teacher, config)
        cfg = self.config
        get_motion(cfg.motion)  # unknown names fail here, listing the choices
        check_choice("gan_loss", cfg.gan_loss, tuple(GAN_LOSSES))
        check_choice("disc_backbone", cfg.disc_backbone, DISC_BACKBONES)
        check_choice("metric", cfg.metric, ("huber", "l2"))
        if not 0.0 <= cfg.mix_ratio <= 1.0:
            raise ValueError(f"mix_ratio must be in [0, 1], got {cfg.mix_ratio}")
        if cfg.adv_weight < 0 or cfg.gp_weight < 0:
            raise ValueError("adv_weight and gp_weight must be >= 0")
        if cfg.adv_weight > 0 and (real_frames is None or real_frames.ndim != 4):
            shape = None if real_frames is None else tuple(real_frames.shape)
            raise ValueError(
                "adv_weight > 0 needs real_frames (N, C, H, W): the high-quality image "
                f"frames of the discriminator; got {shape}"
            )
        self.real_frames = real_frames

    @property
    def adversarial(self) -> bool:
        return self.config.adv_weight > 0

    def build_roles(self, student: Denoiser, example) -> dict[str, nn.Module]:
        channels = example.x.shape[2] if example.x is not None else 3
        if self.config.disc_backbone == "teacher":
            disc = TeacherFeatureDiscriminator(unguided(self.teacher).net, self.config.disc_depth)
        else:
            disc = FrameDiscriminator(channels)
        return {"student": student, "target": frozen_copy(student), "discriminator": disc}

    def schedule(self, step: int) -> list[str]:
        if self.adversarial and step >= self.config.disc_start_step:
            return ["student", "discriminator"]
        return ["student"]

    # --- mixed trajectories -----------------------------------------------------------------
    def trajectory_start(self, roles, batch) -> tuple[Tensor, Tensor]:
        """(x_start (B, T, C, H, W), high-quality mask (B,)): the clean video each trajectory
        starts from. A sample is from the high-quality domain with probability ``mix_ratio``:
        then x_start = f_theta-(z, t_max), the EMA student's one-step generation from noise
        z (MCM ``cd_pred_x0_portion``); otherwise the low-quality training clip batch.x.
        The noise is drawn for every sample, so a run's random stream does not depend on
        how many were picked; with ``mix_ratio = 0`` nothing is drawn, so the random stream
        (and the loss) is exactly core's ``ConsistencyDistillation``'s."""
        x0 = batch.x
        if self.config.mix_ratio == 0.0:
            return x0, torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        hq = batch.rng.rand().to(x0.device) < self.config.mix_ratio
        z = batch.rng.randn_like(x0).to(x0)
        if not bool(hq.any()):
            return x0, hq
        t_max = torch.full((int(hq.sum()),), self.path.t_max, device=x0.device)
        x_t = self.path.noise(torch.zeros_like(z[hq]), t_max, z[hq])
        cond = None if batch.cond is None else batch.cond[hq]
        with torch.no_grad():
            gen = self.wrap(roles["target"])(x_t, t_max, cond)
        start = x0.clone()
        start[hq] = gen.to(x0)
        return start, hq

    # --- losses ---------------------------------------------------------------------------
    def _real_frames(self, batch, n: int, like: Tensor) -> Tensor:
        idx = batch.rng.randint(0, len(self.real_frames), n).flatten().cpu()
        return self.real_frames[idx].to(like)

    def losses(self, roles, batch, update, step):
        cfg = self.config
        if batch.x is None:
            raise ValueError("MCM needs low-quality training clips x in the batch")
        x_start, hq = self.trajectory_start(roles, batch)
        i = batch.rng.randint(1, cfg.num_intervals + 1).float()
        t_hi = self.path.fraction_to_t(i / cfg.num_intervals).to(x_start.device)
        t_lo = self.path.fraction_to_t((i - 1) / cfg.num_intervals).to(x_start.device)
        x_hi, _ = noised(self.path, x_start, t_hi, batch)
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, batch.cond)
            target = self.wrap(roles["target"])(x_lo, t_lo, batch.cond)
        pred = self.wrap(roles["student"])(x_hi, t_hi, batch.cond)
        l_mcd = motion_distance(pred, target, cfg.motion, cfg.metric, cfg.huber_c)
        logs = {"motion_loss": l_mcd.item(), "hq_share": hq.float().mean().item()}
        losses = {"student": l_mcd}
        if "discriminator" in update:
            gen_loss, disc_loss = GAN_LOSSES[cfg.gan_loss]
            disc = roles["discriminator"]
            u = batch.rng.rand(cfg.disc_frames)
            fake = segment_frames(pred, cfg.disc_frames, u)  # (B k, C, H, W)
            real = self._real_frames(batch, cfg.disc_frames, fake)
            # D is not in the student's optimiser and the trainer back-propagates each loss
            # into its own role's parameters only, so one D pass serves the generator
            l_g = gen_loss(disc(fake))
            l_d = disc_loss(disc(real), disc(fake.detach()))
            if cfg.gp_weight > 0:
                alpha = batch.rng.rand().repeat_interleave(cfg.disc_frames)
                gp = gradient_penalty(disc, real, fake, alpha)
                l_d = l_d + cfg.gp_weight * gp
                logs["gradient_penalty"] = gp.item()
            losses["student"] = l_mcd + cfg.adv_weight * l_g
            losses["discriminator"] = l_d
            logs.update(adv_generator_loss=l_g.item(), disc_loss=l_d.item())
        return losses, logs
