"""Fair synthetic data by learning and distilling a fair representation (after Sikder,
Ramachandranpillai, de Leng, Heintz, "Generating Synthetic Fair Syntax-agnostic Data by
Learning and Distilling Fair Representation", 2024, arXiv 2408.10755).

Stage 1, the teacher: a fair representation. An autoencoder E (encoder), D (decoder,
conditioned on the protected attribute s, as in the variational fair autoencoder of Louizos et
al. 2016, so proxies can be rebuilt from s without z carrying s), a label head h(z) and an
adversary A(z) that predicts s. The encoder minimises

    L_E = L_rec(D(E(x), s), x) + alpha * CE(h(E(x)), y) + lambda * L_adv + gamma * dCov^2(E(x), s)

with L_rec = MSE on standardised numeric columns + cross-entropy per categorical column,
dCov^2 the empirical distance covariance of Szekely, Rizzo & Bakirov (2007) (the fairness
regulariser of the paper: zero iff, in the population, z and s are independent), and L_adv
the adversarial term (Edwards & Storkey, "Censoring representations with an adversary",
ICLR 2016) in one of two forms:

* ``alternating``: the adversary takes ``adversary_steps`` steps minimising CE(A(z), s) on
  detached z, then the encoder minimises the confusion loss CE(A(z), p_s) towards the marginal
  p_s of s (Alvi, Zisserman, Nellaker 2018), bounded and minimal when A learns nothing;
* ``reversal``: one joint step through a gradient-reversal layer (Ganin & Lempitsky, ICML
  2015): A minimises CE(A(GRL(z)), s) while the encoder receives -lambda times that gradient.

Stage 2, distillation into a small generator: G(noise, y) -> z, a much smaller network than
the teacher's encoder, trained on the teacher's fair latents with the paper's two losses,

    quality  = sum_c MMD_b^2( G(noise, c), E(x | y = c) )     (Gretton et al., JMLR 2012)
    utility  = CE( h(G(noise, y)), y ) = KL(onehot(y) || p_h(. | G(noise, y)))

(RBF kernel mixture). Synthetic rows: y from the training label marginal, z = G(noise, y),
s drawn from its marginal independently of (z, y) (the generative model a fair latent stands
for) or from the adversary's posterior A(z) (which reproduces whatever dependence z still
has; the unfair baseline uses it, so it keeps the data's bias), x = D(z, s) decoded
(categories sampled from their softmax). The unfair baseline is the same pipeline with
lambda = gamma = 0. How much s a *fresh* probe still reads from z is reported separately
(:func:`latent_leakage`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.dataset_distill.fair.data import Encoding, Table

# --------------------------------------------------------------------------- losses


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward (Ganin & Lempitsky
    2015, the gradient reversal layer R_lambda)."""
    return _GradReverse.apply(x, scale)


def _double_centered(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_covariance(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Empirical squared distance covariance V_n^2(z, s) (Szekely, Rizzo & Bakirov 2007):
    mean of A_ij * B_ij over the double-centred pairwise Euclidean distance matrices of z
    [n, d] and s [n, k] (or [n]). Non-negative; 0 when z is constant or independent of s in
    the sample's joint empirical sense; differentiable in z."""
    if s.dim() == 1:
        s = s.unsqueeze(1)
    if z.shape[0] != s.shape[0]:
        raise ValueError(f"z and s need the same rows, got {z.shape[0]} and {s.shape[0]}")
    dz = torch.sqrt(((z.unsqueeze(0) - z.unsqueeze(1)) ** 2).sum(-1) + 1e-12)
    ds = torch.cdist(s.float(), s.float())
    return (_double_centered(dz) * _double_centered(ds)).mean()


def mmd2(
    x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
) -> torch.Tensor:
    """Biased estimate MMD_b^2 between samples x [n, d] and y [m, d] with a sum of RBF kernels
    k(a, b) = exp(-|a-b|^2 / (2 h^2)) (Gretton et al., JMLR 2012): mean k(x,x') + mean
    k(y,y') - 2 mean k(x,y). Zero for identical samples."""
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).pow(2)
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """MSE on the standardised numeric part + cross-entropy per categorical column (target is
    ``enc.encode`` output: numeric, then one-hot blocks)."""
    num_o, cats_o = enc.split(out)
    num_t, cats_t = enc.split(target)
    loss = nn.functional.mse_loss(num_o, num_t) if num_o.shape[1] else out.new_zeros(())
    for lo, lt in zip(cats_o, cats_t):
        loss = loss + nn.functional.cross_entropy(lo, lt.argmax(1))
    return loss


# --------------------------------------------------------------------------- models


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))


