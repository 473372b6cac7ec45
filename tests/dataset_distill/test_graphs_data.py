"""TU-format reader (on files the tests write) and the seeded synthetic graph datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fewstep.dataset_distill.graphs.synthetic import (
    load_graph_dataset,
    molecule_dataset,
    motif_dataset,
    stratified_split,
)
from fewstep.dataset_distill.graphs.tu import read_tu, write_tu

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(folder: Path, name: str, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, text in files.items():
        (folder / f"{name}_{k}.txt").write_text(text)
    return folder


# two graphs: a labelled triangle (edges listed one way only, one duplicate) and a path
TOY = {
    "A": "1, 2\n2, 3\n3, 1\n1, 2\n4, 5\n5, 4\n5, 6\n6, 5\n",
    "graph_indicator": "1\n1\n1\n2\n2\n2\n",
    "graph_labels": "-1\n1\n",
    "node_labels": "7\n3\n3\n7\n7\n3\n",
    "edge_labels": "0\n1\n2\n0\n1\n1\n2\n2\n",
    "node_attributes": "0.5, 1\n1, 2\n1.5, 3\n2, 4\n2.5, 5\n3, 6\n",
}


def test_read_tu_hand_written(tmp_path):
    ds = read_tu(_write(tmp_path / "toy", "TOY", TOY), use_node_attributes=True)
    assert ds.name == "TOY" and ds.num_classes == 2 and ds.class_values == [-1, 1]
    g0, g1 = ds.graphs
    assert [int(g0.y), int(g1.y)] == [0, 1]
    # node labels 3, 7 -> 0, 1; x = one-hot labels then attributes
    assert g0.node_label.tolist() == [1, 0, 0] and g1.node_label.tolist() == [1, 1, 0]
    assert torch.equal(g0.x[:, :2], torch.tensor([[0.0, 1], [1, 0], [1, 0]]))
    assert torch.allclose(g1.x[:, 2:], torch.tensor([[2.0, 4], [2.5, 5], [3, 6]]))
    # triangle completed in both directions without duplicates; local node ids
    assert sorted(map(tuple, g0.edge_index.t().tolist())) == [
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 2),
        (2, 0),
        (2, 1),
    ]
    assert sorted(map(tuple, g1.edge_index.t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    # an edge label follows its edge into the reverse direction
    lab = dict(zip(map(tuple, g0.edge_index.t().tolist()), g0.edge_label.tolist()))
    assert lab[(0, 1)] == lab[(1, 0)] == 0 and lab[(1, 2)] == lab[(2, 1)] == 1
    assert lab[(2, 0)] == lab[(0, 2)] == 2


def test_unlabelled_graphs_get_degree_labels(tmp_path):
    files = {k: v for k, v in TOY.items() if k in ("A", "graph_indicator", "graph_labels")}
    ds = read_tu(_write(tmp_path / "u", "U", files), max_degree_label=1)
    assert ds.graphs[0].node_label.tolist() == [1, 1, 1]  # degree 2 capped at 1
    assert ds.graphs[1].node_label.tolist() == [1, 1, 1]
    assert ds.num_node_labels == 2


def test_write_read_roundtrip(tmp_path):
    ds = motif_dataset(num_graphs=8, seed=3)
    back = read_tu(write_tu(ds, tmp_path / "rt", "RT"), "RT")
    assert back.num_classes == ds.num_classes
    for a, b in zip(ds.graphs, back.graphs):
        assert int(a.y) == int(b.y)
        assert torch.equal(a.edge_index, b.edge_index)
        # labels are renumbered to the ones present, order kept
        uniq = torch.unique(torch.cat([g.node_label for g in ds.graphs]))
        assert torch.equal(torch.searchsorted(uniq, a.node_label), b.node_label)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"graph_labels": None}, "missing required file TOY_graph_labels.txt"),
        ({"A": "1, 2\n3, 4\n"}, "line 2: the edge joins two different graphs"),
        ({"A": "1, 9\n"}, "node ids must lie in 1..6"),
        ({"A": "1; x\n"}, "TOY_A.txt line 1: expected integers"),
        ({"node_labels": "1\n2\n"}, "has 2 lines, expected 6"),
        ({"graph_indicator": "1\n1\n3\n2\n2\n2\n"}, "graph ids must lie in 1..2"),
    ],
)
def test_malformed_tu_files_named(tmp_path, edit, message):
    files = {**TOY, **{k: v for k, v in edit.items() if v is not None}}
    files = {k: v for k, v in files.items() if not (k in edit and edit[k] is None)}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_tu(_write(tmp_path / "bad", "TOY", files), "TOY")


def test_generated_datasets_are_seeded_and_balanced():
    a, b, c = motif_dataset(40, seed=1), motif_dataset(40, seed=1), motif_dataset(40, seed=2)
    assert all(torch.equal(x.edge_index, y.edge_index) for x, y in zip(a.graphs, b.graphs))
    assert any(
        x.num_nodes != y.num_nodes or not torch.equal(x.edge_index, y.edge_index)
        for x, y in zip(a.graphs, c.graphs)
    )
    assert torch.bincount(a.labels()).tolist() == [10, 10, 10, 10]
    fam = load_graph_dataset("families", 30, 0)
    assert fam.num_classes == 3 and torch.bincount(fam.labels()).tolist() == [10, 10, 10]


def _has_clique4(g) -> bool:
    adj = {v: set() for v in range(g.num_nodes)}
    for u, v in g.edge_index.t().tolist():
        adj[u].add(v)
    import itertools

    return any(
        all(b in adj[a] for a, b in itertools.combinations(q, 2))
        for q in itertools.combinations(range(g.num_nodes), 4)
        if all(len(adj[x]) >= 3 for x in q)
    )


def test_motif_classes_carry_their_motif():
    ds = motif_dataset(
        8, seed=0, motifs=("house", "clique4"), base_min=6, base_max=7, noise_edges=0
    )
    for g in ds.graphs:
        # base graphs are trees plus the motif; only the clique class has a 4-clique
        assert _has_clique4(g) == (int(g.y) == 1)
        deg = torch.bincount(g.edge_index[1], minlength=g.num_nodes)
        assert torch.equal(g.node_label, deg.clamp(max=6))


def test_molecule_classes_differ_only_by_the_nitro_group():
    ds = molecule_dataset(30, seed=0)
    for g in ds.graphs:
        nl = g.node_label
        nitro = False
        for v in torch.nonzero(nl == 1).view(-1).tolist():  # N atoms
            nbrs = g.edge_index[0][g.edge_index[1] == v]
            nitro |= int((nl[nbrs] == 2).sum()) == 2
        assert nitro == (int(g.y) == 1)


def test_stratified_split_keeps_classes_and_covers_everything():
    labels = torch.tensor([0] * 30 + [1] * 10)
    tr, va, te = stratified_split(labels, (0.5, 0.2, 0.3), seed=0)
    assert sorted(tr + va + te) == list(range(40))
    assert int((labels[tr] == 1).sum()) == 5 and int((labels[te] == 1).sum()) == 3


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="motifs, families, molecules"):
        load_graph_dataset("cora", 10, 0)
