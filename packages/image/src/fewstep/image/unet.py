"""A small class-conditional diffusers UNet2DModel for 8x8 digits."""

from __future__ import annotations

from dataclasses import dataclass

from fewstep.image.digits import NUM_CLASSES


@dataclass
class DigitsUNetConfig:
    channels: tuple[int, ...] = (16, 32)  # block_out_channels, one per resolution
    layers_per_block: int = 1  # ResNet layers per block
    attention: bool = False  # self-attention in the lowest-resolution block
    norm_groups: int = 4  # GroupNorm groups


def digits_unet(cfg: DigitsUNetConfig):
    from diffusers import UNet2DModel

    n = len(cfg.channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=cfg.layers_per_block,
        num_class_embeds=NUM_CLASSES + 1,  # + the null class for classifier-free guidance
        norm_num_groups=cfg.norm_groups,
    )
