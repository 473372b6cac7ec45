"""Progressive radiance distillation (PRD): physically based materials and light distilled from
a radiance field through a per-pixel distillation progress map (Ye, Hou & Zhou 2024,
"Progressive Radiance Distillation for Inverse Rendering with Gaussian Splatting",
arXiv:2408.07595). No public code was found; this is our reading of the paper on a volume
(NeRF-style) renderer instead of Gaussian splatting, which the paper says the idea is not
tied to.

The final image blends the physically based render with the radiance field's render by the
progress map P (paper sec. 3: ``I = P I_phy + (1 - P) I_raw``). P is a learned per-point
attribute volume-rendered into a per-pixel map, initialised small (``progress_init``, so the
radiance field is used first and the image-loss gradients stay sane), and pulled towards 1 by
a regulariser ``lambda_progress * mean(1 - P)`` (alpha-weighted over covered pixels) against
the image loss ``mean ||I - I_target||^2``. Where the physical model fits, P rises; where it
cannot (light paths it does not model), the image-loss gradient on P, which grows like
``2 P ||I_phy - I_raw||^2``, holds P near ``lambda / (2 ||I_phy - I_raw||^2)`` (up to the
losses' normalisations) and the radiance field stays in the render, so the unmodelled colour
does not leak into the materials.
Here the radiance field is the (frozen) teacher and the target its own render, so
``I - I_target = P (I_phy - I_raw)``.

Physical model (deferred shading as in the paper; their BRDF is Cook-Torrance): the G-buffer
(albedo, roughness, normal, progress) is volume-rendered with the teacher's weights (geometry
from the teacher: normals are minus the normalised density gradient), then shaded per pixel:

  L = ambient * albedo + sum_k E_k max(n.l_k, 0) (albedo / pi + D F G / (4 (n.l_k) (n.v)))

with GGX ``D = a^2 / (pi ((n.h)^2 (a^2 - 1) + 1)^2)``, ``a = roughness^2``, Smith-Schlick
``G = G1(n.l) G1(n.v)``, ``G1(x) = x / (x (1 - k) + k)``, ``k = (roughness + 1)^2 / 8`` (Karis
2013, direct lighting) and Schlick's Fresnel with F0 = 0.04 (dielectric). Light: K
directional lights (direction, RGB irradiance E_k) plus a constant RGB ambient term.

Relighting is measured on a procedural scene of known albedo and roughness
(``ToyPBRScene``): its radiance under the training light is the teacher, and the ground-truth
relit image is its own G-buffer shaded under a new light (the training light rotated about z;
rotating the student's learned light by the same angle sidesteps the albedo-vs-intensity scale
ambiguity).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.threed.cameras import Cameras, rays
from fewstep.threed.fields import DEFAULT_AABB, FieldConfig, RadianceField
from fewstep.threed.volume import (
    VolumeRenderConfig,
    background_color,
    ray_aabb,
    render_rays,
    sample_bins,
)

F0_DIELECTRIC = 0.04  # Schlick's reflectance at normal incidence for dielectrics
MIN_ROUGHNESS = 0.05  # roughness is kept above this (GGX degenerates at 0)

# ---------------------------------------------------------------------------------------------
# Light and shading
# ---------------------------------------------------------------------------------------------


class Lights(nn.Module):
    """K directional lights (unnormalised directions towards the light (K, 3), RGB irradiance
    (K, 3) >= 0) and an RGB ambient term (3,) >= 0; all trainable."""

    def __init__(self, directions: Tensor, irradiance: Tensor, ambient: Tensor) -> None:
        super().__init__()
        directions = torch.as_tensor(directions, dtype=torch.float32).reshape(-1, 3)
        irradiance = torch.as_tensor(irradiance, dtype=torch.float32).reshape(-1, 3)
        if directions.shape != irradiance.shape:
            raise ValueError(
                f"need one RGB irradiance per light direction, got {tuple(directions.shape)} "
                f"directions and {tuple(irradiance.shape)} irradiances"
            )
        self.raw_directions = nn.Parameter(directions.clone())
        self.raw_irradiance = nn.Parameter(irradiance.clone())
        self.raw_ambient = nn.Parameter(torch.as_tensor(ambient, dtype=torch.float32).reshape(3))

    @property
    def directions(self) -> Tensor:
        return F.normalize(self.raw_directions, dim=-1)

    @property
    def irradiance(self) -> Tensor:
        return self.raw_irradiance.clamp_min(0.0)

    @property
    def ambient(self) -> Tensor:
        return self.raw_ambient.clamp_min(0.0)

    def rotated(self, degrees: float) -> Lights:
        """A copy with every direction rotated by ``degrees`` about the z axis."""
        a = math.radians(degrees)
        rot = torch.tensor(
            [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]
        )
        with torch.no_grad():
            return Lights(
                self.directions @ rot.t().to(self.directions), self.irradiance, self.ambient
            )


def ggx_shade(
    albedo: Tensor,
    roughness: Tensor,
    normal: Tensor,
    view: Tensor,
    lights: Lights,
    f0: float = F0_DIELECTRIC,
) -> Tensor:
    """Outgoing radiance (N, 3) of the Lambert + GGX Cook-Torrance model above: albedo (N, 3),
    roughness (N,) in (0, 1], unit normal and unit direction towards the camera (N, 3)."""
    l = lights.directions.to(normal)  # (K, 3)  # noqa: E741 - the usual symbol
    E = lights.irradiance.to(normal)  # (K, 3)
    r = roughness.clamp_min(MIN_ROUGHNESS)[:, None]  # (N, 1)
    a2 = (r * r) ** 2
    k = (r + 1.0) ** 2 / 8.0
    h = F.normalize(l[None] + view[:, None], dim=-1)  # (N, K, 3)
    ndl = (normal @ l.t()).clamp_min(0.0)  # (N, K)
    ndv = (normal * view).sum(-1, keepdim=True).clamp_min(1e-4)  # (N, 1)
    ndh = (normal[:, None] * h).sum(-1).clamp_min(0.0)
    vdh = (view[:, None] * h).sum(-1).clamp_min(0.0)
    D = a2 / (math.pi * (ndh * ndh * (a2 - 1.0) + 1.0) ** 2)
    G = (ndl / (ndl * (1 - k) + k)) * (ndv / (ndv * (1 - k) + k))
    Fr = f0 + (1.0 - f0) * (1.0 - vdh) ** 5
    spec = D * Fr * G / (4.0 * ndl * ndv + 1e-6)  # (N, K)
    diffuse = albedo[:, None, :] / math.pi  # (N, 1, 3)
    direct = (ndl[..., None] * E[None] * (diffuse + spec[..., None])).sum(1)
    return lights.ambient.to(normal) * albedo + direct


@torch.no_grad()
def normals_from_density(density_fn: Callable[[Tensor], Tensor], points: Tensor) -> Tensor:
    """Unit normals (N, 3) = -grad(density) / |grad(density)| (autograd through the field)."""
    with torch.enable_grad():
        p = points.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(density_fn(p).sum(), p)
    return -F.normalize(g, dim=-1, eps=1e-12)


# ---------------------------------------------------------------------------------------------
# Materials: the PBR student and the procedural ground truth
# ---------------------------------------------------------------------------------------------


class PBRField(nn.Module):
    """The PBR student: a dense grid over the scene box of albedo (3), roughness (1) and
    distillation progress (1) logits, trilinearly interpolated then activated; plus the
    global ``Lights``. Geometry (density, normals) is the teacher's."""

    def __init__(
        self,
        resolution: int = 32,
        aabb: tuple[float, ...] = DEFAULT_AABB,
        progress_init: float = 0.01,
        lights: Lights | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < progress_init < 1.0:
            raise ValueError(f"progress_init must be in (0, 1), got {progress_init}")
        self.register_buffer("aabb", torch.tensor(aabb, dtype=torch.float32).reshape(2, 3))
        grid = torch.zeros(1, 5, resolution, resolution, resolution)
        grid[:, 4] = math.log(progress_init / (1 - progress_init))
        self.grid = nn.Parameter(grid)  # (1, C, Z, Y, X): grid_sample's layout
        self.lights = lights or Lights([[0.0, 0.0, 1.0]], [[math.pi, math.pi, math.pi]], [0.1] * 3)

    def attributes(self, points: Tensor) -> dict[str, Tensor]:
        """albedo (N, 3) in (0, 1), roughness (N,) in (MIN_ROUGHNESS, 1), progress (N,)."""
        x = 2 * (points - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) - 1
        v = F.grid_sample(self.grid, x[None, :, None, None, :], align_corners=True)
        v = v[0, :, :, 0, 0].t()  # (N, 5)
        return {
            "albedo": torch.sigmoid(v[:, :3]),
            "roughness": MIN_ROUGHNESS + (1 - MIN_ROUGHNESS) * torch.sigmoid(v[:, 3]),
            "progress": torch.sigmoid(v[:, 4]),
        }


@dataclass
class ToyObject:
    """One object of the toy scene: a sphere (size = radius) or a box (size = half-size)."""

    kind: Literal["sphere", "box"]
    center: tuple[float, float, float]
    size: float
    albedo: tuple[float, float, float]
    roughness: float
    emission: tuple[float, float, float] = (0.0, 0.0, 0.0)  # radiance the PBR model lacks


def default_toy_objects(emission: float = 0.0) -> list[ToyObject]:
    """A rough orange sphere and a shinier blue box; ``emission`` adds a green glow to the
    box (a light path the physical model does not have)."""
    return [
        ToyObject("sphere", (-0.2, -0.1, 0.0), 0.45, (0.75, 0.35, 0.15), 0.6),
        ToyObject("box", (0.4, 0.35, 0.0), 0.22, (0.15, 0.3, 0.7), 0.3, (0.0, emission, 0.0)),
    ]


class ToyPBRScene(RadianceField):
    """A procedural scene of known materials, a radiance field under ``lights``: density
    ``density * sigmoid(-sdf / softness)`` (smooth, so its gradient gives normals); colour at a
    point = ``ggx_shade`` of its object's material (the object of smallest SDF) with the normal
    from the density and the view direction, plus the object's emission; ``attributes``
    exposes the true albedo / roughness for ground-truth relighting."""

    def __init__(
        self,
        objects: list[ToyObject] | None = None,
        lights: Lights | None = None,
        density: float = 40.0,
        softness: float = 0.03,
        aabb: tuple[float, ...] = DEFAULT_AABB,
    ) -> None:
        super().__init__(FieldConfig(aabb=aabb))
        self.objects = objects or default_toy_objects()
        self.lights = lights or default_toy_lights()
        self.lights.requires_grad_(False)
        self.sigma_max, self.softness = density, softness
        self.register_buffer("albedos", torch.tensor([o.albedo for o in self.objects]))
        self.register_buffer("roughs", torch.tensor([o.roughness for o in self.objects]))
        self.register_buffer("emissions", torch.tensor([o.emission for o in self.objects]))

    def sdfs(self, points: Tensor) -> Tensor:
        """(N, n_objects) signed distances."""
        out = []
        for o in self.objects:
            p = points - torch.tensor(o.center).to(points)
            if o.kind == "sphere":
                out.append(p.norm(dim=-1) - o.size)
            else:
                q = p.abs() - o.size
                out.append(q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0))
        return torch.stack(out, -1)

    def density(self, points: Tensor) -> Tensor:
        return self.sigma_max * torch.sigmoid(-self.sdfs(points).amin(-1) / self.softness)

    def _object(self, points: Tensor) -> Tensor:
        return self.sdfs(points).argmin(-1)

    def attributes(self, points: Tensor) -> dict[str, Tensor]:
        i = self._object(points)
        return {"albedo": self.albedos[i], "roughness": self.roughs[i]}

    def forward(self, points: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor]:
        self._check(points, dirs)
        sigma = self.density(points)
        n = normals_from_density(self.density, points)
        i = self._object(points)
        rgb = ggx_shade(self.albedos[i], self.roughs[i], n, -dirs, self.lights)
        return sigma, rgb + self.emissions[i]


