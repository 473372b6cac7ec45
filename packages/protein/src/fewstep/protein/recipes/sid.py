"""``fewstep distill protein-sid``: a few-step CA-backbone generator distilled from the
flow-matching teacher with Score identity Distillation, sampled with noise modulation.

Xie et al., "Distilled Protein Backbone Generation" (2025; LY-Xie/SiD_Protein) adapt SiD
(Zhou et al., ICML 2024) to Proteina. What this recipe takes from the paper, and where:

- the loss is core's SiD (``fewstep.core.objectives.sid``: ``sid_generator_loss`` with
  alpha = 1.2, the fake score trained 1:1 with the denoising loss, a K-step student matched
  as the uniform mixture of its steps through backward simulation);
- the student and fake score start from the teacher (``sid_training_loop.py``);
- the student's K times are the paper's log-spaced grid and its training rollouts re-noise
  with noise_scale 1 (``sid_utils.generator_step``); at inference the re-noising noise is
  scaled by ``noise_scale`` (0.45) — the noise modulation the paper found essential
  (``sampling.py``);
- generator-loss times: t_P = 1 - 10^(-2 s / 400), s uniform on {0..400}, clamped to
  [0.02, 0.98] (``SID_ProteinaLoss.generator_loss``), i.e. core time t = 10^(-2 s / 400)
  (``PaperLossTimes``); fake-score times follow Proteina's training density
  (``model.ProteinaFlow``) clamped to [0.02, 0.98] (``SID_ProteinaLoss.__call__``, tmax
  0.98 in ``run_sid_proteina.sh``; ``fake_t_range``);
- optimisation (``_train``): the paper script's learning rates (generator 5e-5, fake score
  1e-4) and gradient clipping at 1 for both, an EMA near SiD's ramped-up one; batch and
  step count are CPU-sized (the paper: batch 4096);
- normalisation: the paper divides by the per-sample *sum* |x_g - y_real| and by the residue
  count; core divides by the per-sample *mean* and averages over elements: the same loss up
  to one constant factor (3 L / L = 3) that Adam absorbs.

Core's SiD draws generator-loss times through ``SiD.generator_times`` (uniform over the
path's ``t_range``); ``ProteinSiD`` overrides that draw with the paper's log-spaced map
(``PaperLossTimes.fraction_to_t``) and the fake score's time range; the SiD math is core's.

``--objective sida`` trains the same student with core's SiDA (Zhou et al., ICLR 2025:
SiD's loss plus an adversarial term whose discriminator is the fake score's encoder, fed
the real training fragments the trainer already draws; the paper's script has the same
switch, ``--use_sida``); ``ProteinSiDA`` adds nothing to its loss. The transformer's
"encoder" is its first half (``BackboneDenoiser.features``). It also sets K = 20, sampled
on 18 of its times, and EMA 0.99 (``SIDA_CONFIG``): the configuration that matches the
400-step teacher with 22x fewer network evaluations (24-25x timed), and the recipe's default
objective; ``--objective sid`` is the paper's plain SiD (K = 16 on all 16 times).

``--sample_steps N`` samples the K-step student on N of its trained times
(``sampling.thin_times``: the first N - 1 and the last); the saved ``student.json`` keeps
both the trained ``times`` and the ``sample_times``.

Before distillation the teacher is refined (``refine.py``: fine-tuned on its own plausible
low-temperature samples); SiD / SiDA distil the refined teacher, the evaluation compares
with the base teacher's 400-step sampler.

The run folder gets ``student.safetensors`` (+ ``student.json``: times, noise scale),
``metrics.json`` (``metrics.evaluate_backbones`` of student and teacher samples against the
training fragments, samples/s of each on the same batch), PDB files of a few samples under
``samples/`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.core.objectives.common import sample_times
from fewstep.core.objectives.sid import SiD, SiDConfig
from fewstep.core.objectives.sida import SiDA, SiDAConfig
from fewstep.core.training import TrainConfig
from fewstep.protein.model import ProteinaFlow
from fewstep.protein.refine import RefineConfig
from fewstep.protein.teacher import TeacherConfig

# --------------------------------------------------------------------------- objective


@dataclass
class LossTimesConfig:
    decades: float = 2.0  # t spans 10^-decades .. 1 before clamping
    grid: int = 400  # number of discrete levels (paper: --t 400)
    clamp: tuple[float, float] = (0.02, 0.98)  # generator-loss time range (paper tmin, tmax)


class PaperLossTimes(ProteinaFlow):
    """A view of the teacher's path for SiD's generator-loss times only: a fraction f in
    [0, 1) maps to s = floor((1 - f) (grid + 1)) (uniform on {0..grid} for uniform f) and
    t = 10^(-decades s / grid), clamped to ``clamp`` (paper: grid 400, 2 decades,
    [0.02, 0.98]). Forward process and conversions are the rectified flow's."""

    def __init__(self, cfg: LossTimesConfig | None = None):
        super().__init__()
        self.times_cfg = cfg = cfg or LossTimesConfig()
        lo, hi = cfg.clamp
        if not 0.0 < lo <= hi <= 1.0 or cfg.grid < 1 or cfg.decades <= 0:
            raise ValueError(
                f"loss times need 0 < clamp[0] <= clamp[1] <= 1, grid >= 1, decades > 0; got {cfg}"
            )

    def fraction_to_t(self, f):
        cfg = self.times_cfg
        f = torch.as_tensor(f, dtype=torch.float32)
        s = torch.floor((1.0 - f) * (cfg.grid + 1)).clamp(0, cfg.grid)
        return (10.0 ** (-cfg.decades * s / cfg.grid)).clamp(*cfg.clamp)


