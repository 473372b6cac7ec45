"""Shared fixtures for core tests: the 2-D toy teachers and a single-thread switch.

The teachers come from ``fewstep.core.toy.make_toy_teacher`` and are cached under
``$FEWSTEP_CACHE/toy`` (default ``~/.cache/fewstep/toy``); on a clean machine each trains
once per cache in a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from fewstep.core.toy import make_toy_teacher

# Training steps of the test teachers: enough for a teacher whose 50-step samples cover all
# eight modes, few enough that a clean machine trains all three in well under a minute.
TEACHER_STEPS = 1500

# diffusers' DDPM "linear" table ends at alpha(999) = 0.0064, where a one-step eps student's
# x0 = (x - sigma eps) / alpha amplifies every eps error 157 times; Stable Diffusion's
# scaled_linear table (alpha(999) = 0.068) is the usual discrete eps setting for few-step work.
SD_SCHEDULE = {"schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny 2-D models run several times faster without threading."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _teacher(*args, **kwargs):
    return make_toy_teacher(*args, steps=TEACHER_STEPS, **kwargs)


@pytest.fixture(scope="session")
def rf_teacher():
    """Rectified-flow velocity teacher on the 8-mode ring of Gaussians."""
    return _teacher("rectified_flow", "velocity", "mixture")


@pytest.fixture(scope="session")
def vp_teacher():
    """Discrete-VP (Stable Diffusion betas) eps teacher on the 8-mode ring of Gaussians."""
    return _teacher("vp_discrete", "eps", "mixture", path_kwargs=SD_SCHEDULE)


@pytest.fixture(scope="session")
def checkerboard_teacher():
    """Rectified-flow velocity teacher on the 4x4 checkerboard."""
    return _teacher("rectified_flow", "velocity", "checkerboard")


@pytest.fixture(scope="session")
def vp_checkerboard_teacher():
    """Discrete-VP (Stable Diffusion betas) eps teacher on the 4x4 checkerboard."""
    return _teacher("vp_discrete", "eps", "checkerboard", path_kwargs=SD_SCHEDULE)


@pytest.fixture(scope="session")
def cond_rf_teacher():
    """Class-conditional rectified-flow velocity teacher on the ring: label k = mode k,
    label 8 = null (trained with 10 % null labels, so it can be guided)."""
    return _teacher("rectified_flow", "velocity", "mixture", conditional=True)


@pytest.fixture
def tiny_unet():
    """Factory of small class-conditional diffusers ``UNet2DModel``s on 8x8 images (the digits
    teacher's family), with an attention block unless ``attention=False``."""
    diffusers = pytest.importorskip("diffusers")

    def make(num_classes: int, attention: bool = True, seed: int = 0):
        torch.manual_seed(seed)
        mid = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
        return diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", mid[0]),
            up_block_types=(mid[1], "UpBlock2D"),
            layers_per_block=1,
            num_class_embeds=num_classes,
            norm_num_groups=4,
        )

    return make
