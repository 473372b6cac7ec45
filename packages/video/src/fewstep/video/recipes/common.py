"""Small pieces every video recipe uses: the device choice, side-by-side GIF tiles and the
merge of fresh evaluation figures into a run's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; any other name unchanged."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def tile_videos(video: Tensor) -> Tensor:
    """(B, T, C, H, W) -> (T, C, H, B * W): the videos side by side, clamped to the data
    range [-1, 1] (a few-step sample may overshoot it)."""
    return video.detach().cpu().clamp(-1, 1).permute(1, 2, 3, 0, 4).flatten(3)


def merge_metrics(run_dir: Path, metrics: dict) -> dict:
    """Write ``metrics`` over the run's metrics.json, keeping its training figures; return the
    scalar entries (what the CLI prints)."""
    from fewstep.core.io import atomic_write_json

    path = Path(run_dir) / "metrics.json"
    if path.exists():
        metrics = {**json.loads(path.read_text()), **metrics}
    atomic_write_json(path, metrics)
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