class ProteinSiD(SiD):
    """Core's SiD with the protein paper's student sampler (backward simulation on its time
    grid), generator-loss time draw and fake-score time range (module docstring). Nothing
    of the loss is changed."""

    def __init__(
        self,
        teacher,
        config: SiDConfig,
        sampler,
        loss_times: PaperLossTimes,
        fake_t_range: tuple[float, float] = (0.02, 0.98),
    ):
        super().__init__(teacher, config)
        lo, hi = fake_t_range
        if not 0.0 < lo < hi <= 1.0:
            raise ValueError(f"fake_t_range needs 0 < lo < hi <= 1, got {fake_t_range}")
        self._sampler = sampler
        self._loss_times = loss_times
        self.fake_t_range = (float(lo), float(hi))

    def build_roles(self, student, example):
        """Core's roles; the fake score's own path draws its denoising-loss times inside
        ``fake_t_range`` (paper: Proteina's density clamped to t_P in [0.02, 0.98],
        ``SID_ProteinaLoss.__call__`` with tmin 0.02, tmax 0.98), the teacher's density."""
        roles = super().build_roles(student, example)
        fake = roles["fake_score"]
        if isinstance(fake.path, ProteinaFlow):
            lo, hi = self.fake_t_range
            fake.path = dataclasses.replace(fake.path, t_floor=lo, t_ceil=hi)
        return roles

    def generator_times(self, batch):
        return sample_times(self._loss_times, batch, self.config.t_range)

    def student_sampler(self):
        return self._sampler


class ProteinSiDA(ProteinSiD, SiDA):
    """Core's SiDA (SiD + the adversarial term on real fragments; D = the fake score's first
    layers, ``model.BackboneDenoiser.features``) with the same protein sampler and time
    draws as ``ProteinSiD``. The real fragments are the trainer's batches (centred, randomly
    rotated, nm: ``teacher.AugmentedFragments``); D's times follow the fake score's
    training density inside ``fake_t_range``."""


# ------------------------------------------------------------------------------ config

