"""Procedural street scenes as labelled triangle meshes, for ray casting with open3d.

Recipe of :func:`make_street` (all sizes in metres, all draws from one
``numpy.random.default_rng(cfg.seed)``; x runs along the street, y to the left, z up):

1. Ground: the road, a quad at z = 0 for |y| < road_width / 2 (label road 40); two sidewalks,
   quads at z = curb_height out to |y| = road_width / 2 + sidewalk_width (sidewalk 48) with
   vertical curb faces; beyond them a terrain strip (terrain 72) out to the building line and
   under the buildings. The ground spans x in [-ground_margin, length + ground_margin].
2. Buildings (building 50): on each side, boxes placed one after another along x with gaps
   drawn from ``building_gap``, footprint widths from ``building_width``, depths from
   ``building_depth``, heights from ``building_height``, and setbacks from the sidewalk edge
   from ``building_setback``; at most ``n_buildings`` per side, stopping at the street's end.
3. Cars (car 10, one instance id each): parked at the curb of either side (side drawn at
   random, centre 1.1 m inside the road edge), a body box (length from ``car_length``, 1.8 wide,
   z 0.25..1.15) plus a smaller cabin box on top; positions drawn by rejection so that cars do
   not overlap (a car that finds no free slot in 50 draws is skipped).
4. Poles (pole 80): cylinders of radius 0.1 and height from ``pole_height``, 0.5 m behind the
   curb on a random side.
5. Trees: a trunk cylinder (trunk 71, radius 0.12..0.25, height from ``trunk_height``) and a
   crown ellipsoid (vegetation 70: a sphere of radius from ``crown_radius`` squashed in z by
   0.6..1.0), on the outer part of the sidewalk.

Every piece is an open3d ``TriangleMesh`` with a SemanticKITTI label per triangle
(semantic-kitti-api ``config/semantic-kitti.yaml``); :meth:`Scene.raycasting_scene` adds the
pieces to an ``open3d.t.geometry.RaycastingScene`` and :meth:`Scene.lookup` maps a hit's
(geometry id, primitive id) back to its labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fewstep.lidar.kitti import LABEL_IDS

if TYPE_CHECKING:
    import open3d as o3d

INVALID_ID = 0xFFFFFFFF  # open3d RaycastingScene.INVALID_ID: the ray hit nothing


def o3d_module():
    """Import open3d lazily with an install hint (it needs libusb-1.0 at import on Linux)."""
    try:
        import open3d
    except ImportError as e:  # pragma: no cover - a hard dependency of fewstep-lidar
        raise ImportError(
            "fewstep.lidar needs open3d (pip install fewstep-lidar); on Linux open3d also "
            "needs the libusb-1.0 shared library (apt-get install libusb-1.0-0)"
        ) from e
    return open3d


@dataclass
class SceneConfig:
    length: float = 120.0  # street length along x; buildings fill x in [0, length]
    road_width: float = 8.0  # carriageway width, centred on y = 0
    sidewalk_width: float = 3.0  # sidewalk width on each side of the road
    curb_height: float = 0.15  # sidewalk height above the road
    ground_margin: float = 30.0  # ground extends this far before x = 0 and after the end
    n_buildings: int = 8  # at most this many buildings per side
    building_width: tuple[float, float] = (8.0, 20.0)  # footprint length along x
    building_depth: tuple[float, float] = (8.0, 15.0)  # footprint depth along y
    building_height: tuple[float, float] = (6.0, 20.0)  # roof height
    building_gap: tuple[float, float] = (1.0, 8.0)  # free space between neighbours along x
    building_setback: tuple[float, float] = (0.0, 4.0)  # distance behind the sidewalk edge
    n_cars: int = 6  # parked cars (both sides together)
    car_length: tuple[float, float] = (3.8, 4.8)  # body length
    n_poles: int = 6  # street lights / sign poles
    pole_height: tuple[float, float] = (4.0, 7.0)  # pole height
    n_trees: int = 6  # street trees
    trunk_height: tuple[float, float] = (1.5, 3.0)  # trunk height
    crown_radius: tuple[float, float] = (1.2, 2.5)  # crown radius (before squashing in z)
    seed: int = 0  # seed of the generator that draws every size and position


@dataclass
class Piece:
    """One mesh of the scene with a semantic id per triangle and one instance id."""

    name: str  # e.g. "building", "car", "tree-crown"
    mesh: Any  # open3d.geometry.TriangleMesh
    labels: np.ndarray  # (T,) uint32 SemanticKITTI semantic id per triangle
    instance: int = 0  # instance id (cars get 1, 2, ...; stuff gets 0)


@dataclass
class Scene:
    """Labelled triangle meshes plus a lazily built open3d RaycastingScene."""

    pieces: list[Piece]
    config: SceneConfig | None = None
    _rc: Any = field(default=None, init=False, repr=False)
    _offsets: np.ndarray | None = field(default=None, init=False, repr=False)
    _tri_labels: np.ndarray | None = field(default=None, init=False, repr=False)
    _tri_instances: np.ndarray | None = field(default=None, init=False, repr=False)

    def raycasting_scene(self) -> o3d.t.geometry.RaycastingScene:
        """The pieces in one ``open3d.t.geometry.RaycastingScene`` (built once, then reused)."""
        if self._rc is None:
            o3d = o3d_module()
            rc = o3d.t.geometry.RaycastingScene()
            offsets, labels, instances, start = {}, [], [], 0
            for piece in self.pieces:
                v = np.asarray(piece.mesh.vertices, dtype=np.float32)
                t = np.asarray(piece.mesh.triangles, dtype=np.uint32)
                if len(piece.labels) != len(t):
                    raise ValueError(
                        f"piece {piece.name!r}: {len(piece.labels)} labels for {len(t)} triangles"
                    )
                gid = rc.add_triangles(o3d.core.Tensor(v), o3d.core.Tensor(t))
                offsets[int(gid)] = start
                labels.append(piece.labels.astype(np.uint32))
                instances.append(np.full(len(t), piece.instance, dtype=np.uint32))
                start += len(t)
            # geometry ids are assigned 0, 1, 2, ... in insertion order; a table indexed by
            # id gives the first triangle of each piece in the concatenated label arrays
            table = np.zeros(max(offsets) + 1 if offsets else 0, dtype=np.int64)
            for gid, off in offsets.items():
                table[gid] = off
            self._rc, self._offsets = rc, table
            self._tri_labels = np.concatenate(labels) if labels else np.zeros(0, np.uint32)
            self._tri_instances = np.concatenate(instances) if instances else np.zeros(0, np.uint32)
        return self._rc

    def lookup(
        self, geometry_ids: np.ndarray, primitive_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(semantic (N,), instance (N,)) uint32 of hits given open3d's geometry/primitive ids."""
        self.raycasting_scene()
        g = np.asarray(geometry_ids).astype(np.int64)
        p = np.asarray(primitive_ids).astype(np.int64)
        if np.any(g == INVALID_ID):
            raise ValueError("lookup got rays that hit nothing (geometry id INVALID_ID)")
        idx = self._offsets[g] + p
        return self._tri_labels[idx], self._tri_instances[idx]

    def merged_mesh(self) -> tuple[o3d.geometry.TriangleMesh, np.ndarray]:
        """All pieces as one legacy TriangleMesh and its (T,) per-triangle semantic ids."""
        o3d = o3d_module()
        mesh = o3d.geometry.TriangleMesh()
        for piece in self.pieces:
            mesh += piece.mesh
        return mesh, np.concatenate([p.labels for p in self.pieces]).astype(np.uint32)

    def n_triangles(self) -> int:
        return int(sum(len(p.labels) for p in self.pieces))


