"""Score distillation from a 2-D prior into a 3-D scene: SDS, VSD, CDS, TSM.

``SCORE_METHODS`` maps a name to its class; ``make_score(name, adapter, config)`` builds one.
Each method's ``loss(x, cond, step, total_steps, camera=None, generator=None)`` returns
(losses_by_role, logs) with the render gradient of its paper (see ``score.base``).
"""

from __future__ import annotations

from typing import Any

from fewstep.threed.prior import PriorAdapter
from fewstep.threed.score.base import WEIGHTINGS, ScoreMethod, reparam_loss, weight
from fewstep.threed.score.cds import CDS, CDSConfig
from fewstep.threed.score.sds import SDS, SDSConfig
from fewstep.threed.score.tsm import TSM, TSMConfig
from fewstep.threed.score.vsd import VSD, VSDConfig

SCORE_METHODS: dict[str, type[ScoreMethod]] = {"sds": SDS, "vsd": VSD, "cds": CDS, "tsm": TSM}


def make_score(name: str, adapter: PriorAdapter, config: Any = None, **kwargs: Any) -> ScoreMethod:
    """The score method ``name`` (sds, vsd, cds, tsm) on ``adapter``."""
    if name not in SCORE_METHODS:
        raise KeyError(f"unknown score method {name!r}; expected one of {sorted(SCORE_METHODS)}")
    return SCORE_METHODS[name](adapter, config, **kwargs)


__all__ = [
    "CDS",
    "SCORE_METHODS",
    "SDS",
    "TSM",
    "VSD",
    "WEIGHTINGS",
    "CDSConfig",
    "SDSConfig",
    "ScoreMethod",
    "TSMConfig",
    "VSDConfig",
    "make_score",
    "reparam_loss",
    "weight",
]
