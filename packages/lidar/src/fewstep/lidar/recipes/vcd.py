"""``fewstep distill lidar-vcd``: a camera-only BEV car detector (the apprentice, VCD-A) taught by a
same-structure camera + LiDAR-depth expert (VCD-E), after VCD (Huang et al., NeurIPS 2023,
arXiv 2310.15670; models and losses in :mod:`fewstep.lidar.vcd`).

Steps: (1) the detection frames of :mod:`fewstep.lidar.detection_data` (cached); (2) the expert
trained with the detection loss alone (cached by a hash of its config, data and schedule);
(3) the apprentice trained with ``detection + feature * L_feat + trajectory * L_traj`` against
the frozen expert, or with the detection loss alone when ``distill`` is false (the baseline:
same data, schedule and seed); (4) both evaluated on the held-out streets with
:func:`fewstep.lidar.detection_metrics.detection_metrics` (mAP over 0.5 / 1 / 2 / 4 m,
ATE / ASE / AOE, simplified NDS) and timed per sample.

The run folder gets ``student.safetensors`` (the apprentice), ``metrics.json``, BEV plots of
held-out predictions under ``bev/`` and ``report.html``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.lidar.detection_data import DetectionDataConfig
from fewstep.lidar.detection_metrics import MetricConfig
from fewstep.lidar.vcd import DetectorConfig

# Part of the expert's cache key: bump it whenever the detector or its training changes in a
# way its config does not show, so a cache filled by older code is not reused (the cache key
# holds only configs; session 9's figures could not be reproduced in session 11, see the
# "LiDAR VCD" section of BENCHMARKS.md). 2: BatchNorm option, warm-up, validation streets.
EXPERT_CODE_VERSION = 2


def _expert() -> DetectorConfig:
    return DetectorConfig(lidar_depth=True)


@dataclass
class Schedule:
    steps: int = 500  # optimiser steps
    batch_size: int = 8  # samples per step
    lr: float = 2e-3  # AdamW peak learning rate (cosine decay to 5 % of it)
    # steps of linear warm-up from lr / warmup to lr before the cosine. 0: with BatchNorm,
    # 50 steps gave no gain on the validation street (apprentice seeds 0-3, 500 steps: mAP
    # 0.686 / 0.591 / 0.679 / 0.619 vs 0.756 / 0.611 / 0.679 / 0.645 without)
    warmup: int = 0
    weight_decay: float = 1e-4  # AdamW weight decay
    seed: int = 0  # initialisation and batch order
    log_every: int = 25  # steps between logged losses

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError("Schedule needs steps >= 1, batch_size >= 1, lr > 0, warmup >= 0")


@dataclass
class LossWeights:
    # 1.0 kept, but no setting tried beats no distillation with the BatchNorm detector
    # (500 steps, apprentice seeds 0-3; BENCHMARKS.md "LiDAR VCD"): 1.0 on the test streets
    # changes mAP by -0.030 / -0.006 / -0.084 / +0.090 (lidar_vcd_bn_4seeds.json); 0.1 on the
    # validation street (cut from training) by -0.017 / -0.038 / -0.088 / +0.021
    feature: float = 1.0  # weight of VCD foreground BEV feature distillation
    trajectory: float = 1.0  # weight of VCD per-object trajectory distillation
    heat_sigma: float = 0.75  # std of the heatmap Gaussians, metres
    fg_margin: float = 0.5  # foreground mask = box footprints grown by this much, metres

    def __post_init__(self):
        if self.feature < 0 or self.trajectory < 0 or self.heat_sigma <= 0:
            raise ValueError("LossWeights needs feature, trajectory >= 0 and heat_sigma > 0")


@dataclass
class EvalConfig:
    threshold: float = 0.05  # lowest score of a decoded box
    max_boxes: int = 20  # boxes decoded per sample
    plots: int = 4  # held-out samples drawn as BEV plots
    latency_samples: int = 16  # held-out samples timed one at a time
    metric: MetricConfig = field(default_factory=MetricConfig)  # mAP thresholds, NDS terms


@dataclass
class VCDConfig:
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)  # frames and grid
    expert: DetectorConfig = field(default_factory=_expert)  # VCD-E: camera + LiDAR depth
    apprentice: DetectorConfig = field(default_factory=DetectorConfig)  # VCD-A: camera only
    expert_train: Schedule = field(default_factory=Schedule)  # expert training (cached)
    train: Schedule = field(default_factory=Schedule)  # apprentice training
    weights: LossWeights = field(default_factory=LossWeights)  # loss weights and targets
    distill: bool = True  # False: apprentice trained on detection alone (the baseline)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    threads: int = 1  # torch CPU threads (0 = leave as is)
    # > 0: tuning mode. The last ``val_streets`` training streets are held out of training
    # (expert and apprentice) and evaluated instead of the test streets, so settings are
    # chosen without looking at the held-out test streets
    val_streets: int = 0

    def __post_init__(self):
        if not 0 <= self.val_streets < self.data.streets:
            raise ValueError("val_streets must lie in [0, data.streets)")
        if not self.expert.lidar_depth:
            raise ValueError("the expert must read LiDAR depth (expert.lidar_depth true)")
        if self.apprentice.lidar_depth:
            raise ValueError("the apprentice is camera-only (apprentice.lidar_depth false)")


# ----------------------------------------------------------------------------- training


def _lr(step: int, s: Schedule) -> float:
    """Linear warm-up over ``s.warmup`` steps, then cosine decay to 5 % over the rest."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))


