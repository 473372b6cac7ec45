"""PVD: staged distillation between field types, the density-range constraint, the feature
hooks against the fields' own outputs, and the from-images baseline."""

import math

import pytest
import torch

from fewstep.threed.cameras import orbit_cameras
from fewstep.threed.fields import VoxelField, make_field, toy_voxel_scene
from fewstep.threed.pvd import (
    LOSSES,
    PVDConfig,
    PVDLoss,
    PVDStage,
    build_teacher_cache,
    clipped_log_density,
    default_stages,
    density_range_error,
    distill_volume,
    evaluate_views,
    feature_fn,
    psnr,
    sample_batch,
    time_to_psnr,
    train_from_images,
)
from fewstep.threed.volume import VolumeRenderConfig, render_field

SMALL = {
    "mlp": {"width": 32, "depth": 2, "color_width": 16},
    "hashgrid": {"n_levels": 4, "log2_table_size": 12, "max_resolution": 64, "hidden": 16},
    "tensorf": {"resolution": 32, "app_components": 8},
    "voxel": {"resolution": 24},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scene():
    """The toy voxel scene as teacher, 12 training views and 4 held-out views (16 px)."""
    teacher = toy_voxel_scene()
    g = torch.Generator().manual_seed(1)
    train = orbit_cameras(12, 3.0, (-10.0, 40.0), size=16, random=True, generator=g)
    test = orbit_cameras(4, 3.0, 25.0, size=16, azimuth_start=20.0)
    with torch.no_grad():
        test_img = render_field(teacher, test, VolumeRenderConfig(n_samples=48))["image"]
    return teacher, train, test, test_img


def _cfg(**kw):
    base = dict(
        stages=default_stages(15, 25, 60),
        rays_per_step=128,
        samples_per_ray=24,
        uniform_points=256,
        teacher_cache_points=16384,
        teacher_cache_rays=1024,
        point_batch=2048,
        eval_every=0,
        eval_samples=48,
    )
    return PVDConfig(**{**base, **kw})


@pytest.mark.parametrize("student", ["mlp", "hashgrid", "tensorf"])
def test_pvd_from_voxel_teacher_beats_untrained_and_constant(scene, student):
    teacher, train, test, test_img = scene
    torch.manual_seed(0)
    s = make_field(student, **SMALL[student])
    init = evaluate_views(s, test, test_img, samples=48)
    const = psnr(test_img.mean((0, 1, 2)).expand_as(test_img), test_img)
    log = distill_volume(teacher, s, train, _cfg(), eval_views=(test, test_img))
    final = log["eval"][-1]["psnr"]
    assert log["eval"][-1]["step"] == 100
    # computed bar: clearly better than the untrained student and than a constant colour
    assert final > max(init, const) + 2.0, (final, init, const)
    assert not log["adapter"]  # the voxel teacher has no feature: no adapter is learned
    assert log["stages"][0]["losses"] == {"sigma": 1.0}  # shallow stage falls back to density


def test_feature_stage_with_adapter_lowers_feature_loss(scene):
    torch.manual_seed(0)
    t = make_field("hashgrid", **SMALL["hashgrid"])
    s = make_field("mlp", **SMALL["mlp"])
    _, train, _, _ = scene
    cfg = _cfg(stages=(PVDStage("shallow", 30, {"feature": 1.0}),), rays_per_step=16)
    log = distill_volume(t, s, train, cfg)
    assert log["adapter"]  # hash (1 + 15) and MLP (33) features differ: a linear map is learned
    f = [x["feature"] for x in log["losses"]]
    assert sum(f[-5:]) < 0.5 * sum(f[:5])


def test_stages_call_losses_in_order(scene):
    """The staged schedule calls exactly each stage's losses, stage after stage."""
    _, train, _, _ = scene
    calls = []

    def spy(name):
        inner = LOSSES[name]

        def fn(s, t, batch, cfg):
            calls.append(name)
            return inner.fn(s, t, batch, cfg)

        return PVDLoss(fn, inner.needs)

    losses = {k: spy(k) for k in LOSSES}
    torch.manual_seed(0)
    t = make_field("hashgrid", **SMALL["hashgrid"])
    s = make_field("tensorf", **SMALL["tensorf"])
    cfg = _cfg(stages=default_stages(2, 3, 4), rays_per_step=16, uniform_points=16)
    log = distill_volume(t, s, train, cfg, losses=losses)
    expect = (
        [["feature"]] * 2 + [["feature", "sigma", "color"]] * 3 + [["rgb", "sigma", "color"]] * 4
    )
    assert calls == [n for step in expect for n in step]
    assert log["stage"] == ["shallow"] * 2 + ["point"] * 3 + ["render"] * 4
    assert [sorted(x) for x in log["losses"]] == [sorted(e) for e in expect]


def test_density_range_error_semantics():
    lo, hi = -2.0, 7.0
    t = torch.tensor([0.0, 1e30, math.exp(3.0), 0.0, 1e30, math.inf])
    s = torch.tensor([1e-6, 1e5, math.exp(1.0), 1.0, 1.0, 1e-3])
    e = density_range_error(s, t, (lo, hi))
    assert e[0] == 0  # teacher empty, student below the floor: nothing to fix
    assert e[1] == 0  # teacher opaque, student above the ceiling: nothing to fix
    assert torch.isclose(e[2], torch.tensor(-2.0))  # inside the range: log error
    assert torch.isclose(e[3], torch.tensor(0.0 - lo))  # student log 0 above the floor
    assert torch.isclose(e[4], torch.tensor(0.0 - hi))  # student log 0 below the ceiling
    assert torch.isfinite(e).all()
    assert torch.equal(clipped_log_density(t, (lo, hi)), torch.tensor([lo, hi, 3.0, lo, hi, hi]))


def test_sigma_clip_keeps_losses_finite_and_bounded_for_huge_teacher_density():
    """A teacher with density 1e30 inside (and 0 outside): with the clip the density loss is
    bounded by (hi - lowest student log density)^2; without it, it is not (or not finite)."""
    r = 8
    dens = torch.zeros(r, r, r)
    dens[2:6, 2:6, 2:6] = 1e30
    teacher = VoxelField.from_grids(dens, torch.full((r, r, r, 3), 0.5))
    torch.manual_seed(0)
    student = make_field("mlp", **SMALL["mlp"])
    g = torch.Generator().manual_seed(0)
    cams = orbit_cameras(2, 3.0, 20.0, size=8)
    batch = sample_batch(cams, teacher.aabb, 32, 16, 512, g)
    with torch.no_grad():
        ts, ss = teacher.density(batch.points), student.density(batch.points)
    assert ts.max() > 1e29
    cfg = PVDConfig()
    loss = LOSSES["sigma"].fn({"sigma": ss}, {"sigma": ts}, batch, cfg)
    lo, hi = cfg.sigma_clip
    bound = (hi - min(lo, float(torch.log(ss).min()))) ** 2
    assert torch.isfinite(loss) and float(loss) <= bound
    unclipped = PVDConfig(sigma_clip=(-math.inf, math.inf))
    raw = LOSSES["sigma"].fn({"sigma": ss}, {"sigma": ts}, batch, unclipped)
    assert not (torch.isfinite(raw) and float(raw) <= bound)
    # and a whole distillation on that teacher stays finite
    log = distill_volume(teacher, student, cams, _cfg(stages=default_stages(0, 3, 3)))
    assert all(math.isfinite(v) for v in log["loss"])


@pytest.mark.parametrize("name", ["mlp", "hashgrid", "tensorf"])
def test_feature_hooks_match_the_fields_density(name):
    """Each hook reads the feature the field's own density head uses: its first column is the
    raw density that the field's activation turns into sigma."""
    torch.manual_seed(0)
    f = make_field(name, **SMALL[name])
    p = torch.rand(64, 3) * 1.8 - 0.9
    h0 = feature_fn(f)(p)[:, 0]
    act = {
        "mlp": lambda h: torch.nn.functional.softplus(h + f.config.density_bias),
        "hashgrid": torch.exp,
        "tensorf": lambda h: torch.nn.functional.softplus(h + f.config.density_shift),
    }[name]
    torch.testing.assert_close(act(h0), f.density(p), rtol=1e-5, atol=1e-7)
    assert feature_fn(make_field("voxel", resolution=4)) is None


def test_train_from_images_baseline_improves(scene):
    teacher, train, test, test_img = scene
    with torch.no_grad():
        imgs = render_field(teacher, train, VolumeRenderConfig(n_samples=48))["image"]
    torch.manual_seed(0)
    s = make_field("voxel", **SMALL["voxel"])
    init = evaluate_views(s, test, test_img, samples=48)
    cfg = _cfg(lr_grid=0.2)  # dense voxels train at a high rate (DVGO: 0.1)
    log = train_from_images(s, imgs, train, cfg, steps=60, eval_views=(test, test_img))
    assert log["eval"][-1]["psnr"] > init + 2.0
    assert log["time"] == sorted(log["time"])


def test_psnr_and_time_to_psnr():
    a = torch.zeros(2, 4, 4, 3)
    assert psnr(a + 0.1, a) == pytest.approx(20.0, abs=1e-4)
    log = {
        "eval": [
            {"time": 1.0, "psnr": 10.0},
            {"time": 2.0, "psnr": 21.0},
            {"time": 3.0, "psnr": 25.0},
        ]
    }
    assert time_to_psnr(log, 20.0) == 2.0
    assert time_to_psnr(log, 30.0) is None
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:1])


