"""`fewstep distill data-mirage` / `data-gcond` end to end at toy scale on CPU, plus the
graph-set file format and the shared GNN trainer (accuracy figures are the benchmark's job)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli

TINY_EVAL = [
    "--data.num_graphs", "60",
    "--eval.seeds", "1",
    "--eval.models", "gin,gcn",
    "--eval.gnn.steps", "4",
    "--eval.gnn.val_every", "2",
    "--eval.gnn.hidden", "8",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mirage_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mirage"
    args = ["distill", "data-mirage", "--out", str(out), *TINY_EVAL, "--sets_per_class", "3"]
    assert cli.main(args + ["--min_support", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def gcond_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gcond"
    args = [
        "distill", "data-gcond", "--out", str(out), *TINY_EVAL,
        "--data.dataset", "motifs",
        "--doscond.iterations", "3", "--doscond.graphs_per_class", "2", "--doscond.hidden", "8",
    ]  # fmt: skip
    assert cli.main(args) == 0
    return out


def _check_run(run, method):
    for name in (
        "config.json",
        "metrics.json",
        "report.html",
        "distilled.safetensors",
        "distilled_graphs.png",
    ):
        assert (run / name).exists(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == method
    assert set(m["accuracy"]) == {"distilled", "random", "full"}
    for per_kind in m["accuracy"].values():
        assert set(per_kind) == {"gin", "gcn"}
        assert all(0.0 <= r["mean"] <= 1.0 for r in per_kind.values())
    assert m["size"]["compression_ratio"] > 1 and m["distill_seconds"] > 0
    html = (run / "report.html").read_text()
    assert "Test accuracy" in html and "distilled_graphs.png" in html
    return m


def test_mirage_run(mirage_run):
    m = _check_run(mirage_run, "mirage")
    assert m["graphs_per_class"] <= 3 and m["size"]["compression_ratio_compact"] > 1
    assert m["info"]["distinct_trees"] > 0


def test_gcond_run(gcond_run):
    m = _check_run(gcond_run, "doscond")
    assert m["graphs_per_class"] == 2 and m["dataset"] == "motifs"
    assert len(m["loss_curve"]) == 3 and (gcond_run / "loss_curve.png").exists()


def test_sample_and_eval_commands(mirage_run, gcond_run, capsys):
    assert cli.main(["sample", str(mirage_run), "--n", "4"]) == 0
    assert (mirage_run / "distilled_4.png").exists()
    capsys.readouterr()
    assert cli.main(["eval", str(gcond_run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"acc_distilled_gin", "acc_distilled_gcn"}
    assert cli.main(["report", str(gcond_run)]) == 0
    assert cli.main(["eval", str(mirage_run)]) == 0  # test graphs viewed through the file's trees
    again = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    m = json.loads((mirage_run / "metrics.json").read_text())
    assert m["info"]["test_view"] == "trees"
    assert again["acc_distilled_gin"] == pytest.approx(m["accuracy"]["distilled"]["gin"]["mean"])


def test_karate_node_condensation(tmp_path):
    out = tmp_path / "karate"
    args = [
        "distill", "data-gcond", "--out", str(out), "--data.dataset", "karate",
        "--node.iterations", "3", "--eval.seeds", "1", "--eval.gnn.steps", "5",
    ]  # fmt: skip
    assert cli.main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "gcond-node" and m["size"]["nodes"] == 8  # 2 per class, 4 classes
    assert (out / "synthetic_nodes.safetensors").exists()


def test_config_errors_are_clear(tmp_path, capsys):
    args = ["distill", "data-mirage", "--out", str(tmp_path / "x"), "--hops", "3"]
    assert cli.main(args) == 2
    assert "--eval.gnn.layers 3" in capsys.readouterr().err
    args = ["distill", "data-gcond", "--out", str(tmp_path / "y"), "--data.dataset", "cora"]
    assert cli.main(args) == 2
    assert "motifs, families, molecules" in capsys.readouterr().err


def test_graph_set_roundtrip_and_weighted_sampling(tmp_path):
    from fewstep.dataset_distill.graphs.evaluate import GNNTrainConfig, fit_gnn
    from fewstep.dataset_distill.graphs.graphset import GraphSet
    from fewstep.dataset_distill.graphs.synthetic import molecule_dataset

    graphs = molecule_dataset(6, seed=0).graphs
    graphs[0].root_mask = torch.zeros(graphs[0].num_nodes, dtype=torch.bool)
    graphs[0].root_mask[0] = True
    s = GraphSet(graphs, torch.tensor([1.0, 2, 3, 4, 5, 6]))
    back = GraphSet.load(s.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.weights, s.weights)
    for a, b in zip(s.graphs, back.graphs):
        assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)
        assert int(a.y) == int(b.y)
    assert torch.equal(back.graphs[0].root_mask, graphs[0].root_mask)
    assert getattr(back.graphs[1], "root_mask", None) is None
    with pytest.raises(ValueError, match="weights must have shape"):
        GraphSet(graphs, torch.ones(2))
    # a set whose weight sits on class-1 graphs only teaches class 1
    w = torch.tensor([0.0 if int(g.y) == 0 else 1.0 for g in graphs])
    model = fit_gnn(GraphSet(graphs, w), "gin", 4, 2, GNNTrainConfig(steps=30, hidden=8), 0)
    from fewstep.dataset_distill.graphs.evaluate import accuracy

    only0 = [g for g in graphs if int(g.y) == 0]
    assert accuracy(model, only0) == 0.0


def test_packed_batches_equal_torch_geometric_batches():
    from torch_geometric.data import Batch, Data

    from fewstep.dataset_distill.graphs.evaluate import PackedGraphs
    from fewstep.dataset_distill.graphs.synthetic import motif_dataset

    graphs = motif_dataset(7, seed=5).graphs
    graphs[3].root_mask = torch.arange(graphs[3].num_nodes) % 3 == 0
    idx = torch.tensor([3, 0, 3, 6, 1])  # repeats, as weighted sampling draws them
    got = PackedGraphs(graphs).batch(idx)
    plain = []
    for i in idx.tolist():
        g = graphs[i]
        rm = getattr(g, "root_mask", None)
        rm = rm if rm is not None else torch.ones(g.num_nodes, dtype=torch.bool)
        plain.append(Data(x=g.x, edge_index=g.edge_index, y=g.y, root_mask=rm))
    want = Batch.from_data_list(plain)
    assert torch.equal(got.x, want.x) and torch.equal(got.edge_index, want.edge_index)
    assert torch.equal(got.batch, want.batch) and torch.equal(got.root_mask, want.root_mask)
    assert torch.equal(got.y, want.y) and got.num_graphs == 5
