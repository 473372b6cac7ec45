"""Image data for dataset distillation, as tensors in the space the networks see.

Sources (all offline):

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), split once
  per class into train / test with a fixed seed;
* a folder with one sub-folder per class (``root/<class>/<image>``), or ``root/train/<class>``
  and ``root/test/<class>`` for a given split; any format Pillow reads;
* any torchvision-style dataset object (``len(ds)`` and ``ds[i] -> (image, label)``, the image
  a PIL image, array or tensor), e.g. ``torchvision.datasets.ImageFolder`` or ``MNIST``.

Pixels are read into [0, 1] and then either standardised per channel with the training split's
mean and std (DC, DM), or ZCA-whitened with a regularised whitening matrix fitted on the training
split (MTT/FTD on CIFAR follow KIP, Nguyen et al. 2021; Cazenavette et al. 2022 use kornia's
``ZCAWhitening(eps=0.1)``, which is what :class:`ZCA` computes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm")


@dataclass
class DataConfig:
    dataset: str = "digits"  # "digits" (scikit-learn 8x8, offline) or a folder of class sub-folders
    image_size: int = 32  # side length that folder images are resized to (digits stay 8x8)
    channels: int = 1  # channels of folder images: 1 (grey) or 3 (RGB)
    test_fraction: float = 0.2  # held-out share of every class when the data has no test split
    split_seed: int = 0  # seed of the fixed stratified train/test split
    zca: bool = False  # ZCA-whiten (fitted on the training split) instead of standardising
    zca_eps: float = 0.1  # ZCA regulariser added to the covariance eigenvalues (as MTT/kornia)


# ----------------------------------------------------------------------- pixel transforms


class Standardise:
    """x -> (x - mean_c) / std_c per channel; ``mean``, ``std`` of shape (C,)."""

    name = "standardise"

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean.float(), std.float()

    @classmethod
    def fit(cls, x: Tensor) -> Standardise:
        """Fit on pixels ``x`` (N, C, H, W)."""
        return cls(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6))

    def _v(self, t: Tensor, x: Tensor) -> Tensor:
        return t.to(x.device).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self._v(self.mean, x)) / self._v(self.std, x)

    def inverse(self, x: Tensor) -> Tensor:
        return x * self._v(self.std, x) + self._v(self.mean, x)


class ZCA:
    """Regularised ZCA whitening of flattened images (D = C*H*W).

    With the training pixels' mean ``mu`` (D,) and covariance ``Sigma = U diag(s) U^T`` (D, D),
    ``W = U diag((s + eps)^-1/2) U^T``; ``forward(x) = (x - mu) W`` and
    ``inverse(z) = z W^-1 + mu`` with ``W^-1 = U diag((s + eps)^1/2) U^T``. ``eps`` keeps the
    whitening from blowing up noise in directions of tiny variance (kornia's ``ZCAWhitening``,
    used by MTT, takes eps = 0.1 on [0, 1] pixels).
    """

    name = "zca"

    def __init__(self, mean: Tensor, whiten: Tensor, unwhiten: Tensor):
        self.mean, self.whiten, self.unwhiten = mean, whiten, unwhiten

    @classmethod
    def fit(cls, x: Tensor, eps: float) -> ZCA:
        """Fit on pixels ``x`` (N, C, H, W); ``eps`` > 0."""
        if not eps > 0:
            raise ValueError(f"zca_eps must be > 0, got {eps}")
        flat = x.reshape(len(x), -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(len(flat) - 1, 1)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0.0)
        whiten = (u * (s + eps).rsqrt()) @ u.T
        unwhiten = (u * (s + eps).sqrt()) @ u.T
        return cls(mean.float(), whiten.float(), unwhiten.float())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(len(x), -1) - self.mean.to(x.device)
        return (flat @ self.whiten.to(x.device)).reshape(x.shape)

    def inverse(self, z: Tensor) -> Tensor:
        flat = z.reshape(len(z), -1) @ self.unwhiten.to(z.device)
        return (flat + self.mean.to(z.device)).reshape(z.shape)


# ----------------------------------------------------------------------- the data object


@dataclass
class ImageData:
    """Train and test images in network space (N, C, H, W), labels (N,) in 0..K-1."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
    transform: Standardise | ZCA  # pixels in [0, 1] <-> network space
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    def class_indices(self) -> list[Tensor]:
        """Training indices of every class, in class order."""
        return [torch.nonzero(self.y_train == c).flatten() for c in range(self.num_classes)]

    def to_pixels(self, x: Tensor) -> Tensor:
        """Network-space images back to pixels, clamped to [0, 1] for display."""
        return self.transform.inverse(x.detach().float().cpu()).clamp(0.0, 1.0)

    def to(self, device: str | torch.device) -> ImageData:
        return ImageData(
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.classes,
            self.transform,
            self.name,
        )


