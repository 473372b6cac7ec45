"""The SR network: a small diffusers ``UNet2DModel`` that sees the trajectory state x_t and
the bicubic-upsampled LR image y, and is conditioned on the trajectory time t.

Two ways to feed it (``encoder``):

- ``unshuffle`` (default; CTMSR's ``use_enc`` encoder is a PixelUnshuffle too): x_t and y
  are space-to-depth'ed by the scale, concatenated (2 C s^2 channels) and the UNet runs at
  LR resolution; its C s^2 output channels are pixel-shuffled back to HR. s^2 times fewer
  pixels per layer, which is what makes CPU training affordable.
- ``concat``: x_t and y concatenated as 2 C channels, the UNet runs at HR resolution.

With ``residual`` (the official code's ``res_con``) the output is y + UNet(...), so an
network only learns a correction to the bicubic image. The UNet's timestep input is 1000 t
(its sinusoidal embedding expects diffusers' 0..1000 scale). The raw output F is turned
into the consistency function f = c_skip x_t + c_out F by
``fewstep.image.sr.ctmsr.SRConsistencyFunction``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NET_FILE = "sr_net.json"


@dataclass
class SRNetConfig:
    channels: tuple[int, ...] = (32, 64)  # block_out_channels, one per resolution
    layers_per_block: int = 1  # ResNet layers per block
    attention: bool = False  # self-attention in the lowest-resolution block
    norm_groups: int = 8  # GroupNorm groups (must divide every channel count)
    encoder: Literal["unshuffle", "concat"] = "unshuffle"  # how x_t and y enter (see above)
    residual: bool = True  # F = y + UNet output (the official SongUNet's res_con option)


def build_unet(cfg: SRNetConfig, image_channels: int, hr_size: int, scale: int):
    """The UNet2DModel for ``image_channels``-channel HR images of side ``hr_size``."""
    from diffusers import UNet2DModel

    if cfg.encoder not in ("unshuffle", "concat"):
        raise ValueError(f"encoder must be 'unshuffle' or 'concat', got {cfg.encoder!r}")
    if not cfg.channels or any(c % cfg.norm_groups for c in cfg.channels):
        raise ValueError(
            f"norm_groups {cfg.norm_groups} must divide every channel count in {cfg.channels}"
        )
    factor = scale * scale if cfg.encoder == "unshuffle" else 1
    size = hr_size // scale if cfg.encoder == "unshuffle" else hr_size
    levels = len(cfg.channels)
    if size % 2 ** (levels - 1):
        raise ValueError(
            f"a {levels}-level UNet needs its input side ({size} px with the {cfg.encoder!r} "
            f"encoder) divisible by {2 ** (levels - 1)}; use fewer channel levels"
        )
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=size,
        in_channels=2 * image_channels * factor,
        out_channels=image_channels * factor,
        block_out_channels=tuple(cfg.channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
    )


class SRNet(nn.Module):
    """``net(x_t, t, y) -> F``: raw output (B, C, H, W) for x_t, y (B, C, H, W), t (B,)."""

    def __init__(self, unet: nn.Module, encoder: str, scale: int, residual: bool = True):
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.scale = scale
        self.residual = residual

    @classmethod
    def build(cls, cfg: SRNetConfig, image_channels: int, hr_size: int, scale: int) -> SRNet:
        unet = build_unet(cfg, image_channels, hr_size, scale)
        return cls(unet, cfg.encoder, scale, cfg.residual)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if x_t.shape != y.shape:
            raise ValueError(
                f"x_t {tuple(x_t.shape)} and the upsampled LR y {tuple(y.shape)} must match"
            )
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        if self.encoder == "unshuffle":  # each image separately: channels stay (x_t | y)
            h = torch.cat([F.pixel_unshuffle(x_t, self.scale), F.pixel_unshuffle(y, self.scale)], 1)
        else:
            h = torch.cat([x_t, y], dim=1)
        out = self.unet(h, 1000.0 * t, return_dict=False)[0]
        if self.encoder == "unshuffle":
            out = F.pixel_shuffle(out, self.scale)
        return y + out if self.residual else out

    # --- saving: a diffusers folder (safetensors) plus how to feed it ----------------------
    def save(self, folder: str | Path) -> Path:
        from fewstep.core.io import atomic_write_json

        folder = Path(folder)
        self.unet.save_pretrained(str(folder), safe_serialization=True)
        meta = {"encoder": self.encoder, "scale": self.scale, "residual": self.residual}
        atomic_write_json(folder / NET_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SRNet:
        from diffusers import UNet2DModel

        folder = Path(folder)
        if not (folder / NET_FILE).exists():
            raise FileNotFoundError(f"{folder} is not a saved SR network (no {NET_FILE})")
        meta = json.loads((folder / NET_FILE).read_text())
        unet = UNet2DModel.from_pretrained(str(folder))
        return cls(unet, meta["encoder"], meta["scale"], meta["residual"])
