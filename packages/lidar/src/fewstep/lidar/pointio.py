"""Point-cloud files by suffix: ``.ply`` / ``.pcd`` through open3d, ``.bin`` as a KITTI scan,
``.npy`` as a plain (N, 3) array.

``read_points(path)`` returns (N, 3) float64; ``read_points(path, colors=True)`` also returns
(N, 3) colours in [0, 1] or None. Add a format with :func:`register_format`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewstep.lidar import kitti

Reader = Callable[[Path], tuple[np.ndarray, np.ndarray | None]]
Writer = Callable[[Path, np.ndarray, np.ndarray | None], None]


@dataclass(frozen=True)
class PointFormat:
    read: Reader  # path -> (points (N, 3), colours (N, 3) or None)
    write: Writer  # (path, points (N, 3), colours (N, 3) or None) -> None


def _o3d():
    try:
        import open3d as o3d
    except ImportError as e:  # pragma: no cover - open3d is a hard dependency of fewstep-lidar
        raise ImportError(
            "reading .ply/.pcd needs open3d (pip install fewstep-lidar; on Linux open3d also "
            "needs the libusb-1.0 shared library: apt-get install libusb-1.0-0)"
        ) from e
    return o3d


# what each open3d format's header must contain: open3d only warns on a bad file and returns
# an empty cloud, so a corrupt file would otherwise read as "no points"
_MAGIC = {".ply": b"ply", ".pcd": b"DATA"}


def _read_o3d(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with open(path, "rb") as f:
        head = f.read(4096)
    magic = _MAGIC[path.suffix.lower()]
    if not (head.startswith(magic) if magic == b"ply" else magic in head):
        raise ValueError(f"{path}: not a valid {path.suffix} file (no {magic.decode()!r} header)")
    o3d = _o3d()
    pcd = o3d.io.read_point_cloud(str(path))
    pts = np.asarray(pcd.points, dtype=np.float64)
    cols = np.asarray(pcd.colors, dtype=np.float64) if pcd.has_colors() else None
    return pts, cols


def _write_o3d(path: Path, points: np.ndarray, colors: np.ndarray | None) -> None:
    o3d = _o3d()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    if colors is not None:
        pcd.colors = o3d.utility.Vector3dVector(colors)
    if not o3d.io.write_point_cloud(str(path), pcd):
        raise OSError(f"open3d could not write {path}")


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    return kitti.read_scan(path)[:, :3].astype(np.float64), None


def _write_bin(path: Path, points: np.ndarray, colors: np.ndarray | None) -> None:
    if colors is not None:
        raise ValueError(f"{path}: KITTI .bin scans store remission, not colours")
    kitti.write_scan(path, points)


def _read_npy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise ValueError(f"{path}: expected an (N, >=3) array, got shape {arr.shape}")
    return arr[:, :3].astype(np.float64), None


def _write_npy(path: Path, points: np.ndarray, colors: np.ndarray | None) -> None:
    if colors is not None:
        raise ValueError(f"{path}: .npy holds points only; use .ply for colours")
    np.save(path, points)


FORMATS: dict[str, PointFormat] = {
    ".ply": PointFormat(_read_o3d, _write_o3d),
    ".pcd": PointFormat(_read_o3d, _write_o3d),
    ".bin": PointFormat(_read_bin, _write_bin),
    ".npy": PointFormat(_read_npy, _write_npy),
}


def register_format(suffix: str, fmt: PointFormat) -> None:
    """Add or replace the reader/writer for ``suffix`` (with the dot, lower case)."""
    FORMATS[suffix.lower()] = fmt


def _format_for(path: Path) -> PointFormat:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown point-cloud suffix {path.suffix!r}; expected one of {sorted(FORMATS)}"
        )
    return fmt


def read_points(
    path: str | Path, colors: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Read points (N, 3) float64 (and colours (N, 3) or None when ``colors``)."""
    path = Path(path)
    fmt = _format_for(path)
    if not path.is_file():
        raise FileNotFoundError(f"point-cloud file not found: {path}")
    pts, cols = fmt.read(path)
    return (pts, cols) if colors else pts


def write_points(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Write (N, 3) points (and optional (N, 3) colours in [0, 1]) by suffix."""
    path = Path(path)
    fmt = _format_for(path)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {pts.shape}")
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float64)
        if colors.shape != pts.shape:
            raise ValueError(f"colors must match points {pts.shape}, got {colors.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.write(path, pts, colors)
    return path
