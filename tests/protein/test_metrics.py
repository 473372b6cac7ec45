"""Offline backbone metrics: each checked on structures whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from fewstep.protein import geometry as g
from fewstep.protein import metrics as m
from fewstep.protein import structures as st


@pytest.fixture(scope="session")
def frags():
    """Fragments (length 48) of two real chains: the 'training set' of these tests."""
    data = st.mdanalysistests_data_dir()
    chains, _ = st.read_chains([data / "dssp/1ahsA.pdb.gz", data / "dssp/3so6A.pdb.gz"])
    ca = st.fragments(chains, length=48, stride=12)
    return st.FragmentSet(torch.from_numpy(ca), [str(i) for i in range(len(ca))], len(chains))


def _trace_with_bond(length: int, bond: float) -> np.ndarray:
    """A helix-shaped trace whose consecutive CA–CA distances all equal ``bond``."""
    return g.ideal_helix(length) * (bond / g.CA_CA)


def test_ca_ca_deviation_uses_380():
    ideal = m.ca_ca_deviation(g.ideal_helix(30)[None])
    assert ideal["ca_ca_mad"] < 1e-5 and ideal["ca_ca_frac_outside"] == 0.0
    short = m.ca_ca_deviation(_trace_with_bond(30, 3.5))
    assert short["ca_ca_mad"] == pytest.approx(0.30, abs=1e-5)
    assert short["ca_ca_frac_outside"] == 1.0
    near = m.ca_ca_deviation([_trace_with_bond(30, 3.9), _trace_with_bond(10, 3.7)])
    assert near["ca_ca_mad"] == pytest.approx(0.10, abs=1e-5)
    assert near["ca_ca_frac_outside"] == 0.0 and near["ca_ca_mean"] == pytest.approx(
        (29 * 3.9 + 9 * 3.7) / 38, abs=1e-5
    )


def test_clash_rate(frags):
    assert m.clash_rate(frags.ca) == {"clash_rate": 0.0, "clashes_per_residue": 0.0}
    collapsed = torch.randn(4, 48, 3, generator=torch.Generator().manual_seed(0))  # ~1 Å ball
    assert m.clash_rate(collapsed)["clash_rate"] == 1.0
    # one structure with exactly one clashing pair (residue 0 and 10), one without
    strand = g.ideal_strand(20).astype(np.float64)
    folded = strand.copy()
    folded[10] = folded[0] + np.array([0.0, 0.0, 2.5])
    out = m.clash_rate([strand, folded])
    assert out["clash_rate"] == 0.5 and out["clashes_per_residue"] == pytest.approx(0.5 / 20)
    # helix i,i+3 CA pairs are 5 Å apart, i,i+2 pairs are excluded by min_separation
    assert m.clash_rate(g.ideal_helix(30)[None])["clash_rate"] == 0.0
    assert m.clash_rate(g.ideal_helix(30)[None], min_separation=2, threshold=5.6)["clash_rate"] == 1


def test_radius_of_gyration_fit():
    assert m.expected_radius_of_gyration(100) == pytest.approx(2.2 * 100**0.38)
    x = g.ideal_strand(50)
    one = m.radius_of_gyration_fit(x[None])
    two = m.radius_of_gyration_fit((2 * x)[None])
    assert two["rg_ratio"] == pytest.approx(2 * one["rg_ratio"], rel=1e-5)
    assert one["rg_mean"] == pytest.approx(float(g.radius_of_gyration(x)), rel=1e-5)
    assert one["rg_ratio"] > 2.0  # an extended strand is far less compact than a fold


def test_sse_composition_of_ideal_elements():
    helix = m.sse_composition(g.ideal_helix(40)[None])
    strand = m.sse_composition(g.ideal_strand(40)[None])
    assert helix["helix"] > 0.85 and helix["strand"] == 0.0
    assert strand["strand"] > 0.85 and strand["helix"] == 0.0
    both = m.sse_composition([g.ideal_helix(40), g.ideal_strand(40)])
    assert sum(both.values()) == pytest.approx(1.0)
    assert both["helix"] == pytest.approx((helix["helix"] + strand["helix"]) / 2)
    assert m.sse_distance(helix, helix) == 0.0
    assert (
        m.sse_distance({"helix": 1, "strand": 0, "coil": 0}, {"helix": 0, "strand": 1, "coil": 0})
        == 1
    )
    assert m.sse_distance(helix, strand) > 0.7


def test_rmsd_matrix_matches_biotite(frags):
    a, b = frags.ca[:4].numpy(), frags.ca[3:9].numpy()
    fast = m.rmsd_matrix(a, b)
    slow = np.array([[g.superposed_rmsd(y, x) for y in b] for x in a])
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    assert fast[3, 0] < 1e-3  # the shared fragment
    mirrored = a[:1] * np.array([1.0, 1.0, -1.0])
    assert m.rmsd_matrix(mirrored, a[:1])[0, 0] > 1.0  # no reflections


def test_diversity(frags):
    x = frags.ca[0].numpy()
    rots = Rotation.random(5, random_state=2).as_matrix()
    copies = np.stack([x @ r.T + 3.0 * i for i, r in enumerate(rots)])
    same = m.pairwise_diversity(copies, use_tm=False)
    assert same["pairwise_rmsd"] < 1e-3 and same["clusters_rmsd"] == 1.0
    mixed = m.pairwise_diversity(
        [g.ideal_helix(48), g.ideal_helix(48), g.ideal_strand(48), g.ideal_strand(30)],
        use_tm=False,
    )
    assert mixed["clusters_rmsd"] == 3.0 and mixed["pairwise_rmsd"] > 5.0  # two 48-pairs
    assert "pairwise_tm" not in mixed
    real = m.pairwise_diversity(frags.ca, use_tm=False)
    assert real["cluster_frac_rmsd"] > 0.5


def test_diversity_tm_branch(frags):
    pytest.importorskip("tmtools")  # the optional TM-align bindings (pip install tmtools)
    out = m.pairwise_diversity(frags.ca[:4], use_tm=True)
    assert 0.0 < out["pairwise_tm"] <= 1.0 and out["clusters_tm"] >= 1


def test_novelty(frags):
    own = m.novelty(frags.ca[:3], frags)
    assert own["novelty_rmsd"] < 1e-3 and own["novel_frac"] == 0.0
    rot = torch.as_tensor(Rotation.random(random_state=3).as_matrix(), dtype=torch.float32)
    moved = m.novelty(frags.ca[:3] @ rot.T + 20.0, frags.ca)
    assert moved["novelty_rmsd"] < 1e-3
    noise = torch.randn(3, 48, 3, generator=torch.Generator().manual_seed(1)) * 8
    far = m.novelty(noise, frags)
    assert far["novel_frac"] == 1.0 and far["novelty_rmsd"] > 2.0
    other = m.novelty([g.ideal_helix(20)], frags)
    assert other["novelty_unmatched"] == 1.0 and np.isnan(other["novelty_rmsd"])
    a = m.novelty(noise, frags, max_reference=5, seed=0)
    assert a == m.novelty(noise, frags, max_reference=5, seed=0)
    assert a["novelty_rmsd"] >= far["novelty_rmsd"]  # fewer references: never closer


def test_evaluate_backbones_is_json_and_complete(frags):
    samples = torch.cat([frags.ca[:2], torch.as_tensor(g.ideal_helix(48))[None]])
    out = m.evaluate_backbones(samples, frags, use_tm=False)
    json.dumps(out)
    keys = {"ca_ca_mad", "ca_ca_frac_outside", "clash_rate", "clashes_per_residue", "rg_ratio",
            "ref_rg_ratio", "helix", "strand", "coil", "ref_helix", "sse_tv", "pairwise_rmsd",
            "clusters_rmsd", "novelty_rmsd", "novel_frac", "n_samples"}  # fmt: skip
    assert keys <= set(out) and all(isinstance(v, float) for v in out.values())
    assert out["n_samples"] == 3.0 and out["novel_frac"] == pytest.approx(1 / 3)
    same = m.evaluate_backbones(frags.ca, frags.ca, use_tm=False)
    assert same["sse_tv"] < 1e-9 and same["novelty_rmsd"] < 1e-3


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(B, L, 3\)"):
        m.ca_ca_deviation(np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="sample 1"):
        m.clash_rate([np.zeros((5, 3)), np.zeros((5, 2))])
    with pytest.raises(ValueError, match="finite"):
        m.clash_rate([np.full((5, 3), np.nan)])
    with pytest.raises(ValueError, match="reference"):
        m.novelty(np.zeros((1, 5, 3)), np.zeros((5, 3)))
    with pytest.raises(TypeError):
        m.ca_ca_deviation("not coordinates")
