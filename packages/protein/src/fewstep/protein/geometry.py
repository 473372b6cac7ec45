"""Backbone geometry: full backbone from a CA trace, ideal CA builders, superposition, Rg.

Backbone reconstruction (:func:`backbone_from_ca`)
--------------------------------------------------
Each peptide unit CA(i)–C(i)(=O(i))–N(i+1)–CA(i+1) is rigid and planar with ideal geometry
(Engh & Huber 1991, Acta Cryst A47:392: N–CA 1.458, CA–C 1.525, C–N 1.329, C=O 1.231 Å;
CA–C–N 116.2°, C–N–CA 121.7°, CA–C=O 120.1°, trans ω = 180°). Given CA(i) and CA(i+1), the
only unknown of the unit is its rotation φ about the CA(i)→CA(i+1) axis. As in the classical
CA-to-backbone methods (Purisima & Scheraga 1984, Biopolymers 23:1207; Milik, Kolinski &
Skolnick 1997, J Comput Chem 18:80, who also fit coefficients on known structures), φ is
predicted from the local CA geometry of CA(i-1..i+2): the two virtual bond angles and the
virtual dihedral. Here a small least-squares model (a Fourier series in the virtual
dihedral, linear in the two angles) predicts (cos φ, sin φ); its coefficients were fitted
with :func:`fit_peptide_model` on the MDAnalysisTests chains (`_PEPTIDE_COEF` below).

C(i) and O(i) are placed rigidly from CA(i), N(i+1) from CA(i+1), so N–CA, CA–C and C=O
have the ideal lengths exactly; C–N and the angles are exact when CA–CA equals the ideal
trans-peptide distance (3.80 Å) and absorb any deviation otherwise. Termini: the trace is
extended by two virtual CAs at each end that continue the terminal virtual angle and
dihedral (NeRF placement, Parsons et al. 2005, J Comput Chem 26:1063), so the N of the first
residue and the C/O of the last are placed like the interior ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ENGH_HUBER",
    "CA_CA",
    "IDEAL_CA_CA",
    "backbone_from_ca",
    "ca_internal_coordinates",
    "fit_peptide_model",
    "ideal_helix",
    "ideal_strand",
    "kabsch",
    "nerf_extend",
    "radius_of_gyration",
    "superposed_rmsd",
]

# Engh & Huber (1991) bond lengths (Å) and angles (degrees) of the protein backbone.
ENGH_HUBER = {
    "N-CA": 1.458,
    "CA-C": 1.525,
    "C-N": 1.329,
    "C-O": 1.231,
    "CA-C-N": 116.2,
    "C-N-CA": 121.7,
    "CA-C-O": 120.1,
    "N-CA-C": 111.2,
}


def _ideal_peptide() -> tuple[float, np.ndarray]:
    """The trans peptide unit in its own plane.

    Returns (d0, xy) with d0 the CA(i)–CA(i+1) distance and xy (3, 2) the in-plane
    coordinates of C(i), O(i), N(i+1) in a frame with CA(i) at the origin, CA(i+1) on +x and
    C(i) at positive y."""
    eh = ENGH_HUBER
    rad = math.radians
    ca1 = np.zeros(2)
    c = np.array([eh["CA-C"], 0.0])
    # Angles measured at C from the C->CA1 direction (pointing to -x); N turns one way, O the
    # other so that CA-C-N + CA-C-O + O-C-N = 360°.
    a_n = rad(180.0 - eh["CA-C-N"])
    n = c + eh["C-N"] * np.array([math.cos(a_n), math.sin(a_n)])
    a_o = -rad(180.0 - eh["CA-C-O"])
    o = c + eh["C-O"] * np.array([math.cos(a_o), math.sin(a_o)])
    # CA2 trans to CA1 across the C–N bond: turn the other way at N.
    dir_cn = (n - c) / np.linalg.norm(n - c)
    turn = -rad(180.0 - eh["C-N-CA"])
    rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    ca2 = n + eh["N-CA"] * (rot @ dir_cn)
    # Frame: x along CA1->CA2, y such that C has positive y.
    ex = (ca2 - ca1) / np.linalg.norm(ca2 - ca1)
    ey = np.array([-ex[1], ex[0]])
    if np.dot(c, ey) < 0:
        ey = -ey
    xy = np.stack([[np.dot(p, ex), np.dot(p, ey)] for p in (c, o, n)])
    return float(np.linalg.norm(ca2 - ca1)), xy


IDEAL_CA_CA, _PEPTIDE_XY = _ideal_peptide()  # 3.804 Å for the Engh & Huber trans peptide
CA_CA = 3.80  # reference CA–CA distance (Å) of a trans peptide, used by builders and metrics

_HARMONICS = 3
# (2, 3 * (2H + 1)) coefficients predicting (cos φ, sin φ) of the peptide plane; fitted with
# fit_peptide_model(read_chains(default_structure_files(), min_length=8)[0]) (108 chains,
# 12.9k peptides). Fitted on half of the chains, the other half is reconstructed with N/C/O
# RMSD 0.45 Å (median per chain; per atom N 0.22, C 0.26, O 0.69 Å): no overfit with 42 numbers.
# fmt: off
_PEPTIDE_COEF = np.array([
    [-0.60536, 0.09791, -0.29404, 0.1344, 0.12487, -0.07373, -0.01047, 1.45811, 0.0767,
     -0.14799, -0.10336, -0.17064, 0.15691, 0.13298, 0.00802, -0.4028, 0.09623, -0.09287,
     -0.16278, -0.01127, -0.08036],
    [-0.19881, 0.40085, 0.52355, -0.25247, 0.3177, 0.15856, 0.18098, -0.34983, -0.24246,
     -0.32193, -0.16453, -0.42398, -0.36271, -0.42634, 0.10409, 0.44372, -0.4686, 0.41808,
     -0.34096, -0.00513, -0.20017],
])
# fmt: on


# --------------------------------------------------------------------------------------------
# Small tensor helpers (torch, float64 inside)


def _as_tensor(x) -> tuple[torch.Tensor, bool, torch.dtype]:
    """(float64 tensor, was_numpy, original float dtype)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64)), True, torch.float32
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return x.detach().to(torch.float64), False, dtype
    raise TypeError(f"expected a numpy array or torch tensor of CA coordinates, got {type(x)}")


