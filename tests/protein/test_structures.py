"""Reading real structures (biotite) into continuous backbone segments and CA fragments."""

from __future__ import annotations

import io
import re

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np
import pytest
import torch

from fewstep.core.cache import cache_root
from fewstep.protein import structures as st

FEW = ("dssp/1ahsA.pdb.gz", "mmcif/5PTI.cif.gz")


@pytest.fixture(scope="session")
def data_dir():
    return st.mdanalysistests_data_dir()


@pytest.fixture(scope="session")
def few_chains(data_dir):
    return st.read_chains([data_dir / f for f in FEW], min_length=32)


@pytest.fixture(scope="session")
def atoms_1ahs(data_dir):
    """Amino-acid atoms of one real chain (first model, altloc first)."""
    atoms = st.read_structure(data_dir / "dssp/1ahsA.pdb.gz")
    return atoms[struc.filter_canonical_amino_acids(atoms)]


def _write_pdb(atoms, path):
    f = pdb.PDBFile()
    f.set_structure(atoms)
    f.write(str(path))
    return path


def test_default_files_are_distinct_real_entries(data_dir):
    files = st.default_structure_files()
    assert files == sorted(files) and len(files) >= 50
    ids = [st._stem(f)[:4].upper() + st._stem(f)[4:] for f in files]
    assert len(set(ids)) == len(ids)
    names = {f.name for f in files}
    # the same entry as .pdb and .cif counts once (the mmCIF is kept)
    assert "1BD2.cif.gz" in names and "1BD2.pdb.gz" not in names
    # deliberately broken files, MD frames and peptides are not used
    bad = {"1mr1D_failing.pdb.gz", "wrong_hydrogens.pdb.gz", "cobrotoxin.pdb", "1YJP.cif"}
    bad |= {"1YJP_invalid.cif.gz", "1BD2_short.cif.gz", "adk_oplsaa.pdb", "adk_closed.pdb"}
    assert not bad & names
    assert all(f.is_file() and str(f).startswith(str(data_dir)) for f in files)


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(st.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="mdanalysistests"):
        st.default_structure_files()


def test_full_default_set_chains_and_fragments():
    """The one test that reads every default file (~10 s); it uses the user cache
    (FEWSTEP_CACHE or ~/.cache/fewstep), so later runs load the safetensors entry. The cache
    key holds the reader version and the files' names and sizes."""
    frags = st.load_fragments(length=64, stride=16, min_length=32)
    # measured: 61 files -> 100 chain segments -> 489 fragments, nothing skipped
    assert frags.chains >= 90
    assert len(frags) >= 450 and frags.ca.shape[1:] == (64, 3)
    assert frags.skipped == {}
    assert frags.ca.dtype == torch.float32 and len(frags.sources) == len(frags)
    assert len(set(frags.sources)) == len(frags.sources)
    bonds = (frags.ca[:, 1:] - frags.ca[:, :-1]).norm(dim=-1)
    assert bonds.max() < 4.2 and bonds.min() > 2.7  # cis peptides are ~2.9 Å
    again = st.load_fragments(length=64, stride=16, min_length=32)  # from the cache
    assert torch.equal(again.ca, frags.ca) and again.sources == frags.sources
    assert again.chains == frags.chains


def test_chains_are_continuous_backbones(few_chains):
    chains, skipped = few_chains
    assert skipped == {}
    assert {c.name.split("_")[0] for c in chains} == {"1ahsA", "5PTI"}
    for c in chains:
        assert c.backbone.dtype == np.float32 and c.backbone.shape == (len(c), 4, 3)
        assert len(c.sequence) == len(c) == len(c.res_ids)
        bb = c.backbone.astype(np.float64)
        # atom order N, CA, C, O: bond lengths of each pair
        assert np.allclose(np.linalg.norm(bb[:, 1] - bb[:, 0], axis=-1), 1.46, atol=0.1)
        assert np.allclose(np.linalg.norm(bb[:, 2] - bb[:, 1], axis=-1), 1.52, atol=0.1)
        assert np.allclose(np.linalg.norm(bb[:, 3] - bb[:, 2], axis=-1), 1.23, atol=0.1)
        assert np.linalg.norm(bb[1:, 0] - bb[:-1, 2], axis=-1).max() <= 2.0
        assert np.linalg.norm(np.diff(bb[:, 1], axis=0), axis=-1).max() < 4.2
        assert np.all(np.diff(c.res_ids) >= 0) and np.all(np.diff(c.res_ids) <= 1)
    bpti = next(c for c in chains if c.name.startswith("5PTI"))
    assert bpti.sequence.startswith("RPDFCLEPPYTGPCKARIIRYFYNAK")  # BPTI


