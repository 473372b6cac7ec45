"""Multi-student distillation of text-to-image pipelines, and routing prompts to the students.

Song, Lorraine, Nie, Kreis and Lucas, "Multi-student Diffusion Distillation for Better
One-step Generators" (ICML 2025, arXiv 2410.23274), sec. 3: the condition set is split into
K parts and student k is distilled (DMD2) on the conditions of part k only; at inference a
condition goes to the student that owns it. Core's ``multi_student`` objective trains the K
students; it routes samples by an integer label, so here a prompt's label is its index in
the prompt set and the denoisers look the text embeddings up by index
(``PromptTableDenoiser``); the partition maps prompt index -> student.

Partition of the prompts (``partition_prompts``):
- a prompt file whose lines are ``group<TAB>prompt`` gives the parts: one student per group
  name, in sorted name order (the group column decides K);
- a plain prompt file (one prompt per line) is split into ``num_students`` parts by k-means
  (scikit-learn) on the prompts' text features (``prompt_features``: the CLIP pooled vector
  where the pipeline has one, else the mask-weighted mean of the text-encoder tokens), the
  MSD paper's own choice for conditions without classes.

Routing at inference (``Routing.route``): a prompt of the training set goes to its part's
student; any other prompt to the student whose part has the nearest feature centroid (the
k-means assignment rule). The export is K diffusers pipeline folders plus ``routing.json`` and
``centroids.safetensors``; ``MultiStudentPipeline`` loads them and samples each prompt with
its student.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.batch import index_cond
from fewstep.core.models import Denoiser

ROUTING_FILE = "routing.json"  # student folders, prompts and their students, group names
CENTROIDS_FILE = "centroids.safetensors"  # (K, D) feature centroid of each student's part
OBJECTIVES = ("multi_student",)  # core objectives that train K label-routed students


# --- prompts and their partition ------------------------------------------------------------
def read_grouped_prompts(path: str | Path) -> tuple[list[str], list[str] | None]:
    """(prompts, groups): ``group<TAB>prompt`` lines give each prompt's group; a file with no
    tab gives groups None. Blank lines and ``#`` comments are skipped."""
    from fewstep.image.prompts import read_prompts

    lines = read_prompts(path)
    tabbed = ["\t" in line for line in lines]
    if not any(tabbed):
        return lines, None
    if not all(tabbed):
        bad = lines[tabbed.index(False)]
        raise ValueError(
            f"{path}: either every prompt line is 'group<TAB>prompt' or none is; "
            f"{bad!r} has no group"
        )
    pairs = [line.split("\t", 1) for line in lines]
    empty = [p for g, p in pairs if not g.strip() or not p.strip()]
    if empty:
        raise ValueError(f"{path}: empty group or prompt in 'group<TAB>prompt' line(s) {empty}")
    return [p.strip() for _, p in pairs], [g.strip() for g, _ in pairs]


def prompt_features(cond: Any) -> Tensor:
    """(P, D) float features of P encoded prompts: ``pooled_projections`` when present (SD3,
    Flux: CLIP's pooled vector), else the mean of the text tokens (P, L, D), weighted by
    ``encoder_attention_mask`` when present (PixArt, SANA), plain mean otherwise (SD's CLIP
    tokens, padded to a fixed length)."""
    if isinstance(cond, dict) and "pooled_projections" in cond:
        return cond["pooled_projections"].float().flatten(1)
    tokens = cond["encoder_hidden_states"] if isinstance(cond, dict) else cond
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        raise ValueError(
            "prompt features need text tokens (P, L, D) or pooled_projections; got "
            f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}"
        )
    mask = cond.get("encoder_attention_mask") if isinstance(cond, dict) else None
    if mask is None:
        return tokens.float().mean(dim=1)
    w = mask.float().unsqueeze(-1)
    return (tokens.float() * w).sum(1) / w.sum(1).clamp_min(1.0)


def kmeans_partition(features: Tensor, k: int, seed: int = 0) -> list[int]:
    """Part (0..k-1) of each of the P feature rows, by k-means (scikit-learn, 10 restarts),
    parts numbered in order of first appearance so the numbering is stable."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(features):
        raise ValueError(f"k-means into {k} parts needs at least {k} prompts; got {len(features)}")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(
        features.double().cpu().numpy()
    )
    order = {int(lab): i for i, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return [order[int(lab)] for lab in labels]


def centroids(features: Tensor, parts: list[int], k: int) -> Tensor:
    """(k, D) mean feature of each part's prompts."""
    idx = torch.as_tensor(parts, dtype=torch.long, device=features.device)
    return torch.stack([features[idx == i].mean(0) for i in range(k)])


