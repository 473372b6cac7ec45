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


# --- T5 / Gemma-style text encoders (PixArt, SANA, Flux) ------------------------------------
# The characters a tiny sentencepiece-style vocabulary holds: printable ASCII and the
# word-start marker; anything else becomes the unknown token.
_PIECES = [chr(c) for c in range(32, 127)] + ["\u2581"]


def t5_tokenizer():
    """A T5 tokenizer (transformers' tokenizers-backed ``T5Tokenizer``: Unigram model with
    T5's ``<pad>``=0, ``</s>``=1, ``<unk>``=2) whose pieces are single characters, built
    from a vocabulary list (no sentencepiece file, no download)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in _PIECES]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_text_encoder(tokenizer, width: int = 32):
    """A 2-layer ``T5EncoderModel`` of ``width`` channels (as PixArt and Flux use)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(cfg)


def gemma_tokenizer():
    """A Gemma tokenizer (BPE, no merges) whose tokens are single characters."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for c in _PIECES:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def gemma2_text_encoder(tokenizer, width: int = 16):
    """A 1-layer ``Gemma2Model`` (SANA's decoder-only text encoder) of ``width`` channels."""
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    return Gemma2Model(cfg)


def tiny_dc_vae(latent_channels: int = 4):
    """A 3-stage deep-compression autoencoder (SANA's ``AutoencoderDC``): 4x downsampling,
    so SANA's 32-pixel multiple of image size gives 8-pixel latents."""
    from diffusers import AutoencoderDC

    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=4,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def pixart_pipeline(
    folder: Path, sigma: bool = False, learned_sigma: bool = True, seed: int = 0, size: int = 8
):
    """A PixArt-alpha-style pipeline (``PixArtTransformer2DModel`` on the DDPM table / eps, T5 text
    encoder, KL VAE) over ``size``-pixel latents, saved to ``folder``; ``sigma`` builds the
    PixArt-Sigma pipeline class instead. ``learned_sigma`` gives the transformer PixArt's
    2 x channels output (eps, then the variance interpolation the pipeline discards)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=size,  # not 128: no resolution / aspect-ratio micro-conditions
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=2,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,  # the T5 width
        norm_num_groups=4,
    )
    # PixArt ships DPM-Solver++ over the DDPM linear table it was trained on (the pipeline
    # drops the variance half before the scheduler sees the output)
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon"
    )
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        tokenizer=tok,
        text_encoder=t5_text_encoder(tok),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(folder))
    return pipe


def sana_pipeline(folder: Path, seed: int = 0, size: int = 8):
    """A SANA-style flow-matching pipeline (``SanaTransformer2DModel``, Gemma2 text encoder,
    ``AutoencoderDC``) over ``size``-pixel latents, saved to ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    torch.manual_seed(seed)
    tok = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,  # the Gemma2 width
        sample_size=size,
    )
    pipe = SanaPipeline(
        tokenizer=tok,
        text_encoder=gemma2_text_encoder(tok),
        vae=tiny_dc_vae(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(str(folder))
    return pipe


def flux_pipeline(folder: Path, guidance_embeds: bool = True, seed: int = 0):
    """A Flux-style pipeline (``FluxTransformer2DModel`` over 2x2-packed latents with a
    CLIP pooled vector and a T5 sequence, flow matching with resolution-dependent shift,
    guidance embedding when ``guidance_embeds`` as in FLUX.1-dev), saved to ``folder``.
    Flux has no default latent size of its own: sample with ``height``/``width``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(folder / "_tokenizer_src")
    t5_tok = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 width
        pooled_projection_dim=32,  # the CLIP width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)  # as FLUX.1's VAE
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip_text_encoder(clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=t5_text_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder))
    return pipe
