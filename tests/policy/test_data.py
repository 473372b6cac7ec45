"""Normaliser, diffusion_policy-style windows, and the replay-buffer zarr layout."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from fewstep.policy.data import (
    Episode,
    Normalizer,
    PolicyWindows,
    WindowConfig,
    read_replay_buffer,
    window_indices,
    write_replay_buffer,
)


def ramp_episode(length, obs_dim=1, act_dim=1, base=0.0, mode=None, success=None):
    """obs[t] = base + t, action[t] = base + 100 + t (every dimension)."""
    t = np.arange(length, dtype=np.float32)[:, None] + base
    return Episode(
        np.repeat(t, obs_dim, axis=1), np.repeat(t + 100, act_dim, axis=1), mode, success
    )


IDENTITY = Normalizer({"obs": ([-1.0], [1.0]), "action": ([-1.0], [1.0])})


# -- Normalizer ---------------------------------------------------------------------------------
def test_normalizer_maps_limits_to_minus_one_one_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -3.0]
    x[:, 2] = 7.0  # a constant dimension
    norm = Normalizer.fit({"x": x})
    y = norm.encode("x", x)
    np.testing.assert_allclose(y[:, :2].min(axis=0), -1.0, atol=1e-12)
    np.testing.assert_allclose(y[:, :2].max(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(y[:, 2], 0.0, atol=1e-12)  # diffusion_policy: constant -> 0
    np.testing.assert_allclose(norm.decode("x", y), x, atol=1e-10)
    t = torch.as_tensor(x, dtype=torch.float32)
    yt = norm.encode("x", t)
    assert yt.dtype == torch.float32
    torch.testing.assert_close(norm.decode("x", yt), t, atol=1e-5, rtol=1e-5)


def test_normalizer_state_dict_survives_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file

    x = np.random.default_rng(1).uniform(-2, 5, size=(40, 2))
    norm = Normalizer.fit({"obs": x, "action": x[:, :1] * 3})
    save_file(norm.state_dict(), tmp_path / "norm.safetensors")
    from_st = Normalizer.from_state_dict(load_file(tmp_path / "norm.safetensors"))
    as_json = json.loads(json.dumps({k: v.tolist() for k, v in norm.state_dict().items()}))
    from_json = Normalizer.from_state_dict(as_json)
    for other in (from_st, from_json):
        assert sorted(other.fields) == ["action", "obs"]
        np.testing.assert_allclose(other.encode("obs", x), norm.encode("obs", x), atol=1e-5)
        np.testing.assert_allclose(
            other.decode("action", np.ones((1, 1))), norm.decode("action", np.ones((1, 1)))
        )


def test_normalizer_errors_name_the_problem():
    norm = Normalizer.fit({"obs": np.zeros((3, 2))})
    with pytest.raises(KeyError, match="action"):
        norm.encode("action", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="2 dims"):
        norm.encode("obs", np.zeros((1, 3)))
    with pytest.raises(KeyError, match="obs.max"):
        Normalizer.from_state_dict({"obs.min": [0.0]})


# -- windows ------------------------------------------------------------------------------------
def test_windows_pad_exactly_as_diffusion_policy():
    # T = 5, pred_horizon 4, obs_horizon 2 (pad_before 1), action_horizon 3 (pad_after 2):
    # diffusion_policy's create_indices gives window starts -1, 0, 1, 2, 3
    ds = PolicyWindows([ramp_episode(5)], WindowConfig(2, 4, 3), normalizer=IDENTITY)
    got = [(ds[i]["obs"][:, 0].tolist(), ds[i]["action"][:, 0].tolist()) for i in range(len(ds))]
    assert got == [
        ([0, 0], [100, 100, 101, 102]),  # start -1: first step repeated before
        ([0, 1], [100, 101, 102, 103]),
        ([1, 2], [101, 102, 103, 104]),
        ([2, 3], [102, 103, 104, 104]),  # last step repeated after
        ([3, 4], [103, 104, 104, 104]),
    ]


def test_windows_of_an_episode_shorter_than_the_horizon():
    rows = window_indices([2], horizon=4, pad_before=1, pad_after=2)
    # (episode, buffer_start, buffer_end, sample_start, sample_end) for starts -1 and 0
    assert rows.tolist() == [[0, 0, 2, 1, 3], [0, 0, 2, 0, 2]]
    ds = PolicyWindows([ramp_episode(2)], WindowConfig(2, 4, 3), normalizer=IDENTITY)
    assert ds[0]["action"][:, 0].tolist() == [100, 100, 101, 101]
    assert ds[1]["action"][:, 0].tolist() == [100, 101, 101, 101]


def test_windows_never_mix_episodes_and_are_normalised():
    eps = [ramp_episode(6, 3, 2, base=0.0), ramp_episode(7, 3, 2, base=50.0)]
    ds = PolicyWindows(eps, WindowConfig(2, 4, 2))
    assert len(ds) == (6 - 4 + 1 + 1 + 1) + (7 - 4 + 1 + 1 + 1)
    for i in range(len(ds)):
        item = ds[i]
        assert item["obs"].shape == (2, 3) and item["action"].shape == (4, 2)
        assert item["obs"].dtype == torch.float32
        raw = ds.normalizer.decode("action", item["action"].numpy())[:, 0]
        assert (raw < 150).all() or (raw >= 150).all()  # one episode's values only
        assert item["obs"].abs().max() <= 1.0 + 1e-6 and item["action"].abs().max() <= 1 + 1e-6


def test_window_config_rejects_impossible_horizons():
    with pytest.raises(ValueError, match="action_horizon"):
        WindowConfig(obs_horizon=2, pred_horizon=8, action_horizon=8)
    with pytest.raises(ValueError, match="obs_horizon"):
        WindowConfig(obs_horizon=9, pred_horizon=8, action_horizon=1)


# -- replay buffer ------------------------------------------------------------------------------
def test_replay_buffer_round_trip_in_zarr_format_2(tmp_path):
    eps = [
        ramp_episode(4, 4, 2, base=0.0, mode="left", success=True),
        ramp_episode(6, 4, 2, base=10.0, mode=None, success=False),
        ramp_episode(3, 4, 2, base=20.0, mode="right", success=None),
    ]
    path = tmp_path / "demo.zarr"
    write_replay_buffer(path, eps)
    assert (path / ".zgroup").exists() and (path / "data" / "state" / ".zarray").exists()
    zarray = json.loads((path / "meta" / "episode_ends" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2
    import zarr

    ends = zarr.open_group(str(path), mode="r")["meta/episode_ends"][:]
    assert ends.tolist() == [4, 10, 13] and ends.dtype == np.int64
    back = read_replay_buffer(path)
    assert [len(e) for e in back] == [4, 6, 3]
    assert [e.mode for e in back] == ["left", None, "right"]
    assert [e.success for e in back] == [True, False, None]
    for a, b in zip(eps, back):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.action, b.action)


def pusht_like_store(path, n_eps=3, length=5, keys=("state", "keypoint", "action", "img")):
    """A small store with the arrays of diffusion_policy's pusht_cchi_v7_replay.zarr."""
    import zarr

    n = n_eps * length
    rng = np.random.default_rng(0)
    arrays = {
        "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "img": rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8),
    }
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = root.create_group("data")
    for k in keys:
        data.create_array(k, data=arrays[k], chunks=(4,) + arrays[k].shape[1:])
    ends = np.arange(1, n_eps + 1, dtype=np.int64) * length
    root.create_group("meta").create_array("episode_ends", data=ends, chunks=(n_eps,))
    return arrays


