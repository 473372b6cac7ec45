"""Recipes: a teacher, a student, an objective, data and an evaluation wired together.

Domain packages register recipes under the entry-point group ``fewstep.recipes``; the value
is an object with this interface (``Recipe``). The ``fewstep`` command finds whatever is
installed, without importing a recipe until it is used.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

GROUP = "fewstep.recipes"


class Recipe(Protocol):
    name: str
    summary: str
    config_cls: type  # dataclass with an ``objective`` field naming the objective

    def objective_defaults(self, objective: str) -> dict[str, Any]:
        """Recipe-tuned defaults for an objective's config (field -> value)."""
        ...

    def config_defaults(self, objective: str) -> dict[str, str]:
        """Recipe-tuned settings of the recipe's own config when it runs ``objective``
        (dotted key -> command-line text, e.g. ``{"train.betas": "0,0.99"}``), applied before
        the user's overrides. Optional: a recipe without it has none."""
        ...

    def distill(self, cfg: Any, objective_cfg: Any, out_dir: Path) -> dict: ...

    def sample(self, run_dir: Path, n: int, out: Path, steps: int | None = None) -> Path: ...

    def evaluate(self, run_dir: Path) -> dict: ...

    def report(self, run_dir: Path) -> Path: ...


def _eps() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def recipe_names() -> list[str]:
    return sorted(_eps())


def load_recipe(name: str) -> Recipe:
    eps = _eps()
    if name not in eps:
        valid = ", ".join(sorted(eps)) or "(none installed)"
        raise KeyError(f"unknown recipe {name!r}; installed recipes: {valid}")
    return eps[name].load()
