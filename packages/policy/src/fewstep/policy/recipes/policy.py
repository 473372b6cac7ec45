"""``fewstep distill policy-<method>``: few-NFE policies from a diffusion-policy teacher on
ReachAround, evaluated in closed loop against the teacher on the same seeds.

- ``policy-sdp``: Streaming Diffusion Policy (``sdp.py``), trained on the demonstrations by
  core's trainer (initialised from the teacher's weights by default);
- ``policy-consistency`` and ``policy-dmd``: one-step students distilled from the teacher
  by core's objectives (consistency distillation as in Consistency Policy, DMD2); any other
  core objective runs with ``--objective NAME``.

The run folder gets ``student.safetensors`` (weights and normalizer), ``metrics.json``
(success rate, mode fractions against the expert's, NFE and milliseconds per action, for the
method and the 100-step DDPM teacher), trajectory plots and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.batch import Batch
from fewstep.core.objectives.base import Objective
from fewstep.core.training import TrainConfig
from fewstep.policy.sdp import SDPConfig
from fewstep.policy.teacher import ACT_DIM, HorizonConfig, TeacherConfig


@dataclass
class EvalConfig:
    episodes: int = 50  # closed-loop rollouts per policy, seeds seed .. seed + episodes - 1
    seed: int = 10_000  # first env seed (demonstrations use 0 .. demos - 1)
    max_steps: int = 150  # control steps per episode
    latency_plans: int = 3  # planning calls timed on a single environment
    teacher: bool = True  # roll out the 100-step teacher on the same seeds too


def _train(**kw) -> TrainConfig:
    base = dict(steps=1000, batch_size=64, lr=1e-4, ema_decay=0.99, log_every=50)
    return TrainConfig(**{**base, **kw})


@dataclass
class SDPRecipeConfig:
    horizons: HorizonConfig = field(default_factory=HorizonConfig)  # To, Tp, Ta
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # teacher and demos
    sdp: SDPConfig = field(default_factory=SDPConfig)  # noise regimes, buffer init
    init: str = "teacher"  # SDP network's initial weights: teacher or scratch
    train: TrainConfig = field(default_factory=lambda: _train(lr=3e-4))  # training loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # closed-loop evaluation
    seed: int = 0  # sampling noise of the evaluated policies
    threads: int = 1  # torch CPU threads; these small nets run fastest on one (0 = default)
    device: str = "auto"  # cpu, cuda, or auto


@dataclass
class DistillConfig:
    objective: str = "consistency"  # core objective (see `fewstep list`)
    horizons: HorizonConfig = field(default_factory=HorizonConfig)  # To, Tp, Ta
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # teacher and demos
    train: TrainConfig = field(default_factory=lambda: _train(steps=2000))  # distillation
    eval: EvalConfig = field(default_factory=EvalConfig)  # closed-loop evaluation
    seed: int = 0  # sampling noise of the evaluated policies
    threads: int = 1  # torch CPU threads; these small nets run fastest on one (0 = default)
    device: str = "auto"  # cpu, cuda, or auto


class SDPObjective(Objective):
    """SDP's training loss as a core objective (so core's trainer gives EMA, checkpoints and
    exact resume): the denoising loss with one noise level per action position."""

    name = "sdp"
    needs_data = True

    def __init__(self, teacher, sdp: SDPConfig, horizons: HorizonConfig, init: str):
        super().__init__(teacher)
        if init not in ("teacher", "scratch"):
            raise ValueError(f"init must be 'teacher' or 'scratch', got {init!r}")
        self.sdp, self.horizons, self.init = sdp, horizons, init

    def build_roles(self, student, example):
        if self.init == "scratch":
            for m in student.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return {"student": student}

    def losses(self, roles, batch: Batch, update, step):
        from fewstep.policy.sdp import sdp_loss, training_levels

        n_levels = int(self.path.t_max) + 1
        levels = training_levels(self.horizons.windows(), n_levels, self.sdp, batch.rng)
        loss = sdp_loss(
            roles["student"], batch.x, batch.cond, levels, batch.rng.randn_like(batch.x)
        )
        return {"student": loss}, {"loss": loss.item()}


def _student_role(trainer):
    """The trained student role with EMA weights (unwrapped: what is saved)."""
    return trainer.ema if trainer.ema is not None else trainer.roles["student"]


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


class _PolicyRecipe:
    """What every policy recipe shares: teacher, evaluation, saving, report."""

    name = ""
    summary = ""
    config_cls: type = DistillConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    # --- the method -------------------------------------------------------------------
    def train(self, cfg, obj_cfg, teacher, data, out_dir: Path):
        """-> (the trained student role (EMA weights), meta dict saved beside it)."""
        raise NotImplementedError

    def wrap(self, cfg, obj_cfg, teacher, student):
        """The denoiser to sample from, around the saved student role."""
        return student

    def make_policy(self, cfg, student, meta: dict, normalizer):
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------
    def distill(self, cfg, obj_cfg, out_dir: Path) -> dict:
        from fewstep.policy.teacher import load_teacher, windows_data

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        teacher, normalizer, episodes, tinfo = load_teacher(
            cfg.teacher, cfg.horizons, cfg.train.progress
        )
        data, _ = windows_data(episodes, cfg.horizons)
        t0 = time.perf_counter()
        student, meta = self.train(cfg, obj_cfg, teacher, data, out_dir)
        train_seconds = time.perf_counter() - t0
        self._save(out_dir, student, normalizer, meta)
        student = self.wrap(cfg, obj_cfg, teacher, student)
        metrics = self._evaluate(cfg, teacher, student, meta, normalizer, episodes, out_dir)
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"), train_seconds=train_seconds
        )
        from fewstep.core.io import atomic_write_json

        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, normalizer, meta: dict) -> None:
        from fewstep.core.rundir import save_student

        save_student(out_dir, {"student": student, "normalizer": normalizer.state_dict()}, meta)

    def load(self, run_dir: Path):
        """(config, teacher, student denoiser to sample, meta, normalizer, demonstrations)."""
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.policy.data import Normalizer
        from fewstep.policy.teacher import build_denoiser, load_teacher

        cfg, resolved = load_run_config(run_dir, self.config_cls)
        teacher, _, episodes, _ = load_teacher(cfg.teacher, cfg.horizons, progress=False)
        state, meta = load_student(run_dir, "student")
        student = build_denoiser(cfg.teacher, cfg.horizons)
        student.load_state_dict(state)
        norm = Normalizer.from_state_dict(load_student(run_dir, "normalizer")[0])
        student = self.wrap(cfg, resolved["objective_config"], teacher, student.eval())
        return cfg, teacher, student, meta, norm, episodes

    def _teacher_policy(self, cfg, teacher, normalizer):
        from fewstep.core.samplers import DDPMSampler
        from fewstep.policy.policy import DenoiserPolicy

        gen = torch.Generator().manual_seed(cfg.seed)
        sampler = DDPMSampler(cfg.teacher.sample_steps, clip_x0=1.0, generator=gen)
        return DenoiserPolicy(
            teacher, sampler, normalizer, cfg.horizons.windows(), ACT_DIM, cfg.seed
        )

    def _evaluate(self, cfg, teacher, student, meta, normalizer, episodes, out_dir) -> dict:
        from fewstep.policy.envs import ReachAroundEnv
        from fewstep.policy.evaluate import plot_trajectories, summarise
        from fewstep.policy.rollouts import latency, rollout_batch

        seeds = list(range(cfg.eval.seed, cfg.eval.seed + cfg.eval.episodes))
        expert = [e.mode for e in episodes]
        policies = {"student": self.make_policy(cfg, student, meta, normalizer)}
        if cfg.eval.teacher:
            policies["teacher"] = self._teacher_policy(cfg, teacher, normalizer)
        out: dict[str, Any] = {"method": self.name, "eval_seeds": [seeds[0], seeds[-1]]}
        rows = []
        for name, policy in policies.items():
            t0 = time.perf_counter()
            results = rollout_batch(ReachAroundEnv, policy, seeds, cfg.eval.max_steps)
            summary = summarise(results, expert)
            summary["rollout_seconds"] = time.perf_counter() - t0
            summary.update(latency(ReachAroundEnv, policy, seeds[0], cfg.eval.latency_plans))
            summary["nfe_per_plan"] = policy.nfe / max(policy.plans, 1)
            plot_trajectories(results, ReachAroundEnv(), out_dir / f"rollouts_{name}.png")
            out[name] = summary
            rows.append(summary)
        s = out["student"]
        if "teacher" in out:
            t = out["teacher"]
            out["success_gap"] = t["success_rate"] - s["success_rate"]
            out["nfe_reduction"] = t["nfe_per_action"] / max(s["nfe_per_action"], 1e-9)
            out["latency_speedup"] = t["ms_per_action"] / max(s["ms_per_action"], 1e-9)
        out["expert_mode_fractions"] = s["expert_mode_fractions"]
        return out

    # --- CLI commands -------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Roll out ``n`` episodes and plot their trajectories."""
        from fewstep.policy.envs import ReachAroundEnv
        from fewstep.policy.evaluate import plot_trajectories
        from fewstep.policy.rollouts import rollout_batch

        cfg, _, student, meta, norm, _ = self.load(run_dir)
        if steps is not None:
            meta = {**meta, "student_steps": steps}
        policy = self.make_policy(cfg, student, meta, norm)
        seeds = list(range(cfg.eval.seed, cfg.eval.seed + n))
        results = rollout_batch(ReachAroundEnv, policy, seeds, cfg.eval.max_steps)
        out = out or Path(run_dir) / f"rollouts_{n}.png"
        return plot_trajectories(results, ReachAroundEnv(), out) or out

    def evaluate(self, run_dir: Path) -> dict:
        cfg, teacher, student, meta, norm, episodes = self.load(run_dir)
        return self._evaluate(cfg, teacher, student, meta, norm, episodes, Path(run_dir))

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        cols = ["policy", "success_rate", "mode_fractions", "mode_tv", "nfe_per_action",
                "nfe_per_plan", "ms_per_action", "mean_steps"]  # fmt: skip
        rows = [{"policy": k, **m[k]} for k in ("student", "teacher") if k in m]
        rep.add_table("Closed-loop rollouts (same seeds)", rows, cols)
        if "teacher" in m:
            rep.add_text(
                "Ratios",
                f"success gap (teacher - student) = {m['success_gap']:+.3f}; NFE per action "
                f"{m['nfe_reduction']:.1f}x lower; latency per action {m['latency_speedup']:.1f}x "
                f"lower. Expert modes: {m['expert_mode_fractions']}.",
            )
        for k in ("student", "teacher"):
            if (run_dir / f"rollouts_{k}.png").exists():
                rep.add_image(f"Rollouts: {k}", run_dir / f"rollouts_{k}.png")
        return rep.write()


