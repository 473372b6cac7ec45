"""Attention kernels: block-sparse attention with adaptive and video masks (BLADE, video
sparse attention) and attention with a forward-mode tangent (sCM, rCM, MeanFlow).

``attention`` and ``attention_with_tangent`` dispatch to Triton on CUDA and to PyTorch
references elsewhere (``dispatch``); mask builders live in ``masks``. Triton is imported only
when its backend runs.
"""

from fewstep.core.kernels.dispatch import BACKENDS, attention, attention_with_tangent
from fewstep.core.kernels.masks import (
    asa_block_mask,
    curve_order,
    inverse_permutation,
    tile_order,
    video_tile_mask,
)

__all__ = [
    "BACKENDS",
    "asa_block_mask",
    "attention",
    "attention_with_tangent",
    "curve_order",
    "inverse_permutation",
    "tile_order",
    "video_tile_mask",
]
