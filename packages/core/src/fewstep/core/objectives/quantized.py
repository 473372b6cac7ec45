"""Quantized distillation and differentiable quantization.

Polino, Pascanu & Alistarh, "Model compression via distillation and quantization" (ICLR
2018).

The student's Linear / Conv weights are fake-quantised in every forward pass with the
paper's uniform quantisation function: per output channel c (one bucket per channel) the
weights are scaled to [0, 1] by
    sc(v) = (v - beta_c) / alpha_c,   alpha_c = max_c v - min_c v,   beta_c = min_c v,
mapped to the nearest of s = 2^k quantisation points p_1..p_s and scaled back,
    Q(v) = beta_c + alpha_c p_{i(v)}.
With the uniform points p_i = (i - 1) / (s - 1) this is rounding to s levels; each channel
holds at most 2^k distinct values.

*Quantized distillation* keeps full-precision weights w, evaluates the network at Q(w)
and applies the gradient taken at Q(w) to w (the straight-through estimator).
*Differentiable quantization* learns the points instead: with the assignment i(v) held
fixed, dL/dp_i = sum_{v: i(v) = i} alpha_c dL/dQ(v), which autograd gives exactly for
Q(v) = beta_c + alpha_c p_{i(v)}. The paper keeps the weights fixed there
(``train_weights=False``); ``True`` trains both. Points are shared by the channels of a
layer. Rounding is deterministic (the paper also describes stochastic rounding).

The distillation signal is selectable, because fewstep is about step distillation:
``signal="teacher"`` matches the teacher's prediction at random (x_t, t) (the regression
form of the paper's distillation loss, optionally plus the plain denoising loss as its
hard-label term); the quantised student then keeps the teacher's many-step sampler. Any
registered step-distillation objective (``"dmd2"``, ``"consistency"``, ...) instead trains
the quantised student to be few-step at the same time, with that objective's losses used
unchanged (``compression.CompressionObjective``, shared with ``dense2moe`` and ``kd_mi``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fewstep.core.objectives.compression import CompressionConfig, CompressionObjective

# --------------------------------------------------------------------------- quantiser

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def uniform_points(bits: int) -> Tensor:
    """(2^bits,) uniform points (i - 1) / (s - 1) in [0, 1]."""
    return torch.linspace(0.0, 1.0, 2**bits)


def channel_scaling(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel (beta, alpha) = (min, max - min) of w (C, ...), each (C, 1, ...),
    detached (the scaling is a constant of the quantiser)."""
    lo, hi = torch.aminmax(w.detach().flatten(1), dim=1)
    shape = (-1, *([1] * (w.ndim - 1)))
    return lo.reshape(shape), (hi - lo).clamp_min(1e-12).reshape(shape)


def nearest_point(v: Tensor, points: Tensor) -> Tensor:
    """Index of the nearest of ``points`` (s,) for every entry of v (any shape)."""
    order = points.detach().argsort()
    sorted_p = points.detach()[order]
    mids = 0.5 * (sorted_p[1:] + sorted_p[:-1])
    return order[torch.bucketize(v.detach().contiguous(), mids)]


def quantize(w: Tensor, points: Tensor | None, bits: int, straight_through: bool = True) -> Tensor:
    """Q(w) = beta_c + alpha_c p_{i(w)} per output channel (Polino et al.'s quantisation
    function; learned points as in their differentiable quantization).

    ``points=None`` means the uniform grid p_i = (i - 1) / (2^bits - 1) (rounding, no
    search). The value is exactly Q(w); gradients reach learned ``points`` (differentiable
    quantization) and, with ``straight_through``, reach w unchanged (quantized
    distillation's straight-through estimator)."""
    beta, alpha = channel_scaling(w)
    v = (w.detach() - beta) / alpha
    if points is None:
        levels = 2**bits - 1
        q = beta + alpha * (torch.round(v * levels) / levels)
    else:
        q = beta + alpha * points[nearest_point(v, points)]
    if straight_through:
        q = q + (w - w.detach())  # adds an exact zero: the forward value stays Q(w)
    return q


class FakeQuantize(nn.Module):
    """Weight parametrization: w -> Q(w) with 2^bits points per layer, shared by channels."""

    def __init__(self, bits: int, points: Tensor, learn_points: bool, straight_through: bool):
        super().__init__()
        self.bits = bits
        self.straight_through = straight_through
        if learn_points:
            self.points = nn.Parameter(points.clone())
        else:
            self.register_buffer("points", points.clone())

    def forward(self, w: Tensor) -> Tensor:
        points = self.points.to(w) if isinstance(self.points, nn.Parameter) else None
        return quantize(w, points, self.bits, self.straight_through)


