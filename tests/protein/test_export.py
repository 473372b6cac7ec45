"""Writing backbones as PDB / mmCIF / BinaryCIF and reading them back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.protein import export as ex
from fewstep.protein import geometry as g
from fewstep.protein import structures as st

# File precision: PDB stores 3 decimals (round-off <= 5e-4 Å); the CIF formats keep float32.
TOLERANCE = {".pdb": 6e-4, ".cif": 1e-5, ".bcif": 1e-5}


@pytest.fixture(scope="session")
def chain():
    chains, _ = st.read_chains([st.mdanalysistests_data_dir() / "mmcif/5PTI.cif.gz"])
    return chains[0]


@pytest.mark.parametrize("suffix", [".pdb", ".cif", ".bcif"])
def test_round_trip(tmp_path, chain, suffix):
    path = ex.write_structure(tmp_path / f"bpti{suffix}", chain.backbone, sequence=chain.sequence)
    atoms = ex.read_back(path)
    assert atoms.array_length() == 4 * len(chain)
    np.testing.assert_allclose(atoms.coord, chain.backbone.reshape(-1, 3), atol=TOLERANCE[suffix])
    assert list(atoms.atom_name[:8]) == ["N", "CA", "C", "O"] * 2
    assert list(atoms.element[:4]) == ["N", "C", "C", "O"]
    assert list(atoms.res_id[::4]) == list(range(1, len(chain) + 1))
    assert atoms.res_name[0] == "ARG" and set(atoms.chain_id) == {"A"}
    # and the reader of the training data sees the same continuous chain
    back, skipped = st.read_chains([path], min_length=2)
    assert skipped == {} and len(back) == 1 and back[0].sequence == chain.sequence
    np.testing.assert_allclose(back[0].backbone, chain.backbone, atol=TOLERANCE[suffix])


def test_ca_only_goes_through_backbone_from_ca(tmp_path, chain):
    ca = torch.as_tensor(chain.ca)
    atoms = ex.read_back(ex.write_structure(tmp_path / "ca.cif", ca))
    expected = g.backbone_from_ca(chain.ca)
    np.testing.assert_allclose(atoms.coord, expected.reshape(-1, 3), atol=1e-5)
    assert set(atoms.res_name) == {"GLY"}  # no side chains modelled


def test_to_atom_array_and_errors(tmp_path, chain):
    atoms = ex.to_atom_array(chain.backbone[:5], sequence="ACDEF", chain_id="B")
    assert list(atoms.res_name[::4]) == ["ALA", "CYS", "ASP", "GLU", "PHE"]
    assert set(atoms.chain_id) == {"B"} and not atoms.hetero.any()
    with pytest.raises(ValueError, match="expected one of"):
        ex.write_structure(tmp_path / "x.xyz", chain.backbone)
    assert not (tmp_path / "x.xyz").exists()
    with pytest.raises(ValueError, match="one file per structure"):
        ex.write_structure(tmp_path / "x.pdb", np.zeros((2, 10, 4, 3)))
    with pytest.raises(ValueError, match="letters"):
        ex.to_atom_array(chain.backbone[:5], sequence="ACD")
    with pytest.raises(ValueError, match="unknown amino-acid letter"):
        ex.to_atom_array(chain.backbone[:2], sequence="A1")
    with pytest.raises(ValueError, match="NaN"):
        ex.to_atom_array(np.full((3, 4, 3), np.nan))