@dataclass
class Routing:
    """Which student samples which prompt."""

    prompts: list[str]  # the training prompts
    parts: list[int]  # their students (0..K-1)
    names: list[str]  # one name per student (its group, or "kmeans-<k>")
    centroids: Tensor  # (K, D) feature centroid of each student's prompts

    @property
    def num_students(self) -> int:
        return len(self.names)

    def route(self, prompts: list[str], features_of=None) -> list[int]:
        """The student of each prompt: its training part when known, else the nearest
        centroid of ``features_of(unknown prompts) -> (U, D)``."""
        known = dict(zip(self.prompts, self.parts, strict=True))
        out = [known.get(p, -1) for p in prompts]
        unknown = [i for i, k in enumerate(out) if k < 0]
        if unknown:
            if features_of is None:
                raise ValueError(f"prompts {[prompts[i] for i in unknown]} are not in the routing")
            f = features_of([prompts[i] for i in unknown]).float().cpu()
            nearest = torch.cdist(f, self.centroids.float().cpu()).argmin(dim=1)
            for i, k in zip(unknown, nearest.tolist(), strict=True):
                out[i] = int(k)
        return out

    def save(self, folder: Path, student_dirs: list[str]) -> None:
        from safetensors.torch import save_file

        from fewstep.core.io import atomic_write_json

        info = {
            "students": student_dirs,
            "names": self.names,
            "prompts": self.prompts,
            "parts": self.parts,
            "feature": "pooled_projections, else mask-weighted mean of the text tokens",
        }
        save_file({"centroids": self.centroids.float().cpu().contiguous()}, folder / CENTROIDS_FILE)
        atomic_write_json(folder / ROUTING_FILE, info)

    @classmethod
    def load(cls, folder: Path) -> tuple[Routing, list[str]]:
        from safetensors.torch import load_file

        info = json.loads((folder / ROUTING_FILE).read_text())
        cents = load_file(str(folder / CENTROIDS_FILE))["centroids"]
        return cls(info["prompts"], info["parts"], info["names"], cents), info["students"]


def partition_prompts(
    prompts: list[str], groups: list[str] | None, cond: Any, num_students: int, seed: int = 0
) -> Routing:
    """The routing of ``prompts`` (encoded as ``cond``): by their ``groups`` column when
    given, else k-means on ``prompt_features(cond)`` into ``num_students`` parts."""
    feats = prompt_features(cond).cpu()
    if groups is not None:
        names = sorted(set(groups))
        parts = [names.index(g) for g in groups]
    else:
        parts = kmeans_partition(feats, num_students, seed)
        names = [f"kmeans-{k}" for k in range(num_students)]
    return Routing(list(prompts), parts, names, centroids(feats, parts, len(names)))


# --- training: prompts as integer labels ------------------------------------------------------
class _SharedTable:
    """Holds the prompt-embedding table; deep copies (students, EMA, fake scores) share it
    rather than each holding a copy of every prompt's embeddings."""

    def __init__(self, cond: Any):
        self.cond = cond

    def __deepcopy__(self, memo):
        return self


class PromptTableDenoiser(Denoiser):
    """``base`` conditioned on prompt indices: cond (B,) long -> ``base(x, t, table[cond])``,
    the table holding the encoded prompts (tensor or dict of tensors, first dim = prompt).
    This lets core's label-routed ``multi_student`` train text-conditioned students."""

    def __init__(self, base: Denoiser, table: Any):
        super().__init__(base.path, base.prediction)
        self.base = base
        self._table = table if isinstance(table, _SharedTable) else _SharedTable(table)

    def _cond(self, idx: Tensor) -> Any:
        if not isinstance(idx, Tensor) or idx.dtype.is_floating_point:
            raise ValueError(
                f"PromptTableDenoiser needs (B,) integer prompt indices; got {type(idx).__name__}"
            )
        return index_cond(self._table.cond, idx.long().reshape(-1))

    def forward(self, x_t, t, cond=None):
        return self.base(x_t, t, self._cond(cond))

    def features(self, x_t, t, cond=None):
        return self.base.features(x_t, t, self._cond(cond))


@dataclass
class MultiStudentSetup:
    """What the image-latent recipe needs to train a multi-student run."""

    data: Any  # prompt-only batches whose conditions are prompt indices
    prompts: list[str]  # the training prompts (without group column)
    null: Tensor  # (1,) the index of the negative / empty prompt in the table
    table: _SharedTable  # encoded prompts, then the null prompt
    routing: Routing  # prompt -> student
    obj_cfg: Any  # the objective config with num_students and the index partition

    def wrap(self, base: Denoiser) -> PromptTableDenoiser:
        return PromptTableDenoiser(base, self.table)


