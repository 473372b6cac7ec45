"""Procedural streets: seeded, labelled per triangle, labels recovered through ray hits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fewstep.lidar.kitti import LABEL_IDS
from fewstep.lidar.scenes import SceneConfig, make_street


def _vertices(scene):
    return np.concatenate([np.asarray(p.mesh.vertices) for p in scene.pieces])


def test_street_is_seeded(tiny_scene_config, tiny_scene):
    again = make_street(tiny_scene_config)
    assert np.array_equal(_vertices(again), _vertices(tiny_scene))
    other = make_street(replace(tiny_scene_config, seed=tiny_scene_config.seed + 1))
    v = _vertices(other)
    assert v.shape != _vertices(tiny_scene).shape or not np.array_equal(v, _vertices(tiny_scene))


def test_street_has_every_class_and_car_instances(tiny_scene, tiny_scene_config):
    names = {"road", "sidewalk", "terrain", "building", "car", "pole", "trunk", "vegetation"}
    labels = set(np.concatenate([p.labels for p in tiny_scene.pieces]).tolist())
    assert labels == {LABEL_IDS[n] for n in names}
    cars = [p for p in tiny_scene.pieces if p.name == "car"]
    assert 1 <= len(cars) <= tiny_scene_config.n_cars
    assert sorted(p.instance for p in cars) == list(range(1, len(cars) + 1))
    for p in tiny_scene.pieces:
        assert len(p.labels) == len(p.mesh.triangles)
    mesh, tri_labels = tiny_scene.merged_mesh()
    assert len(mesh.triangles) == len(tri_labels) == tiny_scene.n_triangles()


def test_buildings_stay_off_the_road_and_sidewalk(tiny_scene, tiny_scene_config):
    edge = tiny_scene_config.road_width / 2 + tiny_scene_config.sidewalk_width
    for p in tiny_scene.pieces:
        if p.name == "building":
            y = np.asarray(p.mesh.vertices)[:, 1]
            assert np.all(np.abs(y) >= edge - 1e-9) and (np.all(y > 0) or np.all(y < 0))


def _cast_down(scene, xy):
    import open3d as o3d

    rays = np.array([[x, y, 100.0, 0, 0, -1] for x, y in xy], dtype=np.float32)
    hit = scene.raycasting_scene().cast_rays(o3d.core.Tensor(rays))
    return scene.lookup(hit["geometry_ids"].numpy(), hit["primitive_ids"].numpy())


def test_lookup_returns_the_label_of_the_hit_piece(tiny_scene, tiny_scene_config):
    probes, expect = [], []
    for p in tiny_scene.pieces:
        if p.name in ("building", "car"):
            lo, hi = np.asarray(p.mesh.vertices).min(0), np.asarray(p.mesh.vertices).max(0)
            probes.append(((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2))
            expect.append((p.labels[0], p.instance))
    probes.append((tiny_scene_config.length + 10, 0.0))  # on the road past the buildings
    expect.append((LABEL_IDS["road"], 0))
    sem, inst = _cast_down(tiny_scene, probes)
    assert list(zip(sem.tolist(), inst.tolist())) == [(int(a), int(b)) for a, b in expect]


def test_lookup_refuses_misses_and_config_is_checked(tiny_scene):
    with pytest.raises(ValueError, match="hit nothing"):
        tiny_scene.lookup(np.array([0xFFFFFFFF]), np.array([0xFFFFFFFF]))
    with pytest.raises(ValueError, match="length"):
        make_street(SceneConfig(length=0))