def default_toy_lights() -> Lights:
    """One warm-white key light from the upper front-left and a dim ambient term."""
    return Lights([[-0.4, -0.6, 0.7]], [[2.2, 2.0, 1.8]], [0.12, 0.12, 0.14])


# ---------------------------------------------------------------------------------------------
# Rendering with cached teacher geometry
# ---------------------------------------------------------------------------------------------


@dataclass
class PRDViews:
    """The teacher's render of a set of views and the geometry PRD shades, cached once (the
    teacher and its geometry are frozen). R rays, M kept samples (weight > ``min_weight``)."""

    radiance: Tensor  # (R, 3) the teacher's image I_raw, background included
    alpha: Tensor  # (R, 1) opacity
    kept: Tensor  # (R, 1) sum of the kept samples' weights (normalises the G-buffer)
    normal: Tensor  # (R, 3) composited unit normal (zero on empty rays)
    view: Tensor  # (R, 3) unit direction towards the camera
    ray: Tensor  # (M,) ray index of each kept sample
    weight: Tensor  # (M,) its volume-rendering weight
    points: Tensor  # (M, 3) its position
    background: Tensor  # (3,)
    shape: tuple[int, int, int]  # (C, H, W) to reshape (R, ...) into images

    def image(self, x: Tensor) -> Tensor:
        """(R, k) -> (C, H, W, k)."""
        return x.reshape(*self.shape, x.shape[-1])


