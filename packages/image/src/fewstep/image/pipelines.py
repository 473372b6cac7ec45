"""Teachers from diffusers pipeline folders, and students exported back to them.

The pipeline's denoiser (a ``UNet2DConditionModel``, or a ``*Transformer2DModel``: SD3, PixArt,
SANA, Flux) becomes a core ``Denoiser`` on the path its scheduler defines; the VAE and text encoders
stay frozen inside the pipeline and are shared by teacher, student and critics, so
distillation runs in latent space on cached text embeddings. The student is exported as a
copy of the pipeline with the student's network and a few-step scheduler, loadable with
``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.diffusers_schedulers import is_flow_config, path_from_scheduler
from fewstep.core.models import Denoiser, DiffusersUNetDenoiser


def load_pipeline(path: str | FsPath, device: str | torch.device = "cpu"):
    """A diffusers pipeline from a local folder, frozen, in eval mode, on ``device``; a
    multi-student folder (``routing.json`` beside K pipelines) loads as a
    ``MultiStudentPipeline``."""
    from diffusers import DiffusionPipeline

    folder = FsPath(path)
    from fewstep.image.multi_student import ROUTING_FILE, MultiStudentPipeline

    if (folder / ROUTING_FILE).exists():
        return MultiStudentPipeline.from_pretrained(folder, device)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (expected model_index.json, as "
            "written by DiffusionPipeline.save_pretrained)"
        )
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent_components(folder))
    pipe.to(device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def absent_components(folder: str | FsPath) -> dict[str, None]:
    """Components a saved pipeline was built without (e.g. SD3 with no T5 encoder): diffusers
    saves them as ``[null, null]`` and only loads the folder when they are passed as None."""
    import json

    index = json.loads((FsPath(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}


def network_name(pipe) -> str:
    """The pipeline component that is the denoiser: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer component")


def _flux_adapter(net, path, prediction, pipe):
    from fewstep.image.transformer_adapters import FluxDenoiser

    return FluxDenoiser(net, path, prediction)


def _latent_transformer_adapter(net, path, prediction, pipe):
    from fewstep.image.transformer_adapters import LatentTransformerDenoiser

    return LatentTransformerDenoiser(net, path, prediction, pixels_per_latent=vae_factor(pipe))


def _unet_adapter(net, path, prediction, pipe):
    return DiffusersUNetDenoiser(net, path, prediction)


# denoiser network class -> (net, path, prediction, pipe) -> core Denoiser; transformers not
# named here (SD3, PixArt, SANA) take the latent-transformer adapter
DENOISER_ADAPTERS: dict[str, Callable[..., Denoiser]] = {
    "UNet2DConditionModel": _unet_adapter,
    "FluxTransformer2DModel": _flux_adapter,
}


def teacher_denoiser(pipe) -> Denoiser:
    """The pipeline's denoiser as a core ``Denoiser`` (frozen; it is the pipeline's own)."""
    path, prediction = path_from_scheduler(pipe.scheduler.config)
    net = getattr(pipe, network_name(pipe))
    adapter = DENOISER_ADAPTERS.get(type(net).__name__, _latent_transformer_adapter)
    return adapter(net, path, prediction, pipe)


def denoiser_network(den: nn.Module) -> nn.Module:
    """The diffusers network inside a denoiser adapter (``unet`` or ``transformer``)."""
    for name in ("unet", "transformer"):
        if isinstance(getattr(den, name, None), nn.Module):
            return getattr(den, name)
    raise ValueError(f"{type(den).__name__} wraps neither a unet nor a transformer")


# --- text conditions -------------------------------------------------------------------------
def _encode_sd(pipe, prompts: list[str]) -> Tensor:
    embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    return embeds


