"""Cameras: look-at, OpenCV <-> OpenGL, orbit sampling, projection and rays."""

import math

import pytest
import torch

from fewstep.threed.cameras import (
    Cameras,
    OrbitJitter,
    look_at,
    opencv_to_opengl,
    opengl_to_opencv,
    orbit_cameras,
    rays,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_eyes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * 3


def test_look_at_points_optical_axis_at_target_and_is_a_rotation():
    eye = _random_eyes(16)
    target = _random_eyes(16, seed=1) * 0.2
    c2w = look_at(eye, target)
    R = c2w[:, :3, :3]
    eye3 = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(1, 2) @ R, eye3)
    # Right-handed: x cross y = z (a proper rotation, determinant +1).
    torch.testing.assert_close(torch.linalg.cross(R[:, :, 0], R[:, :, 1], dim=-1), R[:, :, 2])
    forward = (target - eye) / (target - eye).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(R[:, :, 2], forward)  # camera +z (OpenCV) is the optical axis
    # Image "down" (+y) points against world up (+z): the horizon is level.
    assert (R[:, 2, 1] <= 0).all()
    assert R[:, 2, 0].abs().max() < 1e-12  # camera x has no world-z component
    # The target projects to the principal point.
    cams = Cameras(c2w, 50.0, 50.0, 32.0, 24.0, 64, 48)
    for i in range(16):
        uv, z = cams[i].project(target[i : i + 1])
        torch.testing.assert_close(uv[0, 0], torch.tensor([32.0, 24.0], dtype=uv.dtype))
        assert z.item() > 0


def test_look_at_straight_down_is_well_defined():
    c2w = look_at(torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64))
    assert torch.isfinite(c2w).all()
    torch.testing.assert_close(c2w[0, :3, 2], torch.tensor([0.0, 0.0, -1.0], dtype=c2w.dtype))


def test_opencv_opengl_round_trip_and_axes():
    c2w = look_at(_random_eyes(8))
    gl = opencv_to_opengl(c2w)
    torch.testing.assert_close(opengl_to_opencv(gl), c2w)
    torch.testing.assert_close(gl[:, :3, 2], -c2w[:, :3, 2])  # OpenGL looks along -z
    torch.testing.assert_close(gl[:, :3, 1], -c2w[:, :3, 1])  # and +y is up
    torch.testing.assert_close(gl[:, :3, 3], c2w[:, :3, 3])
    cams = Cameras.from_opengl(gl, 10.0, 10.0, 8.0, 8.0, 16, 16)
    torch.testing.assert_close(cams.camera_to_world, c2w)
    torch.testing.assert_close(cams.camera_to_world_opengl, gl)
    eye4 = torch.eye(4, dtype=c2w.dtype).expand(8, 4, 4)
    torch.testing.assert_close(cams.viewmats @ cams.camera_to_world, eye4)


@pytest.mark.parametrize("random", [False, True])
def test_orbit_cameras_lie_on_the_sphere_and_look_at_target(random):
    target = (0.3, -0.2, 0.1)
    g = torch.Generator().manual_seed(0)
    cams = orbit_cameras(
        12,
        radius=2.5,
        elevation=(-10.0, 40.0),
        fov=45.0,
        size=(40, 30),
        random=random,
        generator=g,
        target=target,
        dtype=torch.float64,
    )
    t = torch.tensor(target, dtype=torch.float64)
    offset = cams.centers - t
    torch.testing.assert_close(offset.norm(dim=-1), torch.full((12,), 2.5, dtype=torch.float64))
    fwd = cams.camera_to_world[:, :3, 2]
    torch.testing.assert_close(fwd, -offset / 2.5)
    elev = torch.rad2deg(torch.asin(offset[:, 2] / 2.5))
    assert (elev >= -10 - 1e-9).all() and (elev <= 40 + 1e-9).all()
    assert (cams.width, cams.height) == (40, 30)
    f = 0.5 * 30 / math.tan(math.radians(45.0) / 2)
    torch.testing.assert_close(cams.fy, torch.full((12,), f, dtype=torch.float64))
    if not random:  # turntable: evenly spaced azimuths
        az = torch.atan2(offset[:, 1], offset[:, 0])
        step = torch.remainder(az.diff(), 2 * math.pi)
        torch.testing.assert_close(step, torch.full((11,), 2 * math.pi / 12, dtype=torch.float64))


def test_orbit_cameras_reproducible_and_jitter_moves_cameras():
    def make(seed, jitter=None):
        return orbit_cameras(
            6, random=True, jitter=jitter, generator=torch.Generator().manual_seed(seed)
        )

    torch.testing.assert_close(make(3).camera_to_world, make(3).camera_to_world)
    assert not torch.allclose(make(3).camera_to_world, make(4).camera_to_world)
    j = make(3, OrbitJitter(radius=0.5, fov_deg=5.0))
    r = j.centers.norm(dim=-1)
    assert (r >= 2.5 - 1e-5).all() and (r <= 3.5 + 1e-5).all() and r.std() > 0
    assert j.fy.std() > 0


def test_rays_pass_through_pixel_centres():
    cams = orbit_cameras(3, size=(20, 12), dtype=torch.float64)
    o, d = rays(cams)
    assert o.shape == d.shape == (3, 12, 20, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, 12, 20, dtype=torch.float64))
    pts = (o + 2.0 * d).reshape(3, -1, 3)
    for c in range(3):
        uv, z = cams[c].project(pts[c])
        v, u = torch.meshgrid(
            torch.arange(12, dtype=torch.float64),
            torch.arange(20, dtype=torch.float64),
            indexing="ij",
        )
        want = torch.stack([u + 0.5, v + 0.5], -1).reshape(-1, 2)
        torch.testing.assert_close(uv[0], want)


def test_bad_camera_shapes_are_named():
    with pytest.raises(ValueError, match="camera_to_world"):
        Cameras(torch.eye(3), 1.0, 1.0, 0.0, 0.0, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        Cameras(torch.eye(4).expand(2, 4, 4), torch.ones(3), 1.0, 0.0, 0.0, 4, 4)
