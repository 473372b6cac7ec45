"""FID / KID with user-provided Inception weights, and CLIP score with a user-provided CLIP.

Nothing here downloads: FID and KID need the FID Inception v3 weights that pytorch-fid
publishes (``pt_inception-2015-12-05-6726825d.pth``, the TF FID graph ported to torch), and
CLIP score needs a local CLIP folder (``CLIPModel.save_pretrained``). When either is missing
the metric is reported absent with a message saying which file to get.

The FID Inception is written here because torchvision is not a dependency; it follows
torchvision's ``Inception3`` block layout (so the state-dict keys are pytorch-fid's) with
pytorch-fid's FID patches: average pools that exclude padding (TF's behaviour) in the A, C
and E blocks, and a max pool in the last E block (Heusel et al. 2017; pytorch-fid
``inception.py``, ``fid_inception_v3``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.core.metrics import frechet_distance

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = (
    f"FID/KID need the FID Inception v3 weights ({INCEPTION_FILE}, from the pytorch-fid "
    "releases: github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    f"{INCEPTION_FILE}); download it on a machine with internet and pass its path as "
    "--eval.inception_weights"
)
CLIP_HELP = (
    "CLIP score needs a local CLIP folder (e.g. openai/clip-vit-large-patch14 saved with "
    "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained); pass it as --eval.clip_folder"
)


# --- FID Inception v3 -------------------------------------------------------------------
class Conv(nn.Sequential):
    """torchvision's BasicConv2d: conv (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.add_module("relu", nn.ReLU())


def _tf_avg(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TF ignores padded zeros


class BlockA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


def _row(cin: int, cout: int) -> Conv:
    return Conv(cin, cout, (1, 7), padding=(0, 3))


def _col(cin: int, cout: int) -> Conv:
    return Conv(cin, cout, (7, 1), padding=(3, 0))


class BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            Conv(cin, c7, 1), _row(c7, c7), _col(c7, 192)
        )  # fmt: skip
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), _col(c7, c7)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _row(c7, c7), _col(c7, c7)
        self.branch7x7dbl_5 = _row(c7, 192)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), _row(192, 192)
        self.branch7x7x3_3, self.branch7x7x3_4 = _col(192, 192), Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # pytorch-fid: the FID graph's last block max-pools
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _tf_avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionFeatures(nn.Module):
    """FID Inception v3 up to the final average pool: images (N, 3, H, W) in [0, 1] ->
    (N, 2048) features, resized to 299 bilinearly and scaled to [-1, 1] as pytorch-fid does."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            BlockA(192, 32),
            BlockA(256, 64),
            BlockA(288, 64),
        )
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; unused for features

    @classmethod
    def from_file(cls, path: str | Path) -> InceptionFeatures:
        """The network with pytorch-fid's FID weights (a ``.pth`` state dict, read with
        ``weights_only=True``, or a ``.safetensors`` file of the same keys)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception weights at {path}. {INCEPTION_HELP}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net = cls()
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        unexpected = [k for k in unexpected if not k.startswith("AuxLogits.")]
        if missing or unexpected:
            raise ValueError(
                f"{path} is not an FID Inception v3 state dict ({INCEPTION_FILE} layout): "
                f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
            )
        return net.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 50) -> Tensor:
        device = next(self.parameters()).device
        parts = [
            self(images[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)


# --- metrics on features ----------------------------------------------------------------
def fid(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (Heusel et al.
    2017, eq. 6); core ``metrics.frechet_distance``."""
    return frechet_distance(feats_a, feats_b)


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018, sec. 4), (N, D), (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with the polynomial kernel (Binkowski et al. 2018, eq. 3):
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * polynomial_kernel(x, y).mean()


def kid(
    feats_a: Tensor, feats_b: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased polynomial-kernel
    MMD^2 over ``subsets`` random subsets of ``subset_size`` from each set (without
    replacement; capped at the smaller set), as clean-fid / torch-fidelity compute it."""
    a, b = torch.as_tensor(feats_a).double(), torch.as_tensor(feats_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) features, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    vals = torch.stack([
        mmd2_unbiased(a[torch.randperm(a.shape[0], generator=g)[:size]],
                      b[torch.randperm(b.shape[0], generator=g)[:size]])
        for _ in range(subsets)
    ])  # fmt: skip
    return float(vals.mean()), float(vals.std()) if subsets > 1 else 0.0


# --- CLIP score -------------------------------------------------------------------------
def clip_score_from_embeddings(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Per-pair CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021, eq. 1 with
    w = 100 as torchmetrics), (N, D), (N, D) -> (N,)."""
    return 100 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp_min(0)


@torch.no_grad()
def clip_score(images: Tensor, prompts: list[str], clip_folder: str | Path) -> float:
    """Mean CLIP score of images (N, 3, H, W) in [0, 1] against their prompts with the
    ``CLIPModel`` / ``CLIPProcessor`` saved in ``clip_folder``."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(clip_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model in {folder}. {CLIP_HELP}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = CLIPProcessor.from_pretrained(str(folder))
    pixels = proc(images=list(images.float().clamp(0, 1)), return_tensors="pt", do_rescale=False)
    text = proc(text=prompts, return_tensors="pt", padding=True, truncation=True)
    img = model.get_image_features(pixel_values=pixels["pixel_values"])
    txt = model.get_text_features(
        input_ids=text["input_ids"], attention_mask=text["attention_mask"]
    )
    return float(clip_score_from_embeddings(projected(img), projected(txt)).mean())


def projected(out) -> Tensor:
    """The projected embedding from ``get_*_features``: a tensor in transformers 4, the
    output's ``pooler_output`` in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


def image_metrics(
    images: dict[str, Tensor], prompts: list[str], inception: str, clip: str, reference="teacher"
) -> dict:
    """``fid_<name>_vs_<reference>`` / ``kid_...`` of every image set (N, 3, H, W) in [0, 1]
    against ``images[reference]`` and ``clip_score_<name>`` of every set against ``prompts``;
    ``None`` plus a ``fid_note`` / ``clip_note`` naming the file to provide when the Inception
    weights or the CLIP folder are not given or not found."""
    out: dict = {}
    others = [k for k in images if k != reference]
    try:
        if not inception:
            raise FileNotFoundError(INCEPTION_HELP)
        net = InceptionFeatures.from_file(inception)
        feats = {k: net.features(v) for k, v in images.items()}
        for k in others:
            out[f"fid_{k}_vs_{reference}"] = fid(feats[reference], feats[k])
            out[f"kid_{k}_vs_{reference}"] = kid(feats[reference], feats[k], subsets=10)[0]
    except FileNotFoundError as err:
        out.update({f"{m}_{k}_vs_{reference}": None for k in others for m in ("fid", "kid")})
        out["fid_note"] = str(err)
    try:
        if not clip:
            raise FileNotFoundError(CLIP_HELP)
        out.update({f"clip_score_{k}": clip_score(v, prompts, clip) for k, v in images.items()})
    except FileNotFoundError as err:
        out.update({f"clip_score_{k}": None for k in images})
        out["clip_note"] = str(err)
    return out