def _encode_sd3(pipe, prompts: list[str]) -> dict[str, Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, device=pipe.device, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def call_default(pipe, name: str) -> Any:
    """The default of ``pipe.__call__``'s argument ``name``: prompts are encoded for
    distillation exactly as the pipeline encodes them when sampling."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters[name].default


def _encode_t5_masked(pipe, prompts: list[str], **extra) -> dict[str, Tensor]:
    """PixArt / SANA: the text tokens and their attention mask (both reach the transformer);
    no caption cleaning (see ``CALL_DEFAULTS``)."""
    embeds, mask, _, _ = pipe.encode_prompt(
        prompts,
        do_classifier_free_guidance=False,
        device=pipe.device,
        clean_caption=False,
        max_sequence_length=call_default(pipe, "max_sequence_length"),
        **extra,
    )
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def _encode_pixart(pipe, prompts: list[str]) -> dict[str, Tensor]:
    return _encode_t5_masked(pipe, prompts)


def _encode_sana(pipe, prompts: list[str]) -> dict[str, Tensor]:
    # SanaPipeline prefixes every prompt with its "complex human instruction" by default
    chi = call_default(pipe, "complex_human_instruction")
    return _encode_t5_masked(pipe, prompts, complex_human_instruction=chi)


def _encode_flux(pipe, prompts: list[str]) -> dict[str, Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(
        prompts,
        prompts,
        device=pipe.device,
        max_sequence_length=call_default(pipe, "max_sequence_length"),
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


# pipeline class -> prompts -> the denoiser's condition (what its forward takes besides x, t)
PROMPT_ENCODERS: dict[str, Callable[[Any, list[str]], Any]] = {
    "StableDiffusionPipeline": _encode_sd,
    "StableDiffusion3Pipeline": _encode_sd3,
    "PixArtAlphaPipeline": _encode_pixart,
    "PixArtSigmaPipeline": _encode_pixart,
    "SanaPipeline": _encode_sana,
    "FluxPipeline": _encode_flux,
}

_NO_BINNING = {"use_resolution_binning": False, "clean_caption": False}
# pipeline class -> keyword arguments every call needs: PixArt / SANA snap sizes to their
# aspect-ratio bins (only defined for their released sample sizes) and would clean captions
# with bs4/ftfy when installed; fewstep samples at the size it distilled, on raw prompts
CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "PixArtAlphaPipeline": _NO_BINNING,
    "PixArtSigmaPipeline": _NO_BINNING,
    "SanaPipeline": _NO_BINNING,
}


# pipelines whose default image size is a fixed 1024 pixels, not the transformer's sample size
SIZE_FROM_MODEL = ("SanaPipeline",)


def call_kwargs(pipe) -> dict[str, Any]:
    """Keyword arguments every call of ``pipe`` gets from fewstep: ``CALL_DEFAULTS`` for its
    class, and for ``SIZE_FROM_MODEL`` pipelines the image size of the model's own
    ``sample_size`` (as SD and PixArt default to)."""
    kw = dict(CALL_DEFAULTS.get(type(pipe).__name__, {}))
    if type(pipe).__name__ in SIZE_FROM_MODEL:
        side = latent_shape(pipe)[-1] * vae_factor(pipe)
        kw.update(height=side, width=side)
    if _guidance_embedded(pipe):
        from fewstep.image.transformer_adapters import FLUX_GUIDANCE

        # the guidance value FluxDenoiser embeds: the pipeline samples what fewstep distils
        kw["guidance_scale"] = FLUX_GUIDANCE
    return kw


def _guidance_embedded(pipe) -> bool:
    net = getattr(pipe, "transformer", None)
    return type(net).__name__ == "FluxTransformer2DModel" and bool(net.config.guidance_embeds)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 64) -> Any:
    """The denoiser's conditions for ``prompts`` (a tensor or a dict of tensors, first
    dimension = prompt), from the pipeline's own frozen text encoders."""
    kind = type(pipe).__name__
    if kind not in PROMPT_ENCODERS:
        raise ValueError(
            f"no prompt encoder for {kind}; supported pipelines: {sorted(PROMPT_ENCODERS)}"
        )
    parts = [
        PROMPT_ENCODERS[kind](pipe, prompts[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def vae_factor(pipe) -> int:
    """Pixels per latent along each side."""
    if getattr(pipe, "vae_scale_factor", None):
        return int(pipe.vae_scale_factor)
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the latents for square images of ``resolution`` pixels
    (default: the denoiser's own ``sample_size``; for Flux, whose transformer has none, the
    pipeline's ``default_sample_size``). Flux latents are (in_channels / 4) channels at an
    even size: the adapter packs them into 2x2 tokens."""
    net = getattr(pipe, network_name(pipe))
    if type(net).__name__ == "FluxTransformer2DModel":
        f = vae_factor(pipe)
        pixels = resolution or pipe.default_sample_size * f
        size = 2 * (pixels // (2 * f))  # as FluxPipeline.prepare_latents
        return (net.config.in_channels // 4, size, size)
    size = net.config.sample_size if resolution is None else resolution // vae_factor(pipe)
    return (net.config.in_channels, size, size)


@torch.no_grad()
def decode(pipe, latents: Tensor) -> Tensor:
    """Images in [-1, 1] from latents as the denoiser sees them (inverse of the VAE's shift
    and scale)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(pipe.device, vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z).sample.float().clamp(-1, 1).cpu()


# --- LoRA --------------------------------------------------------------------------------
# attention projections, the default of diffusers' LoRA training scripts and of LCM-LoRA
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(net: nn.Module, rank: int, alpha: float = 0.0, targets=LORA_TARGETS) -> nn.Module:
    """Freeze ``net`` and give it trainable LoRA adapters through peft (diffusers'
    ``add_adapter``); B starts at zero, so the adapted network starts as ``net``."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not hasattr(net, "add_adapter"):  # e.g. PixArtTransformer2DModel in diffusers 0.42
        raise ValueError(
            f"{type(net).__name__} has no diffusers LoRA support (PeftAdapterMixin); distil "
            "full weights (--lora-rank 0)"
        )
    net.requires_grad_(False)
    net.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )
    )
    return net


def has_lora(net: nn.Module) -> bool:
    return bool(getattr(net, "peft_config", None))


def merged(net: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-adapted network with the adapters folded into its weights."""
    import copy

    out = copy.deepcopy(net)
    if has_lora(out):
        out.fuse_lora()
        out.unload_lora()
    return out


def save_lora(pipe, net: nn.Module, out_dir: str | FsPath) -> FsPath:
    """The adapters alone, in the pipeline class's own LoRA format (``pipe.load_lora_weights``
    reads them onto the teacher's pipeline)."""
    from peft.utils import get_peft_model_state_dict

    out = FsPath(out_dir)
    layers = {f"{network_name(pipe)}_lora_layers": get_peft_model_state_dict(net)}
    type(pipe).save_lora_weights(str(out), **layers)
    return out


# --- export -------------------------------------------------------------------------------
def _is_flow(pipe) -> bool:
    return is_flow_config(pipe.scheduler.config)


def student_scheduler(pipe):
    """A stock diffusers scheduler that samples the student as fewstep does: predict x0,
    re-noise to the next time with fresh noise. LCMScheduler on DDPM-family paths (c_skip
    at its times is < 1e-7, so each step is the x0 prediction); FlowMatchEuler with
    ``stochastic_sampling``, no shift and no resolution-dependent (Flux) shift on flow
    matching (x0 = x - sigma v, then (1 - sigma') x0 + sigma' noise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if _is_flow(pipe):
        return FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=1.0, stochastic_sampling=True, use_dynamic_shifting=False
        )
    return LCMScheduler.from_config(pipe.scheduler.config)


def student_times(pipe, steps: int) -> tuple[float, ...]:
    """The student's step times as path fractions (1 = noise), the grid its exported
    scheduler uses: LCM's own timesteps for ``steps`` (e.g. 999, 499 for two) on DDPM-family
    paths; evenly spaced sigmas 1, 1 - 1/k, ... on flow matching (passed to the pipeline as
    ``sigmas``, see ``pipeline_kwargs``)."""
    if steps < 1:
        raise ValueError(f"student steps must be >= 1, got {steps}")
    if _is_flow(pipe):
        return tuple(1.0 - i / steps for i in range(steps))
    sch = student_scheduler(pipe)
    sch.set_timesteps(steps)
    t_max = sch.config.num_train_timesteps - 1
    return tuple(float(t) / t_max for t in sch.timesteps)


STUDENT_FILE = "fewstep_student.json"


def pipeline_kwargs(folder: str | FsPath, steps: int | None = None) -> dict:
    """Keyword arguments that make an exported student pipeline sample on its training grid:
    ``num_inference_steps``, plus ``sigmas`` for flow-matching students."""
    import json

    info = json.loads((FsPath(folder) / STUDENT_FILE).read_text())
    extra = dict(info.get("call", {}))  # e.g. Flux's embedded guidance_scale
    if steps is not None and steps != info["steps"]:
        return {"num_inference_steps": steps, **extra}  # the scheduler's own grid
    kw = {"num_inference_steps": info["steps"], **extra}
    if info.get("sigmas"):
        kw["sigmas"] = info["sigmas"]
    return kw


def export_student(
    pipe, student: nn.Module, out_dir: str | FsPath, times: tuple[float, ...] = (1.0,)
) -> FsPath:
    """Save a copy of ``pipe`` whose denoiser is ``student`` (the bare diffusers network;
    LoRA adapters are merged) and whose scheduler is ``student_scheduler(pipe)``, with
    ``fewstep_student.json`` recording the step ``times`` it was trained for (path
    fractions; see ``pipeline_kwargs``); returns the folder."""
    import json

    out = FsPath(out_dir)
    name = network_name(pipe)
    components = dict(pipe.components)
    components[name] = merged(student).eval()
    components["scheduler"] = student_scheduler(pipe)
    type(pipe)(**components).save_pretrained(str(out))
    info: dict[str, Any] = {"steps": len(times), "times": list(times)}
    if _is_flow(pipe) and len(times) > 1:
        info["sigmas"] = list(times)  # flow matching: sigma = t
    if _guidance_embedded(pipe):  # the embedded guidance the student was distilled with
        info["call"] = {"guidance_scale": call_kwargs(pipe)["guidance_scale"]}
    (out / STUDENT_FILE).write_text(json.dumps(info, indent=2))
    return out
