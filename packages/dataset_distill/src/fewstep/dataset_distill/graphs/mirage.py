"""Mirage: model-agnostic graph distillation for graph classification (Gupta, Manchanda,
Bedathur, Ranu; ICLR 2024; code frigategnn/Mirage).

The idea (paper Sec. 3): an L-layer message-passing GNN sees a graph only through the L-hop
*computation trees* of its nodes, and a sum readout adds their root embeddings. So a graph is,
to the GNN, the set of its computation trees. Mirage

1. gives every node's L-hop computation tree a canonical label (:func:`computation_tree_ids`);
2. treats each training graph as a transaction (its set of tree labels) and mines, per
   class, the tree sets that occur in at least ``min_support`` of that class's graphs
   (:func:`mine_tree_sets`; the paper uses FP-growth, we enumerate the same frequent itemsets
   best-first by support so that a size budget keeps the most frequent ones);
3. drops tree sets that are also frequent in another class (the official code's filter);
4. stores the distilled dataset as the tree sets with their support counts; a GNN trains on
   graphs made of the trees of a set (disjoint union, edges pointing child -> parent, readout
   over the roots; :func:`tree_set_graph`), sampling sets in proportion to their support;
5. at inference the official code offers two views of a test graph: the whole graph (its
   NCI1/IMDB scripts) or the disjoint union of its computation trees that occur in the
   distilled sets (its ogbg pipeline; :func:`frequent_tree_view`). The second removes the
   shift between small tree sets and whole graphs and needs only the distilled file.

No GNN is trained during distillation and nothing depends on the architecture, so the same
distilled set trains GCN, GIN or GAT ("model-agnostic").

Why a tree set is a faithful input: in a computation tree every internal node at depth d < L
has one child per neighbour in the original graph (including the node it came from), so it
receives exactly the messages it received in the graph; after L layers the root embedding
equals the node's embedding in the original graph for any aggregator over incoming neighbours
(sum/GIN, mean, max, attention/GAT). GCN's symmetric normalisation also uses the *sender's*
degree, which differs at the leaves (a leaf has no children), so GCN is reproduced up to that
leaf normalisation. The parity tests check the GIN case exactly.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

# A canonical tree key: (depth, node label, sorted ((edge label, child tree id), ...)).
TreeKey = tuple[int, int, tuple[tuple[int, int], ...]]


@dataclass
class TreeTable:
    """Interning table of canonical computation trees: an injective map from canonical keys
    to ids, so two trees get the same id iff they are isomorphic as rooted labelled trees
    (Aho-Hopcroft-Ullman canonical form, computed bottom-up like the Weisfeiler-Lehman
    refinement but without hashing collisions)."""

    keys: list[TreeKey] = field(default_factory=list)
    index: dict[TreeKey, int] = field(default_factory=dict)

    def intern(self, key: TreeKey) -> int:
        tid = self.index.get(key)
        if tid is None:
            tid = len(self.keys)
            self.keys.append(key)
            self.index[key] = tid
        return tid

    def __len__(self) -> int:
        return len(self.keys)


def computation_tree_ids(
    edge_index: torch.Tensor,
    node_label: torch.Tensor,
    hops: int,
    table: TreeTable,
    edge_label: torch.Tensor | None = None,
) -> list[int]:
    """Canonical ids of every node's ``hops``-hop computation tree (Mirage Sec. 3.1).

    edge_index [2, E] (messages u -> v for column (u, v); undirected graphs list both
    directions), node_label [n] long, edge_label [E] long or None. The depth-h tree of v is
    its label with, for every incoming edge (u, v), the depth-(h-1) tree of u as a child
    (so the tree walks back to where it came from, as message passing does). Returns n ids
    into ``table``."""
    if hops < 0:
        raise ValueError(f"hops must be >= 0, got {hops}")
    n = int(node_label.numel())
    labels = node_label.tolist()
    src, dst = edge_index.tolist() if edge_index.numel() else ([], [])
    elab = edge_label.tolist() if edge_label is not None else [0] * len(src)
    incoming: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for u, v, e in zip(src, dst, elab):
        incoming[v].append((e, u))
    ids = [table.intern((0, labels[v], ())) for v in range(n)]
    for h in range(1, hops + 1):
        ids = [
            table.intern((h, labels[v], tuple(sorted((e, ids[u]) for e, u in incoming[v]))))
            for v in range(n)
        ]
    return ids


def expand_tree(
    table: TreeTable, tree_id: int
) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """The tree as (node labels, edges (child, parent), edge labels); node 0 is the root,
    nodes in breadth-first order."""
    labels = [table.keys[tree_id][1]]
    edges: list[tuple[int, int]] = []
    elabels: list[int] = []
    queue = deque([(0, tree_id)])
    while queue:
        node, tid = queue.popleft()
        for e, child in table.keys[tid][2]:
            c = len(labels)
            labels.append(table.keys[child][1])
            edges.append((c, node))
            elabels.append(e)
            queue.append((c, child))
    return labels, edges, elabels


def tree_set_graph(table: TreeTable, tree_ids: tuple[int, ...], label: int, num_node_labels: int):
    """A ``Data`` graph: the disjoint union of the trees, x = one-hot node labels, edges
    child -> parent, ``root_mask`` marking each tree's root, y = ``label``."""
    from torch_geometric.data import Data

    labels: list[int] = []
    edges: list[tuple[int, int]] = []
    elabels: list[int] = []
    roots: list[int] = []
    for tid in tree_ids:
        tl, te, tel = expand_tree(table, tid)
        off = len(labels)
        roots.append(off)
        labels += tl
        edges += [(a + off, b + off) for a, b in te]
        elabels += tel
    nl = torch.tensor(labels, dtype=torch.long)
    ei = (
        torch.tensor(edges, dtype=torch.long).t().contiguous()
        if edges
        else torch.zeros(2, 0, dtype=torch.long)
    )
    root_mask = torch.zeros(len(labels), dtype=torch.bool)
    root_mask[roots] = True
    d = Data(x=torch.nn.functional.one_hot(nl, num_node_labels).float(), edge_index=ei)
    d.y = torch.tensor([label])
    d.root_mask = root_mask
    d.node_label = nl
    d.edge_label = torch.tensor(elabels, dtype=torch.long)
    d.tree_ids = tuple(tree_ids)
    return d


