"""``fewstep distill image-digits``: a class-conditional diffusers UNet teacher trained on
scikit-learn's 8x8 digits, distilled into a 1-step student (DMD2 by default).

The run folder gets the student as a diffusers folder (``student/``, safetensors), the
resolved config, ``metrics.json``, sample grids and ``report.html``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.training import TrainConfig
from fewstep.image.unet import DigitsUNetConfig

# Objectives that do not apply to this recipe, and why (every other registered one does).
UNSUPPORTED_WHY: dict[str, str] = {}


@dataclass
class TeacherConfig:
    path: str = "rectified_flow"  # forward process: rectified_flow, vp_discrete, vp, edm, ...
    prediction: str = "velocity"  # what the UNet predicts: velocity, eps, v, x0
    unet: DigitsUNetConfig = field(default_factory=DigitsUNetConfig)  # architecture
    steps: int = 800  # training steps (cached by config; ~1.5 min on 2 CPU cores)
    batch_size: int = 128  # training batch
    lr: float = 2e-3  # AdamW learning rate
    cond_dropout: float = 0.1  # label dropout so CFG has an unconditional score
    sampler: str = "euler"  # teacher solver for reference samples: euler or heun
    sample_steps: int = 50  # teacher solver steps
    seed: int = 0  # training seed


@dataclass
class DigitsConfig:
    objective: str = "dmd2"  # distillation objective (see `fewstep list`)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # teacher training/sampling
    guidance_scale: float = 1.0  # CFG scale of the teacher seen by the objective (1 = off)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=2000,
            batch_size=64,
            lr=1e-4,
            ema_decay=0.99,
            eval_every=500,
            checkpoint_every=500,
            log_every=10,
        )
    )  # distillation loop
    classifier_steps: int = 1500  # training steps of the cached digits classifier (FD features)
    reward_classifier_steps: int = 1000  # reward objectives: a second classifier (not the FD one)
    eval_samples: int = 1000  # samples per model for the final FD / accuracy
    probe_samples: int = 200  # samples for evaluations during training
    threads: int = 0  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _objective_defaults(name: str) -> dict[str, Any]:
    import dataclasses

    from fewstep.core.objectives import get_objective
    from fewstep.image.digits import NULL_CLASS

    tuned = {
        # two fake-score updates are enough: it starts as the teacher. DMD2's GAN term, at the
        # weight that helped most here (FD ratio 1.17 -> 1.09 on 3 seeds with betas (0, 0.99))
        "dmd2": {"fake_updates_per_student": 2, "gan_weight": 0.1},
        "consistency": {"num_intervals": 50, "ema_decay": 0.95},
        # sCM's 10k-step tangent warmup is a tenth of its runs; ours are 2,000 steps. The
        # UNet embeds 1000 t, and wiggles at that scale make its exact time derivative ~20x
        # the derivative along the teacher's trajectory: a central difference over a wider
        # step is the smooth tangent (FD ratio 5.3 exact, 3.9 at 0.01, 2.3 at 0.05)
        **{
            k: {"tangent_warmup": 200, "jvp_mode": "finite_difference", "fd_eps": 0.05}
            for k in ("scm", "rcm", "tbcm")
        },
        # a short run must train the one-step jump itself: at init the flow map is the
        # teacher, whose one Euler jump from noise is the class mean, so half the run is
        # MF-RAE's consistency mid-training on teacher jumps; the same smooth derivative
        "meanflow": {
            "t_density": "uniform",
            "r_neq_t": 0.75,
            "r_zero": 0.5,
            "cmt_steps": 1000,
            "jvp_mode": "finite_difference",
            "fd_eps": 0.01,
        },
        # data-free flow maps differentiate the UNet in t too (as on the 2-D suite)
        "flow_map": {"jvp_mode": "finite_difference", "fd_eps": 0.01},
        # the UNet has no feed-forward blocks; its time-embedding MLP is the dense MLP here
        "dense2moe": {"targets": ("unet.time_embedding",)},
    }.get(name, {})
    fields = {f.name for f in dataclasses.fields(get_objective(name).config_cls)}
    if "null_label" in fields:  # objectives that guide an unwrapped teacher themselves
        tuned = {"null_label": NULL_CLASS, **tuned}
    return tuned


def _config_defaults(name: str) -> dict[str, str]:
    # DMD2's code keeps PyTorch's Adam betas (0.9, 0.999) over 10^5 steps; at ~1,000 student
    # updates momentum makes the student and the fake score that tracks it lag each other.
    # beta1 = 0, the usual choice for two-player GAN training (StyleGAN2): FD ratio DMD2
    # 1.51 -> 1.17 (3 seeds), SiD 2.28 -> 1.09, f-distill 1.65 -> 1.55 (5 seeds; BENCHMARKS.md)
    two_player = {"train.betas": "0.0,0.99"}
    return {"dmd2": two_player, "sid": two_player, "f_distill": two_player}.get(name, {})


class DigitsRecipe:
    name = "image-digits"
    summary = "8x8 digits: class-conditional UNet teacher -> 1-step student"
    config_cls = DigitsConfig

    @property
    def supported_objectives(self) -> tuple[str, ...]:
        from fewstep.core.objectives import objective_names

        return tuple(n for n in objective_names() if n not in UNSUPPORTED_WHY)

    def unsupported_reason(self, name: str) -> str:
        return UNSUPPORTED_WHY.get(name, "not a registered objective")

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return _objective_defaults(objective)

    def config_defaults(self, objective: str) -> dict[str, str]:
        return _config_defaults(objective)

    # ---------------------------------------------------------------------------------
    def distill(self, cfg: DigitsConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import TensorData, Trainer
        from fewstep.image import digits_eval as ev
        from fewstep.image.digits import load_digits_tensors
        from fewstep.image.teacher import load_teacher

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        x, y = load_digits_tensors()
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.train.progress)
        objective = make_objective(cfg, teacher, obj_cfg)
        student = trainable_copy(teacher)
        probe = ev.Probe(cfg, teacher)
        t0 = time.perf_counter()
        trainer = Trainer(
            objective,
            student,
            TensorData(x, y),
            cfg.train,
            out_dir,
            evaluator=probe,
            device=cfg.device,
        )
        trainer.fit()
        distill_seconds = time.perf_counter() - t0
        if not trainer.dist.is_main:
            return {}
        student_model = trainer.sampling_denoiser(use_ema=True)
        ev.save_student(out_dir, trainer, cfg)
        metrics = ev.final_metrics(
            cfg, teacher, student_model, objective.student_sampler(), out_dir
        )
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"),
            distill_seconds=distill_seconds,
            distill_steps=cfg.train.steps,
            warnings=trainer.warnings,
        )
        from fewstep.core.io import atomic_write_json

        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        from fewstep.core.report import save_image_grid
        from fewstep.image.digits_eval import load_student

        student, cfg, sampler = load_student(run_dir, steps)
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(n) % 10
        s = sampler.sample(student, torch.randn(n, 1, 8, 8, generator=g), labels)
        out = out or Path(run_dir) / f"samples_{n}x{s.nfe}nfe.png"
        return save_image_grid(out, s.x, nrow=10, upscale=4)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.image import digits_eval as ev
        from fewstep.image.teacher import load_teacher

        student, cfg, sampler = ev.load_student(run_dir)
        teacher, _ = load_teacher(cfg.teacher)
        return ev.final_metrics(cfg, teacher, student, sampler, None)

    def report(self, run_dir: Path) -> Path:
        from fewstep.image.digits_eval import write_report

        return write_report(Path(run_dir))


def make_objective(cfg: DigitsConfig, teacher, obj_cfg, with_reward: bool = True):
    """The configured objective on the (guided) teacher; reward objectives get the log-
    probability of the requested digit under a second classifier (not the FD one)."""
    from fewstep.core.config import from_dict
    from fewstep.core.objectives import get_objective
    from fewstep.image.teacher import guided

    cls = get_objective(cfg.objective)
    if isinstance(obj_cfg, dict):
        obj_cfg = from_dict(cls.config_cls, obj_cfg)
    # every objective gets the reward (it loads its classifier on first use); whether one is
    # needed may depend on the objective's config (e.g. PSO's online pairs)
    reward = ClassifierReward(cfg.reward_classifier_steps) if with_reward else _no_reward
    return cls(guided(teacher, cfg.guidance_scale), obj_cfg, reward=reward)


class ClassifierReward:
    """reward(x0, labels) = log p(label | x0) under a cached digits classifier; differentiable
    in x0 (the classifier is frozen)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.clf = None

    def __call__(self, x0, labels):
        if self.clf is None:
            from fewstep.image.classifier import load_classifier

            # trained on first use (even inside a no-grad region); it seeds torch, so keep
            # the run's own random stream
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                self.clf, _ = load_classifier(steps=self.steps, seed=1)
        self.clf.to(x0.device)
        logp = torch.log_softmax(self.clf(x0.float()), dim=1)
        return logp.gather(1, labels.long().view(-1, 1)).squeeze(1)


def _no_reward(x0, cond):
    raise RuntimeError("this objective was rebuilt for sampling only; it has no reward")


RECIPE = DigitsRecipe()
