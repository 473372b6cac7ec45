"""Momentum-GS: block-wise Gaussian training with a momentum teacher decoder.

Fan et al., "Momentum-GS: Momentum Gaussian Self-Distillation for High-Quality Large Scene
Reconstruction" (2024; code: jixuan-fan/Momentum-GS). A large scene is split into blocks;
each block holds Scaffold-GS anchors (Lu et al. 2024: a position, a feature, k learnable
offsets and a scale per anchor) whose Gaussians come from ONE decoder shared by all blocks
(MLPs: anchor feature + view direction -> opacity, colour, scale/rotation of k Gaussians).

- Blocks outnumber GPUs: each GPU trains one of its blocks at a time, switching every
  ``block_interval`` iterations; the shared decoder's gradients are averaged over GPUs (their
  all-reduce) so all blocks train one decoder (paper Sec. 3.2).
- Momentum self-distillation (Sec. 3.3): a teacher decoder, never trained by gradient, follows
  the shared decoder by ``theta_t <- m theta_t + (1 - m) theta_s`` (m = 0.9) every iteration;
  a consistency loss ties the student decoder's Gaussian attributes to the teacher's on the
  same anchors (their ``render_with_consistency_loss``: MSE of colour, rotation, scale and
  opacity, weight 50).
- Reconstruction-guided block weighting (Sec. 3.4): each block's PSNR and SSIM are smoothed
  (EMA 0.9) and a block's loss is multiplied by
  ``w_k = 2 - exp(-((P_max - P_k)^2 + (10 S_max - 10 S_k)^2) / (2 sigma^2))`` (sigma = 10), so
  the worst-reconstructed blocks weigh up to 2x and the best 1x (weight 1 during warm-up).

Workers: a worker is a slot that trains one block at a time (one GPU or process in a
distributed run). Block ``b`` belongs to worker ``b mod W``; at turn ``r`` worker ``w`` trains
its ``(r mod n_w)``-th block. Here the W slots run one after another inside one process and the
decoder gradient is divided by the number of active slots, which is what an all-reduce mean
of per-GPU gradients computes; a ``torch.distributed`` launch would give each rank one slot.

The toy large scene (``toy_block_scene``) is a ground slab with a coloured object per
block, seen by cameras that look down at each block (aerial captures, as the paper's
Mill-19 / UrbanScene3D scenes); anchors start from the scene's occupied voxels, standing in
for the SfM point cloud Scaffold-GS voxelises. Anchor growing/pruning is not implemented.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.threed.cameras import Cameras, look_at
from fewstep.threed.fields import VoxelField
from fewstep.threed.gaussians import Gaussians, rasterize_gaussians, rgb_to_sh0

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class MomentumGSConfig:
    """Momentum-GS training (paper defaults in comments; sizes cut for CPU)."""

    blocks: tuple[int, int] = (2, 2)  # block grid along x and y (paper: 2 x 4 = 8 blocks)
    workers: int = 2  # W slots (GPUs); below the number of blocks (or 1 with 1 block)
    overlap: float = 0.15  # margin (world units) each block's anchor box extends past its cell
    anchor_voxel: float = 0.2  # voxel size that thins the initial points into anchors
    feat_dim: int = 16  # anchor feature size (Scaffold-GS / paper: 32)
    n_offsets: int = 4  # Gaussians per anchor (paper: 10)
    hidden: int = 32  # decoder MLP width (paper: 64-wide MoE experts)
    steps: int = 300  # training iterations (paper: 60k)
    block_interval: int = 25  # iterations before a worker switches block (paper: 500)
    momentum: float = 0.9  # m of the teacher-decoder EMA (paper: 0.9)
    consistency_weight: float = 50.0  # weight of the momentum consistency loss (paper: 50)
    lambda_dssim: float = 0.2  # D-SSIM share of the photometric loss (3DGS / paper)
    scaling_reg: float = 0.01  # weight of mean Gaussian volume (paper: 0.01)
    weight_sigma: float = 10.0  # sigma of the block weighting (paper's adaptive_sigma)
    weight_warmup: int = 50  # iterations with every block weight 1 (paper: 1000)
    block_weighting: bool = True  # reconstruction-guided block weights (False: all 1, ablation)
    eval_every: int = 25  # iterations between block PSNR/SSIM evaluations for the weights
    lr_feature: float = 0.0075  # anchor features (paper)
    lr_offset: float = 0.01  # anchor offsets (paper offset_lr_init)
    lr_scaling: float = 0.007  # anchor scales (paper)
    lr_decoder: float = 0.004  # shared decoder MLPs (paper: 0.002-0.008)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # render background
    seed: int = 0  # view sampling and initialisation


# ---------------------------------------------------------------------------------------------
# The toy large scene, blocks and cameras
# ---------------------------------------------------------------------------------------------

TOY_AABB = (-2.0, -2.0, -0.5, 2.0, 2.0, 0.5)


def toy_block_scene(resolution: int = 40) -> VoxelField:
    """A procedural "city block" scene in the box ``TOY_AABB``: a ground slab (z < -0.35)
    tinted per quadrant with a checker pattern, and in each quadrant one object: a red box,
    a blue tower, a yellow sphere, a green wedge; stored in a ``VoxelField``."""
    lo, hi = torch.tensor(TOY_AABB[:3]), torch.tensor(TOY_AABB[3:])
    u = torch.linspace(0, 1, resolution)
    ax = [lo[i] + (hi[i] - lo[i]) * u for i in range(3)]
    p = torch.stack(torch.meshgrid(*ax, indexing="ij"), -1)  # [x, y, z]
    x, y, z = p.unbind(-1)
    ground = z < -0.35
    checker = ((torch.floor(x * 2) + torch.floor(y * 2)) % 2 == 0).float()[..., None]
    quad = torch.stack([x > 0, y > 0], -1).float()
    tint = torch.stack([0.45 + 0.2 * quad[..., 0], 0.5 + 0.15 * quad[..., 1], 0.45 + 0 * x], -1)
    rgb = (tint * (0.8 + 0.2 * checker)).clamp(0.05, 0.95)
    sigma = torch.where(ground, 40.0, 0.0)
    objects = [
        ((p - torch.tensor([1.0, 1.0, -0.15])).abs() < torch.tensor([0.4, 0.3, 0.2])).all(-1),
        ((p - torch.tensor([-1.0, 1.0, 0.0])).abs() < torch.tensor([0.2, 0.2, 0.35])).all(-1),
        (p - torch.tensor([-1.0, -1.0, -0.1])).norm(dim=-1) < 0.35,
        ((p - torch.tensor([1.0, -1.0, -0.35])).abs() < 0.35).all(-1)
        & (z < -0.35 + 0.6 - 0.5 * (x - 0.65)),
    ]
    colors = [(0.9, 0.2, 0.1), (0.15, 0.3, 0.9), (0.95, 0.85, 0.15), (0.2, 0.75, 0.25)]
    for mask, c in zip(objects, colors):
        sigma = torch.where(mask, 40.0, sigma)
        rgb[mask] = torch.tensor(c)
    from fewstep.threed.fields import VoxelFieldConfig

    return VoxelField.from_grids(sigma, rgb, VoxelFieldConfig(aabb=TOY_AABB))


@dataclass
class Block:
    """One cell of the block grid."""

    index: int  # block id
    lo: Tensor  # (3,) cell minimum (its own region: merged Gaussians are cropped to it)
    hi: Tensor  # (3,) cell maximum
    margin: float  # anchor box = cell expanded by this on x and y

    def contains(self, points: Tensor, margin: float = 0.0) -> Tensor:
        """(N,) bool: points inside the cell expanded by ``margin`` on x and y."""
        m = torch.tensor([margin, margin, 0.0], dtype=points.dtype)
        return ((points >= self.lo.to(points) - m) & (points <= self.hi.to(points) + m)).all(-1)

    @property
    def center(self) -> Tensor:
        return (self.lo + self.hi) / 2


def partition_blocks(aabb: tuple[float, ...], grid: tuple[int, int], margin: float) -> list[Block]:
    """Split a scene box (6 numbers) into ``grid[0] x grid[1]`` cells along x and y (full
    height), ordered x-major; each block's anchor box overlaps its neighbours by ``margin``."""
    nx, ny = grid
    if nx < 1 or ny < 1:
        raise ValueError(f"block grid must be positive, got {grid}")
    lo, hi = torch.tensor(aabb[:3]), torch.tensor(aabb[3:])
    step = (hi - lo) / torch.tensor([nx, ny, 1])
    out = []
    for i in range(nx):
        for j in range(ny):
            b_lo = lo + step * torch.tensor([i, j, 0])
            out.append(Block(len(out), b_lo, b_lo + step, margin))
    return out


