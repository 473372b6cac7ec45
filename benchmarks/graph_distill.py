"""Benchmark: graph distillation (Mirage vs DosCond vs random real graphs vs the full set) and
fair synthetic data (fair vs unfair pipeline vs real data), measured side by side in one run.

    uv run --package fewstep-dataset-distill python benchmarks/graph_distill.py
        [--seeds 3] [--budgets 10,50] [--fair-seeds 3] [--quick]

Graphs: for each dataset (``molecules``, written to TU files and read back through the TU
reader, and ``motifs``) a class-stratified 70/10/20 split; every method distils the training
graphs to ``k`` graphs per class (Mirage: the ``k`` most frequent closed tree sets per class;
DosCond: ``k`` synthetic graphs per class; random: ``k`` real graphs per class); fresh GCN,
GIN and GAT models (``--seeds`` each) train on each set and are tested on the real test
graphs (best-validation checkpoint). Distillation wall time and compression ratio (stored
numbers of the full training set / of the distilled set) are reported; Mirage's ratio counts
its compact form (each distinct tree once). Karate Club: node-level GCond vs random nodes vs
all training nodes, GCN accuracy.

Fair data: the procedurally biased table; per seed, the fair pipeline (adversary + dCov, then
a distilled generator; synthetic s drawn from its marginal, and, from the same models, from
the adversary's posterior A(z)), the same pipeline without fairness terms ("unfair", s from
A(z)), and the real training rows; a logistic regression trained on each (all columns but the
label) is tested on real rows: accuracy, demographic-parity and equalised-odds gaps, plus the
label gap of the data itself, fidelity and how well a probe reads s from the latent.

Writes benchmarks/results/graph_distill.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _ms(vals: list[float]) -> list[float]:
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def graph_benchmark(name: str, ds, budgets, seeds, models, gnn_cfg, doscond_iters) -> dict:
    from fewstep.dataset_distill.graphs.evaluate import (
        evaluate_graph_set,
        random_subset,
        size_stats,
    )
    from fewstep.dataset_distill.graphs.gcond import DosCondConfig, doscond_distill
    from fewstep.dataset_distill.graphs.graphset import GraphSet
    from fewstep.dataset_distill.graphs.mirage import (
        frequent_tree_view,
        mirage_distill,
        tree_vocabulary,
    )
    from fewstep.dataset_distill.graphs.synthetic import stratified_split

    tr, va, te = stratified_split(ds.labels(), (0.7, 0.1, 0.2), 0)
    g = ds.graphs
    train, val, test = [g[i] for i in tr], [g[i] for i in va], [g[i] for i in te]
    full = GraphSet.uniform(train)

    def run_eval(s, views=None):
        v, t = views or (val, test)
        r = evaluate_graph_set(s, v, t, ds.num_features, ds.num_classes, models, seeds, gnn_cfg)
        return {k: {"mean": v["mean"], "std": v["std"], "accs": v["accs"]} for k, v in r.items()}

    out = {
        "recipe": ds.recipe,
        "train_graphs": len(train),
        "val_graphs": len(val),
        "test_graphs": len(test),
        "mean_nodes": sum(int(x.num_nodes) for x in g) / len(g),
        "rows": [],
    }
    t0 = time.perf_counter()
    acc = run_eval(full)
    out["rows"].append(
        {
            "method": "full",
            "k": None,
            "accuracy": acc,
            "distill_seconds": 0.0,
            "eval_seconds": time.perf_counter() - t0,
            **size_stats(full, full),
        }
    )
    print(
        f"[{name}] full: {json.dumps({k: round(v['mean'], 3) for k, v in acc.items()})}", flush=True
    )
    for k in budgets:
        rand = random_subset(train, k, ds.num_classes, 0)
        t0 = time.perf_counter()
        res = mirage_distill(
            train,
            ds.num_classes,
            ds.num_node_labels,
            hops=gnn_cfg.layers,
            min_support=0.05,
            sets_per_class=k,
            max_set_size=32,
        )
        t_mirage = time.perf_counter() - t0
        mirage = GraphSet(res.graphs, res.weights)
        t0 = time.perf_counter()
        syn, info = doscond_distill(
            train,
            ds.num_classes,
            DosCondConfig(
                graphs_per_class=k,
                iterations=doscond_iters,
                hidden=gnn_cfg.hidden,
                layers=gnn_cfg.layers,
                readout=gnn_cfg.readout,
            ),
            seed=0,
        )
        t_dos = time.perf_counter() - t0
        dos = syn.to_graph_set()
        table, kept = tree_vocabulary(mirage.graphs, gnn_cfg.layers)
        tree_views = tuple(
            [frequent_tree_view(x, table, kept, gnn_cfg.layers, ds.num_node_labels) for x in part]
            for part in (val, test)
        )
        mirage_extra = {
            "compact_compression_ratio": full.stored_scalars() / res.info["stored_scalars_compact"],
            "mined_sets_per_class": res.info["sets_per_class"],
            "mean_trees_per_set": res.info["mean_trees_per_set"],
            "distinct_trees": res.info["distinct_trees"],
        }
        for method, s, secs, extra, views in (
            ("random", rand, 0.0, {}, None),
            ("mirage (test: whole graphs)", mirage, t_mirage, mirage_extra, None),
            ("mirage (test: distilled trees)", mirage, t_mirage, mirage_extra, tree_views),
            (
                "doscond",
                dos,
                t_dos,
                {"matching_loss_first_last": [info["loss_curve"][0][1], info["loss_curve"][-1][1]]},
                None,
            ),
        ):
            t0 = time.perf_counter()
            acc = run_eval(s, views)
            row = {
                "method": method,
                "k": k,
                "accuracy": acc,
                "distill_seconds": secs,
                "eval_seconds": time.perf_counter() - t0,
                **size_stats(s, full),
                **extra,
            }
            out["rows"].append(row)
            means = {m: round(v["mean"], 3) for m, v in acc.items()}
            print(
                f"[{name}] k={k} {method}: {json.dumps(means)} distill {secs:.2f}s",
                flush=True,
            )
    return out


def karate_benchmark(seeds: int) -> dict:
    from fewstep.dataset_distill.graphs.gcond import (
        GCondNodeConfig,
        gcond_node_distill,
        node_accuracy,
    )
    from fewstep.dataset_distill.recipes.graphs import karate_split

    x, adj, y, train_mask, test_mask, c = karate_split(0)
    cfg = GCondNodeConfig()
    t0 = time.perf_counter()
    xs, a_s, ys, _ = gcond_node_distill(x, adj, y, train_mask, c, cfg, seed=0)
    secs = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat(
        [
            torch.nonzero(train_mask & (y == k)).view(-1)[
                torch.randperm(int((train_mask & (y == k)).sum()), generator=gen)[
                    : cfg.nodes_per_class
                ]
            ]
            for k in range(c)
        ]
    )
    sets = {
        "full (train nodes)": (x, adj, y, train_mask),
        "random nodes": (x[idx], adj[idx][:, idx], y[idx], None),
        "gcond": (xs, a_s, ys, None),
    }
    out = {
        "train_nodes": int(train_mask.sum()),
        "test_nodes": int(test_mask.sum()),
        "synthetic_nodes": int(xs.shape[0]),
        "gcond_seconds": secs,
        "rows": {},
    }
    for name, (xt, at, yt, mt) in sets.items():
        accs = [
            node_accuracy(xt, at, yt, x, adj, y, test_mask, c, seed=s, train_mask=mt)
            for s in range(seeds)
        ]
        out["rows"][name] = {"mean_std": _ms(accs), "accs": accs}
    return out


def fair_benchmark(seeds: int, teacher_steps: int, gen_steps: int) -> dict:
    import dataclasses

    from fewstep.dataset_distill.fair import metrics as fm
    from fewstep.dataset_distill.fair.data import Encoding
    from fewstep.dataset_distill.fair.fair_repr import generate_table
    from fewstep.dataset_distill.recipes.fair import FairRecipeConfig, _pipeline, load_table

    base = FairRecipeConfig()
    base = dataclasses.replace(
        base,
        teacher=dataclasses.replace(base.teacher, steps=teacher_steps),
        generator=dataclasses.replace(base.generator, steps=gen_steps),
    )
    train, test = load_table(base.data)
    enc = Encoding.fit(train)
    p_label, p_s = float(train.label.float().mean()), float(train.protected.float().mean())
    names = ("real", "unfair", "fair", "fair (s ~ A(z))")
    per = {k: [] for k in names}
    for seed in range(seeds):
        cfg = dataclasses.replace(base, seed=seed)
        real = fm.downstream_metrics(train, test, enc, seed)
        per["real"].append({**real, "label_gap": fm.data_gap(train)})
        for name, tcfg, sampling in (
            (
                "unfair",
                dataclasses.replace(cfg.teacher, adversary_weight=0.0, dcov_weight=0.0),
                "posterior",
            ),
            ("fair", cfg.teacher, cfg.protected_sampling),
        ):
            teacher, gen, _, m = _pipeline(cfg, tcfg, train, test, enc, name, sampling)
            common = {
                "s_probe_accuracy": m["latent"]["s_probe_accuracy"],
                "s_majority": m["latent"]["s_majority"],
                "teacher_seconds": m["teacher_seconds"],
                "distill_seconds": m["distill_seconds"],
                "teacher_encoder_params": m["teacher_encoder_params"],
                "generator_params": m["generator_params"],
            }
            per[name].append(
                {
                    **m["downstream"],
                    "label_gap": m["synthetic_label_gap"],
                    "marginal_distance": m["fidelity"]["mean_marginal_distance"],
                    "correlation_mad": m["fidelity"]["correlation_mad"],
                    **common,
                }
            )
            if name == "fair":  # the same models, s drawn from the adversary's posterior
                syn = generate_table(
                    teacher,
                    gen,
                    enc,
                    train,
                    len(train),
                    p_label,
                    seed,
                    "fair posterior",
                    "posterior",
                    p_s,
                )
                f = fm.fidelity(train, syn, enc)
                per["fair (s ~ A(z))"].append(
                    {
                        **fm.downstream_metrics(syn, test, enc, seed),
                        "label_gap": fm.data_gap(syn),
                        "marginal_distance": f["mean_marginal_distance"],
                        "correlation_mad": f["correlation_mad"],
                        **common,
                    }
                )
            d = m["downstream"]
            print(
                f"[fair] seed {seed} {name}: acc {d['accuracy']:.3f} dp {d['dp_gap']:.3f} "
                f"eo {d['eo_gap']:.3f} label gap {m['synthetic_label_gap']:.3f}",
                flush=True,
            )
    summary = {name: {k: _ms([r[k] for r in rows]) for k in rows[0]} for name, rows in per.items()}
    return {
        "dataset": train.recipe,
        "train_rows": len(train),
        "test_rows": len(test),
        "downstream": "logistic regression on all columns but the label (protected included)",
        "teacher_steps": teacher_steps,
        "generator_steps": gen_steps,
        "summary": summary,
        "per_seed": per,
    }


def tables(result: dict) -> str:
    lines = []
    for name, r in result["graphs"].items():
        models = list(r["rows"][0]["accuracy"])
        lines.append(
            f"\n**{name}** ({r['train_graphs']} train / {r['test_graphs']} test graphs, "
            f"mean {r['mean_nodes']:.1f} nodes; accuracy mean ± sd over {result['seeds']} seeds)\n"
        )
        lines.append(
            "| method | graphs/class | "
            + " | ".join(models)
            + " | distill s | compression | compact compression |"
        )
        lines.append("|---|---|" + "---|" * len(models) + "---|---|---|")
        for row in r["rows"]:
            accs = " | ".join(
                f"{row['accuracy'][m]['mean']:.3f} ± {row['accuracy'][m]['std']:.3f}"
                for m in models
            )
            cc = row.get("compact_compression_ratio")
            lines.append(
                f"| {row['method']} | {row['k'] or 'all'} | {accs} | "
                f"{row['distill_seconds']:.2f} | {row['compression_ratio']:.1f}x | "
                f"{f'{cc:.1f}x' if cc else ''} |"
            )
    k = result.get("karate")
    if k:
        lines.append(
            f"\n**Karate Club, node level** ({k['train_nodes']} train / "
            f"{k['test_nodes']} test nodes, GCN accuracy over {result['seeds']} seeds; "
            f"GCond {k['synthetic_nodes']} nodes, {k['gcond_seconds']:.1f} s)\n"
        )
        lines.append("| training graph | accuracy |")
        lines.append("|---|---|")
        for name, v in k["rows"].items():
            lines.append(f"| {name} | {v['mean_std'][0]:.3f} ± {v['mean_std'][1]:.3f} |")
    f = result.get("fair")
    if f:
        lines.append(
            f"\n**Fair synthetic data** ({f['train_rows']} train / {f['test_rows']} test rows; "
            f"mean ± sd over {len(f['per_seed']['fair'])} seeds)\n"
        )
        lines.append(
            "| training data | accuracy | DP gap | EO gap | label DP gap of data | marginal dist. "
            "| corr. MAD | s-probe acc (majority) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for name in f["summary"]:
            s = f["summary"][name]

            def c(key, s=s):
                return f"{s[key][0]:.3f} ± {s[key][1]:.3f}" if key in s else ""

            probe = (
                f"{s['s_probe_accuracy'][0]:.3f} ({s['s_majority'][0]:.3f})"
                if "s_probe_accuracy" in s
                else ""
            )
            lines.append(
                f"| {name} | {c('accuracy')} | {c('dp_gap')} | {c('eo_gap')} | {c('label_gap')} | "
                f"{c('marginal_distance')} | {c('correlation_mad')} | {probe} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3, help="fresh GNNs per kind and set")
    ap.add_argument("--budgets", default="10,50", help="graphs per class")
    ap.add_argument("--datasets", default="molecules,motifs")
    ap.add_argument("--models", default="gcn,gin,gat")
    ap.add_argument("--gnn-steps", type=int, default=300)
    ap.add_argument("--doscond-iters", type=int, default=300)
    ap.add_argument("--fair-seeds", type=int, default=3)
    ap.add_argument("--fair-teacher-steps", type=int, default=1500)
    ap.add_argument("--fair-generator-steps", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny settings to check the script")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "graph_distill.json"
    )
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.budgets, args.gnn_steps, args.doscond_iters = 1, "5", 20, 5
        args.fair_seeds, args.fair_teacher_steps, args.fair_generator_steps = 1, 30, 20
    torch.set_num_threads(args.threads)

    from fewstep.core.io import atomic_write_json
    from fewstep.dataset_distill.graphs.evaluate import GNNTrainConfig
    from fewstep.dataset_distill.graphs.synthetic import load_graph_dataset
    from fewstep.dataset_distill.graphs.tu import read_tu, write_tu

    t_start = time.perf_counter()
    gnn_cfg = GNNTrainConfig(steps=args.gnn_steps)
    budgets = [int(b) for b in args.budgets.split(",")]
    models = tuple(args.models.split(","))
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "seeds": args.seeds,
        "gnn": gnn_cfg.__dict__,
        "budgets": budgets,
        "graphs": {},
    }
    for name in args.datasets.split(","):
        ds = load_graph_dataset(name, 600, 0)
        if name == "molecules":  # through the TU reader, as a user's files would come
            folder = Path(tempfile.mkdtemp(prefix="fewstep-tu-"))
            recipe = ds.recipe
            ds = read_tu(write_tu(ds, folder, "MOLECULES"), "MOLECULES")
            ds.recipe = f"{recipe}; written to and read back from TU files"
            name = "molecules (TU files)"
        result["graphs"][name] = graph_benchmark(
            name, ds, budgets, args.seeds, models, gnn_cfg, args.doscond_iters
        )
    result["karate"] = karate_benchmark(args.seeds)
    print(
        "[karate]",
        json.dumps({k: v["mean_std"] for k, v in result["karate"]["rows"].items()}),
        flush=True,
    )
    result["fair"] = fair_benchmark(
        args.fair_seeds, args.fair_teacher_steps, args.fair_generator_steps
    )
    result["total_seconds"] = time.perf_counter() - t_start
    table = tables(result)
    result["table_markdown"] = table
    atomic_write_json(args.out, result)
    print(table)
    print(f"\ntotal {result['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