@torch.no_grad()
def cache_views(
    teacher: RadianceField,
    cameras: Cameras,
    n_samples: int = 64,
    background: str | tuple = "white",
    min_weight: float = 1e-3,
    chunk: int = 4096,
) -> PRDViews:
    """Render ``cameras`` with the teacher (``render_rays``, midpoint bins: the same image as
    ``render_field``) and keep, per ray, the samples that carry weight with their positions
    and the teacher's density normals."""
    cfg = VolumeRenderConfig(n_samples=n_samples, background=background)
    o, d = rays(cameras)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    rad, alpha, kept, normal, ray_ids, ws, pts = [], [], [], [], [], [], []
    for s in range(0, o.shape[0], chunk):
        oc, dc = o[s : s + chunk], d[s : s + chunk]
        out = render_rays(teacher, oc, dc, cfg)
        t_near, t_far, _ = ray_aabb(oc, dc, teacher.aabb)
        t, _ = sample_bins(t_near, t_far, n_samples)
        keep = out["weights"] > min_weight  # (r, S)
        ri, si = torch.nonzero(keep, as_tuple=True)
        p = oc[ri] + t[ri, si, None] * dc[ri]
        w = out["weights"][ri, si]
        n = normals_from_density(teacher.density, p) if len(p) else p
        comp = torch.zeros(oc.shape[0], 3).index_add_(0, ri, w[:, None] * n)
        rad.append(out["rgb"])
        alpha.append(out["alpha"])
        kept.append(torch.zeros(oc.shape[0], 1).index_add_(0, ri, w[:, None]))
        normal.append(F.normalize(comp, dim=-1, eps=1e-12))
        ray_ids.append(ri + s)
        ws.append(w)
        pts.append(p)
    return PRDViews(
        radiance=torch.cat(rad),
        alpha=torch.cat(alpha),
        kept=torch.cat(kept),
        normal=torch.cat(normal),
        view=-d,
        ray=torch.cat(ray_ids),
        weight=torch.cat(ws),
        points=torch.cat(pts),
        background=background_color(background, o),
        shape=(len(cameras), cameras.height, cameras.width),
    )


