"""AccVideo: few-step video distillation on a synthetic dataset of teacher trajectories.

Zhang, Chen, Wang, Liu, Wang and Qiao, "AccVideo: Accelerating Video Diffusion Model with
Synthetic Dataset" (arXiv 2503.19462, 2025; public code aejion/AccVideo holds inference
only, so the training pieces follow the paper's sec. 4 and alg. 1). Equation numbers are the
paper's.

1. SynVid (sec. 4.1): the teacher, run with its full solver (N Euler steps of the flow ODE,
   eq. 5: x_{t_{j+1}} = x_{t_j} + (t_{j+1} - t_j) v(x_{t_j}, t_j, c), under CFG as the
   teacher is used), generates denoising trajectories {x_{t_0} = noise, ..., x_{t_N} =
   video}; every point is stored (``synthesize_trajectories``; cached as safetensors by
   ``load_synvid``). Only these points are ever used: no forward noising of data, so no
   "useless data point" off the teacher's trajectories (sec. 3.2).
2. Trajectory-based few-step guidance (sec. 4.2, eq. 6): m + 1 key points t_{k_0} = 1 >
   ... > t_{k_m} = 0 (``key_indices``; the paper: m = 5, keys every N / m teacher steps:
   its fig. 5 times 0.965, 0.913, 0.824, 0.636 are HunyuanVideo's shifted 5-step grid,
   i.e. every 10th of its 50 steps), and one student Euler step from a key point must land
   on the next one:
       L_traj = E_{i,k} || v_b(x_{t_{k_i}}, t_{k_i}) - (x_{t_{k_{i+1}}} - x_{t_{k_i}}) /
                                                       (t_{k_{i+1}} - t_{k_i}) ||^2  (eq. 6)
   (``guide_form="velocity"``), or in points, || x_{t_{k_i}} + (t_{k_{i+1}} - t_{k_i}) v_b
   - x_{t_{k_{i+1}}} ||^2 (``"point"``: eq. 6 times (t_{k_{i+1}} - t_{k_i})^2).
3. Adversarial training on SynVid (sec. 4.3, eqs. 7-8): the discriminator tells the
   stored points at a key time t_{k_{i+1}} (real: SynVid's marginal there) from the
   student's points at the same time (fake: the student's one step into t_{k_{i+1}} from its
   own state at t_{k_i}, reached by its own Euler chain from fresh noise, which is what alg.
   1's queues hold), D(x, t) = H_k(features of the frozen teacher at (x, t)) (eq. 8): the
   last block's tokens for noisy key times, a block two thirds deep for the clean one (the
   paper: layer 60 resp. 40 of 60), and one small 2-D CNN projection head per key time.
   The GAN is eq. 7's, in its non-saturating form (Goodfellow et al. 2014; the paper cites
   the standard GAN): D minimises softplus(-D(real)) + softplus(D(fake)), the student adds
   lambda_adv softplus(-D(fake)); the heads are updated with lambda_adv times their loss,
   as alg. 1 line 26 (lambda_adv = 0.1, sec. 5).

The student is sampled with m Euler steps on the key times (``student_sampler``), one
network call per step (the CFG of the trajectories is baked in).

Differences from the paper: a fake point is made fresh each step by running the student from
new noise (no gradient) to t_{k_i} instead of being popped from alg. 1's queues (queues hold
points of older student weights, and would make the objective stateful; an ablation
``fake_from="synthetic"`` starts from the stored key point instead); one key interval is
drawn per step for the whole batch (alg. 1 sweeps all m per iteration); the features are
token maps of a small pixel-space DiT, not of a latent video DiT.

Shapes: a clip is (T, C, H, W); a batch of key points x is (B, m + 1, T, C, H, W).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser, GuidedDenoiser, _batch_t, _output_of
from fewstep.core.objectives.base import Objective
from fewstep.core.objectives.common import (
    check_choice,
    gan_discriminator_loss,
    gan_generator_loss,
    ode_step,
    unguided,
)
from fewstep.core.objectives.dmd2 import GANHead
from fewstep.core.samplers import EulerSampler

SYNVID_FORMAT = 1  # bump when the stored layout changes (part of the cache key)

# ------------------------------------------------------------------------------- SynVid


def teacher_grid(path, steps: int) -> Tensor:
    """(N + 1,) the times of the teacher's N-step Euler solver (core ``EulerSampler``'s grid),
    from t_max (noise) down to t_min (data)."""
    if steps < 1:
        raise ValueError(f"the teacher needs steps >= 1, got {steps}")
    grid = EulerSampler(steps).grid(path)
    return torch.stack([*grid[:-1], torch.tensor(float(path.t_min))]).float()


def _sample_shape(teacher: Denoiser) -> tuple[int, ...]:
    cfg = getattr(getattr(unguided(teacher), "net", None), "cfg", None)
    if cfg is None:
        raise ValueError("pass shape=(T, C, H, W): the teacher is not a VideoDiT denoiser")
    return (cfg.frames, cfg.channels, cfg.size, cfg.size)


@torch.no_grad()
def synthesize_trajectories(
    teacher: Denoiser,
    n: int,
    labels: Tensor | None = None,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    batch: int = 64,
    shape: tuple[int, ...] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """SynVid (sec. 4.1): ``n`` denoising trajectories of the teacher's ``steps``-step Euler
    solver (eq. 5), classifier-free guided with scale ``guidance`` (1 = none).

    Noise (and labels, when None: uniform digits) are drawn up front from ``seed``, so the
    result does not depend on ``batch``. Returns (traj (n, N + 1, *shape) on the CPU:
    traj[:, 0] the noise, traj[:, N] the video; times (N + 1,) from 1 to 0; labels (n,))."""
    from fewstep.video.teacher import null_labels

    if n < 1 or batch < 1:
        raise ValueError(f"need n >= 1 trajectories and batch >= 1, got {n} and {batch}")
    shape = tuple(shape) if shape is not None else _sample_shape(teacher)
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.randint(0, 10, (n,), generator=gen)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} trajectories")
    noise = torch.randn(n, *shape, generator=gen)
    model = teacher if guidance == 1.0 else GuidedDenoiser(teacher, guidance, null_labels)
    path = model.path
    times = teacher_grid(path, steps)
    device = next(unguided(teacher).parameters()).device
    traj = torch.empty(n, steps + 1, *shape)
    starts = range(0, n, batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="SynVid", dynamic_ncols=True)
    for s in starts:
        x = path.prior(noise[s : s + batch]).to(device)
        cond = labels[s : s + batch].to(device)
        traj[s : s + batch, 0] = x.cpu()
        for j in range(steps):
            t, t_next = _batch_t(times[j], x), _batch_t(times[j + 1], x)
            x = ode_step(model, x, t, t_next, cond, "euler")  # eq. 5 (Euler = DDIM on RF)
            traj[s : s + batch, j + 1] = x.cpu()
    return traj, times, labels.clone()


def module_digest(module: nn.Module) -> str:
    """sha256 (16 hex) of a module's state dict: the cache key of data made by its weights."""
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _name(j: int) -> str:
    return f"x_{j:04d}"


