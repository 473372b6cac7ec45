"""A spinning multi-beam LiDAR simulated by ray casting, and the KITTI-layout data set it writes.

Sensor model (:func:`scan`): ``beams`` lasers at elevations spaced evenly from ``fov_up`` down
to ``fov_down`` (the HDL-64E's +2 deg .. -24.8 deg by default; the real sensor's spacing is not
exactly even) fire at every ``horizontal_resolution`` degrees of azimuth over 360 deg. Each ray
is cast with open3d's ``RaycastingScene.cast_rays``; rays with no hit or a true range outside
[min_range, max_range] give no return; each remaining return is dropped with probability
``dropout`` (independent Bernoulli); the measured range is the true range plus Gaussian noise
of std ``range_noise`` along the ray. Remission is a per-class albedo times |cos(incidence)|.
Frames follow KITTI's velodyne: x forward, y left, z up; a pose maps sensor to world
coordinates, ``p_world = R @ p_sensor + t``.

Data set (:func:`make_dataset`): per sequence a new street (seed + sequence index) driven along
its right lane; the scans are written in SemanticKITTI layout (velodyne/, labels/, poses.txt
as camera poses with calib.txt's Tr, so ``KittiSequence`` reads them back), plus
``map_clean.npy``: the dense map accumulated from every written scan and ``map_extra_scans``
more between consecutive ones, voxel-downsampled, in the world frame (= the velodyne frame of
scan 0). This is the file PRBonn/LiDiff's ``map_from_scans.py`` writes for SemanticKITTI, and
the completion ground truth of a scan is that map cropped around the scan's pose
(:mod:`fewstep.lidar.completion_data`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fewstep.lidar import kitti
from fewstep.lidar.scenes import INVALID_ID, Scene, SceneConfig, make_street, o3d_module

# remission albedo per SemanticKITTI class (a made-up but plausible ordering: asphalt dark,
# painted cars and metal poles bright); unknown classes get DEFAULT_ALBEDO
ALBEDO: dict[int, float] = {
    40: 0.15,
    48: 0.25,
    72: 0.3,
    50: 0.4,
    10: 0.6,
    80: 0.5,
    71: 0.3,
    70: 0.35,
}
DEFAULT_ALBEDO = 0.3
_ALBEDO_TABLE = np.array([ALBEDO.get(c, DEFAULT_ALBEDO) for c in range(260)])  # by raw id


@dataclass
class LidarConfig:
    beams: int = 64  # number of lasers (rings)
    fov_up: float = 2.0  # elevation of the top beam, degrees (HDL-64E: +2)
    fov_down: float = -24.8  # elevation of the bottom beam, degrees (HDL-64E: -24.8)
    horizontal_resolution: float = 0.2  # azimuth step, degrees (1800 columns per turn)
    min_range: float = 1.0  # returns closer than this are discarded, metres
    max_range: float = 80.0  # returns farther than this are discarded, metres
    range_noise: float = 0.02  # std of Gaussian range noise along the ray, metres
    dropout: float = 0.05  # probability that a return is lost
    mount_height: float = 1.73  # sensor height above the road (KITTI's HDL-64E: 1.73 m)

    def __post_init__(self):
        if self.beams < 1 or self.horizontal_resolution <= 0:
            raise ValueError("LidarConfig needs beams >= 1 and horizontal_resolution > 0")
        if not self.fov_down <= self.fov_up:
            raise ValueError(f"fov_down ({self.fov_down}) must not exceed fov_up ({self.fov_up})")
        if not 0.0 <= self.dropout < 1.0 or self.range_noise < 0:
            raise ValueError("LidarConfig needs 0 <= dropout < 1 and range_noise >= 0")
        if not 0.0 <= self.min_range < self.max_range:
            raise ValueError("LidarConfig needs 0 <= min_range < max_range")


def beam_elevations(cfg: LidarConfig) -> np.ndarray:
    """(beams,) elevation angles in radians, top beam first."""
    return np.deg2rad(np.linspace(cfg.fov_up, cfg.fov_down, cfg.beams))


def ray_directions(cfg: LidarConfig) -> np.ndarray:
    """(beams, columns, 3) unit ray directions in the sensor frame (x forward, z up)."""
    el = beam_elevations(cfg)[:, None]
    n_az = int(round(360.0 / cfg.horizontal_resolution))
    az = np.deg2rad(np.arange(n_az) * 360.0 / n_az)[None, :]
    return np.stack(
        np.broadcast_arrays(np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)), -1
    )


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_pose(pose: np.ndarray) -> np.ndarray:
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be a (4, 4) sensor-to-world matrix, got shape {pose.shape}")
    return pose


def scan(
    scene: Scene,
    pose: np.ndarray,
    cfg: LidarConfig | None = None,
    rng: np.random.Generator | int | None = None,
) -> dict[str, np.ndarray]:
    """One LiDAR sweep from ``pose`` (4, 4) sensor -> world.

    Returns ``dict(points (N, 3) float32 sensor frame, ranges (N,) float32 measured,
    labels (N,) uint32 semantic, instances (N,) uint32, remission (N,) float32,
    beam (N,) int16 ring index (0 = top))``.
    """
    o3d = o3d_module()
    cfg = cfg or LidarConfig()
    pose = _check_pose(pose)
    gen = _rng(rng)
    dirs = ray_directions(cfg)
    beam = np.broadcast_to(np.arange(cfg.beams)[:, None], dirs.shape[:2]).reshape(-1)
    dirs = dirs.reshape(-1, 3)
    world_dirs = dirs @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], world_dirs.shape)
    rays = np.concatenate([origins, world_dirs], axis=1).astype(np.float32)
    hit = scene.raycasting_scene().cast_rays(o3d.core.Tensor(rays))
    # directions are unit vectors, so t_hit is the range in metres
    t = hit["t_hit"].numpy().astype(np.float64)
    gid = hit["geometry_ids"].numpy()
    keep = (gid != INVALID_ID) & np.isfinite(t) & (t >= cfg.min_range) & (t <= cfg.max_range)
    keep &= gen.random(len(keep)) >= cfg.dropout
    idx = np.flatnonzero(keep)
    r = t[idx] + cfg.range_noise * gen.standard_normal(len(idx))
    labels, instances = scene.lookup(gid[idx], hit["primitive_ids"].numpy()[idx])
    normals = hit["primitive_normals"].numpy()[idx].astype(np.float64)
    cos_inc = np.abs(np.sum(normals * world_dirs[idx], axis=1))
    remission = np.clip(_ALBEDO_TABLE[np.minimum(labels, 259)] * cos_inc, 0.0, 1.0)
    return {
        "points": (dirs[idx] * r[:, None]).astype(np.float32),
        "ranges": r.astype(np.float32),
        "labels": labels,
        "instances": instances,
        "remission": remission.astype(np.float32),
        "beam": beam[idx].astype(np.int16),
    }


def drive(
    scene: Scene,
    n_scans: int,
    speed: float = 8.0,
    *,
    rate_hz: float = 10.0,
    start_x: float = 5.0,
    lane_y: float | None = None,
    weave: float = 0.3,
    weave_period: float = 40.0,
    mount_height: float = 1.73,
) -> np.ndarray:
    """Sensor poses (n_scans, 4, 4), sensor -> world, of a vehicle driving along +x.

    The vehicle moves ``speed / rate_hz`` metres per scan along x, in the lane at
    ``lane_y`` (default: the right lane, -road_width / 4) weaving sideways as
    ``weave * sin(2 pi x / weave_period)`` and yawing along that path, at ``mount_height``.
    """
    if n_scans < 1 or rate_hz <= 0:
        raise ValueError("drive needs n_scans >= 1 and rate_hz > 0")
    if lane_y is None:
        width = scene.config.road_width if scene.config is not None else 8.0
        lane_y = -width / 4
    x = start_x + np.arange(n_scans) * speed / rate_hz
    k = 2 * np.pi / weave_period
    y = lane_y + weave * np.sin(k * x)
    yaw = np.arctan(weave * k * np.cos(k * x))
    poses = np.tile(np.eye(4), (n_scans, 1, 1))
    c, s = np.cos(yaw), np.sin(yaw)
    poses[:, 0, 0], poses[:, 0, 1], poses[:, 1, 0], poses[:, 1, 1] = c, -s, s, c
    poses[:, :3, 3] = np.stack([x, y, np.full_like(x, mount_height)], axis=1)
    return poses


def accumulate(scans: list, poses: np.ndarray, voxel: float | None = 0.1) -> np.ndarray:
    """Dense map (M, 3) float64 in the world frame from sensor-frame scans and their poses.

    ``scans`` holds (N_i, 3) arrays or :func:`scan` dicts; each is mapped to the world with its
    (4, 4) sensor -> world pose, then the union is voxel-downsampled with open3d's
    ``voxel_down_sample`` (one averaged point per occupied voxel; ``voxel=None`` keeps all).
    """
    poses = np.asarray(poses, dtype=np.float64)
    if len(scans) != len(poses):
        raise ValueError(f"{len(scans)} scans but {len(poses)} poses")
    parts = []
    for s, pose in zip(scans, poses):
        pts = s["points"] if isinstance(s, dict) else s
        parts.append(kitti.transform_points(pts, _check_pose(pose)))
    world = np.concatenate(parts) if parts else np.zeros((0, 3))
    if voxel is None or len(world) == 0:
        return world
    o3d = o3d_module()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(world))
    return np.asarray(pcd.voxel_down_sample(voxel).points, dtype=np.float64)


# nominal KITTI calibration: Tr swaps axes as KITTI's does (x_cam = -y_velo, y_cam = -z_velo,
# z_cam = x_velo) with a KITTI-like lever arm; P0 holds KITTI odometry's intrinsics
NOMINAL_TR = np.array(
    [[0.0, -1.0, 0.0, -0.012], [0.0, 0.0, -1.0, -0.054], [1.0, 0.0, 0.0, -0.292], [0, 0, 0, 1.0]]
)
NOMINAL_P0 = np.array([[718.856, 0.0, 607.1928, 0.0], [0.0, 718.856, 185.2157, 0.0], [0, 0, 1, 0]])


@dataclass
class DatasetConfig:
    scene: SceneConfig = field(default_factory=SceneConfig)  # street recipe; seed + sequence
    lidar: LidarConfig = field(default_factory=LidarConfig)  # sensor model
    speed: float = 8.0  # vehicle speed, m/s
    rate_hz: float = 10.0  # scans per second (KITTI: 10 Hz)
    start_x: float = 5.0  # x of the first pose along the street
    weave: float = 0.3  # sideways weave amplitude of the path (gives non-trivial yaw)
    map_voxel: float = 0.1  # voxel size of the accumulated map (LiDiff: 0.1 m)
    map_extra_scans: int = 1  # extra scans between written ones that only feed the map
    seed: int = 0  # seed of sensor noise and dropout


def _sequence(root: Path, i: int, n_scans: int, cfg: DatasetConfig) -> np.ndarray:
    """Write sequence ``i``; returns the world frame's pose in the scene's frame (4, 4)."""
    scene = make_street(replace(cfg.scene, seed=cfg.scene.seed + i))
    gen = np.random.default_rng([cfg.seed, i])
    step = 1 + cfg.map_extra_scans
    scene_poses = drive(
        scene,
        (n_scans - 1) * step + 1,
        cfg.speed,
        rate_hz=cfg.rate_hz * step,
        start_x=cfg.start_x,
        weave=cfg.weave,
        mount_height=cfg.lidar.mount_height,
    )
    scans = [scan(scene, p, cfg.lidar, gen) for p in scene_poses]
    # the world frame is the velodyne frame of the first written scan, as in KITTI
    poses = np.linalg.inv(scene_poses[0]) @ scene_poses
    seq = root / "sequences" / f"{i:02d}"
    for k in range(n_scans):
        s = scans[k * step]
        kitti.write_scan(seq / "velodyne" / f"{k:06d}.bin", s["points"], s["remission"])
        kitti.write_labels(seq / "labels" / f"{k:06d}.label", s["labels"], s["instances"])
    kitti.write_poses(seq / "poses.txt", kitti.velodyne_to_camera_poses(poses[::step], NOMINAL_TR))
    p = {f"P{j}": NOMINAL_P0.copy() for j in range(4)}
    p["P1"][0, 3] = -386.1448  # KITTI's stereo baseline term, for a complete-looking file
    kitti.write_calib(seq / "calib.txt", {**p, "Tr": NOMINAL_TR})
    dense = accumulate(scans, poses, voxel=cfg.map_voxel)
    np.save(seq / "map_clean.npy", dense.astype(np.float32))
    return scene_poses[0]


def make_dataset(
    root: str | Path,
    n_sequences: int = 2,
    scans_per_seq: int = 20,
    cfg: DatasetConfig | None = None,
) -> Path:
    """Write ``n_sequences`` simulated sequences in SemanticKITTI layout under ``root``.

    ``root/sequences/NN/{velodyne/*.bin, labels/*.label, poses.txt, calib.txt, map_clean.npy}``
    plus ``root/dataset.json`` (the resolved config and each sequence's ``world_in_scene``
    pose). Returns ``root``.
    """
    cfg = cfg or DatasetConfig()
    if n_sequences < 1 or scans_per_seq < 1:
        raise ValueError("make_dataset needs n_sequences >= 1 and scans_per_seq >= 1")
    root = Path(root)
    # world_in_scene[NN]: the sequence's world frame (its first scan's sensor frame) in the
    # frame of the scene meshes, so a map can be compared with make_street(seed + i)
    frames = {
        f"{i:02d}": _sequence(root, i, scans_per_seq, cfg).tolist() for i in range(n_sequences)
    }
    meta = {
        "n_sequences": n_sequences,
        "scans_per_seq": scans_per_seq,
        "config": asdict(cfg),
        "world_in_scene": frames,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
