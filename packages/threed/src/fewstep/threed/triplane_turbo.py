"""TriplaneTurbo: a 2-D denoiser adapted to emit triplanes in a few steps, trained by
progressive rendering distillation (PRD) from the same 2-D prior, with no 3-D data.

Ma et al., "Progressive Rendering Distillation: Adapting Stable Diffusion for Instant
Text-to-Mesh Generation without 3D Data" (CVPR 2025), code theEricMa/TriplaneTurbo. Here the
"Stable Diffusion" is the 2-D prior's own denoiser (``Prior2D.denoiser``) and the text prompt
its class label; the pieces, scaled down:

- **Triplane latent**: an object is P = 3 planes (xy, xz, yz), each a latent of
  the prior's image shape (ch, S, S), batched through the denoiser as P images
  (object-major, plane-minor: row ``b P + p`` is plane p of object b).
- **Parameter-efficient triplane adapter (PETA)** (repository:
  ``extern/few_step_triplane_dual_sd_modules.py``): the base weights stay frozen; the
  trainable parts are (1) LoRA on every Linear and Conv2d of the denoiser through ``peft``
  (the paper's LoRA on attention and LoCon on convolutions, its "vanilla" type: one adapter
  shared by the planes; B = 0 at init), (2) a per-plane bias on the condition embedding (the
  paper's per-plane ``prompt_bias``; on networks without a ``class_embedding`` it is a
  per-plane bias on the input instead), and (3) cross-plane self-attention: the denoiser's
  attention layers (diffusers ``Attention``) attend over the tokens of all P planes of an
  object (the paper's triplane self-attention), mixed with the per-plane attention by a gate
  that starts at 0. All three are zero at init, so the adapted denoiser starts equal to the
  base (tested). The paper's per-plane ("hexa") LoRA is not used: peft cannot route samples of
  one batch to different adapters while training.
- **Decoder** (the paper's VAE decoder with a new ``conv_out``): the denoised latent planes
  (B, P, ch, S, S) -> triplane features (B, P, C, R, R) by a small convolutional net with
  separate weights per plane (grouped convolutions), then a shared ``TriplaneDecoder`` MLP
  (``fewstep.threed.triplane``) gives density and colour, volume-rendered by ``volume.py``.
- **Progressive rendering distillation** (the repository's
  ``systems/multiprompt_dual_renderer_multistep_generator.py``, ``training_step``): K times
  t_1 > ... > t_K (the K parts of the schedule, ``progressive_fractions``). Start from
  x_{t_1} = sigma(t_1) eps; at step k the adapted denoiser predicts x0_k from x_{t_k}; x0_k is
  decoded to a triplane, rendered from random orbit cameras and supervised by score
  distillation from the frozen prior (SDS, ``score/sds.py``; the paper uses its ASD); then
  x0_k is re-noised to the next level, x_{t_{k+1}} = alpha x0_k + sigma eps' (fresh Gaussian
  eps' by default, the paper's ``noise_addition``), with a stop-gradient between steps and each
  step's loss weighted 1/K and back-propagated right away (the paper's per-step
  ``manual_backward``). Sampling runs the same K steps without gradient.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import unguided
from fewstep.threed.triplane import N_PLANES, TriplaneConfig, TriplaneDecoder, TriplaneField

# ------------------------------------------------------------------------------- adapter


@dataclass
class AdapterConfig:
    """PETA: which adapters the frozen denoiser gets (all start as the identity)."""

    rank: int = 4  # LoRA rank on every Linear / Conv2d (paper: 16 on SD's 860M parameters)
    alpha: float = 4.0  # LoRA alpha (scale alpha / rank)
    plane_bias: bool = True  # per-plane bias on the condition embedding (or on the input)
    cross_plane_attention: bool = True  # attention layers also attend across the P planes


class PlaneConditionBias(nn.Module):
    """Wraps a condition embedding (labels (N,) -> (N, D)) and adds a per-plane bias (P, D),
    zero at init; rows are object-major, plane-minor, so row n is plane ``n % P``."""

    def __init__(self, base: nn.Module, planes: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.planes = planes
        self.bias = nn.Parameter(torch.zeros(planes, dim))

    def forward(self, labels: Tensor) -> Tensor:
        e = self.base(labels)
        if e.shape[0] % self.planes:
            raise ValueError(f"batch {e.shape[0]} is not a multiple of {self.planes} planes")
        idx = torch.arange(e.shape[0], device=e.device) % self.planes
        return e + self.bias[idx].to(e.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """Multi-head attention over (N, L, D) tokens -> (N, L, D)."""
    n, L, d = q.shape
    hd = d // heads

    def split(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, hd).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).reshape(n, L, d)


class CrossPlaneAttention(nn.Module):
    """A diffusers attention processor for self-attention layers: the per-plane attention of
    the base (exactly diffusers' ``AttnProcessor2_0`` path) and a joint attention over the
    tokens of all P planes of each object (TriplaneTurbo's triplane self-attention), mixed as
    ``own + gate (joint - own)`` before the output projection; ``gate`` is 0 at init.

    Written here (not peft) because it changes which tokens attend to which, not a weight."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.planes = planes
        self.gate = nn.Parameter(torch.zeros(()))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("CrossPlaneAttention handles self-attention without masks only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            n, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(n, c, h * w).transpose(1, 2)
        n, L, _ = hidden_states.shape
        if n % self.planes:
            raise ValueError(f"batch {n} is not a multiple of {self.planes} planes")
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise ValueError("CrossPlaneAttention does not support q/k normalisation layers")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d // attn.heads)  # SDPA's default, as AttnProcessor2_0
        out = _sdpa(q, k, v, attn.heads, scale)
        if self.training or bool(self.gate.detach() != 0):
            m, PL = n // self.planes, self.planes * L
            joint = _sdpa(q.reshape(m, PL, d), k.reshape(m, PL, d), v.reshape(m, PL, d),
                          attn.heads, scale).reshape(n, L, d)  # fmt: skip
            out = out + self.gate.to(out.dtype) * (joint - out)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(n, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _lora_targets(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def adapt_denoiser(base: Denoiser, planes: int, config: AdapterConfig) -> tuple[Denoiser, bool]:
    """A frozen copy of ``base`` (its unguided network) with PETA adapters, equal to ``base``
    at init, and whether the per-plane bias went on a condition embedding (False: the caller
    adds its own input bias, if ``config.plane_bias``). Trainable parameters are exactly the
    adapters' (``requires_grad``)."""
    from peft import LoraConfig, inject_adapter_in_model

    if config.rank < 1:
        raise ValueError(f"adapter rank must be >= 1, got {config.rank}")
    net = copy.deepcopy(unguided(base))
    net.requires_grad_(False)
    targets = _lora_targets(net)
    if not targets:
        raise ValueError(
            f"{type(net).__name__} has no Linear or Conv2d layer for LoRA to adapt; "
            "expected a convolutional / transformer denoiser"
        )
    lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets,
                      lora_dropout=0.0, init_lora_weights=True)  # fmt: skip
    net = inject_adapter_in_model(lcfg, net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    if config.cross_plane_attention:
        for m in net.modules():
            if (
                hasattr(m, "set_processor")
                and hasattr(m, "to_q")
                and not getattr(m, "is_cross_attention", False)
            ):
                m.set_processor(CrossPlaneAttention(planes))
    on_embedding = False
    if config.plane_bias:
        embeds = (m for m in net.modules() if isinstance(getattr(m, "class_embedding", None),
                                                          nn.Embedding))  # fmt: skip
        owner = next(embeds, None)
        if owner is not None:
            e = owner.class_embedding
            owner.class_embedding = PlaneConditionBias(e, planes, e.embedding_dim)
            on_embedding = True
    return net, on_embedding


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------ generator


@dataclass
class GeneratorConfig:
    """The adapted denoiser, its triplane decoder and the progressive schedule."""

    steps: int = 4  # K progressive steps (paper: 4)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # PETA adapters
    triplane: TriplaneConfig = field(default_factory=TriplaneConfig)  # planes and field MLP
    decoder_width: int = 32  # hidden channels per plane of the latent -> features decoder
    noise_addition: str = "gaussian"  # re-noising between steps: gaussian, pred or zero
    jitter_times: bool = False  # training: draw t_k within its part instead of its upper end


class PlaneDecoder(nn.Module):
    """Latent planes (B, P, ch, S, S) -> triplane features (B, P, C, R, R): bilinear resize to
    R, then conv 3x3 - SiLU - conv 3x3 - SiLU - conv 1x1, with separate weights per plane
    (grouped convolutions), standing in for the paper's adapted VAE decoder."""

    def __init__(self, planes: int, in_ch: int, width: int, out_ch: int, resolution: int):
        super().__init__()
        self.planes, self.in_ch, self.out_ch, self.resolution = planes, in_ch, out_ch, resolution
        P = planes
        self.net = nn.Sequential(
            nn.Conv2d(P * in_ch, P * width, 3, padding=1, groups=P), nn.SiLU(),
            nn.Conv2d(P * width, P * width, 3, padding=1, groups=P), nn.SiLU(),
            nn.Conv2d(P * width, P * out_ch, 1, groups=P),
        )  # fmt: skip

    def forward(self, latents: Tensor) -> Tensor:
        B, P, ch, S, _ = latents.shape
        x = latents.reshape(B, P * ch, S, S)
        R = self.resolution
        if S != R:
            x = F.interpolate(x, size=(R, R), mode="bilinear", align_corners=False)
        return self.net(x).reshape(B, P, self.out_ch, R, R)


class TriplaneGenerator(nn.Module):
    """(noisy triplane latent, time, class label) -> triplane, from a prior's denoiser.

    ``latent_shape`` is (P, ch, S, S) with (ch, S, S) the prior's image shape."""

    def __init__(self, base: Denoiser, image_shape: tuple[int, int, int],
                 config: GeneratorConfig | None = None) -> None:  # fmt: skip
        super().__init__()
        cfg = config or GeneratorConfig()
        if cfg.steps < 1:
            raise ValueError(f"the generator needs >= 1 progressive step, got {cfg.steps}")
        if cfg.noise_addition not in NOISE_ADDITION:
            raise ValueError(
                f"unknown noise_addition {cfg.noise_addition!r}; "
                f"expected one of {sorted(NOISE_ADDITION)}"
            )
        self.config = cfg
        ch, S, _ = image_shape
        self.latent_shape = (N_PLANES, ch, S, S)
        self.denoiser, on_embedding = adapt_denoiser(base, N_PLANES, cfg.adapter)
        # plane identity where the network has no condition embedding to bias: on the input
        self.input_bias = None
        if cfg.adapter.plane_bias and not on_embedding:
            self.input_bias = nn.Parameter(torch.zeros(N_PLANES, ch, S, S))
        t = cfg.triplane
        self.plane_decoder = PlaneDecoder(N_PLANES, ch, cfg.decoder_width, t.channels,
                                          t.resolution)  # fmt: skip
        self.field_decoder = TriplaneDecoder(t)

    @property
    def path(self):
        return self.denoiser.path

    def adapter_parameters(self) -> list[nn.Parameter]:
        extra = [self.input_bias] if self.input_bias is not None else []
        return trainable_parameters(self.denoiser) + extra

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.plane_decoder.parameters(), *self.field_decoder.parameters()]

    def denoise(self, x_t: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """x_t (B, P, ch, S, S) at native times t (B,), labels (B,) -> (x0, eps) predictions,
        each (B, P, ch, S, S)."""
        if tuple(x_t.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"triplane latents must be (B, {', '.join(map(str, self.latent_shape))}), "
                f"got {tuple(x_t.shape)}"
            )
        B, P = x_t.shape[:2]
        x = x_t.reshape(B * P, *x_t.shape[2:])
        tt = t.reshape(-1).expand(B).repeat_interleave(P)
        cond = labels.reshape(-1).expand(B).repeat_interleave(P)
        inp = x if self.input_bias is None else x + self.input_bias.repeat(B, 1, 1, 1)
        raw = self.denoiser(inp, tt, cond)
        x0, eps = self.path.to_x0_eps(raw, self.denoiser.prediction, x, tt)
        return x0.reshape(x_t.shape), eps.reshape(x_t.shape)

    def decode(self, latents: Tensor) -> Tensor:
        """Denoised latents (B, P, ch, S, S) -> triplanes (B, 3, C, R, R)."""
        return self.plane_decoder(latents)

    def field(self, planes: Tensor) -> TriplaneField:
        """The radiance field of one object's planes (3, C, R, R)."""
        return TriplaneField(planes, self.field_decoder)


# --------------------------------------------------------------------- progressive steps


def progressive_fractions(
    steps: int, jitter: bool = False, generator: torch.Generator | None = None
) -> list[float]:
    """K decreasing path fractions: the upper ends 1, (K-1)/K, ..., 1/K of the K equal parts
    of [0, 1] (the paper's ``timesteps_from_T`` with as many schedule steps as parts), or one
    uniform draw inside each part (``jitter``, the paper's ``sample_timesteps``)."""
    if steps < 1:
        raise ValueError(f"need >= 1 progressive step, got {steps}")
    if not jitter:
        return [1.0 - k / steps for k in range(steps)]
    u = torch.rand(steps, generator=generator)
    return [float((steps - k - 1 + u[k]) / steps) for k in range(steps)]


def _gaussian(x0: Tensor, eps_hat: Tensor, draw: Callable[[Tensor], Tensor]) -> Tensor:
    return draw(x0)


def _pred(x0: Tensor, eps_hat: Tensor, draw: Callable[[Tensor], Tensor]) -> Tensor:
    return eps_hat.detach()


def _zero(x0: Tensor, eps_hat: Tensor, draw: Callable[[Tensor], Tensor]) -> Tensor:
    return torch.zeros_like(x0)


# The paper's ``noise_addition``: the noise that re-noises x0_k to level t_{k+1}.
#   gaussian: fresh N(0, I) (default); pred: the network's own eps prediction (DDIM-like);
#   zero: none (x_{t_{k+1}} = alpha x0_k).
NOISE_ADDITION: dict[str, Callable[[Tensor, Tensor, Callable[[Tensor], Tensor]], Tensor]] = {
    "gaussian": _gaussian,
    "pred": _pred,
    "zero": _zero,
}


@dataclass
class ProgressiveStep:
    index: int  # k, 0-based
    fraction: float  # t_k as a fraction of the path
    x_t: Tensor  # the (detached) noisy latent the denoiser saw, (B, P, ch, S, S)
    x0: Tensor  # its x0 prediction (with graph when gradients are on)
    eps: Tensor  # its eps prediction


def progressive_steps(
    gen: TriplaneGenerator,
    labels: Tensor,
    fractions: list[float],
    noise: Tensor,
    draw: Callable[[Tensor], Tensor],
    noise_addition: str | None = None,
) -> Iterator[ProgressiveStep]:
    """Yield the K progressive steps from ``noise`` (B, P, ch, S, S): x_{t_1} = noise(0, t_1,
    noise) (the data term is unknown: pure noise at t_1 = 1), then for each k: x0_k, eps_k =
    denoise(x_{t_k}); x_{t_{k+1}} = noise(sg(x0_k), t_{k+1}, e) with e from ``noise_addition``
    (fresh draws from ``draw(like)``). The consumer may back-propagate through each step's
    x0 before asking for the next: the next step only sees it detached."""
    kind = noise_addition or gen.config.noise_addition
    if kind not in NOISE_ADDITION:
        raise ValueError(
            f"unknown noise_addition {kind!r}; expected one of {sorted(NOISE_ADDITION)}"
        )
    path = gen.path
    B = noise.shape[0]
    t = path.fraction_to_t(torch.tensor(fractions[0])).reshape(1).expand(B).to(noise.device)
    x_t = path.noise(torch.zeros_like(noise), t, noise)
    for k, f in enumerate(fractions):
        x0, eps = gen.denoise(x_t, t, labels)
        yield ProgressiveStep(k, f, x_t, x0, eps)
        if k + 1 < len(fractions):
            t = path.fraction_to_t(torch.tensor(fractions[k + 1])).reshape(1).expand(B)
            t = t.to(noise.device)
            e = NOISE_ADDITION[kind](x0, eps, draw)
            x_t = path.noise(x0.detach(), t, e).detach()


def _drawer(generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    def draw(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator).to(like)

    return draw


@torch.no_grad()
def generate(
    gen: TriplaneGenerator,
    labels: Tensor,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    noise_addition: str | None = None,
) -> Tensor:
    """Triplanes (B, 3, C, R, R) for ``labels`` (B,) in ``steps`` (default: the config's K)
    progressive steps from noise drawn with ``generator``; only the last x0 is decoded."""
    K = steps or gen.config.steps
    dev = next(gen.parameters()).device
    labels = torch.as_tensor(labels).reshape(-1).to(dev)
    noise = torch.randn((labels.shape[0], *gen.latent_shape), generator=generator).to(dev)
    last = None
    for s in progressive_steps(gen, labels, progressive_fractions(K), noise,
                               _drawer(generator), noise_addition):  # fmt: skip
        last = s.x0
    return gen.decode(last)


# ------------------------------------------------------------------------------- training


@dataclass
class TurboTrainConfig:
    """Progressive rendering distillation (training of the generator)."""

    train_steps: int = 300  # optimiser steps
    objects: int = 4  # objects (random class labels) per step
    lr_adapter: float = 1e-3  # Adam lr of the PETA adapters
    lr_decoder: float = 3e-3  # Adam lr of the plane decoder and the field MLP
    field_samples: int = 24  # volume-rendering samples per ray
    lambda_sparsity: float = 0.0  # paper's sparsity term: mean sqrt(opacity^2 + 0.01)
    per_step_guidance_time: bool = False  # paper's "v1": step k's SDS t in part k only
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    seed: int = 0  # seeds every per-step draw (labels, noise, cameras, SDS t and eps)


def sparsity_loss(alpha: Tensor) -> Tensor:
    """The paper's ``loss_sparsity``: mean sqrt(opacity^2 + 0.01) over pixels."""
    return (alpha.pow(2) + 0.01).sqrt().mean()


def render_objects(gen: TriplaneGenerator, planes: Tensor, cams_list: list, bgs: list,
                   render_cfg) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Render object b's field into ``cams_list[b]`` over ``bgs[b]`` (V, 3):
    images (B V, H, W, 3) and alphas (B V, H, W, 1), object-major."""
    from fewstep.threed.distill3d import render_views

    imgs, alphas = [], []
    for b in range(planes.shape[0]):
        out = render_views(gen.field(planes[b]), cams_list[b], bgs[b], render_cfg)
        imgs.append(out["image"])
        alphas.append(out["alpha"])
    return torch.cat(imgs), torch.cat(alphas)


def prd_step(
    gen: TriplaneGenerator,
    scores: list,
    labels: Tensor,
    step: int,
    total: int,
    cfg: TurboTrainConfig,
    render_cfg,
    rng: torch.Generator,
) -> dict[str, float]:
    """One PRD iteration's gradients (accumulated into ``.grad``; the caller steps the
    optimiser): K progressive steps, each decoded, rendered from fresh random cameras,
    scored by ``scores[k]`` (a ``ScoreMethod``), weighted 1/K and back-propagated."""
    from fewstep.threed.distill3d import background_values, sample_cameras

    K = gen.config.steps
    adapter = scores[0].adapter
    dev = labels.device
    B, V = labels.shape[0], render_cfg.cameras.views
    fractions = progressive_fractions(K, gen.config.jitter_times, rng)
    noise = torch.randn((B, *gen.latent_shape), generator=rng).to(dev)
    logs: dict[str, float] = {}
    for s in progressive_steps(gen, labels, fractions, noise, _drawer(rng)):
        planes = gen.decode(s.x0)
        cams = [sample_cameras(render_cfg.cameras, rng) for _ in range(B)]
        bgs = [background_values(render_cfg.cameras.background, V, rng) for _ in range(B)]
        images, alpha = render_objects(gen, planes, cams, bgs, render_cfg)
        x = adapter.to_prior(images)
        cond = labels.repeat_interleave(V)
        c2w = torch.cat([c.camera_to_world for c in cams]).to(dev)
        losses, slog = scores[s.index].loss(x, cond, step, total, camera=c2w, generator=rng)
        loss = losses["scene"]
        if cfg.lambda_sparsity > 0:
            sp = sparsity_loss(alpha)
            loss = loss + cfg.lambda_sparsity * sp
            logs[f"sparsity_{s.index}"] = sp.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite PRD loss at step {step}, progressive step "
                                     f"{s.index}: {loss.item()}")  # fmt: skip
        (loss / K).backward()
        logs[f"grad_norm_{s.index}"] = slog.get("grad_norm", float("nan"))
        logs[f"opacity_{s.index}"] = alpha.mean().item()
    return logs


def score_methods(adapter, sds_cfg, steps: int, per_step_time: bool, seed: int) -> list:
    """One SDS per progressive step: all the same, or (paper's "v1") step k's t restricted
    to the k-th part [(K-k-1)/K, (K-k)/K] of the path (clipped to the schedule's range)."""
    from dataclasses import replace

    from fewstep.threed.score.sds import SDS

    if not per_step_time:
        return [SDS(adapter, sds_cfg, seed=seed)] * steps
    out = []
    s = sds_cfg.schedule
    for k in range(steps):
        lo = max(s.t_min, (steps - k - 1) / steps)
        hi = max(lo, min(s.t_max, (steps - k) / steps))
        sched = replace(s, name="uniform", t_min=lo, t_max=hi, t_max_end=hi)
        out.append(SDS(adapter, replace(sds_cfg, schedule=sched), seed=seed))
    return out


def make_optimizer(gen: TriplaneGenerator, cfg: TurboTrainConfig) -> torch.optim.Adam:
    return torch.optim.Adam([
        {"params": gen.adapter_parameters(), "lr": cfg.lr_adapter, "name": "adapter"},
        {"params": gen.decoder_parameters(), "lr": cfg.lr_decoder, "name": "decoder"},
    ])  # fmt: skip


def train_generator(
    gen: TriplaneGenerator,
    adapter,
    sds_cfg,
    cfg: TurboTrainConfig,
    render_cfg,
    num_classes: int,
    ckpt_dir=None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callback: Callable[[int, TriplaneGenerator], None] | None = None,
) -> list[dict]:
    """Train ``gen`` by PRD for ``cfg.train_steps`` steps; amortised over classes (each step
    draws ``cfg.objects`` labels without replacement, cycling when more than the classes).
    With ``ckpt_dir`` it checkpoints (core's atomic format) and resumes from the newest
    checkpoint there, replaying the same draws. Returns one log row per step."""
    from fewstep.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from fewstep.threed.distill3d import step_generator

    gen.to(device)
    adapter.denoiser.to(device)
    opt = make_optimizer(gen, cfg)
    scores = score_methods(adapter, sds_cfg, gen.config.steps, cfg.per_step_guidance_time,
                           cfg.seed)  # fmt: skip
    start, log = 0, []
    if ckpt_dir is not None and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(latest_checkpoint(ckpt_dir), {"generator": gen}, {"gen": opt})
        start, log = state["step"] + 1, state.get("log", [])
    it = range(start, cfg.train_steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="PRD", dynamic_ncols=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in it:
        t0 = time.perf_counter()
        rng = step_generator(cfg.seed, step)
        reps = -(-cfg.objects // num_classes)
        labels = torch.cat([torch.randperm(num_classes, generator=rng) for _ in range(reps)])
        labels = labels[: cfg.objects].to(device)
        gen.train()
        opt.zero_grad(set_to_none=True)
        logs = prd_step(gen, scores, labels, step, cfg.train_steps, cfg, render_cfg, rng)
        if cfg.grad_clip > 0:
            logs["param_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        row = {"step": step, **logs, "seconds": time.perf_counter() - t0}
        log.append(row)
        if callback is not None:
            callback(step, gen)
        last = step == cfg.train_steps - 1
        if ckpt_dir is not None and (
            last or (cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0)
        ):
            save_checkpoint(ckpt_dir, step, {"generator": gen}, {"gen": opt}, {"log": log})
    gen.eval()
    return log


def count_parameters(gen: TriplaneGenerator) -> dict[str, int]:
    """Frozen base, adapter and decoder parameter counts."""
    n_adapter = sum(p.numel() for p in gen.adapter_parameters())
    n_base = sum(p.numel() for p in gen.denoiser.parameters() if not p.requires_grad)
    n_dec = sum(p.numel() for p in gen.decoder_parameters())
    return {"base_frozen": n_base, "adapter": n_adapter, "decoder": n_dec}


__all__ = [
    "NOISE_ADDITION",
    "AdapterConfig",
    "CrossPlaneAttention",
    "GeneratorConfig",
    "PlaneConditionBias",
    "PlaneDecoder",
    "ProgressiveStep",
    "TriplaneGenerator",
    "TurboTrainConfig",
    "adapt_denoiser",
    "count_parameters",
    "generate",
    "prd_step",
    "progressive_fractions",
    "progressive_steps",
    "score_methods",
    "sparsity_loss",
    "train_generator",
]
