"""Fair representation + distilled generator: the losses against plain references, that the
fairness terms remove the protected attribute from the latent, that the generator is being
optimised, and `fewstep distill data-fair` end to end at toy scale."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli
from fewstep.dataset_distill.fair.data import Encoding, biased_table
from fewstep.dataset_distill.fair.fair_repr import (
    FairReprConfig,
    GeneratorConfig,
    distance_covariance,
    distill_generator,
    generate_table,
    grad_reverse,
    latent_leakage,
    mmd2,
    train_fair_representation,
)
from fewstep.dataset_distill.fair.metrics import data_gap

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradient_reversal():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_reverse(x, 3.0)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0])).sum().backward()
    assert x.grad.tolist() == [-3.0, -6.0]


def _dcov_reference(z, s):
    n = z.shape[0]
    a = [[float((z[i] - z[j]).norm()) for j in range(n)] for i in range(n)]
    b = [[abs(float(s[i] - s[j])) for j in range(n)] for i in range(n)]

    def centre(m):
        rows = [sum(r) / n for r in m]
        cols = [sum(m[i][j] for i in range(n)) / n for j in range(n)]
        tot = sum(rows) / n
        return [[m[i][j] - rows[i] - cols[j] + tot for j in range(n)] for i in range(n)]

    ca, cb = centre(a), centre(b)
    return sum(ca[i][j] * cb[i][j] for i in range(n) for j in range(n)) / n**2


def test_distance_covariance_reference_and_meaning():
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(40, generator=g) < 0.5).long()
    z = torch.randn(40, 3, generator=g) + s.unsqueeze(1).float()
    assert float(distance_covariance(z, s)) == pytest.approx(_dcov_reference(z, s), rel=1e-4)
    assert float(distance_covariance(torch.ones(40, 3), s)) == pytest.approx(0.0, abs=1e-5)
    big = torch.randn(4000, 2, generator=g)
    sb = (torch.rand(4000, generator=g) < 0.5).long()
    independent = float(distance_covariance(big[:400], sb[:400]))
    dependent = float(distance_covariance(big[:400] + 2 * sb[:400].unsqueeze(1), sb[:400]))
    assert dependent > 20 * independent
    zz = z.clone().requires_grad_(True)
    distance_covariance(zz, s).backward()
    assert float(zz.grad.abs().sum()) > 0


def test_mmd_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, generator=g), torch.randn(20, 2, generator=g) + 1.0

    def k(a, b):
        d2 = ((a - b) ** 2).sum()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in (0.5, 1.0, 2.0, 4.0))

    kxx = sum(k(a, b) for a in x for b in x) / 900
    kyy = sum(k(a, b) for a in y for b in y) / 400
    kxy = sum(k(a, b) for a in x for b in y) / 600
    assert float(mmd2(x, y)) == pytest.approx(float(kxx + kyy - 2 * kxy), rel=1e-4)
    assert float(mmd2(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd2(x, x + 2)) > float(mmd2(x, x + 0.5)) > 0


@pytest.fixture(scope="module")
def small():
    t = biased_table(900, seed=1)
    train, test = t.subset(list(range(700))), t.subset(list(range(700, 900)))
    enc = Encoding.fit(train)
    return train, test, enc, enc.encode(train)


def _teacher(small, lam, gam):
    train, test, enc, x = small
    cfg = FairReprConfig(steps=250, batch=128, hidden=32, adversary_weight=lam, dcov_weight=gam)
    model, _ = train_fair_representation(x, train.protected, train.label, enc, cfg, seed=0)
    with torch.no_grad():
        z_tr, z_te = model.encoder(x), model.encoder(enc.encode(test))
    return model, z_tr, z_te


@pytest.fixture(scope="module")
def fair_teacher(small):
    return _teacher(small, 5.0, 5.0)


def test_fairness_terms_remove_the_protected_attribute(small, fair_teacher):
    train, test, _, _ = small
    _, zu, zu_te = _teacher(small, 0.0, 0.0)
    _, zf, zf_te = fair_teacher
    leak_u = latent_leakage(zu, train.protected, zu_te, test.protected)
    leak_f = latent_leakage(zf, train.protected, zf_te, test.protected)
    # without the terms the latent encodes the group (the labels are biased); with them a
    # fresh probe does little better than guessing the majority group
    assert leak_u["s_probe_accuracy"] > leak_u["s_majority"] + 0.08
    assert leak_f["s_probe_accuracy"] < leak_u["s_probe_accuracy"] - 0.05
    dcov_u = float(distance_covariance(zu / zu.std(), train.protected))
    dcov_f = float(distance_covariance(zf / zf.std(), train.protected))
    assert dcov_f < 0.5 * dcov_u


def test_generator_is_optimised_and_generates_rows(small, fair_teacher):
    train, _, enc, x = small
    model = fair_teacher[0]
    g, info = distill_generator(model, x, train.label, GeneratorConfig(steps=60, batch=96), seed=0)
    q = [e["quality"] for e in info["log"]]
    assert q[-1] < 0.6 * q[0], q
    syn = generate_table(model, g, enc, train, 300, 0.4, seed=0, recipe="t")
    assert syn.numeric.shape == (300, 4) and syn.categorical.shape == (300, 2)
    assert 0.3 < float(syn.label.float().mean()) < 0.5
    assert set(syn.protected.tolist()) <= {0, 1} and bool((syn.categorical[:, 0] < 4).all())
    # s drawn from its marginal is independent of the label: no label gap beyond noise
    marg = generate_table(model, g, enc, train, 4000, 0.4, 0, "t", "marginal", 0.3)
    assert abs(float(marg.protected.float().mean()) - 0.3) < 0.03
    assert data_gap(marg) < 0.06
    with pytest.raises(ValueError, match="protected sampling"):
        generate_table(model, g, enc, train, 10, 0.4, 0, "t", "uniform")
    with pytest.raises(ValueError, match="adversary_mode"):
        train_fair_representation(
            x, train.protected, train.label, enc, FairReprConfig(adversary_mode="x"), 0
        )


def test_fair_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "fair"
    args = [
        "distill", "data-fair", "--out", str(out), "--data.rows", "500",
        "--teacher.steps", "20", "--teacher.hidden", "16", "--generator.steps", "10",
    ]  # fmt: skip
    assert cli.main(args) == 0
    for name in (
        "metrics.json",
        "report.html",
        "synthetic.csv",
        "synthetic_unfair.csv",
        "teacher.safetensors",
        "generator.safetensors",
        "schema.json",
        "loss_curves.png",
    ):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"real", "fair", "unfair"}
    for k in ("accuracy", "dp_gap", "eo_gap"):
        assert 0.0 <= m["fair"]["downstream"][k] <= 1.0
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)  # regenerated from the saved models
    assert again["fair_accuracy"] == pytest.approx(m["fair"]["downstream"]["accuracy"])
    assert again["fair_dp_gap"] == pytest.approx(m["fair"]["downstream"]["dp_gap"])
    assert cli.main(["sample", str(out), "--n", "7"]) == 0
    lines = (out / "synthetic_7.csv").read_text().strip().splitlines()
    assert len(lines) == 8 and lines[0].endswith("group,approved")
    bad = [
        "distill",
        "data-fair",
        "--out",
        str(tmp_path / "b"),
        "--data.source",
        str(tmp_path / "x.csv"),
    ]
    assert cli.main(bad) == 2
    assert "--data.label and --data.protected" in capsys.readouterr().err