class FairAutoencoder(nn.Module):
    """Teacher: encoder [D] -> [latent], decoder [latent + 1] -> [D], label head, adversary."""

    def __init__(self, in_dim: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.encoder = _mlp(in_dim, hidden, latent)
        self.decoder = _mlp(latent + 1, hidden, in_dim)
        self.label_head = nn.Linear(latent, 2)
        self.adversary = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def decode(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, s.float().unsqueeze(1)], 1))


class LatentGenerator(nn.Module):
    """Student: G(noise [n, k], y [n]) -> z [n, latent], one small hidden layer."""

    def __init__(self, noise: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(noise + 2, hidden), nn.ReLU(), nn.Linear(hidden, latent))

    def forward(self, eps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([eps, nn.functional.one_hot(y, 2).float()], 1))


def num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def latent_leakage(
    z_train: torch.Tensor, s_train: torch.Tensor, z_test: torch.Tensor, s_test: torch.Tensor
) -> dict:
    """How much s a fresh probe reads from z: held-out accuracy of a logistic regression
    predicting s from z, next to the majority-class rate (equal when z carries no linear
    information about s)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=1000).fit(z_train.numpy(), s_train.numpy())
    majority = max(float(s_test.float().mean()), 1 - float(s_test.float().mean()))
    return {
        "s_probe_accuracy": float(probe.score(z_test.numpy(), s_test.numpy())),
        "s_majority": majority,
    }


# --------------------------------------------------------------------------- training


@dataclass
class FairReprConfig:
    latent: int = 8  # size of the fair latent z
    hidden: int = 64  # teacher MLP width
    steps: int = 1500  # teacher training steps
    batch: int = 256  # rows per step
    lr: float = 2e-3  # Adam learning rate
    label_weight: float = 1.0  # alpha: label head loss (keeps z useful)
    adversary_weight: float = 5.0  # lambda: adversarial fairness term (0 = off)
    dcov_weight: float = 5.0  # gamma: distance-covariance fairness term (0 = off)
    adversary_mode: str = "alternating"  # alternating (confusion loss) or reversal (GRL)
    adversary_steps: int = 2  # adversary steps per encoder step (alternating)
    adversary_refit_steps: int = 0  # extra adversary steps on the final latents (s-sampler)


ADVERSARY_MODES = ("alternating", "reversal")


def train_fair_representation(
    x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, enc: Encoding, cfg: FairReprConfig, seed: int
) -> tuple[FairAutoencoder, dict]:
    """Train the teacher on encoded rows x [n, D], protected s [n], labels y [n]."""
    if cfg.adversary_mode not in ADVERSARY_MODES:
        raise ValueError(
            f"adversary_mode must be one of {ADVERSARY_MODES}, got {cfg.adversary_mode!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FairAutoencoder(x.shape[1], cfg.latent, cfg.hidden)
    main = [p for n, p in model.named_parameters() if not n.startswith("adversary")]
    opt = torch.optim.Adam(main, lr=cfg.lr)
    opt_adv = torch.optim.Adam(model.adversary.parameters(), lr=cfg.lr)
    p_s = torch.bincount(s, minlength=2).float() / s.numel()
    log: list[dict] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(x.shape[0], (min(cfg.batch, x.shape[0]),), generator=gen)
        xb, sb, yb = x[idx], s[idx], y[idx]
        if cfg.adversary_mode == "alternating":
            for _ in range(cfg.adversary_steps):
                with torch.no_grad():
                    zb = model.encoder(xb)
                adv = nn.functional.cross_entropy(model.adversary(zb), sb)
                opt_adv.zero_grad(set_to_none=True)
                adv.backward()
                opt_adv.step()
        z = model.encoder(xb)
        rec = reconstruction_loss(model.decode(z, sb), xb, enc)
        lab = nn.functional.cross_entropy(model.label_head(z), yb)
        loss = rec + cfg.label_weight * lab
        if cfg.adversary_mode == "alternating":
            logp = torch.log_softmax(model.adversary(z), 1)
            adv_term = -(logp * p_s).sum(1).mean()  # CE towards the marginal p_s
            loss = loss + cfg.adversary_weight * adv_term
        else:
            adv_term = nn.functional.cross_entropy(
                model.adversary(grad_reverse(z, cfg.adversary_weight)), sb
            )
            loss = loss + adv_term  # the adversary minimises it, the encoder (reversed) maximises
        dcov = distance_covariance(z, sb) if cfg.dcov_weight else z.new_zeros(())
        loss = loss + cfg.dcov_weight * dcov
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fair representation: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        opt_adv.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.adversary_mode == "reversal":
            opt_adv.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            vals = {"rec": rec, "label": lab, "adv": adv_term, "dcov": dcov}
            log.append({"step": step, **{k: float(v.detach()) for k, v in vals.items()}})
    # the adversary is the s-sampler p(s | z) at generation; optionally fit it further on the
    # final latents (a stronger posterior: it also re-exposes what a fair encoder hid from it)
    with torch.no_grad():
        z_all = model.encoder(x)
    for _ in range(cfg.adversary_refit_steps):
        idx = torch.randint(x.shape[0], (min(cfg.batch, x.shape[0]),), generator=gen)
        adv = nn.functional.cross_entropy(model.adversary(z_all[idx]), s[idx])
        opt_adv.zero_grad(set_to_none=True)
        adv.backward()
        opt_adv.step()
    return model, {"log": log, "seconds": time.perf_counter() - t0}


@dataclass
class GeneratorConfig:
    noise: int = 8  # noise dimension of the student generator
    hidden: int = 32  # its single hidden layer
    steps: int = 800  # distillation steps
    batch: int = 256  # generated and real latents per class per step
    lr: float = 2e-3  # Adam learning rate
    utility_weight: float = 0.5  # weight of the utility loss next to the quality (MMD) loss


def distill_generator(
    teacher: FairAutoencoder, x: torch.Tensor, y: torch.Tensor, cfg: GeneratorConfig, seed: int
) -> tuple[LatentGenerator, dict]:
    """Fit G so that G(noise, c) matches the teacher's latents of class c (quality) and the
    teacher's label head reads c from them (utility)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z_real = teacher.encoder(x)
    latent = z_real.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        g = LatentGenerator(cfg.noise, latent, cfg.hidden)
    opt = torch.optim.Adam(g.parameters(), lr=cfg.lr)
    by_class = [torch.nonzero(y == c).view(-1) for c in (0, 1)]
    scale = z_real.std(0).mean().clamp(min=1e-3)  # kernel bandwidths relative to latent spread
    for p in teacher.parameters():
        p.requires_grad_(False)
    log = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        quality = z_real.new_zeros(())
        utility = z_real.new_zeros(())
        for c, idx in enumerate(by_class):
            if idx.numel() == 0:
                continue
            pick = idx[torch.randint(idx.numel(), (cfg.batch,), generator=gen)]
            yc = torch.full((cfg.batch,), c, dtype=torch.long)
            zg = g(torch.randn(cfg.batch, cfg.noise, generator=gen), yc)
            quality = quality + mmd2(zg / scale, z_real[pick] / scale)
            utility = utility + nn.functional.cross_entropy(teacher.label_head(zg), yc)
        loss = quality + cfg.utility_weight * utility
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append(
                {
                    "step": step,
                    "quality": float(quality.detach()),
                    "utility": float(utility.detach()),
                }
            )
    for p in teacher.parameters():
        p.requires_grad_(True)
    return g, {"log": log, "seconds": time.perf_counter() - t0}


