"""``fewstep distill data-<method>``: distil an image dataset (scikit-learn's digits by default,
or a folder of class sub-folders) into ``ipc`` images per class, then evaluate it with the
field's protocol.

Recipes: ``data-random`` and ``data-herding`` (coreset baselines), ``data-dc`` (gradient
matching + DSA), ``data-dm`` (distribution matching), ``data-mtt`` (trajectory matching) and
``data-ftd`` (flat trajectories + EMA images). They share one base config
(:class:`ImagesConfig`) and one recipe class (:class:`ImageRecipe`); each adds its method's
settings under its own key (``--dc.iterations``, ``--mtt.syn_steps``, ``--ftd.rho`` ...).

The run folder gets ``distilled.safetensors`` (``images`` in network space, ``labels``, and
``lr`` for MTT/FTD; metadata says the space), ``distilled.png`` (a grid, one row per class),
``loss.png``, ``metrics.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.dataset_distill.images.augment import DSAConfig
from fewstep.dataset_distill.images.baselines import HerdingSettings
from fewstep.dataset_distill.images.data import DataConfig, ImageData
from fewstep.dataset_distill.images.dc import DCSettings
from fewstep.dataset_distill.images.dm import DMSettings
from fewstep.dataset_distill.images.evaluate import EvalConfig
from fewstep.dataset_distill.images.ftd import FTDSettings
from fewstep.dataset_distill.images.mtt import MTTSettings
from fewstep.dataset_distill.images.nets import NetConfig
from fewstep.dataset_distill.images.synset import Distilled

DISTILLED = "distilled.safetensors"
METRICS = "metrics.json"


@dataclass
class ImagesConfig:
    ipc: int = 10  # images per class of the distilled set
    seed: int = 0  # seed of the initialisation, sampling, networks and evaluation
    data: DataConfig = field(default_factory=DataConfig)  # which images, split, ZCA
    net: NetConfig = field(default_factory=NetConfig)  # network the method distils with
    dsa: DSAConfig = field(default_factory=DSAConfig)  # augmentation (distilling and evaluating)
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation protocol
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "cpu"  # cpu, cuda or auto


@dataclass
class RandomConfig(ImagesConfig):
    pass


@dataclass
class HerdingConfig(ImagesConfig):
    herding: HerdingSettings = field(default_factory=HerdingSettings)  # feature network


@dataclass
class DCConfig(ImagesConfig):
    dc: DCSettings = field(default_factory=DCSettings)  # gradient matching


@dataclass
class DMConfig(ImagesConfig):
    dm: DMSettings = field(default_factory=DMSettings)  # distribution matching


@dataclass
class MTTConfig(ImagesConfig):
    mtt: MTTSettings = field(default_factory=MTTSettings)  # trajectory matching and experts


@dataclass
class FTDConfig(ImagesConfig):
    ftd: FTDSettings = field(default_factory=FTDSettings)  # MTT's settings + SAM and EMA


# ----------------------------------------------------------------------- the methods


def _run_random(cfg: ImagesConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.baselines import random_subset

    idx = random_subset(data.y_train, data.num_classes, cfg.ipc, g).to(data.x_train.device)
    return Distilled(data.x_train[idx].clone(), data.y_train[idx].clone())


def _run_herding(cfg: HerdingConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.baselines import embed_all, feature_net, herding_subset

    net, info = feature_net(data, cfg.net, cfg.herding, cfg.dsa)
    feats = embed_all(net, data.x_train)
    idx = herding_subset(feats, data.y_train, data.num_classes, cfg.ipc).to(data.x_train.device)
    info = {f"feature_net_{k}": v for k, v in info.items()}
    return Distilled(data.x_train[idx].clone(), data.y_train[idx].clone(), info=info)


def _run_dc(cfg: DCConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.dc import distill_dc

    return distill_dc(data, cfg.ipc, cfg.dc, cfg.net, cfg.dsa, g)


def _run_dm(cfg: DMConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.dm import distill_dm

    return distill_dm(data, cfg.ipc, cfg.dm, cfg.net, cfg.dsa, g)


def _run_mtt(cfg: MTTConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.mtt import distill_mtt

    return distill_mtt(data, cfg.ipc, cfg.mtt, cfg.net, cfg.dsa, g)


def _run_ftd(cfg: FTDConfig, data: ImageData, g: torch.Generator) -> Distilled:
    from fewstep.dataset_distill.images.ftd import distill_ftd

    return distill_ftd(data, cfg.ipc, cfg.ftd, cfg.net, cfg.dsa, g)


# ----------------------------------------------------------------------- helpers


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto; got {name!r}")
    return name


def _upscale(side: int) -> int:
    return 4 if side <= 16 else 2 if side <= 48 else 1


def class_grid_order(labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """Indices of the first ``per_class`` images of every class, class by class."""
    rows = [torch.nonzero(labels.cpu() == c).flatten()[:per_class] for c in range(num_classes)]
    return torch.cat(rows)


def save_distilled_grid(path: Path, images, labels, data: ImageData, per_class: int) -> Path:
    """A PNG with one row per class (up to ``per_class`` images each), in pixel space."""
    from fewstep.core.report import save_image_grid

    idx = class_grid_order(labels, data.num_classes, per_class)
    pix = data.to_pixels(images[idx.to(images.device)])
    return save_image_grid(
        path,
        pix,
        nrow=per_class,
        value_range=(0.0, 1.0),
        upscale=_upscale(data.image_size),
        pad_value=128,  # grey lines between the black-backed digits
    )


def _mean_std_text(acc: dict) -> str:
    return f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"


class ImageRecipe:
    """One image-distillation method as a fewstep recipe (see the module docstring)."""

    def __init__(
        self,
        name: str,
        summary: str,
        config_cls: type,
        run: Callable[..., Distilled],
        paper: str,
    ):
        self.name, self.summary, self.config_cls = name, summary, config_cls
        self.method = name.removeprefix("data-")
        self._run, self.paper = run, paper

    # the objective hooks of the Recipe protocol: these recipes have no objective
    def objective_defaults(self, objective: str) -> dict:
        return {}

    def config_defaults(self, objective: str) -> dict[str, str]:
        return {}

    # ---------------------------------------------------------------------------------
    def load_config(self, run_dir: Path):
        from fewstep.core.config import from_dict

        cfg_file = Path(run_dir) / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{run_dir} is not a fewstep run folder (no config.json)")
        return from_dict(self.config_cls, json.loads(cfg_file.read_text())["config"])

    def load_data(self, cfg: ImagesConfig) -> ImageData:
        from fewstep.dataset_distill.images.data import load_image_data

        return load_image_data(cfg.data).to(_device(cfg.device))

    def run(self, cfg: ImagesConfig, data: ImageData) -> Distilled:
        """The method alone on loaded data (Python API; the CLI goes through ``distill``)."""
        from fewstep.core.training import seed_global
        from fewstep.dataset_distill.images.data import check_ipc

        check_ipc(data, cfg.ipc)
        seed_global(cfg.seed)
        return self._run(cfg, data, torch.Generator().manual_seed(cfg.seed))

    def distill(self, cfg: ImagesConfig, objective_cfg, out_dir: Path) -> dict:
        from fewstep.core.io import atomic_write_json
        from fewstep.dataset_distill.images.evaluate import evaluate_synset

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        data = self.load_data(cfg)
        t0 = time.perf_counter()
        result = self.run(cfg, data)
        distill_seconds = time.perf_counter() - t0
        save_distilled(out_dir / DISTILLED, result, self.method, cfg.ipc, data)
        t0 = time.perf_counter()
        acc = evaluate_synset(
            result.images, result.labels, data, cfg.eval, cfg.net, cfg.dsa, result.lr, cfg.seed
        )
        metrics = {
            "method": self.method,
            "dataset": data.name,
            "ipc": cfg.ipc,
            "num_images": len(result.images),
            "space": data.transform.name,
            "accuracy": acc,
            "learned_lr": result.lr,
            "distill_seconds": distill_seconds,
            "eval_seconds": time.perf_counter() - t0,
            "final_loss": result.curve[-1][1] if result.curve else None,
            "curve": result.curve,
            "info": result.info,
        }
        atomic_write_json(out_dir / METRICS, metrics)
        save_distilled_grid(
            out_dir / "distilled.png", result.images, result.labels, data, min(cfg.ipc, 10)
        )
        if result.curve:
            from fewstep.core.report import save_line_plot

            save_line_plot(
                out_dir / "loss.png",
                {f"{self.method} matching loss": result.curve},
                title=f"{self.method.upper()} matching loss",
                xlabel="iteration",
                ylabel="loss",
                log_y=all(v > 0 for _, v in result.curve),
            )
        self.report(out_dir)
        return scalar_metrics(metrics)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        """A grid of the distilled images: ``ceil(n / classes)`` per class (at most all of
        them), one row per class (``steps`` does not apply and is ignored)."""
        run_dir = Path(run_dir)
        cfg = self.load_config(run_dir)
        data = self.load_data(cfg)
        images, labels, _ = load_distilled(run_dir / DISTILLED)
        have = int(torch.bincount(labels, minlength=data.num_classes).min())
        per_class = min(max(1, -(-n // data.num_classes)), max(have, 1))
        out = out or run_dir / f"distilled_{per_class}pc.png"
        return save_distilled_grid(
            Path(out), images.to(data.x_train.device), labels, data, per_class
        )

    def evaluate(self, run_dir: Path) -> dict:
        """Re-run the evaluation protocol on the saved distilled set."""
        from fewstep.dataset_distill.images.evaluate import evaluate_synset

        run_dir = Path(run_dir)
        cfg = self.load_config(run_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        data = self.load_data(cfg)
        images, labels, lr = load_distilled(run_dir / DISTILLED)
        dev = data.x_train.device
        acc = evaluate_synset(
            images.to(dev), labels.to(dev), data, cfg.eval, cfg.net, cfg.dsa, lr, cfg.seed
        )
        return {"method": self.method, "ipc": cfg.ipc, "accuracy": acc, "learned_lr": lr}

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report

        run_dir = Path(run_dir)
        m = json.loads((run_dir / METRICS).read_text())
        rep = Report(run_dir, f"{self.method.upper()} · {m['dataset']} · {m['ipc']} images/class")
        rep.add_text("Method", f"{self.summary}\n{self.paper}")
        rows = [
            {
                "architecture": arch,
                "test accuracy % (mean ± std)": _mean_std_text(a),
                "networks": len(a["runs"]),
                "runs %": ", ".join(f"{100 * r:.1f}" for r in a["runs"]),
            }
            for arch, a in m["accuracy"].items()
        ]
        rep.add_table("Networks trained on the distilled set, tested on real data", rows)
        facts = {
            "images": m["num_images"],
            "space": m["space"],
            "learned step size": m["learned_lr"],
            "distillation s": m["distill_seconds"],
            "evaluation s": m["eval_seconds"],
            "final matching loss": m["final_loss"],
            **m["info"],
        }
        rep.add_table("Run", [{"quantity": k, "value": v} for k, v in facts.items()])
        if (run_dir / "distilled.png").exists():
            rep.add_image("Distilled images (one row per class)", run_dir / "distilled.png")
        if (run_dir / "loss.png").exists():
            rep.add_image("Matching loss", run_dir / "loss.png")
        cfg_file = run_dir / "config.json"
        if cfg_file.exists():
            rep.add_text("Config", cfg_file.read_text())
        return rep.write()


def scalar_metrics(m: dict) -> dict:
    """The printable summary of a run's metrics: accuracy per architecture, timings."""
    out = {
        k: m[k]
        for k in (
            "method",
            "ipc",
            "num_images",
            "learned_lr",
            "distill_seconds",
            "eval_seconds",
            "final_loss",
        )
    }
    for arch, a in m["accuracy"].items():
        out[f"acc_{arch}_mean"] = a["mean"]
        out[f"acc_{arch}_std"] = a["std"]
    return out