def _bits(idx: list[int]) -> int:
    out = 0
    for i in idx:
        out |= 1 << i
    return out


def _count_threshold(min_support: float, n: int) -> int:
    """Smallest count that is at least ``min_support * n`` (at least 1)."""
    return max(1, math.ceil(min_support * n - 1e-9))


@dataclass
class MinedSet:
    trees: tuple[int, ...]  # tree ids, sorted
    support: int  # graphs of the class that contain every tree of the set


def mine_tree_sets(
    transactions: list[set[int]],
    min_support: float,
    max_sets: int,
    max_set_size: int = 4,
    closed_only: bool = True,
    other_classes: list[list[set[int]]] | None = None,
    max_expansions: int = 50_000,
) -> list[MinedSet]:
    """Frequent tree sets of one class, most frequent first.

    transactions: one set of tree ids per graph of the class. A set is frequent when at least
    ``ceil(min_support * len(transactions))`` graphs contain all its trees. Sets are
    enumerated best-first by support (support is anti-monotone, so a set's prefix always
    leaves the heap before it: the output is in non-increasing support order, the same
    itemsets FP-growth returns, cut at ``max_sets``). ``closed_only`` keeps a set only if no
    larger set has the same support (so the budget is not spent on redundant subsets).
    ``other_classes``: the transactions of every other class; a set frequent there too (at
    the same relative threshold) is dropped, as in the official code."""
    if not 0 < min_support <= 1:
        raise ValueError(f"min_support must be in (0, 1], got {min_support}")
    n = len(transactions)
    if n == 0:
        return []
    thr = _count_threshold(min_support, n)
    counts: dict[int, list[int]] = {}
    for gi, t in enumerate(transactions):
        for item in t:
            counts.setdefault(item, []).append(gi)
    items = sorted(i for i, g in counts.items() if len(g) >= thr)
    tids = [_bits(counts[i]) for i in items]
    others = []
    for trans in other_classes or []:
        if not trans:
            continue
        o_thr = _count_threshold(min_support, len(trans))
        o_counts: dict[int, int] = {}
        for gi, t in enumerate(trans):
            for item in t:
                o_counts[item] = o_counts.get(item, 0) | (1 << gi)
        others.append((o_thr, [o_counts.get(i, 0) for i in items]))

    heap: list[tuple[int, int, tuple[int, ...], int]] = []
    for k, tid in enumerate(tids):
        heapq.heappush(heap, (-tid.bit_count(), -1, (k,), tid))
    out: list[MinedSet] = []
    pops = 0
    while heap and len(out) < max_sets and pops < max_expansions:
        neg_sup, _, iset, tid = heapq.heappop(heap)
        pops += 1
        sup = -neg_sup
        keep = True
        if closed_only:
            inside = set(iset)
            keep = not any(j not in inside and (tid & tids[j]) == tid for j in range(len(items)))
        if keep:
            for o_thr, o_tids in others:
                o = -1
                for k in iset:
                    o &= o_tids[k]
                if o.bit_count() >= o_thr:
                    keep = False
                    break
        if keep:
            out.append(MinedSet(tuple(items[k] for k in iset), sup))
        if len(iset) < max_set_size:
            for j in range(iset[-1] + 1, len(items)):
                t2 = tid & tids[j]
                s2 = t2.bit_count()
                if s2 >= thr:
                    heapq.heappush(heap, (-s2, -(len(iset) + 1), iset + (j,), t2))
    return out


@dataclass
class MirageResult:
    graphs: list  # tree-set graphs (Data with root_mask), one per mined set
    weights: torch.Tensor  # [S] support counts (sampling weights)
    info: dict  # timings and counts
    table: TreeTable = field(default_factory=TreeTable)  # canonical trees seen while mining
    kept_trees: set[int] = field(default_factory=set)  # trees that occur in a mined set