# ----------------------------------------------------------------------------- primitives


def _mesh(vertices: np.ndarray, triangles: np.ndarray):
    o3d = o3d_module()
    return o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.asarray(vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.asarray(triangles, dtype=np.int32)),
    )


def _piece(name: str, mesh, label: str, instance: int = 0) -> Piece:
    n = len(mesh.triangles)
    return Piece(name, mesh, np.full(n, LABEL_IDS[label], dtype=np.uint32), instance)


def _grid(corner, u, v, nu: int, nv: int):
    """Planar rectangle ``corner + a u + b v`` (a, b in [0, 1]) split into nu x nv cells."""
    a, b = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    verts = np.asarray(corner) + a.reshape(-1, 1) * np.asarray(u) + b.reshape(-1, 1) * np.asarray(v)
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    k = (i * (nv + 1) + j).reshape(-1)
    tris = np.concatenate(
        [np.stack([k, k + nv + 1, k + nv + 2], 1), np.stack([k, k + nv + 2, k + 1], 1)]
    )
    return _mesh(verts, tris)


def _cells(extent: float, cell: float) -> int:
    return max(1, int(np.ceil(abs(extent) / cell)))


def quad(x: tuple[float, float], y: tuple[float, float], z: float, cell: float = 5.0):
    """Horizontal rectangle [x0, x1] x [y0, y1] at height z, in cells of at most ``cell``
    metres (long thin triangles lose float32 precision in open3d's closest-point queries)."""
    dx, dy = x[1] - x[0], y[1] - y[0]
    return _grid((x[0], y[0], z), (dx, 0, 0), (0, dy, 0), _cells(dx, cell), _cells(dy, cell))


