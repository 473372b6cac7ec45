"""Real protein structures as training data: read with biotite, split into continuous chains,
cut into fixed-length CA fragments, cached.

Data source with no internet: the MDAnalysis test-data package ``MDAnalysisTests`` (on PyPI as
``mdanalysistests``) ships ~130 PDB/mmCIF files. Most are MD frames or deliberately broken
test cases; :func:`default_structure_files` keeps the deposited crystal/cryo-EM entries
(rule in its docstring). Files are located with ``importlib.util.find_spec``; the package is
never imported (importing it pulls MDAnalysis).

Heavy imports (biotite) are lazy so importing ``fewstep.protein`` stays fast.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import io
import json
import logging
import lzma
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BACKBONE_ATOMS",
    "Chain",
    "FragmentSet",
    "default_structure_files",
    "fragments",
    "load_fragments",
    "read_chains",
    "read_structure",
]

log = logging.getLogger("fewstep.protein")

BACKBONE_ATOMS = ("N", "CA", "C", "O")  # order of axis 1 in Chain.backbone
# Bump when reading/splitting rules change, so cached fragment sets are rebuilt.
_READER_VERSION = 1

# Non-standard names for a canonical residue, kept and mapped so such chains are not cut in
# pieces: selenomethionine (crystallographic phasing) and the force-field histidine
# protonation states (CHARMM HSD/HSE/HSP, AMBER HID/HIE/HIP) found in prepared PDB files.
_MODIFIED_TO_CANONICAL = {
    "MSE": "MET",
    **{name: "HIS" for name in ("HSD", "HSE", "HSP", "HID", "HIE", "HIP")},
}

_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
_TEXT_FORMATS = {".pdb": "pdb", ".ent": "pdb", ".cif": "cif", ".mmcif": "cif"}
_BINARY_FORMATS = {".bcif": "bcif"}


@dataclass
class Chain:
    """One continuous protein chain segment (no missing residue, no chain break)."""

    name: str  # "<file stem>_<chain id>" (+ "_<k>" for the k-th segment of a broken chain)
    backbone: np.ndarray  # (L, 4, 3) float32 Å, atoms N, CA, C, O
    sequence: str  # one-letter codes, length L
    res_ids: np.ndarray  # (L,) author residue numbers

    def __len__(self) -> int:
        return int(self.backbone.shape[0])

    @property
    def ca(self) -> np.ndarray:
        """(L, 3) CA coordinates in Å."""
        return self.backbone[:, 1]


@dataclass
class FragmentSet:
    """Fixed-length CA windows cut from real chains: the protein training set."""

    ca: torch.Tensor  # (N, length, 3) float32 Å, not centred
    sources: list[str]  # "<chain name>@<start index>" for each fragment
    chains: int  # number of continuous chain segments read (each >= min_length residues)
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why it gave nothing

    def __len__(self) -> int:
        return int(self.ca.shape[0])

    @property
    def length(self) -> int:
        return int(self.ca.shape[1])


# --------------------------------------------------------------------------------------------
# Default files inside MDAnalysisTests


# Top-level files of MDAnalysisTests/data that are deposited PDB entries (a HEADER record with
# a PDB id), not MD frames or test cases. Checked by hand against their headers.
_TOP_LEVEL_ENTRIES = (
    "19hc.pdb.gz",  # nine-haem cytochrome c
    "1a28.pdb.gz",  # progesterone receptor ligand-binding domain
    "1hvr.pdb",  # HIV protease + cyclic urea
    "1osm.pdb.gz",  # osmoporin OmpK36
    "4E43.pdb",  # HIV protease dimer
    "6msm.pdb.bz2",  # CFTR, cryo-EM
    "adk_open.pdb",  # adenylate kinase 4AKE (crystal coordinates, hydrogens added)
)
# Files that look like entries by name but are excluded, with the reason (documentation and
# a guard if the package adds more).
_EXCLUDED = {
    "1YJP": "7-residue peptide (no chain >= 32 residues)",
    "7ETN": "short peptide (no continuous segment > 4 residues)",
    "5A7U": "cryo-EM nascent chain in the ribosome tunnel: longest continuous segment 27",
}
_DSSP_CHAIN = re.compile(r"^(\d[0-9A-Za-z]{3})([A-Za-z0-9])\.pdb\.gz$")  # e.g. 1ahsA.pdb.gz
_MMCIF_ENTRY = re.compile(r"^(\d[0-9A-Za-z]{3})\.(cif|pdb)(\.gz)?$")  # e.g. 1BD2.cif.gz
_FORMAT_PREFERENCE = {"bcif": 0, "cif": 1, "pdb": 2}  # same entry in two formats: keep best


def mdanalysistests_data_dir() -> Path:
    """The ``data`` folder of the installed ``MDAnalysisTests`` package (not imported)."""
    spec = importlib.util.find_spec("MDAnalysisTests")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default protein structures come from the PyPI package 'mdanalysistests' "
            "(MDAnalysis test data), which is not installed. Install it "
            "(`pip install mdanalysistests`, a dependency of fewstep-protein) or pass your own "
            "structure files: load_fragments(files=[...])."
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"MDAnalysisTests is installed but has no data folder at {data}")
    return data


def _format_of(path: Path) -> str:
    """'pdb', 'cif' or 'bcif' from the suffixes, ignoring a compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _DECOMPRESS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    fmt = _TEXT_FORMATS.get(last) or _BINARY_FORMATS.get(last)
    if fmt is None:
        allowed = sorted({*_TEXT_FORMATS, *_BINARY_FORMATS})
        raise ValueError(
            f"{path.name}: unknown structure format {last or '(no suffix)'!r}; expected one of "
            f"{allowed}, optionally compressed with {sorted(_DECOMPRESS)}"
        )
    return fmt