def block_cameras(
    block: Block, n: int, size: int = 32, height: float = 2.2, fov: float = 55.0, seed: int = 0
) -> Cameras:
    """n cameras above a block looking down at its centre from around it (aerial views)."""
    g = torch.Generator().manual_seed(seed * 1000 + block.index)
    c = block.center.clone()
    c[2] = -0.35
    az = 2 * math.pi * (torch.arange(n) / n + torch.rand(n, generator=g) / n)
    r = 0.4 + 0.4 * torch.rand(n, generator=g)
    eye = c + torch.stack([r * torch.cos(az), r * torch.sin(az), torch.full((n,), height)], -1)
    return Cameras.from_fov(look_at(eye, c.expand(n, 3)), fov, size, size)


def scene_points(scene: VoxelField, voxel: float, threshold: float = 1.0) -> tuple[Tensor, Tensor]:
    """Initial anchor positions and colours: the scene's occupied grid vertices thinned to
    one per ``voxel``-sized cell (Scaffold-GS voxelises its SfM points the same way).
    Returns points (N, 3) and colours (N, 3)."""
    r = scene.config.resolution
    with torch.no_grad():
        raw = scene.grid[0]  # (4, Z, Y, X)
        sigma = F.softplus(raw[0]).permute(2, 1, 0)  # [x, y, z]
        rgb = torch.sigmoid(raw[1:]).permute(3, 2, 1, 0)
    lo, hi = scene.aabb[0], scene.aabb[1]
    u = torch.linspace(0, 1, r)
    ax = [lo[i] + (hi[i] - lo[i]) * u for i in range(3)]
    p = torch.stack(torch.meshgrid(*ax, indexing="ij"), -1)
    occ = sigma > threshold
    pts, cols = p[occ], rgb[occ]
    cell = torch.floor((pts - lo) / voxel).long()
    key = (cell[:, 0] * 100003 + cell[:, 1]) * 100003 + cell[:, 2]
    _, inv = torch.unique(key, return_inverse=True)
    n = int(inv.max()) + 1
    cnt = torch.zeros(n).index_add_(0, inv, torch.ones(len(inv)))
    mean_p = torch.zeros(n, 3).index_add_(0, inv, pts) / cnt[:, None]
    mean_c = torch.zeros(n, 3).index_add_(0, inv, cols) / cnt[:, None]
    return mean_p, mean_c


