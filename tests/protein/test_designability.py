"""Designability pipeline: absent weights are reported; fake models check the arithmetic."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from fewstep.protein import designability as d
from fewstep.protein import geometry as g


@pytest.fixture(scope="session")
def samples():
    gen = torch.Generator().manual_seed(0)
    helix = torch.as_tensor(g.ideal_helix(40))
    strand = torch.as_tensor(g.ideal_strand(40))
    wobbly = helix + 0.3 * torch.randn(40, 3, generator=gen)
    return torch.stack([helix, strand, wobbly])


class Oracle:
    """inverse_fold encodes which backbone it saw; fold returns that backbone (perfect)."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def inverse_fold(self, backbone):
        assert backbone.shape[1:] == (4, 3)  # the full backbone reaches the inverse folder
        self.seen.append(backbone[:, 1].copy())
        k = len(self.seen) - 1
        return [f"{k}:" + "A" * (len(backbone) - len(str(k)) - 1)] * 3

    def fold(self, sequence):
        return self.seen[int(sequence.split(":")[0])]


def test_absent_weights_are_reported(samples, caplog):
    with caplog.at_level("WARNING", logger="fewstep.protein"):
        out = d.designability(samples, d.DesignabilityConfig())
    assert out["available"] is False
    assert "ProteinMPNN" in out["reason"] and "ESMFold" in out["reason"]
    assert "scRMSD" not in out and "< 2.0" in out["reason"]
    assert any("designability not computed" in r.getMessage() for r in caplog.records)


def test_missing_paths_are_named(samples, tmp_path):
    cfg = d.DesignabilityConfig(
        proteinmpnn_dir=str(tmp_path / "nope"), esmfold_weights=str(tmp_path / "esm")
    )
    out = d.designability(samples, cfg)
    assert not out["available"] and str(tmp_path / "nope") in out["reason"]
    assert "config.json" in out["reason"]


def test_oracle_gives_one_and_random_gives_zero(samples):
    oracle = Oracle()
    out = d.designability(samples, inverse_fold=oracle.inverse_fold, fold=oracle.fold)
    assert out["available"] and out["designability"] == 1.0 and out["n_samples"] == 3
    assert out["sc_rmsd_mean"] < 1e-3
    gen = np.random.default_rng(0)

    def random_fold(sequence):  # a random walk of 3.8 Å steps: unrelated to any backbone
        steps = gen.normal(size=(len(sequence), 3))
        return np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=-1, keepdims=True), axis=0)

    out = d.designability(samples, inverse_fold=oracle.inverse_fold, fold=random_fold)
    assert out["designability"] == 0.0 and min(out["sc_rmsd"]) > 2.0


def test_min_over_sequences_and_threshold(samples):
    """scRMSD is the best of the designed sequences; the threshold decides designable."""
    target = samples[0].numpy().astype(np.float64)
    shift = {"near": 0.5, "farA": 3.0}

    def fold(seq):  # 'near' perturbs every CA by 0.5 Å along alternating directions
        signs = np.where(np.arange(len(target)) % 2 == 0, 1.0, -1.0)[:, None]
        return target + shift[seq[:4]] * signs * np.array([1.0, 0.0, 0.0])

    def inverse_fold(backbone):
        return ["far" + "A" * (len(backbone) - 3), "near" + "A" * (len(backbone) - 4)]

    mini, values = d.self_consistency_rmsd(target, inverse_fold, fold)
    assert mini == min(values) and values[0] > values[1]
    assert d.designability(target[None], inverse_fold=inverse_fold, fold=fold)["designability"] == 1
    strict = d.DesignabilityConfig(rmsd_threshold=mini - 1e-3)
    assert d.designability(target[None], strict, inverse_fold, fold)["designability"] == 0.0


def test_registry_plugs_in_user_models(samples, monkeypatch):
    oracle = Oracle()
    monkeypatch.setitem(d.INVERSE_FOLDERS, "oracle", lambda cfg: oracle.inverse_fold)
    monkeypatch.setitem(d.FOLDERS, "oracle", lambda cfg: oracle.fold)
    cfg = d.DesignabilityConfig(inverse_fold="oracle", fold="oracle")
    assert d.designability(samples, cfg)["designability"] == 1.0
    with pytest.raises(ValueError, match="known:.*esmfold"):
        d.designability(samples, d.DesignabilityConfig(fold="alphafold9"))


def test_proteinmpnn_runner_parses_its_output(tmp_path, samples):
    """A stand-in protein_mpnn_run.py with the real script's arguments and FASTA layout."""
    root = tmp_path / "ProteinMPNN"
    (root / "ca_model_weights").mkdir(parents=True)
    (root / "ca_model_weights" / "v_48_020.pt").write_bytes(b"")
    (root / "protein_mpnn_run.py").write_text(
        textwrap.dedent(
            """
            import argparse, pathlib
            p = argparse.ArgumentParser()
            for a in ("--pdb_path", "--pdb_path_chains", "--out_folder", "--num_seq_per_target",
                      "--sampling_temp", "--seed", "--batch_size"):
                p.add_argument(a)
            p.add_argument("--ca_only", action="store_true")
            a = p.parse_args()
            assert a.ca_only and a.sampling_temp == "0.1"
            lines = open(a.pdb_path).read().splitlines()
            n_res = sum(1 for x in lines if x.startswith("ATOM") and x[12:16].strip() == "CA")
            out = pathlib.Path(a.out_folder) / "seqs"
            out.mkdir(parents=True, exist_ok=True)
            recs = [">backbone, score=1.0\\n" + "G" * n_res]
            for i in range(int(a.num_seq_per_target)):
                recs.append(f">T=0.1, sample={i}\\n" + "ACDE"[i % 4] * n_res)
            (out / "backbone.fa").write_text("\\n".join(recs) + "\\n")
            """
        )
    )
    cfg = d.DesignabilityConfig(proteinmpnn_dir=str(root), num_sequences=3)
    inverse_fold = d.INVERSE_FOLDERS["proteinmpnn"](cfg)
    seqs = inverse_fold(g.backbone_from_ca(samples[0].numpy()))
    assert seqs == ["A" * 40, "C" * 40, "D" * 40]
