"""Knowledge distillation with an MI-alpha objective on intermediate representations.

He, Shi, Mueller, Sheng, Li & Karypis, "Distiller: A Systematic Study of Model
Distillation Methods in Natural Language Processing" (SustaiNLP 2021). Distiller casts the
distillation of intermediate representations as maximising the mutual information between
the student's representation x and the teacher's y, and proposes MI-alpha: the variational
lower bound I_alpha of Poole et al. ("On Variational Bounds of Mutual Information", ICML
2019), which trades bias for variance by interpolating between InfoNCE and the
NWJ / TUBA bound. The full text of Distiller was not available here; this implements
Poole et al.'s I_alpha, which is the bound the Distiller abstract names:

    I_alpha = 1 + E_{p(x_1:K) p(y|x_1)}[ log e^{f(x_1, y)} / a(y; x_1:K) ]
                - E_{p(x_1:K) p(y)}[ e^{f(x_1, y)} / a(y; x_1:K) ],
    a(y; x_1:K) = alpha m(y; x_2:K) + (1 - alpha) q(y),   m = mean_k e^{f(x_k, y)},

with the leave-one-out multi-sample baseline m of Poole et al.'s estimator (alpha = 1:
InfoNCE-style; alpha = 0: TUBA with a learned baseline log q(y), NWJ for log q = 1). On a
batch, scores[i, j] = f(x_j, y_i) (rows: teacher samples, diagonal: positive pairs).

The critic f(x, y) = <g(x), h(y)> / tau on L2-normalised projections g (student head, so
the student may be narrower than the teacher) and h (teacher head), and the baseline
log q(y), form the trainable ``critic`` role; student and critic both maximise I_alpha.
The student's loss adds the prediction-level KD term (the student matches the teacher's
prediction at random (x_t, t), the regression form of Hinton et al.'s KD). Features come
from ``Denoiser.features`` on both networks. The student keeps the teacher's many-step
sampler (a compression objective), or any step-distillation ``signal`` replaces the KD term
(see ``compression.CompressionObjective``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.batch import Batch
from fewstep.core.models import Denoiser
from fewstep.core.objectives.common import first, noised, sample_shape, sample_times, unguided
from fewstep.core.objectives.compression import CompressionConfig, CompressionObjective

# --------------------------------------------------------------------------- the bound


def log_loo_mean_exp(scores: Tensor) -> Tensor:
    """(K, K) -> (K, K): entry (i, j) = log mean_{k != j} exp(scores[i, k]), computed from
    prefix and suffix log-sum-exps (stable even when one score dominates)."""
    k = scores.shape[1]
    if k < 2:
        raise ValueError("the leave-one-out mean needs at least 2 samples")
    ninf = scores.new_full((scores.shape[0], 1), -math.inf)
    prefix = torch.cat([ninf, torch.logcumsumexp(scores, 1)[:, :-1]], 1)
    suffix = torch.cat([torch.logcumsumexp(scores.flip(1), 1).flip(1)[:, 1:], ninf], 1)
    return torch.logaddexp(prefix, suffix) - math.log(k - 1)


def mi_alpha_bound(scores: Tensor, log_baseline: Tensor, alpha: float) -> Tensor:
    """Poole et al.'s interpolated bound I_alpha, as in their estimator.

    scores: (K, K), scores[i, j] = f(x_j, y_i), positives on the diagonal; log_baseline:
    (K,) log q(y_i); alpha in [0, 1]. Returns the scalar bound
        1 + mean_{i != j}[ f(x_i, y_i) - log a_ij ] - mean_{i != j}[ e^{f(x_j, y_i)} / a_ii ],
    a_ij = alpha * mean_{k != j} e^{f(x_k, y_i)} + (1 - alpha) q(y_i)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = scores.shape[0]
    if scores.shape != (k, k) or log_baseline.shape != (k,):
        raise ValueError(
            f"expected scores (K, K) and log_baseline (K,), got {tuple(scores.shape)} and "
            f"{tuple(log_baseline.shape)}"
        )
    parts = []
    if alpha > 0:
        parts.append(math.log(alpha) + log_loo_mean_exp(scores))
    if alpha < 1:
        parts.append(math.log(1.0 - alpha) + log_baseline[:, None].expand(k, k))
    log_a = parts[0] if len(parts) == 1 else torch.logaddexp(parts[0], parts[1])
    off = ~torch.eye(k, dtype=torch.bool, device=scores.device)
    joint = (scores.diagonal()[:, None] - log_a)[off].mean()
    marg = (scores - log_a.diagonal()[:, None])[off]
    marg = torch.exp(torch.logsumexp(marg, 0) - math.log(marg.numel()))
    return 1.0 + joint - marg


def pooled(feats: Tensor) -> Tensor:
    """(B, C, ...) features -> (B, C): mean over positions."""
    return feats.flatten(2).mean(-1) if feats.ndim > 2 else feats.flatten(1)


