"""Teachers from diffusers pipeline folders, and students exported back to them.

The pipeline's denoiser (a ``UNet2DConditionModel``, or a flow-matching ``*Transformer2DModel``)
becomes a core ``Denoiser`` on the path its scheduler defines; the VAE and text encoders
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

from fewstep.core.models import Denoiser, DiffusersUNetDenoiser
from fewstep.core.paths import Path, RectifiedFlow, VPDiscrete

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def load_pipeline(path: str | FsPath, device: str | torch.device = "cpu"):
    """A diffusers pipeline from a local folder, frozen, in eval mode, on ``device``."""
    from diffusers import DiffusionPipeline

    folder = FsPath(path)
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


def path_from_scheduler(config: Any) -> tuple[Path, str]:
    """(path, prediction kind) that a scheduler config trains on: flow-matching schedulers
    give rectified flow with velocity prediction (time x num_train_timesteps); DDPM-family
    schedulers give diffusers' discrete VP table and their ``prediction_type``."""
    n = int(config.get("num_train_timesteps", 1000))
    if "FlowMatch" in config.get("_class_name", ""):
        return RectifiedFlow(time_scale=float(n)), "velocity"
    pred = config.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {pred!r}; expected {sorted(_PREDICTIONS)}")
    path = VPDiscrete(
        schedule=config.get("beta_schedule", "linear"),
        num_train_timesteps=n,
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
    )
    return path, _PREDICTIONS[pred]


def network_name(pipe) -> str:
    """The pipeline component that is the denoiser: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer component")


def teacher_denoiser(pipe) -> Denoiser:
    """The pipeline's denoiser as a core ``Denoiser`` (frozen; it is the pipeline's own)."""
    from fewstep.core.models import DiffusersTransformerDenoiser

    path, prediction = path_from_scheduler(pipe.scheduler.config)
    name = network_name(pipe)
    net = getattr(pipe, name)
    if name == "unet":
        return DiffusersUNetDenoiser(net, path, prediction)
    return DiffusersTransformerDenoiser(net, path, prediction)


# --- text conditions -------------------------------------------------------------------------
def _encode_sd(pipe, prompts: list[str]) -> Tensor:
    embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    return embeds


def _encode_sd3(pipe, prompts: list[str]) -> dict[str, Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, device=pipe.device, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


# pipeline class -> prompts -> the denoiser's condition (what its forward takes besides x, t)
PROMPT_ENCODERS: dict[str, Callable[[Any, list[str]], Any]] = {
    "StableDiffusionPipeline": _encode_sd,
    "StableDiffusion3Pipeline": _encode_sd3,
}


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
    return getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1))


def latent_shape(pipe, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of the latents for square images of ``resolution`` pixels
    (default: the denoiser's own ``sample_size``)."""
    net = getattr(pipe, network_name(pipe))
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
    return "FlowMatch" in pipe.scheduler.config.get("_class_name", "")


def student_scheduler(pipe):
    """A stock diffusers scheduler that samples the student as fewstep does: predict x0,
    re-noise to the next time with fresh noise. LCMScheduler on DDPM-family paths (c_skip
    at its times is < 1e-7, so each step is the x0 prediction); FlowMatchEuler with
    ``stochastic_sampling`` and no shift on flow matching (x0 = x - sigma v, then
    (1 - sigma') x0 + sigma' noise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if _is_flow(pipe):
        return FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=1.0, stochastic_sampling=True
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
    if steps is not None and steps != info["steps"]:
        return {"num_inference_steps": steps}  # another step count: the scheduler's own grid
    kw = {"num_inference_steps": info["steps"]}
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
    info = {"steps": len(times), "times": list(times)}
    if _is_flow(pipe) and len(times) > 1:
        info["sigmas"] = list(times)  # flow matching: sigma = t
    (out / STUDENT_FILE).write_text(json.dumps(info, indent=2))
    return out
