"""Frames for bird's-eye-view car detection from cameras (+ LiDAR depth) on procedural streets.

Recipe of one split (:func:`load_split`; every draw from ``numpy.random.default_rng`` seeded by
``cfg.seed`` and the street index):

1. Street ``i`` is ``make_street(replace(cfg.scene, seed=cfg.scene.seed + i))``; training uses
   ``i < streets``, the held-out split the next ``held_out`` streets.
2. Cars move: each car on the left kerb drives with probability ``moving_fraction``, shifted
   into a lane 1 m left of the road centre, at one oncoming speed per street drawn from
   ``car_speed`` (so drivers never overlap); the rest stay parked. At time ``t`` the scene is
   the street with each driving car's mesh moved by ``(-v t, shift)`` (other pieces fixed).
3. The ego vehicle drives along the right lane (:func:`fewstep.lidar.sensor.drive`, 10 Hz
   ticks); a sample is taken every ``frame_every`` ticks, and holds ``history`` frames spaced
   ``history_every`` ticks (current first): per frame the camera images
   (:func:`fewstep.lidar.camera.render`), the sparse depth of that tick's LiDAR scan projected
   into each view (:func:`fewstep.lidar.camera.sparse_depth`) and the transform from that
   frame's vehicle frame into the current one.
4. Ground truth: the BEV boxes of cars whose centre lies in the BEV grid and that at least
   ``min_points`` LiDAR returns hit (nuScenes keeps boxes with >= 1 point), each
   ``(x, y, w, l, yaw)`` in the current vehicle frame, and its trajectory: the box centre at
   every history frame's time, in the current vehicle frame (VCD's per-object motion
   trajectory).

Box parameters: scenes.py does not record a car's box, so :func:`car_boxes` recovers it from
each car instance's mesh vertices with open3d's minimal oriented bounding box
(``OrientedBoundingBox.create_from_points_minimal``); the axis closest to z is the height,
the longer of the other two the length, whose heading is the yaw (folded into [-pi/2, pi/2):
a car box is symmetric under a half turn).

Splits are cached as safetensors under ``cache_root()/lidar-vcd-data/<config hash>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from fewstep.lidar.camera import CameraConfig, render, sparse_depth
from fewstep.lidar.scenes import Piece, Scene, SceneConfig, make_street, o3d_module
from fewstep.lidar.sensor import LidarConfig, drive, scan

TICK_HZ = 10.0  # ego poses and scene times advance in 0.1 s ticks (KITTI's 10 Hz)
# Part of the cache key of a split: bump it when this module, camera.py, scenes.py or sensor.py
# change the frames a config gives, so older cached frames are not reused
DATA_CODE_VERSION = 1


def _scene() -> SceneConfig:
    return SceneConfig(length=80.0, n_buildings=5, n_cars=10, n_poles=4, n_trees=4)


def _lidar() -> LidarConfig:
    return LidarConfig(beams=32, horizontal_resolution=0.5, max_range=40.0)


@dataclass
class BEVGrid:
    x_range: tuple[float, float] = (-16.0, 16.0)  # BEV extent along x (forward), metres
    y_range: tuple[float, float] = (-8.0, 8.0)  # BEV extent along y (left), metres
    cell: float = 0.5  # BEV cell size, metres

    def __post_init__(self):
        if (
            self.cell <= 0
            or self.x_range[1] <= self.x_range[0]
            or self.y_range[1] <= self.y_range[0]
        ):
            raise ValueError(f"BEVGrid needs cell > 0 and increasing ranges, got {self}")

    @property
    def shape(self) -> tuple[int, int]:
        """(rows along x, columns along y)."""
        nx = int(round((self.x_range[1] - self.x_range[0]) / self.cell))
        ny = int(round((self.y_range[1] - self.y_range[0]) / self.cell))
        return nx, ny

    def inside(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy)
        return (
            (xy[..., 0] >= self.x_range[0])
            & (xy[..., 0] < self.x_range[1])
            & (xy[..., 1] >= self.y_range[0])
            & (xy[..., 1] < self.y_range[1])
        )


@dataclass
class DetectionDataConfig:
    scene: SceneConfig = field(default_factory=_scene)  # street recipe; seed + street index
    lidar: LidarConfig = field(default_factory=_lidar)  # LiDAR giving the expert's depth prior
    camera: CameraConfig = field(default_factory=CameraConfig)  # views around the vehicle
    grid: BEVGrid = field(default_factory=BEVGrid)  # BEV extent of boxes and detector
    streets: int = 8  # training streets
    held_out: int = 2  # held-out streets (the next seeds)
    samples_per_street: int = 12  # samples taken along each street
    frame_every: int = 5  # ticks (0.1 s) between consecutive samples
    history: int = 2  # frames per sample (current + past), for fusion and trajectories
    history_every: int = 5  # ticks between the frames of one sample
    speed: float = 8.0  # ego speed, m/s
    start_x: float = 6.0  # ego x at tick 0
    moving_fraction: float = 0.5  # share of cars that drive instead of staying parked
    car_speed: tuple[float, float] = (2.0, 6.0)  # speed range of driving cars, m/s
    min_points: int = 5  # LiDAR returns a car needs to count as ground truth
    seed: int = 0  # seed of car motion, sensor noise and texture noise

    def __post_init__(self):
        if self.streets < 1 or self.held_out < 1 or self.samples_per_street < 1:
            raise ValueError("DetectionDataConfig needs streets, held_out, samples >= 1")
        if self.history < 1 or self.frame_every < 1 or self.history_every < 1:
            raise ValueError("DetectionDataConfig needs history, frame_every, history_every >= 1")
        if not 0.0 <= self.moving_fraction <= 1.0:
            raise ValueError(f"moving_fraction must lie in [0, 1], got {self.moving_fraction}")


# ------------------------------------------------------------------------------------ boxes


def fit_bev_box(vertices: np.ndarray) -> np.ndarray:
    """(5,) ``(x, y, w, l, yaw)`` of the minimal oriented box around ``vertices`` (N, 3);
    yaw is the heading of the longer horizontal side, in [-pi/2, pi/2)."""
    o3d = o3d_module()
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) < 4:
        raise ValueError(f"fit_bev_box needs (N >= 4, 3) vertices, got shape {v.shape}")
    obb = o3d.geometry.OrientedBoundingBox.create_from_points_minimal(o3d.utility.Vector3dVector(v))
    axes, ext = np.asarray(obb.R), np.asarray(obb.extent)
    up = int(np.argmax(np.abs(axes[2])))  # the axis closest to z is the height
    rest = [k for k in range(3) if k != up]
    i_len, i_wid = (rest[0], rest[1]) if ext[rest[0]] >= ext[rest[1]] else (rest[1], rest[0])
    heading = axes[:2, i_len]
    yaw = wrap_half_turn(np.arctan2(heading[1], heading[0]))
    c = np.asarray(obb.center)
    return np.array([c[0], c[1], ext[i_wid], ext[i_len], yaw])


def wrap_half_turn(yaw):
    """Angles folded into [-pi/2, pi/2) (a box looks the same after a half turn)."""
    return (np.asarray(yaw) + np.pi / 2) % np.pi - np.pi / 2


def car_boxes(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(instance ids (M,), world-frame BEV boxes (M, 5)) of the scene's car pieces."""
    cars = [p for p in scene.pieces if p.instance > 0]
    ids = np.array([p.instance for p in cars], dtype=np.int64)
    boxes = np.stack([fit_bev_box(np.asarray(p.mesh.vertices)) for p in cars]) if cars else None
    return ids, boxes if boxes is not None else np.zeros((0, 5))


