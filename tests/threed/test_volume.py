"""Volume rendering against closed forms, camera-z depth, and occupancy-grid skipping."""

import math

import pytest
import torch

from fewstep.threed.cameras import Cameras, look_at, orbit_cameras
from fewstep.threed.fields import FieldConfig, RadianceField, toy_voxel_scene
from fewstep.threed.volume import (
    OccupancyGrid,
    VolumeRenderConfig,
    ray_aabb,
    render_field,
    render_rays,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Medium(RadianceField):
    """Constant density and colour where ``region(points)`` holds (inside the box)."""

    def __init__(self, sigma, rgb, region=None):
        super().__init__(FieldConfig())
        self.sigma, self.rgb = sigma, torch.tensor(rgb, dtype=F64)
        self.region = region or (lambda p: torch.ones(p.shape[0], dtype=torch.bool))

    def density(self, points):
        on = self.inside(points) & self.region(points)
        return torch.where(on, self.sigma, 0.0).to(points.dtype)

    def forward(self, points, dirs):
        return self.density(points), self.rgb.to(points.dtype).expand(points.shape[0], 3)


def test_homogeneous_medium_matches_beer_lambert():
    """Through a box of constant density sigma and length L: opacity 1 - exp(-sigma L)
    (exact for the piecewise-constant quadrature) and expected termination distance
    t0 + 1/sigma - L e^{-sigma L} / (1 - e^{-sigma L})."""
    sigma, L, t0 = 1.3, 2.0, 2.0
    origins = torch.tensor([[-3.0, 0.1, -0.2], [0.0, 0.0, 5.0]], dtype=F64)
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=F64)
    field = Medium(sigma, (0.2, 0.4, 0.8))
    cfg = VolumeRenderConfig(n_samples=512, background="white")
    out = render_rays(field, origins, dirs, cfg)
    alpha = 1 - math.exp(-sigma * L)
    torch.testing.assert_close(out["alpha"], torch.full((2, 1), alpha, dtype=F64))
    want_rgb = torch.tensor([0.2, 0.4, 0.8], dtype=F64) * alpha + (1 - alpha)
    torch.testing.assert_close(out["rgb"], want_rgb.expand(2, 3))
    t_near = torch.tensor([t0, 4.0], dtype=F64)
    mean_t = t_near + 1 / sigma - L * math.exp(-sigma * L) / (1 - math.exp(-sigma * L))
    torch.testing.assert_close(out["distance"][:, 0], mean_t, rtol=1e-3, atol=0)
    assert out["n_evaluated"] == out["n_samples"] == 2 * 512


def test_rays_missing_the_box_see_the_background():
    o = torch.tensor([[-3.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    t_near, t_far, hit = ray_aabb(o, d, torch.tensor([[-1.0] * 3, [1.0] * 3], dtype=F64))
    assert hit.tolist() == [False, True]
    assert t_near[1].item() == 0.0 and t_far[1].item() == 1.0  # origin inside: starts at 0
    out = render_rays(Medium(5.0, (0.0, 0.0, 0.0)), o, d, VolumeRenderConfig(background="black"))
    assert out["alpha"][0].item() == 0.0
    torch.testing.assert_close(out["alpha"][1, 0], torch.tensor(1 - math.exp(-5.0), dtype=F64))
    assert out["n_evaluated"] == 64  # only the ray that enters the box is evaluated


def test_near_far_sampling_and_background_names():
    o = torch.tensor([[-3.0, 0.0, 0.0]], dtype=F64)
    d = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    cfg = VolumeRenderConfig(near=2.5, far=3.0, n_samples=64, background=(0.5, 0.5, 0.5))
    out = render_rays(Medium(2.0, (1.0, 1.0, 1.0)), o, d, cfg)  # only [2.5, 3] is inside
    torch.testing.assert_close(out["alpha"][0, 0], torch.tensor(1 - math.exp(-1.0), dtype=F64))
    with pytest.raises(ValueError, match="white"):
        render_rays(Medium(2.0, (1.0, 1.0, 1.0)), o, d, VolumeRenderConfig(background="grey"))


def test_depth_is_camera_z_not_ray_distance():
    """A dense wall at x >= 0.5 seen along +x: every pixel's depth is the wall's z = 3.5,
    while the ray distance grows towards the image corners."""
    wall = Medium(2000.0, (0.5, 0.5, 0.5), region=lambda p: p[:, 0] >= 0.5)
    c2w = look_at(torch.tensor([[-3.0, 0.0, 0.0]], dtype=F64))
    cams = Cameras(c2w, 40.0, 40.0, 8.0, 8.0, 16, 16)
    out = render_field(wall, cams, VolumeRenderConfig(n_samples=256))
    assert (out["alpha"] > 0.99).all()
    bin_width = 2.0 * 3**0.5 / 256
    assert (out["depth"] - 3.5).abs().max() < 2 * bin_width


# ---------------------------------------------------------------------------------------------
# Occupancy grid
# ---------------------------------------------------------------------------------------------


def test_occupancy_grid_ema_update():
    grid = OccupancyGrid(resolution=4, decay=0.95, threshold=0.01)
    assert grid.binary.all()  # before any update nothing is skipped
    grid.update(lambda p: torch.full((p.shape[0],), 5.0))
    assert (grid.density == 5.0).all()
    grid.update(lambda p: torch.zeros(p.shape[0]))
    torch.testing.assert_close(grid.density, torch.full((4, 4, 4), 4.75))  # decayed, max kept
    half = OccupancyGrid(resolution=4)
    half.update(lambda p: torch.where(p[:, 0] > 0, 100.0, 0.0))
    assert half.binary[2:].all() and not half.binary[:2].any()  # [x, y, z] indexing
    assert half.occupied(
        torch.tensor([[0.5, -0.9, 0.2], [-0.5, 0.9, 0.2], [1.5, 0.0, 0.0]])
    ).tolist() == [
        True,
        False,
        False,
    ]


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    """Filled from the toy scene (4 updates x 8 probes per cell), the grid leaves the field
    unevaluated at most samples; the scene is either empty or dense (density 30), so the
    skipped samples carry no visible opacity and the images agree to 1e-3."""
    field = toy_voxel_scene()
    cams = orbit_cameras(2, radius=3.0, elevation=25.0, fov=40.0, size=24, azimuth_start=20.0)
    cfg = VolumeRenderConfig(n_samples=48)
    grid = OccupancyGrid(resolution=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = render_field(field, cams, cfg)
        untouched = render_field(field, cams, cfg, occupancy=grid)
        assert untouched["n_evaluated"] == full["n_evaluated"]
        for _ in range(4):
            grid.update(field.density, generator=g, samples_per_cell=8)
        skipped = render_field(field, cams, cfg, occupancy=grid)
    assert grid.occupancy_fraction() < 0.3
    assert skipped["n_evaluated"] < 0.25 * full["n_evaluated"]
    assert (full["alpha"] > 0.5).float().mean() > 0.1  # the views do show the scene
    torch.testing.assert_close(skipped["image"], full["image"], atol=1e-3, rtol=0)
    torch.testing.assert_close(skipped["alpha"], full["alpha"], atol=1e-3, rtol=0)