# SiDA on this teacher (objective sida; K = 16, batch 8, 32-64 samples, /tmp/runs/protein):
# - disc_head "pooled", head_lr_scale 100: the paper's channel mean never left chance (D loss
#   0.693 for 300 steps); a linear probe on the frozen first-half tokens separates real
#   fragments from SiD K = 16 samples (83-91 %), and the pooled, normalised head learns
#   fastest online (D loss 0.53 after 300 D-only steps vs 0.61 per position).
# - fake_warmup_steps 100: D reaches loss 0.35 before the generator moves (EDM2 script's
#   generator warm-up); without it D stays near chance once SiD starts moving the student.
# - adv_weight: 1e-3 broke the bonds (K = 16 CA-CA off 0.58 after 300 steps); on the refined
#   teacher 5e-5 (with EMA 0.99, ``SIDA_CONFIG``) beat the paper's 1e-4 (with EMA 0.95) at
#   K = 20 (EMA clash 0.31 vs 0.50 at step 300, 64 samples) and tied at K = 16 (0.55 both).
SIDA_DEFAULTS: dict[str, Any] = {
    "adv_weight": 5e-5,
    "disc_weight": 1.0,
    "disc_head": "pooled",
    "head_lr_scale": 100.0,
    "fake_warmup_steps": 100,
}

# Recipe settings that objective sida (the default) brings (the user's flags win). On the
# refined teacher SiDA trained at K = 20 and sampled on 18 of its times matches the
# 400-step teacher's geometry and SSE (BENCHMARKS.md, session 14, 5 training seeds, 512
# samples: clash 0.32-0.44, mean 0.37 vs 0.42, SSE TV 0.166 vs 0.19, CA-CA off 0.04-0.06 vs
# 0.12, Rg 1.11-1.20, mean 1.15 vs 1.15) with 22x fewer network evaluations (24-25x timed
# in turn). Trained at K = 18 or 16
# its clash rate stays at or above the teacher's (0.44, 0.50): the finer K = 20 grid trains
# a better student, whose two low-noise steps before the last can then be skipped. EMA 0.99
# averages over the swings of the adversarial game (samples alternate between compact and
# spread out every ~100 steps).
SIDA_CONFIG: dict[str, str] = {
    "student_steps": "20",
    "sample_steps": "18",
    "train.ema_decay": "0.99",
}


@dataclass
class EvalConfig:
    samples: int = 64  # backbones sampled from the student and from the teacher
    batch: int = 64  # samples per sampler call (same batch for both when timing)
    teacher: bool = True  # also sample the teacher (its many-step sampler) for comparison
    export: int = 4  # PDB files written per model under samples/
    seed: int = 1234  # sampling noise


def _train(**kw) -> TrainConfig:
    # Measured on the v2 teacher (K = 4 / 16, batch 8, 32 samples; BENCHMARKS.md):
    # - lr: the paper script's generator lr 5e-5 and fake-score lr 1e-4 (run_sid_proteina.sh
    #   --glr 5e-5 --lr 1e-4). At 2e-4 for both the K = 4 student's score gap grew again after
    #   step 150 and its Rg overshot (1.61 at step 300); 5e-5 / 1e-4 improved steadily
    #   (CA-CA off 0.65 -> 0.40 at noise 1). Adam beta1 0.9 (paper script) vs SiD's 0: same.
    # - ema_decay 0.95: SiD's EMA ramp-up (half-life 5 % of the images seen) is ~0.955 at
    #   300 steps; at lr 5e-5, 0.99 lagged the raw student at every check (K = 4 CA-CA off
    #   at noise 1: 0.51 vs 0.42 at step 150, 0.43 vs 0.40 at step 300).
    # - the fake-score lr applies through role_lr: --train.lr sets the generator's only.
    # - steps 300 at batch 8: batch 32 was no better per step (K = 4 off 0.45 vs 0.42 at
    #   step 150) at 4x the cost, and the K = 16 student drifts away from its good start
    #   (teacher at its K times) with more steps (off 0.01 at step 100, 0.06 at 300).
    base = dict(
        steps=300,
        batch_size=8,
        lr=5e-5,
        role_lr={"fake_score": 1e-4},
        ema_decay=0.95,
        log_every=50,
    )
    return TrainConfig(**{**base, **kw})


