"""Benchmark: PVD (progressive volume distillation) against training the student from the
teacher's rendered images, wall time to equal PSNR on held-out views.

    uv run --package fewstep-threed python benchmarks/threed_pvd.py [--steps 400]

Teachers: a hash-grid field trained on 24 views of the toy voxel scene, and the toy voxel
scene itself. Pairs: hash -> MLP, hash -> TensoRF, voxel -> TensoRF. For each pair the same
freshly initialised student (same seed) is trained twice with the same rays per step, samples
per ray, optimiser and step budget: by ``distill_volume`` (PVD's three stages, rays through the
24 training cameras) and by ``train_from_images`` on the teacher's renders at those cameras.
Held-out PSNR is measured against the teacher's renders of 8 unseen views every
``--eval-every`` steps; training seconds exclude evaluation. The target PSNR is what the
baseline reaches at its best; the table gives each method's seconds and steps to reach it
(and a fixed 20 dB), in wall seconds and in this process's CPU seconds (one torch thread:
on a shared machine the CPU figure is the one other processes do not inflate; on an idle one
the two agree), run side by side in one process.
Writes benchmarks/results/threed_pvd.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from report_io import markdown_table, write_json

PAIRS = (("hashgrid", "mlp"), ("hashgrid", "tensorf"), ("voxel", "tensorf"))
FIXED_TARGET = 20.0


def main() -> None:
    from fewstep.threed.cameras import orbit_cameras
    from fewstep.threed.fields import make_field, toy_voxel_scene
    from fewstep.threed.pvd import (
        PVDConfig,
        best_psnr,
        default_stages,
        distill_volume,
        evaluate_views,
        psnr,
        steps_to_psnr,
        time_to_psnr,
        train_from_images,
    )
    from fewstep.threed.volume import VolumeRenderConfig, render_field

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="student steps (PVD 20/30/50 %)")
    ap.add_argument("--teacher-steps", type=int, default=500, help="hash-grid teacher steps")
    ap.add_argument("--size", type=int, default=32, help="image size")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--rays", type=int, default=256, help="rays per step (both methods)")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "threed_pvd.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    g = torch.Generator().manual_seed(1)
    train = orbit_cameras(
        24, radius=3.0, elevation=(-10.0, 50.0), size=args.size, random=True, generator=g
    )
    test = orbit_cameras(8, radius=3.0, elevation=25.0, size=args.size, azimuth_start=22.5)
    render = VolumeRenderConfig(n_samples=64)
    scene = toy_voxel_scene()
    with torch.no_grad():
        gt_train = render_field(scene, train, render)["image"]
        gt_test = render_field(scene, test, render)["image"]
    s = args.steps
    cfg = PVDConfig(
        stages=default_stages(s // 5, 3 * s // 10, s - s // 5 - 3 * s // 10),
        eval_every=args.eval_every,
        rays_per_step=args.rays,
    )
    torch.manual_seed(0)
    hash_teacher = make_field("hashgrid")
    t0 = time.perf_counter()
    tlog = train_from_images(hash_teacher, gt_train, train, cfg, steps=args.teacher_steps)
    teachers = {
        "hashgrid": {
            "field": hash_teacher,
            "train_seconds": time.perf_counter() - t0,
            "train_cpu_seconds": tlog["cpu_time"][-1],
            "final_loss": tlog["loss"][-1],
        },
        "voxel": {"field": scene, "train_seconds": 0.0},
    }
    for name, t in teachers.items():
        t["psnr_vs_gt"] = evaluate_views(t["field"], test, gt_test)
        with torch.no_grad():
            t["train_images"] = render_field(t["field"], train, render)["image"]
            t["test_images"] = render_field(t["field"], test, render)["image"]
        print(f"teacher {name}: held-out PSNR vs ground truth {t['psnr_vs_gt']:.2f} dB")

    rows, runs = [], {}
    for tname, sname in PAIRS:
        t = teachers[tname]
        views = (test, t["test_images"])
        torch.manual_seed(0)
        student = make_field(sname)
        init_psnr = evaluate_views(student, *views)
        const = psnr(t["test_images"].mean((0, 1, 2)).expand_as(t["test_images"]), t["test_images"])
        pvd_log = distill_volume(t["field"], student, train, cfg, eval_views=views)
        pvd_gt = evaluate_views(student, test, gt_test)
        torch.manual_seed(0)
        student = make_field(sname)
        img_log = train_from_images(student, t["train_images"], train, cfg, eval_views=views)
        img_gt = evaluate_views(student, test, gt_test)
        target = best_psnr(img_log)
        row = {
            "teacher -> student": f"{tname} -> {sname}",
            "init PSNR": init_psnr,
            "const PSNR": const,
            "PVD final PSNR": pvd_log["eval"][-1]["psnr"],
            "images final PSNR": img_log["eval"][-1]["psnr"],
            "target (images best)": target,
            "PVD s to target": time_to_psnr(pvd_log, target),
            "images s to target": time_to_psnr(img_log, target),
            "PVD cpu-s to target": time_to_psnr(pvd_log, target, "cpu_time"),
            "images cpu-s to target": time_to_psnr(img_log, target, "cpu_time"),
            "PVD steps to target": steps_to_psnr(pvd_log, target),
            "images steps to target": steps_to_psnr(img_log, target),
            f"PVD cpu-s to {FIXED_TARGET:g} dB": time_to_psnr(pvd_log, FIXED_TARGET, "cpu_time"),
            f"images cpu-s to {FIXED_TARGET:g} dB": time_to_psnr(img_log, FIXED_TARGET, "cpu_time"),
            "PVD cpu-s/step": pvd_log["cpu_time"][-1] / len(pvd_log["cpu_time"]),
            "images cpu-s/step": img_log["cpu_time"][-1] / len(img_log["cpu_time"]),
            "PVD PSNR vs GT": pvd_gt,
            "images PSNR vs GT": img_gt,
        }
        a, b = row["PVD cpu-s to target"], row["images cpu-s to target"]
        row["speed-up to target (cpu)"] = b / a if a and b else None
        a, b = row["PVD s to target"], row["images s to target"]
        row["speed-up to target (wall)"] = b / a if a and b else None
        rows.append(row)
        runs[f"{tname}->{sname}"] = {
            "pvd_eval": pvd_log["eval"],
            "images_eval": img_log["eval"],
            "pvd_wall_s": pvd_log["time"][-1],
            "images_wall_s": img_log["time"][-1],
        }
        print(json.dumps(row, default=str))

    report = {
        "machine": f"{platform.machine()} {platform.processor()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU",
        "settings": {
            "steps": s,
            "stages": [(st.name, st.steps, st.losses) for st in cfg.stages],
            "rays_per_step": cfg.rays_per_step,
            "samples_per_ray": cfg.samples_per_ray,
            "uniform_points": cfg.uniform_points,
            "image_size": args.size,
            "train_views": len(train),
            "test_views": len(test),
            "teacher_steps": args.teacher_steps,
        },
        "teachers": {
            k: {
                kk: vv
                for kk, vv in v.items()
                if kk in ("train_seconds", "train_cpu_seconds", "psnr_vs_gt", "final_loss")
            }
            for k, v in teachers.items()
        },
        "rows": rows,
        "runs": runs,
        "seconds": time.time() - t_start,
    }
    write_json(args.out, report)
    print(markdown_table(rows))
    print(f"\n{report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
