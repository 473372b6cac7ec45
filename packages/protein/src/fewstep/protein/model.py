"""A Proteina-style CA-backbone transformer and its core ``Denoiser``.

Proteina (Geffner et al., "Proteina: Scaling Flow-based Protein Structure Generative
Models", ICLR 2025; NVIDIA ``proteinfoundation/nn/protein_transformer.py``) generates the CA
trace of a backbone, in nanometres, by flow matching. Its network is a transformer over
residues: per-residue tokens from the noisy coordinates and a sequence-position embedding, a
pair representation from the pairwise distances of the noisy coordinates and the relative
sequence separation, attention biased by the pair representation, and every layer
conditioned on the time through adaptive layer norm (adaLN with output scaling). Here it is
small (e.g. 4 layers, 64 dims, 4 heads) so it trains in minutes on a CPU.

Equivariance is not built in (Proteina's is not either): coordinates enter the tokens as
they are, and the teacher is trained on randomly rotated fragments (``teacher.py``).

Time and parameterisation. Core's ``RectifiedFlow`` is used as is: x_t = (1 - t) x0 + t eps
with **t = 0 the data and t = 1 the noise** (Proteina's own time runs the other way,
t_P = 1 - t). The denoiser predicts the **velocity** u = eps - x0, because

- the flow-matching loss on u is exactly Proteina's loss: Proteina predicts the clean sample
  and weights its error by 1 / (1 - t_P)^2 = 1 / t^2 (``compute_fm_loss``), and
  |u_hat - u|^2 = |x0_hat - x0|^2 / t^2 on this path;
- x0 = x_t - t u is well conditioned everywhere (no division by a vanishing coefficient), so
  SiD's x0-predictions follow by core's exact conversion.

Centre of mass. Backbones are centred: the wrapper removes the input's centre of mass and
returns a velocity whose centred part comes from the network and whose mean is
mean(x_t) / t, the exact conditional mean of eps - x0 for centred x0 (mean(x_t) = t mean(eps)
then). So every x0-prediction is exactly centred whatever noise the caller drew, and a loss
on un-centred noise has the same gradient as Proteina's loss on centred noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.models import Denoiser, _batch_t
from fewstep.core.paths import RectifiedFlow

NM_PER_ANGSTROM = 0.1  # Proteina works in nanometres


# ------------------------------------------------------------------------------- geometry


def centre(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Remove the centre of mass over residues.

    x: (B, L, 3); mask: (B, L) bool or None. Masked residues are set to 0 and ignored in
    the mean (Proteina's ``_force_zero_com``)."""
    if mask is None:
        return x - x.mean(dim=-2, keepdim=True)
    m = mask.to(x.dtype).unsqueeze(-1)
    com = (x * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1.0)
    return (x - com) * m


