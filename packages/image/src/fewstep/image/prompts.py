"""Prompt sets for text-to-image distillation: prompt files, cached text embeddings, and the
prompt-only (image-free) data source the trainer draws conditions from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from fewstep.core.batch import index_cond


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {p} not found (expected a text file, one per line)")
    prompts = [s.strip() for s in p.read_text().splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} has no prompts (one per line; '#' starts a comment)")
    return prompts


def expand_cond(cond: Any, n: int) -> Any:
    """A one-row condition repeated to ``n`` rows."""
    if isinstance(cond, dict):
        return {k: expand_cond(v, n) for k, v in cond.items()}
    return cond.expand(n, *cond.shape[1:])


def _flatten(cond: Any, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(cond, dict):
        return {k2: v2 for k, v in cond.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
    return {prefix.rstrip("/") or "cond": cond}


def _unflatten(flat: dict[str, Tensor]) -> Any:
    if list(flat) == ["cond"]:
        return flat["cond"]
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def cached_embeddings(pipe, prompts: list[str], teacher_id: str) -> Any:
    """``encode_prompts`` for ``prompts``, cached under the user cache folder by teacher and
    prompt set (text encoders are frozen, so the embeddings never change)."""
    from safetensors.torch import load_file, save_file

    from fewstep.core.cache import cache_root
    from fewstep.image.pipelines import encode_prompts

    key = hashlib.sha256(json.dumps([teacher_id, prompts]).encode()).hexdigest()[:20]
    file = cache_root() / "prompt-embeddings" / f"{key}.safetensors"
    if file.exists():
        return _unflatten({k: v.to(pipe.device) for k, v in load_file(str(file)).items()})
    cond = encode_prompts(pipe, prompts)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in _flatten(cond).items()}, str(tmp))
    tmp.replace(file)
    return cond


@dataclass
class PromptData:
    """Prompt-only (image-free) batches: no samples, conditions drawn with replacement
    from the cached embeddings of a prompt set (SwiftBrush-style data-free distillation)."""

    cond: Any  # (P, ...) tensor or dict of them: the prompts' embeddings
    shape: tuple[int, ...]  # latent shape of one sample (C, H, W)

    def __len__(self) -> int:
        return len(next(iter(_flatten(self.cond).values())))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def __call__(self, rng):
        idx = rng.randint(0, len(self)).cpu()
        return None, index_cond(self.cond, idx)


def null_cond_fn(null: Any):
    """CFG's unconditional input for a batch: the empty prompt's embedding, repeated."""

    def null_cond(cond: Any) -> Any:
        n = len(next(iter(_flatten(cond).values())))
        return expand_cond(null, n)

    return null_cond
