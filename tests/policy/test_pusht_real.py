"""Push-T through the real gym-pusht (the ``pusht`` extra); skipped when it is not installed.
CI installs each package without extras, so this runs where a user (or a developer) has
``pip install 'fewstep-policy[pusht]'``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gym_pusht")


def test_pusht_env_runs_with_the_low_dim_layout():
    from fewstep.policy.pusht import make_pusht_env

    env = make_pusht_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5,) and obs.dtype == np.float32 and 0 <= obs[4] < 2 * np.pi
    agent = obs[:2].copy()
    for _ in range(10):
        obs, _, term, trunc, info = env.step(np.array([256.0, 256.0], np.float32))
    assert {"success", "agent_pos"} <= set(info) and not (term or trunc)
    # the agent is driven toward the commanded point
    assert np.linalg.norm(obs[:2] - 256) < np.linalg.norm(agent - 256)
    env.close()
