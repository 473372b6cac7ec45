"""One trainer for every objective.

It owns what objectives must not know about: devices, processes, an optimizer per role and
the update schedule between roles, gradient accumulation and clipping, mixed precision, the
student's EMA, periodic evaluation and sample grids, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from fewstep.core import checkpoint as ckpt
from fewstep.core import distributed as D
from fewstep.core import fsdp as F
from fewstep.core.batch import Batch, StepRNG, cond_to, index_cond
from fewstep.core.models import Denoiser, ema_update_, frozen_copy
from fewstep.core.objectives.base import Objective

log = logging.getLogger("fewstep")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimisation steps (one step updates the roles the schedule names)
    batch_size: int = 64  # per-process batch; the global batch is this times world size
    lr: float = 1e-4  # learning rate of every role unless overridden in role_lr
    role_lr: dict[str, float] = field(default_factory=dict)  # per-role learning rates
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm per role; 0 disables clipping
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    ema_decay: float = 0.999  # EMA of the student's weights; 0 disables it
    warmup_steps: int = 0  # learning rates rise linearly from 0 over these first steps
    lr_decay: Literal["none", "linear", "cosine"] = "none"  # then fall to 0 at the last step
    mixed_precision: Literal["no", "bf16", "auto"] = "no"  # auto = bf16 on CUDA if supported
    seed: int = 0  # seeds every draw: the same seed gives the same run
    log_every: int = 10  # steps between log records
    eval_every: int = 0  # steps between evaluations; 0 = only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept on disk
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    progress: bool = True  # progress bar on rank 0
    # multi-process: "ddp" replicates roles, "fsdp" shards them (FSDP2); alone, both unsharded
    parallel: Literal["ddp", "fsdp"] = "ddp"
    fsdp_min_params: int = 1_000_000  # fsdp: blocks with this many parameters get own shards
    fsdp_wrap_classes: tuple[str, ...] = ()  # fsdp: shard blocks of these class names instead


def seed_global(seed: int) -> None:
    """``torch.manual_seed`` without its per-call cost where CUDA is not in use: before CUDA
    is initialised, torch records each seeding as a lazy call with a formatted stack trace
    (for CUDA, MTIA and XPU), 0.25-1 ms per call by stack depth, per step a noticeable share
    of a small model's training time."""
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of every learning rate at ``step`` (0-based): linear warmup over
    ``warmup_steps``, then constant or a linear / cosine decay that reaches 0 after the
    last step. A function of the step alone, so resumed runs follow the same schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "none":
        return 1.0
    left = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min((step - cfg.warmup_steps) / left, 1.0)
    if cfg.lr_decay == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def check_train_config(cfg: TrainConfig) -> None:
    if cfg.lr_decay not in ("none", "linear", "cosine"):
        raise ValueError(f"lr_decay must be 'none', 'linear' or 'cosine', got {cfg.lr_decay!r}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    F.check_parallel(cfg.parallel)
    if cfg.fsdp_min_params < 1:
        raise ValueError(f"fsdp_min_params must be >= 1, got {cfg.fsdp_min_params}")


class DataSource(Protocol):
    """Draws this process's slice of the global batch with the step's generator."""

    sample_shape: tuple[int, ...]

    def __call__(self, rng: StepRNG) -> tuple[Tensor | None, Any]: ...


@dataclass
class TensorData:
    """Uniform draws with replacement from in-memory tensors (x, optional conditions: a
    tensor, or a dict of tensors such as {"labels", "control"})."""

    x: Tensor  # (N, ...) samples
    cond: Tensor | dict[str, Tensor] | None = None  # (N, ...) conditions, e.g. class labels

    def __post_init__(self):
        conds = self.cond.items() if isinstance(self.cond, dict) else [("cond", self.cond)]
        for name, c in conds:
            if c is not None and len(c) != len(self.x):
                raise ValueError(f"x has {len(self.x)} samples but {name} has {len(c)}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __call__(self, rng):
        idx = rng.randint(0, len(self.x)).cpu()
        return self.x[idx], index_cond(self.cond, idx)


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)  # logged and kept in history
    warnings: list[str] = field(default_factory=list)  # e.g. a collapsed student
    images: dict[str, Tensor] = field(default_factory=dict)  # (N, C, H, W) in [-1, 1] grids


class NonFiniteLossError(RuntimeError):
    pass


def _autocast(device: torch.device, mode: str):
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    """``Trainer(objective, student, data, config, out_dir).fit()``.

    ``evaluator(trainer) -> EvalResult`` runs on rank 0 with the EMA student (see
    ``sampling_denoiser``) every ``eval_every`` steps and at the end.

    With ``parallel="fsdp"`` under several processes the roles and the EMA are sharded
    (``fewstep.core.fsdp``); a single process runs unsharded. The evaluator then sees full
    copies of the student and its EMA on rank 0 (other roles are not gathered), and after
    ``fit`` rank 0 keeps those full copies in ``roles["student"]`` / ``ema`` for export.
    """

    def __init__(
        self,
        objective: Objective,
        student: Denoiser,
        data: DataSource,
        config: TrainConfig,
        out_dir: str | Path,
        evaluator: Callable[[Trainer], EvalResult] | None = None,
        device: str | None = None,
    ):
        check_train_config(config)
        self.cfg = config
        self.objective = objective
        self.data = data
        self.out_dir = Path(out_dir)
        self.evaluator = evaluator
        self.dist = D.setup(device)
        self.device = self.dist.device
        if objective.teacher is not None:  # teacher-free objectives (consistency training)
            objective.teacher.to(self.device)
        self.step = 0
        self.history: list[dict] = []
        self._window: dict[str, tuple[float, int]] = {}  # log values since the last record
        self.warnings: list[str] = []
        self.last_checkpoint: Path | None = None
        torch.manual_seed(config.seed)
        example = self.make_batch(0, 0)
        built = objective.build_roles(student.to(self.device), example)
        self.roles: dict[str, nn.Module] = {k: m.to(self.device) for k, m in built.items()}
        for m in self.roles.values():
            D.broadcast_module_(m, self.dist)
        missing = set(objective.roles) - set(self.roles)
        if missing:
            raise ValueError(f"{objective.name}.build_roles did not build roles {sorted(missing)}")
        self.ema = frozen_copy(self.roles["student"]) if config.ema_decay > 0 else None
        # fsdp: shard every role and the EMA identically (before the optimizers take params)
        self.sharded = config.parallel == "fsdp" and self.dist.enabled
        self._gathered = False  # fsdp: rank 0 holds full student / EMA copies after fit
        self._skeletons: dict[str, nn.Module] = {}
        if self.sharded:
            self._shard_roles()
        self.params = {
            r: [p for p in self.roles[r].parameters() if p.requires_grad] for r in objective.roles
        }
        self.optimizers = {
            r: torch.optim.AdamW(
                self.param_groups(r, config.role_lr.get(r, config.lr)),
                betas=config.betas,
                weight_decay=config.weight_decay,
            )
            for r in self.params
        }
        # gradients FSDP does not reduce itself: every one under ddp, unsharded ones under fsdp
        self._replicated = {
            r: [p for p in ps if not F.is_sharded(p)] for r, ps in self.params.items()
        }
        if config.resume:
            self.try_resume()

    # --- fsdp ------------------------------------------------------------------------------
    def _shard_roles(self) -> None:
        mesh, cfg = F.make_mesh(self.dist), self.cfg
        teacher = self.objective.teacher
        keep = list(teacher.parameters()) if teacher is not None else []  # never sharded
        F.check_wrap_classes(self.checkpoint_modules().values(), cfg.fsdp_wrap_classes)
        for name, module in self.checkpoint_modules().items():
            if name in ("student", "student_ema"):  # gathered for evaluation / export
                self._skeletons[name] = F.meta_skeleton(module)
            F.shard_module_(module, mesh, cfg.fsdp_min_params, cfg.fsdp_wrap_classes, keep)

    def _full_copies(self) -> dict[str, nn.Module]:
        """Full copies of the student and its EMA, on rank 0 ({} elsewhere). Collective."""
        mods = self.checkpoint_modules()
        full = {name: F.full_state_dict(mods[name]) for name in self._skeletons}
        if not self.dist.is_main:
            return {}
        return {n: F.plain_copy(self._skeletons[n], sd, self.device) for n, sd in full.items()}

    def _swap_in(self, copies: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Put full copies (and stand-ins for the other sharded roles) in place on rank 0;
        return what they replaced."""
        old = {**self.roles, "student_ema": self.ema}
        for r in self.roles:
            if r != "student":
                self.roles[r] = F.GatheredAway(r)
        self.roles["student"] = copies["student"]
        self.ema = copies.get("student_ema")
        return old

    def _restore(self, old: dict[str, nn.Module]) -> None:
        self.ema = old.pop("student_ema")
        self.roles.update(old)

    def param_groups(self, role: str, lr: float) -> list[dict]:
        """The role's trainable parameters at ``lr``, with the submodules the objective
        names in ``lr_scales`` in groups of their own at scaled rates."""
        module = self.roles[role]
        scales = self.objective.lr_scales(role, module)
        groups, seen = [], set()
        for name, scale in scales.items():
            ps = [p for p in module.get_submodule(name).parameters() if p.requires_grad]
            seen.update(map(id, ps))
            groups.append({"params": ps, "lr": lr * scale, "base_lr": lr * scale})
        rest = [p for p in self.params[role] if id(p) not in seen]
        return [{"params": rest, "lr": lr, "base_lr": lr}, *groups]

    # --- data -----------------------------------------------------------------------------
    def make_batch(self, step: int, micro: int) -> Batch:
        b, info = self.cfg.batch_size, self.dist
        rng = StepRNG(
            self.cfg.seed,
            step,
            micro,
            global_size=b * info.world_size,
            offset=b * info.rank,
            local_size=b,
            device=self.device,
        )
        x, cond = self.data(rng)
        x = None if x is None else x.to(self.device)
        cond = cond_to(cond, self.device)
        return Batch(x=x, cond=cond, rng=rng, extras={"sample_shape": self.data.sample_shape})

    # --- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        if self._gathered:
            raise RuntimeError(
                "fit() has finished under parallel='fsdp': rank 0 holds gathered full copies "
                "for export, so training cannot continue on this Trainer; build a new one "
                "(it resumes from the last checkpoint)"
            )
        step, cfg = self.step, self.cfg
        update = self.objective.schedule(step)
        unknown = set(update) - set(self.optimizers)
        if unknown:
            raise ValueError(f"schedule names roles without optimizers: {sorted(unknown)}")
        seed_global(cfg.seed * 7_919 + step)  # stray global draws: same on resume
        for r in update:
            self.optimizers[r].zero_grad(set_to_none=True)
        record: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = self.make_batch(step, micro)
            with _autocast(self.device, cfg.mixed_precision):
                losses, logs = self.objective.losses(self.roles, batch, update, step)
            if set(losses) != set(update):
                raise ValueError(
                    f"{self.objective.name} returned losses for {sorted(losses)} but the "
                    f"schedule asked for {sorted(update)} at step {step}"
                )
            bad = [r for r in update if not torch.isfinite(losses[r].detach()).all()]
            if D.any_true(bool(bad), self.dist):
                raise NonFiniteLossError(
                    f"non-finite loss for role(s) {bad or '(on another rank)'} at step {step} "
                    f"({ {r: float(losses[r].detach()) for r in bad} }); last good checkpoint: "
                    f"{self.last_checkpoint or 'none written yet'}"
                )
            for j, r in enumerate(update):
                inputs = (
                    F.backward_inputs(self.roles[r], self.params[r])
                    if self.sharded
                    else self.params[r]
                )
                (losses[r].float() / cfg.grad_accum).backward(
                    inputs=inputs, retain_graph=j < len(update) - 1
                )
                key = f"loss/{r}"
                record[key] = record.get(key, 0.0) + float(losses[r].detach()) / cfg.grad_accum
            for k, v in logs.items():
                record[k] = record.get(k, 0.0) + float(v) / cfg.grad_accum
        factor = lr_factor(cfg, step)
        for r in update:
            for group in self.optimizers[r].param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
            D.average_gradients_(self._replicated[r], self.dist)
            if cfg.grad_clip > 0:
                clip = F.clip_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_
                norm = clip(self.params[r], cfg.grad_clip)
                record[f"grad_norm/{r}"] = float(norm)
            self.optimizers[r].step()
        self.objective.after_update(self.roles, update, step)
        if self.ema is not None and "student" in update:
            ema_update_(self.ema, self.roles["student"], cfg.ema_decay)
        self.step += 1
        return record

    # --- loop ------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                desc=f"distill[{self.objective.name}]",
                dynamic_ncols=True,
            )
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            for k, v in self.train_step().items():  # mean of each key over the window
                total, count = self._window.get(k, (0.0, 0))
                self._window[k] = (total + v, count + 1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                record = {k: total / count for k, (total, count) in self._window.items()}
                record.update(step=self.step, elapsed=time.perf_counter() - t0)
                self._window = {}
                self.history.append(record)
                if main:
                    with open(self.out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.set_postfix(
                            {k: f"{v:.3g}" for k, v in record.items() if k.startswith("loss/")}
                        )
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        self.save()
        if self.sharded and not self._gathered:  # rank 0 keeps full copies for export
            copies = self._full_copies()
            if self.dist.is_main:
                self._swap_in(copies)
            self._gathered = True
        self.evaluate()
        return self.history

    # --- evaluation ------------------------------------------------------------------------
    def sampling_denoiser(self, use_ema: bool = True) -> Denoiser:
        student = self.ema if (use_ema and self.ema is not None) else self.roles["student"]
        return self.objective.student_denoiser({**self.roles, "student": student})

    def evaluate(self) -> EvalResult | None:
        if self.sharded and not self._gathered and self.evaluator is not None:
            copies = self._full_copies()  # every rank takes part in the gather
            if not self.dist.is_main:
                D.barrier(self.dist)
                return None
            old = self._swap_in(copies)
            try:
                return self._evaluate()
            finally:
                self._restore(old)
        return self._evaluate()

    def _evaluate(self) -> EvalResult | None:
        if self.evaluator is None or not self.dist.is_main:
            D.barrier(self.dist)
            return None
        was = {k: m.training for k, m in self.roles.items()}
        for m in self.roles.values():
            m.eval()
        try:
            result = self.evaluator(self)
        finally:
            for k, m in self.roles.items():
                m.train(was[k])
        self.history.append(
            {"step": self.step, **{f"eval/{k}": v for k, v in result.metrics.items()}}
        )
        for w in result.warnings:
            msg = f"step {self.step}: {w}"
            log.warning(msg)
            self.warnings.append(msg)
        if result.images:
            from fewstep.core.report import save_image_grid

            for name, imgs in result.images.items():
                save_image_grid(
                    self.out_dir / "samples" / f"step_{self.step:08d}_{name}.png",
                    imgs.float().cpu(),
                    upscale=4,
                    pad=2,
                    pad_value=128,
                )
        D.barrier(self.dist)
        return result

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint_modules(self) -> dict[str, nn.Module]:
        mods = dict(self.roles)
        if self.ema is not None:
            mods["student_ema"] = self.ema
        return mods

    def save(self) -> Path | None:
        done = self.last_checkpoint is not None and self.last_checkpoint.name.endswith(
            f"{self.step:08d}"
        )
        modules, optimizers = self.checkpoint_modules(), self.optimizers
        if self.sharded and not done:  # every rank gathers; rank 0 gets the full tensors
            modules = {n: F.full_state_dict(m) for n, m in modules.items()}
            optimizers = {
                r: F.full_optimizer_state_dict(o, self.dist.is_main) for r, o in optimizers.items()
            }
            # every rank knows the folder, so all agree on ``done`` at the next call
            self.last_checkpoint = self.out_dir / "checkpoints" / f"step_{self.step:08d}"
        if self.dist.is_main and not done:  # never rewrite the folder of a finished step
            state = {
                "history": self.history,
                "warnings": self.warnings,
                "window": self._window,
                "config": _jsonable(asdict(self.cfg)),
                "objective": self.objective.name,
            }
            self.last_checkpoint = ckpt.save_checkpoint(
                self.out_dir / "checkpoints",
                self.step,
                modules,
                optimizers,
                state,
                keep=self.cfg.keep_checkpoints,
            )
        D.barrier(self.dist)
        return self.last_checkpoint

    def try_resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.out_dir / "checkpoints")
        if path is None:
            return False
        loaders = {}
        if self.sharded:  # full tensors on disk, each rank keeps its slice
            loaders = dict(
                load_module=F.load_full_state_dict_,
                load_optimizer=F.load_full_optimizer_state_dict_,
            )
        state = ckpt.load_checkpoint(path, self.checkpoint_modules(), self.optimizers, **loaders)
        self.step = int(state["step"])
        self.history = state.get("history", [])
        self.warnings = state.get("warnings", [])
        self._window = {k: tuple(v) for k, v in state.get("window", {}).items()}
        self.last_checkpoint = path
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return True


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