# ---------------------------------------------------------------------------------------------
# Anchors and the shared decoder (Scaffold-GS style)
# ---------------------------------------------------------------------------------------------


class BlockAnchors(nn.Module):
    """A block's anchors: fixed positions (N, 3), features (N, D), offsets (N, k, 3) and
    log scales (N, 3) (Scaffold-GS's anchor attributes; its anchors do not move)."""

    def __init__(self, positions: Tensor, feat_dim: int, n_offsets: int, voxel: float, g=None):
        super().__init__()
        n = positions.shape[0]
        self.register_buffer("positions", positions.clone())
        self.features = nn.Parameter(0.1 * torch.randn(n, feat_dim, generator=g))
        self.offsets = nn.Parameter(torch.zeros(n, n_offsets, 3))
        self.log_scales = nn.Parameter(torch.full((n, 3), math.log(voxel)))

    def __len__(self) -> int:
        return self.positions.shape[0]


class GaussianDecoder(nn.Module):
    """Anchor feature + view direction -> k Gaussians' opacity (tanh), colour (sigmoid) and
    scale/rotation (7) (Scaffold-GS's mlp_opacity / mlp_color / mlp_cov, one hidden layer)."""

    def __init__(self, feat_dim: int, n_offsets: int, hidden: int) -> None:
        super().__init__()
        self.k = n_offsets

        def mlp(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(feat_dim + 3, hidden), nn.ReLU(), nn.Linear(hidden, out))

        self.mlp_opacity = mlp(n_offsets)
        self.mlp_color = mlp(3 * n_offsets)
        self.mlp_cov = mlp(7 * n_offsets)

    def forward(self, features: Tensor, view_dirs: Tensor) -> dict[str, Tensor]:
        """features (N, D), unit view dirs (N, 3) -> opacity (N*k,) in (-1, 1), color
        (N*k, 3), scale_logits (N*k, 3), quats (N*k, 4) normalised."""
        h = torch.cat([features, view_dirs], -1)
        cov = self.mlp_cov(h).reshape(-1, 7)
        return {
            "opacity": torch.tanh(self.mlp_opacity(h)).reshape(-1),
            "color": torch.sigmoid(self.mlp_color(h)).reshape(-1, 3),
            "scale_logits": cov[:, :3],
            "quats": F.normalize(cov[:, 3:], dim=-1),
        }


