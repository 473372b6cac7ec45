"""Evaluation, export and report of the digits recipe."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from fewstep.core.training import EvalResult

GRID = dict(nrow=10, upscale=4, pad=2, pad_value=128)


def _labels(n: int) -> Tensor:
    return torch.arange(n) % 10


def _noise(n: int, seed: int) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(model, sampler, n: int, seed: int = 1, batch: int = 500) -> tuple[Tensor, int]:
    """n samples with labels 0..9 repeating; returns (samples on CPU, NFE per sample)."""
    dev = next(model.parameters()).device
    outs, nfe = [], 0
    noise, labels = _noise(n, seed), _labels(n)
    for i in range(0, n, batch):
        s = sampler.sample(model, noise[i : i + batch].to(dev), labels[i : i + batch].to(dev))
        outs.append(s.x.float().cpu())
        nfe = s.nfe
    return torch.cat(outs), nfe


class Scorer:
    """FD on the cached digits classifier's features against all 1,797 real digits, and the
    classifier's accuracy on the requested labels."""

    def __init__(self, classifier_steps: int = 1500):
        from fewstep.core.metrics import gaussian_stats
        from fewstep.image.classifier import load_classifier
        from fewstep.image.digits import load_digits_tensors

        self.clf, self.clf_info = load_classifier(steps=classifier_steps)
        self.real, self.real_labels = load_digits_tensors()
        self.ref_stats = gaussian_stats(self.clf.features(self.real))

    @torch.no_grad()
    def score(self, x: Tensor) -> dict:
        from fewstep.core.metrics import frechet_from_stats, gaussian_stats

        labels = _labels(len(x))
        pred = self.clf(x).argmax(1)
        per_class = [float((pred[labels == c] == c).float().mean()) for c in range(10)]
        return {
            "fd": frechet_from_stats(*gaussian_stats(self.clf.features(x)), *self.ref_stats),
            "class_accuracy": float((pred == labels).float().mean()),
            "per_class_accuracy": per_class,
        }


class Probe:
    """The trainer's evaluator: a small sample of the EMA student, FD and accuracy, a grid,
    and a warning when the student collapses (diversity far below the teacher's)."""

    def __init__(self, cfg, teacher):
        from fewstep.image.teacher import guided, teacher_sampler

        self.cfg = cfg
        self.scorer = Scorer(cfg.classifier_steps)
        self.teacher_x, _ = generate(
            guided(teacher, cfg.guidance_scale),
            teacher_sampler(cfg.teacher),
            cfg.probe_samples,
            seed=7,
        )

    def __call__(self, trainer) -> EvalResult:
        from fewstep.core.metrics import collapse_check

        model = trainer.sampling_denoiser(use_ema=True)
        x, _ = generate(model, trainer.objective.student_sampler(), self.cfg.probe_samples, 7)
        s = self.scorer.score(x)
        warnings = []
        problem = collapse_check(x, self.teacher_x)
        if problem is not None:
            warnings.append(f"student collapsed: {problem}")
        return EvalResult(
            metrics={"fd": s["fd"], "class_accuracy": s["class_accuracy"]},
            warnings=warnings,
            images={"student": x[:100]},
        )


