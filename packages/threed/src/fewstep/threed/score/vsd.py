"""VSD: variational score distillation with a camera-conditioned LoRA critic.

Wang, Lu, Wang, Bao, Li, Su, Zhu, "ProlificDreamer: High-Fidelity and Diverse Text-to-3D
Generation with Variational Score Distillation" (NeurIPS 2023).

- Scene update (eq. 9): grad_theta = E[ w(t) (eps_pretrain(x_t; y, t) - eps_phi(x_t; y, t, c))
  dx/dtheta ], eps_pretrain guided at CFG 7.5, the critic unguided (threestudio's
  ``guidance_scale_lora = 1``), w(t) = sigma_t^2; t follows the two-stage annealing
  U(0.02, 0.98) -> U(0.02, 0.5) after the first 20 % of the run (sec. 5).
- Critic update (eq. 10): eps_phi is the prior plus LoRA (Hu et al. 2022, via peft, core's
  ``lora_critic``) and a camera embedding c; it trains with the standard denoising loss on
  the *detached* renders, with the camera of each render, and with the camera dropped (set
  to zero) 10 % of the time (ProlificDreamer's CFG training of the LoRA).

Camera conditioning. ProlificDreamer feeds the flattened camera-to-world matrix through a
small MLP into the U-Net's class-embedding slot, which diffusers adds to the time embedding.
``CameraCritic`` does the same: when the prior's network has a ``time_embedding`` module (any
diffusers UNet) a forward hook adds MLP(c2w) to its output. Networks without one cannot take
extra conditioning, so the embedding enters as a residual adapter on the input instead:
x_t + reshape(MLP(c2w)). Either way the MLP's last layer starts at zero, so the critic starts
as the prior exactly (as LoRA does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.common import denoising_loss
from fewstep.core.objectives.vsd import lora_critic
from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score.base import ScoreMethod, grad_logs, randn, reparam_loss, weight


@dataclass
class VSDConfig:
    guidance_scale: float = 7.5  # CFG scale of the pretrained prior (ProlificDreamer: 7.5)
    critic_guidance_scale: float = 1.0  # CFG of the critic over its zero camera (1 = off)
    weighting: str = "sigma2"  # w(t), a WEIGHTINGS name (ProlificDreamer: sigma_t^2)
    schedule: TimeSchedule = field(
        default_factory=lambda: TimeSchedule("prolific", 0.02, 0.98, 0.5, switch=0.2)
    )  # two-stage annealing [0.02, 0.98] -> [0.02, 0.5]
    lora_rank: int = 4  # LoRA rank of the critic
    lora_alpha: float = 4.0  # LoRA scale numerator (scale = alpha / rank)
    lora_targets: tuple[str, ...] = ()  # layer names (or suffixes) to adapt; () = all Linear/Conv
    camera_hidden: int = 64  # width of the camera MLP
    camera_dropout: float = 0.1  # rate at which the critic trains with a zero camera
    critic_lr: float = 1e-3  # Adam learning rate of LoRA + camera MLP (ProlificDreamer: 1e-3)


def vsd_gradient(eps_prior: Tensor, eps_critic: Tensor, w: Tensor) -> Tensor:
    """w(t) (eps_pretrain - eps_phi): the VSD gradient on the render (eq. 9), (B, ...)."""
    return w * (eps_prior - eps_critic)


def camera_features(c2w: Tensor) -> Tensor:
    """Camera-to-world (B, 4, 4) -> (B, 16) flattened, the critic's camera input."""
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"camera must be (B, 4, 4) camera-to-world, got {tuple(c2w.shape)}")
    return c2w.reshape(c2w.shape[0], 16)


def _time_embedding(net: nn.Module) -> nn.Module | None:
    """The diffusers ``time_embedding`` module of ``net``, if any."""
    for name, m in net.named_modules():
        if name.split(".")[-1] == "time_embedding":
            return m
    return None


