"""Teacher refinement (``fewstep.protein.refine``): the plausibility filter agrees with the
metrics it stands for, the refinement set mixes kept samples and real fragments in the asked
proportion, and fine-tuning starts from the teacher's weights and is cached."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fewstep.protein.metrics import ca_ca_deviation, clash_rate
from fewstep.protein.model import BackboneTransformerConfig, build_denoiser
from fewstep.protein.refine import (
    RefineConfig,
    load_refined_teacher,
    plausible,
    refine_teacher,
    refinement_set,
)
from fewstep.protein.teacher import TeacherConfig

NET = BackboneTransformerConfig(dim=16, pair_dim=8, heads=2, layers=1, cond_dim=16, rbf_bins=8)
TINY = RefineConfig(samples=8, sample_steps=2, steps=2, batch_size=4, warmup_steps=0)


def helix(n: int = 16) -> torch.Tensor:
    """An ideal CA helix (3.6 residues per turn, 1.5 Å rise, radius 2.3 Å): bonds 3.8 Å."""
    i = torch.arange(n, dtype=torch.float64)
    ang = i * 2 * torch.pi / 3.6
    return torch.stack([2.3 * ang.cos(), 2.3 * ang.sin(), 1.5 * i], -1).float()


def test_filter_matches_the_metrics():
    good = helix()
    assert ca_ca_deviation([good.numpy()])["ca_ca_frac_outside"] == 0
    assert clash_rate([good.numpy()])["clash_rate"] == 0
    clashing = good.clone()
    clashing[10] = clashing[2] + 0.5  # residues 2 and 10 collide (bonds around 10 break too)
    stretched = good * 1.3  # every bond 4.9 Å
    mask = plausible(torch.stack([good, clashing, stretched]))
    assert mask.tolist() == [True, False, False]
    assert clash_rate([clashing.numpy()])["clash_rate"] == 1
    # a single bad bond out of 15 is tolerated at 0.1, not at 0.05
    one_bad = good.clone()
    one_bad[15] = one_bad[14] + (one_bad[15] - one_bad[14]) * 1.2
    assert plausible(one_bad[None], max_bond_outliers=0.1).item()
    assert not plausible(one_bad[None], max_bond_outliers=0.05).item()
    with pytest.raises(ValueError, match=r"\(N, L, 3\)"):
        plausible(good)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="real_fraction"):
        RefineConfig(real_fraction=1.0)
    with pytest.raises(ValueError, match="steps"):
        RefineConfig(steps=0)


def test_refinement_set_mixes_kept_samples_and_real_fragments(monkeypatch):
    import fewstep.protein.refine as refine

    real = torch.stack([helix() + k for k in range(20)])
    teacher = build_denoiser(NET).eval()
    # an untrained net's samples are implausible: make the filter keep the first 3
    monkeypatch.setattr(refine, "plausible", lambda x, *a: torch.arange(len(x)) < 3)
    data, info = refinement_set(teacher, dataclasses.replace(TINY, real_fraction=0.5), real)
    assert info["kept"] == 3 and info["real"] == 3 and len(data) == 6
    data, info = refinement_set(teacher, dataclasses.replace(TINY, real_fraction=0.75), real)
    assert info["real"] == 9 and len(data) == 12
    monkeypatch.setattr(refine, "plausible", lambda x, *a: torch.zeros(len(x), dtype=torch.bool))
    with pytest.raises(ValueError, match="none of the teacher's 8 samples"):
        refinement_set(teacher, TINY, real)


def test_fine_tuning_starts_from_the_teacher_and_is_cached(tmp_path, monkeypatch):
    import fewstep.protein.refine as refine

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    monkeypatch.setattr(refine, "plausible", lambda x, *a: torch.ones(len(x), dtype=torch.bool))
    tcfg = TeacherConfig(length=16, stride=16, steps=2, batch_size=4, model=NET)
    real = torch.stack([helix() + k for k in range(8)])
    teacher = build_denoiser(NET, seed=3).eval()
    # zero learning rate: the result is the teacher's weights (not a fresh initialisation)
    same, _ = refine_teacher(teacher, tcfg, dataclasses.replace(TINY, lr=0.0), real)
    for a, b in zip(same.state_dict().values(), teacher.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    moved, info = refine_teacher(teacher, tcfg, dataclasses.replace(TINY, lr=1e-2), real)
    assert info["kept"] == 8 and info["real"] == 0  # default: no real fragments mixed in
    assert any(
        not torch.equal(a, b)
        for a, b in zip(moved.state_dict().values(), teacher.state_dict().values(), strict=True)
    )
    first, info1 = load_refined_teacher(tcfg, TINY)
    second, info2 = load_refined_teacher(tcfg, TINY)
    assert not info1["cached"] and info2["cached"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