def compact_stored_scalars(graphs: list, num_features: int) -> int:
    """Numbers needed to store a tree-set dataset the way Mirage does: every distinct tree
    once (node features + edge endpoints), then per set its tree ids, class and support."""
    trees: dict[tuple, int] = {}
    total_ids = 0
    for g in graphs:
        roots = torch.nonzero(g.root_mask).view(-1).tolist() + [int(g.num_nodes)]
        for a, b in zip(roots[:-1], roots[1:]):
            key = (tuple(g.node_label[a:b].tolist()), _edges_between(g.edge_index, a, b))
            trees.setdefault(key, (b - a) * num_features + 2 * len(key[1]))
        total_ids += len(roots) - 1
    return sum(trees.values()) + total_ids + 2 * len(graphs)


def _edges_between(ei: torch.Tensor, a: int, b: int) -> tuple:
    sel = (ei[0] >= a) & (ei[0] < b)
    return tuple(map(tuple, (ei[:, sel] - a).t().tolist()))


def mirage_distill(
    graphs: list,
    num_classes: int,
    num_node_labels: int,
    hops: int = 2,
    min_support: float = 0.1,
    sets_per_class: int = 10,
    max_set_size: int = 4,
    closed_only: bool = True,
    drop_shared: bool = True,
) -> MirageResult:
    """Distil labelled graphs (each with ``node_label``, ``y`` and optionally ``edge_label``)
    into at most ``sets_per_class`` weighted tree sets per class. ``hops`` must equal the
    number of layers of the GNNs that will train on the result."""
    for i, g in enumerate(graphs):
        if getattr(g, "node_label", None) is None:
            raise ValueError(
                f"graph {i} has no node_label: Mirage's canonical trees need discrete node "
                f"labels (TU node labels, or degree labels for unlabelled graphs)"
            )
        if g.node_label.numel() and int(g.node_label.max()) >= num_node_labels:
            raise ValueError(f"graph {i}: node_label exceeds num_node_labels={num_node_labels}")
    t0 = time.perf_counter()
    table = TreeTable()
    trans_by_class: list[list[set[int]]] = [[] for _ in range(num_classes)]
    for g in graphs:
        ids = computation_tree_ids(
            g.edge_index, g.node_label, hops, table, getattr(g, "edge_label", None)
        )
        trans_by_class[int(g.y)].append(set(ids))
    t_trees = time.perf_counter() - t0
    t1 = time.perf_counter()
    out_graphs, weights, per_class = [], [], []
    for c in range(num_classes):
        others = [trans_by_class[o] for o in range(num_classes) if o != c] if drop_shared else None
        mined = mine_tree_sets(
            trans_by_class[c], min_support, sets_per_class, max_set_size, closed_only, others
        )
        if not mined:
            raise ValueError(
                f"Mirage found no tree set for class {c} at min_support={min_support} "
                f"(with drop_shared={drop_shared}); lower --min_support or use fewer hops"
            )
        per_class.append(len(mined))
        for m in mined:
            out_graphs.append(tree_set_graph(table, m.trees, c, num_node_labels))
            weights.append(float(m.support))
    t_mine = time.perf_counter() - t1
    distinct = [len(set().union(*t)) if t else 0 for t in trans_by_class]
    info = {
        "tree_seconds": t_trees,
        "mining_seconds": t_mine,
        "distinct_trees": len({k for k in range(len(table)) if table.keys[k][0] == hops}),
        "distinct_trees_per_class": distinct,
        "sets_per_class": per_class,
        "mean_trees_per_set": sum(int(g.root_mask.sum()) for g in out_graphs) / len(out_graphs),
        "stored_scalars_compact": compact_stored_scalars(out_graphs, num_node_labels),
    }
    kept = {t for g in out_graphs for t in g.tree_ids}
    return MirageResult(out_graphs, torch.tensor(weights), info, table, kept)


def tree_vocabulary(tree_set_graphs: list, hops: int) -> tuple[TreeTable, set[int]]:
    """The canonical ids of every tree in a distilled tree-set dataset (e.g. loaded from a
    run folder): in a tree-set graph edges point child -> parent, so the ``hops``-hop
    computation tree of a root over incoming edges is exactly its stored tree."""
    table = TreeTable()
    kept: set[int] = set()
    for g in tree_set_graphs:
        ids = computation_tree_ids(
            g.edge_index, g.node_label, hops, table, getattr(g, "edge_label", None)
        )
        kept.update(ids[r] for r in torch.nonzero(g.root_mask).view(-1).tolist())
    return table, kept


def frequent_tree_view(g, table: TreeTable, kept: set[int], hops: int, num_node_labels: int):
    """A graph as the official Mirage code for ogbg datasets feeds test graphs to a
    Mirage-trained GNN: the disjoint union of its nodes' computation trees that occur in the
    distilled sets (with multiplicity; readout over their roots), or the graph itself when
    none does. Uses no label: ``y`` is only carried along."""
    ids = computation_tree_ids(
        g.edge_index, g.node_label, hops, table, getattr(g, "edge_label", None)
    )
    keep = tuple(t for t in ids if t in kept)
    if not keep:
        return g
    return tree_set_graph(table, keep, int(g.y), num_node_labels)