def test_reads_the_pusht_layout(tmp_path):
    arrays = pusht_like_store(tmp_path / "pusht.zarr")
    eps = read_replay_buffer(tmp_path / "pusht.zarr", obs_keys=("keypoint", "state"))
    assert len(eps) == 3 and all(e.mode is None and e.success is None for e in eps)
    assert eps[1].obs.shape == (5, 9 * 2 + 5) and eps[1].action.shape == (5, 2)
    np.testing.assert_array_equal(eps[1].obs[:, :18], arrays["keypoint"][5:10].reshape(5, 18))
    np.testing.assert_array_equal(eps[1].obs[:, 18:], arrays["state"][5:10])
    np.testing.assert_array_equal(eps[2].action, arrays["action"][10:15])


def test_reads_a_zipped_store(tmp_path):
    arrays = pusht_like_store(tmp_path / "pusht.zarr")
    archive = tmp_path / "pusht.zarr.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder, _, files in os.walk(tmp_path / "pusht.zarr"):
            for name in files:
                full = os.path.join(folder, name)
                zf.write(full, os.path.relpath(full, tmp_path / "pusht.zarr"))
    eps = read_replay_buffer(archive)
    np.testing.assert_array_equal(np.concatenate([e.obs for e in eps]), arrays["state"])


def test_missing_keys_are_named(tmp_path):
    pusht_like_store(tmp_path / "nokp.zarr", keys=("state", "action"))
    with pytest.raises(KeyError, match=r"data/keypoint.*holds data/\['action', 'state'\]"):
        read_replay_buffer(tmp_path / "nokp.zarr", obs_keys=("keypoint", "state"))
    with pytest.raises(KeyError, match="data/act"):
        read_replay_buffer(tmp_path / "nokp.zarr", action_key="act")

    import zarr

    root = zarr.open_group(str(tmp_path / "nometa.zarr"), mode="w", zarr_format=2)
    root.create_group("data").create_array("state", data=np.zeros((3, 5), np.float32))
    with pytest.raises(KeyError, match="meta"):
        read_replay_buffer(tmp_path / "nometa.zarr")
    with pytest.raises(FileNotFoundError, match="no replay buffer"):
        read_replay_buffer(tmp_path / "absent.zarr")


def test_inconsistent_episode_ends_are_rejected(tmp_path):
    import zarr

    pusht_like_store(tmp_path / "bad.zarr")
    meta = zarr.open_group(str(tmp_path / "bad.zarr"), mode="a")["meta"]
    meta["episode_ends"][:] = np.array([5, 10, 14])
    with pytest.raises(ValueError, match="episode_ends"):
        read_replay_buffer(tmp_path / "bad.zarr")
