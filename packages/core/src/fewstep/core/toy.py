"""The shared 2-D suite: toy data, a toy denoiser network and cached toy teachers.

Tests and benchmarks distil these teachers; they train in a few seconds on two CPU cores
and are cached under ``$FEWSTEP_CACHE/toy`` (default ``~/.cache/fewstep/toy``) as
safetensors, so repeated runs only pay for loading.

Data recipes
------------
* ``gaussian_mixture``: ``modes`` isotropic Gaussians (std ``std``) with centres evenly spaced
  on a circle of radius ``radius`` (the 2-D "ring of Gaussians" of Metz et al. 2017).
* ``checkerboard``: uniform on the 8 filled unit cells of a 4x4 checkerboard on [-2, 2]^2
  (the usual FFJORD toy set; a cell (i, j) is filled when i + j is even).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from fewstep.core.batch import StepRNG
from fewstep.core.io import atomic_write_bytes
from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path

__all__ = [
    "DATASETS",
    "ToyData",
    "ToyMLP",
    "ToyTeacherSpec",
    "checkerboard",
    "gaussian_mixture",
    "make_toy_teacher",
    "mixture_centers",
    "toy_cache_dir",
]

CACHE_VERSION = 1  # bump when the network or the training recipe changes

log = logging.getLogger("fewstep")


# --------------------------------------------------------------------------------- data


def mixture_centers(modes: int = 8, radius: float = 2.0) -> Tensor:
    """(modes, 2) centres evenly spaced on a circle, the first at angle 0."""
    ang = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return (radius * torch.stack([ang.cos(), ang.sin()], dim=1)).float()


def _mixture(idx: Tensor, noise: Tensor, modes: int, radius: float, std: float) -> Tensor:
    """Mode indices (n,) and standard normals (n, 2) -> mixture samples (n, 2)."""
    return mixture_centers(modes, radius).to(noise)[idx.to(noise.device)] + std * noise


def _checkerboard(col: Tensor, row: Tensor, u: Tensor) -> Tensor:
    """Column in 0..3, row pair in 0..1 (n,) and uniforms (n, 2) -> checkerboard (n, 2).

    Filled cells are (col, 2 * row + col % 2) of the 4x4 grid of unit cells on [-2, 2]^2."""
    col = col.to(u)
    cell_y = 2 * row.to(u) + torch.remainder(col, 2)
    return torch.stack([col + u[:, 0], cell_y + u[:, 1]], dim=1) - 2.0


def gaussian_mixture(
    n: int,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(n, 2) samples from ``modes`` Gaussians of std ``std`` on a circle of ``radius``."""
    idx = torch.randint(0, modes, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator)
    return _mixture(idx, noise, modes, radius, std)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, 2) samples uniform on the 8 filled cells of a 4x4 checkerboard on [-2, 2]^2."""
    col = torch.randint(0, 4, (n,), generator=generator)
    row = torch.randint(0, 2, (n,), generator=generator)
    u = torch.rand(n, 2, generator=generator)
    return _checkerboard(col, row, u)


DATASETS = ("mixture", "checkerboard")


@dataclass
class ToyData:
    """A trainer ``DataSource`` drawing fresh toy samples from the step's ``StepRNG`` (so a
    run is reproducible and k processes with batch B see the samples of one with k*B)."""

    name: str = "mixture"  # "mixture" or "checkerboard"
    modes: int = 8  # mixture: number of modes
    radius: float = 2.0  # mixture: circle radius
    std: float = 0.1  # mixture: std of each mode
    conditional: bool = False  # return the mode (mixture) / filled cell (checkerboard) index

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"unknown toy data {self.name!r}; expected one of {DATASETS}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def num_classes(self) -> int:
        """Labels of the conditional variant: 0..num_classes-1 (8 for both sets)."""
        return self.modes if self.name == "mixture" else 8

    def __call__(self, rng: StepRNG) -> tuple[Tensor, Tensor | None]:
        if self.name == "mixture":
            label = rng.randint(0, self.modes).cpu()
            x = _mixture(label, rng.randn(2).cpu(), self.modes, self.radius, self.std)
        else:
            col, row = rng.randint(0, 4).cpu(), rng.randint(0, 2).cpu()
            x = _checkerboard(col, row, rng.rand(2).cpu())
            label = 2 * col + row
        return x, (label if self.conditional else None)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, 2) samples with a plain generator (for references in evaluation)."""
        if self.name == "mixture":
            return gaussian_mixture(n, self.modes, self.radius, self.std, generator)
        return checkerboard(n, generator)


