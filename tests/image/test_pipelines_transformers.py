"""PixArt-, SANA- and Flux-style teachers from saved diffusers folders: their denoiser adapters
reproduce each pipeline's own sampling loop, and `fewstep distill image-latent` distils,
exports, reloads and samples them (tiny pipelines built from configs, see tiny.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli
from fewstep.core.samplers import DiffusersSampler
from fewstep.image import pipelines as P
from fewstep.image.recipes.latent import PIPELINE_DIR
from fewstep.image.tiny import flux_pipeline, pixart_pipeline, sana_pipeline
from fewstep.image.transformer_adapters import (
    FLUX_GUIDANCE,
    drop_learned_sigma,
    image_ids,
    pack_latents,
    unpack_latents,
)

PROMPTS = ["a red circle", "a blue square", "seven", "a cat on a mat"]
BUILDERS = {"pixart": pixart_pipeline, "sana": sana_pipeline, "flux": flux_pipeline}
RESOLUTION = {"pixart": 0, "sana": 0, "flux": 16}  # Flux has no size of its own


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tpipe_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tpipes") / request.param
    BUILDERS[request.param](folder)
    return folder


def _kind(folder) -> str:
    return folder.name


def _shape(pipe, kind):
    return P.latent_shape(pipe, RESOLUTION[kind] or None)


def _embeds(kind, cond) -> dict:
    """The pipeline's own keyword arguments for precomputed prompt embeddings."""
    if kind == "flux":
        return {
            "prompt_embeds": cond["encoder_hidden_states"],
            "pooled_prompt_embeds": cond["pooled_projections"],
        }
    return {
        "prompt_embeds": cond["encoder_hidden_states"],
        "prompt_attention_mask": cond["encoder_attention_mask"],
    }


class _Sigmas:
    """A scheduler whose ``set_timesteps(n)`` uses fixed sigmas (FluxPipeline passes its
    own ``linspace(1, 1/n, n)``; core's sampler asks for the scheduler's default grid)."""

    def __init__(self, scheduler, sigmas):
        self.scheduler, self.sigmas = scheduler, sigmas

    def set_timesteps(self, n, device=None):
        self.scheduler.set_timesteps(sigmas=self.sigmas, device=device)

    def __getattr__(self, name):
        return getattr(self.scheduler, name)


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 6, 8), rtol=0, atol=0)
    # _unpack_latents takes pixel sizes (vae factor 8 here)
    back = FluxPipeline._unpack_latents(tokens, 48, 64, 8)
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), back, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), x, rtol=0, atol=0)
    want = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(6, 8), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even height and width"):
        pack_latents(torch.zeros(1, 4, 5, 8))
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack_latents(tokens, 8, 8)


def test_learned_sigma_keeps_the_prediction_half():
    eps, var = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(drop_learned_sigma(torch.cat([eps, var], 1), 4), eps)
    torch.testing.assert_close(drop_learned_sigma(eps, 4), eps)  # plain outputs pass


def test_dpm_solver_on_flow_prediction_is_rectified_flow():
    """SANA ships DPM-Solver with ``flow_prediction``: a flow path, and a flow student."""
    cfg = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"}
    path, kind = P.path_from_scheduler(cfg)
    assert path.name == "rectified_flow" and kind == "velocity"
    assert P.is_flow_config(cfg) and not P.is_flow_config({"_class_name": "DDIMScheduler"})