def save_synvid(file: Path, traj: Tensor, times: Tensor, labels: Tensor, meta: dict) -> None:
    """One tensor per trajectory step (``x_0000`` ...), so readers load only the steps they
    use; written atomically."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {_name(j): traj[:, j].contiguous() for j in range(traj.shape[1])}
    tensors.update(times=times.contiguous(), labels=labels.contiguous())
    tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, file)


def read_synvid(
    file: Path, indices: Sequence[int] | None = None
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """(traj (n, len(indices) or N + 1, ...), times (N + 1,), labels (n,), meta) of a SynVid
    file; ``indices`` picks trajectory steps (None: all)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        times, labels = f.get_tensor("times"), f.get_tensor("labels")
        n_points = len(times)
        idx = list(range(n_points)) if indices is None else [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n_points]
        if bad:
            raise ValueError(f"trajectory steps {bad} outside the {n_points} stored in {file}")
        traj = torch.stack([f.get_tensor(_name(j)) for j in idx], 1)
    return traj, times, labels, meta


def synvid_spec(teacher: Denoiser, n: int, steps: int, guidance: float, seed: int) -> dict:
    """What identifies a SynVid: the teacher's weights, sampler, count and seed."""
    return {"teacher": module_digest(unguided(teacher)), "sampler": "euler", "steps": steps,
            "guidance": float(guidance), "n": n, "seed": seed,
            "format": SYNVID_FORMAT}  # fmt: skip


