"""Posed image datasets in nerfstudio's ``transforms.json`` format (also the NeRF-synthetic /
Instant-NGP layout it grew from).

The file holds intrinsics at the top level or per frame (``fl_x, fl_y, cx, cy, w, h``, or
``camera_angle_x`` [``camera_angle_y``] in radians) and ``frames``, each with a ``file_path``
relative to the JSON file and a ``transform_matrix``: camera-to-world, 4x4, OpenGL convention
(+y up, camera looking along -z). ``read_transforms`` returns ``Cameras`` in fewstep's OpenCV
convention and images as float tensors in [0, 1]. Poses are taken as stored: nerfstudio's
dataparser re-orients and rescales scenes on load (``auto_orient``, ``auto_scale_poses``);
this reader does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.threed.cameras import Cameras

# Camera models a pinhole reader can take without undistortion.
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def load_image(path: str | Path) -> Tensor:
    """An image file as float (H, W, 3) or (H, W, 4) in [0, 1] (8- or 16-bit)."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32) / 65535.0
            return torch.from_numpy(np.repeat(arr[..., None], 3, -1).copy())
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 255.0)


def save_image(path: str | Path, image: Tensor) -> None:
    """Write (H, W, 3) or (H, W, 4) values in [0, 1] as an 8-bit PNG (rounded)."""
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3|4), got {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="RGBA" if arr.shape[-1] == 4 else "RGB").save(path)


@dataclass
class TransformsDataset:
    """Cameras and images of one transforms.json."""

    cameras: Cameras  # C cameras, OpenCV convention
    images: Tensor  # (C, H, W, 3) float in [0, 1] (RGBA composited onto the background if given)
    alphas: Tensor | None  # (C, H, W, 1) in [0, 1] where the files had an alpha channel, else None
    file_paths: list[str]  # file_path of each frame, as written in the JSON

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, i: int) -> tuple[Cameras, Tensor]:
        return self.cameras[i], self.images[i]


def _resolve(root: Path, file_path: str) -> Path:
    p = root / file_path
    if p.exists():
        return p
    if not p.suffix and p.with_suffix(".png").exists():  # NeRF-synthetic omits ".png"
        return p.with_suffix(".png")
    raise FileNotFoundError(f"image {file_path!r} listed in transforms.json not found at {p}")


def _intrinsics(meta: dict, frame: dict, image_wh: tuple[int, int] | None, where: str):
    def get(key):
        return frame.get(key, meta.get(key))

    model = get("camera_model")
    if model is not None and model not in PINHOLE_MODELS:
        raise ValueError(
            f"{where}: camera_model {model!r} is not supported; expected one of "
            f"{list(PINHOLE_MODELS)} (pinhole, no distortion)"
        )
    bad = {k: get(k) for k in DISTORTION_KEYS if get(k) not in (None, 0, 0.0)}
    if bad:
        raise ValueError(f"{where}: lens distortion {bad} is not supported (pinhole only)")
    w, h = get("w"), get("h")
    if w is None or h is None:
        if image_wh is None:
            raise ValueError(f"{where}: no w/h in transforms.json and images not loaded")
        w, h = image_wh
    w, h = int(w), int(h)
    fx, fy = get("fl_x"), get("fl_y")
    if fx is None:
        ax = get("camera_angle_x")
        if ax is None:
            raise ValueError(f"{where}: needs fl_x or camera_angle_x")
        fx = 0.5 * w / math.tan(0.5 * float(ax))
    if fy is None:
        ay = get("camera_angle_y")
        fy = 0.5 * h / math.tan(0.5 * float(ay)) if ay is not None else fx
    cx, cy = get("cx"), get("cy")
    cx = w / 2.0 if cx is None else cx
    cy = h / 2.0 if cy is None else cy
    return float(fx), float(fy), float(cx), float(cy), w, h


