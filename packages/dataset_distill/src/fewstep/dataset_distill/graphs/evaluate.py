"""How good is a distilled graph set: accuracy of *fresh* GNNs trained on it and tested on
real held-out graphs (next to the same GNNs trained on the full training set), the
compression ratio and the distillation wall time.

One trainer serves every method: minibatches are drawn with replacement in proportion to the
set's weights (Mirage: support counts; others: uniform) and the readout sums over
``root_mask`` nodes where a graph has one (Mirage's tree sets) and over all nodes otherwise.
The checkpoint with the best validation accuracy is tested (as DosCond and Mirage do).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch

from fewstep.dataset_distill.graphs.gnn import GraphClassifier, check_kind
from fewstep.dataset_distill.graphs.graphset import GraphSet, _roots


@dataclass
class GNNTrainConfig:
    hidden: int = 64  # GNN width
    layers: int = 2  # message-passing layers (= Mirage hops)
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # graphs per step (drawn with replacement by weight)
    lr: float = 0.005  # Adam learning rate
    weight_decay: float = 5e-4  # Adam weight decay
    val_every: int = 25  # steps between validation checks (best checkpoint is tested)
    readout: str = "sum"  # graph readout over nodes (tree-set roots): sum or mean


@dataclass
class GraphBatch:
    """A disjoint union of graphs as flat tensors (what torch-geometric's Batch holds)."""

    x: torch.Tensor  # [N, F]
    edge_index: torch.Tensor  # [2, E], batch-level node ids
    batch: torch.Tensor  # [N] graph of each node
    root_mask: torch.Tensor  # [N] bool, readout nodes (all true for plain graphs)
    y: torch.Tensor  # [B]
    num_graphs: int


class PackedGraphs:
    """Graphs packed once into flat tensors, so a minibatch is a few index operations
    instead of a per-step ``Batch.from_data_list`` (which dominates small-GNN training)."""

    def __init__(self, graphs: list) -> None:
        if not graphs:
            raise ValueError("PackedGraphs needs at least one graph")
        self.n_nodes = torch.tensor([int(g.num_nodes) for g in graphs])
        self.n_edges = torch.tensor([int(g.edge_index.shape[1]) for g in graphs])
        self.node_ptr = torch.cumsum(self.n_nodes, 0) - self.n_nodes
        self.edge_ptr = torch.cumsum(self.n_edges, 0) - self.n_edges
        self.x = torch.cat([g.x.float() for g in graphs])
        self.edge_index = torch.cat([g.edge_index for g in graphs], dim=1)  # local node ids
        self.root_mask = torch.cat([_roots(g) for g in graphs])
        self.y = torch.tensor([int(g.y) for g in graphs], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.y.numel())

    def batch(self, idx: torch.Tensor | None = None) -> GraphBatch:
        """The graphs ``idx`` (repeats allowed; default all) as one ``GraphBatch``."""
        if idx is None:
            idx = torch.arange(len(self))
        nn_, ne = self.n_nodes[idx], self.n_edges[idx]
        b = idx.numel()
        new_start = torch.cumsum(nn_, 0) - nn_
        node_sel = _ranges(self.node_ptr[idx], nn_)
        edge_sel = _ranges(self.edge_ptr[idx], ne)
        ei = self.edge_index[:, edge_sel] + torch.repeat_interleave(new_start, ne)
        return GraphBatch(
            x=self.x[node_sel],
            edge_index=ei,
            batch=torch.repeat_interleave(torch.arange(b), nn_),
            root_mask=self.root_mask[node_sel],
            y=self.y[idx],
            num_graphs=b,
        )


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """concat(arange(s, s + c) for s, c in zip(starts, counts))."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + torch.arange(total) - offsets


def _logits(model: GraphClassifier, b: GraphBatch) -> torch.Tensor:
    return model(b.x, b.edge_index, b.batch, b.root_mask, b.num_graphs)


@torch.no_grad()
def accuracy(model: GraphClassifier, graphs) -> float:
    """Fraction of graphs classified correctly (``graphs``: a list, ``PackedGraphs`` or a
    ``GraphBatch``; readout over all nodes of real graphs, over the roots of tree sets)."""
    if isinstance(graphs, list):
        graphs = PackedGraphs(graphs)
    b = graphs.batch() if isinstance(graphs, PackedGraphs) else graphs
    was = model.training
    model.eval()
    pred = _logits(model, b).argmax(1)
    model.train(was)
    return float((pred == b.y).float().mean())


def fit_gnn(
    train: GraphSet,
    kind: str,
    num_features: int,
    num_classes: int,
    cfg: GNNTrainConfig,
    seed: int,
    val_graphs: list | None = None,
) -> GraphClassifier:
    """Train a fresh ``kind`` GNN on ``train``; returns the best-validation checkpoint (the
    last one without ``val_graphs``)."""
    check_kind(kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GraphClassifier(
            kind, num_features, num_classes, cfg.hidden, cfg.layers, readout=cfg.readout
        )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    probs = train.weights.double() / train.weights.double().sum()
    packed = PackedGraphs(train.graphs)
    val = PackedGraphs(val_graphs).batch() if val_graphs else None
    best, best_state = -1.0, None
    for step in range(cfg.steps):
        idx = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=gen)
        batch = packed.batch(idx)
        loss = torch.nn.functional.cross_entropy(_logits(model, batch), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is not None and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
            acc = accuracy(model, val)
            if acc > best:
                best, best_state = acc, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def evaluate_graph_set(
    train: GraphSet,
    val_graphs: list,
    test_graphs: list,
    num_features: int,
    num_classes: int,
    kinds: tuple[str, ...],
    seeds: int,
    cfg: GNNTrainConfig,
) -> dict[str, dict]:
    """Per GNN kind: test accuracies of ``seeds`` fresh models, their mean and std."""
    test = PackedGraphs(test_graphs).batch()
    out = {}
    for kind in kinds:
        accs = [
            accuracy(fit_gnn(train, kind, num_features, num_classes, cfg, s, val_graphs), test)
            for s in range(seeds)
        ]
        out[kind] = {
            "accs": accs,
            "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
        }
    return out


def random_subset(graphs: list, per_class: int, num_classes: int, seed: int) -> GraphSet:
    """``per_class`` real graphs of each class drawn without replacement (the baseline every
    condensation paper compares against)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([int(x.y) for x in graphs])
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).view(-1)
        if idx.numel() == 0:
            raise ValueError(f"no training graph of class {c}")
        take = idx[torch.randperm(idx.numel(), generator=g)[:per_class]]
        chosen += take.tolist()
    return GraphSet.uniform([graphs[i] for i in sorted(chosen)])


def size_stats(distilled: GraphSet, full: GraphSet) -> dict:
    """Graphs, nodes, edges and stored numbers of a set, and its compression ratio."""
    return {
        "graphs": len(distilled.graphs),
        "nodes": distilled.num_nodes(),
        "edges": distilled.num_edges(),
        "stored_scalars": distilled.stored_scalars(),
        "compression_ratio": full.stored_scalars() / distilled.stored_scalars(),
    }
