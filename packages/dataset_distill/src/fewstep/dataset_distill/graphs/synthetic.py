"""Seeded graph-classification datasets with stated recipes (no downloads).

``motifs`` (structure classes, in the spirit of BA-2Motifs / the motif benchmarks of GNN
explainability work): every graph is a random tree grown by preferential attachment
(Barabasi-Albert with m = 1) on ``U{base_min..base_max}`` nodes, plus ``noise_edges`` random
extra edges between base nodes, with one motif attached by a single edge between a random
base node and a random motif node. The class is the motif:

    0 house (5 nodes: a 4-cycle with a roof)   1 6-cycle   2 4-clique   3 star with 5 leaves

``families`` (random-graph families with the same mean degree ~4, so the class is in the shape
of the degree distribution and the clustering, not in the size): ``U{n_min..n_max}`` nodes,

    0 Erdos-Renyi G(n, p = 4 / (n - 1))
    1 Barabasi-Albert, m = 2 (preferential attachment)
    2 Watts-Strogatz, ring lattice with k = 4, each edge rewired with probability 0.2

``molecules`` (labelled, in the spirit of MUTAG): benzene-ring backbones with substituents;
class 1 carries a nitro group, class 0 a decoy group of the same atoms (see
:func:`molecule_dataset`). Node labels are the atoms C, N, O, Cl.

In ``motifs`` and ``families`` node labels (and one-hot features) are
``min(degree, max_degree_label)``, as is usual for unlabelled graphs (IMDB-BINARY).
Everything is drawn from ``numpy.random.default_rng(seed)``, so a (name, size, seed) triple
always gives the same dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fewstep.dataset_distill.graphs.tu import GraphDataset, degree_labels

Edges = set[tuple[int, int]]


def _add(edges: Edges, u: int, v: int) -> None:
    if u != v:
        edges.add((min(u, v), max(u, v)))


def pa_tree(n: int, rng: np.random.Generator) -> Edges:
    """A preferential-attachment tree on ``n`` nodes (Barabasi-Albert, m = 1)."""
    edges: Edges = set()
    targets = [0]  # node repeated once per incident edge end (plus once for itself)
    for v in range(1, n):
        u = int(targets[rng.integers(len(targets))])
        _add(edges, u, v)
        targets += [u, v]
    return edges


def barabasi_albert(n: int, m: int, rng: np.random.Generator) -> Edges:
    """Barabasi-Albert graph: start from a clique on ``m + 1`` nodes; each new node links to
    ``m`` distinct existing nodes chosen with probability proportional to degree."""
    edges: Edges = set()
    for u in range(m + 1):
        for v in range(u + 1, m + 1):
            _add(edges, u, v)
    ends = [u for e in edges for u in e]
    for v in range(m + 1, n):
        chosen: set[int] = set()
        while len(chosen) < m:
            chosen.add(int(ends[rng.integers(len(ends))]))
        for u in chosen:
            _add(edges, u, v)
            ends += [u, v]
    return edges


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> Edges:
    """G(n, p): every pair independently with probability ``p``."""
    iu, ju = np.triu_indices(n, 1)
    keep = rng.random(iu.size) < p
    return {(int(a), int(b)) for a, b in zip(iu[keep], ju[keep])}


def watts_strogatz(n: int, k: int, p: float, rng: np.random.Generator) -> Edges:
    """Ring lattice (each node joined to its ``k // 2`` nearest neighbours on each side), then
    each lattice edge's far end rewired to a uniform non-neighbour with probability ``p``."""
    edges: Edges = set()
    for u in range(n):
        for j in range(1, k // 2 + 1):
            _add(edges, u, (u + j) % n)
    for u, v in sorted(edges):
        if rng.random() < p:
            taken = {b for a, b in edges if a == u} | {a for a, b in edges if b == u} | {u}
            free = [w for w in range(n) if w not in taken]
            if free:
                edges.discard((u, v))
                _add(edges, u, int(free[rng.integers(len(free))]))
    return edges


def _house() -> tuple[int, Edges]:
    return 5, {(0, 1), (1, 2), (2, 3), (0, 3), (0, 4), (1, 4)}


def _cycle6() -> tuple[int, Edges]:
    return 6, {(i, (i + 1) % 6) if i < 5 else (0, 5) for i in range(6)}


def _clique4() -> tuple[int, Edges]:
    return 4, {(a, b) for a in range(4) for b in range(a + 1, 4)}


def _star5() -> tuple[int, Edges]:
    return 6, {(0, i) for i in range(1, 6)}


MOTIFS: dict[str, Callable[[], tuple[int, Edges]]] = {
    "house": _house,
    "cycle6": _cycle6,
    "clique4": _clique4,
    "star5": _star5,
}


def _to_data(
    n: int,
    edges: Edges,
    label: int,
    max_degree_label: int,
    node_label: list[int] | None = None,
    n_labels: int = 0,
):
    """A ``Data`` graph (both edge directions, sorted); node labels are the given ones or
    ``min(degree, max_degree_label)``."""
    from torch_geometric.data import Data

    if edges:
        e = torch.tensor(sorted(edges), dtype=torch.long).t()
        ei = torch.cat([e, e.flip(0)], dim=1)
        order = torch.argsort(ei[0] * n + ei[1])
        ei = ei[:, order].contiguous()
    else:
        ei = torch.zeros(2, 0, dtype=torch.long)
    if node_label is None:
        nl, n_labels = degree_labels(ei, n, max_degree_label), max_degree_label + 1
    else:
        nl = torch.tensor(node_label, dtype=torch.long)
    data = Data(
        x=torch.nn.functional.one_hot(nl, n_labels).float(),
        edge_index=ei,
        y=torch.tensor([label]),
    )
    data.node_label = nl
    return data


def motif_dataset(
    num_graphs: int = 600,
    seed: int = 0,
    motifs: tuple[str, ...] = ("house", "cycle6", "clique4", "star5"),
    base_min: int = 10,
    base_max: int = 20,
    noise_edges: int = 2,
    max_degree_label: int = 6,
) -> GraphDataset:
    """``num_graphs`` graphs, classes balanced (graph ``i`` has class ``i % len(motifs)``);
    see the module docstring for the recipe."""
    unknown = [m for m in motifs if m not in MOTIFS]
    if unknown:
        raise ValueError(f"unknown motif(s) {unknown}; available: {', '.join(MOTIFS)}")
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(num_graphs):
        c = i % len(motifs)
        nb = int(rng.integers(base_min, base_max + 1))
        edges = pa_tree(nb, rng)
        for _ in range(noise_edges):
            _add(edges, int(rng.integers(nb)), int(rng.integers(nb)))
        nm, medges = MOTIFS[motifs[c]]()
        for a, b in medges:
            _add(edges, nb + a, nb + b)
        _add(edges, int(rng.integers(nb)), nb + int(rng.integers(nm)))
        graphs.append(_to_data(nb + nm, edges, c, max_degree_label))
    recipe = (
        f"motifs: PA tree on U{{{base_min}..{base_max}}} nodes + {noise_edges} random edges "
        f"+ one motif per class {list(motifs)}; seed {seed}"
    )
    return GraphDataset(
        "motifs", graphs, len(motifs), max_degree_label + 1, list(range(len(motifs))), recipe
    )


FAMILIES: dict[str, Callable[[int, np.random.Generator], Edges]] = {
    "erdos_renyi": lambda n, rng: erdos_renyi(n, 4.0 / (n - 1), rng),
    "barabasi_albert": lambda n, rng: barabasi_albert(n, 2, rng),
    "watts_strogatz": lambda n, rng: watts_strogatz(n, 4, 0.2, rng),
}


def family_dataset(
    num_graphs: int = 600,
    seed: int = 0,
    families: tuple[str, ...] = ("erdos_renyi", "barabasi_albert", "watts_strogatz"),
    n_min: int = 12,
    n_max: int = 24,
    max_degree_label: int = 8,
) -> GraphDataset:
    """``num_graphs`` graphs, class ``i % len(families)``; see the module docstring."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown family {unknown}; available: {', '.join(FAMILIES)}")
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(num_graphs):
        c = i % len(families)
        n = int(rng.integers(n_min, n_max + 1))
        graphs.append(_to_data(n, FAMILIES[families[c]](n, rng), c, max_degree_label))
    recipe = (
        f"families {list(families)} on U{{{n_min}..{n_max}}} nodes, mean degree ~4; seed {seed}"
    )
    return GraphDataset(
        "families", graphs, len(families), max_degree_label + 1, list(range(len(families))), recipe
    )


ATOMS = ("C", "N", "O", "Cl")  # node labels 0..3 of the molecules dataset


def _free(
    edges: Edges, atoms: list[int], rng: np.random.Generator, ring_only: list[int] | None = None
) -> int:
    """A random atom with degree < 3 (room for one more bond), from ``ring_only`` if given."""
    deg = [0] * len(atoms)
    for a, b in edges:
        deg[a] += 1
        deg[b] += 1
    pool = ring_only if ring_only is not None else range(len(atoms))
    cands = [v for v in pool if deg[v] < 3 and atoms[v] == 0]
    return int(cands[rng.integers(len(cands))])


def _attach(
    edges: Edges, atoms: list[int], at: int, group: list[int], bonds: list[tuple[int, int]]
) -> None:
    """Append atoms ``group`` (labels) with internal ``bonds`` (group indices; -1 = ``at``)."""
    base = len(atoms)
    atoms += group
    for a, b in bonds:
        _add(edges, at if a < 0 else base + a, at if b < 0 else base + b)


def molecule_dataset(
    num_graphs: int = 600,
    seed: int = 0,
    rings: tuple[int, int] = (1, 3),
    substituents: tuple[int, int] = (0, 3),
) -> GraphDataset:
    """Molecule-like graphs in the spirit of MUTAG (mutagenic nitro-aromatics), 2 classes.

    Atoms C, N, O, Cl are node labels 0..3. A backbone of ``U{rings}`` benzene rings (6-cycles
    of C), each ring after the first joined to a random carbon with a free valence directly or
    through a chain of 1-2 carbons; ``U{substituents}`` substituents (C, O, N or Cl, uniform)
    on random carbons with a free valence. Class 1 carries a nitro group (N bonded to a ring
    carbon and to two O); class 0 a decoy made of the same atoms on a ring carbon: a carboxyl
    group (C with two O) or a hydroxylamine (N-O), uniform. Graph ``i`` has class ``i % 2``."""
    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(num_graphs):
        c = i % 2
        atoms: list[int] = []
        edges: Edges = set()
        ring_atoms: list[int] = []
        for r in range(int(rng.integers(rings[0], rings[1] + 1))):
            start = len(atoms)
            if r == 0:
                _attach(edges, atoms, -1, [0] * 6, [(k, (k + 1) % 6) for k in range(6)])
            else:
                at = _free(edges, atoms, rng)
                chain = int(rng.integers(0, 3))
                ring = [(chain + k, chain + (k + 1) % 6) for k in range(6)]
                links = [(-1, 0)] + [(k, k + 1) for k in range(chain)]
                _attach(edges, atoms, at, [0] * (chain + 6), ring + links)
                start += chain
            ring_atoms += list(range(start, start + 6))
        for _ in range(int(rng.integers(substituents[0], substituents[1] + 1))):
            _attach(edges, atoms, _free(edges, atoms, rng), [int(rng.integers(4))], [(-1, 0)])
        at = _free(edges, atoms, rng, ring_atoms)
        if c == 1:  # nitro: N(=O)O
            _attach(edges, atoms, at, [1, 2, 2], [(-1, 0), (0, 1), (0, 2)])
        elif rng.random() < 0.5:  # carboxyl: C(=O)O
            _attach(edges, atoms, at, [0, 2, 2], [(-1, 0), (0, 1), (0, 2)])
        else:  # hydroxylamine: N-O
            _attach(edges, atoms, at, [1, 2], [(-1, 0), (0, 1)])
        graphs.append(_to_data(len(atoms), edges, c, 0, node_label=atoms, n_labels=len(ATOMS)))
    recipe = (
        f"molecules: {rings[0]}-{rings[1]} benzene rings, {substituents[0]}-{substituents[1]} "
        f"substituents; class 1 nitro group, class 0 carboxyl or N-O decoy; seed {seed}"
    )
    return GraphDataset("molecules", graphs, 2, len(ATOMS), [0, 1], recipe)


GENERATORS: dict[str, Callable[..., GraphDataset]] = {
    "motifs": motif_dataset,
    "families": family_dataset,
    "molecules": molecule_dataset,
}


def load_graph_dataset(name: str, num_graphs: int, seed: int, tu_name: str = "") -> GraphDataset:
    """A generated dataset by name (``motifs``, ``families``) or, for a path to a folder,
    the TU dataset in it (``tu_name`` picks one when the folder holds several)."""
    from pathlib import Path

    if name in GENERATORS:
        return GENERATORS[name](num_graphs=num_graphs, seed=seed)
    if Path(name).is_dir():
        from fewstep.dataset_distill.graphs.tu import read_tu

        return read_tu(name, tu_name or None)
    raise ValueError(
        f"unknown graph dataset {name!r}: expected one of {', '.join(GENERATORS)} or a folder "
        f"of TU files (DS_A.txt, DS_graph_indicator.txt, DS_graph_labels.txt)"
    )


def stratified_split(
    labels: torch.Tensor, fractions: tuple[float, float, float], seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of a train / val / test split with the class proportions kept."""
    g = torch.Generator().manual_seed(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)].tolist()
        n_tr = round(fractions[0] * len(idx))
        n_va = round(fractions[1] * len(idx))
        parts[0].extend(idx[:n_tr])
        parts[1].extend(idx[n_tr : n_tr + n_va])
        parts[2].extend(idx[n_tr + n_va :])
    return tuple(sorted(p) for p in parts)  # type: ignore[return-value]
