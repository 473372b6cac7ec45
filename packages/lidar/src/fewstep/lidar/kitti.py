"""KITTI / SemanticKITTI odometry layout: scans, labels, poses, calibration.

Layout (Behley et al., "SemanticKITTI", ICCV 2019; the KITTI odometry devkit)::

    <root>/sequences/NN/velodyne/XXXXXX.bin    float32 (x, y, z, remission) per point, little endian
    <root>/sequences/NN/labels/XXXXXX.label    uint32 per point: lower 16 bits semantic id,
                                               upper 16 bits instance id
    <root>/sequences/NN/poses.txt              one 3x4 row-major matrix per scan: the pose of the
                                               left camera (cam0) in the frame of cam0 at scan 0
    <root>/sequences/NN/calib.txt              "KEY: v00 ... v11" lines (P0..P3, Tr); Tr maps
                                               velodyne coordinates into cam0 coordinates

The velodyne-to-world pose of scan i is ``inv(Tr) @ P_i @ Tr`` (KITTI devkit convention, as
PRBonn/LiDiff's ``load_poses`` uses), so the world frame is the velodyne frame of scan 0.

Semantic ids follow semantic-kitti-api ``config/semantic-kitti.yaml`` (PRBonn/semantic-kitti-api);
:data:`SEMANTIC_KITTI_LABELS` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# raw SemanticKITTI label ids, from semantic-kitti-api config/semantic-kitti.yaml ("labels:")
SEMANTIC_KITTI_LABELS: dict[int, str] = {
    0: "unlabeled",
    1: "outlier",
    10: "car",
    11: "bicycle",
    13: "bus",
    15: "motorcycle",
    16: "on-rails",
    18: "truck",
    20: "other-vehicle",
    30: "person",
    31: "bicyclist",
    32: "motorcyclist",
    40: "road",
    44: "parking",
    48: "sidewalk",
    49: "other-ground",
    50: "building",
    51: "fence",
    52: "other-structure",
    60: "lane-marking",
    70: "vegetation",
    71: "trunk",
    72: "terrain",
    80: "pole",
    81: "traffic-sign",
    99: "other-object",
    252: "moving-car",
    253: "moving-bicyclist",
    254: "moving-person",
    255: "moving-motorcyclist",
    256: "moving-on-rails",
    257: "moving-bus",
    258: "moving-truck",
    259: "moving-other-vehicle",
}
LABEL_IDS: dict[str, int] = {name: i for i, name in SEMANTIC_KITTI_LABELS.items()}

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- scans


def read_scan(path: PathLike) -> np.ndarray:
    """Read a velodyne ``.bin`` scan. Returns (N, 4) float32: x, y, z, remission."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scan file not found: {path}")
    size = path.stat().st_size
    if size % 16:
        raise ValueError(
            f"{path}: {size} bytes is not a whole number of points "
            "(expected 16 bytes per point: float32 x, y, z, remission)"
        )
    return np.fromfile(path, dtype="<f4").reshape(-1, 4)


