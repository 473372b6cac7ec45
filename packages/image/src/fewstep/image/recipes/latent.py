"""``fewstep distill image-latent --teacher PIPELINE_FOLDER --prompts FILE`` (or ``--images
DIR``): a text-to-image diffusers pipeline (Stable-Diffusion-style UNet, or SD3-style flow
transformer) distilled in latent space on its own cached text embeddings, prompt-only or
on captioned images encoded by its VAE, into a few-step student.

The run folder gets ``pipeline/`` (the teacher's pipeline with the student's network and a
stock few-step scheduler; ``DiffusionPipeline.from_pretrained`` loads it), the resolved
config, ``metrics.json``, teacher/student sample grids and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.training import TrainConfig
from fewstep.image import multi_student as MS

PIPELINE_DIR = "pipeline"  # the student as a whole pipeline (LoRA merged)
LORA_DIR = "lora"  # LoRA students: the adapters alone, for the teacher's pipeline
PROMPTS_FILE = "prompts.txt"  # the run's prompts (the prompt file's, or the image captions)
# HiPA's default LoRA rank: rank 16 on the attention projections is ~3.2 M parameters on
# Stable Diffusion 1.5, the size the paper reports (3.3 M); its exact rank is not published.
HIPA_LORA_RANK = 16


@dataclass
class EvalConfig:
    inception_weights: str = ""  # pytorch-fid FID Inception .pth ("" = FID/KID skipped)
    clip_folder: str = ""  # local CLIPModel folder ("" = CLIP score skipped)


@dataclass
class LatentConfig:
    objective: str = "dmd2"  # distillation objective (see `fewstep list`)
    teacher: str = ""  # diffusers pipeline folder (with model_index.json); required
    prompts: str = ""  # text file, one prompt per line (prompt-only distillation)
    images: str = ""  # images with same-name .txt captions: a folder or webdataset .tar shards
    resolution: int = 0  # image side in pixels; 0 = the denoiser's own sample size
    guidance_scale: float = 1.0  # teacher CFG scale (1 = off)
    guidance_max: float = 0.0  # > guidance_scale: each sample draws its scale in between
    negative_prompt: str = ""  # CFG's unconditional prompt (empty = the usual null prompt)
    lora_rank: int = 0  # > 0: the student trains LoRA adapters only (peft); 0 = full weights
    lora_alpha: float = 0.0  # LoRA scale numerator (0 = the rank)
    teacher_steps: int = 25  # teacher's sampling steps in the report (pipeline scheduler)
    sample_prompts: int = 8  # prompts drawn in the report's grids and timed
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1000, batch_size=8, lr=1e-5, ema_decay=0.99, checkpoint_every=250
        )
    )  # distillation loop
    device: str = "auto"  # cpu, cuda, or auto
    gradient_checkpointing: bool = False  # recompute diffusers activations in backward (memory)
    nasa_negative_prompt: str = ""  # SNOOPI NASA negative prompt for student samples ("" = off)
    nasa_alpha: float = 0.0  # NASA strength: Z+ - alpha Z- in cross-attention (0 = off)
    diversity_teacher_steps: int = 0  # K > 0: eval hybrid = K teacher Euler steps, then student
    diversity_seeds: int = 4  # seeds per prompt for the diversity metric
    eval: EvalConfig = field(default_factory=EvalConfig)  # FID/KID/CLIP weights


def _check(cfg: LatentConfig) -> None:
    if not cfg.teacher:
        raise ValueError("image-latent needs --teacher PATH (a diffusers pipeline folder)")
    if not (cfg.prompts or cfg.images):
        raise ValueError(
            "image-latent needs --prompts FILE (one prompt per line) or --images DIR (images "
            "with same-name .txt captions)"
        )


class LatentRecipe:
    name = "image-latent"
    summary = "text-to-image diffusers pipeline (UNet or flow transformer) -> few-step student"
    config_cls = LatentConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        from fewstep.image.pipelines import LORA_TARGETS

        # a LoRA fake score (--objective.fake_lora_rank) adapts the attention projections,
        # as the LoRA student does
        dmd2 = {"fake_lora_targets": LORA_TARGETS}
        return {"dmd2": dmd2, "multi_student": dmd2}.get(objective, {})

    def config_defaults(self, objective: str) -> dict[str, str]:
        dmd2 = {"train.betas": "0.0,0.99"}  # as on digits
        hipa = {"lora_rank": str(HIPA_LORA_RANK)}  # HiPA trains adapters only
        return {"dmd2": dmd2, "multi_student": dmd2, "hipa": hipa}.get(objective, {})

    # ---------------------------------------------------------------------------------
    def distill(self, cfg: LatentConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core import distributed as D
        from fewstep.core.models import GuidedDenoiser, trainable_copy
        from fewstep.core.training import Trainer
        from fewstep.image import pipelines as P
        from fewstep.image.prompts import cached_embeddings, null_cond_fn

        _check(cfg)
        out_dir = Path(out_dir)
        device = D.setup(cfg.device).device
        pipe = P.load_pipeline(cfg.teacher, device)
        teacher_id = str(Path(cfg.teacher).resolve())
        base, msd = P.teacher_denoiser(pipe), None
        if cfg.objective in MS.OBJECTIVES:  # K students: prompts become routed labels
            msd = multi_student_setup(cfg, pipe, teacher_id, obj_cfg)
            data, prompts, null, obj_cfg, base = (
                msd.data,
                msd.prompts,
                msd.null,
                msd.obj_cfg,
                msd.wrap(base),
            )
        else:
            data, prompts = make_data(cfg, pipe, teacher_id)
            null = cached_embeddings(pipe, [cfg.negative_prompt], teacher_id)
        (out_dir / PROMPTS_FILE).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / PROMPTS_FILE).write_text("\n".join(prompts) + "\n")
        teacher = GuidedDenoiser(base, guidance(cfg), null_cond_fn(null))
        if not obj_cfg.student_times:  # train on the grid the exported scheduler samples
            times = P.student_times(pipe, obj_cfg.student_steps)
            obj_cfg = dataclasses.replace(obj_cfg, student_times=times)
        objective = make_objective(cfg.objective, teacher, obj_cfg)
        if objective.needs_data and not cfg.images:
            raise ValueError(
                f"{cfg.objective} with these options needs real images: give --images DIR "
                "(images with same-name .txt captions) or choose a data-free objective"
            )
        OBJECTIVE_SETUP.get(cfg.objective, _no_setup)(cfg, pipe, objective)
        student = trainable_copy(teacher.base)
        if cfg.lora_rank:
            P.add_lora(getattr(student, P.network_name(pipe)), cfg.lora_rank, cfg.lora_alpha)
        t0 = time.perf_counter()
        trainer = Trainer(objective, student, data, cfg.train, out_dir, device=device)
        # the student and any fake score / critic recompute activations in backward
        ckpt = enable_gradient_checkpointing(trainer.roles) if cfg.gradient_checkpointing else []
        trainer.fit()
        distill_seconds = time.perf_counter() - t0
        if not trainer.dist.is_main:
            return {}
        ema = trainer.sampling_denoiser(use_ema=True)
        times = tuple(obj_cfg.student_times)
        if msd is not None:  # K pipelines and the routing (a MultiStudentPipeline folder)
            MS.export_students(pipe, ema, out_dir / PIPELINE_DIR, times, msd.routing)
        else:
            net = getattr(ema, P.network_name(pipe))
            P.export_student(pipe, net, out_dir / PIPELINE_DIR, times)
            if P.has_lora(net):
                P.save_lora(pipe, net, out_dir / LORA_DIR)
        metrics = evaluate_pipelines(cfg, pipe, out_dir, prompts)
        metrics.update(distill_seconds=distill_seconds, distill_steps=cfg.train.steps)
        metrics.update(gradient_checkpointing_roles=ckpt)
        from fewstep.core.io import atomic_write_json

        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        from fewstep.core.report import save_image_grid
        from fewstep.image import pipelines as P
        from fewstep.image.prompts import read_prompts

        cfg = _load_config(run_dir)
        pipe = P.load_pipeline(Path(run_dir) / PIPELINE_DIR)
        prompts = read_prompts(Path(run_dir) / PROMPTS_FILE)
        call = P.pipeline_kwargs(Path(run_dir) / PIPELINE_DIR, steps)
        cfg_prompts = [prompts[i % len(prompts)] for i in range(n)]
        c = cfg["config"]
        if c.get("nasa_alpha") and c.get("nasa_negative_prompt"):  # SNOOPI NASA
            images = nasa_images(pipe, cfg_prompts, c, call)
        else:
            images = run_pipeline(pipe, cfg_prompts, 0, 1.0, c["resolution"], **call)
        out = out or Path(run_dir) / f"samples_{n}x{call['num_inference_steps']}nfe.png"
        return save_image_grid(out, images * 2 - 1, nrow=min(n, 8), upscale=4)

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.core.config import from_dict
        from fewstep.image import pipelines as P
        from fewstep.image.prompts import read_prompts

        raw = _load_config(run_dir)
        cfg = from_dict(LatentConfig, raw["config"])
        pipe = P.load_pipeline(cfg.teacher)
        prompts = read_prompts(Path(run_dir) / PROMPTS_FILE)
        return evaluate_pipelines(cfg, pipe, Path(run_dir), prompts)

    def report(self, run_dir: Path) -> Path:
        import json

        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, "fewstep image-latent")
        rep.add_table(
            "Teacher vs student (the exported diffusers pipeline)",
            [
                {"model": "teacher", "NFE": m["teacher_nfe"], "s/image": m["teacher_s_per_image"]},
                {"model": "student", "NFE": m["student_nfe"], "s/image": m["student_s_per_image"]},
            ],
        )
        rep.add_image("Teacher samples", run_dir / "teacher_samples.png")
        rep.add_image("Student samples", run_dir / "student_samples.png")
        rep.add_image(
            "Teacher's x0 prediction along its trajectory",
            run_dir / "teacher_x0_trajectory.png",
            "rows: prompts; columns: steps from noise (left) to data (right)",
        )
        extra = [
            {"metric": k, "value": v}
            for k, v in m.items()
            if k.startswith(("diversity_", "hybrid_", "fid_", "kid_", "clip_score_"))
        ]
        if extra:
            rep.add_table("Diversity (teacher-first hybrid) and image metrics", extra)
        for note in ("fid_note", "clip_note", "nasa_note"):
            if m.get(note):
                rep.add_text(note, m[note])
        if (run_dir / "student_nasa_samples.png").exists():
            rep.add_image(
                "Student samples with NASA negative prompt",
                run_dir / "student_nasa_samples.png",
                "SNOOPI's Negative-Away Steer Attention (same prompts and seed as above)",
            )
        return rep.write()


def multi_student_setup(cfg: LatentConfig, pipe, teacher_id: str, obj_cfg):
    """Multi-student runs: prompts partitioned by a ``group<TAB>prompt`` column or k-means
    (see ``fewstep.image.multi_student``); prompt-only."""
    if cfg.images or not cfg.prompts:
        raise ValueError(
            f"{cfg.objective} on text pipelines needs --prompts FILE (lines 'group<TAB>prompt', "
            "or plain prompts split by k-means), not --images"
        )
    res = cfg.resolution or None
    return MS.setup(cfg.prompts, pipe, teacher_id, obj_cfg, cfg.negative_prompt, res)


def make_data(cfg: LatentConfig, pipe, teacher_id: str):
    """(data source, prompts for the report): image latents with their captions' embeddings
    when ``images`` is set (captions are the report's prompts unless ``prompts`` is set),
    else prompt-only batches over the prompt file."""
    from fewstep.image import pipelines as P
    from fewstep.image.images import PairedData, cached_latents
    from fewstep.image.prompts import PromptData, cached_embeddings, read_prompts

    prompts = read_prompts(cfg.prompts) if cfg.prompts else []
    shape = P.latent_shape(pipe, cfg.resolution or None)
    if not cfg.images:
        return PromptData(cached_embeddings(pipe, prompts, teacher_id), shape), prompts
    pixels = cfg.resolution or shape[-1] * P.vae_factor(pipe)
    latents, captions = cached_latents(pipe, cfg.images, pixels, teacher_id)
    data = PairedData(latents, cached_embeddings(pipe, captions, teacher_id))
    return data, prompts or captions


def guidance(cfg: LatentConfig) -> float | tuple[float, float]:
    """The teacher's CFG scale: fixed, or a per-sample range (SNOOPI's random guidance)."""
    if cfg.guidance_max > cfg.guidance_scale:
        return (cfg.guidance_scale, cfg.guidance_max)
    return cfg.guidance_scale


def x0_trajectory(cfg: LatentConfig, pipe, prompts: list[str], out: Path, columns: int = 8):
    """The teacher's x0 prediction along its own (DDIM / Euler) trajectory, decoded: one row
    per prompt, ``columns`` steps from noise to data (the "diffusion target")."""
    from fewstep.core.models import GuidedDenoiser
    from fewstep.core.report import save_image_grid
    from fewstep.core.samplers import EulerSampler
    from fewstep.image import pipelines as P
    from fewstep.image.prompts import null_cond_fn

    null = P.encode_prompts(pipe, [cfg.negative_prompt])
    teacher = GuidedDenoiser(P.teacher_denoiser(pipe), guidance(cfg), null_cond_fn(null))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(prompts), *P.latent_shape(pipe, cfg.resolution or None), generator=g)
    cond = P.encode_prompts(pipe, prompts)
    traj = EulerSampler(cfg.teacher_steps).x0_trajectory(teacher, noise.to(pipe.device), cond)
    keep = sorted({round(i * (len(traj) - 1) / max(columns - 1, 1)) for i in range(columns)})
    grid = torch.stack([P.decode(pipe, traj[i]) for i in keep], dim=1)  # (prompts, steps, ...)
    return save_image_grid(out, grid.flatten(0, 1), nrow=len(keep), upscale=4)


def _load_config(run_dir: Path) -> dict:
    import json

    from fewstep.core.cli import RUN_CONFIG

    return json.loads((Path(run_dir) / RUN_CONFIG).read_text())


def make_objective(name: str, teacher, obj_cfg):
    """The objective ``name`` on ``teacher``. Objectives that need a reward function (found
    from the objective itself: its ``needs_reward`` flag, or a constructor that refuses to
    run without one under this config) are refused with a clear error: image-latent has no
    reward model to give them."""
    from fewstep.core.config import from_dict
    from fewstep.core.objectives import get_objective

    cls = get_objective(name)
    if isinstance(obj_cfg, dict):
        obj_cfg = from_dict(cls.config_cls, obj_cfg)
    try:
        return cls(teacher, obj_cfg)
    except ValueError as err:
        if not _runs_with_a_reward(cls, teacher, obj_cfg):
            raise
        raise ValueError(
            f"image-latent cannot run objective {name!r} with these options: it needs a reward "
            "function reward(x0, cond) -> (B,) scores, and image-latent has no reward model to "
            f"give it; choose an objective without one (see `fewstep list`). ({name} says: {err})"
        ) from err


def _unavailable_reward(x0, cond):  # never called: only probes a constructor
    raise RuntimeError("image-latent has no reward model")


def _runs_with_a_reward(cls, teacher, obj_cfg) -> bool:
    """Whether the objective, refused without a reward, is accepted with one: then the reward
    is what it lacks (not some other option)."""
    try:
        cls(teacher, obj_cfg, reward=_unavailable_reward)
    except ValueError:
        return False
    return True


# --- per-objective wiring ------------------------------------------------------------------
def _no_setup(cfg: LatentConfig, pipe, objective) -> None:
    return None


def setup_hipa(cfg: LatentConfig, pipe, objective) -> None:
    """HiPA (Zhang & Hooi 2023) trains low-rank adapters only: refuse full-weight runs (the
    recipe's default rank is HIPA_LORA_RANK; ``--lora-rank 0`` is an explicit request for full
    weights, which is not HiPA), and let the loss act on decoded images, as the paper's
    does, through a differentiable VAE decoder (``--objective.pixel_space false`` keeps it
    on the latents, which needs far less memory)."""
    if cfg.lora_rank < 1:
        raise ValueError(
            "objective 'hipa' trains low-rank adapters only (its frozen base model is the "
            f"method's premise): give --lora-rank R >= 1 (default {HIPA_LORA_RANK}), not "
            f"{cfg.lora_rank}"
        )
    if objective.config.lora_rank:
        raise ValueError(
            "image-latent adds the student's LoRA adapters itself: use --lora-rank, not "
            "--objective.lora_rank"
        )
    if objective.config.pixel_space:
        pipe.vae.requires_grad_(False)  # gradients pass through the decoder, never into it
        objective.decode_fn = vae_decoder(pipe)


def vae_decoder(pipe):
    """Differentiable ``fn(latents) -> images in about [-1, 1]`` (the inverse of the VAE's
    shift and scale, as ``pipelines.decode`` but with gradient and without clamping)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor

    def decode(latents):
        z = latents.to(vae.dtype) / scale + shift
        return vae.decode(z).sample.float()

    return decode