def vertical_quad(x: tuple[float, float], y: float, z: tuple[float, float], cell: float = 5.0):
    """Vertical rectangle in the plane y = const spanning [x0, x1] x [z0, z1], in cells."""
    dx, dz = x[1] - x[0], z[1] - z[0]
    return _grid((x[0], y, z[0]), (dx, 0, 0), (0, 0, dz), _cells(dx, cell), _cells(dz, cell))


def box(lo: tuple[float, float, float], hi: tuple[float, float, float]):
    """Axis-aligned box between corners ``lo`` and ``hi`` (open3d ``create_box``, moved)."""
    o3d = o3d_module()
    size = np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)
    if np.any(size <= 0):
        raise ValueError(f"box needs hi > lo, got lo={lo}, hi={hi}")
    m = o3d.geometry.TriangleMesh.create_box(*size)
    return m.translate(np.asarray(lo, dtype=np.float64))


def cylinder(center_xy: tuple[float, float], z0: float, radius: float, height: float, res=10):
    """Vertical cylinder standing on z = z0 (open3d ``create_cylinder`` is centred at 0)."""
    o3d = o3d_module()
    m = o3d.geometry.TriangleMesh.create_cylinder(radius, height, resolution=res, split=1)
    return m.translate((center_xy[0], center_xy[1], z0 + height / 2))


def ellipsoid(center: tuple[float, float, float], radii: tuple[float, float, float], res=8):
    """Ellipsoid: an open3d unit ``create_sphere`` scaled per axis, then moved."""
    o3d = o3d_module()
    m = o3d.geometry.TriangleMesh.create_sphere(1.0, resolution=res)
    v = np.asarray(m.vertices) * np.asarray(radii, dtype=np.float64) + np.asarray(center)
    m.vertices = o3d.utility.Vector3dVector(v)
    return m


# ----------------------------------------------------------------------------- the street


def _ground(cfg: SceneConfig, outer: float) -> list[Piece]:
    xs = (-cfg.ground_margin, cfg.length + cfg.ground_margin)
    r, s, c = cfg.road_width / 2, cfg.road_width / 2 + cfg.sidewalk_width, cfg.curb_height
    pieces = [_piece("road", quad(xs, (-r, r), 0.0), "road")]
    for sign in (1.0, -1.0):
        ys = tuple(sorted((sign * r, sign * s)))
        pieces.append(_piece("sidewalk", quad(xs, ys, c), "sidewalk"))
        pieces.append(_piece("curb", vertical_quad(xs, sign * r, (0.0, c)), "sidewalk"))
        pieces.append(
            _piece("terrain", quad(xs, tuple(sorted((sign * s, sign * outer))), c), "terrain")
        )
    return pieces


def _buildings(cfg: SceneConfig, rng: np.random.Generator) -> list[Piece]:
    edge = cfg.road_width / 2 + cfg.sidewalk_width
    pieces = []
    for sign in (1.0, -1.0):
        x = rng.uniform(*cfg.building_gap)
        for _ in range(cfg.n_buildings):
            w = rng.uniform(*cfg.building_width)
            if x + w > cfg.length:
                break
            d, h = rng.uniform(*cfg.building_depth), rng.uniform(*cfg.building_height)
            near = edge + rng.uniform(*cfg.building_setback)
            ys = sorted((sign * near, sign * (near + d)))
            pieces.append(_piece("building", box((x, ys[0], 0.0), (x + w, ys[1], h)), "building"))
            x += w + rng.uniform(*cfg.building_gap)
    return pieces