@dataclass
class SiDProteinConfig:
    # core objective: sida (SiD + an adversarial term on the real fragments; with its
    # SIDA_CONFIG settings the student that meets the 400-step teacher, BENCHMARKS.md session
    # 13) or sid (the paper's default; more clashes than the teacher here)
    objective: str = "sida"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # teacher and its data
    # K: the student's trained times (network evaluations per backbone unless sample_steps).
    # 16 for SiD: the only K near the 400-step teacher on this CPU budget (24x faster, better
    # bonds, more clashes); K <= 8 students stay broken (sessions 11-13, BENCHMARKS.md).
    # --objective sida sets 20 (SIDA_CONFIG)
    student_steps: int = 16
    # network evaluations per backbone at inference: 0 = all K trained times; N < K runs the
    # first N - 1 trained times and the last (``sampling.thin_times``); --objective sida sets 18
    sample_steps: int = 0
    noise_scale: float = 0.45  # inference-time noise modulation (paper scripts: 0.45)
    train_noise_scale: float = 1.0  # re-noising scale in training rollouts (paper: 1.0)
    sampler: str = "noise_modulated"  # student sampler (sampling.STUDENT_SAMPLERS)
    loss_times: LossTimesConfig = field(default_factory=LossTimesConfig)  # generator-loss t
    fake_t_range: tuple[float, float] = (0.02, 0.98)  # fake-score training t (paper tmin, tmax)
    # SiD's teacher: the base teacher fine-tuned on its own plausible low-temperature samples
    # (``refine``; the base teacher stays the reference in the evaluation)
    refine: RefineConfig = field(default_factory=RefineConfig)
    train: TrainConfig = field(default_factory=_train)  # distillation loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # sampling and metrics
    threads: int = 1  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# ------------------------------------------------------------------------------ recipe