def quantized_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer for every layer whose weight carries a ``FakeQuantize``."""
    found = {}
    for name, m in module.named_modules():
        if parametrize.is_parametrized(m, "weight") and any(
            isinstance(p, FakeQuantize) for p in m.parametrizations["weight"]
        ):
            found[name] = m
    return found


def _quantizer(layer: nn.Module) -> FakeQuantize:
    return next(p for p in layer.parametrizations["weight"] if isinstance(p, FakeQuantize))


@torch.no_grad()
def distinct_values_per_channel(module: nn.Module) -> int:
    """The largest number of distinct weight values in any output channel of any quantised
    layer (at most 2^bits when quantisation is real)."""
    most = 0
    for layer in quantized_layers(module).values():
        w = layer.weight.flatten(1)
        most = max(most, max(int(torch.unique(row).numel()) for row in w))
    return most


def quantization_report(module: nn.Module) -> dict[str, float]:
    """Bits, parameter counts and the effective model size of a quantised student.

    Quantised weights cost ``bits`` each plus, per output channel, two float32 scalars
    (alpha, beta) and, per layer, 2^bits float32 points when learned; every other parameter
    counts as float32. ``compression`` is the float32 size of the same network over the
    effective size."""
    layers = quantized_layers(module)
    if not layers:
        raise ValueError("module has no quantised layers (was it built by QuantizedDistillation?)")
    quantizers = [_quantizer(m) for m in layers.values()]
    originals = [m.parametrizations["weight"].original for m in layers.values()]
    point_ids = {id(q.points) for q in quantizers}
    weight_ids = {id(w) for w in originals}
    params = [p for p in module.parameters() if id(p) not in point_ids]
    rest = sum(p.numel() for p in params if id(p) not in weight_ids)
    qbits = sum(w.numel() * q.bits for w, q in zip(originals, quantizers, strict=True))
    overhead = sum(  # per-channel (alpha, beta); learned points (a uniform grid is implicit)
        32 * (2 * w.shape[0] + (q.points.numel() if isinstance(q.points, nn.Parameter) else 0))
        for w, q in zip(originals, quantizers, strict=True)
    )
    full = 32 * sum(p.numel() for p in params)
    effective = qbits + overhead + 32 * rest
    return {
        "bits": float(max(q.bits for q in quantizers)),
        "quantized_layers": float(len(layers)),
        "quantized_weights": float(sum(m.weight.numel() for m in layers.values())),
        "parameters": float(sum(p.numel() for p in params)),
        "full_precision_bytes": full / 8,
        "effective_bytes": effective / 8,
        "compression": full / effective,
        "max_values_per_channel": float(distinct_values_per_channel(module)),
    }


# --------------------------------------------------------------------------- objective


@dataclass
class QuantizedConfig(CompressionConfig):
    bits: int = 4  # k: 2^k quantisation points per layer
    points: Literal["uniform", "learned"] = "uniform"  # learned = differentiable quantization
    points_init: Literal["uniform", "quantile"] = "uniform"  # learned points' initial values
    train_weights: bool = True  # STE updates of full-precision weights (False: points only)
    exclude: tuple[str, ...] = ()  # module names (prefixes) left in full precision


class QuantizedDistillation(CompressionObjective):
    name = "quantized"
    config_cls = QuantizedConfig
    summary = "k-bit fake-quantised student (STE / learned points) trained by distillation"

    def __init__(self, teacher, config=None, reward=None):
        super().__init__(teacher, config, reward)
        cfg = self.config
        if not 1 <= cfg.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {cfg.bits}")
        if cfg.points not in ("uniform", "learned"):
            raise ValueError(f"points must be 'uniform' or 'learned', got {cfg.points!r}")
        if cfg.points_init not in ("uniform", "quantile"):
            raise ValueError(
                f"points_init must be 'uniform' or 'quantile', got {cfg.points_init!r}"
            )
        if not cfg.train_weights and cfg.points != "learned":
            raise ValueError("train_weights=False trains nothing unless points='learned'")

    def _init_points(self, w: Tensor) -> Tensor:
        cfg = self.config
        if cfg.points == "learned" and cfg.points_init == "quantile":
            beta, alpha = channel_scaling(w)
            v = ((w.detach() - beta) / alpha).flatten().float()
            v = v[:: v.numel() // (1 << 20) + 1]  # torch.quantile takes at most 2^24 values
            s = 2**cfg.bits
            return torch.quantile(v, (torch.arange(s, dtype=torch.float32) + 0.5) / s)
        return uniform_points(cfg.bits)

    def compress(self, student, example):
        cfg = self.config
        names = []
        for name, m in list(student.named_modules()):
            skip = any(name == e or name.startswith(e + ".") for e in cfg.exclude)
            if isinstance(m, QUANTIZABLE) and not skip and not parametrize.is_parametrized(m):
                q = FakeQuantize(
                    cfg.bits,
                    self._init_points(m.weight).to(m.weight),
                    learn_points=cfg.points == "learned",
                    straight_through=cfg.train_weights,
                )
                parametrize.register_parametrization(m, "weight", q)
                names.append(name)
        if not names:
            raise ValueError(
                "quantized: the student has no Linear/Conv layer to quantise "
                f"(exclude={cfg.exclude})"
            )
        if not cfg.train_weights:  # differentiable quantization alone: only points move
            for pname, p in student.named_parameters():
                p.requires_grad_(pname.endswith(".points"))
        return student

    def report(self, roles: dict[str, nn.Module]) -> dict[str, float]:
        """``quantization_report`` of the student."""
        return quantization_report(roles["student"])
