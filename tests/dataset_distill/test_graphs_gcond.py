"""Gradient-matching condensation: the DC distance, the dense GCN against torch-geometric's
GCNConv, the Bernoulli-graph relaxation, and that the synthetic graphs are being optimised."""

from __future__ import annotations

import pytest
import torch

from fewstep.dataset_distill.graphs.gcond import (
    DenseGCN,
    DosCondConfig,
    GCondNodeConfig,
    StructureMLP,
    _dense,
    annealed_temperature,
    dc_distance,
    discrete_adjacency,
    doscond_distill,
    gcond_node_distill,
    init_synthetic,
    matching_loss,
    mean_matching_loss,
    mse_distance,
    sample_adjacency,
)
from fewstep.dataset_distill.graphs.gnn import GraphClassifier
from fewstep.dataset_distill.graphs.synthetic import molecule_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mols():
    return molecule_dataset(40, seed=2).graphs


def test_dc_distance_reference_and_sign():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    assert float(dc_distance([w, b], [w, b])) == pytest.approx(0.0, abs=1e-5)
    assert float(dc_distance([3 * w], [w])) == pytest.approx(0.0, abs=1e-5)  # scale-free
    assert float(dc_distance([-w], [w])) == pytest.approx(2 * 5, abs=1e-4)  # opposite rows
    assert float(dc_distance([w, b], [w, -b])) == pytest.approx(0.0, abs=1e-5)  # biases ignored
    v = torch.randn(5, 3, generator=g)
    ref = sum(1 - torch.nn.functional.cosine_similarity(w[i], v[i], dim=0) for i in range(5))
    assert float(dc_distance([w], [v])) == pytest.approx(float(ref), rel=1e-4)
    assert float(mse_distance([w, b], [v, b])) == pytest.approx(
        float(((w - v) ** 2).sum()), rel=1e-5
    )
    with pytest.raises(ValueError, match="shapes differ"):
        dc_distance([w], [b])


@pytest.mark.parametrize("readout", ["sum", "mean"])
def test_dense_gcn_equals_torch_geometric_gcn(mols, readout):
    from torch_geometric.data import Batch

    torch.manual_seed(0)
    sparse = GraphClassifier("gcn", 4, 2, hidden=8, layers=2, readout=readout).eval()
    dense = DenseGCN(4, 2, hidden=8, layers=2, readout=readout)
    dense.load_state_dict(sparse.state_dict())
    graphs = mols[:6]
    b = Batch.from_data_list([torch_geometric_data(g) for g in graphs])
    want = sparse(b.x, b.edge_index, b.batch)
    x, adj, mask = _dense(graphs)
    torch.testing.assert_close(dense(x, adj, mask), want, rtol=1e-4, atol=1e-5)


def torch_geometric_data(g):
    from torch_geometric.data import Data

    return Data(x=g.x, edge_index=g.edge_index, y=g.y)


def test_binary_concrete_graph():
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(2, 6, 6, generator=g, requires_grad=True)
    a = sample_adjacency(omega, 0.5, g)
    assert torch.equal(a, a.transpose(1, 2))
    assert float(a.detach().diagonal(dim1=1, dim2=2).abs().sum()) == 0
    off = a.detach()[:, ~torch.eye(6, dtype=torch.bool)]
    assert bool(((off > 0) & (off < 1)).all())
    a.sum().backward()
    assert omega.grad is not None and float(omega.grad.abs().sum()) > 0
    # P(sample > 1/2) = sigmoid(sym omega), whatever the temperature (binary concrete)
    om = torch.tensor([[[0.0, 1.5], [1.5, 0.0]]]).expand(20000, 2, 2).contiguous()
    hits = (sample_adjacency(om, 0.3, g)[:, 0, 1] > 0.5).float().mean()
    assert float(hits) == pytest.approx(float(torch.sigmoid(torch.tensor(1.5))), abs=0.015)
    d = discrete_adjacency(torch.tensor([[[9.0, 2.0], [-4.0, 9.0]]]))
    assert d.tolist() == [[[0.0, 0.0], [0.0, 0.0]]]  # sym logit (2 - 4) / 2 < 0; no self-loops
    assert annealed_temperature(0, 1.0, 0.01, 200) == 1.0
    assert annealed_temperature(100, 1.0, 0.01, 200) == pytest.approx(0.1)
    assert annealed_temperature(500, 1.0, 0.01, 200) == 0.01


