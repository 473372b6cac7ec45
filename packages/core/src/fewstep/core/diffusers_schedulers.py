"""The noise path and prediction kind a diffusers scheduler config trains on, so that any
domain's diffusers model (image UNets and transformers, Wan / CogVideoX video transformers)
becomes a core ``Denoiser`` on the right path."""

from __future__ import annotations

from typing import Any

from fewstep.core.paths import Path, RectifiedFlow, VPDiscrete

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers -> core


def is_flow_config(config: Any) -> bool:
    """Whether a scheduler config samples a flow-matching model: the FlowMatch schedulers,
    and DPM-Solver / UniPC with ``prediction_type="flow_prediction"`` (SANA's and Wan's)."""
    name = config.get("_class_name", "")
    return "FlowMatch" in name or config.get("prediction_type") == "flow_prediction"


def path_from_scheduler(config: Any) -> tuple[Path, str]:
    """(path, prediction kind) that a scheduler config trains on: flow-matching schedulers
    give rectified flow with velocity prediction (time x num_train_timesteps); DDPM-family
    schedulers give diffusers' discrete VP table (zero terminal SNR when the config rescales
    to it, as CogVideoX's) and their ``prediction_type``."""
    n = int(config.get("num_train_timesteps", 1000))
    if is_flow_config(config):
        return RectifiedFlow(time_scale=float(n)), "velocity"
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {pred!r}; expected {sorted(PREDICTIONS)}")
    path = VPDiscrete(
        schedule=config.get("beta_schedule", "linear"),
        num_train_timesteps=n,
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
        zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )
    return path, PREDICTIONS[pred]