def _stem(path: Path) -> str:
    """File name without format and compression suffixes: '1ahsA.pdb.gz' -> '1ahsA'."""
    name = path.name
    for _ in range(2):
        suffix = Path(name).suffix.lower()
        if suffix in _DECOMPRESS or suffix in _TEXT_FORMATS or suffix in _BINARY_FORMATS:
            name = name[: -len(suffix)]
    return name


def default_structure_files() -> list[Path]:
    """Real, distinct protein structures shipped inside ``MDAnalysisTests``.

    Selection rule (files are never downloaded):

    - ``data/dssp/<pdb id><chain>.pdb.gz``: single chains of deposited entries used by the
      DSSP tests (``1mr1D_failing`` and ``wrong_hydrogens`` are deliberate test cases and
      do not match the pattern).
    - ``data/mmcif/<pdb id>.{cif,pdb}[.gz]``: whole entries; ``*_short``, ``*_invalid``,
      ``custom`` and ``multimodel_warning`` are test cases and do not match the pattern.
    - a hand-checked list of top-level files that carry a deposited entry's HEADER
      (``_TOP_LEVEL_ENTRIES``); the other top-level files are MD frames (cobrotoxin, adk
      force-field dumps, align*), small molecules, nucleic acids or broken test cases.
    - de-duplication: one file per (PDB id, chain) key — the same entry in .pdb and .cif
      counts once (mmCIF kept); ``_EXCLUDED`` entries (peptides) are dropped.

    MMTF files are not used (biotite >= 1.0 no longer reads MMTF). Returns sorted paths.
    """
    data = mdanalysistests_data_dir()
    best: dict[str, tuple[int, Path]] = {}

    def offer(key: str, path: Path) -> None:
        if key[:4].upper() in _EXCLUDED or not path.is_file():
            return
        rank = _FORMAT_PREFERENCE[_format_of(path)]
        if key not in best or rank < best[key][0]:
            best[key] = (rank, path)

    for path in sorted((data / "dssp").glob("*.pdb.gz")):
        m = _DSSP_CHAIN.match(path.name)
        if m:
            offer(f"{m.group(1).upper()}{m.group(2)}", path)
    for path in sorted((data / "mmcif").iterdir()) if (data / "mmcif").is_dir() else []:
        m = _MMCIF_ENTRY.match(path.name)
        if m:
            offer(m.group(1).upper(), path)
    for name in _TOP_LEVEL_ENTRIES:
        stem = _stem(Path(name))
        key = "4AKE" if stem == "adk_open" else stem.upper()
        offer(key, data / name)
    # A whole entry supersedes a single-chain file of the same entry.
    entries = {k for k in best if len(k) == 4}
    files = [p for k, (_, p) in best.items() if len(k) == 4 or k[:4] not in entries]
    return sorted(files)


# --------------------------------------------------------------------------------------------
# Reading


def read_structure(path: str | Path):
    """First model of a PDB / mmCIF / BinaryCIF file (optionally .gz/.bz2/.xz) as a biotite
    ``AtomArray``; altloc 'first'. Compressed files are decompressed in memory.

    Raises ``ValueError`` naming the file for an unknown suffix or unparsable content."""
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    path = Path(path)
    fmt = _format_of(path)
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix in _DECOMPRESS:
        raw = _DECOMPRESS[suffix](raw)
    with warnings.catch_warnings():
        # "N elements were guessed from atom name": harmless for backbone atoms.
        warnings.simplefilter("ignore", UserWarning)
        if fmt == "pdb":
            text = io.StringIO(raw.decode("latin-1"))
            atoms = pdb.get_structure(pdb.PDBFile.read(text), model=1, altloc="first")
        elif fmt == "cif":
            cif = pdbx.CIFFile.read(io.StringIO(raw.decode("latin-1")))
            atoms = pdbx.get_structure(cif, model=1, altloc="first")
        else:
            atoms = pdbx.get_structure(pdbx.BinaryCIFFile.read(io.BytesIO(raw)), model=1)
    if atoms.array_length() == 0:
        raise ValueError(f"{path.name}: no atoms")
    return atoms