def setup(
    prompt_file: str, pipe, teacher_id: str, obj_cfg, negative_prompt: str = "", resolution=None
):
    """Read and partition ``prompt_file``, cache its embeddings and build the index data over
    latents of ``resolution``-pixel images (None: the model's own size): label i < P is
    prompt i, label P the CFG null prompt (given to student 0; only the teacher's guidance
    uses it)."""
    import dataclasses

    from fewstep.image.pipelines import latent_shape
    from fewstep.image.prompts import PromptData, cached_embeddings

    prompts, groups = read_grouped_prompts(prompt_file)
    cond = cached_embeddings(pipe, prompts, teacher_id)
    null = cached_embeddings(pipe, [negative_prompt], teacher_id)
    routing = partition_prompts(prompts, groups, cond, obj_cfg.num_students)
    table = _SharedTable(_cat(cond, null))
    labels = torch.arange(len(prompts), device=_device(cond))
    obj_cfg = dataclasses.replace(
        obj_cfg, num_students=routing.num_students, partition=(*routing.parts, 0)
    )
    data = PromptData(labels, latent_shape(pipe, resolution))
    null_label = torch.tensor([len(prompts)], device=labels.device)
    return MultiStudentSetup(data, prompts, null_label, table, routing, obj_cfg)


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b.to(a.device)])


def _device(cond: Any) -> torch.device:
    return next(iter(cond.values())).device if isinstance(cond, dict) else cond.device


def export_students(pipe, routed: nn.Module, out_dir: str | Path, times, routing: Routing) -> Path:
    """K diffusers pipeline folders ``student_<k>/`` (``export_student`` of expert k of the
    routed student) and the routing files in ``out_dir``; a copy of the students' step
    record beside them (they share the grid), so ``pipeline_kwargs(out_dir)`` works."""
    import shutil

    from fewstep.image import pipelines as P

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for k in range(routing.num_students):
        den = routed.experts[str(k)]
        net = P.denoiser_network(den.base if isinstance(den, PromptTableDenoiser) else den)
        dirs.append(f"student_{k}")
        P.export_student(pipe, net, out / dirs[-1], tuple(times))
    shutil.copyfile(out / dirs[0] / P.STUDENT_FILE, out / P.STUDENT_FILE)
    routing.save(out, dirs)
    return out


# --- inference -----------------------------------------------------------------------------
@dataclass
class RoutedOutput:
    images: Any  # as the students' pipelines return them, in prompt order
    students: list[int]  # the student that sampled each prompt


class MultiStudentPipeline:
    """K student pipelines and their routing, called like a diffusers text-to-image pipeline:
    each prompt is sampled by its own student. Seeded calls are batch-independent: a single
    ``generator`` is turned into one seed per prompt (a list of generators is used as is),
    so a prompt gets the image its student alone would draw with that prompt's generator."""

    def __init__(self, students: list, routing: Routing):
        if len(students) != routing.num_students:
            raise ValueError(f"routing names {routing.num_students} students; got {len(students)}")
        self.students = list(students)
        self.routing = routing

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu"):
        from fewstep.image.pipelines import load_pipeline

        folder = Path(folder)
        routing, dirs = Routing.load(folder)
        return cls([load_pipeline(folder / d, device) for d in dirs], routing)

    @property
    def device(self) -> torch.device:
        return self.students[0].device

    def set_progress_bar_config(self, **kw) -> None:
        for s in self.students:
            s.set_progress_bar_config(**kw)

    def features(self, prompts: list[str]) -> Tensor:
        """``prompt_features`` from the text encoders (the teacher's, shared by all)."""
        from fewstep.image.pipelines import encode_prompts

        return prompt_features(encode_prompts(self.students[0], prompts))

    def route(self, prompts: list[str]) -> list[int]:
        return self.routing.route(prompts, self.features)

    def __call__(self, prompt: str | list[str], generator=None, **kwargs) -> RoutedOutput:
        from fewstep.image.pipelines import call_kwargs

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        gens = _per_prompt_generators(generator, len(prompts))
        route = self.route(prompts)
        rows_by: dict[int, list[int]] = {}
        for i, k in enumerate(route):
            rows_by.setdefault(k, []).append(i)
        images: list[Any] = [None] * len(prompts)
        for k, rows in sorted(rows_by.items()):
            student = self.students[k]
            kw = {**call_kwargs(student), **_split_prompt_lists(kwargs, rows, len(prompts))}
            gen = None if gens is None else [gens[i] for i in rows]
            out = student([prompts[i] for i in rows], generator=gen, **kw).images
            for j, i in enumerate(rows):
                images[i] = out[j]
        return RoutedOutput(_stack(images), route)


def _per_prompt_generators(generator, n: int):
    if generator is None:
        return None
    if isinstance(generator, list):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} prompts")
        return generator
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator(device=generator.device).manual_seed(int(s)) for s in seeds]


def _split_prompt_lists(kwargs: dict, rows: list[int], n: int) -> dict:
    """Per-prompt list arguments (``negative_prompt=[...]``) cut to ``rows``."""
    out = dict(kwargs)
    for key, v in kwargs.items():
        if key.endswith("prompt") and isinstance(v, list) and len(v) == n:
            out[key] = [v[i] for i in rows]
    return out


def _stack(images: list) -> Any:
    if isinstance(images[0], Tensor):
        return torch.stack(images)
    try:
        import numpy as np

        if isinstance(images[0], np.ndarray):
            return np.stack(images)
    except ImportError:  # numpy ships with torch; kept for PIL-only installs
        pass
    return images
