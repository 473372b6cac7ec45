"""diffusers video transformers (Wan- and CogVideoX-style 3-D transformer models) as core
``Denoiser``s on fewstep's video layout, loaded from a folder.

fewstep's video tensors are (B, T, C, H, W) (latents here; the VAE stays outside, as in
image latent distillation). Wan takes (B, C, T, H, W) and CogVideoX (B, T, C, H, W); the
adapter permutes, and computes CogVideoX's 3-D rotary embeddings with the pipeline's own
function when the model uses them. The path and prediction come from the scheduler config
saved beside the transformer (``fewstep.core.diffusers_schedulers``): Wan's flow-matching
UniPC / FlowMatch schedulers give rectified flow with velocity; CogVideoX's DDIM gives the
zero-terminal-SNR VP table with v-prediction.

``cond`` is the text encoder's hidden states (B, L, D), or a dict of the model's extra
keyword arguments (``encoder_hidden_states``, Wan's ``encoder_hidden_states_image``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path as FsPath
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.models import Denoiser, _batch_t, _output_of
from fewstep.core.paths import Path

# diffusers class -> layout of its hidden_states (fewstep's is "BTCHW")
VIDEO_TRANSFORMERS = {
    "WanTransformer3DModel": "BCTHW",
    "CogVideoXTransformer3DModel": "BTCHW",
}


def _layout(name: str) -> str:
    """The hidden-states layout of diffusers class ``name``; raises for unsupported ones."""
    if name not in VIDEO_TRANSFORMERS:
        raise ValueError(
            f"unsupported video transformer {name}; expected one of {sorted(VIDEO_TRANSFORMERS)}"
        )
    return VIDEO_TRANSFORMERS[name]


def cogvideox_rotary(transformer: nn.Module, frames: int, height: int, width: int, device):
    """CogVideoX's 3-D rotary embeddings for a latent video of ``frames`` x ``height`` x
    ``width``, from the pipeline's own function (the latents are already VAE-downsampled)."""
    from diffusers import CogVideoXPipeline

    owner = SimpleNamespace(vae_scale_factor_spatial=1, transformer=transformer)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        owner, height, width, frames, device
    )


class DiffusersVideoDenoiser(Denoiser):
    """``forward(x_t (B, T, C, H, W), t, cond) -> (B, T, C, H, W)`` for a Wan- or
    CogVideoX-style transformer; ``features`` mean-pools the tokens after the middle block."""

    def __init__(self, transformer: nn.Module, path: Path, prediction: str):
        super().__init__(path, prediction)
        self.transformer = transformer
        self.layout = _layout(type(transformer).__name__)

    def _kwargs(self, x_t: Tensor, cond: Any) -> dict[str, Any]:
        kwargs = dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        config = self.transformer.config
        if self.layout == "BTCHW" and getattr(config, "use_rotary_positional_embeddings", False):
            _, t, _, h, w = x_t.shape
            kwargs.setdefault(
                "image_rotary_emb", cogvideox_rotary(self.transformer, t, h, w, x_t.device)
            )
        return kwargs

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if x_t.ndim != 5:
            raise ValueError(f"expected video latents (B, T, C, H, W), got {tuple(x_t.shape)}")
        t = _batch_t(t, x_t)
        hidden = x_t.transpose(1, 2) if self.layout == "BCTHW" else x_t
        out = self.transformer(
            hidden_states=hidden, timestep=self.path.network_time(t),
            **self._kwargs(x_t, cond), return_dict=False,
        )[0]  # fmt: skip
        return out.transpose(1, 2) if self.layout == "BCTHW" else out

    def features(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        blocks = self.transformer.transformer_blocks if hasattr(
            self.transformer, "transformer_blocks"
        ) else self.transformer.blocks  # fmt: skip
        out = _output_of(blocks[len(blocks) // 2], lambda: self(x_t, t, cond))
        tokens = out[0] if isinstance(out, tuple) else out  # CogVideoX: (video, text)
        return tokens.mean(dim=1)


def load_video_denoiser(folder: str | FsPath, device: str | torch.device = "cpu"):
    """A frozen ``DiffusersVideoDenoiser`` from a folder holding ``transformer/`` and
    ``scheduler/`` (a saved Wan / CogVideoX pipeline, or just those two sub-folders)."""
    import diffusers

    from fewstep.core.diffusers_schedulers import path_from_scheduler

    folder = FsPath(folder)
    config_file = folder / "transformer" / "config.json"
    sched_file = folder / "scheduler" / "scheduler_config.json"
    for f in (config_file, sched_file):
        if not f.exists():
            raise FileNotFoundError(
                f"{f} is missing: expected a folder with transformer/ and scheduler/ as "
                "diffusers' save_pretrained writes them"
            )
    name = json.loads(config_file.read_text())["_class_name"]
    _layout(name)  # a clear error before loading anything
    transformer = getattr(diffusers, name).from_pretrained(str(folder / "transformer"))
    path, prediction = path_from_scheduler(json.loads(sched_file.read_text()))
    den = DiffusersVideoDenoiser(transformer.to(device), path, prediction)
    return den.requires_grad_(False).eval()
