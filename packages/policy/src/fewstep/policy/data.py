"""Demonstrations as diffusion_policy holds them: episodes, a min-max normaliser, padded
training windows, and the replay-buffer zarr layout its Push-T data ships in.

Conventions follow diffusion_policy (Chi et al., 2023, github.com/real-stanford/diffusion_policy):
``LinearNormalizer`` in "limits" mode for :class:`Normalizer`, ``SequenceSampler`` /
``create_indices`` for the windows of :class:`PolicyWindows`, and ``ReplayBuffer`` for
the store: ``data/<key>`` arrays of shape (N, ...) concatenating all episodes along time,
and ``meta/episode_ends`` (n_episodes,) int64 with each episode's exclusive end index.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class Episode:
    """One demonstration or rollout.

    obs[t] is what the policy saw before it sent action[t]; mode and success are None when
    unknown (for example, episodes read from a store that does not record them).
    """

    obs: np.ndarray  # (T, obs_dim) float32 observations
    action: np.ndarray  # (T, act_dim) float32 actions
    mode: str | None = None  # homotopy class taken ("left" / "right"), None if none or unknown
    success: bool | None = None  # whether the episode reached the goal, None if unknown

    def __post_init__(self) -> None:
        self.obs = np.asarray(self.obs, dtype=np.float32)
        self.action = np.asarray(self.action, dtype=np.float32)
        if self.obs.ndim != 2 or self.action.ndim != 2 or len(self.obs) != len(self.action):
            raise ValueError(
                "Episode expects obs (T, obs_dim) and action (T, act_dim) with the same T; got "
                f"{self.obs.shape} and {self.action.shape}"
            )
        if len(self.obs) == 0:
            raise ValueError("Episode must hold at least one step")

    def __len__(self) -> int:
        return len(self.obs)


# --------------------------------------------------------------------------------------------
# Normalizer
# --------------------------------------------------------------------------------------------
class Normalizer:
    """Per-dimension min-max normalisation of named fields to [-1, 1].

    As diffusion_policy's ``LinearNormalizer(mode="limits")``: y = x * scale + offset with
    scale = 2 / (max - min), offset = -1 - scale * min; a dimension whose range is below
    ``range_eps`` gets scale 1 and maps its (constant) value to 0.
    """

    def __init__(self, stats: Mapping[str, tuple[Any, Any]], range_eps: float = 1e-4):
        """stats: field name -> (min, max), each (D,) array-like."""
        self.range_eps = float(range_eps)
        self.min: dict[str, np.ndarray] = {}
        self.max: dict[str, np.ndarray] = {}
        self.scale: dict[str, np.ndarray] = {}
        self.offset: dict[str, np.ndarray] = {}
        for name, (lo, hi) in stats.items():
            lo = np.asarray(lo, dtype=np.float64).reshape(-1)
            hi = np.asarray(hi, dtype=np.float64).reshape(-1)
            if lo.shape != hi.shape or np.any(hi < lo):
                raise ValueError(f"field {name!r}: min <= max of one shape expected")
            rng = hi - lo
            flat = rng < self.range_eps
            scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, rng))
            offset = np.where(flat, -lo, -1.0 - scale * lo)
            self.min[name], self.max[name] = lo, hi
            self.scale[name], self.offset[name] = scale, offset

    @classmethod
    def fit(cls, data: Mapping[str, Any], range_eps: float = 1e-4) -> Normalizer:
        """Fit on arrays (..., D) per field: the min and max over all leading dimensions."""
        stats = {}
        for name, x in data.items():
            x = np.asarray(x, dtype=np.float64)
            x = x.reshape(-1, x.shape[-1])
            stats[name] = (x.min(axis=0), x.max(axis=0))
        return cls(stats, range_eps=range_eps)

    @property
    def fields(self) -> list[str]:
        return list(self.scale)

    def encode(self, name: str, x):
        """x (..., D) numpy array or tensor -> normalised, same type, dtype and device."""
        scale, offset = self._params(name, x)
        return x * scale + offset

    def decode(self, name: str, y):
        """Inverse of :meth:`encode`."""
        scale, offset = self._params(name, y)
        return (y - offset) / scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"<field>.min"/".max": float32 tensor (D,)}`` plus ``"range_eps"``: fit for
        safetensors; ``{k: v.tolist()}`` makes it JSON."""
        out: dict[str, torch.Tensor] = {"range_eps": torch.tensor([self.range_eps])}
        for name in self.fields:
            out[f"{name}.min"] = torch.as_tensor(self.min[name], dtype=torch.float32)
            out[f"{name}.max"] = torch.as_tensor(self.max[name], dtype=torch.float32)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Normalizer:
        """Rebuild from :meth:`state_dict` output (tensors, arrays or lists)."""
        norm = cls({})
        norm.load_state_dict(state)
        return norm

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace every field by those in ``state`` (tensors, arrays or lists)."""

        def arr(v):
            return np.asarray(v.cpu() if torch.is_tensor(v) else v, dtype=np.float64)

        names = sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".min", ".max"))})
        missing = [f"{n}.{s}" for n in names for s in ("min", "max") if f"{n}.{s}" not in state]
        if missing:
            raise KeyError(f"normalizer state lacks {missing}")
        eps = float(arr(state["range_eps"]).reshape(-1)[0]) if "range_eps" in state else 1e-4
        fresh = Normalizer(
            {n: (arr(state[f"{n}.min"]), arr(state[f"{n}.max"])) for n in names}, range_eps=eps
        )
        self.__dict__.update(fresh.__dict__)

    def _params(self, name: str, x):
        if name not in self.scale:
            raise KeyError(f"normalizer has no field {name!r}; it has {self.fields}")
        scale, offset = self.scale[name], self.offset[name]
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(
                f"field {name!r} has {scale.shape[0]} dims; got input of shape {tuple(x.shape)}"
            )
        if torch.is_tensor(x):
            kw = {"dtype": x.dtype, "device": x.device}
            return torch.as_tensor(scale, **kw), torch.as_tensor(offset, **kw)
        dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float64
        return scale.astype(dtype), offset.astype(dtype)


# --------------------------------------------------------------------------------------------
# Training windows
# --------------------------------------------------------------------------------------------
def window_indices(
    episode_lengths: Sequence[int], horizon: int, pad_before: int, pad_after: int
) -> np.ndarray:
    """diffusion_policy's ``create_indices`` per episode.

    Returns (n_windows, 5) int64 rows ``(episode, buffer_start, buffer_end, sample_start,
    sample_end)``: the window copies episode steps [buffer_start, buffer_end) into window
    slots [sample_start, sample_end); slots before repeat the first copied step, slots after
    repeat the last one.
    """
    pad_before = min(max(pad_before, 0), horizon - 1)
    pad_after = min(max(pad_after, 0), horizon - 1)
    rows = []
    for ep, length in enumerate(episode_lengths):
        for idx in range(-pad_before, length - horizon + pad_after + 1):
            b0, b1 = max(idx, 0), min(idx + horizon, length)
            s0 = b0 - idx
            rows.append((ep, b0, b1, s0, s0 + (b1 - b0)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5)


def _padded(x: np.ndarray, b0: int, b1: int, s0: int, s1: int, horizon: int) -> np.ndarray:
    out = np.empty((horizon,) + x.shape[1:], dtype=x.dtype)
    out[s0:s1] = x[b0:b1]
    out[:s0] = x[b0]
    out[s1:] = x[b1 - 1]
    return out


@dataclass(frozen=True)
class WindowConfig:
    """Horizons of a diffusion policy, in control steps (diffusion_policy's names in brackets)."""

    obs_horizon: int = 2  # observations the policy conditions on [n_obs_steps]
    pred_horizon: int = 16  # actions it predicts per inference [horizon]
    action_horizon: int = 8  # actions it executes before predicting again [n_action_steps]

    def __post_init__(self) -> None:
        if not (1 <= self.obs_horizon <= self.pred_horizon and self.action_horizon >= 1):
            raise ValueError(f"1 <= obs_horizon <= pred_horizon, action_horizon >= 1; got {self}")
        if self.obs_horizon - 1 + self.action_horizon > self.pred_horizon:
            raise ValueError(
                "obs_horizon - 1 + action_horizon <= pred_horizon expected (the executed actions "
                f"start at index obs_horizon - 1 of the prediction); got {self}"
            )


class PolicyWindows(Dataset):
    """Training windows over episodes, padded as diffusion_policy pads them.

    Each window spans ``pred_horizon`` steps; windows start from ``-(obs_horizon - 1)`` to
    ``T - pred_horizon + action_horizon - 1`` in each episode, and slots outside the
    episode repeat its first (before) or last (after) step, for observations and actions
    alike. ``obs`` is the window's first ``obs_horizon`` observations.

    Item: ``{"obs": (obs_horizon, obs_dim), "action": (pred_horizon, act_dim)}`` float32
    tensors, normalised by ``normalizer`` (fields "obs" and "action"), which is fit on the
    episodes when not given.
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        config: WindowConfig | None = None,
        normalizer: Normalizer | None = None,
    ):
        if len(episodes) == 0:
            raise ValueError("PolicyWindows needs at least one episode")
        self.config = config if config is not None else WindowConfig()
        if normalizer is None:
            normalizer = Normalizer.fit(
                {
                    "obs": np.concatenate([e.obs for e in episodes]),
                    "action": np.concatenate([e.action for e in episodes]),
                }
            )
        self.normalizer = normalizer
        self._obs = [normalizer.encode("obs", e.obs).astype(np.float32) for e in episodes]
        self._act = [normalizer.encode("action", e.action).astype(np.float32) for e in episodes]
        c = self.config
        self.indices = window_indices(
            [len(e) for e in episodes], c.pred_horizon, c.obs_horizon - 1, c.action_horizon - 1
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ep, b0, b1, s0, s1 = (int(v) for v in self.indices[i])
        h = self.config.pred_horizon
        obs = _padded(self._obs[ep], b0, b1, s0, s1, h)[: self.config.obs_horizon]
        act = _padded(self._act[ep], b0, b1, s0, s1, h)
        return {"obs": torch.from_numpy(obs), "action": torch.from_numpy(act)}


# --------------------------------------------------------------------------------------------
# Replay buffer (zarr, diffusion_policy layout)
# --------------------------------------------------------------------------------------------
_MODE_ATTR = "fewstep_mode_names"  # meta attribute naming the codes in meta/episode_mode


def write_replay_buffer(
    path: str | os.PathLike,
    episodes: Sequence[Episode],
    obs_key: str = "state",
    action_key: str = "action",
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write episodes as a zarr format-2 store in diffusion_policy's replay-buffer layout.

    ``data/<obs_key>`` (N, obs_dim) float32, ``data/<action_key>`` (N, act_dim) float32,
    ``meta/episode_ends`` (n_episodes,) int64; ``extra`` adds more ``data/<key>`` arrays of
    shape (N, ...) (for example Push-T's ``keypoint`` or ``img``). Known modes and success
    flags go to ``meta/episode_mode`` (int8 codes into the meta attribute
    ``fewstep_mode_names``) and ``meta/episode_success`` (int8 1/0), -1 where unknown;
    diffusion_policy's ``ReplayBuffer`` loads such extra meta arrays without complaint.
    The store at ``path`` is replaced.
    """
    import zarr

    if len(episodes) == 0:
        raise ValueError("write_replay_buffer needs at least one episode")
    ends = np.cumsum([len(e) for e in episodes]).astype(np.int64)
    n = int(ends[-1])
    arrays = {
        obs_key: np.concatenate([e.obs for e in episodes]),
        action_key: np.concatenate([e.action for e in episodes]),
    }
    for key, value in (extra or {}).items():
        value = np.asarray(value)
        if key in arrays or len(value) != n:
            raise ValueError(f"extra array {key!r} must be new and have {n} rows")
        arrays[key] = value
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data, meta = root.create_group("data"), root.create_group("meta")
    for key, value in arrays.items():
        chunks = (min(n, 1000),) + value.shape[1:]
        data.create_array(key, data=value, chunks=chunks)
    meta.create_array("episode_ends", data=ends, chunks=ends.shape)
    if any(e.mode is not None for e in episodes):
        names = sorted({e.mode for e in episodes if e.mode is not None})
        codes = np.array([-1 if e.mode is None else names.index(e.mode) for e in episodes])
        meta.create_array("episode_mode", data=codes.astype(np.int8), chunks=codes.shape)
        meta.attrs[_MODE_ATTR] = names
    if any(e.success is not None for e in episodes):
        flags = np.array([-1 if e.success is None else int(e.success) for e in episodes])
        meta.create_array("episode_success", data=flags.astype(np.int8), chunks=flags.shape)


def read_replay_buffer(
    path: str | os.PathLike,
    obs_keys: Sequence[str] = ("state",),
    action_key: str = "action",
) -> list[Episode]:
    """Read a diffusion_policy replay buffer (zarr format 2 or 3; a directory or a ``.zip``).

    Each episode's obs concatenates ``data/<k>`` for k in ``obs_keys``, every step flattened
    (Push-T low-dim: ``obs_keys=("keypoint", "state")`` gives 9*2 + 5 = 23 dims;
    diffusion_policy's own low-dim Push-T uses keypoints + state[:, :2]); its action is
    ``data/<action_key>``. Missing keys raise a ``KeyError`` naming them and the keys the
    store holds.
    """
    import zarr

    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no replay buffer at {path}")
    store = None
    if path.endswith(".zip"):
        store = zarr.storage.ZipStore(path, mode="r")
        root = zarr.open_group(store, mode="r")
    else:
        root = zarr.open_group(path, mode="r")
    try:
        return _read_episodes(root, path, list(obs_keys), action_key)
    finally:
        if store is not None:
            store.close()


def _read_episodes(root, path: str, obs_keys: list[str], action_key: str) -> list[Episode]:
    groups = set(root.group_keys())
    missing_groups = [g for g in ("data", "meta") if g not in groups]
    if missing_groups:
        raise KeyError(
            f"replay buffer {path} lacks group(s) {missing_groups} (diffusion_policy layout: "
            f"data/<key> + meta/episode_ends); it holds {sorted(root.keys())}"
        )
    data, meta = root["data"], root["meta"]
    held = sorted(data.array_keys())
    missing = [f"data/{k}" for k in [*obs_keys, action_key] if k not in held]
    if "episode_ends" not in set(meta.array_keys()):
        missing.append("meta/episode_ends")
    if missing:
        raise KeyError(
            f"replay buffer {path} lacks {missing}; it holds data/{held} and "
            f"meta/{sorted(meta.array_keys())}"
        )
    ends = np.asarray(meta["episode_ends"][:], dtype=np.int64).reshape(-1)
    n = data[action_key].shape[0]
    if ends.size == 0 or np.any(np.diff(ends) <= 0) or ends[0] <= 0 or ends[-1] != n:
        raise ValueError(
            f"replay buffer {path}: meta/episode_ends must increase strictly and end at the "
            f"number of steps {n}; got {ends[:5]}...{ends[-1:]}"
        )
    for k in obs_keys:
        if data[k].shape[0] != n:
            raise ValueError(f"replay buffer {path}: data/{k} has {data[k].shape[0]} rows, not {n}")
    obs = np.concatenate(
        [np.asarray(data[k][:], dtype=np.float32).reshape(n, -1) for k in obs_keys], axis=1
    )
    action = np.asarray(data[action_key][:], dtype=np.float32).reshape(n, -1)
    modes: list[str | None] = [None] * len(ends)
    success: list[bool | None] = [None] * len(ends)
    meta_keys = set(meta.array_keys())
    if "episode_mode" in meta_keys:
        names = list(meta.attrs.get(_MODE_ATTR, []))
        modes = [names[c] if c >= 0 else None for c in np.asarray(meta["episode_mode"][:])]
    if "episode_success" in meta_keys:
        success = [None if s < 0 else bool(s) for s in np.asarray(meta["episode_success"][:])]
    starts = np.concatenate([[0], ends[:-1]])
    return [
        Episode(obs[s:e], action[s:e], mode=m, success=ok)
        for s, e, m, ok in zip(starts, ends, modes, success)
    ]