def load_synvid(
    teacher: Denoiser,
    n: int,
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    batch: int = 64,
    indices: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """``synthesize_trajectories`` cached under ``<fewstep cache>/video-synvid`` by
    ``synvid_spec`` (benchmarks and reruns reuse it). Returns (traj at ``indices`` (None:
    all steps), times (N + 1,), labels, info {cached, synth_seconds, file})."""
    from fewstep.core.cache import cache_key, cache_root

    spec = synvid_spec(teacher, n, steps, guidance, seed)
    file = cache_root() / "video-synvid" / f"{cache_key(spec)}.safetensors"
    cached = file.exists()
    if not cached:
        t0 = time.perf_counter()
        traj, times, labels = synthesize_trajectories(
            teacher, n, None, steps, guidance, seed, batch, progress=progress
        )
        save_synvid(file, traj, times, labels,
                    {"spec": spec, "synth_seconds": time.perf_counter() - t0})  # fmt: skip
        del traj
    traj, times, labels, meta = read_synvid(file, indices)
    info = {"cached": cached, "synth_seconds": meta.get("synth_seconds"), "file": str(file)}
    return traj, times, labels, info


# ------------------------------------------------------------------------------ key points


def key_indices(steps: int, m: int, indices: Sequence[int] = ()) -> list[int]:
    """The m + 1 key steps k_0 = 0 (noise) < ... < k_m = N (data) of an N-step trajectory
    (sec. 4.2): ``indices`` when given, else every N / m steps (rounded), as the paper's
    5 of 50."""
    if steps < 1:
        raise ValueError(f"the teacher trajectory needs steps N >= 1, got {steps}")
    if not 1 <= m <= steps:
        raise ValueError(f"key steps m must be in [1, N = {steps}], got {m}")
    idx = [int(i) for i in indices] or [math.floor(i * steps / m + 0.5) for i in range(m + 1)]
    if len(idx) != m + 1:
        raise ValueError(f"{m} key steps need {m + 1} key indices, got {len(idx)}: {idx}")
    if idx[0] != 0 or idx[-1] != steps or any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
        raise ValueError(
            f"key indices must start at 0 (noise), end at N = {steps} (data) and strictly "
            f"increase; got {idx}"
        )
    return idx


def key_sampler(key_times: Sequence[float] | Tensor) -> EulerSampler:
    """The m-step student sampler: Euler (eq. 5) from each key time to the next; the last
    key time must be the path's t_min = 0 (core's Euler grid ends on clean data)."""
    kt = [float(t) for t in key_times]
    if len(kt) < 2 or kt[-1] != 0.0 or any(b >= a for a, b in zip(kt, kt[1:], strict=False)):
        raise ValueError(f"key times must strictly decrease to 0 (data), got {kt}")
    return EulerSampler(times=kt[:-1])


def euler_landing(x: Tensor, v: Tensor, t: Tensor | float, t_next: Tensor | float) -> Tensor:
    """Eq. 5's one step x + (t_next - t) v, x and v (B, ...), times scalars or (B,). On
    rectified flow this is core's ``ode_step(..., 'euler')``, written out because the
    guidance loss needs the velocity itself."""
    dt = torch.as_tensor(t_next, dtype=x.dtype, device=x.device) - torch.as_tensor(
        t, dtype=x.dtype, device=x.device
    )
    return x + dt.reshape(-1, *([1] * (x.ndim - 1))) * v


# --------------------------------------------------------------------------- guidance loss


def guide_velocity(v: Tensor, x_i: Tensor, x_j: Tensor, t_i: float, t_j: float) -> Tensor:
    """Eq. 6: mean || v - (x_j - x_i) / (t_j - t_i) ||^2 (the chord of the teacher's
    trajectory between consecutive key points). v, x_i, x_j: (B, ...)."""
    return F.mse_loss(v.float(), ((x_j - x_i) / (t_j - t_i)).float())


def guide_point(v: Tensor, x_i: Tensor, x_j: Tensor, t_i: float, t_j: float) -> Tensor:
    """Eq. 6 in points: mean || x_i + (t_j - t_i) v - x_j ||^2 (= eq. 6 times (t_j - t_i)^2)."""
    return F.mse_loss(euler_landing(x_i, v, t_i, t_j).float(), x_j.float())


GUIDE_FORMS: dict[str, Callable[..., Tensor]] = {"velocity": guide_velocity, "point": guide_point}


# ---------------------------------------------------------------------------- discriminator


def feature_block(depth: int, fraction: float) -> int:
    """0-based index of the block ``fraction`` of the way through ``depth`` blocks, rounded to
    the nearest block (1.0: the last; 2/3 of 60: the paper's 40th; of 4: the 3rd)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a feature depth fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * depth + 0.5)) - 1


def teacher_tokens(teacher: Denoiser, x: Tensor, t: Tensor, cond: Any, block: int) -> Tensor:
    """(B, N, dim) tokens of a ``VideoDiT`` denoiser after block ``block`` at (x, t, cond):
    the noise-aware feature extractor of eq. 8 (layers after it are not run; the graph to x
    is kept, so a generator loss reaches the student through the frozen teacher)."""
    net = getattr(teacher, "net", None)
    if net is None or not hasattr(net, "blocks") or not hasattr(net, "grid"):
        raise TypeError(f"AccVideo's feature extractor needs a VideoDiT denoiser, got "
                        f"{type(teacher).__name__}")  # fmt: skip
    if getattr(net, "order", None) is not None:
        raise ValueError("the feature extractor needs tokens in row-major order (dense DiT)")
    return _output_of(net.blocks[block], lambda: teacher(x, _batch_t(t, x), cond))


class ProjectionHeads(nn.Module):
    """The timestep-aware projection heads H_k of eq. 8: per key time, a 2-D CNN on each
    frame's token map (core's ``GANHead``: DMD2's classification branch, stride-2 convs to
    2 x 2, mean, MLP), logits averaged over frames. tokens (B, gt gh gw, dim) -> (B,)."""

    def __init__(self, dim: int, grid: tuple[int, int, int], count: int, hidden: int = 64):
        super().__init__()
        if count < 1:
            raise ValueError(f"need at least one projection head, got {count}")
        self.grid = tuple(grid)
        self.heads = nn.ModuleList(
            GANHead(dim, hidden, spatial=self.grid[1:]) for _ in range(count)
        )

    def forward(self, tokens: Tensor, head: int) -> Tensor:
        b, n, d = tokens.shape
        gt, gh, gw = self.grid
        if n != gt * gh * gw:
            raise ValueError(f"expected {gt * gh * gw} tokens of grid {self.grid}, got {n}")
        maps = tokens.view(b, gt, gh, gw, d).permute(0, 1, 4, 2, 3).reshape(b * gt, d, gh, gw)
        return self.heads[head](maps.float()).view(b, gt).mean(1)


# ------------------------------------------------------------------------------- objective


@dataclass
class AccVideoLossConfig:
    guide_form: str = "velocity"  # velocity (eq. 6) or point (eq. 6 times dt^2)
    adv_weight: float = 0.1  # lambda_adv of the GAN term (paper: 0.1); 0 = guidance only
    fake_from: str = "student"  # student: own Euler chain from fresh noise; synthetic: stored
    timestep_heads: bool = True  # one projection head per key time (paper); False = one shared
    feature_depth: float = 1.0  # blocks of the teacher run for noisy key times (paper: 60/60)
    clean_feature_depth: float = 2 / 3  # for the clean key time t = 0 (paper: 40/60)
    head_hidden: int = 64  # channels of the projection heads
    disc_start_step: int = 0  # steps of guidance alone before the GAN starts

    def check(self) -> None:
        check_choice("guide_form", self.guide_form, tuple(GUIDE_FORMS))
        check_choice("fake_from", self.fake_from, ("student", "synthetic"))
        if self.adv_weight < 0:
            raise ValueError(f"adv_weight must be >= 0, got {self.adv_weight}")
        feature_block(1, self.feature_depth)
        feature_block(1, self.clean_feature_depth)


class AccVideo(Objective):
    """AccVideo's distillation (sec. 4.2-4.3, alg. 1) on batches of SynVid key points.

    ``teacher``: the frozen (unguided) teacher, the discriminator's feature extractor.
    ``key_times`` (m + 1,): native times of the key points, 1 -> 0. Batches carry
    x (B, m + 1, T, C, H, W), the key points of B trajectories, and cond = their labels.
    Roles: ``student`` (initialised from the teacher), ``discriminator`` (the heads)."""

    name = "accvideo"
    config_cls = AccVideoLossConfig
    roles = ("student", "discriminator")
    needs_data = True
    summary = "AccVideo: trajectory few-step guidance + GAN on synthetic trajectories (2025)"

    def __init__(
        self,
        teacher: Denoiser,
        key_times: Sequence[float] | Tensor,
        config: AccVideoLossConfig | None = None,
    ):
        super().__init__(unguided(teacher), config)
        self.config.check()
        if self.teacher.path.name != "rectified_flow":
            raise ValueError(
                f"AccVideo distils a flow-matching (rectified_flow) teacher, got "
                f"{self.teacher.path.name!r}"
            )
        self.sampler = key_sampler(key_times)
        self.key_times = [float(t) for t in key_times]

    @property
    def m(self) -> int:
        return len(self.key_times) - 1

    @property
    def adversarial(self) -> bool:
        return self.config.adv_weight > 0

    def build_roles(self, student: Denoiser, example: Batch) -> dict[str, nn.Module]:
        net = self.teacher.net
        count = self.m if self.config.timestep_heads else 1
        heads = ProjectionHeads(net.cfg.dim, net.grid, count, self.config.head_hidden)
        return {"student": student, "discriminator": heads.to(example.rng.device)}

    def schedule(self, step: int) -> list[str]:
        if self.adversarial and step >= self.config.disc_start_step:
            return ["student", "discriminator"]
        return ["student"]

    def student_sampler(self) -> EulerSampler:
        return self.sampler

    # --- pieces ---------------------------------------------------------------------------
    def check_batch(self, batch: Batch) -> Tensor:
        x = batch.x
        if x is None or x.ndim != 6 or x.shape[1] != self.m + 1:
            got = None if x is None else tuple(x.shape)
            raise ValueError(
                f"AccVideo batches hold the {self.m + 1} key points of each trajectory: "
                f"x (B, {self.m + 1}, T, C, H, W); got {got}"
            )
        return x

    def block_for(self, j: int) -> int:
        """Feature block for key point j (eq. 8; a shallower one for the clean key)."""
        c, depth = self.config, len(self.teacher.net.blocks)
        clean = self.key_times[j] == float(self.teacher.path.t_min)
        return feature_block(depth, c.clean_feature_depth if clean else c.feature_depth)

    def head_for(self, j: int) -> int:
        """Projection head of key point j in 1..m (one shared head when not timestep-aware)."""
        return j - 1 if self.config.timestep_heads else 0

    def logits(self, heads: ProjectionHeads, x: Tensor, j: int, cond: Any) -> Tensor:
        """D(x, t_{k_j}) = H_j(teacher features of x at t_{k_j}) (eq. 8). x (B, ...) -> (B,)."""
        t = _batch_t(self.key_times[j], x)
        return heads(teacher_tokens(self.teacher, x, t, cond, self.block_for(j)), self.head_for(j))

    def student_state(self, student: Denoiser, batch: Batch, i: int, like: Tensor) -> Tensor:
        """The student's own point at key time i: its Euler chain over the key times from
        fresh noise, without gradient (what alg. 1's queue Q_i holds)."""
        x = self.teacher.path.prior(batch.rng.randn_like(like).to(like))
        with torch.no_grad():
            for s in range(i):
                v = student.predict(x, self.key_times[s], batch.cond, kind="velocity")
                x = euler_landing(x, v, self.key_times[s], self.key_times[s + 1])
        return x

    def fake_landing(
        self, student: Denoiser, batch: Batch, i: int, x_i: Tensor, v_i: Tensor | None
    ) -> Tensor:
        """The fake point at key time i + 1: one student step (with gradient when enabled)
        from its own state at key time i (``fake_from="student"``) or from the stored one
        (``"synthetic"``, reusing the guidance step's velocity ``v_i`` when given)."""
        t_i, t_j = self.key_times[i], self.key_times[i + 1]
        if self.config.fake_from == "synthetic":
            if v_i is None:
                v_i = student.predict(x_i, t_i, batch.cond, kind="velocity")
            return euler_landing(x_i, v_i, t_i, t_j)
        start = self.student_state(student, batch, i, x_i)
        return euler_landing(start, student.predict(start, t_i, batch.cond, kind="velocity"),
                             t_i, t_j)  # fmt: skip

    # --- the step -------------------------------------------------------------------------
    def losses(self, roles, batch, update, step):
        cfg = self.config
        x = self.check_batch(batch)
        student, heads = roles["student"], roles.get("discriminator")
        i = batch.rng.shared_randint(0, self.m)  # the key interval of this step (E_k of eq. 6)
        j = i + 1
        t_i, t_j = self.key_times[i], self.key_times[j]
        x_i, x_j = x[:, i], x[:, j]
        gan = self.adversarial and step >= cfg.disc_start_step
        block, head, t_land = self.block_for(j), self.head_for(j), _batch_t(t_j, x_j)
        losses, logs = {}, {"key_interval": float(i)}
        fake_f = None  # the fake's teacher features, detached, for the discriminator
        if "student" in update:
            v = student.predict(x_i, t_i, batch.cond, kind="velocity")
            guide = GUIDE_FORMS[cfg.guide_form](v, x_i, x_j, t_i, t_j)
            loss = guide
            logs["guide_loss"] = guide.item()
            if gan:
                fake = self.fake_landing(student, batch, i, x_i, v)
                tokens = teacher_tokens(self.teacher, fake, t_land, batch.cond, block)
                g = gan_generator_loss(heads(tokens, head))
                fake_f = tokens.detach()
                logs["gan_generator"] = g.item()
                loss = loss + cfg.adv_weight * g
            losses["student"] = loss
        if "discriminator" in update:
            with torch.no_grad():  # the frozen extractor: the heads learn on fixed features
                if fake_f is None:
                    fake = self.fake_landing(student, batch, i, x_i, None)
                    fake_f = teacher_tokens(self.teacher, fake, t_land, batch.cond, block)
                # the real side: SynVid's stored points at the landing key time
                real_f = teacher_tokens(self.teacher, x_j, t_land, batch.cond, block)
            lr, lf = heads(real_f, head), heads(fake_f, head)
            d = gan_discriminator_loss(lr, lf)
            # alg. 1 line 26: H_k <- Update(H_k, lambda_adv L_adv)
            losses["discriminator"] = cfg.adv_weight * d
            logs.update(disc_loss=d.item(), disc_real_acc=(lr > 0).float().mean().item(),
                        disc_fake_acc=(lf < 0).float().mean().item())  # fmt: skip
        return losses, logs


__all__ = [
    "GUIDE_FORMS",
    "AccVideo",
    "AccVideoLossConfig",
    "ProjectionHeads",
    "euler_landing",
    "feature_block",
    "guide_point",
    "guide_velocity",
    "key_indices",
    "key_sampler",
    "load_synvid",
    "module_digest",
    "read_synvid",
    "save_synvid",
    "synthesize_trajectories",
    "synvid_spec",
    "teacher_grid",
    "teacher_tokens",
]