OBJECTIVE_SETUP = {"hipa": setup_hipa}  # objective name -> fn(cfg, pipe, objective)


@torch.no_grad()
def run_pipeline(pipe, prompts, seed: int, guidance=1.0, resolution=0, negative="", **call):
    """Images in [0, 1] (N, 3, H, W) from a diffusers pipeline, seeded; ``resolution`` 0
    keeps the pipeline's default size; ``call`` holds ``num_inference_steps`` (and
    ``sigmas``, ...)."""
    from fewstep.image.pipelines import call_kwargs

    g = torch.Generator(device="cpu").manual_seed(seed)
    call = {**call_kwargs(pipe), **call}  # e.g. PixArt / SANA: no resolution binning
    guidance = call.pop("guidance_scale", guidance)  # a Flux student's embedded guidance
    if resolution:
        call.update(height=resolution, width=resolution)
    if negative and guidance > 1:
        call["negative_prompt"] = [negative] * len(prompts)
    out = pipe(prompts, guidance_scale=guidance, generator=g, output_type="pt", **call)
    return out.images.float().cpu()


def evaluate_pipelines(cfg, teacher_pipe, run_dir: Path, prompts) -> dict:
    """Teacher pipeline (``teacher_steps``) beside the exported student pipeline on the same
    prompts and seed: grids and seconds per image."""
    from fewstep.core.report import save_image_grid
    from fewstep.image import pipelines as P

    student_pipe = P.load_pipeline(run_dir / PIPELINE_DIR, teacher_pipe.device)
    sample = [prompts[i % len(prompts)] for i in range(cfg.sample_prompts)]
    rows, images_by = {}, {}
    for name, pipe, call, w, neg in (
        ("teacher", teacher_pipe, {"num_inference_steps": cfg.teacher_steps},
         cfg.guidance_scale, cfg.negative_prompt),
        ("student", student_pipe, P.pipeline_kwargs(run_dir / PIPELINE_DIR), 1.0, ""),
    ):  # fmt: skip
        run_pipeline(pipe, sample[:1], 0, w, cfg.resolution, neg, **call)  # warm-up
        t0 = time.perf_counter()
        images = run_pipeline(pipe, sample, 0, w, cfg.resolution, neg, **call)
        rows[name] = {
            "nfe": call["num_inference_steps"],
            "s": (time.perf_counter() - t0) / len(sample),
        }
        save_image_grid(run_dir / f"{name}_samples.png", images * 2 - 1, nrow=8, upscale=4)
        images_by[name] = images
    x0_trajectory(cfg, teacher_pipe, sample[:2], run_dir / "teacher_x0_trajectory.png")
    metrics = {
        "teacher_nfe": rows["teacher"]["nfe"] * (2 if cfg.guidance_scale > 1 else 1),
        "student_nfe": rows["student"]["nfe"],
        "teacher_s_per_image": rows["teacher"]["s"],
        "student_s_per_image": rows["student"]["s"],
        "speedup": rows["teacher"]["s"] / rows["student"]["s"],
    }
    metrics.update(extra_evaluations(cfg, teacher_pipe, student_pipe, run_dir, sample, images_by))
    return metrics