PROTECTED_SAMPLING = ("marginal", "posterior")


@torch.no_grad()
def generate_table(
    teacher: FairAutoencoder,
    g: LatentGenerator,
    enc: Encoding,
    schema: Table,
    n: int,
    p_label: float,
    seed: int,
    recipe: str,
    protected: str = "posterior",
    p_protected: float = 0.5,
) -> Table:
    """``n`` synthetic rows: y ~ Bernoulli(p_label), z = G(noise, y), s from ``protected``
    sampling, x = D(z, s). ``posterior``: s ~ A(z), the adversary's p(s | z) (reproduces
    whatever dependence z still has); ``marginal``: s ~ Bernoulli(p_protected) independent
    of z and y, the generative model a fair latent (z independent of s) stands for."""
    if protected not in PROTECTED_SAMPLING:
        raise ValueError(
            f"protected sampling must be one of {PROTECTED_SAMPLING}, got {protected!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=gen) < p_label).long()
    z = g(torch.randn(n, g.noise, generator=gen), y)
    if protected == "posterior":
        p_s = torch.softmax(teacher.adversary(z), 1)[:, 1]
    else:
        p_s = torch.full((n,), float(p_protected))
    s = (torch.rand(n, generator=gen) < p_s).long()
    numeric, categorical = enc.decode(teacher.decode(z, s), gen)
    return schema.like(numeric, categorical, s, y, recipe)