def _residue_table(atoms) -> dict[str, np.ndarray]:
    """Per-residue arrays from an amino-acid AtomArray.

    Returns backbone (R, 4, 3) with NaN for missing atoms, chain_id, res_id, ins_code,
    res_name (R,)."""
    import biotite.structure as struc

    starts = struc.get_residue_starts(atoms)
    res_of_atom = np.searchsorted(starts, np.arange(atoms.array_length()), side="right") - 1
    backbone = np.full((len(starts), 4, 3), np.nan, dtype=np.float64)
    for k, name in enumerate(BACKBONE_ATOMS):
        sel = np.flatnonzero(atoms.atom_name == name)
        # Keep the first atom of that name per residue (duplicates: later ones dropped).
        res, first = np.unique(res_of_atom[sel], return_index=True)
        backbone[res, k] = atoms.coord[sel[first]]
    return {
        "backbone": backbone,
        "chain_id": atoms.chain_id[starts],
        "res_id": atoms.res_id[starts],
        "ins_code": atoms.ins_code[starts],
        "res_name": atoms.res_name[starts],
    }


def _one_letter(res_names: Iterable[str]) -> str:
    from biotite.sequence import ProteinSequence

    out = []
    for name in res_names:
        name = _MODIFIED_TO_CANONICAL.get(name, name)
        try:
            out.append(ProteinSequence.convert_letter_3to1(name))
        except KeyError:
            out.append("X")
    return "".join(out)


def _segment_breaks(table: dict[str, np.ndarray], max_gap: float, max_ca_ca: float) -> np.ndarray:
    """Bool (R-1,): True where residue i and i+1 must not be in the same segment.

    A break is a chain change, a residue-number jump (not +0 with insertion code or +1), a
    peptide bond C(i)–N(i+1) longer than ``max_gap`` Å, or CA(i)–CA(i+1) above ``max_ca_ca`` Å
    (a trans peptide gives 3.80 Å, cis 2.9 Å)."""
    bb = table["backbone"]
    chain_change = table["chain_id"][1:] != table["chain_id"][:-1]
    step = np.diff(table["res_id"].astype(np.int64))
    number_gap = (step != 0) & (step != 1)
    peptide = np.linalg.norm(bb[1:, 0] - bb[:-1, 2], axis=-1)
    ca_ca = np.linalg.norm(bb[1:, 1] - bb[:-1, 1], axis=-1)
    with np.errstate(invalid="ignore"):
        geometric = ~(peptide <= max_gap) | ~(ca_ca <= max_ca_ca)  # NaN (missing) breaks too
    return chain_change | number_gap | geometric


def chains_from_atoms(
    atoms, stem: str, min_length: int = 32, max_gap: float = 2.0, max_ca_ca: float = 4.2
) -> tuple[list[Chain], str | None]:
    """Continuous protein segments of one AtomArray; (chains, reason if none)."""
    import biotite.structure as struc

    is_aa = struc.filter_canonical_amino_acids(atoms) | np.isin(
        atoms.res_name, list(_MODIFIED_TO_CANONICAL)
    )
    atoms = atoms[is_aa]
    if atoms.array_length() == 0:
        return [], "no standard amino-acid residues"
    table = _residue_table(atoms)
    complete = ~np.isnan(table["backbone"]).any(axis=(1, 2))
    if not complete.any():
        return [], "no residue has all of N, CA, C, O (CA-only or atom-incomplete file)"
    table = {k: v[complete] for k, v in table.items()}
    cuts = np.flatnonzero(_segment_breaks(table, max_gap, max_ca_ca)) + 1
    bounds = np.concatenate([[0], cuts, [len(table["res_id"])]])
    segments = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a >= min_length]
    if not segments:
        longest = int(np.max(np.diff(bounds)))
        return [], f"no continuous segment of >= {min_length} residues (longest {longest})"
    per_chain: dict[str, int] = {}
    chains = []
    for a, b in segments:
        cid = str(table["chain_id"][a]) or "_"
        k = per_chain.get(cid, 0)
        per_chain[cid] = k + 1
        chains.append(
            Chain(
                name=f"{stem}_{cid}" if k == 0 else f"{stem}_{cid}_{k}",
                backbone=table["backbone"][a:b].astype(np.float32),
                sequence=_one_letter(table["res_name"][a:b]),
                res_ids=table["res_id"][a:b].astype(np.int64),
            )
        )
    return chains, None


