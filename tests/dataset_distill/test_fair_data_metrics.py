"""Fair-data parts: the biased table's stated recipe, the CSV reader, and the fairness,
utility and fidelity metrics against hand-computed and plain reference values."""

from __future__ import annotations

import pytest
import torch

from fewstep.dataset_distill.fair.data import (
    Encoding,
    biased_table,
    read_csv_table,
    write_csv_table,
)
from fewstep.dataset_distill.fair.metrics import (
    data_gap,
    demographic_parity_gap,
    downstream_metrics,
    equalized_odds_gap,
    fidelity,
    wasserstein_1d,
)


@pytest.fixture(scope="module")
def table():
    return biased_table(3000, seed=0)


def test_biased_table_follows_its_recipe(table):
    s, y = table.protected, table.label
    assert 0.35 < float(s.float().mean()) < 0.45
    # the label rule penalises group b at equal merit: lower approval rate for s = 1
    assert float(y[s == 0].float().mean()) - float(y[s == 1].float().mean()) > 0.25
    score = table.numeric[:, table.numeric_names.index("score")]
    income = table.numeric[:, table.numeric_names.index("income")]
    assert abs(float(score[s == 0].mean() - score[s == 1].mean())) < 0.1  # merit: no group shift
    assert float(income[s == 0].mean() - income[s == 1].mean()) > 6  # proxy: shifted by ~8
    neigh = table.categorical[:, 0]
    assert (
        float((neigh[s == 1] == 1).float().mean())
        > 0.4
        > float((neigh[s == 0] == 1).float().mean())
    )
    again = biased_table(3000, seed=0)
    assert torch.equal(again.numeric, table.numeric) and torch.equal(again.label, table.label)
    assert data_gap(biased_table(3000, seed=0, bias=0.0)) < 0.05


def test_csv_roundtrip_and_auto_categorical(table, tmp_path):
    path = write_csv_table(table.subset(list(range(50))), tmp_path / "t.csv")
    back = read_csv_table(path, label="approved", protected="group")
    assert back.numeric_names == table.numeric_names
    assert back.categorical_names == table.categorical_names  # detected: non-numeric
    assert back.protected_values == ["a", "b"] and back.label_values == ["no", "yes"]
    torch.testing.assert_close(back.numeric, table.numeric[:50], rtol=1e-5, atol=1e-4)
    assert torch.equal(back.label, table.label[:50]) and torch.equal(
        back.protected, table.protected[:50]
    )
    names = [table.categories[0][int(c)] for c in table.categorical[:50, 0]]
    assert [back.categories[0][int(c)] for c in back.categorical[:, 0]] == names


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        (
            "a,b,y\n1,0,1\n",
            {"label": "z", "protected": "b"},
            r"no label column 'z'; columns are \['a', 'b', 'y'\]",
        ),
        (
            "a,b,y\n1,0,1\n2,1,2\n3,0,3\n",
            {"label": "y", "protected": "b"},
            "column 'y' must have exactly 2",
        ),
        (
            "a,b,y\n1,0,1\n2,,0\n",
            {"label": "y", "protected": "b"},
            "line 3: missing value in column 'b'",
        ),
        (
            "a,b,y\n1,0,1\nx,1,0\n",
            {"label": "y", "protected": "b", "categorical": ()},
            "line 3: column 'a' is numeric",
        ),
        ("a,b,y\n1,0\n", {"label": "y", "protected": "b"}, "line 2: 2 values, expected 3"),
        ("", {"label": "y", "protected": "b"}, "empty file"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path, text, kwargs, message):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_csv_table(p, **kwargs)


def test_parity_gaps_hand_computed():
    s = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 0, 1])
    # P(pred=1|s=0)=3/4, P(pred=1|s=1)=1/4
    assert demographic_parity_gap(pred, s) == pytest.approx(0.5)
    # y=0: 1/2 vs 0; y=1: 1 vs 1/2 -> max 0.5
    assert equalized_odds_gap(pred, s, y) == pytest.approx(0.5)
    # swapping groups keeps the gaps (absolute values)
    assert demographic_parity_gap(pred, 1 - s) == pytest.approx(0.5)
    fair = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    assert demographic_parity_gap(fair, s) == 0.0
    # predictions equal to the labels have zero EO gap even where base rates differ
    y2 = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    assert equalized_odds_gap(y2, s, y2) == 0.0 and demographic_parity_gap(y2, s) == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError, match="binary"):
        demographic_parity_gap(torch.tensor([0, 2]), torch.tensor([0, 1]))


def test_wasserstein_matches_scipy():
    from scipy.stats import wasserstein_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(137, generator=g), 0.5 + 2 * torch.randn(90, generator=g)
    assert wasserstein_1d(a, b) == pytest.approx(
        wasserstein_distance(a.numpy(), b.numpy()), rel=1e-6
    )
    assert wasserstein_1d(a, a) == 0.0


def test_fidelity_and_utility(table):
    enc = Encoding.fit(table)
    train, test = table.subset(list(range(2000))), table.subset(list(range(2000, 3000)))
    same = fidelity(train, train, enc)
    assert same["mean_marginal_distance"] == 0.0 and same["correlation_mad"] == pytest.approx(
        0.0, abs=1e-12
    )
    # shuffling one column keeps its marginal but breaks its correlations
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    num = train.numeric.clone()
    num[:, 0] = num[perm, 0]
    shuffled = train.like(num, train.categorical, train.protected, train.label, "shuffled")
    f = fidelity(train, shuffled, enc)
    assert f["numeric_w1"]["score"] == pytest.approx(0.0, abs=1e-9) and f["correlation_mad"] > 0.01
    shifted = train.like(
        train.numeric + torch.tensor([1.0, 0, 0, 0]) * train.numeric[:, 0].std(),
        train.categorical,
        train.protected,
        train.label,
        "shifted",
    )
    assert fidelity(train, shifted, enc)["numeric_w1"]["score"] == pytest.approx(1.0, rel=1e-4)
    real = downstream_metrics(train, test, enc)
    assert real["accuracy"] > 0.75 and real["dp_gap"] > 0.1  # biased data -> biased model
    noise = train.like(
        train.numeric,
        train.categorical,
        train.protected,
        train.label[torch.randperm(len(train), generator=torch.Generator().manual_seed(2))],
        "noise",
    )
    assert downstream_metrics(noise, test, enc)["accuracy"] < real["accuracy"] - 0.15
    # the downstream model sees the protected attribute only when asked
    leak = train.like(train.numeric, train.categorical, train.protected, train.protected, "y=s")
    leak_test = test.like(test.numeric, test.categorical, test.protected, test.protected, "y=s")
    assert downstream_metrics(leak, leak_test, enc)["accuracy"] == 1.0
    assert downstream_metrics(leak, leak_test, enc, use_protected=False)["accuracy"] < 0.95