def extra_evaluations(cfg, teacher_pipe, student_pipe, run_dir: Path, prompts, images_by) -> dict:
    """The optional evaluations: NASA student grid, teacher-first diversity, and FID / KID /
    CLIP score (absent with a note when no weights were given)."""
    from fewstep.core.report import save_image_grid
    from fewstep.image import pipelines as P
    from fewstep.image.eval_hooks import image_metrics

    out: dict = {}
    if cfg.nasa_alpha and cfg.nasa_negative_prompt:
        if P.network_name(student_pipe) == "unet":
            call = P.pipeline_kwargs(run_dir / PIPELINE_DIR)
            images = nasa_images(student_pipe, prompts, dataclasses.asdict(cfg), call)
            save_image_grid(run_dir / "student_nasa_samples.png", images * 2 - 1, nrow=8, upscale=4)
        else:
            out["nasa_note"] = "NASA needs UNet cross-attention; this pipeline uses joint attention"
    if cfg.diversity_teacher_steps > 0:
        out.update(diversity_evaluation(cfg, teacher_pipe, student_pipe, run_dir, prompts))
    ev = cfg.eval
    out.update(image_metrics(images_by, prompts, ev.inception_weights, ev.clip_folder))
    return out


def nasa_images(pipe, prompts, c: dict, call: dict):
    """Student images in [0, 1] with SNOOPI's NASA (config dict ``c``: nasa_* and
    resolution), on the exported pipeline's grid ``call``."""
    from fewstep.image.nasa import sample_with_nasa

    call = dict(call)
    steps = call.pop("num_inference_steps")
    if c.get("resolution"):
        call.update(height=c["resolution"], width=c["resolution"])
    neg, alpha = c["nasa_negative_prompt"], c["nasa_alpha"]
    return sample_with_nasa(pipe, prompts, neg, alpha, steps, seed=0, **call)


