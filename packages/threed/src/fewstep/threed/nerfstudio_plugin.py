"""nerfstudio methods backed by fewstep (the ``fewstep-threed[nerfstudio]`` extra).

nerfstudio finds third-party methods through the ``nerfstudio.method_configs`` entry-point
group: each entry point names a ``nerfstudio.plugins.types.MethodSpecification`` object, and
``nerfstudio.plugins.registry.discover_methods()`` loads them (``ns-train <name>``). The
entry points are (packages/threed/pyproject.toml)::

    [project.entry-points."nerfstudio.method_configs"]
    fewstep-pvd = "fewstep.threed.nerfstudio_plugin:fewstep_pvd"
    fewstep-sds = "fewstep.threed.nerfstudio_plugin:fewstep_sds"

This module never imports nerfstudio at import time: the two names are built on first
attribute access (PEP 562 module ``__getattr__``), so ``import fewstep.threed`` works without
the extra, and an entry point that is loaded without nerfstudio installed fails with an error
naming the extra.

Methods (``METHODS``):

- ``fewstep-pvd``: a fewstep radiance field (``--pipeline.model.field mlp|hashgrid|tensorf|
  voxel``) trained on the dataset's images with the photometric loss and, given
  ``--pipeline.model.teacher-run DIR`` (a ``fewstep distill threed-pvd`` run folder, whose
  student becomes the teacher), PVD's per-point terms (Fang et al., AAAI 2023, Sec. 3.3:
  clipped log-density and colour of points in the scene box, ``fewstep.threed.pvd``).
- ``fewstep-sds``: class-to-3D by score distillation (DreamFusion SDS, Poole et al. 2023,
  eq. 3; ``fewstep.threed.score``) of a fewstep field from a 2-D prior
  (``--pipeline.model.prior digits``), on nerfstudio's random-camera data manager (the one
  its generfacto method uses), rendering one full image per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Entry-point name -> (attribute of this module, one-line description).
METHODS: dict[str, tuple[str, str]] = {
    "fewstep-pvd": ("fewstep_pvd", "fewstep field; photometric + PVD per-point distillation"),
    "fewstep-sds": ("fewstep_sds", "fewstep field; class-to-3D by SDS from a 2-D prior"),
}

EXTRA_HINT = "install the extra: pip install 'fewstep-threed[nerfstudio]'"


def _require_nerfstudio() -> None:
    try:
        import nerfstudio  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the fewstep nerfstudio methods need nerfstudio; {EXTRA_HINT}") from e


def _render(field_module, ray_bundle, n_samples: int, background: str):
    """Volume-render a fewstep field along a nerfstudio RayBundle (origins / directions
    (..., 3)): rgb (..., 3), accumulation (..., 1), depth (..., 1)."""
    from fewstep.threed.volume import background_color, composite, ray_aabb, sample_bins

    shape = ray_bundle.origins.shape[:-1]
    o = ray_bundle.origins.reshape(-1, 3)
    d = ray_bundle.directions.reshape(-1, 3)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    aabb = field_module.aabb.to(o)
    t_near, t_far, hit = ray_aabb(o, d, aabb)
    t, deltas = sample_bins(t_near, t_far, n_samples, stratified=field_module.training)
    pts = (o[:, None] + t[..., None] * d[:, None]).reshape(-1, 3)
    dirs = d[:, None].expand(len(o), n_samples, 3).reshape(-1, 3)
    sigma, rgb = field_module(pts, dirs)
    sigma = sigma.reshape(len(o), n_samples) * hit[:, None]
    w, color, acc, depth = composite(sigma, rgb.reshape(len(o), n_samples, 3), t, deltas)
    color = color + (1.0 - acc) * background_color(background, color)
    return {
        "rgb": color.reshape(*shape, 3),
        "accumulation": acc.reshape(*shape, 1),
        "depth": (depth / acc.clamp_min(1e-6)).reshape(*shape, 1),
    }


def _load_teacher(run_dir: str):
    """The student field of a ``threed-pvd`` run folder (safetensors + student.json)."""
    from fewstep.threed.recipes.pvd import PVD

    _, field_module = PVD.load(run_dir)
    for p in field_module.parameters():
        p.requires_grad_(False)
    return field_module.eval()


def _build_classes() -> dict[str, Any]:
    """nerfstudio subclasses (defined only once nerfstudio is importable)."""
    from dataclasses import field as dc_field

    import torch
    from nerfstudio.models.base_model import Model, ModelConfig

    @dataclass
    class FewstepFieldModelConfig(ModelConfig):
        """A fewstep radiance field inside nerfstudio."""

        _target: type = dc_field(default_factory=lambda: FewstepFieldModel)
        field: str = "hashgrid"  # fewstep field type: mlp, hashgrid, tensorf, voxel
        samples_per_ray: int = 64  # stratified samples per ray in the scene box
        background: str = "white"  # composited background
        teacher_run: str = ""  # threed-pvd run folder whose student teaches (empty: none)
        pvd_points: int = 8192  # uniform box points per step for PVD's per-point terms
        pvd_weight: float = 1.0  # weight of the per-point terms (density + colour)
        sigma_clip: tuple[float, float] = (-2.0, 7.0)  # PVD's log-density range
        prior: str = "digits"  # SDS only: 2-D prior name (fewstep.core.priors)
        label: int = 3  # SDS only: class to make
        guidance_scale: float = 100.0  # SDS only: classifier-free guidance (DreamFusion)
        sds_steps: int = 10000  # SDS only: total steps (drives the method's time schedule)

    class FewstepFieldModel(Model):
        config: FewstepFieldModelConfig

        def populate_modules(self):
            from fewstep.threed.fields import make_field

            super().populate_modules()
            aabb = self.scene_box.aabb.flatten().tolist()
            self.fewstep_field = make_field(self.config.field, aabb=tuple(aabb))
            self.teacher = (
                _load_teacher(self.config.teacher_run) if self.config.teacher_run else None
            )

        def get_param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
            groups = self.fewstep_field.parameter_groups()
            return {"fields": groups["grid"] + groups["network"]}

        def get_outputs(self, ray_bundle):
            return _render(
                self.fewstep_field, ray_bundle, self.config.samples_per_ray, self.config.background
            )

        def get_metrics_dict(self, outputs, batch):
            if "image" not in batch:
                return {}
            mse = torch.mean((outputs["rgb"] - batch["image"][..., :3].to(outputs["rgb"])) ** 2)
            return {"psnr": -10.0 * torch.log10(mse.clamp_min(1e-10))}

        def _pvd_terms(self) -> dict[str, torch.Tensor]:
            from fewstep.threed.pvd import density_range_error

            aabb = self.fewstep_field.aabb
            u = torch.rand(self.config.pvd_points, 3, device=aabb.device)
            pts = aabb[0] + (aabb[1] - aabb[0]) * u
            dirs = torch.nn.functional.normalize(torch.randn_like(pts), dim=-1)
            with torch.no_grad():
                ts, tc = self.teacher.to(pts.device)(pts, dirs)
            ss, sc = self.fewstep_field(pts, dirs)
            occupied = (ts > torch.exp(torch.tensor(self.config.sigma_clip[0]))).float()
            color = (occupied * ((sc - tc) ** 2).mean(-1)).sum() / occupied.sum().clamp_min(1.0)
            sigma = density_range_error(ss, ts, tuple(self.config.sigma_clip)).pow(2).mean()
            return {"pvd_sigma": self.config.pvd_weight * sigma,
                    "pvd_color": self.config.pvd_weight * color}  # fmt: skip

        def get_loss_dict(self, outputs, batch, metrics_dict=None):
            image = batch["image"][..., :3].to(outputs["rgb"])
            losses = {"rgb_loss": torch.mean((outputs["rgb"] - image) ** 2)}
            if self.teacher is not None:
                losses.update(self._pvd_terms())
            return losses

        def get_image_metrics_and_images(self, outputs, batch):
            metrics = {k: float(v) for k, v in self.get_metrics_dict(outputs, batch).items()}
            images = {"img": torch.cat([batch["image"][..., :3].to(outputs["rgb"]),
                                        outputs["rgb"]], dim=1)}  # fmt: skip
            return metrics, images

    class FewstepSDSModel(FewstepFieldModel):
        """SDS on one full random-camera image per step (the ray bundle's (H, W) layout)."""

        def populate_modules(self):
            from fewstep.threed.prior import PriorAdapter
            from fewstep.threed.recipes.score import get_prior
            from fewstep.threed.score import make_score
            from fewstep.threed.score.sds import SDSConfig

            super().populate_modules()
            self.adapter = PriorAdapter(get_prior(self.config.prior))
            cfg = SDSConfig(guidance_scale=self.config.guidance_scale)
            self.sds = make_score("sds", self.adapter, cfg, seed=0)
            self.sds_step = 0

        def get_loss_dict(self, outputs, batch, metrics_dict=None):
            rgb = outputs["rgb"]
            if rgb.dim() == 2:  # (H * W, 3) from a flattened bundle of one square image
                side = int(round(rgb.shape[0] ** 0.5))
                if side * side != rgb.shape[0]:
                    raise ValueError(
                        f"fewstep-sds needs one full image per step, got {rgb.shape[0]} rays"
                    )
                rgb = rgb.reshape(side, side, 3)
            label = torch.tensor([self.config.label], device=rgb.device)
            self.sds_step += 1
            x = self.adapter.to_prior(rgb[None])  # (1, C, S, S) in the prior's image space
            losses, _ = self.sds.loss(x, label, self.sds_step, self.config.sds_steps)
            return {"sds_loss": losses["scene"]}

    return {
        "FewstepFieldModelConfig": FewstepFieldModelConfig,
        "FewstepFieldModel": FewstepFieldModel,
        "FewstepSDSModel": FewstepSDSModel,
    }


def _trainer(method: str, model_config, datamanager, steps: int):
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.engine.optimizers import AdamOptimizerConfig
    from nerfstudio.engine.trainer import TrainerConfig
    from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig

    return TrainerConfig(
        method_name=method,
        steps_per_eval_batch=500,
        steps_per_save=2000,
        max_num_iterations=steps,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(datamanager=datamanager, model=model_config),
        optimizers={
            # TensoRF / Instant-NGP rate for grids; fewstep fields put all in one group here.
            "fields": {"optimizer": AdamOptimizerConfig(lr=1e-2, eps=1e-15), "scheduler": None}
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 14),
        vis="viewer",
    )


def _pvd_spec():
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.plugins.types import MethodSpecification

    cls = _build_classes()
    dm = VanillaDataManagerConfig(
        dataparser=NerfstudioDataParserConfig(),
        train_num_rays_per_batch=4096,
        eval_num_rays_per_batch=4096,
    )
    model = cls["FewstepFieldModelConfig"]()
    return MethodSpecification(
        config=_trainer("fewstep-pvd", model, dm, 30000), description=METHODS["fewstep-pvd"][1]
    )


def _sds_spec():
    from nerfstudio.data.datamanagers.random_cameras_datamanager import (
        RandomCamerasDataManagerConfig,
    )
    from nerfstudio.plugins.types import MethodSpecification

    cls = _build_classes()
    model = cls["FewstepFieldModelConfig"](_target=cls["FewstepSDSModel"], field="mlp")
    return MethodSpecification(
        config=_trainer("fewstep-sds", model, RandomCamerasDataManagerConfig(), 10000),
        description=METHODS["fewstep-sds"][1],
    )


# Attribute -> builder of its MethodSpecification (called on first access).
_BUILDERS: dict[str, Callable[[], Any]] = {"fewstep_pvd": _pvd_spec, "fewstep_sds": _sds_spec}
_BUILT: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """PEP 562: build ``fewstep_pvd`` / ``fewstep_sds`` on first access (imports nerfstudio)."""
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _require_nerfstudio()
        _BUILT[name] = _BUILDERS[name]()
    return _BUILT[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BUILDERS))