def _back(x: torch.Tensor, was_numpy: bool, dtype: torch.dtype, like=None):
    if was_numpy:
        return x.numpy().astype(np.float32)
    return x.to(dtype=dtype, device=like.device if like is not None else x.device)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_ca(ca: torch.Tensor, min_len: int = 2) -> None:
    if ca.ndim not in (2, 3) or ca.shape[-1] != 3 or ca.shape[-2] < min_len:
        raise ValueError(
            f"expected CA coordinates of shape (L, 3) or (B, L, 3) with L >= {min_len}, "
            f"got {tuple(ca.shape)}"
        )
    if not torch.isfinite(ca).all():
        raise ValueError("CA coordinates contain NaN or inf")


def ca_internal_coordinates(ca) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Virtual bonds, angles and dihedrals of a CA trace (…, L, 3).

    Returns (bonds (…, L-1) Å, angles (…, L-2) rad at CA(1..L-2), dihedrals (…, L-3) rad of
    CA(i..i+3)), as float64 tensors."""
    x, _, _ = _as_tensor(ca)
    v = x[..., 1:, :] - x[..., :-1, :]
    bonds = v.norm(dim=-1)
    cos = (_unit(-v[..., :-1, :]) * _unit(v[..., 1:, :])).sum(-1).clamp(-1.0, 1.0)
    angles = torch.arccos(cos)
    n1 = torch.cross(v[..., :-2, :], v[..., 1:-1, :], dim=-1)
    n2 = torch.cross(v[..., 1:-1, :], v[..., 2:, :], dim=-1)
    y = (torch.cross(n1, n2, dim=-1) * _unit(v[..., 1:-1, :])).sum(-1)
    dihedrals = torch.atan2(y, (n1 * n2).sum(-1))
    return bonds, angles, dihedrals


def nerf_extend(a, b, c, bond: float, angle, torsion) -> torch.Tensor:
    """Place d after a, b, c with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) =
    torsion (radians). NeRF, Parsons et al. 2005. Shapes (…, 3) -> (…, 3)."""
    bc = _unit(c - b)
    n = _unit(torch.cross(b - a, bc, dim=-1))
    m = torch.cross(n, bc, dim=-1)
    angle = torch.as_tensor(angle, dtype=c.dtype, device=c.device)
    torsion = torch.as_tensor(torsion, dtype=c.dtype, device=c.device)
    d2 = torch.stack(
        [
            -bond * torch.cos(angle),
            bond * torch.sin(angle) * torch.cos(torsion),
            bond * torch.sin(angle) * torch.sin(torsion),
        ],
        dim=-1,
    )
    return c + d2[..., 0:1] * bc + d2[..., 1:2] * m + d2[..., 2:3] * n


# --------------------------------------------------------------------------------------------
# Ideal CA builders


def ideal_helix(length: int, rise: float = 1.5, per_turn: float = 3.6) -> np.ndarray:
    """(L, 3) float32 CA trace of a right-handed α-helix along +z: CA–CA = ``CA_CA`` (3.80 Å),
    ``rise`` Å per residue, ``per_turn`` residues per turn (radius solved from CA–CA)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    twist = 2 * math.pi / per_turn
    chord = math.sqrt(CA_CA**2 - rise**2)
    radius = chord / (2 * math.sin(twist / 2))
    i = np.arange(length)
    out = np.stack([radius * np.cos(i * twist), radius * np.sin(i * twist), rise * i], axis=1)
    return out.astype(np.float32)


