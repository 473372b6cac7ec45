"""Write generated backbones as PDB / PDBx-mmCIF / BinaryCIF files with biotite.

CA-only input (L, 3) is completed to N, CA, C, O with :func:`geometry.backbone_from_ca`
first, so every written file has a full backbone that other tools (ProteinMPNN, PyMOL,
ChimeraX) read as a protein. Files are written atomically (``fewstep.core.io``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fewstep.protein.geometry import backbone_from_ca
from fewstep.protein.structures import BACKBONE_ATOMS

__all__ = ["FORMATS", "read_back", "to_atom_array", "write_structure"]

_ELEMENTS = ("N", "C", "C", "O")  # element of each BACKBONE_ATOMS entry
DEFAULT_RESIDUE = "GLY"  # no side chain is modelled: glycine is the honest residue name


def _as_backbone(backbone_or_ca) -> np.ndarray:
    """(L, 4, 3) float32 from a backbone (L, 4, 3) or a CA trace (L, 3)."""
    if isinstance(backbone_or_ca, torch.Tensor):
        arr = backbone_or_ca.detach().cpu().numpy()
    else:
        arr = np.asarray(backbone_or_ca)
    if arr.ndim == 2 and arr.shape[-1] == 3:
        arr = backbone_from_ca(arr.astype(np.float64))
    if arr.ndim != 3 or arr.shape[1:] != (4, 3) or arr.shape[0] < 1:
        raise ValueError(
            "expected one structure: a backbone (L, 4, 3) with atoms N, CA, C, O or a CA trace "
            f"(L, 3); got shape {tuple(arr.shape)} (write a batch one file per structure)"
        )
    if not np.isfinite(arr).all():
        raise ValueError("structure coordinates contain NaN or inf")
    return arr.astype(np.float32)


def _residue_names(sequence: str | None, length: int) -> list[str]:
    if sequence is None:
        return [DEFAULT_RESIDUE] * length
    if len(sequence) != length:
        raise ValueError(f"sequence has {len(sequence)} letters for {length} residues")
    from biotite.sequence import ProteinSequence

    names = []
    for letter in sequence.upper():
        try:
            names.append(ProteinSequence.convert_letter_1to3(letter))
        except KeyError as exc:
            raise ValueError(f"unknown amino-acid letter {letter!r} in sequence") from exc
    return names


def to_atom_array(backbone, sequence: str | None = None, chain_id: str = "A"):
    """Biotite ``AtomArray`` of one backbone: 4L atoms N, CA, C, O per residue, residue ids
    1..L, element column set, residue names from ``sequence`` (one-letter) or GLY.

    backbone: (L, 4, 3) or a CA trace (L, 3) (completed with ``backbone_from_ca``)."""
    import biotite.structure as struc

    bb = _as_backbone(backbone)
    length = bb.shape[0]
    names = _residue_names(sequence, length)
    atoms = struc.AtomArray(4 * length)
    atoms.coord = bb.reshape(-1, 3)
    atoms.chain_id[:] = chain_id
    atoms.res_id = np.repeat(np.arange(1, length + 1), 4)
    atoms.res_name = np.repeat(np.array(names), 4)
    atoms.atom_name = np.tile(np.array(BACKBONE_ATOMS), length)
    atoms.element = np.tile(np.array(_ELEMENTS), length)
    atoms.hetero[:] = False
    return atoms


def _pdb_bytes(atoms) -> bytes:
    import biotite.structure.io.pdb as pdb

    f = pdb.PDBFile()
    f.set_structure(atoms)
    buf = io.StringIO()
    f.write(buf)
    return buf.getvalue().encode()


def _cif_bytes(atoms) -> bytes:
    import biotite.structure.io.pdbx as pdbx

    f = pdbx.CIFFile()
    pdbx.set_structure(f, atoms, data_block="fewstep")
    buf = io.StringIO()
    f.write(buf)
    return buf.getvalue().encode()


def _bcif_bytes(atoms) -> bytes:
    import biotite.structure.io.pdbx as pdbx

    f = pdbx.BinaryCIFFile()
    pdbx.set_structure(f, atoms, data_block="fewstep")
    buf = io.BytesIO()
    f.write(buf)
    return buf.getvalue()


# Suffix -> serializer; the registry is the list of supported formats.
FORMATS: dict[str, Callable[[object], bytes]] = {
    ".pdb": _pdb_bytes,
    ".cif": _cif_bytes,
    ".bcif": _bcif_bytes,
}


def write_structure(
    path: str | Path, backbone_or_ca, sequence: str | None = None, chain_id: str = "A"
) -> Path:
    """Write one backbone (L, 4, 3) or CA trace (L, 3) to ``path``; the format follows the
    suffix (.pdb, .cif, .bcif). Returns the path."""
    from fewstep.core.io import atomic_write_bytes

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{path.name}: cannot write structure format {suffix or '(no suffix)'!r}; "
            f"expected one of {sorted(FORMATS)}"
        )
    atoms = to_atom_array(backbone_or_ca, sequence=sequence, chain_id=chain_id)
    return atomic_write_bytes(path, FORMATS[suffix](atoms))


def read_back(path: str | Path):
    """The first model of a written file as a biotite ``AtomArray`` (any format
    :func:`structures.read_structure` reads)."""
    from fewstep.protein.structures import read_structure

    return read_structure(path)
