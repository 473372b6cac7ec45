"""Shipped environments; importing this module registers them with gymnasium.

``gymnasium.make("fewstep/ReachAround-v0")`` builds :class:`ReachAroundEnv` under a
``TimeLimit`` of ``ReachAroundConfig().max_episode_steps``; pass ``config=`` (and a matching
``max_episode_steps=`` if you change it) to ``make`` for another geometry.
"""

import gymnasium

from fewstep.policy.envs.reach_around import (
    MODES,
    ReachAroundConfig,
    ReachAroundEnv,
    move_with_collision,
    trajectory_mode,
)

REACH_AROUND_ID = "fewstep/ReachAround-v0"

if REACH_AROUND_ID not in gymnasium.registry:
    gymnasium.register(
        id=REACH_AROUND_ID,
        entry_point="fewstep.policy.envs.reach_around:ReachAroundEnv",
        max_episode_steps=ReachAroundConfig().max_episode_steps,
    )

__all__ = [
    "MODES",
    "REACH_AROUND_ID",
    "ReachAroundConfig",
    "ReachAroundEnv",
    "move_with_collision",
    "trajectory_mode",
]