def render_gbuffer(material, views: PRDViews) -> dict[str, Tensor]:
    """Volume-render the material's attributes with the cached weights: per ray albedo (R, 3),
    roughness (R,), and progress (R,) when the material has one, each a weighted average over
    the ray's kept samples (compositing with ``alpha`` happens after shading)."""
    attrs = material.attributes(views.points)
    R = views.radiance.shape[0]
    a = views.kept.clamp_min(1e-6)
    out = {}
    for k, v in attrs.items():
        v2 = v if v.ndim == 2 else v[:, None]
        acc = torch.zeros(R, v2.shape[1], dtype=v2.dtype).index_add(
            0, views.ray, views.weight[:, None].to(v2) * v2
        )
        acc = acc / a
        out[k] = acc if v.ndim == 2 else acc[:, 0]
    return out


def render_pbr(material, lights: Lights, views: PRDViews) -> tuple[Tensor, dict]:
    """Deferred physically based render (R, 3): ``alpha * shade(G-buffer) + (1 - alpha) bg``,
    and the G-buffer."""
    g = render_gbuffer(material, views)
    shaded = ggx_shade(g["albedo"], g["roughness"], views.normal, views.view, lights)
    return views.alpha * shaded + (1 - views.alpha) * views.background, g


def blend(pbr: Tensor, radiance: Tensor, progress: Tensor) -> Tensor:
    """PRD's hybrid image ``P I_phy + (1 - P) I_raw``: (R, 3), (R, 3), progress (R,)."""
    p = progress.clamp(0, 1)[:, None]
    return p * pbr + (1 - p) * radiance


def render_prd(field: PBRField, views: PRDViews, progress: float | None = None) -> dict:
    """The PRD render: image (R, 3) = blend of the PBR render and the teacher's radiance by
    the learned progress map (or a constant ``progress``), pbr (R, 3), progress (R,)."""
    pbr, g = render_pbr(field, field.lights, views)
    p = g["progress"] if progress is None else torch.full_like(g["progress"], float(progress))
    return {"image": blend(pbr, views.radiance, p), "pbr": pbr, "progress": p}