def decode_gaussians(anchors: BlockAnchors, decoder: GaussianDecoder, camera_center: Tensor):
    """Gaussians of a block seen from ``camera_center`` (3,): Scaffold-GS's
    ``generate_neural_gaussians`` (means = anchor + offset * scale; scales = anchor scale *
    sigmoid; Gaussians with opacity <= 0 are dropped). Returns the decoder outputs for every
    anchor offset (``raw``, for the consistency loss) and the kept Gaussians."""
    view = anchors.positions - camera_center.to(anchors.positions)
    view = view / view.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    raw = decoder(anchors.features, view)
    k = decoder.k
    scale_a = anchors.log_scales.exp().repeat_interleave(k, 0)  # (N*k, 3)
    means = anchors.positions.repeat_interleave(k, 0) + anchors.offsets.reshape(-1, 3) * scale_a
    keep = raw["opacity"] > 0
    return raw, {
        "means": means[keep],
        "scales": (scale_a * torch.sigmoid(raw["scale_logits"]))[keep],
        "quats": raw["quats"][keep],
        "opacities": raw["opacity"][keep],
        "colors": raw["color"][keep],
        "keep": keep,
    }


def render_block(
    anchors: BlockAnchors, decoder: GaussianDecoder, cameras: Cameras, background: Tensor
) -> tuple[Tensor, dict, dict]:
    """Render a block into each camera (decoded per camera, view-dependent). Returns images
    (C, H, W, 3) and the raw decoder outputs and kept Gaussians of the last camera."""
    images = []
    for c in range(len(cameras)):
        cam = cameras[c]
        raw, g = decode_gaussians(anchors, decoder, cam.centers[0])
        out = rasterize_gaussians(
            g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], cam,
            backgrounds=background, backend="auto",
        )  # fmt: skip
        images.append(out["image"][0])
    return torch.stack(images), raw, g


