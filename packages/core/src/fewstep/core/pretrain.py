"""Training a teacher from data with the standard denoising loss (for the small teachers
that demos, tests and benchmarks train themselves)."""

from __future__ import annotations

import copy

import torch

from fewstep.core.batch import Batch, StepRNG, cond_to
from fewstep.core.models import Denoiser, ema_update_
from fewstep.core.objectives.classifier_free import drop_cond
from fewstep.core.objectives.common import denoising_loss


def train_denoiser(
    model: Denoiser,
    data,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    cond_dropout: float = 0.0,
    null_cond=None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Denoiser, list[float]]:
    """Train ``model`` on ``data`` (a trainer DataSource) with ``denoising_loss``; return
    (EMA copy in eval mode, loss per step). With ``cond_dropout`` > 0, that fraction of
    conditions is replaced by ``null_cond(cond)`` so the model also learns the
    unconditional score that classifier-free guidance needs."""
    device = torch.device(device)
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train teacher", dynamic_ncols=True)
    for step in it:
        rng = StepRNG(seed, step, 0, batch_size, 0, batch_size, device)
        x, cond = data(rng)
        x = x.to(device)
        if cond is not None:
            cond = cond_to(cond, device)
            cond = drop_cond(cond, null_cond, cond_dropout, Batch(x, cond, rng))
        loss = denoising_loss(model, x, cond, Batch(x, cond, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update_(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if progress and step % 50 == 0:
            it.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval(), losses