def _cars(cfg: SceneConfig, rng: np.random.Generator) -> list[Piece]:
    placed: list[tuple[float, float, float]] = []  # (side, x0, x1)
    pieces = []
    for _ in range(cfg.n_cars):
        for _try in range(50):
            side = 1.0 if rng.random() < 0.5 else -1.0
            length = rng.uniform(*cfg.car_length)
            x0 = rng.uniform(0.0, cfg.length - length)
            if all(s != side or x0 > b + 1.0 or x0 + length < a - 1.0 for s, a, b in placed):
                break
        else:
            continue
        placed.append((side, x0, x0 + length))
        yc = side * (cfg.road_width / 2 - 1.1)
        inst = len(placed)
        body = box((x0, yc - 0.9, 0.25), (x0 + length, yc + 0.9, 1.15))
        c0 = x0 + 0.25 * length
        cabin = box((c0, yc - 0.8, 1.15), (c0 + 0.5 * length, yc + 0.8, 1.7))
        pieces.append(_piece("car", body + cabin, "car", instance=inst))
    return pieces


def _poles(cfg: SceneConfig, rng: np.random.Generator) -> list[Piece]:
    pieces = []
    for _ in range(cfg.n_poles):
        side = 1.0 if rng.random() < 0.5 else -1.0
        x, h = rng.uniform(0.0, cfg.length), rng.uniform(*cfg.pole_height)
        y = side * (cfg.road_width / 2 + 0.5)
        pieces.append(_piece("pole", cylinder((x, y), cfg.curb_height, 0.1, h, res=8), "pole"))
    return pieces


def _trees(cfg: SceneConfig, rng: np.random.Generator) -> list[Piece]:
    pieces = []
    for _ in range(cfg.n_trees):
        side = 1.0 if rng.random() < 0.5 else -1.0
        x = rng.uniform(0.0, cfg.length)
        y = side * (cfg.road_width / 2 + max(cfg.sidewalk_width - 0.8, 0.5))
        tr, th = rng.uniform(0.12, 0.25), rng.uniform(*cfg.trunk_height)
        cr, squash = rng.uniform(*cfg.crown_radius), rng.uniform(0.6, 1.0)
        z_top = cfg.curb_height + th
        pieces.append(_piece("tree-trunk", cylinder((x, y), cfg.curb_height, tr, th), "trunk"))
        crown = ellipsoid((x, y, z_top + 0.7 * cr * squash), (cr, cr, cr * squash))
        pieces.append(_piece("tree-crown", crown, "vegetation"))
    return pieces


def make_street(cfg: SceneConfig | None = None) -> Scene:
    """A procedural street (see the module docstring for the recipe), seeded by ``cfg.seed``."""
    cfg = cfg or SceneConfig()
    if cfg.length <= 0 or cfg.road_width <= 0 or cfg.sidewalk_width < 0:
        raise ValueError("SceneConfig needs length > 0, road_width > 0, sidewalk_width >= 0")
    rng = np.random.default_rng(cfg.seed)
    outer = (
        cfg.road_width / 2
        + cfg.sidewalk_width
        + cfg.building_setback[1]
        + cfg.building_depth[1]
        + 1.0
    )
    pieces = _ground(cfg, outer)
    pieces += _buildings(cfg, rng)
    pieces += _cars(cfg, rng)
    pieces += _poles(cfg, rng)
    pieces += _trees(cfg, rng)
    return Scene(pieces, cfg)


def scene_from_meshes(meshes: list[tuple[Any, str | int]]) -> Scene:
    """A scene from ``(open3d TriangleMesh, label)`` pairs; label a name or a raw id."""
    pieces = []
    for mesh, label in meshes:
        lid = LABEL_IDS[label] if isinstance(label, str) else int(label)
        pieces.append(Piece(str(label), mesh, np.full(len(mesh.triangles), lid, dtype=np.uint32)))
    return Scene(pieces)
