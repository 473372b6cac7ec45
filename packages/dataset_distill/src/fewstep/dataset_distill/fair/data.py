"""Tabular data with a binary protected attribute and a binary label: a procedurally biased
dataset with a stated recipe, a CSV reader for a user's own table, and the encoding models
use (standardised numeric columns, one-hot categorical columns).

``biased_table`` recipe (all draws from ``numpy.random.default_rng(seed)``):

    s      ~ Bernoulli(0.4)                      protected attribute ("group", a=0 / b=1)
    m      ~ N(0, 1)                              merit, independent of s, never observed
    score       = m + N(0, 0.5^2)                 numeric, informative
    experience  = 5 + 1.5 (0.6 m + 0.8 N(0,1))    numeric, informative
    income      = 40 + 10 (0.5 m - 0.8 s + 0.6 N(0,1))   numeric, proxy of s and of m
    age         = 25 + 40 U(0, 1)                 numeric, irrelevant
    neighbourhood in {north, south, east, west}   categorical proxy of s:
                  p = (.4, .1, .3, .2) if s = 0, (.1, .5, .2, .2) if s = 1
    education   in {school, college, degree}      categorical, thresholds of m + N(0, 0.7^2)
                  at -0.5 and 0.7
    label  y = 1[m + 0.3 N(0,1) + 0.2 - bias * s > 0]   historical decision: at equal merit
                  group b is approved less often (bias = 1 by default)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Table:
    """Rows of a table: numeric and categorical feature columns, protected attribute, label."""

    numeric: torch.Tensor  # [n, dn] float, raw units
    numeric_names: list[str]  # names of the numeric columns
    categorical: torch.Tensor  # [n, dc] long, category codes
    categorical_names: list[str]  # names of the categorical columns
    categories: list[list[str]]  # level names of each categorical column
    protected: torch.Tensor  # [n] long in {0, 1}
    label: torch.Tensor  # [n] long in {0, 1}
    protected_name: str = "group"  # column name of the protected attribute
    protected_values: list[str] = field(default_factory=lambda: ["0", "1"])  # its two values
    label_name: str = "label"  # column name of the label
    label_values: list[str] = field(default_factory=lambda: ["0", "1"])  # negative, positive
    recipe: str = ""  # where the rows came from

    def __len__(self) -> int:
        return int(self.label.numel())

    def subset(self, idx: torch.Tensor | list[int]) -> Table:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Table(
            self.numeric[idx],
            self.numeric_names,
            self.categorical[idx],
            self.categorical_names,
            self.categories,
            self.protected[idx],
            self.label[idx],
            self.protected_name,
            self.protected_values,
            self.label_name,
            self.label_values,
            self.recipe,
        )

    def like(self, numeric, categorical, protected, label, recipe: str) -> Table:
        """A table with this one's schema and new rows."""
        return Table(
            numeric,
            self.numeric_names,
            categorical,
            self.categorical_names,
            self.categories,
            protected,
            label,
            self.protected_name,
            self.protected_values,
            self.label_name,
            self.label_values,
            recipe,
        )


def biased_table(n: int = 4000, seed: int = 0, bias: float = 1.0) -> Table:
    """``n`` rows of the recipe in the module docstring."""
    rng = np.random.default_rng(seed)
    s = (rng.random(n) < 0.4).astype(np.int64)
    m = rng.standard_normal(n)
    score = m + 0.5 * rng.standard_normal(n)
    experience = 5 + 1.5 * (0.6 * m + 0.8 * rng.standard_normal(n))
    income = 40 + 10 * (0.5 * m - 0.8 * s + 0.6 * rng.standard_normal(n))
    age = 25 + 40 * rng.random(n)
    p = np.where(s[:, None] == 0, [[0.4, 0.1, 0.3, 0.2]], [[0.1, 0.5, 0.2, 0.2]])
    neigh = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    edu = np.digitize(m + 0.7 * rng.standard_normal(n), [-0.5, 0.7])
    y = (m + 0.3 * rng.standard_normal(n) + 0.2 - bias * s > 0).astype(np.int64)
    return Table(
        numeric=torch.tensor(np.stack([score, experience, income, age], 1), dtype=torch.float32),
        numeric_names=["score", "experience", "income", "age"],
        categorical=torch.tensor(np.stack([neigh, edu], 1), dtype=torch.long),
        categorical_names=["neighbourhood", "education"],
        categories=[["north", "south", "east", "west"], ["school", "college", "degree"]],
        protected=torch.tensor(s),
        label=torch.tensor(y),
        protected_name="group",
        protected_values=["a", "b"],
        label_name="approved",
        label_values=["no", "yes"],
        recipe=f"biased_table(n={n}, seed={seed}, bias={bias}) (fewstep.dataset_distill.fair.data)",
    )