def scene_at(scene: Scene, motions: dict[int, np.ndarray], t: float) -> Scene:
    """The scene at time ``t`` s: car instance ``i`` moved by ``(vx t, dy)`` from
    ``motions[i] = (vx, dy)`` (see :func:`_motions`); other pieces unchanged."""
    o3d = o3d_module()
    pieces = []
    for p in scene.pieces:
        m = motions.get(p.instance) if p.instance > 0 else None
        if m is not None and np.any(m != 0):
            mesh = o3d.geometry.TriangleMesh(p.mesh).translate((m[0] * t, m[1], 0.0))
            p = Piece(p.name, mesh, p.labels, p.instance)
        pieces.append(p)
    return Scene(pieces, scene.config)


def boxes_at(boxes: np.ndarray, motion: np.ndarray, t: float) -> np.ndarray:
    """World BEV boxes (M, 5) at time ``t`` given per-box ``(vx, dy)`` (M, 2)."""
    out = boxes.copy()
    out[:, 0] += motion[:, 0] * t
    out[:, 1] += motion[:, 1]
    return out


def to_frame(boxes: np.ndarray, world_to_vehicle: np.ndarray) -> np.ndarray:
    """World BEV boxes (M, 5) -> the vehicle frame given its (4, 4) world -> vehicle map."""
    out = boxes.copy()
    xy1 = np.concatenate([boxes[:, :2], np.zeros((len(boxes), 1)), np.ones((len(boxes), 1))], 1)
    out[:, :2] = (xy1 @ world_to_vehicle.T)[:, :2]
    dyaw = np.arctan2(world_to_vehicle[1, 0], world_to_vehicle[0, 0])
    out[:, 4] = wrap_half_turn(boxes[:, 4] + dyaw)
    return out