def _repeat_cond(cond, n: int):
    """Each prompt's condition ``n`` times in a row (tensor or dict of tensors)."""
    if isinstance(cond, dict):
        return {k: v.repeat_interleave(n, 0) for k, v in cond.items()}
    return cond.repeat_interleave(n, 0)


def diversity_evaluation(cfg, teacher_pipe, student_pipe, run_dir: Path, prompts) -> dict:
    """Mean pairwise latent distance across ``diversity_seeds`` seeds per prompt for the
    student alone, the teacher alone (``teacher_steps`` Euler) and the diversity-distillation
    hybrid (teacher's first ``diversity_teacher_steps`` steps, then the student), with the
    hybrid's NFE split."""
    import json

    from fewstep.core.models import GuidedDenoiser
    from fewstep.core.samplers import EulerSampler, FewStepSampler
    from fewstep.image import pipelines as P
    from fewstep.image.diversity import DiversitySampler, per_prompt_diversity
    from fewstep.image.prompts import null_cond_fn

    seeds, k = cfg.diversity_seeds, cfg.diversity_teacher_steps
    if seeds < 2:
        raise ValueError(f"diversity needs --diversity-seeds >= 2, got {seeds}")
    null = P.encode_prompts(teacher_pipe, [cfg.negative_prompt])
    teacher = GuidedDenoiser(P.teacher_denoiser(teacher_pipe), guidance(cfg), null_cond_fn(null))
    student = P.teacher_denoiser(student_pipe)
    times = json.loads((run_dir / PIPELINE_DIR / P.STUDENT_FILE).read_text())["times"]
    cond = _repeat_cond(P.encode_prompts(teacher_pipe, prompts), seeds)
    shape = P.latent_shape(teacher_pipe, cfg.resolution or None)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(prompts) * seeds, *shape, generator=g).to(teacher_pipe.device)
    hybrid = DiversitySampler(
        teacher, k, cfg.teacher_steps, times, generator=torch.Generator().manual_seed(1)
    ).sample(student, noise, cond)
    alone = FewStepSampler(times, torch.Generator().manual_seed(1))
    runs = {
        "student": alone.sample(student, noise, cond).x,
        "hybrid": hybrid.x,
        "teacher": EulerSampler(cfg.teacher_steps).sample(teacher, noise, cond).x,
    }
    out = {
        f"diversity_{name}": per_prompt_diversity(x.float().cpu().unflatten(0, (-1, seeds)))
        for name, x in runs.items()
    }
    out.update(
        diversity_teacher_steps=k,
        hybrid_nfe=hybrid.nfe,
        hybrid_teacher_nfe=hybrid.teacher_nfe,
        hybrid_student_nfe=hybrid.student_nfe,
    )
    return out


def enable_gradient_checkpointing(roles: dict) -> list[str]:
    """Turn on diffusers' gradient checkpointing in every diffusers model inside the trained
    ``roles`` (student, fake score / critic, ...); returns the roles it reached."""
    reached = []
    for name, role in roles.items():
        for m in role.modules():
            if getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
                reached.append(name)
    return sorted(set(reached))


RECIPE = LatentRecipe()
