"""Dense2MoE: a dense layer restructured into a mixture of experts, then distilled.

Zheng, Ren, Xia, Xiao & Xie, "Dense2MoE: Restructuring Diffusion Transformer to MoE for
Efficient Text-to-Image Generation" (ICCV 2025).

Each target MLP (an up Linear -> elementwise activation -> down Linear, e.g. a DiT
feed-forward; or a single ``nn.Linear``, whose *input* features are then the hidden neurons
of the activation in front of it, as in the ToyMLP) becomes
    y = S(x) + sum_{e in TopK(r(x))} g_e(x) E_e(x)
with a shared, always-active expert S, E routed experts and a linear router r whose top-k
softmax probabilities gate the experts, scaled so that the near-uniform initial router
reproduces the dense layer: g_e = E p_e for neuron-split experts (each selected expert
starts at weight 1), g_e = (E / k) p_e for copied experts (weights summing to 1).

Expert initialisation (the paper's Taylor-metric initialisation): every hidden neuron j
gets the first-order Taylor importance I_j = E_x |sum_tokens a_j dL/da_j| (the Taylor
criterion of Molchanov et al., ICLR 2017), L the teacher's denoising loss on the example
batch; the ``shared_fraction``
most important neurons form the shared expert, the others are dealt to the E routed experts
round-robin by rank (so experts carry equal importance). Each expert is the dense layer
restricted to its neurons (rows of the up projection, columns of the down projection), so
with every expert active the MoE equals the dense layer exactly. ``init="copy"`` instead
upcycles (every routed expert a full copy, no shared expert); ``init="random"`` re-draws
all expert weights (the baseline the test compares against).

Distillation (the paper's knowledge distillation with load balancing): the MoE student
matches the teacher's prediction at random (x_t, t) (or any step-distillation objective via
``signal``, see ``compression.CompressionObjective``), optionally matches the teacher's
features, plus the Switch Transformer load-balancing loss (Fedus et al. 2022, eq. 4)
    L_bal = E * sum_e f_e P_e,
f_e the fraction of routing slots sent to expert e, P_e the mean router probability. The
student keeps the teacher's many-step sampler by default (a compression objective). Not
implemented: the paper's Mixture of Blocks and its group feature loss.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import denoising_loss, noised, sample_times, unguided
from fewstep.core.objectives.compression import CompressionConfig, CompressionObjective

# ------------------------------------------------------------------------------ experts


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def hidden_size(module: nn.Module) -> int:
    """Number of hidden neurons: a Linear's inputs, or the last Linear's inputs of an MLP."""
    if isinstance(module, nn.Linear):
        return module.in_features
    lin = _linears(module)
    if len(lin) < 2:
        raise ValueError(
            f"a Dense2MoE target must be an nn.Linear or an MLP with >= 2 Linear layers, got "
            f"{type(module).__name__} with {len(lin)}"
        )
    return lin[-1][1].in_features


def hidden_linear(module: nn.Module) -> nn.Linear:
    """The Linear whose inputs are the hidden neurons (the target, or the MLP's last)."""
    return module if isinstance(module, nn.Linear) else _linears(module)[-1][1]


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, child)


class SlicedLinear(nn.Module):
    """y = W[:, idx] x[..., idx] (+ b): a Linear restricted to some of its inputs."""

    def __init__(self, dense: nn.Linear, idx: Tensor, bias: bool):
        super().__init__()
        self.register_buffer("idx", idx.clone())
        self.weight = nn.Parameter(dense.weight.detach()[:, idx].clone())
        self.bias = (
            nn.Parameter(dense.bias.detach().clone()) if bias and dense.bias is not None else None
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.idx), self.weight, self.bias)


