"""``fewstep distill data-mirage`` and ``fewstep distill data-gcond``: graph dataset
distillation, evaluated by training fresh GNNs (GCN, GIN, GAT) on the distilled set and
testing them on held-out real graphs, next to the full training set and a random subset of
the same number of graphs per class.

The run folder gets ``config.json``, the distilled set (``distilled.safetensors``),
``metrics.json`` (accuracies mean +- std over seeds, compression ratio, wall time),
``distilled_graphs.png`` and ``report.html``. ``data-gcond --data.dataset karate`` runs
node-level GCond on torch-geometric's Karate Club instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.dataset_distill.graphs.evaluate import GNNTrainConfig
from fewstep.dataset_distill.graphs.gcond import DosCondConfig, GCondNodeConfig


@dataclass
class GraphDataConfig:
    dataset: str = "molecules"  # molecules, motifs, families, karate (data-gcond), or a TU folder
    tu_name: str = ""  # dataset name in a TU folder holding several (default: the only one)
    num_graphs: int = 600  # generated datasets: number of graphs
    seed: int = 0  # generator seed and train/val/test split seed
    val_fraction: float = 0.1  # share of graphs for validation (checkpoint selection)
    test_fraction: float = 0.2  # share of graphs for the reported test accuracy


@dataclass
class GraphEvalConfig:
    models: tuple[str, ...] = ("gcn", "gin", "gat")  # fresh GNN kinds trained on each set
    seeds: int = 3  # fresh models per kind (accuracy mean +- std)
    baselines: bool = True  # also train on the full training set and an equal random subset
    gnn: GNNTrainConfig = field(default_factory=GNNTrainConfig)  # how fresh GNNs train


@dataclass
class MirageRecipeConfig:
    data: GraphDataConfig = field(default_factory=GraphDataConfig)  # which graphs
    hops: int = 2  # computation-tree depth; must equal eval.gnn.layers
    min_support: float = 0.05  # a tree set is frequent in >= this share of a class's graphs
    sets_per_class: int = 50  # keep the most frequent tree sets per class (the size budget)
    max_set_size: int = 32  # largest tree set mined
    closed_only: bool = True  # skip sets with a same-support superset (no redundant subsets)
    drop_shared: bool = True  # drop sets frequent in another class too (official code)
    test_view: str = "trees"  # test graphs reach the GNN as their distilled trees, or "graph"
    eval: GraphEvalConfig = field(default_factory=GraphEvalConfig)  # evaluation
    threads: int = 1  # torch CPU threads (small graphs: 1 is fastest; 0 = torch's default)


@dataclass
class GCondRecipeConfig:
    data: GraphDataConfig = field(default_factory=GraphDataConfig)  # which graphs
    doscond: DosCondConfig = field(default_factory=DosCondConfig)  # graph-level condensation
    node: GCondNodeConfig = field(default_factory=GCondNodeConfig)  # node-level (karate)
    eval: GraphEvalConfig = field(default_factory=GraphEvalConfig)  # evaluation
    seed: int = 0  # condensation seed
    threads: int = 1  # torch CPU threads (small graphs: 1 is fastest; 0 = torch's default)


# --------------------------------------------------------------------------- shared parts


def prepare_graphs(data: GraphDataConfig):
    """(dataset, train, val, test) lists of graphs, split by class with ``data.seed``."""
    from fewstep.dataset_distill.graphs.synthetic import load_graph_dataset, stratified_split

    if not 0 < data.val_fraction + data.test_fraction < 1:
        raise ValueError("val_fraction + test_fraction must lie in (0, 1)")
    ds = load_graph_dataset(data.dataset, data.num_graphs, data.seed, data.tu_name)
    frac = (1 - data.val_fraction - data.test_fraction, data.val_fraction, data.test_fraction)
    tr, va, te = stratified_split(ds.labels(), frac, data.seed)
    g = ds.graphs
    return ds, [g[i] for i in tr], [g[i] for i in va], [g[i] for i in te]


def evaluate_sets(
    sets: dict, val: list, test: list, ds, ev: GraphEvalConfig, views: dict | None = None
) -> dict[str, dict[str, dict]]:
    """{set name: {gnn kind: {accs, mean, std}}} for every GraphSet in ``sets``; ``views``
    maps a set name to the (val, test) graphs its models see instead of the plain ones."""
    from fewstep.dataset_distill.graphs.evaluate import evaluate_graph_set

    out = {}
    for name, s in sets.items():
        v, t = (views or {}).get(name, (val, test))
        out[name] = evaluate_graph_set(
            s, v, t, ds.num_features, ds.num_classes, tuple(ev.models), ev.seeds, ev.gnn
        )
    return out


def _trees_view(distilled, graphs: list, hops: int, num_node_labels: int) -> list:
    from fewstep.dataset_distill.graphs.mirage import frequent_tree_view, tree_vocabulary

    table, kept = tree_vocabulary(distilled.graphs, hops)
    return [frequent_tree_view(g, table, kept, hops, num_node_labels) for g in graphs]


def mirage_views(cfg, distilled, ds, val: list, test: list) -> dict:
    """The (val, test) graphs a Mirage-trained GNN sees under ``cfg.test_view``."""
    if cfg.test_view not in TEST_VIEWS:
        raise ValueError(f"test_view must be one of {', '.join(TEST_VIEWS)}, got {cfg.test_view!r}")
    view = TEST_VIEWS[cfg.test_view]
    return {
        "distilled": tuple(view(distilled, x, cfg.hops, ds.num_node_labels) for x in (val, test))
    }


# How test graphs reach a Mirage-trained GNN (mirage.py, step 5).
TEST_VIEWS: dict[str, Callable] = {
    "trees": _trees_view,
    "graph": lambda distilled, graphs, hops, n: graphs,
}


def _flat(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for set_name, per_kind in metrics.get("accuracy", {}).items():
        for kind, r in per_kind.items():
            out[f"acc_{set_name}_{kind}"] = r["mean"]
    out.update({k: v for k, v in metrics.get("size", {}).items()})
    return out


def _graph_metrics(
    method: str, cfg, ds, train, val, test, distilled, seconds, info, views=None
) -> dict:
    from fewstep.dataset_distill.graphs.evaluate import random_subset, size_stats
    from fewstep.dataset_distill.graphs.graphset import GraphSet

    full = GraphSet.uniform(train)
    per_class = max(1, round(len(distilled.graphs) / ds.num_classes))
    sets = {"distilled": distilled}
    if cfg.eval.baselines:
        sets["random"] = random_subset(train, per_class, ds.num_classes, cfg.data.seed)
        sets["full"] = full
    acc = evaluate_sets(sets, val, test, ds, cfg.eval, views)
    size = size_stats(distilled, full)
    if "stored_scalars_compact" in info:
        size["compression_ratio_compact"] = full.stored_scalars() / info["stored_scalars_compact"]
    return {
        "method": method,
        "dataset": ds.name,
        "dataset_recipe": ds.recipe,
        "train_graphs": len(train),
        "val_graphs": len(val),
        "test_graphs": len(test),
        "graphs_per_class": per_class,
        "distill_seconds": seconds,
        "size": size,
        "accuracy": acc,
        "info": {k: v for k, v in info.items() if k != "loss_curve"},
    }


def _finish(recipe, out_dir: Path, distilled, metrics: dict, curve=None) -> dict:
    from fewstep.core.io import atomic_write_json
    from fewstep.dataset_distill.graphs.draw import draw_graphs

    distilled.save(out_dir / "distilled.safetensors", {"method": metrics["method"]})
    for g, w in zip(distilled.graphs, distilled.weights.tolist()):
        g.weight = w
    draw_graphs(distilled.graphs[:20], out_dir / "distilled_graphs.png")
    if curve:
        from fewstep.core.report import save_line_plot

        save_line_plot(
            out_dir / "loss_curve.png",
            {"matching loss": curve},
            title="gradient matching loss",
            xlabel="iteration",
        )
        metrics["loss_curve"] = curve
    atomic_write_json(out_dir / "metrics.json", metrics)
    recipe.report(out_dir)
    return _flat(metrics)


def _load_run(run_dir: Path, config_cls):
    from fewstep.core.config import from_dict

    cfg_json = json.loads((Path(run_dir) / "config.json").read_text())
    return from_dict(config_cls, cfg_json["config"])


def _set_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


def write_graph_report(run_dir: Path, title: str) -> Path:
    from fewstep.core.report import Report

    run_dir = Path(run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    rep = Report(run_dir, title)
    rep.add_text(
        "Data",
        f"{m.get('dataset')}: {m.get('dataset_recipe', '')}\n"
        f"train/val/test graphs (or nodes): {m.get('train_graphs')}/{m.get('val_graphs')}/"
        f"{m.get('test_graphs')}; distillation wall time {m['distill_seconds']:.2f} s",
    )
    rows = []
    for set_name, per_kind in m["accuracy"].items():
        row = {"training set": set_name}
        for kind, r in per_kind.items():
            row[kind] = f"{r['mean']:.3f} ± {r['std']:.3f}"
        rows.append(row)
    rep.add_table("Test accuracy of fresh models (mean ± std over seeds)", rows)
    rep.add_table("Size", [m["size"]])
    if m.get("info"):
        rep.add_text("Method details", json.dumps(m["info"], indent=1))
    if (run_dir / "distilled_graphs.png").exists():
        rep.add_image("Distilled graphs", run_dir / "distilled_graphs.png", "colour = node label")
    if (run_dir / "loss_curve.png").exists():
        rep.add_image("Matching loss", run_dir / "loss_curve.png")
    return rep.write()


def _sample_png(run_dir: Path, n: int, out: Path | None) -> Path:
    from fewstep.dataset_distill.graphs.draw import draw_graphs
    from fewstep.dataset_distill.graphs.graphset import GraphSet

    s = GraphSet.load(Path(run_dir) / "distilled.safetensors")
    for g, w in zip(s.graphs, s.weights.tolist()):
        g.weight = w
    return draw_graphs(s.graphs[:n], out or Path(run_dir) / f"distilled_{n}.png")


def _re_evaluate(run_dir: Path, cfg, views_fn=None) -> dict:
    from fewstep.dataset_distill.graphs.graphset import GraphSet

    ds, train, val, test = prepare_graphs(cfg.data)
    distilled = GraphSet.load(Path(run_dir) / "distilled.safetensors")
    views = views_fn(cfg, distilled, ds, val, test) if views_fn else None
    acc = evaluate_sets({"distilled": distilled}, val, test, ds, cfg.eval, views)
    return {f"acc_distilled_{k}": r["mean"] for k, r in acc["distilled"].items()} | {
        f"acc_distilled_{k}_std": r["std"] for k, r in acc["distilled"].items()
    }


# --------------------------------------------------------------------------- Mirage


class MirageRecipe:
    name = "data-mirage"
    summary = "Mirage: frequent computation-tree sets per class as a model-agnostic graph set"
    config_cls = MirageRecipeConfig

    def distill(self, cfg: MirageRecipeConfig, objective_cfg, out_dir: Path) -> dict:
        from fewstep.dataset_distill.graphs.graphset import GraphSet
        from fewstep.dataset_distill.graphs.mirage import mirage_distill

        if cfg.hops != cfg.eval.gnn.layers:
            raise ValueError(
                f"hops ({cfg.hops}) must equal the GNN depth eval.gnn.layers "
                f"({cfg.eval.gnn.layers}): pass --eval.gnn.layers {cfg.hops}"
            )
        _set_threads(cfg.threads)
        out_dir = Path(out_dir)
        ds, train, val, test = prepare_graphs(cfg.data)
        t0 = time.perf_counter()
        res = mirage_distill(
            train,
            ds.num_classes,
            ds.num_node_labels,
            hops=cfg.hops,
            min_support=cfg.min_support,
            sets_per_class=cfg.sets_per_class,
            max_set_size=cfg.max_set_size,
            closed_only=cfg.closed_only,
            drop_shared=cfg.drop_shared,
        )
        seconds = time.perf_counter() - t0
        distilled = GraphSet(res.graphs, res.weights)
        views = mirage_views(cfg, distilled, ds, val, test)
        info = {**res.info, "test_view": cfg.test_view}
        m = _graph_metrics("mirage", cfg, ds, train, val, test, distilled, seconds, info, views)
        return _finish(self, out_dir, distilled, m)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        return _sample_png(run_dir, n, out)

    def evaluate(self, run_dir: Path) -> dict:
        cfg = _load_run(run_dir, MirageRecipeConfig)
        _set_threads(cfg.threads)
        return _re_evaluate(run_dir, cfg, mirage_views)

    def report(self, run_dir: Path) -> Path:
        return write_graph_report(run_dir, "Mirage graph distillation")


# --------------------------------------------------------------------------- GCond / DosCond


def _doscond_run(cfg: GCondRecipeConfig, out_dir: Path) -> tuple:
    from fewstep.dataset_distill.graphs.gcond import doscond_distill, mean_matching_loss

    ds, train, val, test = prepare_graphs(cfg.data)
    t0 = time.perf_counter()
    syn, info = doscond_distill(train, ds.num_classes, cfg.doscond, cfg.seed)
    seconds = time.perf_counter() - t0
    info["matching_loss_final"] = mean_matching_loss(syn, train, ds.num_classes, cfg.doscond)
    distilled = syn.to_graph_set()
    m = _graph_metrics("doscond", cfg, ds, train, val, test, distilled, seconds, info)
    return distilled, m, info["loss_curve"]


def karate_split(seed: int, train_fraction: float = 0.5):
    """Karate Club (Zachary 1977; torch-geometric's 4-community labels): x [34, 34] one-hot,
    dense adjacency, labels, and a class-stratified train/test node split."""
    from torch_geometric.datasets import KarateClub
    from torch_geometric.utils import to_dense_adj

    from fewstep.dataset_distill.graphs.synthetic import stratified_split

    d = KarateClub()[0]
    tr, _, te = stratified_split(d.y, (train_fraction, 0.0, 1 - train_fraction), seed)
    train_mask = torch.zeros(d.num_nodes, dtype=torch.bool)
    train_mask[tr] = True
    test_mask = torch.zeros(d.num_nodes, dtype=torch.bool)
    test_mask[te] = True
    adj = to_dense_adj(d.edge_index, max_num_nodes=d.num_nodes)[0]
    return d.x, adj, d.y, train_mask, test_mask, int(d.y.max()) + 1


def _karate_run(cfg: GCondRecipeConfig, out_dir: Path) -> tuple:
    import statistics

    from torch_geometric.data import Data

    from fewstep.dataset_distill.graphs.gcond import gcond_node_distill, node_accuracy
    from fewstep.dataset_distill.graphs.graphset import GraphSet

    x, adj, y, train_mask, test_mask, c = karate_split(cfg.data.seed)
    t0 = time.perf_counter()
    xs, a_s, ys, info = gcond_node_distill(x, adj, y, train_mask, c, cfg.node, cfg.seed)
    seconds = time.perf_counter() - t0
    steps = cfg.eval.gnn.steps
    gen = torch.Generator().manual_seed(cfg.data.seed)
    rand_idx = torch.cat(
        [
            torch.nonzero(train_mask & (y == k)).view(-1)[
                torch.randperm(int((train_mask & (y == k)).sum()), generator=gen)[
                    : cfg.node.nodes_per_class
                ]
            ]
            for k in range(c)
        ]
    )
    sets = {
        "distilled": (xs, a_s, ys, None),
        "full": (x, adj, y, train_mask),
        "random": (x[rand_idx], adj[rand_idx][:, rand_idx], y[rand_idx], None),
    }
    if not cfg.eval.baselines:
        sets = {"distilled": sets["distilled"]}
    acc = {}
    for name, (xt, at, yt, mt) in sets.items():
        accs = [
            node_accuracy(xt, at, yt, x, adj, y, test_mask, c, steps=steps, seed=s, train_mask=mt)
            for s in range(cfg.eval.seeds)
        ]
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        acc[name] = {"gcn": {"accs": accs, "mean": statistics.fmean(accs), "std": sd}}
    full_scalars = int(train_mask.sum()) * x.shape[1] + int(
        (adj[train_mask][:, train_mask] > 0).sum()
    )
    syn_scalars = xs.numel() + xs.shape[0] * (xs.shape[0] - 1) // 2
    ei = torch.nonzero(a_s > 0.5).t().contiguous()
    graph = Data(x=xs, edge_index=ei, y=torch.tensor([0]))
    graph.node_label = ys
    metrics = {
        "method": "gcond-node",
        "dataset": "karate",
        "dataset_recipe": "torch-geometric KarateClub (34 nodes, 4 classes), 50% train nodes",
        "train_graphs": int(train_mask.sum()),
        "val_graphs": 0,
        "test_graphs": int(test_mask.sum()),
        "distill_seconds": seconds,
        "size": {
            "nodes": int(xs.shape[0]),
            "stored_scalars": syn_scalars,
            "compression_ratio": full_scalars / syn_scalars,
        },
        "accuracy": acc,
        "info": {k: v for k, v in info.items() if k != "loss_curve"},
    }
    return GraphSet.uniform([graph]), metrics, info["loss_curve"], (xs, a_s, ys)


class GCondRecipe:
    name = "data-gcond"
    summary = "gradient-matching condensation: DosCond (graph classification), GCond (karate)"
    config_cls = GCondRecipeConfig

    def distill(self, cfg: GCondRecipeConfig, objective_cfg, out_dir: Path) -> dict:
        _set_threads(cfg.threads)
        out_dir = Path(out_dir)
        if cfg.data.dataset in NODE_TASKS:
            distilled, m, curve, (xs, a_s, ys) = NODE_TASKS[cfg.data.dataset](cfg, out_dir)
            from safetensors.torch import save_file

            save_file({"x": xs, "adj": a_s, "y": ys}, str(out_dir / "synthetic_nodes.safetensors"))
        else:
            distilled, m, curve = _doscond_run(cfg, out_dir)
        return _finish(self, out_dir, distilled, m, curve)

    def sample(self, run_dir: Path, n: int, out: Path | None, steps: int | None = None) -> Path:
        return _sample_png(run_dir, n, out)

    def evaluate(self, run_dir: Path) -> dict:
        cfg = _load_run(run_dir, GCondRecipeConfig)
        _set_threads(cfg.threads)
        if cfg.data.dataset in NODE_TASKS:
            from safetensors.torch import load_file

            from fewstep.dataset_distill.graphs.gcond import node_accuracy

            t = load_file(str(Path(run_dir) / "synthetic_nodes.safetensors"))
            x, adj, y, _, test_mask, c = karate_split(cfg.data.seed)
            accs = [
                node_accuracy(t["x"], t["adj"], t["y"], x, adj, y, test_mask, c, seed=s)
                for s in range(cfg.eval.seeds)
            ]
            return {"acc_distilled_gcn": sum(accs) / len(accs)}
        return _re_evaluate(run_dir, cfg)

    def report(self, run_dir: Path) -> Path:
        return write_graph_report(run_dir, "Gradient-matching graph condensation (GCond/DosCond)")


# Node-classification datasets data-gcond condenses with GCond instead of DosCond.
NODE_TASKS: dict[str, Callable[[GCondRecipeConfig, Path], tuple]] = {"karate": _karate_run}

MIRAGE = MirageRecipe()
GCOND = GCondRecipe()