def centre_of_mass(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, 1, 3) mean over (unmasked) residues of x: (B, L, 3)."""
    if mask is None:
        return x.mean(dim=-2, keepdim=True)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1.0)


# --------------------------------------------------------------------------------- path


@dataclass
class ProteinaFlow(RectifiedFlow):
    """Core's rectified flow (t = 0 data, t = 1 noise) with Proteina's training-time density:
    with probability ``p_uniform`` t is uniform, otherwise t_P = 1 - t ~ Beta(beta_a, 1)
    (Proteina ``training_ca.yaml``: mix_unif_beta, p1 = 1.9, p2 = 1.0, 2 % uniform), which
    puts most draws near the data. Beta(a, 1) has the closed-form inverse CDF u^(1/a), so one
    uniform per sample suffices (the draw stays on the trainer's step generator)."""

    p_uniform: float = 0.02  # share of uniform times
    beta_a: float = 1.9  # Beta(a, 1) shape for t_P = 1 - t
    t_floor: float = 1e-3  # smallest training time (Proteina's 1e-5 in 1 / (t^2 + 1e-5))
    t_ceil: float = 1.0  # largest training time (SiD's fake score: 0.98, see recipes.sid)

    def sample_t(self, n, u):
        u = torch.as_tensor(u, dtype=torch.float32)
        uniform = u / self.p_uniform  # the first p_uniform of [0, 1) mapped onto [0, 1)
        v = ((u - self.p_uniform) / (1.0 - self.p_uniform)).clamp(0.0, 1.0)
        beta = 1.0 - v.pow(1.0 / self.beta_a)  # t = 1 - t_P, t_P = v^(1/a) ~ Beta(a, 1)
        t = torch.where(u < self.p_uniform, uniform, beta)
        return t.clamp(self.t_floor, self.t_ceil)


# ------------------------------------------------------------------------------- network


@dataclass
class BackboneTransformerConfig:
    dim: int = 64  # token width
    pair_dim: int = 16  # pair-representation width
    heads: int = 4  # attention heads (pair bias has one channel per head)
    layers: int = 4  # transformer layers
    cond_dim: int = 64  # width of the time conditioning
    rbf_bins: int = 16  # radial basis functions on pairwise CA distances of x_t
    rbf_max_nm: float = 2.0  # largest RBF centre in nm (Proteina bins x_t distances to ~2 nm)
    max_rel_sep: int = 32  # relative sequence separation is clipped to +- this
    pair_update: bool = False  # outer-sum + transition pair update per layer (slower on CPU)
    transition_factor: int = 2  # hidden width multiplier of the token transitions
    pair_values: bool = False  # attention also averages the pair rep into tokens (AF2 IPA)
    coord_head: bool = False  # add an EGNN-style equivariant velocity term along x_i - x_j


def sinusoidal(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(..., dim) sinusoidal embedding of x (...,) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    ang = x.float().unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class AdaLN(nn.Module):
    """Adaptive layer norm: LayerNorm without affine, then scale and shift from the
    condition (AF3 / Proteina ``AdaptiveLayerNorm``)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_ss = nn.Linear(cond_dim, 2 * dim)
        nn.init.zeros_(self.to_ss.weight)
        nn.init.zeros_(self.to_ss.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.to_ss(c).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class OutputScale(nn.Module):
    """Sigmoid gate on a branch's output from the condition, starting near zero (Proteina's
    ``AdaptiveLayerNormOutputScale`` with adaLN-Zero-style initialisation)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.lin = nn.Linear(cond_dim, dim)
        nn.init.zeros_(self.lin.weight)
        nn.init.constant_(self.lin.bias, -2.0)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return x * torch.sigmoid(self.lin(c)).unsqueeze(1)


class PairBiasAttention(nn.Module):
    """Multi-head self-attention whose logits get a per-head bias from the pair rep."""

    def __init__(self, dim: int, heads: int, pair_dim: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        # pair_dim > 0: each head also returns sum_j a_ij z_ij, the attention-weighted pair
        # rep (AF2's IPA output term, Jumper et al. 2021, Alg. 22 l. 10), so the tokens get the
        # exact neighbour distances the pair rep holds, not only attention logits from them
        self.pair_out = nn.Linear(heads * pair_dim, dim) if pair_dim else None

    def forward(
        self, x: Tensor, bias: Tensor, mask: Tensor | None, pair: Tensor | None = None
    ) -> Tensor:
        """x: (B, L, dim); bias: (B, H, L, L) added to the logits; mask: (B, L) or None;
        pair: (B, L, L, pair_dim), used when built with pair_dim > 0."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if mask is not None:
            bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
        if self.pair_out is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.out(y.transpose(1, 2).reshape(b, n, d))
        if pair is None:
            raise ValueError("this attention averages the pair rep: pass pair")
        a = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias).softmax(-1)
        y = self.out((a @ v).transpose(1, 2).reshape(b, n, d))
        return y + self.pair_out(torch.einsum("bhij,bijp->bihp", a, pair).flatten(2))


class Layer(nn.Module):
    """adaLN pair-biased attention, then adaLN transition, each gated and residual; then an
    optional pair update (outer sum of token projections + pair transition)."""

    def __init__(self, cfg: BackboneTransformerConfig):
        super().__init__()
        d, c, p = cfg.dim, cfg.cond_dim, cfg.pair_dim
        self.ln_attn, self.attn, self.gate_attn = (
            AdaLN(d, c),
            PairBiasAttention(d, cfg.heads, p if cfg.pair_values else 0),
            OutputScale(d, c),
        )
        self.heads = cfg.heads
        h = cfg.transition_factor * d
        self.ln_tr = AdaLN(d, c)
        self.tr = nn.Sequential(nn.Linear(d, 2 * h), nn.GLU(), nn.Linear(h, d))
        self.gate_tr = OutputScale(d, c)
        self.pair_update = cfg.pair_update
        if cfg.pair_update:
            self.to_bias = nn.Sequential(nn.LayerNorm(p), nn.Linear(p, cfg.heads, bias=False))
            self.to_pair = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * p, bias=False))
            self.pair_tr = nn.Sequential(
                nn.LayerNorm(p), nn.Linear(p, 2 * p), nn.ReLU(), nn.Linear(2 * p, p)
            )

    def forward(self, x, pair, bias, c, mask):
        """bias: this layer's (B, H, L, L) logit bias, or None to derive it from ``pair``."""
        if bias is None:
            bias = self.to_bias(pair).permute(0, 3, 1, 2)
        x = x + self.gate_attn(self.attn(self.ln_attn(x, c), bias, mask, pair), c)
        x = x + self.gate_tr(self.tr(self.ln_tr(x, c)), c)
        if self.pair_update:
            a, b = self.to_pair(x).chunk(2, dim=-1)
            pair = pair + a[:, :, None] + b[:, None, :]
            pair = pair + self.pair_tr(pair)
        return x, pair


class CoordHead(nn.Module):
    """An equivariant velocity term v_i = sum_j (x_i - x_j) / (|x_i - x_j| + 0.01) phi_ij, the
    coordinate update of EGNN (Satorras et al. 2021, eq. 4) with unit vectors, phi_ij from the
    final pair rep (distances of x_t, sequence separation) and both residues' tokens.
    Why: a small transformer that sees coordinates only through token projections places
    sequence neighbours poorly; this term moves residues along their pair directions by
    amounts read from exact pair distances, so bond lengths are easy to restore. phi starts at
    zero (the term is off at initialisation)."""

    def __init__(self, cfg: BackboneTransformerConfig):
        super().__init__()
        p = cfg.pair_dim
        self.tokens = nn.Linear(cfg.dim, 2 * p)
        self.phi = nn.Sequential(nn.LayerNorm(p), nn.Linear(p, p), nn.SiLU(), nn.Linear(p, 1))
        nn.init.zeros_(self.phi[-1].weight)
        nn.init.zeros_(self.phi[-1].bias)

    def forward(self, x: Tensor, h: Tensor, pair: Tensor, mask: Tensor | None) -> Tensor:
        a, b = self.tokens(h).chunk(2, dim=-1)
        phi = self.phi(pair + a[:, :, None] + b[:, None, :]).squeeze(-1)  # (B, L, L)
        if mask is not None:
            phi = phi * mask[:, None, :].to(phi)
        diff = x[:, :, None] - x[:, None, :]  # (B, L, L, 3), zero on the diagonal
        unit = diff / (diff.norm(dim=-1, keepdim=True) + 0.01)
        return (phi.unsqueeze(-1) * unit).sum(2)


class BackboneTransformer(nn.Module):
    """``net(x, time, mask) -> (B, L, 3)``: x the (centred) noisy CA trace in nm (B, L, 3),
    time the network time (B,), mask (B, L) bool or None (True = residue present)."""

    def __init__(self, cfg: BackboneTransformerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or BackboneTransformerConfig()
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.cond_dim, cfg.cond_dim), nn.SiLU(), nn.Linear(cfg.cond_dim, cfg.cond_dim)
        )
        self.token_in = nn.Linear(3 + cfg.dim, cfg.dim)
        n_sep = 2 * cfg.max_rel_sep + 1
        self.sep_emb = nn.Embedding(n_sep, cfg.pair_dim)
        self.pair_in = nn.Sequential(
            nn.Linear(cfg.rbf_bins, cfg.pair_dim), nn.LayerNorm(cfg.pair_dim)
        )
        self.register_buffer(
            "rbf_centres", torch.linspace(0.0, cfg.rbf_max_nm, cfg.rbf_bins), persistent=False
        )
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        if not cfg.pair_update:  # a fixed pair rep: every layer's bias in one projection
            self.to_biases = nn.Linear(cfg.pair_dim, cfg.layers * cfg.heads, bias=False)
        self.out_norm = AdaLN(cfg.dim, cfg.cond_dim)
        self.out = nn.Linear(cfg.dim, 3)
        self.coord_head = CoordHead(cfg) if cfg.coord_head else None

    def pair_features(self, x: Tensor) -> Tensor:
        """(B, L, L, pair_dim): RBF of pairwise distances of x plus relative separation."""
        cfg = self.cfg
        dist = torch.cdist(x, x)  # (B, L, L) nm
        width = cfg.rbf_max_nm / max(cfg.rbf_bins - 1, 1)
        rbf = torch.exp(-(((dist.unsqueeze(-1) - self.rbf_centres) / width) ** 2))
        idx = torch.arange(x.shape[1], device=x.device)
        sep = (idx[None, :] - idx[:, None]).clamp(-cfg.max_rel_sep, cfg.max_rel_sep)
        return self.pair_in(rbf) + self.sep_emb(sep + cfg.max_rel_sep)

    def trunk(
        self, x: Tensor, time: Tensor, mask: Tensor | None = None, upto: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B, L, dim), pair rep, time condition) after the first ``upto`` layers
        (None = all of them)."""
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"expected CA coordinates of shape (B, L, 3), got {tuple(x.shape)}")
        b, n, _ = x.shape
        c = self.time_mlp(sinusoidal(time.expand(b), self.cfg.cond_dim))
        pos = sinusoidal(torch.arange(n, device=x.device), self.cfg.dim).expand(b, n, -1)
        h = self.token_in(torch.cat([x, pos.to(x)], dim=-1))
        pair = self.pair_features(x)
        biases: list[Tensor | None] = [None] * len(self.layers)
        if not self.cfg.pair_update:
            biases = list(self.to_biases(pair).permute(0, 3, 1, 2).chunk(len(self.layers), 1))
        upto = len(self.layers) if upto is None else upto
        for layer, bias in list(zip(self.layers, biases, strict=True))[:upto]:
            h, pair = layer(h, pair, bias, c, mask)
        return h, pair, c

    def forward(self, x: Tensor, time: Tensor, mask: Tensor | None = None) -> Tensor:
        h, pair, c = self.trunk(x, time, mask)
        h = self.out_norm(h, c)
        out = self.out(h)
        if self.coord_head is not None:
            out = out + self.coord_head(x, h, pair, mask)
        return out if mask is None else out * mask.unsqueeze(-1).to(out)


# ------------------------------------------------------------------------------ denoiser


class BackboneDenoiser(Denoiser):
    """The transformer as a core ``Denoiser`` predicting the rectified-flow velocity.

    ``cond`` is an optional (B, L) bool residue mask (padding); None = every residue. The
    centre-of-mass handling is described in the module docstring."""

    def __init__(self, net: BackboneTransformer, path: RectifiedFlow | None = None):
        super().__init__(path if path is not None else ProteinaFlow(), "velocity")
        self.net = net

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x_t.ndim != 3 or x_t.shape[-1] != 3:
            raise ValueError(f"expected x_t of shape (B, L, 3), got {tuple(x_t.shape)}")
        mask = cond
        if mask is not None and mask.shape != x_t.shape[:2]:
            raise ValueError(
                f"mask must have shape (B, L) = {tuple(x_t.shape[:2])}, got {tuple(mask.shape)}"
            )
        t = _batch_t(t, x_t)
        com = centre_of_mass(x_t, mask)
        v = centre(self.net(x_t - com, self.path.network_time(t), mask), mask)
        # exact velocity of the centre of mass for centred data: mean(eps) = mean(x_t) / t
        v = v + com / t.clamp_min(1e-6).view(-1, 1, 1)
        return v if mask is None else v * mask.unsqueeze(-1).to(v)

    def features(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """(B, dim, L) residue tokens after the first half of the layers (at least one), on
        the centred input: the "encoder" a discriminator shares with the score (SiDA, Zhou et
        al. ICLR 2025, uses the fake score's UNet encoder output; a transformer has no
        encoder, so its first half stands in). Channels first, as core's heads expect."""
        mask = cond
        t = _batch_t(t, x_t)
        upto = max(1, len(self.net.layers) // 2)
        x = x_t - centre_of_mass(x_t, mask)
        h, _, _ = self.net.trunk(x, self.path.network_time(t), mask, upto)
        h = h if mask is None else h * mask.unsqueeze(-1).to(h)
        return h.transpose(1, 2)


def build_denoiser(cfg: BackboneTransformerConfig, seed: int = 0) -> BackboneDenoiser:
    """A freshly initialised denoiser (same seed, same weights)."""
    torch.manual_seed(seed)
    return BackboneDenoiser(BackboneTransformer(cfg))
