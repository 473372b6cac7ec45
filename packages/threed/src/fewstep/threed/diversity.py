"""Diversity of 3-D samples generated from different seeds, judged view by view.

ProlificDreamer (Wang et al., NeurIPS 2023, Sec. 3 and Fig. 4) claims that VSD, which treats
the 3-D scene as a random variable and matches its rendered distribution to the prior's,
yields diverse samples across seeds where SDS (DreamFusion, Poole et al. 2023), a mode-seeking
point estimate, makes near-identical ones. To measure it, scenes made from N seeds are
rendered at the same V cameras and compared pairwise per camera (only renders of the same view
are compared, so pose differences never count as diversity):

- ``pairwise_render_distance``: mean over cameras and seed pairs of a per-image distance,
  ``l2`` (root-mean-square pixel difference) or ``dssim`` (1 - SSIM, Wang et al. 2004, from
  scikit-image);
- ``pairwise_feature_distance``: mean Euclidean distance between feature vectors of the same
  view (e.g. a classifier's penultimate features), optionally divided by the features' RMS
  norm so that the figure does not scale with the feature magnitude;
- ``penultimate_features``: the input of a classifier's last ``nn.Linear`` (a forward
  pre-hook, so any classifier module works without knowing its class).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import torch
from torch import Tensor, nn


def _rms(a: Tensor, b: Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.float() - b.float()) ** 2)))


def _dssim(a: Tensor, b: Tensor) -> float:
    from skimage.metrics import structural_similarity

    x, y = a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()
    win = min(7, x.shape[0], x.shape[1])
    win -= 1 - win % 2  # odd window, as SSIM needs
    ssim = structural_similarity(x, y, channel_axis=-1, data_range=1.0, win_size=win)
    return 1.0 - float(ssim)


# Distance name -> function of two images (H, W, C) in [0, 1] -> float >= 0 (0 when equal).
IMAGE_DISTANCES: dict[str, Callable[[Tensor, Tensor], float]] = {"l2": _rms, "dssim": _dssim}


def _check_sets(x: Tensor, what: str, min_dim: int) -> None:
    if x.dim() < min_dim or x.shape[0] < 2:
        raise ValueError(
            f"{what} must be (N seeds >= 2, V views, ...) with {min_dim} dims, "
            f"got shape {tuple(x.shape)}"
        )


def pairwise_render_distance(renders: Tensor, metric: str = "l2") -> float:
    """Mean distance between renders of different seeds at the same camera.

    renders: (N, V, H, W, C) in [0, 1], N >= 2 seeds, V cameras. Returns the mean over the
    V cameras and the N (N - 1) / 2 seed pairs of ``IMAGE_DISTANCES[metric]``."""
    if metric not in IMAGE_DISTANCES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(IMAGE_DISTANCES)}")
    _check_sets(renders, "renders", 5)
    fn = IMAGE_DISTANCES[metric]
    vals = [
        fn(renders[i, v], renders[j, v])
        for i, j in combinations(range(renders.shape[0]), 2)
        for v in range(renders.shape[1])
    ]
    return sum(vals) / len(vals)


def pairwise_feature_distance(features: Tensor, normalize: bool = True) -> float:
    """Mean Euclidean distance between feature vectors of different seeds at the same camera.

    features: (N, V, D), N >= 2 seeds. With ``normalize`` the distance is divided by the RMS
    norm of all N V vectors (scale-free: multiplying the features by a constant leaves it
    unchanged; 0 when all seeds agree)."""
    _check_sets(features, "features", 3)
    f = features.float()
    i, j = zip(*combinations(range(f.shape[0]), 2))
    d = (f[list(i)] - f[list(j)]).norm(dim=-1).mean()
    if normalize:
        d = d / f.norm(dim=-1).pow(2).mean().sqrt().clamp_min(1e-12)
    return float(d)


@torch.no_grad()
def penultimate_features(classifier: nn.Module, x: Tensor) -> Tensor:
    """The input (B, D) of ``classifier``'s last ``nn.Linear`` when it classifies ``x``."""
    last = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(classifier).__name__} has no nn.Linear layer to read")
    seen: list[Tensor] = []
    handle = last[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        classifier(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1)