def _from_internal(length: int, angle_deg: float, torsion_deg: float) -> np.ndarray:
    """CA trace with constant virtual angle and dihedral and 3.80 Å bonds (NeRF)."""
    a = math.radians(angle_deg)
    pts = [
        torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64),
        torch.tensor([CA_CA, 0.0, 0.0], dtype=torch.float64),
    ]
    pts.append(pts[1] + CA_CA * torch.tensor([-math.cos(a), math.sin(a), 0.0]).double())
    while len(pts) < length:
        pts.append(nerf_extend(pts[-3], pts[-2], pts[-1], CA_CA, a, math.radians(torsion_deg)))
    return torch.stack(pts[:length]).numpy().astype(np.float32)


def ideal_strand(length: int, angle: float = 124.0, torsion: float = -170.0) -> np.ndarray:
    """(L, 3) float32 CA trace of a β-strand: 3.80 Å bonds, virtual angle 124° and dihedral
    -170° (the strand reference values of P-SEA, Labesse et al. 1997, CABIOS 13:291)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return _from_internal(length, angle, torsion)


# --------------------------------------------------------------------------------------------
# Peptide-plane model


def _peptide_frames(ext: torch.Tensor):
    """Frames of the peptides between ext[k] and ext[k+1] for k = 1 .. M-3 of an extended
    trace (…, M, 3). Returns x, e2, e3 (…, M-3, 3) and the design matrix (…, M-3, D)."""
    vp = ext[..., 1:-2, :] - ext[..., :-3, :]
    v = ext[..., 2:-1, :] - ext[..., 1:-2, :]
    vn = ext[..., 3:, :] - ext[..., 2:-1, :]
    x = _unit(v)
    back = -vp - ((-vp) * x).sum(-1, keepdim=True) * x
    e2 = _unit(back)
    e3 = torch.cross(x, e2, dim=-1)
    th1 = torch.arccos((_unit(-vp) * x).sum(-1).clamp(-1, 1))
    th2 = torch.arccos((_unit(-v) * _unit(vn)).sum(-1).clamp(-1, 1))
    n1 = torch.cross(vp, v, dim=-1)
    n2 = torch.cross(v, vn, dim=-1)
    tau = torch.atan2((torch.cross(n1, n2, dim=-1) * x).sum(-1), (n1 * n2).sum(-1))
    return x, e2, e3, _design(th1, th2, tau)


def _design(th1: torch.Tensor, th2: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Fourier series in the virtual dihedral, times (1, θ1 − 1.6, θ2 − 1.6): (…, 3(2H+1))."""
    cols = [torch.ones_like(tau)]
    for h in range(1, _HARMONICS + 1):
        cols += [torch.cos(h * tau), torch.sin(h * tau)]
    base = torch.stack(cols, dim=-1)
    return torch.cat([base, base * (th1[..., None] - 1.6), base * (th2[..., None] - 1.6)], dim=-1)