def write_scan(path: PathLike, points: np.ndarray, remission: np.ndarray | None = None) -> Path:
    """Write a velodyne ``.bin`` scan.

    Args:
        points: (N, 3) xyz, or (N, 4) xyz + remission (then ``remission`` must be None).
        remission: (N,) values in [0, 1]; zeros when omitted.
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] not in (3, 4):
        raise ValueError(f"points must be (N, 3) or (N, 4), got shape {pts.shape}")
    if pts.shape[1] == 4:
        if remission is not None:
            raise ValueError("points already has a remission column; pass remission=None")
        data = pts.astype("<f4")
    else:
        rem = np.zeros(len(pts)) if remission is None else np.asarray(remission).reshape(-1)
        if len(rem) != len(pts):
            raise ValueError(f"remission has {len(rem)} values for {len(pts)} points")
        data = np.concatenate([pts, rem[:, None]], axis=1).astype("<f4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.tofile(path)
    return path


# ----------------------------------------------------------------------------- labels


def read_labels(path: PathLike, n_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a SemanticKITTI ``.label`` file.

    Returns (semantic (N,) uint32, instance (N,) uint32): the lower and upper 16 bits.
    ``n_points``, when given, must match the number of labels (the scan's point count).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    size = path.stat().st_size
    if size % 4:
        raise ValueError(f"{path}: {size} bytes is not a whole number of uint32 labels")
    raw = np.fromfile(path, dtype="<u4")
    if n_points is not None and len(raw) != n_points:
        raise ValueError(f"{path}: {len(raw)} labels for a scan of {n_points} points")
    return (raw & 0xFFFF).astype(np.uint32), (raw >> 16).astype(np.uint32)


def write_labels(path: PathLike, semantic: np.ndarray, instance: np.ndarray | None = None) -> Path:
    """Write a ``.label`` file: ``semantic | instance << 16`` as little-endian uint32.

    Args:
        semantic: (N,) ids < 2**16 (SemanticKITTI raw ids, see :data:`SEMANTIC_KITTI_LABELS`).
        instance: (N,) ids < 2**16; zeros when omitted.
    """
    sem = np.asarray(semantic).reshape(-1).astype(np.int64)
    inst = np.zeros_like(sem) if instance is None else np.asarray(instance).reshape(-1)
    inst = inst.astype(np.int64)
    if len(inst) != len(sem):
        raise ValueError(f"instance has {len(inst)} values for {len(sem)} semantic labels")
    for name, v in (("semantic", sem), ("instance", inst)):
        if len(v) and (v.min() < 0 or v.max() >= 1 << 16):
            raise ValueError(f"{name} ids must lie in [0, 65535]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (sem | (inst << 16)).astype("<u4").tofile(path)
    return path


# ----------------------------------------------------------------------------- poses, calib


def _parse_matrix_row(values: list[str], where: str) -> np.ndarray:
    if len(values) != 12:
        raise ValueError(
            f"{where}: expected 12 numbers (a 3x4 row-major matrix), got {len(values)}"
        )
    try:
        m = np.array([float(v) for v in values], dtype=np.float64).reshape(3, 4)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return np.vstack([m, [0.0, 0.0, 0.0, 1.0]])


def _format_matrix(m: np.ndarray) -> str:
    # repr() of a Python float is the shortest string that parses back to the same double,
    # which is what makes write -> read bit-exact
    return " ".join(repr(float(v)) for v in np.asarray(m, dtype=np.float64)[:3, :4].reshape(-1))


def _as_pose_stack(poses: np.ndarray) -> np.ndarray:
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1:] not in ((3, 4), (4, 4)):
        raise ValueError(f"poses must be (K, 4, 4) or (K, 3, 4), got shape {p.shape}")
    return p


def read_poses(path: PathLike) -> np.ndarray:
    """Read ``poses.txt``: (K, 4, 4) float64, one homogeneous matrix per line (as stored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"poses file not found: {path}")
    rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    return np.stack([_parse_matrix_row(r, f"{path} line {i + 1}") for i, r in enumerate(rows)])


def write_poses(path: PathLike, poses: np.ndarray) -> Path:
    """Write ``poses.txt``: the first three rows of each (4, 4) or (3, 4) pose, row-major."""
    p = _as_pose_stack(poses)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_format_matrix(m) + "\n" for m in p))
    return path


