"""The digits teacher: trained by fewstep on first use and cached by its config."""

from __future__ import annotations

import dataclasses
import time

import torch

from fewstep.core.models import Denoiser, DiffusersUNetDenoiser, GuidedDenoiser
from fewstep.core.paths import make_path
from fewstep.image.digits import load_digits_tensors, null_labels
from fewstep.image.unet import digits_unet


def build_teacher(cfg) -> DiffusersUNetDenoiser:
    """An untrained teacher for a ``TeacherConfig`` (deterministic init from its seed)."""
    torch.manual_seed(cfg.seed)
    return DiffusersUNetDenoiser(digits_unet(cfg.unet), make_path(cfg.path), cfg.prediction)


def load_teacher(cfg, progress: bool = True) -> tuple[DiffusersUNetDenoiser, dict]:
    """(frozen teacher, info with train_seconds); trains and caches on first use."""
    from fewstep.core.cache import cached_module
    from fewstep.core.pretrain import train_denoiser
    from fewstep.core.training import TensorData

    spec = {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("sampler", "sample_steps")
    }
    spec["model"] = "digits-unet-v1"

    def train(model: DiffusersUNetDenoiser) -> dict:
        x, y = load_digits_tensors()
        t0 = time.perf_counter()
        ema, losses = train_denoiser(
            model,
            TensorData(x, y),
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            ema_decay=0.999,
            cond_dropout=cfg.cond_dropout,
            null_cond=null_labels,
            progress=progress,
        )
        model.load_state_dict(ema.state_dict())
        return {"train_seconds": time.perf_counter() - t0, "final_loss": sum(losses[-50:]) / 50}

    teacher, info, _ = cached_module("digits-teacher", spec, build_teacher(cfg), train)
    return teacher.eval().requires_grad_(False), info


def guided(teacher: Denoiser, scale: float) -> Denoiser:
    """The teacher under classifier-free guidance with the null class. At scale 1 the
    wrapper costs one evaluation and returns the teacher's own prediction; it still tells
    objectives that guide themselves (guidance distillation, SiD-LSG) the null condition."""
    return GuidedDenoiser(teacher, scale, null_labels)


def teacher_sampler(cfg):
    from fewstep.core.samplers import make_sampler

    return make_sampler(cfg.sampler, steps=cfg.sample_steps)