def test_binary_cif_is_read(tmp_path, data_dir, few_chains):
    cif = pdbx.CIFFile.read(io.StringIO(st.gzip.decompress(
        (data_dir / "mmcif/5PTI.cif.gz").read_bytes()).decode()))  # fmt: skip
    atoms = pdbx.get_structure(cif, model=1)
    bcif = pdbx.BinaryCIFFile()
    pdbx.set_structure(bcif, atoms)
    path = tmp_path / "5PTI.bcif"
    bcif.write(str(path))
    chains, skipped = st.read_chains([path])
    ref = next(c for c in few_chains[0] if c.name.startswith("5PTI"))
    assert skipped == {} and len(chains) == 1
    np.testing.assert_allclose(chains[0].backbone, ref.backbone, atol=1e-3)


def test_bad_files_are_named_and_skipped(tmp_path, atoms_1ahs, data_dir, caplog):
    rng = np.random.default_rng(0)
    garbage_pdb = tmp_path / "garbage.pdb"
    garbage_pdb.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    garbage_cif = tmp_path / "garbage.cif.gz"
    garbage_cif.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    ca_only = _write_pdb(atoms_1ahs[atoms_1ahs.atom_name == "CA"], tmp_path / "ca_only.pdb")
    odd = tmp_path / "notes.txt"
    odd.write_text("hello")
    files = [garbage_pdb, data_dir / FEW[0], garbage_cif, ca_only, odd]
    with caplog.at_level("INFO", logger="fewstep.protein"):
        chains, skipped = st.read_chains(files)
    assert len(chains) == 1 and chains[0].name == "1ahsA_A"
    assert set(skipped) == {"garbage.pdb", "garbage.cif.gz", "ca_only.pdb", "notes.txt"}
    assert "CA-only" in skipped["ca_only.pdb"]
    assert "unknown structure format" in skipped["notes.txt"]
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "skipped 4 of 5 files" in summary[0]


def test_chain_breaks_split_segments(tmp_path, atoms_1ahs):
    res_ids = atoms_1ahs.res_id
    first, last = res_ids.min(), res_ids.max()
    # 1) missing residues: a residue-number gap with a real spatial gap
    gap = atoms_1ahs[(res_ids < first + 50) | (res_ids > first + 53)]
    chains, _ = st.read_chains([_write_pdb(gap, tmp_path / "gap.pdb")], min_length=10)
    assert [len(c) for c in chains] == [50, last - first + 1 - 54]
    assert chains[0].name == "gap_A" and chains[1].name == "gap_A_1"
    # 2) continuous numbering but the second half moved 6 Å away: a geometric break only
    moved = atoms_1ahs.copy()
    moved.coord[moved.res_id >= first + 60] += np.array([6.0, 0.0, 0.0])
    chains, _ = st.read_chains([_write_pdb(moved, tmp_path / "moved.pdb")], min_length=10)
    assert [len(c) for c in chains] == [60, last - first + 1 - 60]
    # 3) an atom-incomplete residue (its O deleted) is dropped and splits there
    no_o = atoms_1ahs[~((atoms_1ahs.res_id == first + 40) & (atoms_1ahs.atom_name == "O"))]
    chains, _ = st.read_chains([_write_pdb(no_o, tmp_path / "no_o.pdb")], min_length=10)
    assert [len(c) for c in chains] == [40, last - first - 40]
    # short pieces fall under min_length
    chains, skipped = st.read_chains([tmp_path / "gap.pdb"], min_length=100)
    assert chains == [] and "no continuous segment" in skipped["gap.pdb"]


def test_fragments_are_windows_of_the_chains(few_chains):
    chains = few_chains[0]
    frags = st.fragments(chains, length=32, stride=10)
    expected = sum((len(c) - 32) // 10 + 1 for c in chains)
    assert frags.shape == (expected, 32, 3) and frags.dtype == np.float32
    np.testing.assert_array_equal(frags[0], chains[0].ca[:32])
    np.testing.assert_array_equal(frags[1], chains[0].ca[10:42])
    assert st.fragments(chains, length=1000, stride=1).shape == (0, 1000, 3)
    with pytest.raises(ValueError, match="stride"):
        st.fragments(chains, length=32, stride=0)
    with pytest.raises(ValueError, match="min_length"):
        st.read_chains([], min_length=1)


def test_load_fragments_cache_key_follows_settings(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    files = [data_dir / FEW[0]]
    a = st.load_fragments(length=32, stride=8, files=files)
    b = st.load_fragments(length=32, stride=16, files=files)
    assert len(a) > len(b) > 0
    assert len(list((cache_root() / "protein").glob("fragments-*.json"))) == 2
    assert len(list((tmp_path / "protein").glob("fragments-*.safetensors"))) == 2
    again = st.load_fragments(length=32, stride=8, files=files)
    assert torch.equal(again.ca, a.ca) and again.sources == a.sources
    assert all(re.fullmatch(r"1ahsA_A@\d+", s) for s in a.sources)
    assert a.chains == 1 and a.length == 32
