"""Completion pairs from the KITTI layout, as LiDiff crops them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.lidar.completion_data import CompletionPairs, PairsConfig, build_map, crop_dense
from fewstep.lidar.kitti import KittiSequence
from fewstep.lidar.metrics import nn_distances, precision_recall_f

CFG = PairsConfig(max_range=30.0, n_partial=500, n_dense=3000)


def test_pairs_shapes_crop_and_determinism(tiny_dataset):
    root, _ = tiny_dataset
    data = CompletionPairs(root, cfg=CFG)
    assert len(data) == 8
    item = data[5]
    assert item["partial"].shape == (500, 3) and item["dense"].shape == (3000, 3)
    assert item["partial"].dtype == torch.float32 and item["sequence"] == "01"
    r = item["partial"].norm(dim=1)
    assert r.min() > CFG.min_range and r.max() < CFG.max_range
    assert item["dense"][:, 2].min() > CFG.min_z
    assert data[5] is item  # cached
    again = CompletionPairs(root, cfg=CFG)[5]
    assert torch.equal(again["partial"], item["partial"]) and torch.equal(
        again["dense"], item["dense"]
    )


def test_dense_ground_truth_is_in_the_sensor_frame(tiny_dataset):
    """The partial scan's points lie on the map cropped around it in the sensor frame; the
    inverse pose would put most of them off the map."""
    root, _ = tiny_dataset
    data = CompletionPairs(root, ["00"], cfg=CFG)
    item, scan = data[3], data.sequences["00"][3]
    crop = crop_dense(data.world_map("00"), scan["pose"], CFG)
    # the item's dense points are drawn from that crop, and the partial lies on it
    assert np.allclose(nn_distances(item["dense"], crop), 0.0, atol=1e-5)
    assert precision_recall_f(item["partial"], crop, [0.05])[0.05]["precision"] > 0.99
    wrong = crop_dense(data.world_map("00"), np.linalg.inv(scan["pose"]), CFG)
    assert precision_recall_f(item["partial"], wrong, [0.05])[0.05]["precision"] < 0.5
    assert item["dense"].norm(dim=1).max() < CFG.max_range + 1e-3


def test_build_map_matches_the_written_map(tiny_dataset):
    root, cfg = tiny_dataset
    seq = KittiSequence(root, 0)
    m = build_map(seq, voxel=cfg.map_voxel, min_range=0.0)
    written = np.load(root / "sequences" / "00" / "map_clean.npy")
    # built from the written scans only (the simulator also used in-between scans)
    assert len(m) < len(written)
    pr = precision_recall_f(m, written, [0.1])[0.1]
    assert pr["precision"] > 0.99


def test_missing_map_is_a_clear_error(tiny_dataset, tmp_path):
    import shutil

    root, _ = tiny_dataset
    shutil.copytree(root / "sequences" / "00", tmp_path / "sequences" / "00")
    (tmp_path / "sequences" / "00" / "map_clean.npy").unlink()
    with pytest.raises(FileNotFoundError, match="map_clean.npy"):
        CompletionPairs(tmp_path)