def final_metrics(cfg, teacher, student, student_sampler, out_dir: Path | None) -> dict:
    """Teacher (many steps) and student (few steps) side by side on the same noise."""
    from fewstep.core.metrics import collapse_check, time_per_sample
    from fewstep.core.report import save_image_grid
    from fewstep.image.teacher import guided, teacher_sampler

    scorer = Scorer(cfg.classifier_steps)
    n = cfg.eval_samples
    gteacher, tsampler = guided(teacher, cfg.guidance_scale), teacher_sampler(cfg.teacher)
    tx, t_nfe = generate(gteacher, tsampler, n)
    sx, s_nfe = generate(student, student_sampler, n)
    ts, ss = scorer.score(tx), scorer.score(sx)
    real_half = scorer.score(
        scorer.real[
            torch.randperm(len(scorer.real), generator=torch.Generator().manual_seed(0))[:n]
        ]
    )
    dev = next(student.parameters()).device

    def timer(model, sampler):
        def fn(b):
            sampler.sample(model, _noise(b, 3).to(dev), _labels(b).to(dev))

        m = min(200, n)
        return time_per_sample(fn, n_samples=m, batch_size=m, warmup=1, repeats=3)

    t_speed, s_speed = timer(gteacher, tsampler), timer(student, student_sampler)
    collapse = collapse_check(sx, tx)
    metrics = {
        "teacher_nfe": t_nfe,
        "student_nfe": s_nfe,
        "teacher_fd": ts["fd"],
        "student_fd": ss["fd"],
        "real_subset_fd": real_half["fd"],
        "fd_ratio": ss["fd"] / max(ts["fd"], 1e-12),
        "teacher_class_accuracy": ts["class_accuracy"],
        "student_class_accuracy": ss["class_accuracy"],
        "teacher_per_class_accuracy": ts["per_class_accuracy"],
        "student_per_class_accuracy": ss["per_class_accuracy"],
        "teacher_samples_per_second": t_speed["samples_per_second"],
        "student_samples_per_second": s_speed["samples_per_second"],
        "speedup": s_speed["samples_per_second"] / t_speed["samples_per_second"],
        "classifier_heldout_accuracy": scorer.clf_info.get("heldout_accuracy"),
        "eval_samples": n,
        "collapse": collapse,
    }
    if out_dir is not None:
        for name, x in (("teacher", tx), ("student", sx)):
            x = x[:100]
            order = torch.argsort(_labels(len(x)), stable=True)  # rows = classes
            save_image_grid(out_dir / f"{name}_samples.png", x, **GRID)
            save_image_grid(out_dir / f"{name}_by_class.png", x[order], **GRID)
    return metrics


def save_student(out_dir: Path, trainer, cfg) -> Path:
    """The EMA student plus fewstep's sampling metadata in ``out_dir/student``.

    A student that is still a plain diffusers UNet is saved as a diffusers folder (loadable
    with ``UNet2DModel.from_pretrained``); a student the objective restructured (LoRA,
    adapters, experts, a second time input, ...) is saved as ``student.safetensors`` holding
    the student role's state, rebuilt on load by the objective from the teacher."""
    from safetensors.torch import save

    from fewstep.core.io import atomic_write_bytes, atomic_write_json
    from fewstep.core.models import DiffusersUNetDenoiser
    from fewstep.core.objectives.common import unguided

    folder = Path(out_dir) / "student"
    ema = trainer.ema if trainer.ema is not None else trainer.roles["student"]
    teacher_keys = set(unguided(trainer.objective.teacher).state_dict())
    if isinstance(ema, DiffusersUNetDenoiser) and set(ema.state_dict()) == teacher_keys:
        ema.unet.save_pretrained(folder, safe_serialization=True)
        fmt = "diffusers"
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        atomic_write_bytes(folder / STUDENT_FILE, save(state))
        fmt = "fewstep"
    meta = {"format": fmt, "objective": trainer.objective.name}
    meta.update(path=ema.path.name, prediction=ema.prediction)
    atomic_write_json(folder / "fewstep.json", meta)
    return folder


STUDENT_FILE = "student.safetensors"


def load_student(run_dir: Path, steps: int | None = None):
    """(student denoiser ready to sample, recipe config, student sampler) from a run folder;
    ``steps`` overrides the number of student steps the sampler takes."""
    import dataclasses

    from fewstep.core.cli import RUN_CONFIG
    from fewstep.core.config import from_dict
    from fewstep.image.recipes.digits import DigitsConfig, make_objective
    from fewstep.image.teacher import load_teacher

    run_dir = Path(run_dir)
    resolved = json.loads((run_dir / RUN_CONFIG).read_text())
    cfg = from_dict(DigitsConfig, resolved["config"])
    meta = json.loads((run_dir / "student" / "fewstep.json").read_text())
    teacher, _ = load_teacher(cfg.teacher, progress=False)
    obj = make_objective(cfg, teacher, resolved["objective_config"], with_reward=False)
    if steps is not None:
        obj.config = dataclasses.replace(obj.config, student_steps=steps, student_times=())
    if meta.get("format", "diffusers") == "diffusers":
        from diffusers import UNet2DModel

        from fewstep.core.models import DiffusersUNetDenoiser
        from fewstep.core.paths import make_path

        unet = UNet2DModel.from_pretrained(run_dir / "student", low_cpu_mem_usage=False)
        student = DiffusersUNetDenoiser(unet, make_path(meta["path"]), meta["prediction"])
    else:
        from safetensors.torch import load_file

        from fewstep.core.models import trainable_copy

        student = obj.build_roles(trainable_copy(teacher), example_batch())["student"]
        student.load_state_dict(load_file(str(run_dir / "student" / STUDENT_FILE)))
    student = student.eval().requires_grad_(False)
    return obj.student_denoiser({"student": student}), cfg, obj.student_sampler()


