"""Diagnose a video-teacher variant: train the DiT for N steps on in-memory moving digits and
report x0-MSE per noise level (against the MSE of predicting the data mean) and the sample
quality of 30-step Euler samples, with and without CFG (digit accuracy and FD from fewstep's
video classifier).

    uv run --package fewstep-video python benchmarks/video_teacher.py NAME [key=value ...]

keys: videos (1000), maxd (most digits, 2), spin (8.0), bg (noise,stripes,gradient),
dsize (digit sprite side; 0: half the frame), patch (2,4,4), dim (96), depth (4), attn (full),
n (samples, 40), ts (DiT time_scale; 1000 reproduces the
double-scaled time embedding fixed in session 8), steps (1000), bs (32), lr (5e-4),
ema (0.999). One JSON line per run is appended to benchmarks/results/video_teacher.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fewstep.core.models import GuidedDenoiser, ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.core.pretrain import train_denoiser
from fewstep.core.samplers import EulerSampler
from fewstep.core.training import TensorData
from fewstep.video.dit import VideoDiT, VideoDiTConfig
from fewstep.video.evaluate import class_accuracy, load_classifier, video_fd
from fewstep.video.moving_digits import MovingDigitsConfig, moving_digits_array

OUT = Path(__file__).parent / "results" / "video_teacher.jsonl"
FRAMES, SIZE = 8, 16


def option(kw: dict, key: str, default):
    if key not in kw:
        return default
    if isinstance(default, tuple):
        return tuple(int(v) for v in kw[key].split(","))
    return type(default)(kw[key])


def main() -> None:
    torch.set_num_threads(1)
    name, kw = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
    mdc = MovingDigitsConfig(
        digits=(1, option(kw, "maxd", 2)),
        max_spin=option(kw, "spin", 8.0),
        backgrounds=tuple(kw.get("bg", "noise,stripes,gradient").split(",")),
        digit_size=option(kw, "dsize", 0) or None,
    )
    md = moving_digits_array(option(kw, "videos", 1000), FRAMES, SIZE, 0, config=mdc)
    clips = md.as_tensor()
    labels = torch.tensor([v["digits"][0]["label"] for v in md.videos])
    cfg = VideoDiTConfig(
        frames=FRAMES, size=SIZE, patch=option(kw, "patch", (2, 4, 4)),
        dim=option(kw, "dim", 96), depth=option(kw, "depth", 4), heads=4,
        time_scale=option(kw, "ts", 1000.0), attention=kw.get("attn", "full"), num_classes=10,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ModuleDenoiser(VideoDiT(cfg), make_path("rectified_flow"), "velocity")

    def null(labels):
        return torch.full_like(labels, 10)

    t0, w0 = time.process_time(), time.time()
    ema, losses = train_denoiser(
        model, TensorData(clips, labels), steps=option(kw, "steps", 1000),
        batch_size=option(kw, "bs", 32), lr=option(kw, "lr", 5e-4), seed=0, cond_dropout=0.1,
        null_cond=null, progress=False, ema_decay=option(kw, "ema", 0.999),
    )  # fmt: skip
    res = {"name": name, "kw": kw, "cpu_s": time.process_time() - t0, "wall_s": time.time() - w0}
    res["final_loss"] = sum(losses[-50:]) / 50
    ema.eval()
    clf, _ = load_classifier()
    with torch.no_grad():
        x0, lab = clips[:64], labels[:64]
        gen = torch.Generator().manual_seed(1)
        for t in (0.2, 0.5, 0.8, 0.95):
            eps = torch.randn(x0.shape, generator=gen)
            tt = torch.full((64,), t)
            xt = ema.path.noise(x0, tt, eps)
            x0h = ema.path.to_x0_eps(ema(xt, tt, lab), ema.prediction, xt, tt)[0]
            res[f"x0_mse_t{t}"] = (x0h - x0).pow(2).mean().item()
            res[f"mean_mse_t{t}"] = (x0.mean(0, keepdim=True) - x0).pow(2).mean().item()
        n = option(kw, "n", 40)
        lab = torch.arange(n) % 10
        for scale in (1.0, 3.0):
            den = ema if scale == 1.0 else GuidedDenoiser(ema, scale, null)
            noise = torch.randn(
                (n, FRAMES, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2)
            )
            out = EulerSampler(steps=30).sample(den, noise, lab).x.clamp(-1, 1)
            res[f"acc_cfg{scale}"] = class_accuracy(clf, out, lab)
            res[f"fd_cfg{scale}"] = video_fd(clf, out, clips[:200])
        res["ref_acc"] = class_accuracy(clf, clips[:200], labels[:200])
    print(json.dumps(res))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
