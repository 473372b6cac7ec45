"""Negative prompts for one-step students through cross-attention: SNOOPI's Negative-Away
Steer Attention (NASA; Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance", sec. 4.2).

A one-step student has no second pass to spend on classifier-free guidance, so NASA steers
inside every cross-attention layer instead: with the same query Q (from the image tokens), the
layer attends once to the prompt and once to the negative prompt and keeps the difference,

    Z_NASA = softmax(Q K+^T / sqrt(d)) V+  -  alpha * softmax(Q K-^T / sqrt(d)) V-,

before the layer's output projection (K±, V± are the layer's own key/value projections of the
prompt and negative-prompt embeddings; no new weights). Self-attention is untouched.

Installed with ``set_attn_processor`` on the cross-attention layers of a diffusers UNet
(``attn2`` of SD-style UNets); the negative embeddings live on a shared ``NasaState`` rather
than in ``cross_attention_kwargs``, so a stock ``DiffusionPipeline.__call__`` samples with it
unchanged and self-attention processors see no unexpected keyword. Transformer pipelines
(SD3's joint attention mixes text and image tokens in one softmax, so there is no separate
cross-attention to steer) are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class NasaState:
    """What every NASA processor of one network reads at call time."""

    alpha: float = 0.0  # strength of the negative attention (0 = the stock layer)
    negative: Tensor | None = None  # negative-prompt embeddings (1 or B, L, D); None = off


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def attend(attn, query: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention of ``query`` (B, H, N, d; already projected and split) over
    ``context`` (B, L, D; raw embeddings, projected here by the layer's to_k / to_v); returns
    the attention features (B, N, H*d) before the output projection."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = _heads(attn.to_k(context), attn.heads), _heads(attn.to_v(context), attn.heads)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    z = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
    b, h, n, d = z.shape
    return z.transpose(1, 2).reshape(b, n, h * d).to(query.dtype)


def match_batch(negative: Tensor, batch: int) -> Tensor:
    """Negative embeddings (1 or ``batch``, L, D) as (batch, L, D)."""
    if negative.shape[0] == batch:
        return negative
    if negative.shape[0] == 1:
        return negative.expand(batch, *negative.shape[1:])
    raise ValueError(
        f"NASA negative embeddings have batch {negative.shape[0]}; expected 1 or the "
        f"layer's batch {batch} (one negative prompt, or one per image)"
    )


class NasaAttnProcessor:
    """A cross-attention processor computing ``to_out(Z+ - alpha Z-)`` (SNOOPI sec. 4.2).

    With ``state.alpha == 0`` or no negative embeddings it calls the layer's previous
    processor (``base``), so NASA off is exactly the stock layer."""

    def __init__(self, state: NasaState, base: Any):
        self.state = state
        self.base = base

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        neg, alpha = self.state.negative, self.state.alpha
        if alpha == 0 or neg is None or encoder_hidden_states is None:
            extra = {"temb": temb} if temb is not None else {}
            return self.base(
                attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("NASA supports cross-attention layers without spatial/group norm")
        residual = hidden_states
        shape = hidden_states.shape
        if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = _heads(attn.to_q(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attention_mask is not None:  # the prompt's mask; the negative prompt attends fully
            length = encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        neg = match_batch(neg.to(encoder_hidden_states), batch)
        z = attend(attn, query, encoder_hidden_states, attention_mask) - alpha * attend(
            attn, query, neg
        )
        out = attn.to_out[1](attn.to_out[0](z))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_names(net: nn.Module) -> list[str]:
    """Processor names (``...attn2.processor``) of the cross-attention layers of ``net``."""
    names = []
    for name in net.attn_processors:
        layer = net.get_submodule(name.removesuffix(".processor"))
        if getattr(layer, "is_cross_attention", False):
            names.append(name)
    return names


class NasaHandle:
    """NASA installed on a network: set ``state.negative`` / ``state.alpha``; ``remove()``
    puts the previous processors back."""

    def __init__(self, net: nn.Module, state: NasaState, previous: dict[str, Any]):
        self.net, self.state, self.previous = net, state, previous

    def remove(self) -> None:
        self.net.set_attn_processor(dict(self.previous))


def install_nasa(net: nn.Module, alpha: float = 0.0, negative: Tensor | None = None) -> NasaHandle:
    """Replace the cross-attention processors of a diffusers UNet with NASA processors sharing
    one ``NasaState``; self-attention keeps its processors."""
    if not hasattr(net, "attn_processors"):
        raise TypeError(f"{type(net).__name__} has no diffusers attention processors")
    cross = cross_attention_names(net)
    if not cross:
        raise ValueError(
            f"{type(net).__name__} has no separate cross-attention layers; NASA needs a "
            "UNet with text cross-attention (attn2), not a joint-attention transformer"
        )
    previous = dict(net.attn_processors)
    state = NasaState(alpha=alpha, negative=negative)
    new = {k: (NasaAttnProcessor(state, p) if k in cross else p) for k, p in previous.items()}
    net.set_attn_processor(new)
    return NasaHandle(net, state, previous)


@contextmanager
def nasa_attention(net: nn.Module, negative: Tensor, alpha: float) -> Iterator[NasaHandle]:
    """NASA on ``net`` inside the block, the previous processors after it."""
    handle = install_nasa(net, alpha, negative)
    try:
        yield handle
    finally:
        handle.remove()


@torch.no_grad()
def sample_with_nasa(
    pipe,
    prompts: list[str],
    negative_prompts: list[str] | str,
    alpha: float,
    steps: int = 1,
    seed: int = 0,
    output_type: str = "pt",
    **call,
) -> Tensor:
    """Images (``output_type="pt"``: (N, 3, H, W) in [0, 1]) or latents (``"latent"``) from a
    UNet pipeline sampled without CFG, with NASA steering away from ``negative_prompts`` (one
    for all prompts, or one per prompt) at strength ``alpha``; ``call`` goes to the pipeline
    (``sigmas``, ``height``, ...)."""
    from fewstep.image import pipelines as P

    if P.network_name(pipe) != "unet":
        raise ValueError(
            f"NASA needs a UNet pipeline with cross-attention; {type(pipe).__name__} uses "
            "joint attention"
        )
    negs = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negs) not in (1, len(prompts)):
        raise ValueError(f"expected 1 or {len(prompts)} negative prompts, got {len(negs)}")
    negative = P.encode_prompts(pipe, negs).to(pipe.device, pipe.unet.dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with nasa_attention(pipe.unet, negative, alpha):
        out = pipe(
            prompts, num_inference_steps=steps, guidance_scale=1.0, generator=g,
            output_type=output_type, **call,
        )  # fmt: skip
    images = out.images
    return images.float().cpu() if isinstance(images, Tensor) else images
