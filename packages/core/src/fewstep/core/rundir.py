"""What every recipe's run folder holds besides its metrics: the resolved config (written by
the CLI) and the student's weights with a small JSON of what sampling needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.cli import RUN_CONFIG

STUDENT_FILE = "student.safetensors"  # weights, safetensors (never pickle)
STUDENT_META = "student.json"  # step times, noise scales, ...: what sampling needs


def save_student(out_dir: str | Path, parts: dict[str, nn.Module | dict], meta: dict) -> None:
    """Write modules (or plain tensor dicts), keyed ``<part>.<name>``, and ``meta``,
    atomically. One part named "" stores its tensors without a prefix."""
    from safetensors.torch import save

    from fewstep.core.io import atomic_write_bytes, atomic_write_json

    state: dict[str, Tensor] = {}
    for part, obj in parts.items():
        tensors = obj.state_dict() if isinstance(obj, nn.Module) else obj
        for k, v in tensors.items():
            state[f"{part}.{k}" if part else k] = torch.as_tensor(v).detach().cpu().contiguous()
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / STUDENT_FILE, save(state))
    atomic_write_json(out_dir / STUDENT_META, meta)


def load_student(run_dir: str | Path, part: str = "") -> tuple[dict[str, Tensor], dict]:
    """(tensors of ``part`` with its prefix removed, meta) of a run folder's student."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    file = run_dir / STUDENT_FILE
    if not file.exists():
        raise FileNotFoundError(f"{run_dir} holds no trained student ({STUDENT_FILE} missing)")
    state = load_file(str(file))
    if part:
        state = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
    return state, json.loads((run_dir / STUDENT_META).read_text())


def load_run_config(run_dir: str | Path, config_cls: type) -> tuple[Any, dict]:
    """(the recipe config the run used, the whole resolved config.json)."""
    from fewstep.core.config import from_dict

    file = Path(run_dir) / RUN_CONFIG
    if not file.exists():
        raise FileNotFoundError(f"{run_dir} is not a fewstep run folder (no {RUN_CONFIG})")
    resolved = json.loads(file.read_text())
    return from_dict(config_cls, resolved["config"]), resolved