class CameraCritic(Denoiser):
    """eps_phi(x_t; y, t, c): a LoRA copy of the prior plus a camera embedding.

    Its condition is a dict ``{"cond": prior condition, "camera": (B, 16)}``; the null
    condition replaces the prior condition by the prior's null and the camera by zeros.
    """

    def __init__(self, prior: Denoiser, shape: tuple[int, ...], config: VSDConfig):
        super().__init__(prior.path, prior.prediction)
        plain = _time_embedding(prior)  # read its width before peft wraps its layers
        if plain is not None:
            out = [m for m in plain.modules() if isinstance(m, nn.Linear)][-1].out_features
        else:
            out = int(torch.tensor(shape).prod())
        self.net = lora_critic(prior, config.lora_rank, config.lora_alpha, config.lora_targets)
        hook_target = _time_embedding(self.net)
        self.mode = "time_embedding" if hook_target is not None else "input"
        self.shape = tuple(shape)
        self.camera_mlp = nn.Sequential(
            nn.Linear(16, config.camera_hidden), nn.SiLU(), nn.Linear(config.camera_hidden, out)
        )
        nn.init.zeros_(self.camera_mlp[-1].weight)  # starts as the prior
        nn.init.zeros_(self.camera_mlp[-1].bias)
        self._embedding: Tensor | None = None
        if hook_target is not None:
            hook_target.register_forward_hook(self._add_camera)

    def _add_camera(self, module, inputs, out):
        return out if self._embedding is None else out + self._embedding.to(out)

    def forward(self, x_t, t, cond=None):
        if not isinstance(cond, dict) or "camera" not in cond:
            raise ValueError("CameraCritic needs cond = {'cond': ..., 'camera': (B, 16)}")
        t = _batch_t(t, x_t)
        emb = self.camera_mlp(cond["camera"].to(x_t))
        if self.mode == "input":
            return self.net(x_t + emb.reshape(x_t.shape), t, cond["cond"])
        self._embedding = emb
        try:
            return self.net(x_t, t, cond["cond"])
        finally:
            self._embedding = None


class VSD(ScoreMethod):
    name = "vsd"
    config_cls = VSDConfig
    roles = ("scene", "critic")

    def __init__(self, adapter: PriorAdapter, config: VSDConfig | None = None, seed: int = 0):
        super().__init__(adapter, config, seed)
        if self.config.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.config.lora_rank}")
        with torch.random.fork_rng(devices=[]):  # LoRA A and the camera MLP: seeded init
            torch.manual_seed(seed)
            self.critic = CameraCritic(adapter.denoiser, adapter.sample_shape, self.config)

    def role_parameters(self):
        return {"critic": [p for p in self.critic.parameters() if p.requires_grad]}

    def critic_null(self, cond: dict) -> dict:
        return {"cond": self.adapter.null_cond(cond["cond"]), "camera": cond["camera"] * 0}

    def critic_cond(self, cond: Any, camera: Tensor | None, n: int, like: Tensor) -> dict:
        cam = torch.zeros(n, 16) if camera is None else camera_features(camera)
        return {"cond": cond, "camera": cam.to(like)}

    def critic_eps(self, x_t: Tensor, t: Tensor, ccond: dict) -> Tensor:
        """eps_phi at (x_t, t) with the critic's own CFG over the zero camera."""
        s = self.config.critic_guidance_scale
        if s == 1.0:
            return self.critic.predict(x_t, t, ccond, kind="eps")
        from fewstep.core.objectives.classifier_free import guided_predict

        return guided_predict(self.critic, x_t, t, ccond, s, self.critic_null, kind="eps")

    def loss(self, x, cond, step, total_steps, camera=None, generator=None):
        """Draws, in order: t fractions (B,), eps like x, camera-dropout uniforms (B,), then
        the critic's denoising loss draws (t from the path's training density, eps)."""
        cfg, path = self.config, self.adapter.path
        n = x.shape[0]
        frac, t = self.times(n, step, total_steps, generator, x.device)
        eps = randn(x.shape, generator, x)
        ccond = self.critic_cond(cond, camera, n, x)
        with torch.no_grad():
            x_t = path.noise(x.detach(), t, eps)
            eps_prior = self.adapter.predict(x_t, t, cond, "eps", cfg.guidance_scale)
            eps_critic = self.critic_eps(x_t, t, ccond)
            a, s = self.adapter.coeffs(t, x)
            grad = vsd_gradient(eps_prior, eps_critic, weight(cfg.weighting, a, s))
        logs = grad_logs(grad, frac)

        keep = (torch.rand(n, generator=generator) >= cfg.camera_dropout).to(x)
        train_cond = {"cond": cond, "camera": ccond["camera"] * keep[:, None]}
        rng = StepRNG(0, 0, 0, n, 0, n, x.device)
        rng.generator = generator if generator is not None else torch.Generator()
        critic_loss = denoising_loss(self.critic, x.detach(), train_cond, Batch(x, cond, rng))
        logs["critic_loss"] = critic_loss.item()
        return {"scene": reparam_loss(x, grad), "critic": critic_loss}, logs
