"""Procedural scenes: the clutter field's geometry (primitives, thin rods, occlusion), its
textured and view-dependent colour, that it is harder than the toy scene, the registry, and
PVD with it as the teacher."""

import pytest
import torch

from fewstep.threed.cameras import orbit_cameras, rays
from fewstep.threed.fields import VoxelField, make_field
from fewstep.threed.pvd import PVDConfig, PVDStage, distill_volume
from fewstep.threed.scenes import (
    ClutterSceneConfig,
    ProceduralField,
    clutter_scene,
    make_scene,
)
from fewstep.threed.volume import VolumeRenderConfig, ray_aabb, render_field

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scene() -> ProceduralField:
    return clutter_scene()


def test_seed_reproduces_and_changes_the_scene():
    a, b, c = clutter_scene(seed=3), clutter_scene(seed=3), clutter_scene(seed=4)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(b.named_buffers())[name])
    assert not torch.equal(a.sphere_c, c.sphere_c)


def test_density_inside_primitives_and_empty_elsewhere(scene):
    d = scene.config.density
    inside = torch.cat([scene.sphere_c, scene.box_c])
    assert (scene.density(inside) > 0.99 * d).all()
    # Points far from every primitive (sdf > 10 edge widths) are empty.
    p = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sdf, _ = scene.sdf(p)
    far = sdf > 10 * scene.config.softness
    assert far.any() and (scene.density(p[far]) < 1e-3 * d).all()
    outside = torch.tensor([[1.5, 0.0, 0.0], [0.0, -1.2, 0.3]])
    assert (scene.density(outside) == 0).all()


def test_rods_are_thin():
    cfg = ClutterSceneConfig(n_spheres=0, n_boxes=0, n_rods=1, seed=1)
    f = ProceduralField(cfg)
    a, b = f.rod_a[0], f.rod_b[0]
    mid = (a + b) / 2
    axis = torch.nn.functional.normalize(b - a, dim=0)
    side = torch.nn.functional.normalize(
        torch.linalg.cross(axis, torch.tensor([0.3, 0.5, 0.8])), dim=0
    )
    r = cfg.rod_radius
    sig = f.density(torch.stack([mid, mid + 0.5 * r * side, mid + 3 * r * side]))
    # Opaque on the axis (sdf = -r, 3.5 edge widths inside), empty two radii past the surface.
    assert sig[0] > 0.9 * cfg.density and 0.7 * cfg.density < sig[1] < sig[0]
    assert sig[2] < 0.01 * cfg.density


def test_albedo_is_textured_at_high_frequency(scene):
    # Along a segment through the largest sphere, the checker alternates many times.
    k = int(scene.sphere_r.argmax())
    c, r = scene.sphere_c[k], float(scene.sphere_r[k])
    t = torch.linspace(-0.9 * r, 0.9 * r, 400)[:, None]
    p = c + t * torch.nn.functional.normalize(torch.tensor([1.0, 0.7, 0.4]), dim=0)
    idx = torch.full((len(p),), k)
    lum = scene.albedo(p, idx).mean(-1)
    assert lum.max() - lum.min() > 0.5 * scene.config.texture_contrast * float(
        scene.colour[k].mean()
    )
    flips = ((lum[1:] - lum.mean()).sign() != (lum[:-1] - lum.mean()).sign()).sum()
    assert flips >= 2
    flat = clutter_scene(texture_contrast=0.0)
    torch.testing.assert_close(flat.albedo(p, idx), flat.colour[idx])


def test_colour_depends_on_view_direction(scene):
    p = torch.cat([scene.sphere_c, scene.box_c])
    d = scene.light[: len(p)]  # each primitive's highlight axis (sphere/box indices come first)
    _, front = scene(p, -d)  # looking along -h: the highlight lobe is at its maximum
    _, back = scene(p, d)
    assert (front - back).abs().amax(-1).mean() > 0.5 * scene.config.highlight
    dull = clutter_scene(highlight=0.0)
    torch.testing.assert_close(dull(p, -d)[1], dull(p, d)[1])


def _entries_per_ray(f, o, d, n=256) -> torch.Tensor:
    """How many times each ray enters an occupied region (depth complexity)."""
    t0, t1, hit = ray_aabb(o, d, f.aabb)
    t = t0[:, None] + (t1 - t0)[:, None] * torch.linspace(0, 1, n)[None]
    occ = f.density((o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3)).reshape(-1, n) > 1.0
    return ((occ[:, 1:] & ~occ[:, :-1]).sum(-1) + occ[:, 0]) * hit


def test_clutter_is_harder_than_the_toy_scene(scene):
    """More occlusion (surfaces crossed per ray) and more image detail (mean absolute
    difference between neighbouring pixels) than the toy scene, at the same cameras."""
    cams = orbit_cameras(2, 3.0, 25.0, size=32)
    o, d = (x.reshape(-1, 3) for x in rays(cams))
    toy = make_scene("toy")
    e_toy, e_clu = _entries_per_ray(toy, o, d), _entries_per_ray(scene, o, d)
    hit_toy, hit_clu = e_toy > 0, e_clu > 0
    assert e_clu[hit_clu].float().mean() > 1.5 * e_toy[hit_toy].float().mean()

    def detail(f) -> float:
        with torch.no_grad():
            img = render_field(f, cams, VolumeRenderConfig(n_samples=48))["image"]
        return float(
            (img[:, 1:] - img[:, :-1]).abs().mean() + (img[:, :, 1:] - img[:, :, :-1]).abs().mean()
        )

    assert detail(scene) > 2.0 * detail(toy)


def test_registry():
    assert isinstance(make_scene("toy"), VoxelField)
    assert isinstance(make_scene("clutter"), ProceduralField)
    with pytest.raises(KeyError, match="unknown scene"):
        make_scene("nope")


def test_pvd_distils_the_clutter_field(scene):
    """The analytic field has no intermediate feature: PVD falls back to density in the
    shallow stage and the student's per-point error falls."""
    torch.manual_seed(0)
    student = make_field("tensorf", resolution=16, density_components=4, app_components=4)
    cams = orbit_cameras(3, 3.0, 20.0, size=12)
    stages = (
        PVDStage("shallow", 5, {"feature": 1.0}),
        PVDStage("point", 45, {"feature": 1.0, "sigma": 1.0, "color": 1.0}),
    )
    cfg = PVDConfig(
        stages=stages, teacher_cache_points=4096, teacher_cache_rays=64, point_batch=1024,
        eval_every=0,
    )  # fmt: skip
    log = distill_volume(scene, student, cams, cfg)
    assert log["stages"][0]["losses"] == {"sigma": 1.0}
    sig = [t["sigma"] for t in log["losses"]]
    assert sum(sig[-5:]) < 0.5 * sum(sig[:5])