def test_pixart_micro_conditions_reach_the_transformer():
    """A 1024-pixel PixArt-alpha (``use_additional_conditions``; its width must divide by 3)
    gets the resolution and aspect ratio its pipeline passes: latent size x pixels per latent."""
    from diffusers import PixArtTransformer2DModel

    from fewstep.core.paths import VPDiscrete
    from fewstep.image.transformer_adapters import LatentTransformerDenoiser

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(
        sample_size=8, num_attention_heads=3, attention_head_dim=8, in_channels=4,
        out_channels=8, num_layers=1, cross_attention_dim=24, caption_channels=8,
        norm_num_groups=4, use_additional_conditions=True,
    ).eval()  # fmt: skip
    den = LatentTransformerDenoiser(net, VPDiscrete(), "eps", pixels_per_latent=8)
    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 5, 8, generator=g), 500
    with torch.no_grad():
        got = den(x, torch.full((2,), t), {"encoder_hidden_states": text})
        added = {
            "resolution": torch.tensor([[64.0, 48.0]] * 2),
            "aspect_ratio": torch.full((2, 1), 8 / 6),
        }
        want = net(x, text, torch.full((2,), float(t)), added_cond_kwargs=added).sample[:, :4]
        wrong = dict(added, resolution=torch.tensor([[8.0, 6.0]] * 2))
        other = net(x, text, torch.full((2,), float(t)), added_cond_kwargs=wrong).sample[:, :4]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, other)  # the resolution matters, so the test can fail


