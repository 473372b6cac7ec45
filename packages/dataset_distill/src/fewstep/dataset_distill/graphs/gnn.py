"""GNN graph classifiers through ``torch_geometric.nn``: GCN (Kipf & Welling, ICLR 2017),
GIN (Xu et al., ICLR 2019) and GAT (Velickovic et al., ICLR 2018), picked from a registry.

Messages flow along ``edge_index`` from ``edge_index[0]`` (source) to ``edge_index[1]``
(target), so a graph whose edges point from children to parents (Mirage's computation trees)
sends information to the root only. Readout is a sum over nodes (Mirage, Sec. 3, sums the
root embeddings of a graph's computation trees, which equals summing a graph's node
embeddings; ``readout="mean"`` averages instead) or, with ``root_mask``, over the marked
nodes only. No batch normalisation: a
node's embedding then depends on its computation tree alone, which Mirage relies on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _gcn(i: int, o: int) -> nn.Module:
    from torch_geometric.nn import GCNConv

    return GCNConv(i, o)


def _gin(i: int, o: int) -> nn.Module:
    from torch_geometric.nn import GINConv

    return GINConv(nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, o)), train_eps=True)


def _gat(i: int, o: int) -> nn.Module:
    from torch_geometric.nn import GATConv

    return GATConv(i, o, heads=2, concat=False)


CONVS: dict[str, Callable[[int, int], nn.Module]] = {"gcn": _gcn, "gin": _gin, "gat": _gat}
READOUTS = ("sum", "mean")  # over all nodes, or over the roots of a tree-set graph


def check_kind(kind: str) -> str:
    if kind not in CONVS:
        raise ValueError(f"unknown GNN {kind!r}; available: {', '.join(CONVS)}")
    return kind


class GraphClassifier(nn.Module):
    """``layers`` message-passing layers (ReLU after each), sum readout, linear head.

    forward(x [N, F], edge_index [2, E], batch [N], root_mask [N] bool | None,
    num_graphs int | None) -> logits [B, C]."""

    def __init__(
        self,
        kind: str,
        in_dim: int,
        num_classes: int,
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.0,
        readout: str = "sum",
    ) -> None:
        super().__init__()
        self.kind = check_kind(kind)
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; available: {', '.join(READOUTS)}")
        self.readout = readout
        dims = [in_dim] + [hidden] * layers
        self.convs = nn.ModuleList(CONVS[kind](a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = dropout
        self.head = nn.Linear(hidden, num_classes)

    def node_embeddings(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` embeddings after the last layer."""
        h = x
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index))
        return h

    def graph_embeddings(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        batch: torch.Tensor,
        root_mask: torch.Tensor | None = None,
        num_graphs: int | None = None,
    ) -> torch.Tensor:
        """``[B, hidden]``: the sum (or mean) of the node embeddings of each graph, over the
        nodes of ``root_mask`` only if given."""
        h = self.node_embeddings(x, edge_index)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        if root_mask is not None:
            h, batch = h[root_mask], batch[root_mask]
        out = h.new_zeros(num_graphs, h.shape[1]).index_add(0, batch, h)
        if self.readout == "mean":
            count = h.new_zeros(num_graphs).index_add(
                0, batch, torch.ones_like(batch, dtype=h.dtype)
            )
            out = out / count.clamp(min=1).unsqueeze(1)
        return out

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        batch: torch.Tensor,
        root_mask: torch.Tensor | None = None,
        num_graphs: int | None = None,
    ) -> torch.Tensor:
        g = self.graph_embeddings(x, edge_index, batch, root_mask, num_graphs)
        g = nn.functional.dropout(g, self.dropout, self.training)
        return self.head(g)
