"""Offline geometry and plausibility metrics of generated CA backbones.

All functions take CA coordinates in Å as a (B, L, 3) tensor/array or a list of (L_i, 3)
arrays and return JSON-friendly floats. No network, no model weights: these are the checks
that run everywhere (designability, which needs ProteinMPNN + ESMFold, is in
``designability.py``).

- CA–CA bond deviation from the trans-peptide 3.80 Å (generated traces drift from it first).
- Clash rate: any non-adjacent (|i − j| >= 3) CA pair closer than 3.0 Å.
- Radius of gyration against the empirical Rg ≈ 2.2·L^0.38 Å of folded proteins
  (Skolnick et al. 1997, J Mol Biol 265:217; the exponent of compact globules).
- Secondary-structure composition with biotite's P-SEA (``annotate_sse``, Labesse et al.
  1997), compared to the training set by total variation distance.
- Diversity: mean pairwise TM-score when ``tmtools`` (TM-align bindings, Zhang & Skolnick
  2005) is installed, and always mean pairwise RMSD after Kabsch superposition plus the
  number of clusters at an RMSD cutoff (complete linkage).
- Novelty: per sample, the smallest superposed RMSD to the training fragments of the same
  length (seeded subsample of the references for speed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fewstep.protein.geometry import CA_CA, radius_of_gyration

__all__ = [
    "RG_EXPONENT",
    "RG_PREFACTOR",
    "ca_ca_deviation",
    "clash_rate",
    "evaluate_backbones",
    "expected_radius_of_gyration",
    "novelty",
    "pairwise_diversity",
    "radius_of_gyration",
    "radius_of_gyration_fit",
    "rmsd_matrix",
    "sse_composition",
    "sse_distance",
    "tm_available",
]

RG_PREFACTOR, RG_EXPONENT = 2.2, 0.38  # Rg ≈ 2.2 · L^0.38 Å for folded single domains
SSE_CLASSES = ("a", "b", "c")  # P-SEA: helix, strand, coil


def _as_list(samples) -> list[np.ndarray]:
    """CA coordinates as a list of (L_i, 3) float64 arrays; clear error otherwise."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    if isinstance(samples, np.ndarray):
        if samples.ndim == 2:
            samples = samples[None]
        if samples.ndim != 3 or samples.shape[-1] != 3:
            raise ValueError(f"expected CA coordinates (B, L, 3) or (L, 3), got {samples.shape}")
        out = list(samples.astype(np.float64))
    elif isinstance(samples, Sequence) and not isinstance(samples, str | bytes):
        out = []
        for i, s in enumerate(samples):
            arr = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
            if arr.ndim != 2 or arr.shape[-1] != 3:
                raise ValueError(f"sample {i}: expected (L, 3) CA coordinates, got {arr.shape}")
            out.append(arr.astype(np.float64))
    else:
        raise TypeError(
            f"expected a tensor/array (B, L, 3) or a list of (L, 3), got {type(samples)}"
        )
    if not out:
        raise ValueError("no samples")
    for i, s in enumerate(out):
        if s.shape[0] < 2 or not np.isfinite(s).all():
            raise ValueError(f"sample {i}: needs >= 2 finite CA positions, got shape {s.shape}")
    return out


# --------------------------------------------------------------------------------------------
# Local geometry


def ca_ca_deviation(samples, reference: float = CA_CA, tolerance: float = 0.2) -> dict[str, float]:
    """Consecutive CA–CA distances against the trans-peptide ``reference`` (3.80 Å).

    Returns ``ca_ca_mad``: mean |d(i, i+1) − reference| over all bonds (Å);
    ``ca_ca_frac_outside``: fraction of bonds outside reference ± tolerance;
    ``ca_ca_mean``: mean bond length (Å)."""
    d = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=-1) for s in _as_list(samples)])
    dev = np.abs(d - reference)
    return {
        "ca_ca_mad": float(dev.mean()),
        "ca_ca_frac_outside": float((dev > tolerance).mean()),
        "ca_ca_mean": float(d.mean()),
    }