def test_matching_loss_reaches_the_synthetic_graphs(mols):
    """Fails if the synthetic features or structure are cut from the matching loss."""
    cfg = DosCondConfig(graphs_per_class=2, hidden=8, real_batch=8)
    syn, _ = init_synthetic(mols, 2, cfg, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = DenseGCN(4, 2, 8, 2)
    labels = torch.tensor([int(g.y) for g in mols])
    real = [_dense([g for g, y in zip(mols, labels) if int(y) == c][:8]) for c in (0, 1)]
    loss = matching_loss(model, syn, real, 0.5, mse_distance, torch.Generator().manual_seed(1))
    loss.backward()
    assert float(syn.feat.grad.abs().sum()) > 0
    assert float(syn.omega.grad.abs().sum()) > 0
    # cutting the synthetic features from the graph (what a detach would do) leaves no gradient
    syn.feat.grad = None
    cut = type(syn)(syn.feat.detach(), syn.omega, syn.labels)
    matching_loss(model, cut, real, 0.5, mse_distance, torch.Generator().manual_seed(1)).backward()
    assert syn.feat.grad is None


def test_doscond_optimises_the_synthetic_set(mols):
    cfg = DosCondConfig(
        graphs_per_class=2, iterations=25, hidden=16, real_batch=16, lr_feat=0.05, lr_adj=0.5
    )
    syn0, _ = init_synthetic(mols, 2, cfg, torch.Generator().manual_seed(0))
    before = mean_matching_loss(syn0, mols, 2, cfg, models=6)
    syn, info = doscond_distill(mols, 2, cfg, seed=0)
    after = mean_matching_loss(syn, mols, 2, cfg, models=6)
    assert not torch.allclose(syn.feat, syn0.feat)
    assert after < 0.7 * before, (before, after)
    gs = syn.to_graph_set()
    assert len(gs.graphs) == 4 and gs.labels().tolist() == [0, 0, 1, 1]
    for g in gs.graphs:  # discrete graphs are undirected: every edge in both directions
        fwd = {tuple(e) for e in g.edge_index.t().tolist()}
        assert fwd == {(b, a) for a, b in fwd}
    with pytest.raises(ValueError, match="unknown distance"):
        doscond_distill(mols, 2, DosCondConfig(distance="l7"))


def test_gcond_node_structure_and_progress():
    mlp = StructureMLP(3)
    a = mlp(torch.randn(5, 3))
    torch.testing.assert_close(a, a.t())
    assert float(a.detach().diagonal().abs().sum()) == 0
    # a two-community toy graph: GCond's synthetic nodes move and the matching loss falls
    g = torch.Generator().manual_seed(0)
    n = 16
    y = torch.tensor([0] * 8 + [1] * 8)
    adj = (torch.rand(n, n, generator=g) < 0.1).float()
    adj[:8, :8] += (torch.rand(8, 8, generator=g) < 0.6).float()
    adj[8:, 8:] += (torch.rand(8, 8, generator=g) < 0.6).float()
    adj = torch.triu((adj > 0).float(), 1)
    adj = adj + adj.t()
    x = torch.eye(n)
    train = torch.arange(n) % 2 == 0
    cfg = GCondNodeConfig(
        nodes_per_class=2, iterations=30, inner_steps=2, lr_feat=0.05, lr_adj=0.05
    )
    xs, a_s, ys, info = gcond_node_distill(x, adj, y, train, 2, cfg, seed=0)
    curve = [v for _, v in info["loss_curve"]]
    assert xs.shape == (4, n) and ys.tolist() == [0, 0, 1, 1]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