# ---------------------------------------------------------------------------------------------
# Momentum teacher, consistency, block weights, scheduling
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def momentum_update_(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter (paper eq. 4; their
    ``momentum_update``)."""
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {m}")
    for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
        pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)


def consistency_loss(
    student_raw: dict, teacher_raw: dict, keep: Tensor, anchor_scale: Tensor | None = None
) -> Tensor:
    """Momentum self-distillation (paper eq. 5; ``render_with_consistency_loss``): MSE of
    colour, rotation and scale (``anchor_scale * sigmoid(logits)``, anchor_scale (N*k, 3),
    default 1) of the kept Gaussians plus MSE of every offset's opacity, between the student
    decoder and the momentum teacher decoder on the same anchors."""
    t = {k: v.detach() for k, v in teacher_raw.items()}
    s = student_raw
    if not bool(keep.any()):
        return F.mse_loss(s["opacity"], t["opacity"])
    a = 1.0 if anchor_scale is None else anchor_scale[keep]
    a_t = a.detach() if torch.is_tensor(a) else a
    return (
        F.mse_loss(s["color"][keep], t["color"][keep])
        + F.mse_loss(s["quats"][keep], t["quats"][keep])
        + F.mse_loss(
            a * torch.sigmoid(s["scale_logits"][keep]),
            a_t * torch.sigmoid(t["scale_logits"][keep]),
        )
        + F.mse_loss(s["opacity"], t["opacity"])
    )


def block_weights(psnr: Tensor, ssim: Tensor, sigma: float) -> Tensor:
    """Reconstruction-guided block weights (paper eq. 6; their ``recons_weight``):
    ``w_k = 2 - exp(-((P_max - P_k)^2 + (10 S_max - 10 S_k)^2) / (2 sigma^2))`` for per-block
    smoothed PSNR and SSIM (B,); the best block gets 1, worse ones up to 2."""
    d2 = (psnr.max() - psnr) ** 2 + (10 * ssim.max() - 10 * ssim) ** 2
    return 2.0 - torch.exp(-d2 / (2 * sigma**2))


def worker_blocks(n_blocks: int, n_workers: int) -> list[list[int]]:
    """Round-robin ownership: worker w owns blocks w, w + W, w + 2W, ... (needs W < B). The
    one exception is one block on one worker, plain (non-block) Scaffold-GS training, which
    the benchmark uses as the single-block baseline."""
    if not (1 <= n_workers < n_blocks or n_workers == n_blocks == 1):
        raise ValueError(
            f"Momentum-GS trains more blocks than workers: need 1 <= workers < blocks, got "
            f"{n_workers} workers for {n_blocks} blocks"
        )
    return [list(range(w, n_blocks, n_workers)) for w in range(n_workers)]


def active_blocks(turn: int, owned: list[list[int]]) -> list[int]:
    """The block each worker trains in ``turn``: its (turn mod n_w)-th block."""
    return [blocks[turn % len(blocks)] for blocks in owned]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of images (..., H, W, 3) with 3DGS's 11x11 Gaussian
    window (sigma 1.5) and zero padding. Written here: no SSIM library is a dependency."""
    x = a.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
    y = b.reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2).to(x)
    w = _gaussian_window().to(x).expand(3, 1, 11, 11)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, padding=5, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return m.mean()


def image_psnr(a: Tensor, b: Tensor) -> float:
    mse = torch.mean((a.detach() - b.detach()) ** 2)
    return float(-10 * torch.log10(mse.clamp_min(1e-12)))


# ---------------------------------------------------------------------------------------------
# The model and the training loop
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockData:
    """A block's posed images."""

    train_cameras: Cameras  # views assigned to the block
    train_images: Tensor  # (C, H, W, 3)
    test_cameras: Cameras  # held-out views of the block
    test_images: Tensor  # (C', H, W, 3)


@torch.no_grad()
def render_block_data(
    scene: nn.Module, blocks: list[Block], n_train: int, n_test: int, size: int,
    render_config, seed: int = 0,
) -> list[BlockData]:  # fmt: skip
    """Each block's aerial training views (cameras drawn with ``seed``) and held-out views
    (``seed + 1``) of a radiance-field ``scene``, rendered by the volume renderer."""
    from fewstep.threed.volume import render_field

    out = []
    for b in blocks:
        tr = block_cameras(b, n_train, size, seed=seed)
        te = block_cameras(b, n_test, size, seed=seed + 1)
        images = [render_field(scene, c, render_config)["image"] for c in (tr, te)]
        out.append(BlockData(tr, images[0], te, images[1]))
    return out