def clash_rate(samples, threshold: float = 3.0, min_separation: int = 3) -> dict[str, float]:
    """CA–CA clashes between residues at least ``min_separation`` apart in sequence.

    Returns ``clash_rate``: fraction of structures with any such pair closer than
    ``threshold`` Å; ``clashes_per_residue``: mean over structures of (#pairs / L)."""
    any_clash, per_res = [], []
    for s in _as_list(samples):
        dist = np.linalg.norm(s[:, None] - s[None], axis=-1)
        i, j = np.triu_indices(len(s), k=min_separation)
        n = int((dist[i, j] < threshold).sum())
        any_clash.append(n > 0)
        per_res.append(n / len(s))
    return {"clash_rate": float(np.mean(any_clash)), "clashes_per_residue": float(np.mean(per_res))}


def expected_radius_of_gyration(length) -> np.ndarray | float:
    """Empirical Rg (Å) of a folded protein of ``length`` residues: 2.2 · L^0.38."""
    return RG_PREFACTOR * np.asarray(length, dtype=np.float64) ** RG_EXPONENT


def radius_of_gyration_fit(samples) -> dict[str, float]:
    """Rg of each sample against the folded-protein law.

    Returns ``rg_mean`` (Å), ``rg_ratio`` (mean of Rg / 2.2·L^0.38; ~1 for compact folds,
    larger for extended chains), ``rg_ratio_sd``."""
    xs = _as_list(samples)
    rg = np.array([float(radius_of_gyration(s)) for s in xs])
    ratio = rg / expected_radius_of_gyration(np.array([len(s) for s in xs]))
    return {
        "rg_mean": float(rg.mean()),
        "rg_ratio": float(ratio.mean()),
        "rg_ratio_sd": float(ratio.std()),
    }


# --------------------------------------------------------------------------------------------
# Secondary structure


def _ca_atom_array(ca: np.ndarray):
    """CA-only biotite AtomArray of one trace (residue ALA so P-SEA sees amino acids)."""
    import biotite.structure as struc

    atoms = struc.AtomArray(len(ca))
    atoms.coord = np.asarray(ca, dtype=np.float32)
    atoms.atom_name[:] = "CA"
    atoms.element[:] = "C"
    atoms.res_name[:] = "ALA"
    atoms.chain_id[:] = "A"
    atoms.res_id = np.arange(1, len(ca) + 1)
    return atoms


def sse_labels(samples) -> list[np.ndarray]:
    """P-SEA labels 'a'/'b'/'c' per residue of each CA trace via
    ``biotite.structure.annotate_sse`` (one call per trace: several traces in one AtomArray,
    split by residue-number gaps, gave different labels). Returns a list of (L_i,) arrays."""
    import biotite.structure as struc

    return [struc.annotate_sse(_ca_atom_array(x)) for x in _as_list(samples)]


def sse_composition(samples) -> dict[str, float]:
    """Fraction of residues (pooled over samples) labelled helix / strand / coil by P-SEA.

    Returns {"helix", "strand", "coil"} summing to 1."""
    labels = np.concatenate(sse_labels(samples))
    counts = np.array([(labels == c).sum() for c in SSE_CLASSES], dtype=np.float64)
    frac = counts / max(counts.sum(), 1.0)
    return {"helix": float(frac[0]), "strand": float(frac[1]), "coil": float(frac[2])}


def sse_distance(composition: dict[str, float], reference: dict[str, float]) -> float:
    """Total variation distance ½ Σ |p − q| between two helix/strand/coil compositions."""
    keys = ("helix", "strand", "coil")
    return 0.5 * float(sum(abs(composition[k] - reference[k]) for k in keys))


# --------------------------------------------------------------------------------------------
# Diversity and novelty


def tm_available() -> bool:
    """Whether the TM-align bindings ``tmtools`` import (``pip install tmtools``, GPL-3)."""
    try:
        import tmtools  # noqa: F401
    except ImportError:
        return False
    return True


