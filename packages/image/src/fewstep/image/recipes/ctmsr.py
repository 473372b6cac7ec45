"""``fewstep distill image-sr-ctmsr``: one-step super-resolution by CTMSR (consistency
training from LR + noise to HR, with distribution trajectory matching; You et al. ICCV 2025)
on scikit-learn's digits (8 -> 16) or its two sample photos (x4), trained from scratch (the
method needs no teacher).

The run folder gets the student (EMA weights) as a diffusers folder ``student/``
(safetensors, plus ``sr_net.json`` saying how x_t and the LR image enter), the resolved
config, ``metrics.json`` (PSNR / SSIM against HR on held-out images and milliseconds per
image, for bicubic upsampling and the student at 1 and 2 steps), ``grid.png`` (rows: LR,
bicubic, SR 1 step, SR 2 steps, HR), loss curves and ``report.html``.

Classifier metrics are not reported for digits: the project's digits classifier (the FD
feature net) sees 8x8 images and there is no 16x16 one; scoring SR outputs would need a
new net or a downsampling that throws away what SR adds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep.core.training import EvalResult, TrainConfig
from fewstep.image.sr.ctmsr import CTMSRConfig
from fewstep.image.sr.data import SRDataConfig
from fewstep.image.sr.net import SRNetConfig

STUDENT_DIR = "student"
CLASSIFIER_NOTE = (
    "skipped: the digits classifier is an 8x8 net and there is no 16x16 feature net in the "
    "project; PSNR / SSIM against the held-out HR images are reported instead"
)


@dataclass
class CTMSRRecipeConfig:
    data: SRDataConfig = field(default_factory=SRDataConfig)  # paired data: digits or photos
    net: SRNetConfig = field(default_factory=SRNetConfig)  # the SR UNet
    ctmsr: CTMSRConfig = field(default_factory=CTMSRConfig)  # trajectory, CT and DTM settings
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1000,
            batch_size=32,
            lr=1e-3,
            ema_decay=0.99,
            checkpoint_every=500,
            log_every=20,
        )
    )  # training loop (core Trainer)
    two_step_t: float = 0.5  # trajectory time of the 2-step student's second step
    eval_images: int = 0  # held-out images scored at the end (0 = all)
    probe_images: int = 64  # held-out images scored at each periodic evaluation
    eval_seed: int = 0  # seed of the students' input noise at evaluation
    grid_images: int = 8  # columns of the LR / bicubic / SR / HR grid
    threads: int = 0  # torch CPU threads (0 = torch's default)
    device: str = "auto"  # cpu, cuda, or auto


# ------------------------------------------------------------------------------ evaluation


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[torch.Tensor, float]:
    """(fn(), seconds) after one untimed warm-up call."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def score(f, pairs, times_by_name: dict[str, tuple[float, ...]], seed: int, device) -> dict:
    """PSNR / SSIM (mean and standard error over images), the sliced Wasserstein distance
    between the set of outputs and the set of HR images (pixels; unpaired, the distribution
    gap DTM targets) and ms per image on ``pairs``, for bicubic upsampling and the student at
    each set of step times; plus the outputs."""
    from fewstep.core.metrics import sliced_wasserstein
    from fewstep.image.sr.ctmsr import sample_sr
    from fewstep.image.sr.data import bicubic_resize
    from fewstep.image.sr.metrics import mean_std, psnr, ssim

    device = torch.device(device)
    hr, lr, y = pairs.hr.to(device), pairs.lr.to(device), pairs.lr_up.to(device)
    n = len(hr)
    rows, outputs = {}, {}

    def record(name: str, out: torch.Tensor, seconds: float, nfe: int) -> None:
        out = out.clamp(-1, 1)
        p, p_se = mean_std(psnr(out, hr))
        s, s_se = mean_std(ssim(out, hr))
        rows[name] = {"nfe": nfe, "psnr": p, "psnr_se": p_se, "ssim": s, "ssim_se": s_se}
        rows[name]["swd_to_hr"] = sliced_wasserstein(
            out.flatten(1).cpu(), hr.flatten(1).cpu(), generator=torch.Generator().manual_seed(0)
        )
        rows[name]["ms_per_image"] = 1000.0 * seconds / n
        outputs[name] = out.cpu()

    out, sec = _timed(lambda: bicubic_resize(lr, hr.shape[-1]), device)
    record("bicubic", out, sec, 0)
    with torch.no_grad():
        for name, times in times_by_name.items():
            out, sec = _timed(
                lambda t=times: sample_sr(f, y, t, torch.Generator().manual_seed(seed)), device
            )
            record(name, out, sec, len(times))
    return {"rows": rows, "outputs": outputs}