class MomentumGS(nn.Module):
    """Blocks of anchors, the shared (student) decoder and its momentum teacher."""

    def __init__(self, blocks: list[Block], anchors: list[BlockAnchors], cfg: MomentumGSConfig):
        super().__init__()
        self.blocks, self.cfg = blocks, cfg
        self.anchors = nn.ModuleList(anchors)
        self.decoder = GaussianDecoder(cfg.feat_dim, cfg.n_offsets, cfg.hidden)
        self.teacher = copy.deepcopy(self.decoder).requires_grad_(False)

    @classmethod
    def from_points(cls, points: Tensor, blocks: list[Block], cfg: MomentumGSConfig) -> MomentumGS:
        """Anchors of each block: the initial points inside its cell expanded by the overlap
        margin (so neighbouring blocks share the seams)."""
        g = torch.Generator().manual_seed(cfg.seed)
        anchors = []
        for b in blocks:
            pts = points[b.contains(points, b.margin)]
            if pts.shape[0] == 0:
                raise ValueError(f"block {b.index} holds no initial points; use fewer blocks")
            anchors.append(BlockAnchors(pts, cfg.feat_dim, cfg.n_offsets, cfg.anchor_voxel, g))
        return cls(blocks, anchors, cfg)

    def render(self, block: int, cameras: Cameras, decoder: GaussianDecoder | None = None):
        bg = torch.tensor(self.cfg.background)
        return render_block(self.anchors[block], decoder or self.decoder, cameras, bg)[0]

    @torch.no_grad()
    def merged_gaussians(self, camera_center: Tensor | None = None) -> Gaussians:
        """All blocks' Gaussians, each block cropped to its own cell (the paper's merge
        step), as a ``Gaussians`` container (SH degree 0) for ``render_gaussians`` / PLY.
        Colours are decoded for the view from ``camera_center`` (default: 3 units above the
        scene centre): the container is static, the decoder view-dependent."""
        if camera_center is None:
            camera_center = torch.tensor([0.0, 0.0, 3.0])
        parts = {k: [] for k in ("means", "scales", "quats", "opacities", "colors")}
        for b, a in zip(self.blocks, self.anchors):
            _, g = decode_gaussians(a, self.decoder, camera_center)
            inside = b.contains(g["means"])
            for k in parts:
                parts[k].append(g[k][inside])
        cat = {k: torch.cat(v) for k, v in parts.items()}
        op = cat["opacities"].clamp(1e-4, 1 - 1e-4)
        return Gaussians(
            means=cat["means"],
            log_scales=cat["scales"].clamp_min(1e-8).log(),
            quats=cat["quats"],
            opacity_logits=torch.log(op / (1 - op)),
            sh=rgb_to_sh0(cat["colors"])[:, None, :],
        )

    @torch.no_grad()
    def render_merged(self, cameras: Cameras) -> Tensor:
        """Render every block's cropped Gaussians together, decoded per camera (C, H, W, 3)."""
        bg = torch.tensor(self.cfg.background)
        images = []
        for c in range(len(cameras)):
            cam = cameras[c]
            parts = []
            for b, a in zip(self.blocks, self.anchors):
                _, g = decode_gaussians(a, self.decoder, cam.centers[0])
                inside = b.contains(g["means"])
                parts.append(
                    {k: g[k][inside] for k in ("means", "quats", "scales", "opacities", "colors")}
                )
            cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            out = rasterize_gaussians(
                cat["means"], cat["quats"], cat["scales"], cat["opacities"], cat["colors"], cam,
                backgrounds=bg,
            )  # fmt: skip
            images.append(out["image"][0])
        return torch.stack(images)


def _block_loss(model: MomentumGS, b: int, data: BlockData, cfg: MomentumGSConfig, g) -> tuple:
    """Photometric + scale regulariser + momentum consistency loss of one view of block b."""
    i = int(torch.randint(0, len(data.train_cameras), (1,), generator=g))
    cam, target = data.train_cameras[i], data.train_images[i : i + 1]
    bg = torch.tensor(cfg.background)
    image, raw, gs = render_block(model.anchors[b], model.decoder, cam, bg)
    with torch.no_grad():
        view = model.anchors[b].positions - cam.centers[0]
        t_raw = model.teacher(model.anchors[b].features, F.normalize(view, dim=-1))
    l1 = (image - target).abs().mean()
    photo = (1 - cfg.lambda_dssim) * l1 + cfg.lambda_dssim * (1 - ssim(image, target))
    reg = gs["scales"].prod(-1).mean() if gs["scales"].numel() else image.sum() * 0
    scale_a = model.anchors[b].log_scales.exp().repeat_interleave(model.decoder.k, 0)
    cons = consistency_loss(raw, t_raw, gs["keep"], scale_a)
    return photo + cfg.scaling_reg * reg + cfg.consistency_weight * cons, {
        "photo": float(photo.detach()),
        "consistency": float(cons.detach()),
    }