def _extend_end(tr: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` virtual CAs after the end of ``tr`` (…, L, 3) that continue its last virtual angle
    and dihedral (extended-chain 120° / -170° where the trace is too short): (…, n, 3)."""
    length = tr.shape[-2]
    batch = tr.shape[:-2]
    default_angle, default_torsion = math.radians(120.0), math.radians(-170.0)
    if length >= 3:
        angle = ca_internal_coordinates(tr[..., -3:, :])[1][..., -1]
    else:
        angle = torch.full(batch, default_angle, dtype=tr.dtype, device=tr.device)
    if length >= 4:
        torsion = ca_internal_coordinates(tr[..., -4:, :])[2][..., -1]
    else:
        torsion = torch.full(batch, default_torsion, dtype=tr.dtype, device=tr.device)
    pts = list(tr[..., -3:, :].unbind(-2))
    if length == 2:  # a dummy point before tr[0] so the first dihedral is defined
        v = _unit(pts[1] - pts[0])
        helper = torch.zeros_like(v)
        helper[..., 0] = 1.0
        helper = torch.where(
            (v * helper).sum(-1, keepdim=True).abs() > 0.9, helper.roll(1, -1), helper
        )
        side = _unit(helper - (helper * v).sum(-1, keepdim=True) * v)
        a = torch.tensor(default_angle, dtype=tr.dtype, device=tr.device)
        pts.insert(0, pts[0] + IDEAL_CA_CA * (torch.cos(a) * v + torch.sin(a) * side))
    for _ in range(n):
        pts.append(nerf_extend(pts[-3], pts[-2], pts[-1], IDEAL_CA_CA, angle, torsion))
    return torch.stack(pts[-n:], dim=-2)


def _extend_trace(ca: torch.Tensor, n: int = 2) -> torch.Tensor:
    """(…, L, 3) -> (…, L + 2n, 3) with ``n`` virtual CAs at each end (:func:`_extend_end`)."""
    tail = _extend_end(ca, n)
    head = _extend_end(ca.flip(-2), n).flip(-2)
    return torch.cat([head, ca, tail], dim=-2)


def _place_peptides(ext: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """C(k), O(k), N(k+1) of every peptide of an extended trace: (…, M-3, 3 atoms, 3)."""
    x, e2, e3, design = _peptide_frames(ext)
    cos_sin = design @ coef.T  # (…, P, 2)
    phi = torch.atan2(cos_sin[..., 1], cos_sin[..., 0])
    y = torch.cos(phi)[..., None] * e2 + torch.sin(phi)[..., None] * e3
    xy = torch.as_tensor(_PEPTIDE_XY, dtype=ext.dtype, device=ext.device)
    ca1 = ext[..., 1:-2, :]
    ca2 = ext[..., 2:-1, :]
    c = ca1 + xy[0, 0] * x + xy[0, 1] * y
    o = ca1 + xy[1, 0] * x + xy[1, 1] * y
    n = ca2 + (xy[2, 0] - IDEAL_CA_CA) * x + xy[2, 1] * y
    return torch.stack([c, o, n], dim=-2)


def backbone_from_ca(ca, coef: np.ndarray | None = None):
    """Full backbone N, CA, C, O from a CA trace with ideal peptide geometry (module docstring).

    ca: (L, 3) or (B, L, 3), numpy or torch, Å, L >= 2. Returns (…, L, 4, 3) of the same kind
    (numpy -> float32 ndarray; torch -> same dtype/device). CA atoms are the input ones."""
    x, was_numpy, dtype = _as_tensor(ca)
    _check_ca(x)
    weights = torch.as_tensor(
        _PEPTIDE_COEF if coef is None else coef, dtype=torch.float64, device=x.device
    )
    ext = _extend_trace(x, 2)  # (…, L+4, 3); residue i is ext[i+2]
    pep = _place_peptides(ext, weights)  # peptide j between ext[j+1], ext[j+2], j = 0..L
    # Residue i: N from the peptide ending at it (j = i), C and O from the one starting (j = i+1).
    n = pep[..., :-1, 2, :]
    c = pep[..., 1:, 0, :]
    o = pep[..., 1:, 1, :]
    out = torch.stack([n, x, c, o], dim=-2)
    return _back(out, was_numpy, dtype, like=ca if not was_numpy else None)


def _peptide_targets(backbone: torch.Tensor):
    """Best-fit φ of each real peptide (Procrustes about the CA–CA axis) and the design rows.

    backbone (L, 4, 3) float64. Returns (design (L-3, D), phi (L-3,)) for peptides 1..L-3."""
    ca = backbone[:, 1]
    x, e2, e3, design = _peptide_frames(ca)  # peptides between ca[k], ca[k+1], k = 1..L-3
    xy = torch.as_tensor(_PEPTIDE_XY, dtype=ca.dtype)
    k = torch.arange(1, ca.shape[0] - 2)
    atoms = torch.stack(
        [backbone[k, 2] - ca[k], backbone[k, 3] - ca[k], backbone[k + 1, 0] - ca[k]], dim=1
    )
    perp = atoms - (atoms * x[:, None]).sum(-1, keepdim=True) * x[:, None]
    s = (xy[:, 1][None, :, None] * perp).sum(1)  # Σ_a y_a p_a
    phi = torch.atan2((s * e3).sum(-1), (s * e2).sum(-1))
    return design, phi


def fit_peptide_model(chains: Sequence) -> np.ndarray:
    """Least-squares coefficients (2, D) of the peptide-plane model on real chains.

    chains: objects with a ``backbone`` (L, 4, 3) array (e.g. ``structures.Chain``)."""
    rows, targets = [], []
    for chain in chains:
        bb = torch.as_tensor(np.asarray(chain.backbone), dtype=torch.float64)
        if bb.shape[0] < 4:
            continue
        design, phi = _peptide_targets(bb)
        rows.append(design)
        targets.append(torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1))
    if not rows:
        raise ValueError("fit_peptide_model needs chains with at least 4 residues")
    a, b = torch.cat(rows), torch.cat(targets)
    return torch.linalg.lstsq(a, b).solution.T.numpy()


# --------------------------------------------------------------------------------------------
# Superposition and size


def _np3(x, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim not in (2, 3) or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape (N, 3) or (B, N, 3), got {arr.shape}")
    return arr.astype(np.float64)


def kabsch(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation R and translation t minimising ‖a Rᵀ + t − b‖ (moves a onto b).

    a: (N, 3) or (B, N, 3); b: (N, 3). Uses ``biotite.structure.superimpose`` (Kabsch with
    reflection check). Returns R (…, 3, 3), t (…, 3) as float64 arrays."""
    import biotite.structure as struc

    mobile, fixed = _np3(a, "a"), _np3(b, "b")
    if fixed.ndim != 2 or mobile.shape[-2:] != fixed.shape:
        raise ValueError(f"kabsch: shapes {mobile.shape} and {fixed.shape} do not match")
    _, tf = struc.superimpose(fixed, mobile)
    rot = tf.rotation  # (…, 3, 3) for row vectors: x' = (x + c) @ R^T + t_target
    rot = rot[0] if mobile.ndim == 2 and rot.ndim == 3 else rot
    pre = np.asarray(tf.center_translation).reshape(*mobile.shape[:-2], 3)
    post = np.asarray(tf.target_translation).reshape(*mobile.shape[:-2], 3)
    t = np.einsum("...ij,...j->...i", rot, pre) + post
    return rot, t


def superposed_rmsd(a, b) -> np.ndarray | float:
    """RMSD (Å) after optimal superposition of a (N, 3) or (B, N, 3) onto b (N, 3)
    (biotite ``superimpose`` + ``rmsd``). Returns a float or (B,) array."""
    import biotite.structure as struc

    mobile, fixed = _np3(a, "a"), _np3(b, "b")
    if fixed.ndim != 2 or mobile.shape[-2:] != fixed.shape:
        raise ValueError(f"superposed_rmsd: shapes {mobile.shape} and {fixed.shape} do not match")
    fitted, _ = struc.superimpose(fixed, mobile)
    out = struc.rmsd(fixed, fitted)
    return float(out) if mobile.ndim == 2 else np.asarray(out, dtype=np.float64)


def radius_of_gyration(ca):
    """Radius of gyration (Å) of CA coordinates (…, L, 3), numpy or torch -> (…)."""
    if isinstance(ca, torch.Tensor):
        centred = ca - ca.mean(dim=-2, keepdim=True)
        return centred.pow(2).sum(-1).mean(-1).sqrt()
    arr = np.asarray(ca, dtype=np.float64)
    centred = arr - arr.mean(axis=-2, keepdims=True)
    return np.sqrt((centred**2).sum(-1).mean(-1))
