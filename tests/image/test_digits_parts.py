"""Digits data, teacher adapter and classifier."""

from __future__ import annotations

import torch

from fewstep.core.models import DiffusersUNetDenoiser
from fewstep.image.digits import NULL_CLASS, load_digits_tensors, null_labels, split
from fewstep.image.recipes.digits import TeacherConfig
from fewstep.image.teacher import build_teacher, guided


def test_digits_tensors():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    (xtr, _), (xte, _) = split(x, y)
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    assert (null_labels(y) == NULL_CLASS).all()


def test_teacher_is_a_class_conditional_diffusers_unet():
    cfg = TeacherConfig()
    cfg.unet.channels, cfg.unet.norm_groups = (16, 32), 4
    t1, t2 = build_teacher(cfg), build_teacher(cfg)
    assert isinstance(t1, DiffusersUNetDenoiser) and t1.prediction == "velocity"
    for a, b in zip(t1.parameters(), t2.parameters(), strict=True):  # seeded init
        assert torch.equal(a, b)
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        out_a = t1(x, t, torch.tensor([0, 1, 2, 3]))
        out_b = t1(x, t, torch.tensor([4, 5, 6, 7]))
    assert out_a.shape == x.shape
    assert not torch.allclose(out_a, out_b)  # the label reaches the network
    g = guided(t1, 3.0)
    assert g.evals_per_call == 2
    plain = guided(t1, 1.0)  # one evaluation, the teacher's own output
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert plain.evals_per_call == 1 and torch.equal(plain(x, t, labels), out_a)


def test_classifier_learns_digits(cache_dir):
    from fewstep.image.classifier import load_classifier

    clf, info = load_classifier(steps=300)
    assert info["heldout_accuracy"] > 0.9, info
    clf2, info2 = load_classifier(steps=300)  # second call comes from the cache
    for a, b in zip(clf.parameters(), clf2.parameters(), strict=True):
        assert torch.equal(a, b)
    x, y = load_digits_tensors()
    assert clf.features(x[:5]).shape == (5, 64)
    assert list(cache_dir.joinpath("digits-classifier").glob("*.safetensors"))
