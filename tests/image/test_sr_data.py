"""Paired SR data (digits 8 -> 16, scikit-learn's photos x4) and the PSNR / SSIM metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewstep.image.sr import data as D
from fewstep.image.sr.metrics import gaussian_window, psnr, ssim


@pytest.fixture(scope="module")
def digits():
    return D.load_sr_dataset(D.SRDataConfig(dataset="digits"))


@pytest.fixture(scope="module")
def photos_cfg():
    return D.SRDataConfig(dataset="photos", train_crops=24, eval_crops=12)


@pytest.fixture(scope="module")
def photos(photos_cfg):
    return D.load_sr_dataset(photos_cfg)


def test_digits_pairs_follow_the_stated_recipe(digits):
    from fewstep.image.digits import load_digits_tensors, split

    tr, te = digits.train, digits.heldout
    assert digits.scale == 2
    assert tr.hr.shape[1:] == (1, 16, 16) and tr.lr.shape[1:] == (1, 8, 8)
    assert tr.lr_up.shape == tr.hr.shape
    assert len(tr) + len(te) == 1797 and len(te) == int(1797 * 0.2)
    for t in (tr.hr, tr.lr, tr.lr_up, te.hr, te.lr):
        assert t.min() >= -1 and t.max() <= 1
    # plain recomputation: HR = bicubic 8 -> 16; LR = clamp(down(blur(HR)) + 0.05 n)
    (x_tr, _), _ = split(*load_digits_tensors())
    hr = F.interpolate(x_tr, size=(16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(tr.hr, hr)
    from scipy.ndimage import gaussian_filter

    blurred = torch.from_numpy(
        gaussian_filter(hr.double().numpy(), sigma=(0, 0, 0.8, 0.8), mode="reflect")
    ).float()
    down = F.interpolate(blurred, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    noise = torch.randn(down.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tr.lr, (down + 0.05 * noise).clamp(-1, 1))
    up = F.interpolate(tr.lr, size=(16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(tr.lr_up, up)


def test_degrade_without_blur_or_noise_is_bicubic_down():
    hr = torch.rand(3, 2, 12, 12) * 2 - 1
    lr = D.degrade(hr, 3, 0.0, 0.0, seed=0)
    ref = F.interpolate(hr, size=(4, 4), mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.equal(lr, ref)
    noisy = D.degrade(hr, 3, 0.0, 0.1, seed=0)
    assert not torch.equal(noisy, lr) and torch.equal(noisy, D.degrade(hr, 3, 0.0, 0.1, seed=0))


def test_photo_crops_are_slices_and_heldout_is_a_separate_region(photos, photos_cfg):
    cfg = D.resolved(photos_cfg)
    assert photos.scale == 4
    assert photos.train.hr.shape == (24, 1, 32, 32) and photos.train.lr.shape == (24, 1, 8, 8)
    assert photos.heldout.hr.shape == (12, 1, 32, 32)
    imgs = D.load_photos("grey", cfg.photo_zoom)
    for pairs, heldout in ((photos.train, False), (photos.heldout, True)):
        for crop, (i, top, left) in zip(pairs.hr, pairs.origins.tolist(), strict=True):
            w = imgs[i].shape[-1]
            cut = (1 - cfg.heldout_fraction) * w
            assert torch.equal(crop, imgs[i][:, top : top + 32, left : left + 32])
            if heldout:
                assert left >= cut
            else:
                assert left + 32 <= cut
    assert set(photos.train.origins[:, 0].tolist()) == {0, 1}  # both photos are used


def test_photos_rgb_and_determinism(photos, photos_cfg):
    again = D.load_sr_dataset(photos_cfg)
    assert torch.equal(again.train.hr, photos.train.hr)
    assert torch.equal(again.heldout.lr, photos.heldout.lr)
    rgb = D.load_sr_dataset(
        D.SRDataConfig(dataset="photos", colour="rgb", train_crops=4, eval_crops=2, noise_std=0.1)
    )
    assert rgb.train.hr.shape == (4, 3, 32, 32) and rgb.train.lr.shape == (4, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "photos", "scale": 3}, "scale 3 does not divide the HR size 32"),
        ({"dataset": "digits", "hr_size": 18, "scale": 4}, "does not divide"),
        ({"dataset": "celeba"}, "unknown SR dataset 'celeba'; available: digits, photos"),
        ({"dataset": "digits", "colour": "rgb"}, "grey"),
        ({"dataset": "photos", "hr_size": 400, "train_crops": 2}, "does not fit"),
    ],
)
def test_bad_data_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D.load_sr_dataset(D.SRDataConfig(**kwargs))


# ---------------------------------------------------------------------------------- metrics


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 written out window by window (one channel, valid positions)."""
    w = gaussian_window(11, 1.5).numpy()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_matches_a_window_by_window_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 16, 14, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    got = ssim(a, b)
    for k in range(2):
        ref = np.mean(
            [
                _ssim_reference(a[k, c].double().numpy(), b[k, c].double().numpy(), 2.0)
                for c in (0, 1)
            ]
        )
        assert abs(float(got[k]) - ref) < 1e-5
    assert torch.allclose(ssim(a, a), torch.ones(2))
    assert (ssim(a, b) < ssim(a, (a + b) / 2)).all()  # closer image, higher SSIM


def test_psnr_value_and_bad_shapes():
    a = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(psnr(a + 0.1, a), torch.full((2,), 10 * math.log10(4 / 0.01)))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        psnr(a, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="window is larger"):
        ssim(a, a)
