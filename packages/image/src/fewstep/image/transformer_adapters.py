"""Denoiser adapters for the latent transformers whose forward differs from SD3's: PixArt and
SANA (learned-sigma outputs, micro-conditions, time scale) and Flux (2x2-packed latent
tokens, position ids, guidance embedding). Core always sees (B, C, H, W) latents and the
path's native time; what the diffusers forward wants is built here, as each pipeline's own
denoising loop builds it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.models import DiffusersTransformerDenoiser, _batch_t
from fewstep.core.paths import Path

# FluxPipeline's default ``guidance_scale``: the value guidance-distilled Flux models (dev)
# see in their guidance embedding unless told otherwise
FLUX_GUIDANCE = 3.5


def drop_learned_sigma(out: Tensor, in_channels: int) -> Tensor:
    """(B, 2C, H, W) -> (B, C, H, W): PixArt-alpha / SANA transformers trained with learned
    variance (Nichol & Dhariwal 2021, sec. 3.1) output the prediction, then the variance
    interpolation; the pipelines keep the first half, and so does distillation (the variance
    half plays no part in DDIM-style or few-step sampling). Other outputs pass through."""
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels]
    return out


class LatentTransformerDenoiser(DiffusersTransformerDenoiser):
    """SD3 / PixArt / SANA-style transformers on (B, C, H, W) latents.

    Beyond the base adapter: learned-sigma outputs keep their first half
    (``drop_learned_sigma``), the network time is multiplied by the model's
    ``timestep_scale`` (SANA's config; 1 elsewhere), and PixArt models with micro-conditions
    (``use_additional_conditions``, the 1024-pixel PixArt-alpha) get the image resolution
    and aspect ratio the pipeline would pass, from the latent size times
    ``pixels_per_latent``."""

    def __init__(self, transformer: nn.Module, path: Path, prediction: str, pixels_per_latent=8):
        super().__init__(transformer, path, prediction)
        self.pixels_per_latent = int(pixels_per_latent)
        cfg = transformer.config
        self.time_scale = float(getattr(cfg, "timestep_scale", 1.0) or 1.0)
        self.micro_conditions = type(transformer).__name__ == "PixArtTransformer2DModel"

    def _added_cond(self, x_t: Tensor) -> dict:
        """PixArt's ``added_cond_kwargs``: None entries unless the model uses them."""
        if not getattr(self.transformer, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        b, _, h, w = x_t.shape
        f = self.pixels_per_latent
        res = torch.tensor([h * f, w * f], dtype=x_t.dtype, device=x_t.device).expand(b, 2)
        ratio = torch.full((b, 1), h / w, dtype=x_t.dtype, device=x_t.device)
        return {"resolution": res, "aspect_ratio": ratio}

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        kwargs = dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        if self.micro_conditions:
            kwargs.setdefault("added_cond_kwargs", self._added_cond(x_t))
        out = self.transformer(
            hidden_states=x_t,
            timestep=self.path.network_time(t) * self.time_scale,
            **kwargs,
            return_dict=False,
        )[0]
        return drop_learned_sigma(out, x_t.shape[1])


# --- Flux ---------------------------------------------------------------------------------
def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 patch tokens, channel-major within a
    token (as ``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width; got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of ``pack_latents``."""
    b, n, d = tokens.shape
    if n != (h // 2) * (w // 2) or d % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens into {h}x{w} latents")
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxDenoiser(DiffusersTransformerDenoiser):
    """``FluxTransformer2DModel`` as a denoiser on (B, C, H, W) latents.

    ``cond``: {"encoder_hidden_states": (B, L, D) T5 tokens, "pooled_projections": (B, P)
    CLIP pooled}, optionally "guidance": (B,) for guidance-embedded models. The adapter
    packs the latents into 2x2 tokens, builds the text (zeros) and image position ids,
    passes the time as the sigma in [0, 1] (FluxPipeline passes ``timestep / 1000``; the
    model scales by 1000 itself), and the guidance value ``guidance`` (FluxPipeline's
    ``guidance_scale``) when the model has ``guidance_embeds`` and the condition carries
    none; the output velocity is unpacked back."""

    def __init__(self, transformer: nn.Module, path: Path, prediction: str, guidance=FLUX_GUIDANCE):
        super().__init__(transformer, path, prediction)
        self.guidance = float(guidance)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        # FluxPipeline's 1000-step flow table: network time / 1000 is the sigma in [0, 1]
        self.time_divisor = 1000.0

    def _kwargs(self, x_t: Tensor, cond: Any) -> dict:
        if not isinstance(cond, dict) or not {"encoder_hidden_states", "pooled_projections"} <= set(
            cond
        ):
            raise ValueError(
                "Flux needs cond = {'encoder_hidden_states': T5 tokens, 'pooled_projections': "
                f"CLIP pooled vector}}; got {type(cond).__name__}"
                + (f" with keys {sorted(cond)}" if isinstance(cond, dict) else "")
            )
        kw = dict(cond)
        text = kw["encoder_hidden_states"]
        kw["txt_ids"] = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        kw["img_ids"] = image_ids(*x_t.shape[-2:], device=x_t.device, dtype=x_t.dtype)
        if not self.guidance_embeds:
            kw.pop("guidance", None)
        elif "guidance" not in kw:
            kw["guidance"] = torch.full((x_t.shape[0],), self.guidance, device=x_t.device)
        return kw

    def forward(self, x_t, t, cond=None):
        t = _batch_t(t, x_t)
        out = self.transformer(
            hidden_states=pack_latents(x_t),
            timestep=self.path.network_time(t) / self.time_divisor,
            **self._kwargs(x_t, cond),
            return_dict=False,
        )[0]
        return unpack_latents(out, *x_t.shape[-2:])