# ------------------------------------------------------------------------------ network


def sinusoidal_frequencies(dim: int, max_freq: float = 100.0) -> Tensor:
    """(dim // 2,) angular frequencies 2 pi f, f geometrically spaced in [1/(2 pi), max_freq]."""
    return torch.exp(torch.linspace(0.0, math.log(2 * math.pi * max_freq), dim // 2))


def sinusoidal_embedding(tau: Tensor, freqs: Tensor) -> Tensor:
    """(B,) scalars and (F,) angular frequencies -> (B, 2F) features [sin(w tau), cos(w tau)]
    (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, appendix B)."""
    arg = tau.float()[:, None] * freqs.to(tau.device)[None, :]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class ToyMLP(nn.Module):
    """``net(x, network_time, cond) -> prediction`` for 2-D toys.

    ``network_time`` is multiplied by ``time_scale`` before the sinusoidal features: the
    default 1/1000 maps the ~0..1000 of rectified flow and diffusers' discrete VP to ~0..1;
    use ``time_scale=1`` for paths whose network time is already O(1) (EDM's log-sigma / 4).
    With ``num_classes`` > 0, ``cond`` is an integer label in [0, num_classes]; label
    ``num_classes`` (``null_class``) is the unconditional input for classifier-free guidance.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        time_dim: int = 32,
        num_classes: int = 0,
        time_scale: float = 1e-3,
        depth: int = 3,
    ):
        super().__init__()
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim must be a positive even number, got {time_dim}")
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.time_scale = time_scale
        self.register_buffer("freqs", sinusoidal_frequencies(time_dim), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU())
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def embed(self, time: Tensor, cond: Tensor | None, batch: int) -> Tensor:
        time = torch.as_tensor(time, dtype=torch.float32, device=self.inp.weight.device)
        if time.ndim == 0:
            time = time.expand(batch)
        emb = self.time_mlp(sinusoidal_embedding(time * self.time_scale, self.freqs))
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((batch,), self.null_class, device=emb.device)
            emb = emb + self.class_emb(cond.long())
        return emb

    def features(self, x: Tensor, time: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, hidden) last hidden layer (for GAN heads on the fake score)."""
        emb = self.embed(time, cond, x.shape[0])
        h = self.act(self.inp(x) + emb)
        for block in self.blocks:
            h = self.act(block(h) + emb)
        return h

    def forward(self, x: Tensor, time: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.out(self.features(x, time, cond))


def toy_feature_fn(net: ToyMLP, x: Tensor, time: Tensor, cond=None) -> Tensor:
    """``ModuleDenoiser(feature_fn=...)`` hook exposing ``ToyMLP.features``."""
    return net.features(x, time, cond)


# ------------------------------------------------------------------------------ teacher


@dataclass(frozen=True)
class ToyTeacherSpec:
    """Everything that determines a toy teacher's weights (the cache key)."""

    path_name: str = "rectified_flow"  # fewstep.core.paths registry name
    prediction: str = "velocity"  # parameterization the network predicts
    data: str = "mixture"  # "mixture" or "checkerboard"
    steps: int = 3000  # training steps
    seed: int = 0  # training seed
    hidden: int = 128  # ToyMLP width
    time_dim: int = 32  # ToyMLP sinusoidal features
    batch_size: int = 256  # training batch
    lr: float = 2e-3  # AdamW learning rate
    path_kwargs: tuple[tuple[str, Any], ...] = ()  # extra make_path arguments, sorted by name
    num_classes: int = 0  # > 0: class-conditional on ToyData(conditional=True) labels
    cond_dropout: float = 0.1  # conditional only: fraction of null labels (for CFG)

    def key(self) -> str:
        fields = asdict(self)
        if not self.num_classes:  # unconditional teachers keep their pre-conditional keys
            del fields["num_classes"], fields["cond_dropout"]
        blob = json.dumps({**fields, "version": CACHE_VERSION}, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        kind = f"{self.data}_cond" if self.num_classes else self.data
        return f"{kind}_{self.path_name}_{self.prediction}_{self.steps}_{digest}"


def toy_cache_dir() -> Path:
    """``$FEWSTEP_CACHE/toy`` if set, else ``~/.cache/fewstep/toy``."""
    from fewstep.core.cache import cache_root

    return cache_root() / "toy"


def _build(spec: ToyTeacherSpec) -> ModuleDenoiser:
    net = ToyMLP(dim=2, hidden=spec.hidden, time_dim=spec.time_dim, num_classes=spec.num_classes)
    path = make_path(spec.path_name, **dict(spec.path_kwargs))
    return ModuleDenoiser(net, path, spec.prediction, feature_fn=toy_feature_fn)


def make_toy_teacher(
    path_name: str = "rectified_flow",
    prediction: str = "velocity",
    data: str = "mixture",
    steps: int = 3000,
    seed: int = 0,
    cache: bool = True,
    hidden: int = 128,
    batch_size: int = 256,
    lr: float = 2e-3,
    path_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
    conditional: bool = False,
) -> ModuleDenoiser:
    """A frozen toy teacher (``ModuleDenoiser`` over ``ToyMLP``, eval mode, no gradients)
    trained with ``fewstep.core.pretrain.train_denoiser`` on ``data``, or loaded from the
    cache when the same spec was trained before.

    ``path_kwargs`` go to ``make_path`` (e.g. ``schedule="scaled_linear"`` for a discrete
    VP path with Stable Diffusion's betas). ``conditional`` trains on the mode / cell labels
    of ``ToyData(data, conditional=True)`` with 10 % null labels (``net.null_class``), so the
    teacher can be guided (``GuidedDenoiser(teacher, scale, null_cond=...)``)."""
    spec = ToyTeacherSpec(
        path_name,
        prediction,
        data,
        steps,
        seed,
        hidden,
        32,
        batch_size,
        lr,
        tuple(sorted((path_kwargs or {}).items())),
        ToyData(data).num_classes if conditional else 0,  # also validates the name
    )
    file = toy_cache_dir() / f"{spec.key()}.safetensors"
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stream is untouched
        torch.manual_seed(seed)
        teacher = _build(spec)
        if cache and file.exists():
            try:
                teacher.load_state_dict(load(file.read_bytes()), strict=True)
                return teacher.requires_grad_(False).eval()
            except Exception as err:  # a damaged or stale file: retrain and overwrite it
                log.warning("retraining toy teacher: cannot load %s (%s)", file, err)

        from fewstep.core.pretrain import train_denoiser

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: threading costs more than it saves
        try:
            ema, _ = train_denoiser(
                teacher,
                ToyData(data, conditional=conditional),
                cond_dropout=spec.cond_dropout if conditional else 0.0,
                null_cond=lambda c: torch.full_like(c, spec.num_classes),
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                progress=progress,
            )
        finally:
            torch.set_num_threads(threads)
    if cache:
        state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        meta = {"spec": json.dumps(asdict(spec)), "version": str(CACHE_VERSION)}
        atomic_write_bytes(file, save(state, metadata=meta))
    return ema.requires_grad_(False).eval()