def fingerprint(data: ImageData) -> str:
    """A short hash of the train and test tensors: keys caches built from the data."""
    import hashlib

    h = hashlib.sha256()
    for t in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ipc(data: ImageData, ipc: int) -> None:
    """Every class needs at least ``ipc`` training images (a clear error otherwise)."""
    if ipc < 1:
        raise ValueError(f"ipc (images per class) must be >= 1, got {ipc}")
    counts = torch.bincount(data.y_train, minlength=data.num_classes).tolist()
    short = [f"{data.classes[c]} ({n})" for c, n in enumerate(counts) if n < ipc]
    if short:
        raise ValueError(
            f"ipc={ipc} needs at least {ipc} training images in every class; too few in: "
            + ", ".join(short)
        )


def sample_class(data: ImageData, indices: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``min(n, len(indices))`` distinct random training images from ``indices``: (n, C, H, W)."""
    perm = torch.randperm(len(indices), generator=generator)[:n]
    return data.x_train[indices[perm.to(indices.device)]]


def init_synthetic(
    data: ImageData, ipc: int, init: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Initial synthetic set, ``ipc`` images per class in class order.

    ``init="real"``: distinct random training images of each class (DC, DM, MTT); ``"noise"``:
    standard normal pixels in network space. Returns images (K*ipc, C, H, W) and labels
    (K*ipc,) = [0]*ipc + [1]*ipc + ...
    """
    check_ipc(data, ipc)
    k = data.num_classes
    labels = torch.arange(k).repeat_interleave(ipc).to(data.y_train.device)
    if init == "real":
        idx = data.class_indices()
        images = torch.cat([sample_class(data, idx[c], ipc, generator) for c in range(k)])
    elif init == "noise":
        shape = (k * ipc, *data.x_train.shape[1:])
        images = torch.randn(shape, generator=generator).to(data.x_train.device)
    else:
        raise ValueError(f"init must be one of 'real', 'noise'; got {init!r}")
    return images.clone(), labels


# ----------------------------------------------------------------------- loading


def stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, test): in each class ``round(n_c * test_fraction)`` random images go
    to the test side (at least one while the class has two or more). Deterministic in seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _digits() -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """scikit-learn's digits: pixels (1797, 1, 8, 8) in [0, 1], labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long), tuple(str(i) for i in range(10))


# Built-in datasets: name -> () -> (pixels in [0, 1], labels, class names), split here.
BUILTIN: dict[str, Callable[[], tuple[Tensor, Tensor, tuple[str, ...]]]] = {"digits": _digits}


def _pil_to_tensor(img: Any, image_size: int, channels: int) -> Tensor:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
    return t.view(image_size, image_size, channels).permute(2, 0, 1).contiguous()


def _array_to_tensor(img: Any, image_size: int, channels: int) -> Tensor:
    """An array/tensor image (H, W), (C, H, W) or (H, W, C) -> (channels, S, S) in [0, 1]."""
    t = torch.as_tensor(img)
    integer = not t.is_floating_point()
    t = t.float()
    if integer:
        t = t / 255.0
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image of shape (H, W), (C, H, W) or (H, W, C) with C in 1, 3; "
            f"got {tuple(t.shape)}"
        )
    if t.shape[0] != channels:
        t = t.mean(0, keepdim=True) if channels == 1 else t.expand(3, -1, -1)
    if t.shape[1:] != (image_size, image_size):
        t = torch.nn.functional.interpolate(
            t[None], size=(image_size, image_size), mode="bilinear", align_corners=False
        )[0]
    return t.contiguous()


def dataset_tensors(
    dataset: Any, image_size: int, channels: int, label_values: Tensor | None = None
) -> tuple[Tensor, Tensor, tuple[str, ...], Tensor]:
    """A torchvision-style dataset (``len`` and ``ds[i] -> (image, label)``) as tensors.

    Images (PIL, arrays or tensors; uint8 is read as 0..255) become (N, channels, S, S) in
    [0, 1]; labels are remapped to 0..K-1 in the sorted order of ``label_values`` (default:
    the labels present; a test split passes its training split's); class names come from
    ``dataset.classes`` when it has them. Returns (pixels, labels, class names, label values).
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            f"expected a dataset with __len__ and __getitem__ returning (image, label), "
            f"got {type(dataset).__name__}"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    images, labels = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, Sequence) and len(item) == 2):
            raise ValueError(f"dataset item {i} is not an (image, label) pair")
        img, lab = item
        if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
            images.append(_pil_to_tensor(img, image_size, channels))
        else:
            images.append(_array_to_tensor(img, image_size, channels))
        labels.append(int(lab))
    if not images:
        raise ValueError("the dataset is empty")
    raw = torch.tensor(labels, dtype=torch.long)
    uniq = torch.unique(raw) if label_values is None else label_values
    unknown = sorted(set(raw.tolist()) - set(uniq.tolist()))
    if unknown:
        raise ValueError(f"labels {unknown} do not occur in the training data")
    y = torch.searchsorted(uniq, raw)
    names = getattr(dataset, "classes", None)
    if names is not None and len(names) > int(uniq.max()) and int(uniq.min()) >= 0:
        classes = tuple(str(names[int(u)]) for u in uniq)
    else:
        classes = tuple(str(int(u)) for u in uniq)
    return torch.stack(images), y, classes, uniq


