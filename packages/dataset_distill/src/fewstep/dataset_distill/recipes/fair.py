"""``fewstep distill data-fair``: fair synthetic tabular data from a fair latent representation
distilled into a small generator (fewstep.dataset_distill.fair.fair_repr), evaluated for
fairness (demographic-parity and equalised-odds gaps of a model trained on the synthetic rows,
on real test rows), utility (its accuracy) and fidelity (marginals, correlations), next to the
same pipeline without fairness terms ("unfair") and a model trained on the real rows.

The run folder gets ``config.json``, ``teacher.safetensors``, ``generator.safetensors``,
``schema.json``, ``synthetic.csv`` (and ``synthetic_unfair.csv``), ``metrics.json``,
``loss_curves.png`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.dataset_distill.fair.fair_repr import FairReprConfig, GeneratorConfig


@dataclass
class FairDataConfig:
    source: str = "biased"  # "biased" (procedural, see fair/data.py) or a path to a CSV file
    rows: int = 4000  # biased: number of rows
    bias: float = 1.0  # biased: how much the label rule penalises group b
    label: str = ""  # CSV: name of the binary label column
    protected: str = ""  # CSV: name of the binary protected-attribute column
    categorical: tuple[str, ...] = ()  # CSV: categorical columns (empty: non-numeric ones)
    test_fraction: float = 0.25  # share of rows held out as the real test set
    seed: int = 0  # generator and split seed


@dataclass
class FairRecipeConfig:
    data: FairDataConfig = field(default_factory=FairDataConfig)  # which table
    teacher: FairReprConfig = field(default_factory=FairReprConfig)  # fair representation
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # distilled generator
    synthetic_rows: int = 0  # rows to generate (0: as many as training rows)
    protected_sampling: str = "marginal"  # fair rows' s: "marginal" or "posterior" (A(z))
    compare_unfair: bool = True  # also run the pipeline without fairness terms
    seed: int = 0  # training seed
    threads: int = 1  # torch CPU threads (small MLPs: 1 is fastest; 0 = torch's default)


def load_table(data: FairDataConfig):
    """(train, test) tables split at random with ``data.seed``."""
    from fewstep.dataset_distill.fair.data import biased_table, read_csv_table

    if data.source == "biased":
        t = biased_table(data.rows, data.seed, data.bias)
    elif data.source.lower().endswith(".csv") or Path(data.source).is_file():
        if not data.label or not data.protected:
            raise ValueError("a CSV source needs --data.label and --data.protected column names")
        t = read_csv_table(data.source, data.label, data.protected, tuple(data.categorical) or None)
    else:
        raise ValueError(f"data.source must be 'biased' or a CSV file path, got {data.source!r}")
    if not 0 < data.test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {data.test_fraction}")
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(data.seed))
    n_test = max(1, round(data.test_fraction * len(t)))
    return t.subset(perm[n_test:]), t.subset(perm[:n_test])


def _pipeline(
    cfg: FairRecipeConfig, teacher_cfg: FairReprConfig, train, test, enc, name: str, sampling: str
):
    from fewstep.dataset_distill.fair import metrics as fm
    from fewstep.dataset_distill.fair.fair_repr import (
        distill_generator,
        generate_table,
        latent_leakage,
        num_params,
        train_fair_representation,
    )

    x = enc.encode(train)
    t0 = time.perf_counter()
    teacher, tinfo = train_fair_representation(
        x, train.protected, train.label, enc, teacher_cfg, cfg.seed
    )
    t1 = time.perf_counter()
    gen, ginfo = distill_generator(teacher, x, train.label, cfg.generator, cfg.seed)
    t2 = time.perf_counter()
    n = cfg.synthetic_rows or len(train)
    p_label = float(train.label.float().mean())
    p_s = float(train.protected.float().mean())
    syn = generate_table(
        teacher, gen, enc, train, n, p_label, cfg.seed, f"{name} synthetic", sampling, p_s
    )
    with torch.no_grad():
        leak = latent_leakage(
            teacher.encoder(x), train.protected, teacher.encoder(enc.encode(test)), test.protected
        )
    m = {
        "downstream": fm.downstream_metrics(syn, test, enc, cfg.seed),
        "synthetic_label_gap": fm.data_gap(syn),
        "fidelity": fm.fidelity(train, syn, enc),
        "latent": leak,
        "teacher_seconds": t1 - t0,
        "distill_seconds": t2 - t1,
        "teacher_encoder_params": num_params(teacher.encoder),
        "generator_params": num_params(gen),
        "teacher_log": tinfo["log"],
        "generator_log": ginfo["log"],
    }
    return teacher, gen, syn, m


class FairRecipe:
    name = "data-fair"
    summary = "fair synthetic tables: a fair latent (adversary + dCov) distilled into a generator"
    config_cls = FairRecipeConfig

    def distill(self, cfg: FairRecipeConfig, objective_cfg, out_dir: Path) -> dict:
        from safetensors.torch import save_file

        from fewstep.core.io import atomic_write_json
        from fewstep.dataset_distill.fair import metrics as fm
        from fewstep.dataset_distill.fair.data import Encoding, write_csv_table

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(out_dir)
        train, test = load_table(cfg.data)
        enc = Encoding.fit(train)
        fair_sampling = cfg.protected_sampling
        teacher, gen, syn, fair = _pipeline(
            cfg, cfg.teacher, train, test, enc, "fair", fair_sampling
        )
        fair["protected_sampling"] = fair_sampling
        results = {"fair": fair}
        if cfg.compare_unfair:
            plain = dataclasses.replace(cfg.teacher, adversary_weight=0.0, dcov_weight=0.0)
            _, _, syn_u, results["unfair"] = _pipeline(
                cfg, plain, train, test, enc, "unfair", "posterior"
            )
            write_csv_table(syn_u, out_dir / "synthetic_unfair.csv")
        real = {
            "downstream": fm.downstream_metrics(train, test, enc, cfg.seed),
            "synthetic_label_gap": fm.data_gap(train),
        }
        save_file(
            {k: v.contiguous() for k, v in teacher.state_dict().items()},
            str(out_dir / "teacher.safetensors"),
        )
        save_file(
            {k: v.contiguous() for k, v in gen.state_dict().items()},
            str(out_dir / "generator.safetensors"),
        )
        atomic_write_json(out_dir / "schema.json", _schema(train, enc))
        write_csv_table(syn, out_dir / "synthetic.csv")
        metrics = {
            "dataset": train.recipe,
            "train_rows": len(train),
            "test_rows": len(test),
            "real": real,
            **results,
        }
        atomic_write_json(out_dir / "metrics.json", metrics)
        self.report(out_dir)
        return _flat(metrics)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        from fewstep.dataset_distill.fair.data import write_csv_table

        syn = _regenerate(Path(run_dir), n, seed=12345)
        return write_csv_table(syn, out or Path(run_dir) / f"synthetic_{n}.csv")

    def evaluate(self, run_dir: Path) -> dict:
        from fewstep.core.config import from_dict
        from fewstep.dataset_distill.fair import metrics as fm
        from fewstep.dataset_distill.fair.data import Encoding

        run_dir = Path(run_dir)
        cfg = from_dict(
            FairRecipeConfig, json.loads((run_dir / "config.json").read_text())["config"]
        )
        train, test = load_table(cfg.data)
        enc = Encoding.fit(train)
        syn = _regenerate(run_dir, cfg.synthetic_rows or len(train), cfg.seed)
        d = fm.downstream_metrics(syn, test, enc, cfg.seed)
        f = fm.fidelity(train, syn, enc)
        return {
            "fair_accuracy": d["accuracy"],
            "fair_dp_gap": d["dp_gap"],
            "fair_eo_gap": d["eo_gap"],
            "fair_synthetic_label_gap": fm.data_gap(syn),
            "fair_mean_marginal_distance": f["mean_marginal_distance"],
            "fair_correlation_mad": f["correlation_mad"],
        }

    def report(self, run_dir: Path) -> Path:
        from fewstep.core.report import Report, save_line_plot

        run_dir = Path(run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        rep = Report(run_dir, "Fair synthetic data by fair-representation distillation")
        rep.add_text(
            "Data", f"{m['dataset']}\ntrain rows {m['train_rows']}, test rows {m['test_rows']}"
        )
        rows = []
        for name in ("real", "unfair", "fair"):
            if name not in m:
                continue
            r = m[name]
            row = {
                "training data": name,
                **r["downstream"],
                "label DP gap of the data": r["synthetic_label_gap"],
            }
            if "fidelity" in r:
                row["mean marginal distance"] = r["fidelity"]["mean_marginal_distance"]
                row["correlation MAD"] = r["fidelity"]["correlation_mad"]
                row["s probe acc (majority)"] = (
                    f"{r['latent']['s_probe_accuracy']:.3f} ({r['latent']['s_majority']:.3f})"
                )
            rows.append(row)
        rep.add_table("Downstream logistic regression, tested on real rows", rows)
        f = m["fair"]
        rep.add_text(
            "Sizes and times",
            f"teacher encoder {f['teacher_encoder_params']} parameters, distilled generator "
            f"{f['generator_params']}; teacher {f['teacher_seconds']:.1f} s, distillation "
            f"{f['distill_seconds']:.1f} s",
        )
        series = {
            "fair: reconstruction": [(e["step"], e["rec"]) for e in f["teacher_log"]],
            "fair: dCov(z, s)": [(e["step"], e["dcov"]) for e in f["teacher_log"]],
            "fair: generator MMD": [(e["step"], e["quality"]) for e in f["generator_log"]],
        }
        save_line_plot(
            run_dir / "loss_curves.png", series, title="training losses", xlabel="step", log_y=True
        )
        rep.add_image("Losses", run_dir / "loss_curves.png")
        return rep.write()


def _schema(train, enc) -> dict:
    return {
        "numeric_names": train.numeric_names,
        "categorical_names": train.categorical_names,
        "categories": train.categories,
        "protected_name": train.protected_name,
        "protected_values": train.protected_values,
        "label_name": train.label_name,
        "label_values": train.label_values,
        "mean": enc.mean.tolist(),
        "std": enc.std.tolist(),
        "levels": enc.levels,
        "p_label": float(train.label.float().mean()),
        "p_protected": float(train.protected.float().mean()),
    }


def _regenerate(run_dir: Path, n: int, seed: int):
    """Synthetic rows from a run folder's saved teacher decoder/adversary and generator."""
    from safetensors.torch import load_file

    from fewstep.core.config import from_dict
    from fewstep.dataset_distill.fair.data import Encoding, Table
    from fewstep.dataset_distill.fair.fair_repr import (
        FairAutoencoder,
        LatentGenerator,
        generate_table,
    )

    cfg = from_dict(FairRecipeConfig, json.loads((run_dir / "config.json").read_text())["config"])
    sc = json.loads((run_dir / "schema.json").read_text())
    enc = Encoding(torch.tensor(sc["mean"]), torch.tensor(sc["std"]), sc["levels"])
    teacher = FairAutoencoder(enc.dim, cfg.teacher.latent, cfg.teacher.hidden)
    teacher.load_state_dict(load_file(str(run_dir / "teacher.safetensors")))
    gen = LatentGenerator(cfg.generator.noise, cfg.teacher.latent, cfg.generator.hidden)
    gen.load_state_dict(load_file(str(run_dir / "generator.safetensors")))
    schema = Table(
        torch.zeros(0, len(sc["numeric_names"])),
        sc["numeric_names"],
        torch.zeros(0, len(sc["categorical_names"]), dtype=torch.long),
        sc["categorical_names"],
        sc["categories"],
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        sc["protected_name"],
        sc["protected_values"],
        sc["label_name"],
        sc["label_values"],
    )
    return generate_table(
        teacher,
        gen,
        enc,
        schema,
        n,
        sc["p_label"],
        seed,
        f"run {run_dir}",
        cfg.protected_sampling,
        sc["p_protected"],
    )


def _flat(m: dict) -> dict:
    out = {"train_rows": m["train_rows"], "test_rows": m["test_rows"]}
    for name in ("real", "unfair", "fair"):
        if name not in m:
            continue
        for k, v in m[name]["downstream"].items():
            out[f"{name}_{k}"] = v
        out[f"{name}_synthetic_label_gap"] = m[name]["synthetic_label_gap"]
        if "fidelity" in m[name]:
            out[f"{name}_mean_marginal_distance"] = m[name]["fidelity"]["mean_marginal_distance"]
            out[f"{name}_correlation_mad"] = m[name]["fidelity"]["correlation_mad"]
            out[f"{name}_distill_seconds"] = m[name]["distill_seconds"]
    return out


FAIR = FairRecipe()