class OutputBias(nn.Module):
    """The dense layer's output bias as an always-active term: (T, d) -> (T, out)."""

    def __init__(self, bias: Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.bias.expand(x.shape[0], -1)


def _slice_mlp(mlp: nn.Module, idx: Tensor, bias: bool) -> nn.Module:
    """A copy of ``mlp`` keeping hidden neurons ``idx``: rows of the first Linear (both
    halves of a gated first Linear, as in GEGLU), columns of the last; the last Linear keeps
    its bias only when ``bias``. Everything between must act elementwise."""
    out = copy.deepcopy(mlp)
    (up_name, up), *_, (down_name, down) = _linears(out)
    hidden = down.in_features
    rows = idx
    if up.out_features == 2 * hidden:  # gated (GEGLU / SwiGLU): value and gate halves
        rows = torch.cat([idx, idx + hidden])
    elif up.out_features != hidden:
        raise ValueError(
            f"cannot split {type(mlp).__name__}: first Linear has {up.out_features} outputs, "
            f"last Linear {hidden} inputs (expected equal, or twice for a gated MLP)"
        )
    new_up = nn.Linear(up.in_features, len(rows), bias=up.bias is not None).to(up.weight)
    new_down = nn.Linear(len(idx), down.out_features, bias=bias and down.bias is not None)
    new_down = new_down.to(down.weight)
    with torch.no_grad():
        new_up.weight.copy_(up.weight[rows])
        if up.bias is not None:
            new_up.bias.copy_(up.bias[rows])
        new_down.weight.copy_(down.weight[:, idx])
        if new_down.bias is not None:
            new_down.bias.copy_(down.bias)
    _set(out, up_name, new_up)
    _set(out, down_name, new_down)
    return out


def expert_slice(dense: nn.Module, idx: Tensor, bias: bool) -> nn.Module:
    """The dense target restricted to hidden neurons ``idx``."""
    if isinstance(dense, nn.Linear):
        return SlicedLinear(dense, idx, bias)
    return _slice_mlp(dense, idx, bias)


def _reinit(module: nn.Module) -> None:
    """Fresh random weights (PyTorch's default Linear initialisation) for an expert."""
    if isinstance(module, SlicedLinear):
        nn.init.kaiming_uniform_(module.weight, a=5**0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()


def switch_balance_loss(probs: Tensor, topi: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2022, eq. 4), for top-k routing.

    probs: (T, E) router probabilities; topi: (T, k) selected experts. Returns
    E * sum_e f_e P_e with f_e the fraction of the T * k routing slots given to e and P_e the
    mean probability of e; 1 when routing is uniform."""
    n_exp = probs.shape[-1]
    counts = torch.zeros(n_exp, device=probs.device, dtype=probs.dtype)
    counts.index_add_(0, topi.reshape(-1), torch.ones_like(topi.reshape(-1), dtype=probs.dtype))
    f = counts / topi.numel()
    return n_exp * (f * probs.mean(0)).sum()


class MoELayer(nn.Module):
    """y = shared(x) + sum over the top-k experts of g_e(x) expert_e(x), tokens on the last
    dimension of x. While training with gradients it records the step's router statistics
    (``balance_terms``); they are transient, not state."""

    def __init__(
        self,
        shared: nn.Module | None,
        experts: list[nn.Module],
        router: nn.Linear,
        top_k: int,
        gate_scale: float,
    ):
        super().__init__()
        self.shared = shared
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.top_k = top_k
        self.gate_scale = gate_scale  # g_e = gate_scale * p_e for the selected experts
        self.balance_terms: list[Tensor] = []

    def route(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(probs (T, E), top-k indices (T, k), gates (T, k))."""
        probs = self.router(tokens).softmax(-1)
        top_p, topi = probs.topk(self.top_k, dim=-1)
        return probs, topi, self.gate_scale * top_p

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs, topi, gates = self.route(tokens)
        if self.training and torch.is_grad_enabled():
            self.balance_terms.append(switch_balance_loss(probs, topi))
        out = None
        if self.shared is not None:
            out = self.shared(tokens, *args, **kwargs)
        for e, expert in enumerate(self.experts):
            hit = topi == e  # (T, k)
            rows = hit.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            g = (gates * hit).sum(-1).index_select(0, rows).unsqueeze(-1)
            y = g * expert(tokens.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = torch.zeros(tokens.shape[0], y.shape[-1], device=y.device, dtype=y.dtype)
            out = out.index_add(0, rows, y)
        return out.reshape(*shape[:-1], out.shape[-1])

    def parameter_counts(self) -> tuple[int, int]:
        """(total, activated per token) parameters of the layer."""

        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        routed = [count(e) for e in self.experts]
        base = count(self.shared) + count(self.router)
        per_expert = sum(routed) / max(len(routed), 1)
        return base + sum(routed), int(round(base + self.top_k * per_expert))


def moe_layers(module: nn.Module) -> dict[str, MoELayer]:
    return {n: m for n, m in module.named_modules() if isinstance(m, MoELayer)}


def moe_report(module: nn.Module) -> dict[str, float]:
    """Total vs activated (per token) parameters of a Dense2MoE student."""
    layers = moe_layers(module)
    if not layers:
        raise ValueError("module has no MoE layers (was it built by Dense2MoE?)")
    total = sum(p.numel() for p in module.parameters())
    moe_total = sum(m.parameter_counts()[0] for m in layers.values())
    moe_active = sum(m.parameter_counts()[1] for m in layers.values())
    active = total - moe_total + moe_active
    return {
        "moe_layers": float(len(layers)),
        "total_params": float(total),
        "activated_params": float(active),
        "activated_fraction": active / total,
        "moe_total_params": float(moe_total),
        "moe_activated_params": float(moe_active),
    }


# ------------------------------------------------------------------------ importance


def taylor_importance(
    student: Denoiser, names: list[str], example: Batch, repeats: int = 1
) -> dict[str, Tensor]:
    """First-order Taylor importance per hidden neuron of each named target (Molchanov et
    al. 2017): mean over samples of |sum over tokens of a_j dL/da_j|, a_j the neuron's
    activation (the input of the target's hidden Linear), L the student's denoising loss on
    ``example.x`` (``repeats`` noisings). Returns name -> (hidden,) importances."""
    if example.x is None:
        raise ValueError("Taylor-metric expert initialisation needs real samples x in the batch")
    acts: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        lin = hidden_linear(student.get_submodule(n))
        handles.append(lin.register_forward_pre_hook(lambda m, a, n=n: acts[n].append(a[0])))
    scores = {n: torch.zeros(hidden_size(student.get_submodule(n))) for n in names}
    try:
        for _ in range(repeats):
            for n in names:
                acts[n].clear()
            with torch.enable_grad():
                loss = denoising_loss(student, example.x, example.cond, example)
                flat = [a for n in names for a in acts[n]]
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            i = 0
            for n in names:
                for a in acts[n]:
                    g = grads[i]
                    i += 1
                    if g is None:
                        continue
                    prod = (a * g).detach().reshape(a.shape[0], -1, a.shape[-1]).sum(1)
                    scores[n] += prod.abs().mean(0).cpu() / repeats
    finally:
        for h in handles:
            h.remove()
    return scores


def split_neurons(importance: Tensor, num_experts: int, shared: int) -> tuple[Tensor, list[Tensor]]:
    """(shared neurons, one index set per routed expert): the ``shared`` most important
    neurons, then the rest dealt round-robin by decreasing importance."""
    order = importance.argsort(descending=True)
    rest = order[shared:]
    return order[:shared].sort().values, [
        rest[e::num_experts].sort().values for e in range(num_experts)
    ]


# --------------------------------------------------------------------------- objective


@dataclass
class Dense2MoEConfig(CompressionConfig):
    targets: tuple[str, ...] = ()  # module names (fnmatch patterns) of the student to replace
    num_experts: int = 4  # E routed experts per layer
    top_k: int = 1  # experts activated per token
    shared_fraction: float = 0.25  # hidden neurons in the always-active shared expert
    init: Literal["taylor", "copy", "random"] = "taylor"  # expert initialisation
    calib_repeats: int = 4  # noisings of the example batch for the Taylor importance
    router_init_std: float = 1e-2  # std of the router's initial weights
    balance_weight: float = 1e-2  # Switch load-balancing loss weight
    feature_weight: float = 0.0  # weight of teacher feature matching (0 = off)


def make_moe(dense: nn.Module, cfg: Dense2MoEConfig, importance: Tensor | None, device) -> MoELayer:
    """The MoE replacing ``dense`` (``importance``: (hidden,) Taylor scores, or None)."""
    hidden = hidden_size(dense)
    lin = hidden_linear(dense)
    d_in = lin.in_features if isinstance(dense, nn.Linear) else _linears(dense)[0][1].in_features
    router = nn.Linear(d_in, cfg.num_experts).to(device=device, dtype=lin.weight.dtype)
    with torch.no_grad():
        router.weight.normal_(0.0, cfg.router_init_std)
        router.bias.zero_()
    if cfg.init == "copy":
        experts = [copy.deepcopy(dense) for _ in range(cfg.num_experts)]
        return MoELayer(None, experts, router, cfg.top_k, cfg.num_experts / cfg.top_k)
    n_shared = int(round(cfg.shared_fraction * hidden))
    if hidden - n_shared < cfg.num_experts:
        raise ValueError(
            f"{hidden} hidden neurons cannot give {cfg.num_experts} experts after "
            f"{n_shared} shared ones"
        )
    if importance is None:  # random init: any split, the weights are re-drawn below
        importance = torch.linspace(1.0, 0.0, hidden)
    shared_idx, expert_idx = split_neurons(importance, cfg.num_experts, n_shared)
    if n_shared:
        shared = expert_slice(dense, shared_idx.to(device), bias=True)
    else:  # no shared neurons: the output bias stays an always-on term
        bias = hidden_linear(dense).bias
        shared = None if bias is None else OutputBias(bias)
    experts = [expert_slice(dense, idx.to(device), bias=False) for idx in expert_idx]
    moe = MoELayer(shared, experts, router, cfg.top_k, float(cfg.num_experts))
    if cfg.init == "random":
        for m in [shared, *experts]:
            if m is not None:
                _reinit(m)
    return moe


class Dense2MoE(CompressionObjective):
    name = "dense2moe"
    config_cls = Dense2MoEConfig
    summary = "dense MLPs -> top-k MoE (Taylor expert init) distilled with load balancing"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if not cfg.targets:
            raise ValueError(
                "dense2moe needs targets: names (or fnmatch patterns) of the student's modules "
                "to replace, e.g. ('net.blocks.0',) for a ToyMLP or "
                "('unet.*.ff',) for transformer feed-forwards"
            )
        if cfg.num_experts < 1 or not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(
                f"need num_experts >= 1 and 1 <= top_k <= num_experts, got "
                f"{cfg.num_experts} and {cfg.top_k}"
            )
        if not 0.0 <= cfg.shared_fraction < 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1), got {cfg.shared_fraction}")
        if cfg.init not in ("taylor", "copy", "random"):
            raise ValueError(f"init must be 'taylor', 'copy' or 'random', got {cfg.init!r}")
        if cfg.balance_weight < 0 or cfg.feature_weight < 0:
            raise ValueError("balance_weight and feature_weight must be >= 0")

    def resolve_targets(self, student: nn.Module) -> list[str]:
        names = [n for n, _ in student.named_modules() if n]
        found = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.config.targets)]
        if not found:
            candidates = [
                n
                for n, m in student.named_modules()
                if n and isinstance(m, nn.Linear | nn.Sequential)
            ]
            raise ValueError(
                f"dense2moe targets {self.config.targets} match no module of the student; "
                f"Linear / Sequential modules are: {candidates}"
            )
        # a target inside another target is replaced with its parent
        return [n for n in found if not any(n.startswith(o + ".") for o in found)]

    def compress(self, student, example):
        cfg = self.config
        names = self.resolve_targets(student)
        importance = {}
        if cfg.init == "taylor":
            importance = taylor_importance(student, names, example, cfg.calib_repeats)
        device = next(student.parameters()).device
        for n in names:
            dense = student.get_submodule(n)
            hidden_size(dense)  # validates the target's form
            _set(student, n, make_moe(dense, cfg, importance.get(n), device))
        return student

    def begin_step(self, roles):
        for m in moe_layers(roles["student"]).values():
            m.balance_terms.clear()

    def aux_losses(self, roles, batch, update):
        cfg = self.config
        student = roles["student"]
        terms, logs = [], {}
        if cfg.feature_weight > 0:
            if batch.x is None:
                raise ValueError("dense2moe feature matching needs real samples x in the batch")
            t = sample_times(self.path, batch, cfg.t_range)
            x_t, _ = noised(self.path, batch.x, t, batch)
            with torch.no_grad():
                target = unguided(self.teacher).features(x_t, t, batch.cond)
            feat = F.mse_loss(unguided(student).features(x_t, t, batch.cond), target)
            logs["feature_loss"] = feat.item()
            terms.append(cfg.feature_weight * feat)
        layers = moe_layers(student).values()
        stats = [b for m in layers for b in m.balance_terms]  # from this step's forwards
        for m in layers:
            m.balance_terms.clear()
        if stats:
            bal = torch.stack(stats).mean()
            logs["balance_loss"] = bal.item()
            terms.append(cfg.balance_weight * bal)
        return ({"student": sum(terms[1:], terms[0])} if terms else {}), logs

    def report(self, roles: dict[str, nn.Module]) -> dict[str, float]:
        """``moe_report`` of the student."""
        return moe_report(roles["student"])
