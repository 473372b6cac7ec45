"""Designability: can a sequence be designed for a generated backbone that folds back onto it?

Protocol of FrameDiff / Proteina / SiD-protein (self-consistency): for each backbone,
an inverse-folding model (ProteinMPNN, Dauparas et al. 2022, Science 378:49; its CA-only
variant for CA traces) proposes ``num_sequences`` sequences (8, temperature 0.1); a structure
predictor (ESMFold, Lin et al. 2023, Science 379:1123) folds each; scRMSD is the CA RMSD
after superposition between the prediction and the backbone, minimised over the sequences.
A backbone is designable when its scRMSD < 2 Å; designability is the fraction designable.

Both models need weights that fewstep never downloads. Point :class:`DesignabilityConfig`
at local copies (a clone of github.com/dauparas/ProteinMPNN with its weights; a local
Hugging Face folder of ``facebook/esmfold_v1``). Without them :func:`designability` returns
``{"available": False, "reason": ...}`` and says which weights are missing. Any pair of
callables ``inverse_fold(backbone (L, 4, 3)) -> list[str]`` and ``fold(sequence) -> CA (L, 3)``
plugs in instead, directly or through the registries ``INVERSE_FOLDERS`` / ``FOLDERS``.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fewstep.protein.geometry import backbone_from_ca, superposed_rmsd

__all__ = [
    "FOLDERS",
    "INVERSE_FOLDERS",
    "DesignabilityConfig",
    "Fold",
    "InverseFold",
    "WeightsMissing",
    "designability",
    "self_consistency_rmsd",
]

log = logging.getLogger("fewstep.protein")


class InverseFold(Protocol):
    """Backbone (L, 4, 3) N, CA, C, O in Å -> designed one-letter sequences of length L."""

    def __call__(self, backbone: np.ndarray) -> list[str]: ...


class Fold(Protocol):
    """One-letter sequence -> predicted CA coordinates (L, 3) in Å."""

    def __call__(self, sequence: str) -> np.ndarray: ...


class WeightsMissing(RuntimeError):
    """A model of the designability pipeline has no local weights; the message says which."""


@dataclass
class DesignabilityConfig:
    """Where the local models are and how the self-consistency test runs."""

    proteinmpnn_dir: str | None = None  # clone of dauparas/ProteinMPNN (protein_mpnn_run.py)
    esmfold_weights: str | None = None  # local HF folder of facebook/esmfold_v1
    inverse_fold: str = "proteinmpnn"  # key of INVERSE_FOLDERS
    fold: str = "esmfold"  # key of FOLDERS
    num_sequences: int = 8  # sequences designed per backbone (Proteina / FrameDiff use 8)
    sampling_temperature: float = 0.1  # ProteinMPNN sampling temperature
    ca_only: bool = True  # ProteinMPNN CA-only model (generated backbones are CA traces)
    rmsd_threshold: float = 2.0  # scRMSD (Å) below which a backbone is designable
    seed: int = 38  # ProteinMPNN seed
    device: str = "cpu"  # torch device for ESMFold
    work_dir: str | None = None  # scratch folder for ProteinMPNN files (temporary if None)


# --------------------------------------------------------------------------------------------
# ProteinMPNN (subprocess on its own run script, as FrameDiff and Proteina call it)


def _proteinmpnn(cfg: DesignabilityConfig) -> InverseFold:
    if cfg.proteinmpnn_dir is None:
        raise WeightsMissing(
            "ProteinMPNN: DesignabilityConfig.proteinmpnn_dir is None (point it at a local clone "
            "of github.com/dauparas/ProteinMPNN with its ca_model_weights/ folder)"
        )
    root = Path(cfg.proteinmpnn_dir).expanduser()
    script = root / "protein_mpnn_run.py"
    weights = root / ("ca_model_weights" if cfg.ca_only else "vanilla_model_weights")
    if not script.is_file() or not any(weights.glob("*.pt")):
        raise WeightsMissing(
            f"ProteinMPNN: expected {script} and weights {weights}/*.pt; not found"
        )

    def inverse_fold(backbone: np.ndarray) -> list[str]:
        from fewstep.protein.export import write_structure

        with tempfile.TemporaryDirectory(dir=cfg.work_dir) as tmp:
            pdb = write_structure(Path(tmp) / "backbone.pdb", backbone)
            cmd = [
                sys.executable, str(script), "--pdb_path", str(pdb), "--pdb_path_chains", "A",
                "--out_folder", tmp, "--num_seq_per_target", str(cfg.num_sequences),
                "--sampling_temp", str(cfg.sampling_temperature), "--seed", str(cfg.seed),
                "--batch_size", "1",
            ]  # fmt: skip
            if cfg.ca_only:
                cmd.append("--ca_only")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"ProteinMPNN failed: {done.stderr[-500:]}")
            fasta = (Path(tmp) / "seqs" / "backbone.fa").read_text()
        seqs = [block.split("\n", 1)[1].replace("\n", "") for block in fasta.split(">")[1:]]
        return seqs[1:]  # the first record is the input (poly-Gly) sequence

    return inverse_fold


# --------------------------------------------------------------------------------------------
# ESMFold (transformers port, local files only)


def _esmfold(cfg: DesignabilityConfig) -> Fold:
    if cfg.esmfold_weights is None:
        raise WeightsMissing(
            "ESMFold: DesignabilityConfig.esmfold_weights is None (point it at a local "
            "Hugging Face folder of facebook/esmfold_v1: config.json + weights)"
        )
    path = Path(cfg.esmfold_weights).expanduser()
    if not (path / "config.json").is_file():
        raise WeightsMissing(f"ESMFold: no config.json in {path}")
    try:
        from transformers import AutoTokenizer, EsmForProteinFolding
    except ImportError as exc:
        raise WeightsMissing(f"ESMFold needs the 'transformers' package: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = EsmForProteinFolding.from_pretrained(str(path), local_files_only=True)
    model = model.to(cfg.device).eval()

    @torch.no_grad()
    def fold(sequence: str) -> np.ndarray:
        tokens = tokenizer([sequence], return_tensors="pt", add_special_tokens=False)
        out = model(**{k: v.to(cfg.device) for k, v in tokens.items()})
        return out.positions[-1, 0, :, 1].float().cpu().numpy()  # atom37 index 1 = CA

    return fold


# name -> factory(cfg) raising WeightsMissing when its weights are absent
INVERSE_FOLDERS: dict[str, Callable[[DesignabilityConfig], InverseFold]] = {
    "proteinmpnn": _proteinmpnn,
}
FOLDERS: dict[str, Callable[[DesignabilityConfig], Fold]] = {"esmfold": _esmfold}


# --------------------------------------------------------------------------------------------
# The pipeline


def self_consistency_rmsd(
    ca: np.ndarray, inverse_fold: InverseFold, fold: Fold
) -> tuple[float, list[float]]:
    """scRMSD of one CA trace (L, 3): min over designed sequences of the superposed CA RMSD
    between fold(sequence) and the trace. Returns (min, all)."""
    backbone = backbone_from_ca(ca)
    seqs = inverse_fold(backbone)
    if not seqs:
        raise RuntimeError("inverse_fold returned no sequence")
    values = []
    for seq in seqs:
        pred = np.asarray(fold(seq), dtype=np.float64)
        if pred.shape != ca.shape:
            raise ValueError(f"fold returned shape {pred.shape} for a backbone of {ca.shape}")
        values.append(float(superposed_rmsd(pred, ca)))
    return min(values), values


def _resolve(cfg: DesignabilityConfig, inverse_fold, fold) -> tuple[InverseFold, Fold]:
    for key, registry in ((cfg.inverse_fold, INVERSE_FOLDERS), (cfg.fold, FOLDERS)):
        if key not in registry:
            raise ValueError(f"unknown designability model {key!r}; known: {sorted(registry)}")
    missing = []
    if inverse_fold is None:
        try:
            inverse_fold = INVERSE_FOLDERS[cfg.inverse_fold](cfg)
        except WeightsMissing as exc:
            missing.append(str(exc))
    if fold is None:
        try:
            fold = FOLDERS[cfg.fold](cfg)
        except WeightsMissing as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsMissing("; ".join(missing))
    return inverse_fold, fold


def designability(
    samples,
    cfg: DesignabilityConfig | None = None,
    inverse_fold: InverseFold | None = None,
    fold: Fold | None = None,
) -> dict:
    """Fraction of CA backbones (B, L, 3) or list of (L, 3) whose scRMSD < threshold.

    ``inverse_fold`` / ``fold`` override the registry models. Returns ``{"available": False,
    "reason"}`` when a model's weights are absent, else ``available``, ``designability``,
    ``sc_rmsd_mean``, ``sc_rmsd_median``, ``n_samples`` and the per-sample ``sc_rmsd`` list."""
    from fewstep.protein.metrics import _as_list

    cfg = cfg or DesignabilityConfig()
    try:
        inverse_fold, fold = _resolve(cfg, inverse_fold, fold)
    except WeightsMissing as exc:
        reason = (
            f"designability not computed: {exc}. When both are present, each backbone gets "
            f"{cfg.num_sequences} ProteinMPNN sequences (T={cfg.sampling_temperature}), each is "
            f"folded by ESMFold, and the backbone counts as designable if the best CA RMSD "
            f"after superposition is < {cfg.rmsd_threshold} Å."
        )
        log.warning(reason)
        return {"available": False, "reason": reason}
    sc = np.array([self_consistency_rmsd(x, inverse_fold, fold)[0] for x in _as_list(samples)])
    return {
        "available": True,
        "designability": float((sc < cfg.rmsd_threshold).mean()),
        "sc_rmsd_mean": float(sc.mean()),
        "sc_rmsd_median": float(np.median(sc)) if sc.size else math.nan,
        "n_samples": int(sc.size),
        "sc_rmsd": [float(v) for v in sc],
    }