# ------------------------------------------------------------------------------------ frames


def _motions(scene: Scene, ids: np.ndarray, cfg: DetectionDataConfig, gen) -> dict[int, np.ndarray]:
    """Per car instance ``(vx, dy)``: x velocity (m/s) and sideways shift (m).

    Parked cars stay at the curb. Driving cars come from the left kerb (y > 0), are shifted
    into a lane centred ``lane_y`` = 1 m left of the road centre (clear of the parked row and
    of the ego lane) and share one oncoming speed per street, so they never overlap: their
    kerbside placement did not, and a common shift and speed keep it so."""
    speed = -gen.uniform(*cfg.car_speed)
    road = scene.config.road_width if scene.config is not None else 8.0
    lane_y, kerb_y = 1.0, road / 2 - 1.1
    out = {}
    for i in ids:
        moving = gen.random() < cfg.moving_fraction
        out[int(i)] = np.zeros(2)
        piece = next(p for p in scene.pieces if p.instance == i)
        if moving and np.asarray(piece.mesh.vertices)[:, 1].mean() > 0:
            out[int(i)] = np.array([speed, lane_y - kerb_y])
    return out


def street_samples(cfg: DetectionDataConfig, street: int) -> list[dict[str, np.ndarray]]:
    """Every sample of one street (see the module docstring), as numpy arrays."""
    base = make_street(replace(cfg.scene, seed=cfg.scene.seed + street))
    gen = np.random.default_rng([cfg.seed, street])
    ids, boxes0 = car_boxes(base)
    motion = _motions(base, ids, cfg, gen)
    first = (cfg.history - 1) * cfg.history_every
    n_ticks = first + (cfg.samples_per_street - 1) * cfg.frame_every + 1
    poses = drive(base, n_ticks, cfg.speed, rate_hz=TICK_HZ, start_x=cfg.start_x,
                  mount_height=cfg.lidar.mount_height)  # fmt: skip
    ticks: dict[int, dict] = {}  # each rendered tick once: histories overlap

    def tick(k: int) -> dict:
        if k not in ticks:
            scene = scene_at(base, motion, k / TICK_HZ)
            sc = scan(scene, poses[k], cfg.lidar, gen)
            img = render(scene, poses[k], cfg.camera, gen)
            count = np.bincount(
                sc["instances"].astype(np.int64), minlength=int(ids.max(initial=0)) + 1
            )
            ticks[k] = {"rgb": img["rgb"], "depth": sparse_depth(sc["points"], cfg.camera),
                        "hits": count}  # fmt: skip
        return ticks[k]

    moved = np.stack([motion[int(i)] for i in ids]) if len(ids) else np.zeros((0, 2))
    out = []
    for s in range(cfg.samples_per_street):
        k0 = first + s * cfg.frame_every
        ks = [k0 - j * cfg.history_every for j in range(cfg.history)]
        w2v = np.linalg.inv(poses[k0])
        frames = [tick(k) for k in ks]
        cur = to_frame(boxes_at(boxes0, moved, k0 / TICK_HZ), w2v)
        keep = cfg.grid.inside(cur[:, :2]) & (frames[0]["hits"][ids] >= cfg.min_points)
        traj = []
        for k in ks:
            traj.append(to_frame(boxes_at(boxes0, moved, k / TICK_HZ), w2v)[:, :2])
        out.append({
            "rgb": np.stack([f["rgb"] for f in frames]),  # (T, V, 3, H, W)
            "depth": np.stack([f["depth"] for f in frames]),  # (T, V, H, W)
            "past_to_cur": np.stack([w2v @ poses[k] for k in ks]),  # (T, 4, 4)
            "boxes": cur[keep],  # (M, 5)
            "traj": np.stack(traj, 1)[keep],  # (M, T, 2)
        })  # fmt: skip
    return out


