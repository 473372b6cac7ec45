"""A distilled (or full) graph training set: graphs, their classes and sampling weights, saved
as one safetensors file (no pickle).

Every method's output has this form, so one trainer and one evaluation serve them all:
Mirage's tree sets (weights = support counts, ``root_mask`` marks the tree roots), DosCond's
synthetic graphs and random real graphs (weights 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class GraphSet:
    graphs: list  # torch_geometric.data.Data with x, edge_index, y (and maybe root_mask)
    weights: torch.Tensor  # [G] float, sampling weight of each graph during training

    def __post_init__(self) -> None:
        if len(self.graphs) == 0:
            raise ValueError("a GraphSet needs at least one graph")
        if self.weights.shape != (len(self.graphs),):
            raise ValueError(
                f"weights must have shape ({len(self.graphs)},), got {tuple(self.weights.shape)}"
            )
        if bool((self.weights < 0).any()) or float(self.weights.sum()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")

    @classmethod
    def uniform(cls, graphs: list) -> GraphSet:
        return cls(list(graphs), torch.ones(len(graphs)))

    def labels(self) -> torch.Tensor:
        return torch.tensor([int(g.y) for g in self.graphs], dtype=torch.long)

    def num_nodes(self) -> int:
        return sum(int(g.num_nodes) for g in self.graphs)

    def num_edges(self) -> int:
        """Undirected edges for symmetric graphs; directed tree edges count once each."""
        total = 0
        for g in self.graphs:
            ei = g.edge_index
            sym = ei.shape[1] % 2 == 0 and _is_symmetric(ei)
            total += ei.shape[1] // 2 if sym else ei.shape[1]
        return total

    def stored_scalars(self) -> int:
        """Numbers needed to store the set: node features + edge endpoints (undirected edges
        once) + per-graph label and weight + root masks where present. The compression
        ratio of a method is ``full.stored_scalars() / distilled.stored_scalars()``."""
        feats = sum(int(g.x.numel()) for g in self.graphs)
        roots = sum(
            int(g.num_nodes) for g in self.graphs if getattr(g, "root_mask", None) is not None
        )
        return feats + 2 * self.num_edges() + 2 * len(self.graphs) + roots

    def save(self, path: str | Path, meta: dict[str, str] | None = None) -> Path:
        """One safetensors file: concatenated ``x``, ``edge_index`` (per-graph node ids),
        node/edge counts per graph, ``y``, ``weights``, ``root_mask`` (all-true if absent) and
        ``node_label`` / ``edge_label`` where every graph has them."""
        from safetensors.torch import save_file

        from fewstep.core.io import atomic_write_bytes

        tensors = {
            "x": torch.cat([g.x.float() for g in self.graphs]),
            "edge_index": torch.cat([g.edge_index for g in self.graphs], dim=1),
            "num_nodes": torch.tensor([int(g.num_nodes) for g in self.graphs]),
            "num_edges": torch.tensor([int(g.edge_index.shape[1]) for g in self.graphs]),
            "y": self.labels(),
            "weights": self.weights.float(),
            "root_mask": torch.cat([_roots(g) for g in self.graphs]),
        }
        if all(getattr(g, "node_label", None) is not None for g in self.graphs):
            tensors["node_label"] = torch.cat([g.node_label for g in self.graphs])
        if all(getattr(g, "edge_label", None) is not None for g in self.graphs):
            tensors["edge_label"] = torch.cat([g.edge_label for g in self.graphs])
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        data = tmp.read_bytes()
        tmp.unlink()
        return atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> GraphSet:
        from safetensors.torch import load_file
        from torch_geometric.data import Data

        t = load_file(str(path))
        graphs, n0, e0 = [], 0, 0
        for i, (n, e) in enumerate(zip(t["num_nodes"].tolist(), t["num_edges"].tolist())):
            d = Data(
                x=t["x"][n0 : n0 + n],
                edge_index=t["edge_index"][:, e0 : e0 + e],
                y=t["y"][i : i + 1],
            )
            rm = t["root_mask"][n0 : n0 + n]
            if not bool(rm.all()):
                d.root_mask = rm
            if "node_label" in t:
                d.node_label = t["node_label"][n0 : n0 + n]
            if "edge_label" in t:
                d.edge_label = t["edge_label"][e0 : e0 + e]
            graphs.append(d)
            n0, e0 = n0 + n, e0 + e
        return cls(graphs, t["weights"])


def _roots(g) -> torch.Tensor:
    rm = getattr(g, "root_mask", None)
    return rm.bool() if rm is not None else torch.ones(int(g.num_nodes), dtype=torch.bool)


def _is_symmetric(ei: torch.Tensor) -> bool:
    if ei.numel() == 0:
        return True
    n = int(ei.max()) + 1
    fwd = torch.sort(ei[0] * n + ei[1]).values
    bwd = torch.sort(ei[1] * n + ei[0]).values
    return bool(torch.equal(fwd, bwd))