class SDPRecipe(_PolicyRecipe):
    name = "policy-sdp"
    summary = "Streaming Diffusion Policy: per-position noise levels, N/C NFE per plan"
    config_cls = SDPRecipeConfig

    def train(self, cfg, obj_cfg, teacher, data, out_dir):
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import Trainer

        objective = SDPObjective(teacher, cfg.sdp, cfg.horizons, cfg.init)
        trainer = Trainer(
            objective, trainable_copy(teacher), data, cfg.train, out_dir, device=_device(cfg.device)
        )
        trainer.fit()
        return _student_role(trainer), {"kind": "sdp", "sdp": dataclasses.asdict(cfg.sdp)}

    def make_policy(self, cfg, student, meta, normalizer):
        from fewstep.policy.sdp import StreamingPolicy

        sdp = SDPConfig(**meta["sdp"])
        return StreamingPolicy(student, normalizer, cfg.horizons.windows(), ACT_DIM, sdp, cfg.seed)


class DistillRecipe(_PolicyRecipe):
    """One- and few-step students from core objectives."""

    def __init__(self, name: str, objective: str, summary: str):
        self.name, self.summary, self.default = name, summary, objective
        self.config_cls = dataclasses.make_dataclass(
            f"{objective.title()}PolicyConfig",
            [("objective", str, field(default=objective))],
            bases=(DistillConfig,),
        )

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        # DMD2 on a 100-step table: two fake-score updates suffice (it starts as the teacher).
        # Consistency: a slow target (EMA 0.999, not LCM's 0.95) took closed-loop success
        # from 0.12 to 0.78 at 2,000 steps (50 episodes; notes of session 7).
        return {
            "dmd2": {"fake_updates_per_student": 2},
            "consistency": {"ema_decay": 0.999},
        }.get(objective, {})

    def config_defaults(self, objective: str) -> dict[str, str]:
        # two-player objectives: Adam beta1 = 0 (what made DMD2 work on digits, BENCHMARKS.md);
        # consistency: 8,000 steps took 2-step success from 0.86 (2,000) to 0.88 (session 9)
        return {
            "dmd2": {"train.betas": "0.0,0.99"},
            "consistency": {"train.steps": "8000"},
        }.get(objective, {})

    def train(self, cfg, obj_cfg, teacher, data, out_dir):
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import Trainer

        objective = self._objective(cfg, obj_cfg, teacher)
        trainer = Trainer(
            objective, trainable_copy(teacher), data, cfg.train, out_dir, device=_device(cfg.device)
        )
        trainer.fit()
        times = [float(t) for t in objective.student_sampler().times]
        return _student_role(trainer), {"kind": "few-step", "times": times}

    @staticmethod
    def _objective(cfg, obj_cfg, teacher):
        from fewstep.core.config import from_dict
        from fewstep.core.objectives import get_objective

        cls = get_objective(cfg.objective)
        if isinstance(obj_cfg, dict):  # from a run folder's config.json
            obj_cfg = from_dict(cls.config_cls, obj_cfg)
        return cls(teacher, obj_cfg)

    def wrap(self, cfg, obj_cfg, teacher, student):
        return self._objective(cfg, obj_cfg, teacher).student_denoiser({"student": student})

    def make_policy(self, cfg, student, meta, normalizer):
        from fewstep.core.samplers import FewStepSampler
        from fewstep.policy.policy import DenoiserPolicy

        times = meta["times"]
        if "student_steps" in meta:  # an override from `fewstep sample --steps`
            times = [1.0 - i / meta["student_steps"] for i in range(meta["student_steps"])]
        sampler = FewStepSampler(times, generator=torch.Generator().manual_seed(cfg.seed))
        return DenoiserPolicy(
            student, sampler, normalizer, cfg.horizons.windows(), ACT_DIM, cfg.seed
        )


SDP = SDPRecipe()
CONSISTENCY = DistillRecipe(
    "policy-consistency", "consistency", "one-step consistency policy distilled from the teacher"
)
DMD = DistillRecipe("policy-dmd", "dmd2", "one-step DMD2 policy distilled from the teacher")
