"""nerfstudio transforms.json: write -> read round trips with rendered images."""

import json
import math

import pytest
import torch

from fewstep.threed.cameras import Cameras, orbit_cameras
from fewstep.threed.dataset import read_transforms, save_image, write_transforms
from fewstep.threed.fields import toy_voxel_scene
from fewstep.threed.volume import VolumeRenderConfig, render_field

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def rendered():
    """Three 20x16 renders of the toy voxel scene and their cameras."""
    cams = orbit_cameras(3, radius=3.0, elevation=20.0, fov=45.0, size=(20, 16))
    with torch.no_grad():
        out = render_field(toy_voxel_scene(), cams, VolumeRenderConfig(n_samples=32))
    return cams, out["image"], out["alpha"]


def test_round_trip_with_rendered_images(tmp_path, rendered):
    cams, images, _ = rendered
    path = write_transforms(tmp_path / "scene", cams, images)
    meta = json.loads(path.read_text())
    assert meta["camera_model"] == "OPENCV" and (meta["w"], meta["h"]) == (20, 16)
    assert meta["fl_x"] == pytest.approx(float(cams.fx[0]))
    # The file stores OpenGL camera-to-world: its third column points away from the target.
    m = torch.tensor(meta["frames"][0]["transform_matrix"])
    torch.testing.assert_close(m[:3, 2], -cams.camera_to_world[0, :3, 2])

    ds = read_transforms(tmp_path / "scene")
    assert len(ds) == 3 and ds.alphas is None
    torch.testing.assert_close(ds.cameras.camera_to_world, cams.camera_to_world)
    for k in ("fx", "fy", "cx", "cy"):
        torch.testing.assert_close(getattr(ds.cameras, k), getattr(cams, k))
    assert (ds.cameras.width, ds.cameras.height) == (20, 16)
    assert (ds.images - images).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation
    cam0, img0 = ds[0]
    assert len(cam0) == 1 and img0.shape == (16, 20, 3)


def test_per_frame_intrinsics_and_rgba(tmp_path, rendered):
    cams, images, alphas = rendered
    cams = Cameras(
        cams.camera_to_world,
        cams.fx * torch.tensor([1.0, 1.1, 0.9]),
        cams.fy,
        cams.cx + 0.5,
        cams.cy,
        cams.width,
        cams.height,
    )
    write_transforms(tmp_path, cams, images, alphas=alphas)
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert "fl_x" not in meta and "fl_x" in meta["frames"][1]
    ds = read_transforms(tmp_path / "transforms.json")
    torch.testing.assert_close(ds.cameras.fx, cams.fx)
    torch.testing.assert_close(ds.cameras.cx, cams.cx)
    assert (ds.alphas - alphas).abs().max() <= 0.5 / 255 + 1e-6
    on_black = read_transforms(tmp_path, background=(0.0, 0.0, 0.0))
    torch.testing.assert_close(on_black.images, ds.images * ds.alphas)


def test_nerf_synthetic_camera_angle_layout(tmp_path):
    """Blender/NeRF-synthetic: camera_angle_x, file paths without extension, RGBA frames."""
    img = torch.rand(12, 10, 4, generator=torch.Generator().manual_seed(0))
    save_image(tmp_path / "train" / "r_0.png", img)
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([0.0, -4.0, 0.5])
    meta = {
        "camera_angle_x": 0.6911,
        "frames": [{"file_path": "./train/r_0", "transform_matrix": c2w.tolist()}],
    }
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    ds = read_transforms(tmp_path / "transforms_train.json", background=(1.0, 1.0, 1.0))
    f = 0.5 * 10 / math.tan(0.5 * 0.6911)
    torch.testing.assert_close(ds.cameras.fx, torch.tensor([f]))
    torch.testing.assert_close(ds.cameras.fy, torch.tensor([f]))
    assert (ds.cameras.cx.item(), ds.cameras.cy.item()) == (5.0, 6.0)
    assert (ds.cameras.width, ds.cameras.height) == (10, 12)
    # OpenGL identity rotation = camera looking along world -z.
    torch.testing.assert_close(ds.cameras.camera_to_world[0, :3, 2], torch.tensor([0.0, 0.0, -1.0]))


def test_unsupported_cameras_are_named(tmp_path, rendered):
    cams, images, _ = rendered
    path = write_transforms(tmp_path, cams, images)
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "k1": 0.1}))
    with pytest.raises(ValueError, match="distortion"):
        read_transforms(path)
    path.write_text(json.dumps({**meta, "camera_model": "OPENCV_FISHEYE"}))
    with pytest.raises(ValueError, match="OPENCV_FISHEYE"):
        read_transforms(path)
    path.write_text(
        json.dumps(
            {
                **meta,
                "frames": [
                    {
                        "file_path": "missing.png",
                        "transform_matrix": meta["frames"][0]["transform_matrix"],
                    }
                ],
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_transforms(path)