def read_calib(path: PathLike) -> dict[str, np.ndarray]:
    """Read ``calib.txt``: ``{"P0": (4, 4), ..., "Tr": (4, 4)}`` float64 (bottom row 0 0 0 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration file not found: {path} (needed for the velodyne-to-camera Tr)"
        )
    calib = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"{path} line {i + 1}: expected 'KEY: 12 numbers'")
        calib[key.strip()] = _parse_matrix_row(rest.split(), f"{path} line {i + 1}")
    return calib


def write_calib(path: PathLike, calib: dict[str, np.ndarray]) -> Path:
    """Write ``calib.txt`` from ``{name: (3, 4) or (4, 4)}`` (keep KITTI's P0..P3, Tr names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, m in calib.items():
        m = np.asarray(m, dtype=np.float64)
        if m.shape not in ((3, 4), (4, 4)):
            raise ValueError(f"calib entry {key!r} must be (3, 4) or (4, 4), got {m.shape}")
        lines.append(f"{key}: {_format_matrix(m)}\n")
    path.write_text("".join(lines))
    return path


def camera_to_velodyne_poses(cam_poses: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Velodyne-to-world poses ``inv(Tr) @ P_i @ Tr`` from camera poses (K, 4, 4)."""
    tr = _as_pose_stack(tr)[0]
    if tr.shape == (3, 4):
        tr = np.vstack([tr, [0.0, 0.0, 0.0, 1.0]])
    return np.linalg.inv(tr) @ _as_pose_stack(cam_poses) @ tr


def velodyne_to_camera_poses(velo_poses: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`camera_to_velodyne_poses`: ``P_i = Tr @ V_i @ inv(Tr)``."""
    tr = _as_pose_stack(tr)[0]
    if tr.shape == (3, 4):
        tr = np.vstack([tr, [0.0, 0.0, 0.0, 1.0]])
    return tr @ _as_pose_stack(velo_poses) @ np.linalg.inv(tr)


def transform_points(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) rigid transform to (N, 3) points: ``R @ p + t``."""
    pose = np.asarray(pose, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]


# ----------------------------------------------------------------------------- sequence


def sequence_dir(root: PathLike, sequence: str | int | None = None) -> Path:
    """``<root>/sequences/NN`` (``sequence`` int -> two digits), or ``root`` when it is one."""
    root = Path(root)
    if sequence is None:
        return root
    name = f"{sequence:02d}" if isinstance(sequence, int) else str(sequence)
    return root / "sequences" / name


class KittiSequence:
    """One SemanticKITTI sequence folder, indexed by scan.

    ``seq[i]`` is ``dict(points (N, 3) float32 in the velodyne frame, remission (N,) float32,
    labels (N,) uint32 semantic or None, instances (N,) uint32 or None, pose (4, 4) float64
    velodyne -> world, frame str)``. Labels are None when the sequence has no ``labels/``
    folder (KITTI test sequences).
    """

    def __init__(self, root: PathLike, sequence: str | int | None = None):
        self.path = sequence_dir(root, sequence)
        velo = self.path / "velodyne"
        if not velo.is_dir():
            raise FileNotFoundError(f"no velodyne/ folder in sequence {self.path}")
        self.scan_files = sorted(velo.glob("*.bin"))
        if not self.scan_files:
            raise FileNotFoundError(f"no .bin scans in {velo}")
        self.frames = [f.stem for f in self.scan_files]
        self.calib = read_calib(self.path / "calib.txt")
        if "Tr" not in self.calib:
            raise ValueError(f"{self.path / 'calib.txt'}: no 'Tr' (velodyne-to-camera) entry")
        cam_poses = read_poses(self.path / "poses.txt")
        if len(cam_poses) != len(self.scan_files):
            raise ValueError(
                f"{self.path / 'poses.txt'}: {len(cam_poses)} poses for "
                f"{len(self.scan_files)} scans in {velo}"
            )
        self.poses = camera_to_velodyne_poses(cam_poses, self.calib["Tr"])
        self.has_labels = (self.path / "labels").is_dir()

    def __len__(self) -> int:
        return len(self.scan_files)

    def label_file(self, index: int) -> Path:
        return self.path / "labels" / f"{self.frames[index]}.label"

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"scan index {index} out of range for {len(self)} scans")
        index %= len(self)
        scan = read_scan(self.scan_files[index])
        labels = instances = None
        if self.has_labels:
            labels, instances = read_labels(self.label_file(index), n_points=len(scan))
        return {
            "points": scan[:, :3],
            "remission": scan[:, 3],
            "labels": labels,
            "instances": instances,
            "pose": self.poses[index],
            "frame": self.frames[index],
        }