def read_transforms(
    path: str | Path,
    *,
    background: tuple[float, float, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TransformsDataset:
    """Read ``path`` (a transforms.json, or a folder holding one).

    RGBA images are composited onto ``background`` (RGB in [0, 1]) when given; their alpha is
    returned either way. All frames must share one image size.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    with open(path) as f:
        meta = json.load(f)
    frames = meta.get("frames")
    if not frames:
        raise ValueError(f"{path}: no 'frames' list")
    root = path.parent
    c2ws, intr, images, alphas, names = [], [], [], [], []
    for i, frame in enumerate(frames):
        where = f"{path} frame {i}"
        if "file_path" not in frame or "transform_matrix" not in frame:
            raise ValueError(f"{where}: each frame needs file_path and transform_matrix")
        m = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        if m.shape == (3, 4):
            m = torch.cat([m, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=m.dtype)])
        if m.shape != (4, 4):
            raise ValueError(f"{where}: transform_matrix must be 4x4, got {tuple(m.shape)}")
        img = load_image(_resolve(root, frame["file_path"]))
        intr.append(_intrinsics(meta, frame, (img.shape[1], img.shape[0]), where))
        if img.shape[:2] != (intr[-1][5], intr[-1][4]):
            raise ValueError(
                f"{where}: image is {img.shape[1]}x{img.shape[0]}, "
                f"transforms.json says {intr[-1][4]}x{intr[-1][5]}"
            )
        c2ws.append(m)
        images.append(img)
        names.append(frame["file_path"])
    sizes = {(w, h) for *_, w, h in intr}
    if len(sizes) != 1:
        raise ValueError(f"{path}: frames have different image sizes {sorted(sizes)}")
    has_alpha = any(img.shape[-1] == 4 for img in images)
    for img in images:
        a = img[..., 3:] if img.shape[-1] == 4 else torch.ones_like(img[..., :1])
        alphas.append(a)
    rgb = torch.stack([img[..., :3] for img in images])
    alpha = torch.stack(alphas)
    if background is not None:
        bg = torch.tensor(background, dtype=rgb.dtype)
        rgb = rgb * alpha + bg * (1.0 - alpha)
    fx, fy, cx, cy = (torch.tensor([t[k] for t in intr], dtype=dtype) for k in range(4))
    w, h = sizes.pop()
    cams = Cameras.from_opengl(torch.stack(c2ws).to(dtype), fx, fy, cx, cy, w, h)
    return TransformsDataset(cams, rgb.to(dtype), alpha.to(dtype) if has_alpha else None, names)


def write_transforms(
    directory: str | Path,
    cameras: Cameras,
    images: Tensor,
    *,
    alphas: Tensor | None = None,
    image_dir: str = "images",
) -> Path:
    """Write ``images`` (C, H, W, 3) in [0, 1] (plus ``alphas`` (C, H, W, 1) as RGBA) as PNGs
    under ``directory/image_dir`` and a nerfstudio transforms.json (OPENCV pinhole model,
    OpenGL camera-to-world). Shared intrinsics go to the top level, else per frame. Returns
    the JSON path."""
    directory = Path(directory)
    C = len(cameras)
    if images.shape != (C, cameras.height, cameras.width, 3):
        raise ValueError(
            f"images must be ({C}, {cameras.height}, {cameras.width}, 3), got {tuple(images.shape)}"
        )
    intr = {"fl_x": cameras.fx, "fl_y": cameras.fy, "cx": cameras.cx, "cy": cameras.cy}
    shared = all(bool((v == v[0]).all()) for v in intr.values())
    meta: dict = {"camera_model": "OPENCV", "w": cameras.width, "h": cameras.height}
    if shared:
        meta.update({k: float(v[0]) for k, v in intr.items()})
    c2w = cameras.camera_to_world_opengl.detach().double().cpu()
    frames = []
    for i in range(C):
        name = f"{image_dir}/frame_{i:05d}.png"
        img = images[i] if alphas is None else torch.cat([images[i], alphas[i]], -1)
        save_image(directory / name, img)
        frame = {"file_path": name, "transform_matrix": c2w[i].tolist()}
        if not shared:
            frame.update({k: float(v[i]) for k, v in intr.items()})
        frames.append(frame)
    meta["frames"] = frames
    out = directory / "transforms.json"
    directory.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(meta, indent=2))
    return out