def read_chains(
    paths: Iterable[str | Path],
    min_length: int = 32,
    max_gap: float = 2.0,
    max_ca_ca: float = 4.2,
) -> tuple[list[Chain], dict[str, str]]:
    """Read structure files into continuous backbone segments.

    Per file: first model, altloc 'first', canonical amino acids (+ MSE as MET), split by
    chain and at every break (chain change, residue-number jump, C–N peptide bond >
    ``max_gap`` Å, CA–CA > ``max_ca_ca`` Å); residues missing any of N/CA/C/O are dropped and
    split there. Segments shorter than ``min_length`` are dropped.

    Returns (chains, skipped) where skipped maps a file name to why it gave no chain
    (unreadable, CA-only, too short). Never raises for a bad file; logs one summary line.
    """
    if min_length < 2:
        raise ValueError(f"min_length must be >= 2 residues, got {min_length}")
    paths = [Path(p) for p in paths]
    chains: list[Chain] = []
    skipped: dict[str, str] = {}
    for path in paths:
        try:
            atoms = read_structure(path)
        except Exception as exc:  # noqa: BLE001 — any parser failure means "unreadable"
            skipped[path.name] = f"unreadable: {type(exc).__name__}: {exc}"[:300]
            continue
        try:
            found, reason = chains_from_atoms(atoms, _stem(path), min_length, max_gap, max_ca_ca)
        except Exception as exc:  # noqa: BLE001 — malformed annotations in an odd file
            found, reason = [], f"unusable: {type(exc).__name__}: {exc}"[:300]
        if reason is not None:
            skipped[path.name] = reason
        chains.extend(found)
    level = logging.WARNING if skipped else logging.INFO
    log.log(
        level,
        "read %d chains; skipped %d of %d files%s",
        len(chains),
        len(skipped),
        len(paths),
        (": " + ", ".join(sorted(skipped))) if skipped else "",
    )
    return chains, skipped


# --------------------------------------------------------------------------------------------
# Fragments


def _windows(chains: Sequence[Chain], length: int, stride: int) -> tuple[np.ndarray, list[str]]:
    if length < 2 or stride < 1:
        raise ValueError(f"need length >= 2 and stride >= 1, got length={length} stride={stride}")
    out, sources = [], []
    for chain in chains:
        ca = chain.backbone[:, 1]
        for start in range(0, len(ca) - length + 1, stride):
            out.append(ca[start : start + length])
            sources.append(f"{chain.name}@{start}")
    if not out:
        return np.zeros((0, length, 3), np.float32), []
    return np.stack(out).astype(np.float32), sources


def fragments(chains: Sequence[Chain], length: int, stride: int) -> np.ndarray:
    """(N, length, 3) float32 CA windows in Å (not centred), starting every ``stride`` residues
    of each chain; chains shorter than ``length`` give none."""
    return _windows(chains, length, stride)[0]


def load_fragments(
    length: int = 64,
    stride: int = 16,
    files: Sequence[str | Path] | None = None,
    min_length: int | None = None,
    cache: bool = True,
) -> FragmentSet:
    """CA fragments of real structures, cached under ``cache_root()/"protein"``.

    ``files`` defaults to :func:`default_structure_files`; ``min_length`` (default ``length``)
    is passed to :func:`read_chains`. The cache key covers the files' names and sizes, length,
    stride, min_length and the reader version; entries are safetensors + JSON."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from fewstep.core.cache import cache_key, cache_root
    from fewstep.core.io import atomic_write_bytes, atomic_write_json

    files = [Path(f) for f in (default_structure_files() if files is None else files)]
    if not files:
        raise ValueError("load_fragments: no structure files given")
    min_length = length if min_length is None else min_length
    spec = {
        "files": [(f.name, f.stat().st_size if f.exists() else -1) for f in files],
        "length": length,
        "stride": stride,
        "min_length": min_length,
        "reader": _READER_VERSION,
    }
    folder = cache_root() / "protein"
    key = cache_key(spec)
    weights, meta = folder / f"fragments-{key}.safetensors", folder / f"fragments-{key}.json"
    if cache and weights.exists() and meta.exists():
        info = json.loads(meta.read_text())
        ca = st_load(weights.read_bytes())["ca"]
        return FragmentSet(ca, info["sources"], info["chains"], info["skipped"])
    chains, skipped = read_chains(files, min_length=min_length)
    ca, sources = _windows(chains, length, stride)
    result = FragmentSet(torch.from_numpy(ca), sources, len(chains), skipped)
    if cache:
        atomic_write_bytes(weights, st_save({"ca": result.ca.contiguous()}))
        atomic_write_json(
            meta, {"spec": spec, "sources": sources, "chains": len(chains), "skipped": skipped}
        )
    log.info("%d fragments of length %d from %d chains", len(sources), length, len(chains))
    return result