def save_distilled(path: Path, d: Distilled, method: str, ipc: int, data: ImageData) -> Path:
    """``images`` (network space), ``labels`` and, when learned, ``lr`` as safetensors."""
    from safetensors.torch import save

    from fewstep.core.io import atomic_write_bytes

    tensors = {
        "images": d.images.detach().float().cpu().contiguous(),
        "labels": d.labels.detach().long().cpu().contiguous(),
    }
    if d.lr is not None:
        tensors["lr"] = torch.tensor([float(d.lr)])
    meta = {
        "method": method,
        "ipc": str(ipc),
        "space": data.transform.name,
        "classes": json.dumps(list(data.classes)),
    }
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_distilled(path: Path) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(images, labels, learned lr or None) from :func:`save_distilled`'s file."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"no distilled set at {path}")
    # copies that own their memory, independent of the file once loaded
    t = {k: v.clone() for k, v in load_file(str(path)).items()}
    lr = float(t["lr"][0]) if "lr" in t else None
    return t["images"], t["labels"], lr


RANDOM = ImageRecipe(
    "data-random",
    "Random real images per class (coreset baseline)",
    RandomConfig,
    _run_random,
    "The baseline of every dataset-distillation paper: ipc training images drawn per class.",
)
HERDING = ImageRecipe(
    "data-herding",
    "Herding in a trained ConvNet's feature space (coreset baseline)",
    HerdingConfig,
    _run_herding,
    "Welling, ICML 2009; greedy form of Rebuffi et al., iCaRL, CVPR 2017 (Alg. 4).",
)
DC = ImageRecipe(
    "data-dc",
    "Gradient matching (DC) with differentiable Siamese augmentation (DSA)",
    DCConfig,
    _run_dc,
    "Zhao, Mopuri & Bilen, ICLR 2021 (Alg. 1, Eq. 10); Zhao & Bilen, ICML 2021 (Eq. 4).",
)
DM = ImageRecipe(
    "data-dm",
    "Distribution matching (DM) in random networks' embeddings",
    DMConfig,
    _run_dm,
    "Zhao & Bilen, Dataset Condensation with Distribution Matching, WACV 2023 (Eq. 4).",
)
MTT = ImageRecipe(
    "data-mtt",
    "Matching training trajectories (MTT) with a learnable student step size",
    MTTConfig,
    _run_mtt,
    "Cazenavette et al., Dataset Distillation by Matching Training Trajectories, CVPR 2022 "
    "(Alg. 1, Eq. 1-2).",
)
FTD = ImageRecipe(
    "data-ftd",
    "Flat trajectory distillation (FTD): SAM-trained experts + EMA of the synthetic images",
    FTDConfig,
    _run_ftd,
    "Du et al., Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation, "
    "CVPR 2023; GSAM: Zhuang et al., ICLR 2022 (Alg. 1).",
)

RECIPES: dict[str, ImageRecipe] = {r.name: r for r in (RANDOM, HERDING, DC, DM, MTT, FTD)}