def read_csv_table(
    path: str | Path,
    label: str,
    protected: str,
    categorical: tuple[str, ...] | None = None,
) -> Table:
    """Read a CSV with a header row. ``label`` and ``protected`` name binary columns (their two
    values in sorted order map to 0 and 1). Every other column is a feature: the ones named in
    ``categorical`` (default: those whose values are not all numbers) are categorical, the
    rest numeric. Errors name the file, the column, and the row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file (expected a header row)") from None
        rows = [r for r in reader if any(c.strip() for c in r)]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: duplicate column names in the header {header}")
    for role, col in (("label", label), ("protected", protected)):
        if col not in header:
            raise ValueError(f"{path}: no {role} column {col!r}; columns are {header}")
    if label == protected:
        raise ValueError(f"{path}: the label and the protected column are both {label!r}")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    cols: dict[str, list[str]] = {h: [] for h in header}
    for i, r in enumerate(rows, start=2):
        if len(r) != len(header):
            raise ValueError(f"{path} line {i}: {len(r)} values, expected {len(header)} ({header})")
        for h, v in zip(header, r):
            v = v.strip()
            if v == "":
                raise ValueError(f"{path} line {i}: missing value in column {h!r}")
            cols[h].append(v)
    unknown = [c for c in (categorical or ()) if c not in header]
    if unknown:
        raise ValueError(f"{path}: categorical column(s) {unknown} not in the header {header}")

    def binary(col: str) -> tuple[torch.Tensor, list[str]]:
        vals = sorted(set(cols[col]), key=_sort_key)
        if len(vals) != 2:
            raise ValueError(
                f"{path}: column {col!r} must have exactly 2 distinct values, found {len(vals)}: "
                f"{vals[:10]}"
            )
        return torch.tensor([vals.index(v) for v in cols[col]]), vals

    y, y_vals = binary(label)
    s, s_vals = binary(protected)
    features = [h for h in header if h not in (label, protected)]
    if not features:
        raise ValueError(f"{path}: no feature columns besides {label!r} and {protected!r}")
    if categorical is None:
        categorical = tuple(h for h in features if not all(_is_number(v) for v in cols[h]))
    num_names = [h for h in features if h not in categorical]
    cat_names = [h for h in features if h in categorical]
    numeric = torch.zeros(len(rows), len(num_names))
    for j, h in enumerate(num_names):
        for i, v in enumerate(cols[h]):
            if not _is_number(v):
                raise ValueError(
                    f"{path} line {i + 2}: column {h!r} is numeric but has {v!r}; name it in "
                    f"categorical to treat it as a category"
                )
            numeric[i, j] = float(v)
    levels = [sorted(set(cols[h]), key=_sort_key) for h in cat_names]
    codes = (
        torch.tensor(
            [[lv.index(v) for v in cols[h]] for h, lv in zip(cat_names, levels)], dtype=torch.long
        )
        .t()
        .reshape(len(rows), len(cat_names))
    )
    return Table(
        numeric,
        num_names,
        codes,
        cat_names,
        levels,
        s,
        y,
        protected,
        s_vals,
        label,
        y_vals,
        f"CSV {path}",
    )


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _sort_key(v: str):
    return (0, float(v), v) if _is_number(v) else (1, 0.0, v)


def write_csv_table(table: Table, path: str | Path) -> Path:
    """Write ``table`` as CSV (features, then protected, then label; category names)."""
    import io

    from fewstep.core.io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        table.numeric_names + table.categorical_names + [table.protected_name, table.label_name]
    )
    for i in range(len(table)):
        w.writerow(
            [f"{float(v):.6g}" for v in table.numeric[i]]
            + [table.categories[j][int(c)] for j, c in enumerate(table.categorical[i])]
            + [
                table.protected_values[int(table.protected[i])],
                table.label_values[int(table.label[i])],
            ]
        )
    return atomic_write_text(path, buf.getvalue())


@dataclass
class Encoding:
    """Feature encoding fitted on training rows: numeric columns standardised, categorical
    columns one-hot. ``encode`` -> [n, D] with D = dn + sum(levels)."""

    mean: torch.Tensor  # [dn]
    std: torch.Tensor  # [dn]
    levels: list[int]  # number of levels of each categorical column

    @classmethod
    def fit(cls, t: Table) -> Encoding:
        mean = t.numeric.mean(0) if t.numeric.shape[1] else torch.zeros(0)
        std = t.numeric.std(0).clamp(min=1e-6) if t.numeric.shape[1] else torch.ones(0)
        return cls(mean, std, [len(c) for c in t.categories])

    @property
    def dim(self) -> int:
        return int(self.mean.numel()) + sum(self.levels)

    def encode(self, t: Table) -> torch.Tensor:
        parts = [(t.numeric - self.mean) / self.std]
        for j, k in enumerate(self.levels):
            parts.append(torch.nn.functional.one_hot(t.categorical[:, j], k).float())
        return torch.cat(parts, 1)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A decoder output [n, D] as (standardised numeric [n, dn], logits per category)."""
        dn = int(self.mean.numel())
        cats, o = [], dn
        for k in self.levels:
            cats.append(out[:, o : o + k])
            o += k
        return out[:, :dn], cats

    def decode(self, out: torch.Tensor, generator: torch.Generator | None = None):
        """(numeric [n, dn] raw units, categorical codes [n, dc]) from a decoder output;
        categories are sampled from the softmax of their logits."""
        num, cats = self.split(out)
        codes = [
            torch.multinomial(torch.softmax(c, 1), 1, generator=generator).view(-1) for c in cats
        ]
        cat = torch.stack(codes, 1) if codes else torch.zeros(out.shape[0], 0, dtype=torch.long)
        return num * self.std + self.mean, cat