def _batch(data: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in data.items()}


def _forward(model, b: dict[str, Tensor]) -> dict[str, Tensor]:
    depth = b["depth"] if model.cfg.lidar_depth else None
    return model(b["rgb"], b["past_to_cur"], depth)


def train_detector(
    model, data: dict[str, Tensor], cfg: VCDConfig, sched: Schedule, expert=None
) -> list[dict[str, float]]:
    """AdamW on the detection loss, plus VCD's distillation terms when ``expert`` is given.
    Returns the logged losses."""
    from fewstep.lidar import vcd

    w, grid = cfg.weights, cfg.data.grid
    opt = torch.optim.AdamW(model.parameters(), sched.lr, weight_decay=sched.weight_decay)
    gen = torch.Generator().manual_seed(sched.seed + 1)
    n, log = len(data["rgb"]), []
    model.train()
    for step in range(sched.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, sched)
        b = _batch(data, torch.randint(0, n, (sched.batch_size,), generator=gen))
        out = _forward(model, b)
        loss, logs = vcd.detection_loss(out, b["boxes"], b["box_mask"], grid, w.heat_sigma)
        if expert is not None:
            with torch.no_grad():
                f_exp = _forward(expert, b)["bev"]
            mask = vcd.box_mask(b["boxes"], b["box_mask"], grid, w.fg_margin)
            feat = vcd.feature_distill_loss(out["bev"], f_exp, mask)
            traj = vcd.trajectory_distill_loss(out["bev"], f_exp, b["traj"], b["box_mask"], grid)
            loss = loss + w.feature * feat + w.trajectory * traj
            logs.update(feature=float(feat.detach()), trajectory=float(traj.detach()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite detector loss at step {step}: {logs}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % sched.log_every == 0 or step == sched.steps - 1:
            log.append({"step": step, "loss": float(loss.detach()), **logs})
    model.eval()
    return log


def build_detector(det: DetectorConfig, cfg: VCDConfig, seed: int):
    from fewstep.lidar.vcd import BEVDetector

    torch.manual_seed(seed)
    return BEVDetector(det, cfg.data.camera, cfg.data.grid, cfg.data.history)


def load_or_train_expert(cfg: VCDConfig, train: dict[str, Tensor]):
    """(expert, info, was_cached); trained once per (data, expert, schedule, loss) config."""
    from fewstep.core.cache import cached_module

    spec = {"data": asdict(cfg.data), "expert": asdict(cfg.expert),
            "schedule": asdict(cfg.expert_train), "heat_sigma": cfg.weights.heat_sigma,
            "code": EXPERT_CODE_VERSION}  # fmt: skip
    if cfg.val_streets:  # trained without the validation streets
        spec["val_streets"] = cfg.val_streets
    model = build_detector(cfg.expert, cfg, cfg.expert_train.seed)

    def fit(m) -> dict:
        t0 = time.perf_counter()
        log = train_detector(m, train, cfg, cfg.expert_train)
        return {"train_seconds": time.perf_counter() - t0, "train_log": log}

    model, info, cached = cached_module("lidar-vcd-expert", spec, model, fit)
    return model.eval().requires_grad_(False), info, cached


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model, data: dict[str, Tensor], cfg: VCDConfig, batch: int = 16) -> list[np.ndarray]:
    """Decoded boxes (P, 6) per sample of ``data``."""
    from fewstep.lidar.vcd import decode

    out = []
    for i in range(0, len(data["rgb"]), batch):
        b = _batch(data, torch.arange(i, min(i + batch, len(data["rgb"]))))
        out += decode(_forward(model, b), cfg.data.grid, cfg.eval.max_boxes, cfg.eval.threshold)
    return out


def ground_truth(data: dict[str, Tensor]) -> list[np.ndarray]:
    return [b[m].double().numpy() for b, m in zip(data["boxes"], data["box_mask"])]


@torch.no_grad()
def latency_ms(model, data: dict[str, Tensor], n: int) -> float:
    """Mean milliseconds of one forward pass on one sample (batch 1, as on a car)."""
    n = max(1, min(n, len(data["rgb"])))
    _forward(model, _batch(data, torch.arange(1)))  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        _forward(model, _batch(data, torch.arange(i, i + 1)))
    return 1000 * (time.perf_counter() - t0) / n


def evaluate_model(model, data: dict[str, Tensor], cfg: VCDConfig) -> dict[str, float]:
    from fewstep.lidar.detection_metrics import detection_metrics

    m = detection_metrics(predict(model, data, cfg), ground_truth(data), cfg.eval.metric)
    m["latency_ms"] = latency_ms(model, data, cfg.eval.latency_samples)
    return m


def _box_corners(b: np.ndarray) -> np.ndarray:
    c, s = np.cos(b[4]), np.sin(b[4])
    half = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * np.array([b[3], b[2]]) / 2
    return b[:2] + half @ np.array([[c, s], [-s, c]])


def save_bev_plot(
    path: Path,
    gt: np.ndarray,
    preds: dict[str, np.ndarray],
    cfg: VCDConfig,
    min_score: float = 0.3,
):
    """BEV picture (x up, y left): ground truth in green, each model's boxes scoring at least
    ``min_score`` in its colour."""
    from PIL import Image, ImageDraw

    from fewstep.core.io import atomic_write_bytes
    from fewstep.core.report import PALETTE

    g, px = cfg.data.grid, 12  # pixels per metre
    w = int((g.y_range[1] - g.y_range[0]) * px)
    h = int((g.x_range[1] - g.x_range[0]) * px)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def to_px(xy):
        return [((g.y_range[1] - y) * px, (g.x_range[1] - x) * px) for x, y in xy]

    draw.rectangle([w / 2 - 4, h / 2 - 8, w / 2 + 4, h / 2 + 8], outline=(0, 0, 0))  # ego
    for b in gt:
        draw.polygon(to_px(_box_corners(b)), outline=(44, 160, 44), width=3)
    for k, (name, boxes) in enumerate(preds.items()):
        colour = PALETTE[(k + 3) % len(PALETTE)]
        for b in boxes[boxes[:, 5] >= min_score]:
            draw.polygon(to_px(_box_corners(b)), outline=colour, width=1)
        draw.text((4, 4 + 12 * k), name, fill=colour)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------- the recipe


class VCDRecipe:
    name = "lidar-vcd"
    summary = "VCD: camera-only BEV detector distilled from a same-structure LiDAR-depth expert"
    config_cls = VCDConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    def _data(self, cfg: VCDConfig):
        from fewstep.lidar.detection_data import load_split

        train = load_split(cfg.data, "train")
        if not cfg.val_streets:
            return train, load_split(cfg.data, "test")
        n = len(train["rgb"]) - cfg.val_streets * cfg.data.samples_per_street  # street order
        return {k: v[:n] for k, v in train.items()}, {k: v[n:] for k, v in train.items()}

    def distill(self, cfg: VCDConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.rundir import save_student

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        train, test = self._data(cfg)
        expert, einfo, _ = load_or_train_expert(cfg, train)
        apprentice = build_detector(cfg.apprentice, cfg, cfg.train.seed)
        t0 = time.perf_counter()
        log = train_detector(apprentice, train, cfg, cfg.train, expert if cfg.distill else None)
        train_seconds = time.perf_counter() - t0
        save_student(out_dir, {"": apprentice}, {"distill": cfg.distill})
        metrics = self._evaluate(cfg, expert, apprentice, test, out_dir)
        metrics.update(
            distill=cfg.distill,
            n_train=len(train["rgb"]),
            n_test=len(test["rgb"]),
            eval_split="validation" if cfg.val_streets else "test",
            expert_train_seconds=einfo.get("train_seconds"),
            train_seconds=train_seconds,
            train_log=log,
            expert_train_log=einfo.get("train_log", []),
        )
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        flat = {f"{r}.{k}": v for r in ("apprentice", "expert") for k, v in metrics[r].items()}
        return {"distill": cfg.distill, "train_seconds": train_seconds, **flat}

    def _evaluate(self, cfg: VCDConfig, expert, apprentice, test, out_dir: Path) -> dict:
        out = {
            "apprentice": evaluate_model(apprentice, test, cfg),
            "expert": evaluate_model(expert, test, cfg),
        }
        gts = ground_truth(test)
        pa, pe = predict(apprentice, test, cfg), predict(expert, test, cfg)
        n = min(cfg.eval.plots, len(gts))
        for i in np.linspace(0, len(gts) - 1, n).astype(int) if n else []:
            save_bev_plot(out_dir / "bev" / f"{i:03d}.png", gts[i],
                          {"apprentice": pa[i], "expert": pe[i]}, cfg)  # fmt: skip
        return out

    def load(self, run_dir: Path):
        """(config, expert, apprentice, held-out split) of a run folder."""
        from fewstep.core.rundir import load_run_config, load_student

        cfg, _ = load_run_config(run_dir, VCDConfig)
        train, test = self._data(cfg)
        expert, _, _ = load_or_train_expert(cfg, train)
        apprentice = build_detector(cfg.apprentice, cfg, cfg.train.seed)
        state, _ = load_student(run_dir)
        apprentice.load_state_dict(state)
        return cfg, expert, apprentice.eval().requires_grad_(False), test

    # --- CLI commands -----------------------------------------------------------------------
    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """BEV plots of the apprentice's boxes on ``n`` held-out samples (``steps`` unused:
        a detector has no sampling steps)."""
        cfg, _, apprentice, test = self.load(run_dir)
        out = Path(out or Path(run_dir) / "samples")
        gts, preds = ground_truth(test), predict(apprentice, test, cfg)
        for i in range(min(n, len(gts))):
            save_bev_plot(out / f"{i:03d}.png", gts[i], {"apprentice": preds[i]}, cfg)
        return out

    def evaluate(self, run_dir: Path) -> dict:
        cfg, expert, apprentice, test = self.load(run_dir)
        return self._evaluate(cfg, expert, apprentice, test, Path(run_dir))

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report, save_line_plot

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        kind = "with distillation" if m["distill"] else "without distillation (baseline)"
        rep = Report(run_dir, f"fewstep {self.name}: apprentice {kind}")
        cols = ["model", "mAP", "NDS", "ap@0.5", "ap@1", "ap@2", "ap@4", "ATE", "ASE", "AOE",
                "latency_ms"]  # fmt: skip
        rows = [{"model": k, **m[k]} for k in ("apprentice", "expert")]
        split = "Validation" if m.get("eval_split") == "validation" else "Held-out"
        rep.add_table(f"{split} streets ({m['n_test']} samples)", rows, cols)
        rep.add_text(
            "Training",
            f"apprentice {m['train_seconds']:.0f} s on {m['n_train']} samples; expert "
            f"{m['expert_train_seconds'] or 0:.0f} s (cached after its first run).",
        )
        series = {"apprentice loss": [(r["step"], r["loss"]) for r in m["train_log"]]}
        if m["expert_train_log"]:
            series["expert loss"] = [(r["step"], r["loss"]) for r in m["expert_train_log"]]
        rep.add_image("Training loss", save_line_plot(run_dir / "loss.png", series,
                                                      title="training loss"))  # fmt: skip
        for png in sorted((run_dir / "bev").glob("*.png")):
            rep.add_image(f"BEV {png.stem}", png, "green: ground truth; others: predictions")
        return rep.write()


VCD = VCDRecipe()