def _subset(pairs, n: int):
    if n <= 0 or n >= len(pairs):
        return pairs
    return dataclasses.replace(
        pairs,
        hr=pairs.hr[:n],
        lr=pairs.lr[:n],
        lr_up=pairs.lr_up[:n],
        origins=None if pairs.origins is None else pairs.origins[:n],
    )


def student_times(cfg: CTMSRRecipeConfig) -> dict[str, tuple[float, ...]]:
    return {"ctmsr_1step": (1.0,), "ctmsr_2step": (1.0, cfg.two_step_t)}


class Probe:
    """Evaluator for core's Trainer: PSNR / SSIM of the EMA student (1 step) on a few
    held-out images."""

    def __init__(self, cfg: CTMSRRecipeConfig, heldout):
        self.cfg = cfg
        self.pairs = _subset(heldout, cfg.probe_images)

    def __call__(self, trainer) -> EvalResult:
        f = trainer.sampling_denoiser(use_ema=True)
        res = score(f, self.pairs, {"1step": (1.0,)}, self.cfg.eval_seed, trainer.device)
        r = res["rows"]["1step"]
        return EvalResult(metrics={"psnr_1step": r["psnr"], "ssim_1step": r["ssim"]})


def save_grid(path: Path, pairs, outputs: dict[str, torch.Tensor], k: int) -> Path:
    """Rows LR (nearest-upsampled), bicubic, every student output, HR; ``k`` columns."""
    import torch.nn.functional as F

    from fewstep.core.report import save_image_grid

    k = min(k, len(pairs))
    size = pairs.hr.shape[-1]
    lr = F.interpolate(pairs.lr[:k], size=(size, size), mode="nearest")
    rows = [lr, *(outputs[n][:k] for n in outputs), pairs.hr[:k]]
    return save_image_grid(
        path, torch.cat(rows), nrow=k, upscale=max(1, 64 // size), pad=2, pad_value=128
    )


# ---------------------------------------------------------------------------------- recipe


class CTMSRRecipe:
    name = "image-sr-ctmsr"
    summary = "one-step SR (CTMSR: consistency training LR+noise -> HR, + DTM) on digits/photos"
    config_cls = CTMSRRecipeConfig

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    def distill(self, cfg: CTMSRRecipeConfig, obj_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.core.training import TensorData, Trainer
        from fewstep.image.sr.ctmsr import CTMSR
        from fewstep.image.sr.data import load_sr_dataset, resolved
        from fewstep.image.sr.net import SRNet

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        data_cfg = resolved(cfg.data)
        ds = load_sr_dataset(data_cfg)
        channels, size = ds.train.hr.shape[1], ds.train.hr.shape[-1]
        torch.manual_seed(cfg.train.seed)
        net = SRNet.build(cfg.net, channels, size, ds.scale)
        ocfg = dataclasses.replace(cfg.ctmsr, total_steps=cfg.ctmsr.total_steps or cfg.train.steps)
        objective = CTMSR(ocfg)
        t0 = time.perf_counter()
        trainer = Trainer(
            objective,
            net,
            TensorData(ds.train.hr, ds.train.lr_up),
            cfg.train,
            out_dir,
            evaluator=Probe(cfg, ds.heldout),
            device=cfg.device,
        )
        trainer.fit()
        train_seconds = time.perf_counter() - t0
        if not trainer.dist.is_main:
            return {}
        ema = trainer.ema if trainer.ema is not None else trainer.roles["student"]
        ema.eval().save(out_dir / STUDENT_DIR)
        f = objective.wrap(ema)
        heldout = _subset(ds.heldout, cfg.eval_images)
        res = score(f, heldout, student_times(cfg), cfg.eval_seed, trainer.device)
        save_grid(out_dir / "grid.png", heldout, res["outputs"], cfg.grid_images)
        rows = res["rows"]
        metrics: dict[str, Any] = {
            "dataset": ds.name,
            "data_recipe": ds.recipe,
            "scale": ds.scale,
            "hr_size": size,
            "channels": channels,
            "heldout_images": len(heldout),
            **rows,
            "psnr_gain_1step_db": rows["ctmsr_1step"]["psnr"] - rows["bicubic"]["psnr"],
            "ssim_gain_1step": rows["ctmsr_1step"]["ssim"] - rows["bicubic"]["ssim"],
            "classifier_metrics": CLASSIFIER_NOTE if ds.name == "digits" else "n/a",
            "dtm": {"weight": ocfg.dtm_weight, "start": ocfg.dtm_start},
            "train_steps": cfg.train.steps,
            "train_seconds": train_seconds,
            "probe": [
                {"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
                for r in trainer.history
                if any(k.startswith("eval/") for k in r)
            ],
            "warnings": trainer.warnings,
        }
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}

    # --- loading a run --------------------------------------------------------------------
    def load(self, run_dir: Path):
        """(config, consistency function around the saved student, dataset)."""
        from fewstep.core.cli import RUN_CONFIG
        from fewstep.core.config import from_dict
        from fewstep.image.sr.ctmsr import CTMSR
        from fewstep.image.sr.data import load_sr_dataset
        from fewstep.image.sr.net import SRNet

        run_dir = Path(run_dir)
        resolved_cfg = json.loads((run_dir / RUN_CONFIG).read_text())
        cfg = from_dict(CTMSRRecipeConfig, resolved_cfg["config"])
        net = SRNet.load(run_dir / STUDENT_DIR).eval()
        return cfg, CTMSR(cfg.ctmsr).wrap(net), load_sr_dataset(cfg.data)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """SR of the first ``n`` held-out LR images: a grid with rows LR / bicubic / SR / HR."""
        from fewstep.image.sr.ctmsr import sampling_times

        cfg, f, ds = self.load(run_dir)
        times = sampling_times(cfg.ctmsr, steps)
        if steps == 2:  # the recipe's 2-step schedule, as evaluated
            times = (1.0, cfg.two_step_t)
        pairs = _subset(ds.heldout, n)
        res = score(f, pairs, {"sr": times}, cfg.eval_seed, "cpu")
        out = out or Path(run_dir) / f"samples_{len(pairs)}x{len(times)}nfe.png"
        return save_grid(Path(out), pairs, {"sr": res["outputs"]["sr"]}, len(pairs))

    def evaluate(self, run_dir: Path) -> dict:
        cfg, f, ds = self.load(run_dir)
        res = score(
            f, _subset(ds.heldout, cfg.eval_images), student_times(cfg), cfg.eval_seed, "cpu"
        )
        return res["rows"]

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report, save_line_plot

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, f"fewstep image-sr-ctmsr: {m['dataset']} x{m['scale']}")
        for w in m.get("warnings", []):
            rep.add_warning(w)
        names = [k for k in ("bicubic", "ctmsr_1step", "ctmsr_2step") if k in m]
        rep.add_table(
            f"Held-out quality against HR ({m['heldout_images']} images)",
            [{"method": k, **m[k]} for k in names],
            ["method", "nfe", "psnr", "psnr_se", "ssim", "ssim_se", "swd_to_hr", "ms_per_image"],
        )
        rep.add_text(
            "Data and notes",
            f"{m['data_recipe']}.\nPSNR in dB with values in [-1, 1] (range 2); SSIM with an "
            "11x11 Gaussian window (std 1.5); *_se = standard error over images; swd_to_hr = "
            "sliced Wasserstein distance between the output set and the HR set (pixels).\n"
            f"DTM weight {m['dtm']['weight']} from step {m['dtm']['start']} of "
            f"{m['train_steps']}.\nClassifier metrics: {m['classifier_metrics']}.",
        )
        if (run_dir / "grid.png").exists():
            rep.add_image(
                "Held-out examples",
                run_dir / "grid.png",
                "rows: LR (nearest), bicubic, CTMSR 1 step, CTMSR 2 steps, HR",
            )
        log_file = run_dir / "log.jsonl"
        if log_file.exists():
            log = [json.loads(line) for line in log_file.read_text().splitlines()]
            keys = ("ct_loss", "dtm_loss", "loss/student")
            series = {k: [(r["step"], r[k]) for r in log if k in r] for k in keys}
            series = {k: v for k, v in series.items() if v}
            if series:
                save_line_plot(run_dir / "loss_curves.png", series, title="losses", xlabel="step")
                rep.add_image("Loss curves", run_dir / "loss_curves.png")
        if m.get("probe"):
            curve = [(r["step"], r["psnr_1step"]) for r in m["probe"] if "psnr_1step" in r]
            save_line_plot(
                run_dir / "probe_psnr.png",
                {"PSNR, 1 step (EMA)": curve},
                title="held-out probe during training",
                xlabel="step",
                ylabel="dB",
            )
            rep.add_image("Probe during training", run_dir / "probe_psnr.png")
        return rep.write()


RECIPE = CTMSRRecipe()