class MICritic(nn.Module):
    """f(x, y) = <g(x), h(y)> / tau on unit vectors, and the baseline log q(y)."""

    def __init__(self, student_dim: int, teacher_dim: int, dim: int, hidden: int, tau: float):
        super().__init__()

        def head(d: int) -> nn.Module:
            return nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, dim))

        self.g = head(student_dim)  # projection of the student's features
        self.h = head(teacher_dim)  # projection of the teacher's features
        self.log_q = nn.Linear(teacher_dim, 1)  # baseline log q(y)
        self.tau = tau

    def forward(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        """Student features xs (K, Ds), teacher features ys (K, Dt) -> (scores (K, K) with
        scores[i, j] = f(xs_j, ys_i), log q(ys) (K,))."""
        gx = F.normalize(self.g(xs), dim=-1)
        hy = F.normalize(self.h(ys), dim=-1)
        return hy @ gx.T / self.tau, self.log_q(ys).squeeze(-1)


# --------------------------------------------------------------------------- objective


def _head(cond, n: int):
    """The first n entries of a batched condition (tensor or dict of tensors), or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: _head(v, n) for k, v in cond.items()}
    return cond[:n]


@dataclass
class KDMIConfig(CompressionConfig):
    alpha: float = 0.5  # MI-alpha interpolation: 1 = InfoNCE-style, 0 = NWJ/TUBA baseline
    mi_weight: float = 0.1  # weight of -I_alpha in the student's loss
    critic_dim: int = 64  # projection dimension of the critic
    critic_hidden: int = 128  # hidden width of the projection heads
    temperature: float = 0.1  # tau of the cosine critic
    mi_batch: int = 256  # at most this many samples in the K x K score matrix


class KDMI(CompressionObjective):
    name = "kd_mi"
    config_cls = KDMIConfig
    extra_roles = ("critic",)
    summary = "prediction KD + MI-alpha bound between student and teacher features (Distiller)"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {cfg.alpha}")
        if cfg.mi_weight < 0:
            raise ValueError(f"mi_weight must be >= 0, got {cfg.mi_weight}")
        if cfg.temperature <= 0 or cfg.critic_dim < 1 or cfg.critic_hidden < 1:
            raise ValueError("temperature, critic_dim and critic_hidden must be positive")
        if cfg.mi_batch < 2:
            raise ValueError(f"mi_batch must be >= 2, got {cfg.mi_batch}")

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return True  # the MI term is taken at noised real samples

    def compress(self, student, example):
        return student  # the student is given (smaller, or a copy of the teacher)

    def _features(self, net: Denoiser, x_t: Tensor, t: Tensor, cond, who: str) -> Tensor:
        try:  # a CFG wrapper exposes no features: take them from the network under it
            return pooled(unguided(net).features(x_t, t, cond))
        except NotImplementedError as err:
            raise ValueError(f"kd_mi needs features from the {who}: {err}") from None

    def build_extra(self, student, example: Batch):
        x = torch.zeros(1, *sample_shape(example), device=example.rng.device)
        cond = first(example.cond)
        t = self.path.fraction_to_t(0.5).to(x.device).expand(1)
        with torch.no_grad():
            ds = self._features(student, x, t, cond, "student").shape[1]
            dt = self._features(self.teacher, x, t, cond, "teacher").shape[1]
        cfg = self.config
        critic = MICritic(ds, dt, cfg.critic_dim, cfg.critic_hidden, cfg.temperature)
        return {"critic": critic.to(x.device)}

    def aux_losses(self, roles, batch, update):
        cfg = self.config
        if batch.x is None:
            raise ValueError("kd_mi needs real samples x in the batch for its MI term")
        t = sample_times(self.path, batch, cfg.t_range)
        x_t, _ = noised(self.path, batch.x, t, batch)
        n = min(batch.size, cfg.mi_batch)  # the first n samples form the K x K scores
        x_t, t, cond = x_t[:n], t[:n], _head(batch.cond, n)
        with torch.no_grad():
            ys = self._features(self.teacher, x_t, t, cond, "teacher")
        xs = self._features(roles["student"], x_t, t, cond, "student")
        scores, log_q = roles["critic"](xs, ys)
        bound = mi_alpha_bound(scores, log_q, cfg.alpha)
        return (
            {"student": -cfg.mi_weight * bound, "critic": -bound},
            {"mi_bound": bound.item()},
        )

    def report(self, roles: dict[str, nn.Module]) -> dict[str, float]:
        """Student vs teacher parameter counts."""
        n_s = sum(p.numel() for p in roles["student"].parameters())
        n_t = sum(p.numel() for p in self.teacher.parameters())
        return {"student_params": float(n_s), "teacher_params": float(n_t), "ratio": n_s / n_t}
