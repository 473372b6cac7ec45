"""Process-group plumbing, so the same trainer runs alone, under ``torchrun`` and under
``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).

Gradients are averaged by hand after each role's backward rather than through a DDP
wrapper: objectives call the same module several times per step and update roles on
different schedules, which DDP's reducer does not allow, and an all-reduce per role is
exactly equivalent for data-parallel training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Initialise the default process group if launched with WORLD_SIZE > 1 (nccl on CUDA,
    gloo otherwise) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # set_device refuses a bare "cuda" (torch >= 2.10)
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def broadcast_module_(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def average_gradients_(params: list[nn.Parameter], info: DistInfo) -> None:
    """Mean of gradients over ranks, in one flat all-reduce. A gradient missing on a rank
    counts as zeros there, so every rank issues the same collective; a parameter no rank
    has a gradient for (an expert of a phase not trained this step) keeps ``grad = None``,
    so the optimiser skips it exactly as in a single process."""
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has.to(grads[0].dtype)])
    dist.all_reduce(flat)
    present = flat[-len(params) :] > 0
    flat /= info.world_size
    offset = 0
    for p, g, ok in zip(params, grads, present.tolist(), strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if ok else None
        offset += n


def any_true(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is set on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
