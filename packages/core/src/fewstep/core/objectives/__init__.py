"""Distillation objectives, one file per method, found by name.

Built-in objectives are listed in ``BUILTIN`` (module:class, imported only when used);
other packages add their own through the entry-point group ``fewstep.objectives``.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

BUILTIN: dict[str, str] = {
    "dmd2": "fewstep.core.objectives.dmd2:DMD2",
    "consistency": "fewstep.core.objectives.consistency:ConsistencyDistillation",
    "dmd": "fewstep.core.objectives.dmd:DMD",
    "vsd": "fewstep.core.objectives.vsd:VSD",
    "sid": "fewstep.core.objectives.sid:SiD",
    "sida": "fewstep.core.objectives.sida:SiDA",
    "f_distill": "fewstep.core.objectives.f_distill:FDistill",
    "uni_instruct": "fewstep.core.objectives.uni_instruct:UniInstruct",
    "decoupled_dmd": "fewstep.core.objectives.decoupled_dmd:DecoupledDMD",
    "phased_dmd": "fewstep.core.objectives.phased_dmd:PhasedDMD",
    "tdm": "fewstep.core.objectives.tdm:TDM",
    "disback": "fewstep.core.objectives.disback:DisBack",
    "vdot": "fewstep.core.objectives.vdot:VDOT",
    "multi_student": "fewstep.core.objectives.multi_student:MultiStudent",
    "twinflow": "fewstep.core.objectives.twinflow:TwinFlow",
    "guidance_distill": "fewstep.core.objectives.guidance_distill:GuidanceDistillation",
    "agd": "fewstep.core.objectives.agd:AGD",
    "pso": "fewstep.core.objectives.pso:PSO",
    "flash_dmd": "fewstep.core.objectives.flash_dmd:FlashDMD",
    "distillation_dpo": "fewstep.core.objectives.distillation_dpo:DistillationDPO",
    "hyper_sd": "fewstep.core.objectives.hyper_sd:HyperSD",
    "slam": "fewstep.core.objectives.slam:SLAM",
    "scm": "fewstep.core.objectives.scm:SCM",
    "rcm": "fewstep.core.objectives.rcm:RCM",
    "tbcm": "fewstep.core.objectives.tbcm:TBCM",
    "meanflow": "fewstep.core.objectives.meanflow:MeanFlow",
    "flow_map": "fewstep.core.objectives.flow_map:FlowMapDistillation",
    "boot": "fewstep.core.objectives.boot:BOOT",
    "reflow": "fewstep.core.objectives.reflow:Reflow",
    "instaflow": "fewstep.core.objectives.instaflow:InstaFlow",
    "slimflow": "fewstep.core.objectives.slimflow:SlimFlow",
    "progressive": "fewstep.core.objectives.progressive:ProgressiveDistillation",
    "quantized": "fewstep.core.objectives.quantized:QuantizedDistillation",
    "dense2moe": "fewstep.core.objectives.dense2moe:Dense2MoE",
    "kd_mi": "fewstep.core.objectives.kd_mi:KDMI",
    "hipa": "fewstep.core.objectives.hipa:HiPA",
}
GROUP = "fewstep.objectives"


def _targets() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def objective_names() -> list[str]:
    return sorted(_targets())


def get_objective(name: str):
    """The objective class registered under ``name``."""
    targets = _targets()
    if name not in targets:
        raise KeyError(f"unknown objective {name!r}; available: {', '.join(sorted(targets))}")
    module, _, attr = targets[name].partition(":")
    return getattr(import_module(module), attr)
