"""Image data for latent distillation: images with same-name caption files (the webdataset /
DreamBooth convention ``0001.png`` + ``0001.txt``), from a folder or from webdataset-style tar
shards (``shard-000.tar`` holding ``key.jpg`` + ``key.txt`` pairs), resized and centre-cropped,
encoded once by the pipeline's frozen VAE and cached."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class ImageFolder:
    """Readable images of a folder as (N, 3, H, W) in [-1, 1], their captions, and the names
    of the files that were skipped (unreadable, or without a caption file)."""

    images: Tensor
    captions: list[str]
    skipped: list[str]


def read_image_folder(folder: str | Path, resolution: int) -> ImageFolder:
    """Every image in ``folder`` (sorted by name) with a ``.txt`` caption beside it, resized
    so the short side is ``resolution`` and centre-cropped to a square; a folder of ``.tar``
    shards (or one shard) is read as webdataset samples instead (``read_shards``).
    Unreadable images and images without a caption are reported by name and skipped; no
    usable image is an error."""
    root = Path(folder)
    if root.is_file() and root.suffix == ".tar":
        return read_shards([root], resolution)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    shards = sorted(root.glob("*.tar"))
    if shards and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return read_shards(shards, resolution)
    samples = {}
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = path.with_suffix(".txt")
        text = caption.read_text() if caption.exists() else None
        samples[path.name] = (path.read_bytes, text, caption.name)
    return _decode(samples, root, resolution)


def read_shards(shards: list[Path], resolution: int) -> ImageFolder:
    """webdataset-style tar shards: members grouped by key (the name up to its first dot),
    each sample an image (``key.png``/``.jpg``/...) with a caption ``key.txt``. Samples are
    read in shard order, then key order; a shard that is not a readable tar is an error
    naming it."""
    import tarfile

    samples = {}
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                data = {m.name: tar.extractfile(m).read() for m in members}
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{shard} is not a readable tar shard ({e})") from e
        for name in sorted(data):
            key, _, ext = name.partition(".")
            if "." + ext.lower() not in IMAGE_SUFFIXES:
                continue
            text = data.get(f"{key}.txt")
            samples[f"{shard.name}:{name}"] = (
                lambda b=data[name]: b,
                None if text is None else text.decode("utf-8"),
                f"{key}.txt",
            )
    return _decode(samples, shards[0].parent if shards else Path("."), resolution)


def _decode(samples: dict, root: Path, resolution: int) -> ImageFolder:
    """{name: (bytes getter, caption or None, caption file name)} -> ImageFolder."""
    import io

    from PIL import Image

    images, captions, skipped = [], [], []
    for name, (read, text, caption_name) in samples.items():
        if text is None:
            skipped.append(f"{name} (no {caption_name})")
            continue
        try:
            with Image.open(io.BytesIO(read())) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises many types for a broken file
            skipped.append(f"{name} ({type(e).__name__})")
            continue
        images.append(_square(img, resolution))
        captions.append(text.strip())
    if skipped:
        log.warning("skipped %d of %d images: %s", len(skipped), len(images) + len(skipped),
                    ", ".join(skipped))  # fmt: skip
    if not images:
        raise ValueError(
            f"no usable images in {root} (expected {'/'.join(IMAGE_SUFFIXES)} files, each with "
            f"a same-name .txt caption); skipped: {', '.join(skipped) or 'none found'}"
        )
    return ImageFolder(torch.stack(images), captions, skipped)


def _square(img, size: int) -> Tensor:
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def encode_images(pipe, images: Tensor, batch_size: int = 16) -> Tensor:
    """Latents of images in [-1, 1] as the pipeline's denoiser sees them: the VAE's posterior
    mean (or an AutoencoderDC's latent), shifted and scaled by the VAE config
    (``(z - shift_factor) * scaling_factor``)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(pipe.device, vae.dtype)
        enc = vae.encode(x)
        # KL autoencoders give a posterior (its mean); SANA's AutoencoderDC a latent
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latent
        out.append((z - shift) * vae.config.scaling_factor)
    return torch.cat(out)


def cached_latents(pipe, folder: str | Path, resolution: int, teacher_id: str) -> tuple:
    """(latents, captions) of an image folder, cached by teacher, folder contents and
    resolution (the VAE is frozen)."""
    from safetensors.torch import load_file, save_file

    from fewstep.core.cache import cache_root

    paths = [Path(folder)] if Path(folder).is_file() else Path(folder).iterdir()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    spec = [teacher_id, str(Path(folder).resolve()), resolution, files]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]
    base = cache_root() / "image-latents" / key
    if base.with_suffix(".json").exists():
        captions = json.loads(base.with_suffix(".json").read_text())["captions"]
        return load_file(str(base.with_suffix(".safetensors")))["latents"], captions
    data = read_image_folder(folder, resolution)
    latents = encode_images(pipe, data.images).float().cpu()
    base.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous()}, str(base.with_suffix(".safetensors")))
    meta = {"captions": data.captions, "skipped": data.skipped}
    base.with_suffix(".json").write_text(json.dumps(meta))
    return latents, data.captions


@dataclass
class PairedData:
    """Image latents with their caption embeddings, drawn together with replacement."""

    x: Tensor  # (N, C, H, W) latents
    cond: Any  # (N, ...) tensor or dict of them: each latent's caption embedding

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __call__(self, rng):
        from fewstep.core.batch import index_cond

        idx = rng.randint(0, len(self.x)).cpu()
        return self.x[idx], index_cond(self.cond, idx)
