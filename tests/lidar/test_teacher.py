"""LiDiff-style local diffusion teacher: the noising, the point network, pairing, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.core.samplers import DDPMSampler, EulerSampler
from fewstep.lidar import model as M
from fewstep.lidar import teacher as T
from fewstep.lidar.completion_data import PairsConfig


def _cloud(b=2, p=16, repeat=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    partial = torch.randn(b, p, 3, generator=g) * 5
    x_init = M.repeat_partial(partial, repeat)
    return partial, x_init, M.pack_cond(x_init, partial)


def test_local_noise_is_vp_on_offsets_around_x_init():
    """x_t = x_init + a (x0 - x_init) + s eps: the core path on y = x - x_init, shifted."""
    partial, x_init, _ = _cloud()
    g = torch.Generator().manual_seed(1)
    x0 = x_init + torch.randn(x_init.shape, generator=g)
    path = M.lidiff_path()
    t = torch.tensor([0.0, 999.0])
    eps = torch.randn(x0.shape, generator=g)
    a, s = path.coeffs(t, x0)
    x_t = M.local_noise(x0, x_init, a, s, eps)
    assert torch.allclose(x_t - x_init, path.noise(x0 - x_init, t, eps), atol=1e-5)
    # t = 0 keeps the clean sample (s_0 = sqrt(3.5e-5)); at T: partial scan + ~unit noise
    assert torch.allclose(x_t[0], x0[0], atol=6e-3 * eps[0].abs().max() + 1e-4)
    assert abs(float(s[1].squeeze()) - 1.0) < 0.02 and float(a[1].squeeze()) < 0.2


def test_repeat_and_pack_round_trip():
    partial, x_init, cond = _cloud(p=5, repeat=4)
    assert x_init.shape == (2, 20, 3) and torch.equal(x_init[:, 5:10], partial)
    a, b = M.unpack_cond(cond, 20)
    assert torch.equal(a, x_init) and torch.equal(b, partial)
    with pytest.raises(ValueError, match="pack_cond"):
        M.unpack_cond(cond, 25)


def test_network_is_permutation_equivariant_and_uses_the_condition():
    torch.manual_seed(0)
    net = M.LocalPointNet(M.PointNetConfig(hidden=16, k=4, k_partial=2)).eval()
    partial, x_init, cond = _cloud()
    y = torch.randn_like(x_init)
    t = torch.tensor([10.0, 500.0])
    out = net(y, t, cond)
    assert out.shape == y.shape
    perm = torch.randperm(y.shape[1])
    cond_p = M.pack_cond(x_init[:, perm], partial[:, torch.randperm(partial.shape[1])])
    assert torch.allclose(net(y[:, perm], t, cond_p), out[:, perm], atol=1e-5)
    moved = M.pack_cond(x_init, partial + 3.0)
    assert not torch.allclose(net(y, t, moved), out, atol=1e-3)
    assert not torch.allclose(net(y, t + 100, cond), out, atol=1e-4)


def test_pairings_return_paired_ground_truth():
    rng = np.random.default_rng(0)
    partial = rng.standard_normal((6, 3)) * 4
    dense = np.tile(partial, (3, 1)) + rng.standard_normal((18, 3)) * 0.05
    x0 = T.pair_assignment(partial, dense, 3)
    # the optimal bijection undoes the small jitter: each copy is paired with its own point
    assert np.linalg.norm(x0 - np.tile(partial, (3, 1)), axis=1).max() < 0.3
    assert sorted(map(tuple, x0)) == sorted(map(tuple, dense))
    k = T.pair_knn(partial, dense, 3)
    assert k.shape == (18, 3)
    assert np.linalg.norm(k - np.tile(partial, (3, 1)), axis=1).max() < 0.3
    with pytest.raises(ValueError, match="as many dense points"):
        T.pair_assignment(partial, dense[:5], 3)


def test_teacher_config_is_checked():
    with pytest.raises(ValueError, match="pairing"):
        T.TeacherConfig(pairing="nearest")
    with pytest.raises(ValueError, match="n_dense"):
        T.TeacherConfig(pairs=PairsConfig(n_partial=10, n_dense=50))


def test_lidiff_loss_regulariser():
    eps = torch.randn(2, 100, 3, generator=torch.Generator().manual_seed(0))
    loss, logs = T.lidiff_loss(eps, eps, reg_weight=5.0)
    assert logs["mse"] == 0.0 and loss.item() == pytest.approx(5.0 * logs["reg"])
    zero, logs = T.lidiff_loss(torch.zeros_like(eps), eps, reg_weight=1.0)
    assert logs["reg"] == pytest.approx(1.0)  # std 0: (0 - 1)^2


@pytest.fixture(scope="module")
def tiny_teacher(tiny_dataset, tmp_path_factory):
    """A few dozen steps on the tiny data set: enough to check that training learns."""
    root, _ = tiny_dataset
    from fewstep.lidar.completion_data import CompletionPairs

    cfg = T.TeacherConfig(
        pairs=PairsConfig(max_range=20.0, n_partial=32, n_dense=128),
        repeat=4,
        net=M.PointNetConfig(hidden=32, k=6, k_partial=3, layers=1),
        train_steps=80,
        batch_size=4,
        lr=3e-3,
    )
    data = CompletionPairs(root, cfg=cfg.pairs)
    pairs = T.build_pairs(data, list(range(len(data))), cfg)
    torch.manual_seed(0)
    model = M.make_denoiser(cfg.net, M.lidiff_path())
    ema, losses = T.train_teacher_on(model, pairs, cfg)
    return cfg, pairs, ema, losses


def test_teacher_training_lowers_the_loss(tiny_teacher):
    _, _, _, losses = tiny_teacher
    assert np.isfinite(losses).all()
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:10])


def test_complete_with_core_samplers(tiny_teacher):
    cfg, pairs, ema, _ = tiny_teacher
    part = pairs.partial()[:2]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return T.complete(ema, part, cfg.repeat, DDPMSampler(10, generator=g), generator=g)

    out, nfe = run(0)
    assert out.shape == (2, 128, 3) and nfe == 10 and torch.isfinite(out).all()
    assert torch.equal(run(0)[0], out) and not torch.equal(run(1)[0], out)
    guided, nfe = T.complete(ema, part, cfg.repeat, EulerSampler(3), guidance=2.0)
    assert nfe == 6 and guided.shape == out.shape
    with pytest.raises(ValueError, match=r"\(B, P, 3\)"):
        T.complete(ema, part[0], cfg.repeat)


def test_null_partial_keeps_x_init():
    _, x_init, cond = _cloud(repeat=2)
    out = T.null_partial(cond, x_init.shape[1])
    assert (
        torch.equal(out[:, : x_init.shape[1]], x_init)
        and out[:, x_init.shape[1] :].abs().sum() == 0
    )


def test_teacher_is_cached_by_config(tmp_path, monkeypatch, tiny_scene_config, tiny_lidar):
    from fewstep.lidar.sensor import DatasetConfig

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    cfg = T.TeacherConfig(
        data=DatasetConfig(scene=tiny_scene_config, lidar=tiny_lidar, speed=20.0),
        n_sequences=2,
        scans_per_seq=2,
        pairs=PairsConfig(max_range=15.0, n_partial=16, n_dense=32),
        repeat=2,
        net=M.PointNetConfig(hidden=8, k=4, k_partial=2, layers=1),
        train_steps=3,
        batch_size=2,
    )
    first, info, cached = T.load_or_train_teacher(cfg)
    assert not cached and info["n_train_pairs"] == 2  # street 01 is held out
    again, _, cached = T.load_or_train_teacher(cfg)
    assert cached
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert len(list((tmp_path / "lidar-data").iterdir())) == 1
