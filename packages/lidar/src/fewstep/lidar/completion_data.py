"""Scene-completion pairs (partial scan, dense ground truth) from SemanticKITTI layout.

Follows PRBonn/LiDiff's ``TemporalKITTISet`` and ``point_set_to_sparse`` (Nunes et al.,
"Scaling Diffusion Models to Real-World 3D LiDAR Scene Completion", CVPR 2024, Sec. 4):

- partial: the scan's points with static labels (1 < id < 252; moving objects and unlabelled
  points dropped, when labels exist), min_range < range < max_range, and z > min_z, in the
  sensor frame; tiled to at least ``n_partial`` points and reduced to exactly ``n_partial``
  by farthest-point sampling (open3d ``farthest_point_down_sample``).
- dense: the sequence's ``map_clean.npy`` (world frame, see :mod:`fewstep.lidar.sensor` or
  :func:`build_map` for real data) within max_range of the scan's position, moved into the
  sensor frame with the inverse pose, z > min_z; kept only inside the ``viewpoint_voxel``-metre
  voxels that the partial scan occupies; shuffled and tiled to exactly ``n_dense`` points.

LiDiff uses 18,000 partial / 180,000 dense points (``num_points`` 180k, partial a tenth), 50 m
range; the defaults here are that scale, a CPU test passes small sizes. Items are cached in
memory (and the maps per sequence); the random draws of item i depend only on (seed, i).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fewstep.lidar import kitti
from fewstep.lidar.scenes import o3d_module

MAP_FILE = "map_clean.npy"  # PRBonn/LiDiff map_from_scans.py's file name


@dataclass
class PairsConfig:
    max_range: float = 50.0  # crop radius around the sensor, metres (LiDiff: 50)
    min_range: float = 3.5  # drop partial points closer than this (LiDiff: ego-vehicle returns)
    min_z: float = -4.0  # drop points below this height in the sensor frame (LiDiff: -4)
    n_partial: int = 18000  # partial points per item (LiDiff: num_points / 10)
    n_dense: int = 180000  # ground-truth points per item (LiDiff: num_points)
    viewpoint_voxel: float = 10.0  # dense points kept only in voxels the partial scan touches
    seed: int = 0  # seed of the shuffles; item i uses default_rng([seed, i])
    cache: bool = True  # keep items in memory after the first read


def static_mask(labels: np.ndarray | None, n: int) -> np.ndarray:
    """(N,) bool: SemanticKITTI static classes, 1 < id < 252 (all True without labels)."""
    if labels is None:
        return np.ones(n, dtype=bool)
    return (labels > 1) & (labels < 252)


def build_map(seq: kitti.KittiSequence, voxel: float = 0.1, min_range: float = 3.5) -> np.ndarray:
    """Dense world-frame map (M, 3) of a real sequence, as LiDiff's ``map_from_scans.py``:
    static points farther than ``min_range`` of every scan, moved with the scan's pose,
    voxel-downsampled (open3d averages per voxel; LiDiff keeps one point per voxel)."""
    from fewstep.lidar.sensor import accumulate

    scans, poses = [], []
    for i in range(len(seq)):
        item = seq[i]
        pts = item["points"][static_mask(item["labels"], len(item["points"]))]
        scans.append(pts[np.linalg.norm(pts, axis=1) > min_range])
        poses.append(item["pose"])
    return accumulate(scans, np.stack(poses), voxel=voxel)


def crop_partial(points: np.ndarray, labels: np.ndarray | None, cfg: PairsConfig) -> np.ndarray:
    """LiDiff's crop of the input scan: static, min_range < range < max_range, z > min_z."""
    pts = np.asarray(points, dtype=np.float64)[static_mask(labels, len(points))]
    r = np.linalg.norm(pts, axis=1)
    pts = pts[(r > cfg.min_range) & (r < cfg.max_range)]
    return pts[pts[:, 2] > cfg.min_z]


def crop_dense(world_map: np.ndarray, pose: np.ndarray, cfg: PairsConfig) -> np.ndarray:
    """Map points within max_range of the pose's position, in the sensor frame, z > min_z."""
    d = np.linalg.norm(world_map - pose[:3, 3], axis=1)
    local = kitti.transform_points(world_map[d < cfg.max_range], np.linalg.inv(pose))
    return local[local[:, 2] > cfg.min_z]


