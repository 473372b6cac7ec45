"""The user cache (teachers, feature nets) under ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``.

Entries are safetensors files keyed by a hash of the config that built them, so a changed
config never loads stale weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import nn


def cache_root() -> Path:
    root = os.environ.get("FEWSTEP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fewstep"


def cache_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_module(
    kind: str, spec: dict, module: nn.Module, train: Callable[[nn.Module], dict | None]
) -> tuple[nn.Module, dict, bool]:
    """Load ``module``'s weights for ``spec`` from the cache, or ``train(module)`` and store.

    ``train`` returns a JSON-able info dict kept beside the weights (e.g. training time).
    Returns (module, info, was_cached)."""
    from safetensors.torch import load_file, save_file

    from fewstep.core.io import atomic_write_json

    folder = cache_root() / kind
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(spec)
    weights, meta = folder / f"{key}.safetensors", folder / f"{key}.json"
    if weights.exists() and meta.exists():
        module.load_state_dict(load_file(str(weights)))
        return module, json.loads(meta.read_text()).get("info", {}), True
    info = train(module) or {}
    tmp = folder / f".tmp-{key}-{os.getpid()}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    atomic_write_json(meta, {"spec": spec, "info": info})
    return module, info, False