def rmsd_matrix(a, b, chunk: int = 64) -> np.ndarray:
    """Superposed CA RMSD between every a[i] (B, L, 3) and b[j] (N, L, 3): (B, N) in Å.

    Closed-form Kabsch (Kabsch 1976; Coutsias et al. 2004): with centred coordinates and
    H = aᵀb = U S Vᵀ, RMSD² = (|a|² + |b|² − 2(s₁ + s₂ + d·s₃)) / L, d = sign det(U Vᵀ) (no
    reflections). Written here instead of looping ``biotite.structure.superimpose`` because
    novelty and diversity need ~10⁵ pairs: one batched 3×3 SVD is ~50× faster; the tests
    check parity with biotite."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[-1] != 3:
        raise ValueError(f"rmsd_matrix: expected (B, L, 3) and (N, L, 3), got {a.shape}, {b.shape}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    sq_b = (b**2).sum(axis=(1, 2))
    out = np.empty((len(a), len(b)))
    for start in range(0, len(a), chunk):
        ac = a[start : start + chunk]
        h = np.einsum("bli,nlj->bnij", ac, b)
        u, sv, vt = np.linalg.svd(h)
        d = np.sign(np.linalg.det(u @ vt))
        trace = sv[..., 0] + sv[..., 1] + d * sv[..., 2]
        sq = (ac**2).sum(axis=(1, 2))[:, None] + sq_b[None] - 2 * trace
        out[start : start + chunk] = np.sqrt(np.clip(sq, 0.0, None) / a.shape[1])
    return out


def _pairwise_rmsd(group: np.ndarray) -> np.ndarray:
    """(n, n) superposed RMSD matrix of n same-length structures (zero diagonal)."""
    mat = rmsd_matrix(group, group)
    mat = 0.5 * (mat + mat.T)
    np.fill_diagonal(mat, 0.0)
    return mat


def _clusters(dist: np.ndarray, cutoff: float) -> int:
    """Number of complete-linkage clusters whose members are all within ``cutoff``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(dist) == 1:
        return 1
    z = linkage(squareform(dist, checks=False), method="complete")
    return int(fcluster(z, t=cutoff, criterion="distance").max())


def _pairwise_tm(xs: list[np.ndarray]) -> np.ndarray:
    """(n, n) TM-scores (TM-align via tmtools, normalised by the first chain; symmetrised)."""
    from tmtools import tm_align

    n = len(xs)
    mat = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            res = tm_align(xs[i], xs[j], "A" * len(xs[i]), "A" * len(xs[j]))
            mat[i, j] = mat[j, i] = 0.5 * (res.tm_norm_chain1 + res.tm_norm_chain2)
    return mat


def pairwise_diversity(
    samples, rmsd_cutoff: float = 2.0, tm_cutoff: float = 0.5, use_tm: bool | None = None
) -> dict[str, float]:
    """Structural diversity of a sample set.

    Always: ``pairwise_rmsd`` (mean superposed RMSD over pairs of equal length, Å),
    ``clusters_rmsd`` (complete-linkage clusters at ``rmsd_cutoff``, summed over lengths) and
    ``cluster_frac_rmsd`` (clusters / samples). With ``tmtools`` installed (``use_tm`` None =
    auto): ``pairwise_tm`` (mean TM-score over all pairs; lower is more diverse) and
    ``clusters_tm`` (clusters with 1 − TM <= 1 − ``tm_cutoff``). To enable TM-score,
    ``pip install tmtools`` (TM-align bindings; GPL-3)."""
    xs = _as_list(samples)
    by_len: dict[int, list[np.ndarray]] = {}
    for x in xs:
        by_len.setdefault(len(x), []).append(x)
    pair_values, clusters = [], 0
    for group in by_len.values():
        mat = _pairwise_rmsd(np.stack(group))
        pair_values.append(mat[np.triu_indices(len(group), k=1)])
        clusters += _clusters(mat, rmsd_cutoff)
    pairs = np.concatenate(pair_values)
    out = {
        "pairwise_rmsd": float(pairs.mean()) if pairs.size else math.nan,
        "clusters_rmsd": float(clusters),
        "cluster_frac_rmsd": clusters / len(xs),
    }
    if use_tm is None:
        use_tm = tm_available()
    if use_tm:
        tm = _pairwise_tm(xs)
        iu = np.triu_indices(len(xs), k=1)
        out["pairwise_tm"] = float(tm[iu].mean()) if len(xs) > 1 else math.nan
        out["clusters_tm"] = float(_clusters(1.0 - tm, 1.0 - tm_cutoff))
    return out


