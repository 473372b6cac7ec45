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
