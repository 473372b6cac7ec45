"""The 3-D score-distillation loop: exact resume, densification, fields, errors."""

from __future__ import annotations

import pytest
import torch

from fewstep.threed.distill3d import (
    CameraConfig,
    Distill3DConfig,
    background_values,
    distill_scene,
    init_gaussians,
    render_views,
    turntable,
)
from fewstep.threed.prior import PriorAdapter
from fewstep.threed.score import SDSConfig, VSDConfig, make_score

pytestmark = pytest.mark.usefixtures("single_thread")

CAMS = CameraConfig(views=2, size=16)


class _Crash(Exception):
    pass


def _run(prior, method, method_cfg, cfg, out_dir, crash_at=None):
    score = make_score(method, PriorAdapter(prior), method_cfg, seed=cfg.seed)
    if crash_at is not None:  # simulate a run killed at step ``crash_at``
        loss = score.loss

        def crashing(x, cond, step, *a, **k):
            if step == crash_at:
                raise _Crash
            return loss(x, cond, step, *a, **k)

        score.loss = crashing
    scene = init_gaussians(60, radius=0.5, seed=cfg.seed)
    try:
        return distill_scene(scene, score, torch.tensor(0), cfg, out_dir)
    except _Crash:
        return None


@pytest.mark.parametrize(
    ("method", "method_cfg", "densify"),
    [("vsd", VSDConfig(guidance_scale=2.0), 0), ("sds", SDSConfig(guidance_scale=2.0), 2)],
)
def test_resume_continues_identically(score_target_prior, tmp_path, method, method_cfg, densify):
    """A run killed after its step-3 checkpoint and resumed ends exactly where an
    uninterrupted run ends (critic and optimizer state, densified row counts included)."""
    cfg = Distill3DConfig(
        steps=6, cameras=CAMS, checkpoint_every=3, densify_every=densify, densify_from=0,
        densify_grad_threshold=1e-7,
    )  # fmt: skip
    full, log_full = _run(score_target_prior, method, method_cfg, cfg, tmp_path / "a")
    assert _run(score_target_prior, method, method_cfg, cfg, tmp_path / "b", crash_at=4) is None
    resumed, log_res = _run(score_target_prior, method, method_cfg, cfg, tmp_path / "b")
    if densify:
        assert len(full) != 60  # densification really changed the scene
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)
    assert [r["loss_scene"] for r in log_res] == [r["loss_scene"] for r in log_full]


def test_a_radiance_field_is_optimised_too(score_target_prior):
    from fewstep.threed.fields import make_field

    field = make_field("voxel", resolution=8)
    before = [p.detach().clone() for p in field.parameters()]
    score = make_score("sds", PriorAdapter(score_target_prior), SDSConfig(guidance_scale=1.0))
    cfg = Distill3DConfig(steps=2, cameras=CameraConfig(views=1, size=8), field_samples=8)
    field, log = distill_scene(field, score, torch.tensor(1), cfg)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss_scene"])) for r in log)
    assert any(not torch.equal(a, b) for a, b in zip(before, field.parameters()))
    assert turntable(field, 3, cfg).shape == (3, 8, 8, 3)


def test_backgrounds_composite_under_alpha(score_target_prior):
    from fewstep.threed.cameras import orbit_cameras

    scene = init_gaussians(30, radius=0.3, seed=0)
    cams = orbit_cameras(2, 2.5, 10.0, 40.0, 12)
    black = render_views(scene, cams, background_values("black", 2, None))
    white = render_views(scene, cams, background_values("white", 2, None))
    torch.testing.assert_close(
        white["image"] - black["image"], (1 - black["alpha"]).expand(-1, -1, -1, 3)
    )
    bg = background_values("random", 4, torch.Generator().manual_seed(0))
    assert bg.shape == (4, 3) and torch.equal(bg[:, 0], bg[:, 1])


def test_errors_are_named(score_target_prior):
    with pytest.raises(ValueError, match="background"):
        background_values("green", 2, None)
    score = make_score("sds", PriorAdapter(score_target_prior))
    with pytest.raises(TypeError, match="Gaussians"):
        distill_scene(torch.nn.Linear(2, 2), score, torch.tensor(0), Distill3DConfig(steps=1))
    with pytest.raises(ValueError, match="at least one"):
        init_gaussians(0)


def test_a_non_finite_loss_stops_the_run(score_target_prior):
    score = make_score("sds", PriorAdapter(score_target_prior), SDSConfig(guidance_scale=1.0))
    scene = init_gaussians(20, radius=0.3, seed=0)
    with torch.no_grad():
        scene.sh_dc.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="scene loss at step 0"):
        distill_scene(scene, score, torch.tensor(0), Distill3DConfig(steps=2, cameras=CAMS))
