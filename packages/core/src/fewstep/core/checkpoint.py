"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a folder ``step_XXXXXXXX`` holding ``weights.safetensors`` (every role's
state dict and the student EMA), ``optimizer.safetensors`` (optimizer tensors) and
``state.json`` (step, optimizer structure, history). The folder is written under a
temporary name and renamed; ``latest.json`` is replaced atomically only afterwards, so a
run killed at any moment resumes from its last complete checkpoint. Nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fewstep.core.io import atomic_write_json

LATEST = "latest.json"


def split_tensors(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Move every tensor of a nested structure into ``out`` (keyed by its path) and return
    a JSON-able skeleton that ``join_tensors`` turns back into the structure."""
    if isinstance(obj, Tensor):
        out[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__items__": [[k, split_tensors(v, f"{prefix}/{k}", out)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def join_tensors(skel: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__items__" in skel:
            return {k: join_tensors(v, tensors) for k, v in skel["__items__"]}
        if "__tuple__" in skel:
            return tuple(join_tensors(v, tensors) for v in skel["__tuple__"])
    if isinstance(skel, list):
        return [join_tensors(v, tensors) for v in skel]
    return skel


def module_tensors(modules: dict[str, torch.nn.Module | Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Every module's state dict under ``<name>.``; a mapping stands for a state dict already
    taken (the full tensors a sharded run gathered)."""
    out = {}
    for name, m in modules.items():
        for k, v in (m if isinstance(m, Mapping) else m.state_dict()).items():
            out[f"{name}.{k}"] = v.detach().cpu().contiguous().clone()
    return out


def save_checkpoint(
    root: Path,
    step: int,
    modules: dict[str, torch.nn.Module | Mapping[str, Tensor]],
    optimizers: dict,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write a checkpoint folder atomically. ``modules`` and ``optimizers`` values may be the
    objects or their (already gathered) state dicts."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp_{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(module_tensors(modules), str(tmp / "weights.safetensors"))
    opt_tensors: dict[str, Tensor] = {}
    skel = {
        r: split_tensors(o if isinstance(o, Mapping) else o.state_dict(), f"opt/{r}", opt_tensors)
        for r, o in optimizers.items()
    }
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "state.json", {**state, "step": step, "optimizers": skel})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_json(root / LATEST, {"step": step, "path": name})
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest.json`` names or, when it is missing or names a folder that is gone
    (a run killed after renaming its first step folder but before writing ``latest.json``,
    or while replacing a folder of the same step), the newest complete ``step_*`` folder.
    ``.tmp_*`` folders are never complete."""
    root = Path(root)
    f = root / LATEST
    if f.exists():
        path = root / json.loads(f.read_text())["path"]
        if (path / "state.json").exists():
            return path
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def _load_module(m: torch.nn.Module, sd: dict[str, Tensor]) -> None:
    m.load_state_dict(sd, strict=True)


def _load_optimizer(o: torch.optim.Optimizer, sd: dict) -> None:
    o.load_state_dict(sd)


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict | None = None,
    load_module: Callable[[torch.nn.Module, dict], None] = _load_module,
    load_optimizer: Callable[[torch.optim.Optimizer, dict], None] = _load_optimizer,
) -> dict:
    """Load weights (strictly) and optimizer states into the given objects; return state.
    ``load_module`` / ``load_optimizer`` put a full state dict into an object (a sharded
    run cuts it into each rank's slice, see ``fewstep.core.fsdp``)."""
    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    for name, m in modules.items():
        prefix = f"{name}."
        sd = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        load_module(m, sd)
    state = json.loads((path / "state.json").read_text())
    if optimizers:
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        for r, o in optimizers.items():
            load_optimizer(o, join_tensors(state["optimizers"][r], opt_tensors))
    return state
