"""Mirage: canonical computation trees, frequent tree-set mining against brute force, and the
tree-set graph a standard GNN consumes (parity with the GNN on the original graph)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from fewstep.dataset_distill.graphs.gnn import GraphClassifier
from fewstep.dataset_distill.graphs.mirage import (
    TreeTable,
    computation_tree_ids,
    expand_tree,
    mine_tree_sets,
    mirage_distill,
    tree_set_graph,
)
from fewstep.dataset_distill.graphs.synthetic import molecule_dataset, motif_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _permute(g, perm: torch.Tensor):
    """The same graph with node i renamed perm[i]."""
    from torch_geometric.data import Data

    inv = torch.argsort(perm)
    d = Data(x=g.x[inv], edge_index=perm[g.edge_index], y=g.y)
    d.node_label = g.node_label[inv]
    return d


@pytest.fixture(scope="module")
def graphs():
    return motif_dataset(6, seed=4).graphs


def test_canonical_ids_are_isomorphism_invariant(graphs):
    g = graphs[0]
    perm = torch.randperm(g.num_nodes, generator=torch.Generator().manual_seed(0))
    h = _permute(g, perm)
    table = TreeTable()
    a = computation_tree_ids(g.edge_index, g.node_label, 2, table)
    b = computation_tree_ids(h.edge_index, h.node_label, 2, table)
    assert [b[int(perm[v])] for v in range(g.num_nodes)] == a  # node v of g is perm[v] of h
    assert computation_tree_ids(g.edge_index, g.node_label, 0, table) == [
        table.index[(0, int(label), ())] for label in g.node_label
    ]


def test_canonical_ids_separate_different_trees():
    # a path a-b-c and a star with the same labels: the middle nodes' 1-hop trees agree, the
    # ends' 2-hop trees differ (an end of the path sees a leaf two hops away, the star's leaves
    # see the other two leaves)
    table = TreeTable()
    lab = torch.zeros(4, dtype=torch.long)
    path = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    star = torch.tensor([[0, 1, 0, 2, 0, 3], [1, 0, 2, 0, 3, 0]])
    p2 = set(computation_tree_ids(path, lab, 2, table))
    s2 = set(computation_tree_ids(star, lab, 2, table))
    assert p2.isdisjoint(s2)
    # relabelling one node changes the trees that see it
    lab2 = lab.clone()
    lab2[3] = 1
    assert (
        computation_tree_ids(path, lab2, 1, table)[2]
        != computation_tree_ids(path, lab, 1, table)[2]
    )


def test_expanded_tree_is_the_computation_tree(graphs):
    g = graphs[1]
    table = TreeTable()
    ids = computation_tree_ids(g.edge_index, g.node_label, 2, table)
    deg = torch.bincount(g.edge_index[1], minlength=g.num_nodes)
    nbrs = [g.edge_index[0][g.edge_index[1] == v] for v in range(g.num_nodes)]
    for v in range(g.num_nodes):
        labels, edges, _ = expand_tree(table, ids[v])
        # root, one child per neighbour, one grandchild per neighbour of each neighbour
        assert len(labels) == 1 + int(deg[v]) + int(deg[nbrs[v]].sum())
        assert labels[0] == int(g.node_label[v])
        assert all(p < c for c, p in edges)  # BFS order, edges child -> parent
        assert sorted(labels[c] for c, p in edges if p == 0) == sorted(
            g.node_label[nbrs[v]].tolist()
        )


@pytest.mark.parametrize("kind", ["gin", "gat"])
def test_tree_set_graph_reproduces_gnn_embeddings(graphs, kind):
    """Root embeddings of the expanded trees equal the node embeddings in the original graph
    (Mirage's premise; exact for aggregators over incoming neighbours), and the root readout
    of a graph's whole tree multiset equals its usual readout."""
    g = graphs[2]
    table = TreeTable()
    ids = computation_tree_ids(g.edge_index, g.node_label, 2, table)
    tg = tree_set_graph(table, tuple(ids), 0, g.x.shape[1])
    torch.manual_seed(0)
    model = GraphClassifier(kind, g.x.shape[1], 3, hidden=16, layers=2).eval()
    h = model.node_embeddings(g.x, g.edge_index)
    ht = model.node_embeddings(tg.x, tg.edge_index)[tg.root_mask]
    assert h.abs().max() > 1e-3
    torch.testing.assert_close(ht, h, rtol=1e-5, atol=1e-6)
    zero = torch.zeros(g.num_nodes, dtype=torch.long)
    tzero = torch.zeros(tg.num_nodes, dtype=torch.long)
    torch.testing.assert_close(
        model(tg.x, tg.edge_index, tzero, tg.root_mask, 1),
        model(g.x, g.edge_index, zero),
        rtol=1e-5,
        atol=1e-6,
    )
    # the same trees as a 1-layer-too-deep model no longer match: depth matters
    deep = GraphClassifier(kind, g.x.shape[1], 3, hidden=16, layers=3).eval()
    h3 = deep.node_embeddings(g.x, g.edge_index)
    assert not torch.allclose(
        deep.node_embeddings(tg.x, tg.edge_index)[tg.root_mask], h3, atol=1e-4
    )


def _brute_force(trans: list[set[int]], thr: int, max_size: int) -> dict[tuple, int]:
    items = sorted(set().union(*trans))
    out = {}
    for k in range(1, max_size + 1):
        for combo in itertools.combinations(items, k):
            sup = sum(1 for t in trans if set(combo) <= t)
            if sup >= thr:
                out[combo] = sup
    return out


def _random_transactions(seed: int, n: int, items: int) -> list[set[int]]:
    rng = random.Random(seed)
    return [{i for i in range(items) if rng.random() < 0.45} for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1])