class _FolderDataset:
    """``root/<class>/<image>`` as a dataset of (PIL image, class index)."""

    def __init__(self, root: Path, classes: Sequence[str] | None = None):
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = list(classes) if classes is not None else found
        if len(self.classes) < 2:
            raise ValueError(
                f"{root} should hold one sub-folder per class (at least 2), found "
                f"{len(found)}: expected root/<class>/<image>.png"
            )
        missing = [c for c in self.classes if c not in found]
        if missing:
            raise ValueError(f"{root} lacks class folder(s) {missing} (classes: {self.classes})")
        self.items: list[tuple[Path, int]] = []
        for k, c in enumerate(self.classes):
            files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(
                    f"class folder {root / c} holds no images (suffixes {IMAGE_SUFFIXES})"
                )
            self.items += [(p, k) for p in files]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, k = self.items[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy(), k
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e


def _finish(
    x_tr: Tensor,
    y_tr: Tensor,
    x_te: Tensor,
    y_te: Tensor,
    classes: tuple[str, ...],
    cfg: DataConfig,
    name: str,
) -> ImageData:
    transform = ZCA.fit(x_tr, cfg.zca_eps) if cfg.zca else Standardise.fit(x_tr)
    return ImageData(
        transform.forward(x_tr),
        y_tr,
        transform.forward(x_te),
        y_te,
        classes,
        transform,
        name,
    )


def _split(x: Tensor, y: Tensor, classes: tuple[str, ...], cfg: DataConfig, name: str) -> ImageData:
    tr, te = stratified_split(y, cfg.test_fraction, cfg.split_seed)
    return _finish(x[tr], y[tr], x[te], y[te], classes, cfg, name)


def load_image_data(cfg: DataConfig, train: Any = None, test: Any = None) -> ImageData:
    """The configured images in network space.

    ``train`` (and optionally ``test``): torchvision-style dataset objects that replace
    ``cfg.dataset`` (Python API; images resized to ``cfg.image_size`` with ``cfg.channels``).
    Without ``test`` the training data is split with ``cfg.test_fraction``."""
    if train is not None:
        x, y, classes, values = dataset_tensors(train, cfg.image_size, cfg.channels)
        if test is None:
            return _split(x, y, classes, cfg, type(train).__name__)
        xt, yt, _, _ = dataset_tensors(test, cfg.image_size, cfg.channels, values)
        return _finish(x, y, xt, yt, classes, cfg, type(train).__name__)
    if cfg.dataset in BUILTIN:
        x, y, classes = BUILTIN[cfg.dataset]()
        return _split(x, y, classes, cfg, cfg.dataset)
    root = Path(cfg.dataset).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset {cfg.dataset!r} is neither a built-in ({', '.join(BUILTIN)}) nor a "
            "folder of class sub-folders (root/<class>/<image>)"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_ds = _FolderDataset(root / "train")
        test_ds = _FolderDataset(root / "test", classes=train_ds.classes)
        x, y, classes, values = dataset_tensors(train_ds, cfg.image_size, cfg.channels)
        xt, yt, _, _ = dataset_tensors(test_ds, cfg.image_size, cfg.channels, values)
        return _finish(x, y, xt, yt, classes, cfg, str(root))
    x, y, classes, _ = dataset_tensors(_FolderDataset(root), cfg.image_size, cfg.channels)
    return _split(x, y, classes, cfg, str(root))