def test_clear_errors(scene):
    teacher, train, _, _ = scene
    s = make_field("mlp", **SMALL["mlp"])
    with pytest.raises(ValueError, match="unknown losses"):
        distill_volume(teacher, s, train, _cfg(stages=(PVDStage("x", 1, {"nope": 1.0}),)))
    with pytest.raises(ValueError, match="low < high"):
        distill_volume(teacher, s, train, _cfg(sigma_clip=(3.0, 1.0)))
    other = make_field("mlp", aabb=(-2.0, -2.0, -2.0, 2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="share a scene box"):
        distill_volume(teacher, other, train, _cfg())
    with pytest.raises(ValueError, match="images must be"):
        train_from_images(s, torch.zeros(3, 16, 16, 3), train)
    h = make_field("hashgrid", **SMALL["hashgrid"])
    with pytest.raises(ValueError, match="equal feature sizes"):
        distill_volume(h, s, train, _cfg(feature_adapter="identity"))
    with pytest.raises(ValueError, match="feature_adapter"):
        distill_volume(h, s, train, _cfg(feature_adapter="bogus"))


def test_live_teacher_mode_also_distils(scene):
    """teacher_cache_points=0 queries the teacher on every step's own rays and points."""
    teacher, train, test, test_img = scene
    torch.manual_seed(0)
    s = make_field("mlp", **SMALL["mlp"])
    init = evaluate_views(s, test, test_img, samples=48)
    log = distill_volume(
        teacher, s, train, _cfg(teacher_cache_points=0), eval_views=(test, test_img)
    )
    assert log["eval"][-1]["psnr"] > init + 2.0
    assert log["cache_cpu_seconds"] == 0.0


def test_teacher_cache_holds_the_teachers_answers(scene):
    _, train, _, _ = scene
    torch.manual_seed(0)
    t = make_field("hashgrid", **SMALL["hashgrid"])
    cfg = _cfg(eval_samples=16)
    c = build_teacher_cache(
        t, train, cfg, torch.Generator().manual_seed(0), features=feature_fn(t),
        n_points=3000, n_rays=40,
    )  # fmt: skip
    assert c.points.shape == (3000, 3) and c.feature.shape[0] == 3000
    with torch.no_grad():
        sigma, rgb = t(c.points, c.dirs)
        torch.testing.assert_close(c.sigma, sigma)
        torch.testing.assert_close(c.rgb, rgb)
        torch.testing.assert_close(c.feature, feature_fn(t)(c.points))
    n_uniform = round(3000 * cfg.cache_uniform_fraction)
    assert (c.weight[-n_uniform:] == 0).all() and (c.weight >= 0).all()
    # ray colours: the teacher rendered along those rays at eval_samples bin midpoints
    from fewstep.threed.volume import render_rays

    ref = render_rays(t, c.ray_o, c.ray_d, VolumeRenderConfig(n_samples=16))
    torch.testing.assert_close(c.ray_rgb, ref["rgb"], atol=1e-5, rtol=1e-4)


def test_cached_mode_queries_the_teacher_only_before_the_first_step(scene):
    teacher, train, _, _ = scene
    calls = []
    h = teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        counts = []
        for steps in (3, 30):
            calls.clear()
            torch.manual_seed(0)
            s = make_field("mlp", **SMALL["mlp"])
            distill_volume(teacher, s, train, _cfg(stages=default_stages(steps, steps, steps)))
            counts.append(len(calls))
    finally:
        h.remove()
    assert counts[0] == counts[1] > 0  # ten times the steps, the same teacher calls


def test_surface_sampling_favours_points_the_teacher_renders(scene):
    """Points drawn by compositing weight are mostly occupied; uniform pool draws are not."""
    from fewstep.threed.pvd import _draw_points

    teacher, train, _, _ = scene
    c = build_teacher_cache(
        teacher, train, _cfg(), torch.Generator().manual_seed(0), n_points=8000, n_rays=8
    )
    g = torch.Generator().manual_seed(0)
    occ = lambda idx: float((c.sigma[idx] > 1.0).float().mean())  # noqa: E731
    assert occ(_draw_points(c, 2000, 1.0, g)) > 0.9
    assert occ(_draw_points(c, 2000, 1.0, g)) > occ(_draw_points(c, 2000, 0.0, g)) + 0.3


def test_stage_lr_scale_reaches_the_optimizer(scene, monkeypatch):
    import fewstep.threed.pvd as pvd

    seen = []
    real = pvd._set_stage_lr

    def spy(opt, cfg, scale):
        real(opt, cfg, scale)
        seen.append([g["lr"] for g in opt.param_groups])

    monkeypatch.setattr(pvd, "_set_stage_lr", spy)
    _, train, _, _ = scene
    teacher = toy_voxel_scene()
    s = make_field("tensorf", **SMALL["tensorf"])
    stages = (PVDStage("a", 1, {"sigma": 1.0}, 1.0), PVDStage("b", 1, {"sigma": 1.0}, 0.5))
    distill_volume(teacher, s, train, _cfg(stages=stages, lr_grid=0.02, lr_network=0.004))
    assert seen == [[0.02, 0.004], [0.01, 0.002]]
    with pytest.raises(ValueError, match="lr_scale"):
        distill_volume(teacher, s, train, _cfg(stages=(PVDStage("c", 1, {"sigma": 1.0}, 0.0),)))
