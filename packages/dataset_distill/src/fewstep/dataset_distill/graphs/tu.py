"""Reader (and writer) for the TU graph-classification format, the format the TUDataset
collection (MUTAG, NCI1, PROTEINS, IMDB-BINARY, ...) ships on disk.

A dataset ``DS`` is a folder of text files (Morris et al., "TUDataset: A collection of
benchmark datasets for learning with graphs", 2020, https://chrsmrrs.github.io/datasets/):

* ``DS_A.txt`` (required): one edge ``row, col`` per line, 1-based node ids numbered across
  the whole dataset; undirected graphs list both directions.
* ``DS_graph_indicator.txt`` (required): line ``i`` is the 1-based graph id of node ``i``.
* ``DS_graph_labels.txt`` (required): line ``i`` is the class of graph ``i`` (any integers;
  they are mapped to ``0..C-1`` in sorted order).
* ``DS_node_labels.txt`` (optional): line ``i`` is the integer label of node ``i``.
* ``DS_edge_labels.txt`` (optional): line ``i`` is the integer label of edge ``i`` of ``DS_A``.
* ``DS_node_attributes.txt`` (optional): comma-separated floats of node ``i``.

torch-geometric's ``TUDataset`` downloads; this reader only reads the files the user has.
Every graph becomes a ``torch_geometric.data.Data`` with ``x`` (one-hot node labels, then node
attributes if asked), ``edge_index`` (both directions, no duplicates), ``y`` (shape ``[1]``),
``node_label`` (``[n]``, the discrete label Mirage's canonical trees use) and, when present,
``edge_label`` (``[E]``). Graphs without node labels get ``node_label`` = degree (capped), the
usual choice for unlabelled TU graphs such as IMDB-BINARY.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

REQUIRED = ("A", "graph_indicator", "graph_labels")


@dataclass
class GraphDataset:
    """A graph-classification dataset in memory."""

    name: str  # dataset name (file prefix or generator name)
    graphs: list  # torch_geometric.data.Data, one per graph
    num_classes: int  # classes 0..C-1
    num_node_labels: int  # discrete node labels 0..L-1 (one-hot width of x's label part)
    class_values: list[int] = field(default_factory=list)  # original label of each class
    recipe: str = ""  # how the data was made (for reports)

    @property
    def num_features(self) -> int:
        return int(self.graphs[0].x.shape[1])

    def labels(self) -> torch.Tensor:
        """``[G]`` long tensor of graph classes."""
        return torch.tensor([int(g.y) for g in self.graphs], dtype=torch.long)


def _lines(path: Path) -> list[str]:
    text = path.read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _ints(path: Path, per_line: int = 1) -> list[list[int]]:
    rows = []
    for i, ln in enumerate(_lines(path), start=1):
        parts = [p for p in ln.replace(",", " ").split() if p]
        if len(parts) != per_line:
            raise ValueError(f"{path.name} line {i}: expected {per_line} integer(s), got {ln!r}")
        try:
            rows.append([int(float(p)) if "." in p else int(p) for p in parts])
        except ValueError:
            raise ValueError(f"{path.name} line {i}: expected integers, got {ln!r}") from None
    return rows


def _floats(path: Path) -> list[list[float]]:
    rows = []
    for i, ln in enumerate(_lines(path), start=1):
        try:
            rows.append([float(p) for p in ln.split(",") if p.strip()])
        except ValueError:
            raise ValueError(f"{path.name} line {i}: expected comma-separated floats") from None
    width = {len(r) for r in rows}
    if len(width) > 1:
        raise ValueError(f"{path.name}: rows have different numbers of attributes {width}")
    return rows


def degree_labels(edge_index: torch.Tensor, num_nodes: int, max_degree: int) -> torch.Tensor:
    """``[n]`` node labels = ``min(degree, max_degree)`` of an undirected ``edge_index``
    (each undirected edge listed in both directions)."""
    deg = torch.zeros(num_nodes, dtype=torch.long)
    if edge_index.numel():
        deg.scatter_add_(0, edge_index[1], torch.ones(edge_index.shape[1], dtype=torch.long))
    return deg.clamp(max=max_degree)


def read_tu(
    folder: str | Path,
    name: str | None = None,
    use_node_attributes: bool = False,
    max_degree_label: int = 10,
) -> GraphDataset:
    """Read TU dataset ``name`` from ``folder`` (files ``{name}_A.txt`` etc.).

    ``name`` defaults to the prefix of the single ``*_A.txt`` file in ``folder``. Node
    attributes are appended to ``x`` only with ``use_node_attributes`` (Mirage's canonical
    trees use the discrete ``node_label`` alone). Raises ``FileNotFoundError`` naming a
    missing required file and ``ValueError`` naming the file and line of malformed content.
    """
    from torch_geometric.data import Data

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"TU dataset folder {folder} does not exist")
    if name is None:
        cands = sorted(p.name[: -len("_A.txt")] for p in folder.glob("*_A.txt"))
        if len(cands) != 1:
            raise FileNotFoundError(
                f"{folder}: expected exactly one *_A.txt file to name the dataset, found "
                f"{cands or 'none'}; pass the dataset name"
            )
        name = cands[0]
    paths = {k: folder / f"{name}_{k}.txt" for k in REQUIRED}
    for p in paths.values():
        if not p.exists():
            raise FileNotFoundError(
                f"TU dataset {name!r} in {folder}: missing required file {p.name} "
                f"(a TU dataset needs {', '.join(f'{name}_{r}.txt' for r in REQUIRED)})"
            )
    edges = torch.tensor(_ints(paths["A"], 2), dtype=torch.long).view(-1, 2) - 1
    indicator = torch.tensor(_ints(paths["graph_indicator"]), dtype=torch.long).view(-1) - 1
    graph_labels = [r[0] for r in _ints(paths["graph_labels"])]
    n_nodes, n_graphs = indicator.numel(), len(graph_labels)
    if n_nodes == 0 or n_graphs == 0:
        raise ValueError(f"TU dataset {name!r}: no nodes or no graphs")
    if indicator.min() < 0 or int(indicator.max()) >= n_graphs:
        raise ValueError(
            f"{name}_graph_indicator.txt: graph ids must lie in 1..{n_graphs} (the number of "
            f"lines of {name}_graph_labels.txt), got {int(indicator.min()) + 1}.."
            f"{int(indicator.max()) + 1}"
        )
    if bool((indicator[1:] < indicator[:-1]).any()):
        raise ValueError(f"{name}_graph_indicator.txt: nodes must be grouped by graph, in order")
    if edges.numel() and (edges.min() < 0 or int(edges.max()) >= n_nodes):
        raise ValueError(
            f"{name}_A.txt: node ids must lie in 1..{n_nodes} (the number of lines of "
            f"{name}_graph_indicator.txt), got {int(edges.min()) + 1}..{int(edges.max()) + 1}"
        )
    if edges.numel() and bool((indicator[edges[:, 0]] != indicator[edges[:, 1]]).any()):
        bad = int(torch.nonzero(indicator[edges[:, 0]] != indicator[edges[:, 1]])[0, 0])
        raise ValueError(f"{name}_A.txt line {bad + 1}: the edge joins two different graphs")

    opt = {k: folder / f"{name}_{k}.txt" for k in ("node_labels", "edge_labels")}
    node_labels = edge_labels = None
    if opt["node_labels"].exists():
        node_labels = torch.tensor(_ints(opt["node_labels"]), dtype=torch.long).view(-1)
        if node_labels.numel() != n_nodes:
            raise ValueError(
                f"{name}_node_labels.txt has {node_labels.numel()} lines, expected {n_nodes} "
                f"(one per node)"
            )
    if opt["edge_labels"].exists():
        edge_labels = torch.tensor(_ints(opt["edge_labels"]), dtype=torch.long).view(-1)
        if edge_labels.numel() != edges.shape[0]:
            raise ValueError(
                f"{name}_edge_labels.txt has {edge_labels.numel()} lines, expected "
                f"{edges.shape[0]} (one per line of {name}_A.txt)"
            )
    attrs = None
    attr_path = folder / f"{name}_node_attributes.txt"
    if use_node_attributes:
        if not attr_path.exists():
            raise FileNotFoundError(f"use_node_attributes: {attr_path.name} does not exist")
        attrs = torch.tensor(_floats(attr_path), dtype=torch.float32)
        if attrs.shape[0] != n_nodes:
            raise ValueError(
                f"{attr_path.name} has {attrs.shape[0]} lines, expected {n_nodes} (one per node)"
            )

    classes = sorted(set(graph_labels))
    cls_index = {v: i for i, v in enumerate(classes)}
    counts = torch.bincount(indicator, minlength=n_graphs)
    starts = torch.cumsum(counts, 0) - counts
    edge_graph = indicator[edges[:, 0]] if edges.numel() else torch.zeros(0, dtype=torch.long)

    if node_labels is not None:  # map arbitrary ints to 0..L-1
        uniq = torch.unique(node_labels)
        node_labels = torch.searchsorted(uniq, node_labels)
        n_node_labels = int(uniq.numel())
    else:
        n_node_labels = max_degree_label + 1
    if edge_labels is not None:
        edge_labels = torch.searchsorted(torch.unique(edge_labels), edge_labels)

    graphs = []
    for g in range(n_graphs):
        s, n = int(starts[g]), int(counts[g])
        sel = torch.nonzero(edge_graph == g).view(-1)
        ei = (edges[sel] - s).t().contiguous()
        el = edge_labels[sel] if edge_labels is not None else None
        ei, el = _undirected_unique(ei, el, n)
        if node_labels is not None:
            nl = node_labels[s : s + n]
        else:
            nl = degree_labels(ei, n, max_degree_label)
        x = torch.nn.functional.one_hot(nl, n_node_labels).float()
        if attrs is not None:
            x = torch.cat([x, attrs[s : s + n]], dim=1)
        data = Data(x=x, edge_index=ei, y=torch.tensor([cls_index[graph_labels[g]]]))
        data.node_label = nl
        if el is not None:
            data.edge_label = el
        graphs.append(data)
    return GraphDataset(
        name=name,
        graphs=graphs,
        num_classes=len(classes),
        num_node_labels=n_node_labels,
        class_values=classes,
        recipe=f"TU files {folder / name}_*.txt",
    )


def _undirected_unique(
    ei: torch.Tensor, el: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both directions of every edge, sorted, without duplicates or self-loops; an edge listed
    in one direction only gets its reverse with the same label."""
    if ei.numel() == 0:
        return ei.view(2, 0), (el if el is None else el.view(0))
    keep = ei[0] != ei[1]
    ei = ei[:, keep]
    el = el[keep] if el is not None else None
    both = torch.cat([ei, ei.flip(0)], dim=1)
    key = both[0] * n + both[1]
    labels = torch.cat([el, el]) if el is not None else None
    uniq, first = _first_occurrence(key)
    out = torch.stack([uniq // n, uniq % n])
    return out, (labels[first] if labels is not None else None)


def _first_occurrence(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and the index of each one's first occurrence."""
    uniq, inverse = torch.unique(key, return_inverse=True)
    pos = torch.arange(key.numel())
    first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, pos, reduce="amin")
    return uniq, first


def write_tu(dataset: GraphDataset, folder: str | Path, name: str | None = None) -> Path:
    """Write ``dataset`` as TU files (``A``, ``graph_indicator``, ``graph_labels``,
    ``node_labels`` and, where every graph has them, ``edge_labels``). Returns the folder."""
    from fewstep.core.io import atomic_write_text

    folder = Path(folder)
    name = name or dataset.name
    a, ind, nl, el = [], [], [], []
    offset = 0
    has_el = all(hasattr(g, "edge_label") for g in dataset.graphs)
    for gi, g in enumerate(dataset.graphs, start=1):
        n = int(g.num_nodes)
        ind += [str(gi)] * n
        nl += [str(int(v)) for v in g.node_label]
        for k, (r, c) in enumerate(g.edge_index.t().tolist()):
            a.append(f"{r + offset + 1}, {c + offset + 1}")
            if has_el:
                el.append(str(int(g.edge_label[k])))
        offset += n
    values = dataset.class_values or list(range(dataset.num_classes))
    labels = [str(values[int(g.y)]) for g in dataset.graphs]
    files = {"A": a, "graph_indicator": ind, "graph_labels": labels, "node_labels": nl}
    if has_el:
        files["edge_labels"] = el
    for k, rows in files.items():
        atomic_write_text(folder / f"{name}_{k}.txt", "\n".join(rows) + "\n")
    return folder