class SIDRecipe:
    name = "protein-sid"
    summary = "SiD few-step CA-backbone generator with noise modulation (Xie et al. 2025)"
    config_cls = SiDProteinConfig
    supported_objectives = ("sid", "sida")

    def unsupported_reason(self, objective: str) -> str:
        return "this recipe is the SiD protein method; other objectives have no protein recipe"

    def config_defaults(self, objective: str) -> dict[str, str]:
        return SIDA_CONFIG if objective == "sida" else {}

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        # alpha: SiD / the protein paper's 1.2; t_range: the whole log range of PaperLossTimes
        out: dict[str, Any] = {"alpha": 1.2, "t_range": (0.0, 1.0)}
        if objective == "sida":
            out.update(SIDA_DEFAULTS)
        return out

    # --- pieces ---------------------------------------------------------------------------
    @staticmethod
    def student_times(cfg: SiDProteinConfig, steps: int | None = None) -> list[float]:
        from fewstep.protein.sampling import paper_times

        return paper_times(cfg.student_steps if steps is None else steps)

    @classmethod
    def inference_times(cls, cfg: SiDProteinConfig) -> list[float]:
        """The times the student samples on: ``sample_steps`` of its trained times."""
        from fewstep.protein.sampling import thin_times

        times = cls.student_times(cfg)
        return thin_times(times, cfg.sample_steps or len(times))

    @classmethod
    def check(cls, cfg: SiDProteinConfig, obj_cfg: SiDConfig) -> None:
        """Clear errors for settings this recipe owns (before any training starts)."""
        if obj_cfg.student_times:
            raise ValueError(
                "protein-sid sets the student's times from --student_steps (the paper's "
                "grid); leave --objective.student_times empty"
            )
        if cfg.student_steps < 1:
            raise ValueError(f"--student_steps must be >= 1, got {cfg.student_steps}")
        try:
            cls.inference_times(cfg)
        except ValueError as e:
            raise ValueError(
                f"--sample_steps {cfg.sample_steps} with --student_steps {cfg.student_steps}: "
                f"{e} (0 = all of them; --objective sida sets 18 for its K = 20)"
            ) from None

    def build_objective(self, cfg: SiDProteinConfig, obj_cfg: SiDConfig, teacher) -> ProteinSiD:
        from fewstep.protein.sampling import make_student_sampler

        self.check(cfg, obj_cfg)
        obj_cfg = dataclasses.replace(obj_cfg, student_steps=cfg.student_steps)
        times = self.student_times(cfg)
        sampler = make_student_sampler(cfg.sampler, times, cfg.train_noise_scale)
        loss_times = PaperLossTimes(cfg.loss_times)
        cls = ProteinSiDA if isinstance(obj_cfg, SiDAConfig) else ProteinSiD
        return cls(teacher, obj_cfg, sampler, loss_times, cfg.fake_t_range)

    def eval_sampler(self, cfg: SiDProteinConfig, times, noise_scale: float | None = None):
        from fewstep.protein.sampling import make_student_sampler

        gen = torch.Generator().manual_seed(cfg.eval.seed + 1)
        scale = cfg.noise_scale if noise_scale is None else noise_scale
        if len(times) == 1:  # the paper's one-step generator is not modulated (generate_onestep)
            scale = 1.0
        return make_student_sampler(cfg.sampler, times, scale, gen)

    # --- distill ------------------------------------------------------------------------
    def distill(self, cfg: SiDProteinConfig, obj_cfg: SiDConfig, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import Trainer
        from fewstep.protein.refine import load_refined_teacher
        from fewstep.protein.teacher import (
            AugmentedFragments,
            load_teacher,
            load_training_fragments,
        )

        self.check(cfg, obj_cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        teacher, tinfo = load_teacher(cfg.teacher, progress=cfg.train.progress)
        ca = load_training_fragments(cfg.teacher.length, cfg.teacher.stride)
        target, rinfo = teacher, None  # what SiD distils and the student starts from
        if cfg.refine.enabled:
            target, rinfo = load_refined_teacher(cfg.teacher, cfg.refine, cfg.train.progress)
        objective = self.build_objective(cfg, obj_cfg, target)
        t0 = time.perf_counter()
        trainer = Trainer(
            objective,
            trainable_copy(target),
            AugmentedFragments(ca),  # SiD: only the sample shape; SiDA: the real fragments
            cfg.train,
            out_dir,
            device=_device(cfg.device),
        )
        trainer.fit()
        train_seconds = time.perf_counter() - t0
        student = (trainer.ema if trainer.ema is not None else trainer.roles["student"]).cpu()
        meta = {
            "times": self.student_times(cfg),  # trained
            "sample_times": self.inference_times(cfg),
            "noise_scale": cfg.noise_scale,
            "sampler": cfg.sampler,
            "length": cfg.teacher.length,
            "alpha": obj_cfg.alpha,
        }
        self._save(out_dir, student, meta)
        metrics = self._evaluate(cfg, teacher.cpu(), student.eval(), meta, ca, out_dir)
        metrics.update(teacher_info=tinfo, refine_info=rinfo, train_seconds=train_seconds)
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, meta: dict) -> None:
        from fewstep.core.rundir import save_student

        save_student(out_dir, {"": student}, meta)

    def load(self, run_dir: Path):
        """(config, teacher, student, meta, training fragments Å) of a run folder."""
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.protein.model import build_denoiser
        from fewstep.protein.teacher import load_teacher, load_training_fragments

        cfg, _ = load_run_config(run_dir, self.config_cls)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        teacher, _ = load_teacher(cfg.teacher)
        state, meta = load_student(run_dir)
        student = build_denoiser(cfg.teacher.model)
        student.load_state_dict(state)
        ca = load_training_fragments(cfg.teacher.length, cfg.teacher.stride)
        return cfg, teacher, student.eval().requires_grad_(False), meta, ca

    # --- sampling and evaluation ------------------------------------------------------------
    @staticmethod
    def generate(sampler, denoiser, n: int, length: int, batch: int, seed: int):
        """(n, length, 3) samples in Å and the seconds spent in the sampler."""
        from fewstep.protein.model import NM_PER_ANGSTROM

        gen = torch.Generator().manual_seed(seed)
        out, seconds = [], 0.0
        for i in range(0, n, batch):
            noise = torch.randn(min(batch, n - i), length, 3, generator=gen)
            t0 = time.perf_counter()
            x = sampler.sample(denoiser, noise).x
            seconds += time.perf_counter() - t0
            out.append(x / NM_PER_ANGSTROM)
        return torch.cat(out), seconds

    def _evaluate(self, cfg, teacher, student, meta, ca: Tensor, out_dir: Path) -> dict:
        from fewstep.protein.metrics import evaluate_backbones
        from fewstep.protein.teacher import teacher_sampler

        ev, length = cfg.eval, cfg.teacher.length
        sampler = self.eval_sampler(cfg, saved_sample_times(meta), meta["noise_scale"])
        models = {"student": (student, sampler)}
        if ev.teacher:
            gen = torch.Generator().manual_seed(ev.seed + 2)
            models["teacher"] = (teacher, teacher_sampler(cfg.teacher, gen))
        out: dict[str, Any] = {"method": self.name, "length": length, "samples": ev.samples}
        with torch.no_grad():
            for name, (model, sampler) in models.items():
                x, seconds = self.generate(sampler, model, ev.samples, length, ev.batch, ev.seed)
                m = {k: _plain(v) for k, v in evaluate_backbones(x, ca).items()}
                m["samples_per_second"] = ev.samples / max(seconds, 1e-9)
                m["nfe"] = _nfe(sampler, model)
                out[name] = m
                self._export(x[: ev.export], out_dir / "samples", name)
        if "teacher" in out:
            out["speedup"] = out["student"]["samples_per_second"] / max(
                out["teacher"]["samples_per_second"], 1e-12
            )
        return out

    @staticmethod
    def _export(x: Tensor, folder: Path, prefix: str) -> list[Path]:
        from fewstep.protein.export import write_structure

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, ca in enumerate(x):
            paths.append(Path(write_structure(folder / f"{prefix}_{i:03d}.pdb", ca.numpy())))
        return paths

    # --- CLI commands -------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Write ``n`` student backbones as PDB files into ``out`` (a folder; default
        ``run_dir/samples_<n>``). ``steps``: network evaluations, ``steps`` of the trained
        times (``sampling.thin_times``; default: the run's ``sample_steps``)."""
        from fewstep.protein.sampling import thin_times

        cfg, _, student, meta, _ = self.load(run_dir)
        times = saved_sample_times(meta) if steps is None else thin_times(meta["times"], steps)
        sampler = self.eval_sampler(cfg, times, meta["noise_scale"])
        with torch.no_grad():
            x, _ = self.generate(sampler, student, n, cfg.teacher.length, cfg.eval.batch, 0)
        folder = Path(out) if out is not None else Path(run_dir) / f"samples_{n}"
        self._export(x, folder, "student")
        return folder

    def evaluate(self, run_dir: Path) -> dict:
        cfg, teacher, student, meta, ca = self.load(run_dir)
        return self._evaluate(cfg, teacher, student, meta, ca, Path(run_dir))

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name}")
        rows = [{"model": k, **m[k]} for k in ("student", "teacher") if k in m]
        rep.add_table(f"Samples of length {m['length']} (n = {m['samples']})", rows)
        if "speedup" in m:
            rep.add_text(
                "Speed",
                f"student {m['student']['nfe']} NFE vs teacher {m['teacher']['nfe']} NFE: "
                f"{m['speedup']:.1f}x more samples per second (same batch, same thread count).",
            )
        files = (
            sorted((run_dir / "samples").glob("*.pdb")) if (run_dir / "samples").exists() else []
        )
        if files:
            rep.add_text("Exported structures", "\n".join(f.name for f in files))
        return rep.write()


def saved_sample_times(meta: dict) -> list[float]:
    """The inference times a run saved (runs before ``sample_steps``: the trained times)."""
    return meta.get("sample_times", meta["times"])


def _nfe(sampler, model) -> int:
    """Network evaluations per sample of ``sampler``."""
    times = getattr(sampler, "times", None)
    if hasattr(times, "numel"):  # the teacher's schedule has steps + 1 points
        return (int(times.numel()) - 1) * model.evals_per_call
    return len(times) * model.evals_per_call


def _plain(v):
    """JSON-ready metric value."""
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return v
    return v


SID = SIDRecipe()