def collate(
    samples: list[dict[str, np.ndarray]], max_boxes: int | None = None
) -> dict[str, Tensor]:
    """Stack samples; boxes and trajectories padded to ``max_boxes`` with a validity mask."""
    m = max_boxes if max_boxes is not None else max([len(s["boxes"]) for s in samples] + [1])
    n, t = len(samples), samples[0]["rgb"].shape[0]
    boxes, traj, mask = np.zeros((n, m, 5)), np.zeros((n, m, t, 2)), np.zeros((n, m), bool)
    for i, s in enumerate(samples):
        k = min(len(s["boxes"]), m)
        boxes[i, :k], traj[i, :k], mask[i, :k] = s["boxes"][:k], s["traj"][:k], True
    return {
        "rgb": torch.from_numpy(np.stack([s["rgb"] for s in samples])).float(),
        "depth": torch.from_numpy(np.stack([s["depth"] for s in samples])).float(),
        "past_to_cur": torch.from_numpy(np.stack([s["past_to_cur"] for s in samples])).float(),
        "boxes": torch.from_numpy(boxes).float(),
        "traj": torch.from_numpy(traj).float(),
        "box_mask": torch.from_numpy(mask),
    }


def build_split(cfg: DetectionDataConfig, split: str) -> dict[str, Tensor]:
    """Generate a split (``train`` or ``test``) without the cache."""
    streets = {"train": range(cfg.streets), "test": range(cfg.streets, cfg.streets + cfg.held_out)}
    if split not in streets:
        raise ValueError(f"split must be one of {list(streets)}, got {split!r}")
    samples = [s for i in streets[split] for s in street_samples(cfg, i)]
    return collate(samples)


def load_split(cfg: DetectionDataConfig, split: str) -> dict[str, Tensor]:
    """A split, generated once per config and cached (safetensors) under core's cache root."""
    from safetensors.torch import load_file, save_file

    from fewstep.core.cache import cache_key, cache_root

    key = cache_key({"kind": "lidar-vcd-data", "config": asdict(cfg), "split": split,
                     "code": DATA_CODE_VERSION})  # fmt: skip
    folder = cache_root() / "lidar-vcd-data"
    path = folder / f"{key}.safetensors"
    if path.exists():
        return load_file(str(path))
    data = build_split(cfg, split)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{key}-{os.getpid()}.safetensors"
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp),
              metadata={"config": json.dumps(asdict(cfg), default=str)})  # fmt: skip
    os.replace(tmp, path)
    return data
