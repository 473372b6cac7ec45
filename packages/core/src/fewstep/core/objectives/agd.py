"""Adapter guidance distillation (AGD).

Jensen & Sadat, "Efficient Distillation of Classifier-Free Guidance using Adapters" (TMLR 2025,
arXiv 2503.07274); reference code cristianpjensen/agd.

Like guidance distillation (Meng et al. 2023, see ``guidance_distill``), a one-pass model with
the guidance scale w as input is trained to match the CFG teacher
    f_w(x, c) = f(x, null) + w (f(x, c) - f(x, null)),
with two differences that are AGD's contributions:

1. The base network stays frozen; only small residual adapters are trained (the paper reports
   about 2 % extra parameters). Each adapted ``nn.Linear`` y = W x + b becomes
       y + U silu(D x + P e(w, t)),
   a rank-r bottleneck on the layer's input plus a projection of a shared embedding e of the
   guidance scale and the time (Fourier features -> MLP, as the paper's guidance-scale encoder
   with ``use_timestep``). U starts at zero, so the adapted model starts as the base model.
   We use these rather than peft LoRA because AGD's adapters are *conditioned on w* (one
   adapter set serves every scale) and LoRA has no extra input; and core depends on torch only.
   Adapters go on every ``nn.Linear`` whose name matches ``adapter_targets`` (regular
   expressions; default: every Linear with at least ``min_width`` inputs and outputs, i.e. the
   hidden layers, attention projections and time-embedding MLP, not the 2-D in/out layers).
2. Training inputs lie on CFG-GUIDED trajectories (sec. 3.2): x_t is taken from the guided
   teacher's own sampling trajectory (Euler/DDIM on the grid the student is sampled with, from
   noise, w ~ U[w_min, w_max] per trajectory), not from noised data, so the student is trained
   where it is used. The target is the guided teacher's output at that point, computed while
   rolling out; the loss is the squared error in the teacher's parameterization (AGD's "l2").
   The paper stores trajectories offline; here each step rolls a fresh batch of trajectories to
   the deepest grid index drawn (no gradient) and trains on one random grid point per
   trajectory, so it needs no data set at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.objectives.common import sample_shape, unguided
from fewstep.core.objectives.guidance_distill import (
    GuidanceDistillation,
    GuidanceDistillConfig,
    draw_scales,
    guided_prediction,
)
from fewstep.core.objectives.guidance_embed import (
    fourier_features,
    pack_guidance,
    scale_frequencies,
    split_guidance,
)


@dataclass
class AGDConfig(GuidanceDistillConfig):
    adapter_rank: int = 4  # r: bottleneck width of each adapter
    adapter_targets: tuple[str, ...] = ()  # regexes on Linear names to adapt (() = auto)
    min_width: int = 16  # auto targets: Linears with in and out features >= this
    cond_dim: int = 32  # width of the shared (w, t) embedding
    cond_features: int = 8  # Fourier frequencies per scalar (w and t) in that embedding


class LinearAdapter(nn.Module):
    """Residual adapter on one Linear: out + U silu(D x + P e). U is zero at initialisation."""

    def __init__(self, in_features: int, out_features: int, rank: int, cond_dim: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank)
        self.cond = nn.Linear(cond_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, out: Tensor, e: Tensor) -> Tensor:
        """x: (B, ..., in), out: (B, ..., out), e: (B, cond_dim)."""
        c = self.cond(e).reshape(e.shape[0], *([1] * (x.ndim - 2)), -1)
        return out + self.up(F.silu(self.down(x) + c.to(x.dtype)))


def adapter_targets(net: nn.Module, patterns: tuple[str, ...], min_width: int) -> list[str]:
    """Names of the Linear layers of ``net`` to adapt."""
    names = []
    for name, m in net.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if patterns:
            if any(re.search(p, name) for p in patterns):
                names.append(name)
        elif m.in_features >= min_width and m.out_features >= min_width:
            names.append(name)
    if not names:
        raise ValueError(
            f"no nn.Linear of {type(net).__name__} matches adapter_targets={patterns!r} "
            f"(min_width={min_width}); Linear layers: "
            f"{[n for n, m in net.named_modules() if isinstance(m, nn.Linear)]}"
        )
    return names


class AdaptedDenoiser(Denoiser):
    """A frozen ``base`` denoiser with guidance-conditioned residual adapters on the Linear
    layers named ``targets``. Conditions are packed ``{"cond": c, "guidance": w}`` (or plain,
    using ``default_scale``)."""

    def __init__(
        self,
        base: Denoiser,
        targets: list[str],
        rank: int = 4,
        cond_dim: int = 32,
        features: int = 8,
        default_scale: float = 1.0,
    ):
        super().__init__(base.path, base.prediction)
        self.base = base.requires_grad_(False)
        self.targets = list(targets)
        self.default_scale = default_scale
        self.register_buffer("freqs", scale_frequencies(features), persistent=False)
        self.encoder = nn.Sequential(nn.Linear(4 * features, cond_dim), nn.SiLU())
        adapters = {}
        for name in self.targets:
            lin = base.get_submodule(name)
            adapters[name.replace(".", "__")] = LinearAdapter(
                lin.in_features, lin.out_features, rank, cond_dim
            )
        self.adapters = nn.ModuleDict(adapters)
        p = next(base.parameters(), None)
        if p is not None:
            self.encoder.to(p.device)
            self.adapters.to(p.device)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the frozen base never switches to training behaviour
        return self

    def adapter_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def added_fraction(self) -> float:
        """Adapter parameters as a fraction of the base network's."""
        return self.adapter_parameters() / max(1, sum(p.numel() for p in self.base.parameters()))

    def embed(self, w: Tensor, t: Tensor) -> Tensor:
        path = self.path
        frac = (t.float() - path.t_min) / (path.t_max - path.t_min)
        feats = torch.cat(
            [fourier_features(w, self.freqs), fourier_features(frac * 10.0, self.freqs)], dim=1
        )
        return self.encoder(feats.to(self.encoder[0].weight.dtype))

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        inner, w = split_guidance(cond, x_t, self.default_scale)
        e = self.embed(w, t)
        handles = []
        for name in self.targets:
            adapter = self.adapters[name.replace(".", "__")]

            def hook(_m, inputs, out, adapter=adapter):
                return adapter(inputs[0], out, e)

            handles.append(self.base.get_submodule(name).register_forward_hook(hook))
        try:
            return self.base(x_t, t, inner)
        finally:
            for h in handles:
                h.remove()