def _reference_array(reference) -> np.ndarray:
    ca = getattr(reference, "ca", reference)  # FragmentSet or tensor/array
    if isinstance(ca, torch.Tensor):
        ca = ca.detach().cpu().numpy()
    ca = np.asarray(ca, dtype=np.float64)
    if ca.ndim != 3 or ca.shape[-1] != 3 or len(ca) == 0:
        raise ValueError(f"reference: expected fragments (N, L, 3), got {ca.shape}")
    return ca


def novelty(
    samples,
    reference,
    cutoff: float = 2.0,
    max_reference: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Distance of each sample to its nearest training fragment of the same length.

    reference: FragmentSet or (N, L, 3) CA fragments; more than ``max_reference`` are
    subsampled with ``np.random.default_rng(seed)``. Returns ``novelty_rmsd`` (mean over
    samples of the min superposed RMSD, Å) and ``novel_frac`` (fraction with min RMSD >
    ``cutoff``). Samples with no reference of their length are left out (counted in
    ``novelty_unmatched``)."""
    refs = _reference_array(reference)
    if len(refs) > max_reference:
        refs = refs[np.sort(np.random.default_rng(seed).choice(len(refs), max_reference, False))]
    xs = _as_list(samples)
    matched = [x for x in xs if len(x) == refs.shape[1]]
    unmatched = len(xs) - len(matched)
    arr = rmsd_matrix(np.stack(matched), refs).min(axis=1) if matched else np.zeros(0)
    return {
        "novelty_rmsd": float(arr.mean()) if arr.size else math.nan,
        "novel_frac": float((arr > cutoff).mean()) if arr.size else math.nan,
        "novelty_unmatched": float(unmatched),
    }


# --------------------------------------------------------------------------------------------
# Everything for the benchmark table

_REFERENCE_SSE: dict[str, dict[str, float]] = {}  # content hash -> composition (P-SEA is slow)


def _reference_sse(ref: np.ndarray) -> dict[str, float]:
    """SSE composition of reference fragments, memoised on their bytes: a recipe evaluates
    several models against the same training set."""
    import hashlib

    key = hashlib.sha1(np.ascontiguousarray(ref, dtype=np.float32).tobytes()).hexdigest()
    if key not in _REFERENCE_SSE:
        _REFERENCE_SSE[key] = sse_composition(list(ref))
    return _REFERENCE_SSE[key]


def evaluate_backbones(
    samples,
    reference,
    *,
    clash_threshold: float = 3.0,
    rmsd_cutoff: float = 2.0,
    max_reference: int = 2000,
    max_reference_sse: int = 300,
    seed: int = 0,
    use_tm: bool | None = None,
) -> dict[str, float]:
    """Every offline metric of ``samples`` against the training ``reference`` fragments.

    samples: (B, L, 3) or list of (L, 3) CA coordinates (Å); reference: FragmentSet or
    (N, L, 3). The reference's own SSE composition and Rg ratio (on a seeded subsample of
    ``max_reference_sse``) are reported beside the samples' (``ref_*``), and ``sse_tv`` is
    the total variation between the two compositions. Returns a flat dict of floats."""
    xs = _as_list(samples)
    refs = _reference_array(reference)
    sub = refs
    if len(refs) > max_reference_sse:
        sub = refs[np.sort(np.random.default_rng(seed).choice(len(refs), max_reference_sse, False))]
    out: dict[str, float] = {
        "n_samples": float(len(xs)),
        "length_mean": float(np.mean([len(x) for x in xs])),
    }
    out.update(ca_ca_deviation(xs))
    out.update(clash_rate(xs, threshold=clash_threshold))
    out.update(radius_of_gyration_fit(xs))
    out["ref_rg_ratio"] = radius_of_gyration_fit(list(sub))["rg_ratio"]
    sse = sse_composition(xs)
    ref_sse = _reference_sse(sub)
    out.update(sse)
    out.update({f"ref_{k}": v for k, v in ref_sse.items()})
    out["sse_tv"] = sse_distance(sse, ref_sse)
    out.update(pairwise_diversity(xs, rmsd_cutoff=rmsd_cutoff, use_tm=use_tm))
    out.update(novelty(xs, refs, cutoff=rmsd_cutoff, max_reference=max_reference, seed=seed))
    return {k: float(v) for k, v in out.items()}