def test_mining_matches_brute_force(seed):
    trans = _random_transactions(seed, 20, 7)
    ref = _brute_force(trans, thr=5, max_size=7)  # min_support 0.25 of 20 graphs
    got = mine_tree_sets(trans, 0.25, max_sets=10_000, max_set_size=7, closed_only=False)
    assert {m.trees: m.support for m in got} == ref
    sups = [m.support for m in got]
    assert sups == sorted(sups, reverse=True)  # most frequent first: a budget keeps the top
    closed = mine_tree_sets(trans, 0.25, 10_000, 7, closed_only=True)
    ref_closed = {
        s: v for s, v in ref.items() if not any(set(s) < set(t) and w == v for t, w in ref.items())
    }
    assert {m.trees: m.support for m in closed} == ref_closed
    top = mine_tree_sets(trans, 0.25, 3, 7, closed_only=True)
    assert [m.support for m in top] == sorted(ref_closed.values(), reverse=True)[:3]


def test_sets_frequent_in_another_class_are_dropped():
    mine = [{1, 2}, {1, 2}, {1, 3}, {1, 3}]
    other = [{1}, {1}, {2}, {4}]
    kept = mine_tree_sets(mine, 0.5, 100, 3, closed_only=False, other_classes=[other])
    # {1} is frequent in the other class too (2 of 4); {2} is not (1 of 4)
    assert {m.trees for m in kept} == {(2,), (3,), (1, 2), (1, 3)}
    with pytest.raises(ValueError, match="min_support"):
        mine_tree_sets(mine, 0.0, 10)


def test_mirage_distill_weights_and_shapes():
    ds = molecule_dataset(60, seed=0)
    res = mirage_distill(
        ds.graphs, 2, ds.num_node_labels, hops=2, min_support=0.2, sets_per_class=4
    )
    assert len(res.graphs) == len(res.weights) <= 8 and res.info["sets_per_class"][0] >= 1
    for g, w in zip(res.graphs, res.weights.tolist()):
        assert g.x.shape == (g.num_nodes, 4) and int(g.root_mask.sum()) >= 1
        # the weight is the number of graphs of the class that contain every tree of the set
        table = TreeTable()
        ids = [set(computation_tree_ids(h.edge_index, h.node_label, 2, table)) for h in ds.graphs]
        roots = torch.nonzero(g.root_mask).view(-1).tolist() + [g.num_nodes]
        want = set()
        for a, b in zip(roots[:-1], roots[1:]):
            sub = g.subgraph(torch.arange(a, b))
            sub.node_label = g.node_label[a:b]
            want.add(computation_tree_ids(sub.edge_index, sub.node_label, 2, table)[0])
        support = sum(1 for h, t in zip(ds.graphs, ids) if int(h.y) == int(g.y) and want <= t)
        assert support == w
    with pytest.raises(ValueError, match="no tree set for class"):
        mirage_distill(ds.graphs, 2, ds.num_node_labels, hops=2, min_support=1.0, sets_per_class=4)


def test_frequent_tree_view_from_the_distilled_file_alone(tmp_path):
    from fewstep.dataset_distill.graphs.graphset import GraphSet
    from fewstep.dataset_distill.graphs.mirage import frequent_tree_view, tree_vocabulary

    ds = molecule_dataset(40, seed=3)
    train, test = ds.graphs[:30], ds.graphs[30:]
    res = mirage_distill(train, 2, 4, hops=2, min_support=0.2, sets_per_class=3)
    loaded = GraphSet.load(GraphSet(res.graphs, res.weights).save(tmp_path / "d.safetensors"))
    table, kept = tree_vocabulary(loaded.graphs, 2)
    assert len(kept) == len(res.kept_trees)
    torch.manual_seed(0)
    gin = GraphClassifier("gin", 4, 2, hidden=8, layers=2).eval()

    def embed(v):
        batch = torch.zeros(v.num_nodes, dtype=torch.long)
        return gin.graph_embeddings(v.x, v.edge_index, batch, getattr(v, "root_mask", None), 1)

    for g in test:
        a = frequent_tree_view(g, res.table, res.kept_trees, 2, 4)
        b = frequent_tree_view(g, table, kept, 2, 4)  # the same trees (child order may differ)
        assert a.num_nodes == b.num_nodes
        torch.testing.assert_close(embed(a), embed(b))
        if a is not g:  # only distilled trees, one per node whose tree was kept
            ids = computation_tree_ids(g.edge_index, g.node_label, 2, res.table)
            assert int(a.root_mask.sum()) == sum(t in res.kept_trees for t in ids) < g.num_nodes + 1
            flipped = g.clone()
            flipped.y = 1 - g.y  # the view never looks at the label
            assert torch.equal(frequent_tree_view(flipped, table, kept, 2, 4).x, b.x)