def example_batch(n: int = 2):
    """A small real batch (for objectives that size their roles from one)."""
    from fewstep.core.batch import Batch, StepRNG
    from fewstep.image.digits import load_digits_tensors

    x, y = load_digits_tensors()
    rng = StepRNG(0, 0, 0, n, 0, n)
    return Batch(x[:n], y[:n], rng, extras={"sample_shape": tuple(x.shape[1:])})


def write_report(run_dir: Path) -> Path:
    from fewstep.core.report import Report, save_line_plot

    m = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    rep = Report(run_dir, f"fewstep image-digits: {cfg['config']['objective']}")
    for w in m.get("warnings", []):
        rep.add_warning(w)
    if m.get("collapse"):
        rep.add_warning(f"final student looks collapsed: {m['collapse']}")
    rep.add_table(
        "Teacher vs student",
        [
            {
                "model": "teacher",
                "NFE": m["teacher_nfe"],
                "FD": m["teacher_fd"],
                "class accuracy": m["teacher_class_accuracy"],
                "samples/s": m["teacher_samples_per_second"],
            },
            {
                "model": "student",
                "NFE": m["student_nfe"],
                "FD": m["student_fd"],
                "class accuracy": m["student_class_accuracy"],
                "samples/s": m["student_samples_per_second"],
            },
            {"model": "real digits (subset)", "FD": m["real_subset_fd"]},
        ],
    )
    rep.add_text(
        "Ratios",
        f"student FD / teacher FD = {m['fd_ratio']:.3f}; "
        f"student throughput / teacher throughput = {m['speedup']:.1f}x; "
        f"distillation {m['distill_seconds']:.0f} s vs teacher training "
        f"{(m.get('teacher_train_seconds') or float('nan')):.0f} s (cached: may be "
        "from an earlier run).",
    )
    rep.add_table(
        "Per-class accuracy of the digits classifier on samples",
        [
            {
                "class": c,
                "teacher": m["teacher_per_class_accuracy"][c],
                "student": m["student_per_class_accuracy"][c],
            }
            for c in range(10)
        ],
    )
    rep.add_image(
        f"Teacher, {m['teacher_nfe']} NFE (column = class)", run_dir / "teacher_samples.png"
    )
    rep.add_image(
        f"Student, {m['student_nfe']} NFE (column = class)", run_dir / "student_samples.png"
    )
    rep.add_image("Teacher by class (row = class)", run_dir / "teacher_by_class.png")
    rep.add_image("Student by class (row = class)", run_dir / "student_by_class.png")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    series = {
        k: [(r["step"], r[k]) for r in log if k in r]
        for k in sorted({k for r in log for k in r if k.startswith("loss/")})
    }
    save_line_plot(
        run_dir / "loss_curves.png", series, title="losses", xlabel="step", ylabel="loss"
    )
    rep.add_image("Loss curves", run_dir / "loss_curves.png")
    state = _latest_history(run_dir)
    fd_curve = [(r["step"], r["eval/fd"]) for r in state if "eval/fd" in r]
    if fd_curve:
        save_line_plot(
            run_dir / "probe_fd.png",
            {"student FD (probe)": fd_curve},
            title="FD during training (EMA student)",
            xlabel="step",
            ylabel="FD",
        )
        rep.add_image("FD during training", run_dir / "probe_fd.png")
    rep.add_text(
        "Classifier",
        f"held-out accuracy of the digits classifier: {m['classifier_heldout_accuracy']:.3f}",
    )
    return rep.write()


def _latest_history(run_dir: Path) -> list[dict]:
    from fewstep.core.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return []
    return json.loads((path / "state.json").read_text()).get("history", [])