class AGD(GuidanceDistillation):
    name = "agd"
    config_cls = AGDConfig
    roles = ("student",)
    needs_data = False
    summary = "CFG distilled into w-conditioned adapters on a frozen base, on guided trajectories"

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        cfg = self.config
        if cfg.adapter_rank < 1:
            raise ValueError(f"agd: adapter_rank must be >= 1, got {cfg.adapter_rank}")
        net = unguided(student)
        targets = adapter_targets(net, tuple(cfg.adapter_targets), cfg.min_width)
        adapted = AdaptedDenoiser(
            net,
            targets,
            cfg.adapter_rank,
            cfg.cond_dim,
            cfg.cond_features,
            default_scale=cfg.sample_scale,
        )
        return {"student": adapted}

    def trajectory_points(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Points on guided teacher trajectories: (x_t, t, w, guided target), one random grid
        index per trajectory. The guided Euler/DDIM rollout runs without gradient."""
        cfg, path = self.config, self.path
        grid = self.student_sampler().grid(path)  # native times, then None (clean data)
        n = len(grid) - 1
        noise = batch.rng.randn(*sample_shape(batch))
        w = draw_scales(batch, cfg.scale_range).to(noise.device)
        idx = batch.rng.randint(0, n).to(noise.device)
        x = path.prior(noise)
        x_pick, target, t_pick = torch.zeros_like(x), torch.zeros_like(x), torch.zeros(len(x))
        t_pick = t_pick.to(noise.device)
        with torch.no_grad():
            for i in range(int(idx.max()) + 1):
                t = _batch_t(grid[i], x)
                pred = guided_prediction(self.base, self.null_cond, x, t, batch.cond, w)
                here = (idx == i).reshape(-1, *([1] * (x.ndim - 1)))
                x_pick = torch.where(here, x, x_pick)
                target = torch.where(here, pred, target)
                t_pick = torch.where(idx == i, t, t_pick)
                x0, eps = path.to_x0_eps(pred, self.base.prediction, x, t)
                nxt = grid[i + 1]
                x = x0 if nxt is None else path.noise(x0, _batch_t(nxt, x), eps)
        return x_pick, t_pick, w, target

    def losses(self, roles, batch, update, step):
        if batch.cond is None:
            raise ValueError("agd needs conditions (batch.cond) to guide")
        student = roles["student"]
        x_t, t, w, target = self.trajectory_points(batch)
        pred = student.predict(x_t, t, pack_guidance(batch.cond, w), kind=self.base.prediction)
        loss = F.mse_loss(pred.float(), target.float())
        return {"student": loss}, {
            "agd_loss": loss.item(),
            "adapter_param_fraction": student.added_fraction(),
        }