def _tile(points: np.ndarray, n: int) -> np.ndarray:
    reps = int(np.ceil(n / len(points)))
    return np.tile(points, (reps, 1))


def fixed_size_pair(
    partial: np.ndarray, dense: np.ndarray, cfg: PairsConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n_partial, 3), (n_dense, 3): LiDiff's ``point_set_to_sparse`` (FPS partial; dense
    restricted to the partial's viewpoint voxels, shuffled and tiled)."""
    o3d = o3d_module()
    if len(partial) == 0:
        raise ValueError("the partial scan is empty after cropping; nothing to complete")
    part = _tile(partial[rng.permutation(len(partial))], cfg.n_partial)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(part))
    part = np.asarray(pcd.farthest_point_down_sample(cfg.n_partial).points)
    grid = o3d.geometry.VoxelGrid.create_from_point_cloud(pcd, voxel_size=cfg.viewpoint_voxel)
    inside = np.asarray(grid.check_if_included(o3d.utility.Vector3dVector(dense)), dtype=bool)
    dense = dense[inside]
    if len(dense) == 0:
        raise ValueError("no ground-truth map points fall near the partial scan")
    dense = _tile(dense[rng.permutation(len(dense))], cfg.n_dense)[: cfg.n_dense]
    return part, dense


class CompletionPairs(Dataset):
    """Items ``dict(partial (n_partial, 3) float32, dense (n_dense, 3) float32, pose (4, 4),
    sequence str, frame str)`` over the scans of the given sequences (all by default)."""

    def __init__(
        self,
        root: str | Path,
        sequences: list[str | int] | None = None,
        cfg: PairsConfig | None = None,
    ):
        self.root, self.cfg = Path(root), cfg or PairsConfig()
        if self.cfg.n_partial < 1 or self.cfg.n_dense < 1:
            raise ValueError("PairsConfig needs n_partial >= 1 and n_dense >= 1")
        seq_root = self.root / "sequences"
        if sequences is None:
            if not seq_root.is_dir():
                raise FileNotFoundError(f"no sequences/ folder under {self.root}")
            sequences = sorted(p.name for p in seq_root.iterdir() if p.is_dir())
        self.sequences = {}
        self.index: list[tuple[str, int]] = []
        for s in sequences:
            seq = kitti.KittiSequence(self.root, s)
            name = seq.path.name
            if not (seq.path / MAP_FILE).is_file():
                raise FileNotFoundError(
                    f"{seq.path / MAP_FILE} missing: write it with sensor.make_dataset or "
                    "completion_data.build_map (LiDiff's map_from_scans.py writes the same file)"
                )
            self.sequences[name] = seq
            self.index += [(name, i) for i in range(len(seq))]
        self._maps: dict[str, np.ndarray] = {}
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.index)

    def world_map(self, sequence: str) -> np.ndarray:
        if sequence not in self._maps:
            path = self.sequences[sequence].path / MAP_FILE
            m = np.load(path, allow_pickle=False)
            if m.ndim != 2 or m.shape[1] < 3:
                raise ValueError(f"{path}: expected an (M, 3) map, got shape {m.shape}")
            self._maps[sequence] = m[:, :3].astype(np.float64)
        return self._maps[sequence]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} scans")
        if i in self._items:
            return self._items[i]
        name, k = self.index[i]
        scan = self.sequences[name][k]
        partial = crop_partial(scan["points"], scan["labels"], self.cfg)
        dense = crop_dense(self.world_map(name), scan["pose"], self.cfg)
        part, full = fixed_size_pair(
            partial, dense, self.cfg, np.random.default_rng([self.cfg.seed, i])
        )
        item = {
            "partial": torch.from_numpy(part.astype(np.float32)),
            "dense": torch.from_numpy(full.astype(np.float32)),
            "pose": torch.from_numpy(scan["pose"]),
            "sequence": name,
            "frame": scan["frame"],
        }
        if self.cfg.cache:
            self._items[i] = item
        return item
