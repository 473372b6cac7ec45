"""Tiny diffusers pipelines built from configs, with no downloads (tests and benchmarks):
a byte-level CLIP tokenizer written here, CLIP text encoders, a VAE and the denoiser of
each pipeline type."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_TOKENS = 16


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table (every byte as a printable character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_tokenizer(folder: Path):
    """A CLIP tokenizer whose vocabulary is the 256 byte characters (each also as a
    word end) and no merges: every character is one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS
    )


def clip_text_encoder(tokenizer, width: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,  # config metadata only; the VAE is fully convolutional
    )


def sd_pipeline(
    folder: Path, prediction_type: str = "epsilon", seed: int = 0, width: int = 1, size: int = 8
):
    """A Stable-Diffusion-style pipeline (UNet2DConditionModel, CLIP, DDPM scaled_linear
    schedule) over ``size``-pixel latents (images twice that), UNet channels ``width`` x
    (16, 32), saved to ``folder``; returns the pipeline."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(folder / "_tokenizer_src")
    unet = UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16 * width, 32 * width),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def sd3_pipeline(folder: Path, seed: int = 0, width: int = 1, size: int = 8):
    """An SD3-style flow-matching pipeline (SD3Transformer2DModel over ``size``-pixel
    latents with ``width`` x 4 heads of 8, two CLIP text encoders, no T5: the pipeline then
    uses zeros for the T5 tokens), saved to ``folder``; returns the pipeline."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    tok = clip_tokenizer(folder / "_tokenizer_src")
    transformer = SD3Transformer2DModel(
        sample_size=size,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4 * width,
        joint_attention_dim=64,  # the two CLIP widths side by side (32 + 32)
        caption_projection_dim=32 * width,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=size,
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_text_encoder(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok, projection=True),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(str(folder))
    return pipe