@torch.no_grad()
def evaluate_blocks(model: MomentumGS, data: list[BlockData]) -> tuple[Tensor, Tensor]:
    """Per-block PSNR and SSIM (B,) of each block's own Gaussians on its held-out views."""
    ps, ss = [], []
    for b, d in enumerate(data):
        img = model.render(b, d.test_cameras)
        ps.append(image_psnr(img, d.test_images))
        ss.append(float(ssim(img, d.test_images)))
    return torch.tensor(ps), torch.tensor(ss)


def train_momentum_gs(model: MomentumGS, data: list[BlockData], cfg: MomentumGSConfig) -> dict:
    """Train all blocks, W at a time in round-robin turns (see the module docstring).

    Returns a log: per iteration ``step``, ``loss`` (mean over active workers, weighted),
    ``photo``, ``consistency``, ``blocks`` trained; ``evals`` with per-block PSNR / SSIM /
    weights; ``weights`` (final); ``schedule`` (turn -> blocks); ``seconds``."""
    if len(data) != len(model.blocks):
        raise ValueError(f"need one BlockData per block ({len(model.blocks)}), got {len(data)}")
    owned = worker_blocks(len(model.blocks), cfg.workers)
    g = torch.Generator().manual_seed(cfg.seed)
    groups = [
        {"params": [a.features for a in model.anchors], "lr": cfg.lr_feature},
        {"params": [a.offsets for a in model.anchors], "lr": cfg.lr_offset},
        {"params": [a.log_scales for a in model.anchors], "lr": cfg.lr_scaling},
        {"params": list(model.decoder.parameters()), "lr": cfg.lr_decoder},
    ]
    opt = torch.optim.Adam(groups, eps=1e-15)
    B = len(model.blocks)
    ema_psnr, ema_ssim = torch.zeros(B), torch.zeros(B)
    weights = torch.ones(B)
    log: dict = {"step": [], "loss": [], "photo": [], "consistency": [], "blocks": [], "evals": []}
    log["schedule"], log["owned"] = [], owned
    t0 = time.perf_counter()
    for it in range(cfg.steps):
        turn = it // cfg.block_interval
        active = active_blocks(turn, owned)
        if it % cfg.block_interval == 0:
            log["schedule"].append({"turn": turn, "blocks": active})
        opt.zero_grad(set_to_none=True)
        total, photo, cons = 0.0, 0.0, 0.0
        for b in active:  # one slot (GPU) each; sequential here
            loss, parts = _block_loss(model, b, data[b], cfg, g)
            w = weights[b] if cfg.block_weighting and it >= cfg.weight_warmup else 1.0
            total = total + w * loss
            photo += parts["photo"] / len(active)
            cons += parts["consistency"] / len(active)
        if not torch.isfinite(total):
            raise FloatingPointError(f"Momentum-GS step {it}: non-finite loss on blocks {active}")
        total.backward()
        for p in model.decoder.parameters():  # all-reduce mean of the shared decoder's grads
            if p.grad is not None:
                p.grad /= len(active)
        opt.step()
        momentum_update_(model.teacher, model.decoder, cfg.momentum)
        log["step"].append(it + 1)
        log["loss"].append(float(total.detach()) / len(active))
        log["photo"].append(photo)
        log["consistency"].append(cons)
        log["blocks"].append(active)
        if cfg.eval_every > 0 and (it + 1) % cfg.eval_every == 0:
            p, s = evaluate_blocks(model, data)
            first = ema_psnr == 0
            ema_psnr = torch.where(first, p, 0.9 * ema_psnr + 0.1 * p)
            ema_ssim = torch.where(first, s, 0.9 * ema_ssim + 0.1 * s)
            weights = block_weights(ema_psnr, ema_ssim, cfg.weight_sigma)
            log["evals"].append(
                {
                    "step": it + 1,
                    "psnr": p.tolist(),
                    "ssim": s.tolist(),
                    "weights": weights.tolist(),
                }
            )
    log["weights"] = weights.tolist()
    log["seconds"] = time.perf_counter() - t0
    return log