def test_teacher_samples_like_its_own_pipeline(tpipe_folder):
    """The adapter under fewstep's diffusers sampler reproduces the pipeline's own latents
    (PixArt with DDIM on its DDPM table, SANA and Flux with flow-matching Euler) from the
    same initial latents and prompt embeddings: learned sigma, micro-conditions, time
    scaling, packing, position ids and guidance embedding all as the pipeline does them."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    kind = _kind(tpipe_folder)
    pipe = P.load_pipeline(tpipe_folder)
    teacher = P.teacher_denoiser(pipe)
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    latents = torch.randn(2, *_shape(pipe, kind), generator=torch.Generator().manual_seed(0))
    call = {**P.call_kwargs(pipe), "num_inference_steps": 3, "output_type": "latent"}
    call.setdefault("guidance_scale", 1.0)
    if kind == "pixart":
        assert teacher.prediction == "eps" and pipe.transformer.config.out_channels == 8
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        ours = DDIMScheduler.from_config(pipe.scheduler.config)
        start = latents
    elif kind == "sana":
        assert teacher.prediction == "velocity" and teacher.path.name == "rectified_flow"
        ours = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        start = latents
    else:
        assert pipe.transformer.config.guidance_embeds
        assert call["guidance_scale"] == FLUX_GUIDANCE  # the value the adapter embeds
        flat = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_dynamic_shifting=False
        )  # the pipeline's resolution-dependent shift needs its own `mu`
        pipe.scheduler = flat
        ours = _Sigmas(type(flat).from_config(flat.config), [1.0, 2 / 3, 1 / 3])
        call.update(height=16, width=16)
        start = pack_latents(latents)
    want = pipe(**_embeds(kind, cond), latents=start, **call).images
    if kind == "flux":
        want = unpack_latents(want, *latents.shape[-2:])
    got = DiffusersSampler(ours, steps=3).sample(teacher, latents, cond)
    torch.testing.assert_close(got.x, want, rtol=1e-4, atol=1e-5)


def test_flux_guidance_embedding_and_bad_conditions(tmp_path):
    pipe = flux_pipeline(tmp_path / "flux")
    den = P.teacher_denoiser(pipe)
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        default = den(x, t, cond)
        explicit = den(x, t, {**cond, "guidance": torch.full((2,), FLUX_GUIDANCE)})
        other = den(x, t, {**cond, "guidance": torch.full((2,), 1.0)})
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, other)
    with pytest.raises(ValueError, match="Flux needs cond"):
        den(x, t, cond["encoder_hidden_states"])


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tprompts") / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


@pytest.fixture(scope="module")
def trun(tpipe_folder, prompt_file, tmp_path_factory, cache_dir):
    """`fewstep distill image-latent` on each transformer pipeline: 2 DMD2 steps of batch 2
    (one fake-score update before each student update, so the student moves)."""
    kind = _kind(tpipe_folder)
    out = tmp_path_factory.mktemp("trun") / kind
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(tpipe_folder)]
    args += ["--prompts", str(prompt_file), "--train.steps", "2", "--train.batch_size", "2"]
    args += ["--teacher-steps", "2", "--sample-prompts", "1", "--train.progress", "false"]
    args += ["--objective.fake_updates_per_student", "1", "--train.lr", "1e-3"]
    if RESOLUTION[kind]:
        args += ["--resolution", str(RESOLUTION[kind])]
    assert cli.main(args) == 0
    return out


def test_transformer_student_exports_reloads_and_samples(trun, tpipe_folder):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler

    kind = _kind(tpipe_folder)
    folder = trun / PIPELINE_DIR
    m = json.loads((trun / "metrics.json").read_text())
    assert m["student_nfe"] == 1 and (trun / "student_samples.png").exists()
    pipe = DiffusionPipeline.from_pretrained(str(folder))  # stock diffusers loading
    few_step = LCMScheduler if kind == "pixart" else FlowMatchEulerDiscreteScheduler
    assert isinstance(pipe.scheduler, few_step) and not pipe.scheduler.config.use_dynamic_shifting
    teacher = P.load_pipeline(tpipe_folder)
    moved = [
        float((a - b).abs().max().detach())
        for a, b in zip(
            pipe.transformer.parameters(), teacher.transformer.parameters(), strict=True
        )
    ]
    assert max(moved) > 0  # the student's weights, not the teacher's

    call = {**P.call_kwargs(pipe), **P.pipeline_kwargs(folder), "output_type": "latent"}
    call.setdefault("guidance_scale", 1.0)
    if kind == "flux":
        assert call["guidance_scale"] == FLUX_GUIDANCE  # recorded in fewstep_student.json
        call.update(height=16, width=16)
    shape = _shape(pipe, kind)

    def one_step(p):
        out = p(PROMPTS[:2], generator=torch.Generator().manual_seed(3), **call).images
        return unpack_latents(out, *shape[-2:]) if kind == "flux" else out

    again = DiffusionPipeline.from_pretrained(str(folder))
    torch.testing.assert_close(one_step(pipe), one_step(again), rtol=0, atol=0)
    # the one step is the student's x0 prediction at t_max from the pipeline's unit noise
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    student = P.teacher_denoiser(pipe)
    t_max = torch.full((2,), student.path.t_max)
    with torch.no_grad():
        want = student.predict(noise, t_max, P.encode_prompts(pipe, PROMPTS[:2]))
    torch.testing.assert_close(one_step(pipe), want, rtol=1e-4, atol=1e-4)
    if kind == "pixart":  # `fewstep sample` on the run (with PixArt's call defaults)
        out = trun / "s.png"
        assert cli.main(["sample", str(trun), "--n", "2", "--out", str(out)]) == 0
        assert out.exists()


def test_lora_students_save_in_the_pipeline_lora_format(tpipe_folder, tmp_path):
    """SANA / Flux: a LoRA student's adapters, saved the pipeline's way and loaded onto the
    teacher with ``load_lora_weights``, predict as the merged network; PixArt's transformer
    has no diffusers LoRA support, which is a clear error."""
    import copy

    pipe = P.load_pipeline(tpipe_folder)
    net = copy.deepcopy(pipe.transformer)
    if _kind(tpipe_folder) == "pixart":
        with pytest.raises(ValueError, match="no diffusers LoRA support"):
            P.add_lora(net, 2)
        return
    P.add_lora(net, 2)
    torch.manual_seed(0)
    for name, p in net.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect
            p.data.normal_(0, 0.1)
    P.save_lora(pipe, net, tmp_path / "lora")
    shape = _shape(pipe, _kind(tpipe_folder))
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        base = P.teacher_denoiser(pipe)(x, t, cond)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        via_adapter = P.teacher_denoiser(pipe)(x, t, cond)
        pipe.transformer = P.merged(net)
        via_merged = P.teacher_denoiser(pipe)(x, t, cond)
    torch.testing.assert_close(via_adapter, via_merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(via_adapter, base, atol=1e-4)  # the adapters did something
