"""Gradient-matching graph condensation, the baseline Mirage compares against.

Graph classification: DosCond (Jin, Tang, Jiang, Li, Zhang, Tang, Yin; "Condensing Graphs
via One-Step Gradient Matching", KDD 2022; code amazon-science/doscond). Each synthetic graph
has learnable node features X' [N, F] and adjacency logits Omega [N, N]; the structure is a
Bernoulli graph A'_ij ~ Bern(sigmoid(Omega_ij)) with Omega symmetrised, optimised through the
binary-concrete relaxation (Maddison et al. 2017; Jang et al. 2017)

    A'_ij = sigmoid((Omega_ij + log d - log(1 - d)) / tau),  d ~ U(0, 1)          (DosCond Eq. 6)

with the temperature annealed from 1 to 0.01 as in the official code. The objective is the
*one-step* gradient matching loss: for a freshly initialised GNN theta_0 (no inner training),

    L = E_{theta_0} [ sum_c D( grad_theta CE(f(A'_c, X'_c), c), grad_theta CE(f(T_c), c) ) ]
        + beta * relu(mean sigmoid(Omega) - s_0)                                  (DosCond Eq. 5)

where T_c is a batch of real graphs of class c, s_0 the density at initialisation (the
official sparsity term) and D the layer-wise distance of Dataset Condensation (Zhao, Mopuri,
Bilen, ICLR 2021, Eq. 10): for each weight matrix the sum over output units of
1 - cos(g_syn[i], g_real[i]); bias vectors are ignored, as in DC. At test time the
structure is the most likely graph, sigmoid(Omega) > 0.5.

Node classification: GCond (Jin et al., "Graph Condensation for Graph Neural Networks",
ICLR 2022) on torch-geometric's Karate Club, see :func:`gcond_node_distill`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.dataset_distill.graphs.graphset import GraphSet

# --------------------------------------------------------------------------- distances


def dc_distance(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise gradient distance (Zhao et al. 2021, Eq. 10).

    Each pair of gradients of one parameter (shape [out, ...]) contributes
    sum_i (1 - cos(syn[i], real[i])) over output units i; 1-D parameters (biases) contribute
    0. Returns a scalar; 0 when the gradients are parallel row by row."""
    if len(gw_syn) != len(gw_real):
        raise ValueError(f"got {len(gw_syn)} synthetic and {len(gw_real)} real gradients")
    total = gw_syn[0].new_zeros(())
    for s, r in zip(gw_syn, gw_real):
        if s.shape != r.shape:
            raise ValueError(f"gradient shapes differ: {tuple(s.shape)} vs {tuple(r.shape)}")
        if s.dim() == 1:
            continue
        s2, r2 = s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1)
        cos = (s2 * r2).sum(1) / (s2.norm(dim=1) * r2.norm(dim=1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


def mse_distance(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor]) -> torch.Tensor:
    """Squared Euclidean distance between the concatenated gradients (DC's 'mse' option)."""
    s = torch.cat([g.reshape(-1) for g in gw_syn])
    r = torch.cat([g.reshape(-1) for g in gw_real])
    return ((s - r) ** 2).sum()


DISTANCES: dict[str, Callable[[list, list], torch.Tensor]] = {
    "dc": dc_distance,
    "mse": mse_distance,
}


# --------------------------------------------------------------------------- dense GCN


def normalized_adjacency(adj: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 (Kipf & Welling 2017, Eq. 2) for a batch adj [B, N, N]; padded
    nodes (mask [B, N] False) get no self-loop and no edges, so they stay out of the sums."""
    n = adj.shape[-1]
    eye = torch.eye(n, dtype=adj.dtype, device=adj.device).expand_as(adj)
    if mask is not None:
        m = mask.to(adj.dtype)
        adj = adj * m.unsqueeze(1) * m.unsqueeze(2)
        eye = eye * m.unsqueeze(2)
    a = adj + eye
    deg = a.sum(-1)
    inv = deg.clamp(min=1e-12).pow(-0.5) * (deg > 0).to(adj.dtype)
    return inv.unsqueeze(-1) * a * inv.unsqueeze(-2)


class _DenseGCNLayer(nn.Module):
    """Same parameters (``lin.weight`` [out, in], ``bias`` [out]) as torch-geometric's
    ``GCNConv``, so a ``GraphClassifier("gcn")`` state dict loads into ``DenseGCN``."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.lin = nn.Linear(i, o, bias=False)
        self.bias = nn.Parameter(torch.zeros(o))

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        return a_hat @ self.lin(h) + self.bias


class DenseGCN(nn.Module):
    """GCN on dense batches: forward(x [B, N, F], adj [B, N, N], mask [B, N] | None) ->
    logits [B, C]; ReLU after every layer, sum (or mean) readout over valid nodes, linear
    head. Equal to ``GraphClassifier("gcn", readout=...)`` on the same graphs and weights."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden: int = 64,
        layers: int = 2,
        readout: str = "sum",
    ) -> None:
        super().__init__()
        if readout not in ("sum", "mean"):
            raise ValueError(f"readout must be 'sum' or 'mean', got {readout!r}")
        self.readout = readout
        dims = [in_dim] + [hidden] * layers
        self.convs = nn.ModuleList(_DenseGCNLayer(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(hidden, num_classes)

    def forward(
        self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        a_hat = normalized_adjacency(adj, mask)
        h = x
        for conv in self.convs:
            h = torch.relu(conv(h, a_hat))
        if mask is not None:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        pooled = h.sum(1)
        if self.readout == "mean":
            count = mask.sum(1, keepdim=True).to(h.dtype) if mask is not None else h.shape[1]
            pooled = pooled / count.clamp(min=1) if mask is not None else pooled / count
        return self.head(pooled)


# --------------------------------------------------------------------------- structure


def symmetric_logits(omega: torch.Tensor) -> torch.Tensor:
    """(Omega + Omega^T) / 2 for a batch [B, N, N]."""
    return (omega + omega.transpose(1, 2)) / 2


def sample_adjacency(
    omega: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binary-concrete sample of the Bernoulli graph (DosCond Eq. 6): [B, N, N] in (0, 1),
    symmetric (one noise draw per unordered pair), zero diagonal, differentiable in omega."""
    b, n, _ = omega.shape
    i, j = torch.triu_indices(n, n, 1)
    u = torch.rand(b, i.numel(), generator=generator).clamp(1e-6, 1 - 1e-6).to(omega)
    noise = omega.new_zeros(b, n, n)
    noise[:, i, j] = torch.log(u) - torch.log1p(-u)
    noise = noise + noise.transpose(1, 2)
    a = torch.sigmoid((symmetric_logits(omega) + noise) / temperature)
    return a * (1 - torch.eye(n, dtype=a.dtype, device=a.device))


def discrete_adjacency(omega: torch.Tensor) -> torch.Tensor:
    """The most likely graph: 1 where sigmoid(sym(Omega)) > 0.5, zero diagonal."""
    n = omega.shape[-1]
    a = (torch.sigmoid(symmetric_logits(omega)) > 0.5).to(omega.dtype)
    return a * (1 - torch.eye(n, dtype=a.dtype, device=a.device))


def annealed_temperature(step: int, start: float, end: float, steps: int) -> float:
    """start * (end / start)^(step / steps), held at ``end`` afterwards (official schedule)."""
    return max(end, start * (end / start) ** (min(step, steps) / max(steps, 1)))


# --------------------------------------------------------------------------- DosCond


@dataclass
class DosCondConfig:
    graphs_per_class: int = 10  # synthetic graphs per class
    nodes: int = 0  # nodes per synthetic graph (0: mean size of the training graphs)
    iterations: int = 300  # outer iterations (each: a fresh GNN, one matching step)
    lr_feat: float = 0.01  # Adam learning rate of the node features (official 0.01)
    lr_adj: float = 0.5  # Adam learning rate of the adjacency logits (official 0.01-2)
    hidden: int = 64  # width of the GCN whose gradients are matched
    layers: int = 2  # layers of that GCN
    readout: str = "sum"  # its readout (use the one the evaluation GNNs use)
    real_batch: int = 64  # real graphs per class per iteration
    beta: float = 0.1  # weight of the sparsity regulariser
    init: str = "real"  # synthetic graphs start as real graphs ("real") or uniform noise
    tau_start: float = 1.0  # binary-concrete temperature at the start
    tau_end: float = 0.01  # ... and after tau_steps
    tau_steps: int = 200  # annealing length
    distance: str = "mse"  # gradient distance: mse (the official default) or dc (DC Eq. 10)


@dataclass
class SyntheticGraphs:
    """The learnable synthetic set: feat [S, N, F], omega [S, N, N], labels [S]."""

    feat: torch.Tensor
    omega: torch.Tensor
    labels: torch.Tensor

    def to_graph_set(self) -> GraphSet:
        """Discrete graphs (sigmoid > 0.5) with the learnt features, weights 1."""
        from torch_geometric.data import Data

        adj = discrete_adjacency(self.omega.detach())
        graphs = []
        for k in range(self.labels.numel()):
            ei = torch.nonzero(adj[k]).t().contiguous()
            graphs.append(
                Data(x=self.feat[k].detach().clone(), edge_index=ei, y=self.labels[k : k + 1])
            )
        return GraphSet.uniform(graphs)


def _dense(graphs: list, max_nodes: int | None = None):
    from torch_geometric.data import Batch
    from torch_geometric.utils import to_dense_adj, to_dense_batch

    b = Batch.from_data_list([_plain(g) for g in graphs])
    x, mask = to_dense_batch(b.x, b.batch, max_num_nodes=max_nodes)
    adj = to_dense_adj(b.edge_index, b.batch, max_num_nodes=x.shape[1])
    return x, adj, mask


def _plain(g):
    from torch_geometric.data import Data

    return Data(x=g.x, edge_index=g.edge_index, y=g.y)


def init_synthetic(
    train: list, num_classes: int, cfg: DosCondConfig, gen: torch.Generator
) -> tuple[SyntheticGraphs, float]:
    """Synthetic graphs (DosCond's init: real graphs of the class, cut/padded to N nodes,
    logits A*10-5; or uniform noise) and the initial edge density s_0."""
    n = cfg.nodes or round(sum(int(g.num_nodes) for g in train) / len(train))
    labels_all = torch.tensor([int(g.y) for g in train])
    f = int(train[0].x.shape[1])
    feats, adjs, labels = [], [], []
    for c in range(num_classes):
        idx = torch.nonzero(labels_all == c).view(-1)
        if idx.numel() == 0:
            raise ValueError(f"DosCond: no training graph of class {c}")
        pick = idx[torch.randint(idx.numel(), (cfg.graphs_per_class,), generator=gen)]
        if cfg.init == "real":
            x, adj, _ = _dense([train[i] for i in pick.tolist()], max_nodes=n)
        elif cfg.init == "noise":
            x = torch.rand(cfg.graphs_per_class, n, f, generator=gen)
            adj = (torch.rand(cfg.graphs_per_class, n, n, generator=gen) < 0.15).float()
            adj = torch.triu(adj, 1)
            adj = adj + adj.transpose(1, 2)
        else:
            raise ValueError(f"DosCond init must be 'real' or 'noise', got {cfg.init!r}")
        feats.append(x)
        adjs.append(adj)
        labels += [c] * cfg.graphs_per_class
    adj = torch.cat(adjs)
    density = float(adj.mean())
    syn = SyntheticGraphs(
        feat=torch.cat(feats).clone().requires_grad_(True),
        omega=(adj * 10 - 5).clone().requires_grad_(True),
        labels=torch.tensor(labels),
    )
    return syn, density


def matching_loss(
    model: nn.Module,
    syn: SyntheticGraphs,
    real_by_class: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    temperature: float,
    distance: Callable[[list, list], torch.Tensor],
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """sum_c D(grad CE on synthetic class c, grad CE on the real batch of class c): the
    one-step gradient matching term of DosCond Eq. 5 for one theta_0. ``real_by_class[c]``
    = dense (x, adj, mask) of a real batch. Differentiable in syn.feat and syn.omega."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = syn.feat.new_zeros(())
    for c, (x, adj, mask) in enumerate(real_by_class):
        y_r = torch.full((x.shape[0],), c, dtype=torch.long)
        g_real = torch.autograd.grad(nn.functional.cross_entropy(model(x, adj, mask), y_r), params)
        g_real = [g.detach() for g in g_real]
        sel = torch.nonzero(syn.labels == c).view(-1)
        a_syn = sample_adjacency(syn.omega[sel], temperature, gen)
        y_s = syn.labels[sel]
        loss_s = nn.functional.cross_entropy(model(syn.feat[sel], a_syn, None), y_s)
        g_syn = torch.autograd.grad(loss_s, params, create_graph=True)
        total = total + distance(list(g_syn), g_real)
    return total


def doscond_distill(
    train: list,
    num_classes: int,
    cfg: DosCondConfig,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[SyntheticGraphs, dict]:
    """Run DosCond on labelled real graphs; returns the synthetic graphs and
    {"loss_curve": [(step, matching loss)], "seconds": ...}."""
    if cfg.distance not in DISTANCES:
        raise ValueError(f"unknown distance {cfg.distance!r}; available: {', '.join(DISTANCES)}")
    gen = torch.Generator().manual_seed(seed)
    syn, density = init_synthetic(train, num_classes, cfg, gen)
    labels_all = torch.tensor([int(g.y) for g in train])
    by_class = [torch.nonzero(labels_all == c).view(-1) for c in range(num_classes)]
    opt_x = torch.optim.Adam([syn.feat], lr=cfg.lr_feat)
    opt_a = torch.optim.Adam([syn.omega], lr=cfg.lr_adj)
    distance = DISTANCES[cfg.distance]
    f = int(train[0].x.shape[1])
    curve = []
    t0 = time.perf_counter()
    for it in range(cfg.iterations):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            model = DenseGCN(f, num_classes, cfg.hidden, cfg.layers, cfg.readout)
        real = []
        for idx in by_class:
            pick = idx[torch.randperm(idx.numel(), generator=gen)[: cfg.real_batch]]
            real.append(_dense([train[i] for i in pick.tolist()]))
        tau = annealed_temperature(it, cfg.tau_start, cfg.tau_end, cfg.tau_steps)
        match = matching_loss(model, syn, real, tau, distance, gen)
        reg = torch.relu(torch.sigmoid(symmetric_logits(syn.omega)).mean() - density)
        loss = match + cfg.beta * reg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DosCond: non-finite loss at iteration {it}")
        opt_x.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_x.step()
        opt_a.step()
        curve.append((it, float(match.detach())))
        if on_step is not None:
            on_step(it, float(match.detach()))
    return syn, {"loss_curve": curve, "seconds": time.perf_counter() - t0, "density0": density}


def mean_matching_loss(
    syn: SyntheticGraphs,
    train: list,
    num_classes: int,
    cfg: DosCondConfig,
    models: int = 8,
    seed: int = 1234,
) -> float:
    """The matching loss averaged over ``models`` fixed random GCNs and fixed real batches at
    the most likely structure (tau -> 0 limit replaced by the discrete graph): a yardstick
    that goes down when the synthetic data is being optimised."""
    gen = torch.Generator().manual_seed(seed)
    labels_all = torch.tensor([int(g.y) for g in train])
    f = int(train[0].x.shape[1])
    vals = []
    det = SyntheticGraphs(syn.feat.detach(), syn.omega.detach(), syn.labels)
    adj = discrete_adjacency(det.omega)
    for _ in range(models):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            model = DenseGCN(f, num_classes, cfg.hidden, cfg.layers, cfg.readout)
        params = list(model.parameters())
        total = 0.0
        for c in range(num_classes):
            idx = torch.nonzero(labels_all == c).view(-1)
            pick = idx[torch.randperm(idx.numel(), generator=gen)[: cfg.real_batch]]
            x, a, m = _dense([train[i] for i in pick.tolist()])
            y = torch.full((x.shape[0],), c, dtype=torch.long)
            g_r = torch.autograd.grad(nn.functional.cross_entropy(model(x, a, m), y), params)
            sel = torch.nonzero(det.labels == c).view(-1)
            out = model(det.feat[sel], adj[sel], None)
            g_s = torch.autograd.grad(nn.functional.cross_entropy(out, det.labels[sel]), params)
            total += float(DISTANCES[cfg.distance](list(g_s), list(g_r)))
        vals.append(total)
    return sum(vals) / len(vals)


# --------------------------------------------------------------------------- GCond (nodes)


@dataclass
class GCondNodeConfig:
    nodes_per_class: int = 2  # synthetic nodes per class
    iterations: int = 200  # outer iterations (fresh GCN each)
    inner_steps: int = 5  # GCN updates on the synthetic graph between matchings (GCond's tau_theta)
    lr_feat: float = 0.01  # Adam learning rate of X'
    lr_adj: float = 0.01  # Adam learning rate of the structure MLP
    lr_model: float = 0.01  # learning rate of the GCN inner updates
    hidden: int = 32  # GCN width
    distance: str = "dc"  # gradient distance


class StructureMLP(nn.Module):
    """GCond Eq. 7: A'_ij = sigmoid((MLP([x_i; x_j]) + MLP([x_j; x_i])) / 2), zero diagonal."""

    def __init__(self, feat_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        pairs = torch.cat([x.unsqueeze(1).expand(n, n, -1), x.unsqueeze(0).expand(n, n, -1)], -1)
        s = self.mlp(pairs).squeeze(-1)
        a = torch.sigmoid((s + s.t()) / 2)
        return a * (1 - torch.eye(n, dtype=a.dtype))


class NodeGCN(nn.Module):
    """Two-layer dense GCN for node classification: logits [N, C] = A_hat relu(A_hat X W1) W2."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(in_dim, hidden)
        self.l2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        a = normalized_adjacency(adj.unsqueeze(0))[0]
        return a @ self.l2(torch.relu(a @ self.l1(x)))


def gcond_node_distill(
    x: torch.Tensor,
    adj: torch.Tensor,
    y: torch.Tensor,
    train_mask: torch.Tensor,
    num_classes: int,
    cfg: GCondNodeConfig,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GCond (Jin et al. ICLR 2022, Eq. 4-8) on one real graph (x [N, F], adj [N, N]).

    Synthetic nodes X' (initialised from random training nodes of each class) and a structure
    MLP are trained so that per class the GCN gradient on the synthetic graph matches the
    gradient of the training nodes of the real graph; between matchings the GCN takes
    ``inner_steps`` steps on the synthetic graph. Returns (X', A', y', info)."""
    gen = torch.Generator().manual_seed(seed)
    labels = []
    feats = []
    for c in range(num_classes):
        idx = torch.nonzero(train_mask & (y == c)).view(-1)
        if idx.numel() == 0:
            raise ValueError(f"GCond: no training node of class {c}")
        pick = idx[torch.randint(idx.numel(), (cfg.nodes_per_class,), generator=gen)]
        feats.append(x[pick])
        labels += [c] * cfg.nodes_per_class
    x_syn = torch.cat(feats).clone().requires_grad_(True)
    y_syn = torch.tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pge = StructureMLP(x.shape[1])
    opt_x = torch.optim.Adam([x_syn], lr=cfg.lr_feat)
    opt_a = torch.optim.Adam(pge.parameters(), lr=cfg.lr_adj)
    distance = DISTANCES[cfg.distance]
    curve = []
    t0 = time.perf_counter()
    for it in range(cfg.iterations):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            model = NodeGCN(x.shape[1], cfg.hidden, num_classes)
        params = list(model.parameters())
        a_syn = pge(x_syn)
        out_real = model(x, adj)
        out_syn = model(x_syn, a_syn)
        loss = x_syn.new_zeros(())
        for c in range(num_classes):
            m = train_mask & (y == c)
            g_r = torch.autograd.grad(
                nn.functional.cross_entropy(out_real[m], y[m]), params, retain_graph=True
            )
            s = y_syn == c
            g_s = torch.autograd.grad(
                nn.functional.cross_entropy(out_syn[s], y_syn[s]),
                params,
                create_graph=True,
                retain_graph=True,
            )
            loss = loss + distance(list(g_s), [g.detach() for g in g_r])
        opt_x.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        loss.backward()
        opt_x.step()
        opt_a.step()
        curve.append((it, float(loss.detach())))
        opt_m = torch.optim.SGD(model.parameters(), lr=cfg.lr_model)
        xs, as_ = x_syn.detach(), pge(x_syn).detach()
        for _ in range(cfg.inner_steps):
            opt_m.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xs, as_), y_syn).backward()
            opt_m.step()
    a_final = pge(x_syn).detach()
    return (
        x_syn.detach(),
        a_final,
        y_syn,
        {"loss_curve": curve, "seconds": time.perf_counter() - t0},
    )


def node_accuracy(
    x_tr: torch.Tensor,
    a_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x: torch.Tensor,
    adj: torch.Tensor,
    y: torch.Tensor,
    test_mask: torch.Tensor,
    num_classes: int,
    hidden: int = 32,
    steps: int = 200,
    seed: int = 0,
    train_mask: torch.Tensor | None = None,
) -> float:
    """Test accuracy on the real graph of a fresh GCN trained on (x_tr, a_tr, y_tr) (all its
    nodes, or ``train_mask`` of them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NodeGCN(x_tr.shape[1], hidden, num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    m = train_mask if train_mask is not None else torch.ones(y_tr.numel(), dtype=torch.bool)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x_tr, a_tr)[m], y_tr[m]).backward()
        opt.step()
    with torch.no_grad():
        pred = model(x, adj).argmax(1)
    return float((pred[test_mask] == y[test_mask]).float().mean())
