"""Shared tiny fixtures for the lidar tests: one small street and one tiny simulated data set
(session-scoped, so each xdist worker builds them once)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread per xdist worker: the point network's small ops on two shared
    cores otherwise spend most of their time spinning (measured: 47 s vs 3 s CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_scene_config():
    from fewstep.lidar.scenes import SceneConfig

    return SceneConfig(length=40.0, n_buildings=3, n_cars=3, n_poles=2, n_trees=2, seed=3)


@pytest.fixture(scope="session")
def tiny_scene(tiny_scene_config):
    from fewstep.lidar.scenes import make_street

    return make_street(tiny_scene_config)


@pytest.fixture(scope="session")
def tiny_lidar():
    from fewstep.lidar.sensor import LidarConfig

    # 16 beams x 360 columns: ~6k rays per scan
    return LidarConfig(beams=16, horizontal_resolution=1.0, max_range=40.0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_scene_config, tiny_lidar):
    """Two sequences of four noise-free scans (noise 0 makes geometric checks exact)."""
    from dataclasses import replace

    from fewstep.lidar.sensor import DatasetConfig, make_dataset

    cfg = DatasetConfig(
        scene=tiny_scene_config,
        lidar=replace(tiny_lidar, range_noise=0.0, dropout=0.0),
        speed=20.0,
        map_extra_scans=1,
        map_voxel=0.05,
    )
    root = make_dataset(tmp_path_factory.mktemp("kitti"), n_sequences=2, scans_per_seq=4, cfg=cfg)
    return root, cfg