def prd_loss(
    out: dict, target: Tensor, alpha: Tensor, lambda_progress: float
) -> tuple[Tensor, dict]:
    """Image loss ``mean ||I - target||^2`` plus ``lambda_progress`` times the alpha-weighted
    mean of (1 - P) (the pull of the progress map towards the physical model)."""
    img = (out["image"] - target).pow(2).mean()
    a = alpha[:, 0]
    reg = (a * (1 - out["progress"])).sum() / a.sum().clamp_min(1e-6)
    return img + lambda_progress * reg, {
        "image": float(img.detach()),
        "progress_reg": float(reg.detach()),
    }


def mean_progress(progress: Tensor, alpha: Tensor) -> float:
    """Alpha-weighted mean of the progress map over covered pixels."""
    a = alpha[:, 0]
    return float((a * progress).sum() / a.sum().clamp_min(1e-6))


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR (dB) of images in [0, 1] (clamped)."""
    mse = (pred.detach().clamp(0, 1) - target.detach().clamp(0, 1)).pow(2).mean()
    return float(-10 * torch.log10(mse.clamp_min(1e-12)))


@torch.no_grad()
def relit_psnr(field: PBRField, gt: ToyPBRScene, views: PRDViews, degrees: float) -> float:
    """PSNR of the student's physical render under its light rotated by ``degrees`` against
    the ground-truth scene's materials shaded under its light rotated the same way."""
    ref, _ = render_pbr(gt, gt.lights.rotated(degrees), views)
    pred, _ = render_pbr(field, field.lights.rotated(degrees), views)
    return psnr(pred, ref)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

# How the progress map is treated: learned from progress_init (the paper), or frozen at 1
# from the start (plain PBR fitting, the ablation without radiance fallback).
PROGRESS_MODES = ("learned", "fixed")


@dataclass
class PRDConfig:
    steps: int = 300  # optimisation steps (full batch over the cached training rays)
    lr_material: float = 0.05  # Adam learning rate of the albedo / roughness / progress grid
    lr_light: float = 0.02  # Adam learning rate of the lights
    lambda_progress: float = 0.01  # weight of the pull of the progress map towards 1
    progress: str = "learned"  # "learned" (PRD) or "fixed" (frozen at 1: no radiance fallback)
    eval_every: int = 50  # steps between evaluations (relighting PSNR when given)
    relight_degrees: float = 120.0  # rotation of the light about z for the relighting metric


def distill_prd(
    field: PBRField,
    views: PRDViews,
    config: PRDConfig,
    gt: ToyPBRScene | None = None,
    eval_views: PRDViews | None = None,
) -> dict:
    """Fit the PBR student to the teacher's images (``views.radiance``) through the PRD blend.
    Returns a log: step, loss, image loss, mean progress, seconds, and (with ``gt`` and
    ``eval_views``) relit PSNR and the student's pure-PBR PSNR against the teacher."""
    if config.progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {config.progress!r}")
    fixed = config.progress == "fixed"
    opt = torch.optim.Adam(
        [
            {"params": [field.grid], "lr": config.lr_material},
            {"params": list(field.lights.parameters()), "lr": config.lr_light},
        ]
    )
    log: dict = {"step": [], "loss": [], "image": [], "progress": [], "seconds": [], "eval": []}
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        if gt is None or eval_views is None:
            return
        with torch.no_grad():
            pbr, _ = render_pbr(field, field.lights, eval_views)
            log["eval"].append(
                {
                    "step": step,
                    "relit_psnr": relit_psnr(field, gt, eval_views, config.relight_degrees),
                    "pbr_psnr_vs_teacher": psnr(pbr, eval_views.radiance),
                }
            )

    evaluate(0)
    for step in range(config.steps):
        out = render_prd(field, views, 1.0 if fixed else None)
        lam = 0.0 if fixed else config.lambda_progress
        loss, parts = prd_loss(out, views.radiance, views.alpha, lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log["step"].append(step)
        log["loss"].append(float(loss.detach()))
        log["image"].append(parts["image"])
        log["progress"].append(mean_progress(out["progress"].detach(), views.alpha))
        log["seconds"].append(time.perf_counter() - t0)
        if (step + 1) % max(config.eval_every, 1) == 0 or step + 1 == config.steps:
            evaluate(step + 1)
    return log
