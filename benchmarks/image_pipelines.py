"""Benchmark: diffusers pipelines, teacher at 25/50 NFE vs exported student at 1/2/4 NFE,
and the memory of DMD2 training steps with full vs LoRA students and critics.

    uv run --package fewstep-image python benchmarks/image_pipelines.py [--width 4] [--size 16]

Builds a small SD-style (UNet, DDPM) and SD3-style (flow transformer) pipeline from configs
(``fewstep.image.tiny``; random weights: speed and memory do not depend on them), exports
each one's network as a student pipeline with fewstep's few-step scheduler, and times
images per second of each, alternating teacher and student runs on the same machine.
Memory: each training configuration runs in a fresh subprocess (peak RSS on CPU, peak
allocated on CUDA), next to the exact count of trainable parameters, gradients and Adam
state. Writes benchmarks/results/image_pipelines.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a red circle", "a cat", "seven", "a house"]  # the tiny tokenizer keeps 14 characters


def build(kind: str, folder: Path, width: int, size: int):
    from fewstep.image.tiny import sd3_pipeline, sd_pipeline

    return (sd_pipeline if kind == "sd" else sd3_pipeline)(folder, width=width, size=size)


def seconds_per_image(pipe, steps: int, guidance: float, batch: int, repeats: int) -> float:
    from fewstep.image.recipes.latent import run_pipeline

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    run_pipeline(pipe, prompts[:1], 0, guidance, num_inference_steps=steps)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        run_pipeline(pipe, prompts, r, guidance, num_inference_steps=steps)
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def speed(kind: str, root: Path, args) -> list[dict]:
    from fewstep.image import pipelines as P

    build(kind, root / kind, args.width, args.size)
    teacher = P.load_pipeline(root / kind)
    P.export_student(teacher, getattr(teacher, P.network_name(teacher)), root / f"{kind}-student")
    student = P.load_pipeline(root / f"{kind}-student")
    runs = [("teacher", teacher, n, args.guidance) for n in (25, 50)]
    runs += [("student", student, n, 1.0) for n in (1, 2, 4)]
    rows = []
    for name, pipe, steps, w in runs:
        s = seconds_per_image(pipe, steps, w, args.batch, args.repeats)
        nfe = steps * (2 if w > 1 else 1)
        rows.append({"pipeline": kind, "model": name, "steps": steps, "nfe": nfe, "s_per_image": s})
    base = next(r["s_per_image"] for r in rows if r["model"] == "teacher" and r["steps"] == 50)
    for r in rows:
        r["speedup_vs_teacher50"] = base / r["s_per_image"]
    return rows


def memory_child(kind: str, folder: str, lora: int, critic_lora: int, steps: int, batch: int):
    """One configuration, run in its own process: a few DMD2 steps; peak memory."""
    from fewstep.core.models import GuidedDenoiser, trainable_copy
    from fewstep.core.objectives import get_objective
    from fewstep.core.training import TrainConfig, Trainer
    from fewstep.image import pipelines as P
    from fewstep.image.prompts import PromptData, null_cond_fn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = P.load_pipeline(folder, device)
    cond = P.encode_prompts(pipe, PROMPTS)
    null = P.encode_prompts(pipe, [""])
    teacher = GuidedDenoiser(P.teacher_denoiser(pipe), 1.0, null_cond_fn(null))
    student = trainable_copy(teacher.base)
    if lora:
        P.add_lora(getattr(student, P.network_name(pipe)), lora)
    cls = get_objective("dmd2")
    obj_cfg = cls.config_cls(
        fake_updates_per_student=1, fake_lora_rank=critic_lora, fake_lora_targets=P.LORA_TARGETS
    )
    obj = cls(teacher, obj_cfg)
    cfg = TrainConfig(steps=steps, batch_size=batch, ema_decay=0.0, progress=False, resume=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(obj, student, PromptData(cond, P.latent_shape(pipe)), cfg, Path(out))
        trainer.fit()
        params = {r: sum(p.numel() for p in ps) for r, ps in trainer.params.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "pipeline": kind,
        "student": f"LoRA r{lora}" if lora else "full",
        "critic": f"LoRA r{critic_lora}" if critic_lora else "full",
        "trainable_student": params["student"],
        "trainable_critic": params["fake_score"],
        # fp32 weights' gradients + Adam's two moments, per trainable parameter
        "grad_adam_mib": 12 * sum(params.values()) / 2**20,
        "peak_rss_growth_mib": (peak - before) / 1024,  # ru_maxrss is KiB on Linux
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


def memory(kind: str, root: Path, args) -> list[dict]:
    rows = []
    r = args.lora_rank
    for lora, critic_lora in ((0, 0), (r, 0), (r, r)):
        cmd = [sys.executable, __file__, "--child", kind, str(root / kind), str(lora)]
        cmd += [str(critic_lora)]
        cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict], keys: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=4, help="channel multiplier of the networks")
    ap.add_argument("--size", type=int, default=16, help="latent side (images are twice it)")
    ap.add_argument("--guidance", type=float, default=4.5, help="teacher CFG scale")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, folder, lora, critic = args.child
        row = memory_child(kind, folder, int(lora), int(critic), steps=3, batch=args.batch)
        print(json.dumps(row))
        return
    root = Path(tempfile.mkdtemp(prefix="fewstep-bench-pipelines-"))
    speed_rows, memory_rows = [], []
    for kind in ("sd", "sd3"):
        speed_rows += speed(kind, root, args)
        memory_rows += memory(kind, root, args)
    result = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}",
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "speed": speed_rows,
        "memory": memory_rows,
    }
    out = Path(__file__).parent / "results" / "image_pipelines.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(speed_rows, ["pipeline", "model", "steps", "nfe", "s_per_image",
                             "speedup_vs_teacher50"]))  # fmt: skip
    print()
    mem_keys = ["pipeline", "student", "critic", "trainable_student", "trainable_critic"]
    print(table(memory_rows, [*mem_keys, "grad_adam_mib", "peak_rss_growth_mib", "cuda_peak_mib"]))


if __name__ == "__main__":
    main()
