"""The diffusion-policy teacher: a ConditionalUnet1D on diffusion_policy's discrete DDPM
(100 steps, squaredcos_cap_v2), trained by fewstep on ReachAround expert demonstrations and
cached by its config.

It predicts v (Salimans and Ho 2022) where diffusion_policy predicts eps: that table ends at
alpha = 5e-4, where x0 = (x - sigma eps) / alpha amplifies every eps error 2000-fold. The
100-step teacher hides this behind its x0 clip; a one-step student, which must predict x0 at
that very step, cannot (a consistency student from an eps teacher never left the start)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.core.training import TensorData
from fewstep.policy.data import Episode, Normalizer, PolicyWindows, WindowConfig
from fewstep.policy.nets import ConditionalUnet1D, UnetConfig

OBS_DIM, ACT_DIM = 4, 2  # ReachAround: agent xy + target xy; commanded xy


@dataclass
class HorizonConfig:
    obs: int = 2  # observations the policy conditions on (To)
    pred: int = 16  # actions predicted per plan (Tp)
    action: int = 3  # actions executed per plan (Ta); SDP gets (Tp - To + 1) // Ta chunks

    def windows(self) -> WindowConfig:
        return WindowConfig(
            obs_horizon=self.obs, pred_horizon=self.pred, action_horizon=self.action
        )


@dataclass
class TeacherConfig:
    demos: int = 200  # scripted-expert demonstrations it learns from
    demo_seed: int = 0  # env seeds demo_seed .. demo_seed + demos - 1
    unet: UnetConfig = field(default_factory=UnetConfig)  # network
    steps: int = 6000  # training steps (~6 min on one idle CPU core)
    batch_size: int = 64  # training batch
    lr: float = 1e-3  # AdamW learning rate
    seed: int = 0  # training seed
    train_timesteps: int = 100  # DDPM table length (diffusion_policy: 100)
    prediction: str = "v"  # what the network predicts: v, eps (diffusion_policy) or x0
    sample_steps: int = 100  # DDPM steps per plan at rollout time


def demos(cfg: TeacherConfig) -> list[Episode]:
    from fewstep.policy.expert import collect_demos

    return collect_demos(cfg.demos, seed=cfg.demo_seed)


def windows_data(episodes: list[Episode], horizons: HorizonConfig) -> tuple[TensorData, Normalizer]:
    """Every training window as tensors: x = actions (N, Tp, A), cond = obs (N, To * obs_dim),
    both normalised to [-1, 1]; and the normalizer fitted on the episodes."""
    ds = PolicyWindows(episodes, horizons.windows())
    items = [ds[i] for i in range(len(ds))]
    act = torch.stack([it["action"] for it in items])
    obs = torch.stack([it["obs"] for it in items]).flatten(1)
    return TensorData(act, obs), ds.normalizer


def build_denoiser(cfg: TeacherConfig, horizons: HorizonConfig) -> ModuleDenoiser:
    torch.manual_seed(cfg.seed)
    net = ConditionalUnet1D(ACT_DIM, horizons.pred, horizons.obs * OBS_DIM, cfg.unet)
    path = make_path(
        "vp_discrete", schedule="squaredcos_cap_v2", num_train_timesteps=cfg.train_timesteps
    )
    return ModuleDenoiser(net, path, cfg.prediction)


def load_teacher(
    cfg: TeacherConfig, horizons: HorizonConfig, progress: bool = True
) -> tuple[ModuleDenoiser, Normalizer, list[Episode], dict]:
    """(frozen teacher, normalizer, demonstrations, info); trains and caches on first use."""
    from fewstep.core.cache import cached_module
    from fewstep.core.pretrain import train_denoiser

    episodes = demos(cfg)
    data, normalizer = windows_data(episodes, horizons)
    spec = {**dataclasses.asdict(cfg), "horizons": dataclasses.asdict(horizons)}
    spec.pop("sample_steps")
    spec["model"] = "policy-unet1d-v2"

    def train(model: ModuleDenoiser) -> dict:
        t0 = time.perf_counter()
        ema, losses = train_denoiser(
            model, data, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            progress=progress,
        )  # fmt: skip
        model.load_state_dict(ema.state_dict())
        tail = losses[-50:]
        return {"train_seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail)}

    teacher, info, _ = cached_module("policy-teacher", spec, build_denoiser(cfg, horizons), train)
    return teacher.eval().requires_grad_(False), normalizer, episodes, info
