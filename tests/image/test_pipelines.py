"""Teachers from diffusers pipeline folders and students exported back to them, on tiny
pipelines built from configs (see tiny_pipelines.py)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli
from fewstep.core.paths import VPDiscrete
from fewstep.core.samplers import DiffusersSampler
from fewstep.image import pipelines as P
from fewstep.image.recipes.latent import LORA_DIR, PIPELINE_DIR
from fewstep.image.tiny import sd3_pipeline, sd_pipeline

PROMPTS = ["a red circle", "a blue square", "seven", "a cat on a mat"]


BUILDERS = {"sd": sd_pipeline, "sd3": sd3_pipeline}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pipe_folder(request, tmp_path_factory):
    """A saved tiny pipeline of each type: SD-style UNet on DDPM, SD3-style flow transformer."""
    folder = tmp_path_factory.mktemp("pipes") / request.param
    BUILDERS[request.param](folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    f.write_text("# tiny prompt set\n" + "\n".join(PROMPTS) + "\n\n")
    return f


def test_path_and_prediction_follow_the_scheduler():
    path, kind = P.path_from_scheduler(
        {
            "_class_name": "DDPMScheduler",
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": "v_prediction",
        }  # fmt: skip
    )
    assert isinstance(path, VPDiscrete) and kind == "v" and path.schedule == "scaled_linear"
    path, kind = P.path_from_scheduler(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    )
    assert path.name == "rectified_flow" and kind == "velocity"
    assert float(path.network_time(torch.tensor(0.25))) == 250.0  # sigma * 1000, as SD3
    with pytest.raises(ValueError, match="prediction_type"):
        P.path_from_scheduler({"prediction_type": "flux"})


def test_not_a_pipeline_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        P.load_pipeline(tmp_path)


def test_teacher_samples_like_its_own_pipeline(pipe_folder):
    """The wrapped denoiser under fewstep's diffusers sampler reproduces the pipeline's own
    latents (DDIM for the UNet, flow-matching Euler for the transformer) from the same
    initial latents and prompt embeddings."""
    from diffusers import DDIMScheduler

    pipe = P.load_pipeline(pipe_folder)
    teacher = P.teacher_denoiser(pipe)
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    if P.network_name(pipe) == "unet":
        assert teacher.prediction == "eps" and teacher.path.beta_end == 0.012
        assert cond.shape[:2] == (2, 16)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        embeds = {"prompt_embeds": cond}
    else:
        assert teacher.prediction == "velocity" and teacher.path.name == "rectified_flow"
        assert cond["pooled_projections"].shape == (2, 64)
        embeds = {
            "prompt_embeds": cond["encoder_hidden_states"],
            "pooled_prompt_embeds": cond["pooled_projections"],
        }
    latents = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    want = pipe(
        **embeds, latents=latents, num_inference_steps=4, guidance_scale=1.0, output_type="latent"
    ).images
    ours = DiffusersSampler(type(pipe.scheduler).from_config(pipe.scheduler.config), steps=4)
    got = ours.sample(teacher, latents, cond)
    assert got.nfe == 4
    torch.testing.assert_close(got.x, want, rtol=1e-4, atol=1e-5)


def test_v_prediction_unet_teacher_samples_like_its_own_pipeline(tmp_path):
    from diffusers import DDIMScheduler

    pipe = sd_pipeline(tmp_path / "sd-v", prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    teacher = P.teacher_denoiser(pipe)
    assert teacher.prediction == "v"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    latents = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pipe(
            prompt_embeds=cond, latents=latents, num_inference_steps=3, guidance_scale=1.0,
            output_type="latent",
        ).images  # fmt: skip
    got = DiffusersSampler(DDIMScheduler.from_config(pipe.scheduler.config), steps=3)
    torch.testing.assert_close(got.sample(teacher, latents, cond).x, want, rtol=1e-4, atol=1e-5)


def test_transformer_features_are_the_middle_blocks_image_tokens(tmp_path):
    from fewstep.image.tiny import sd3_pipeline as build

    pipe = build(tmp_path / "sd3-features")
    den = P.teacher_denoiser(pipe)
    middle = pipe.transformer.transformer_blocks[1]  # of 2
    seen: list = []
    hook = middle.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(2))
    cond, t = P.encode_prompts(pipe, PROMPTS[:2]), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        den(x, t, cond)
        full = seen.pop()[1].mean(dim=1)  # (text, image) streams of the middle block
        hook.remove()
        pipe.transformer.norm_out.register_forward_hook(lambda m, i, o: seen.append(o))
        f = den.features(x, t, cond)
    assert f.shape == (2, 32) and not seen  # what follows the middle block never ran
    torch.testing.assert_close(f, full)


def test_prompt_embeddings_are_cached(pipe_folder, cache_dir):
    """Tensors (SD) and dicts of tensors (SD3) come back from the cache as encoded."""
    from fewstep.image.prompts import cached_embeddings

    def files():
        return set((cache_dir / "prompt-embeddings").glob("*.safetensors"))

    pipe = P.load_pipeline(pipe_folder)
    first = cached_embeddings(pipe, PROMPTS, str(pipe_folder))
    before = files()
    again = cached_embeddings(pipe, PROMPTS, str(pipe_folder))
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, P.encode_prompts(pipe, PROMPTS))
    assert files() == before  # read back, not written again
    cached_embeddings(pipe, PROMPTS[:2], str(pipe_folder))  # another prompt set: another file
    assert len(files() - before) == 1


def run_latent(out, teacher, *options: str):
    """`fewstep distill image-latent` for 4 steps of batch 2, with ``options``."""
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(teacher)]
    args += ["--train.steps", "4", "--train.batch_size", "2", "--teacher-steps", "2"]
    assert cli.main([*args, "--sample-prompts", "2", "--train.progress", "false", *options]) == 0
    return out


@pytest.fixture(scope="module")
def latent_run(pipe_folder, prompt_file, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run") / "latent"
    # the fake score starts as the teacher, so the first student update is zero: two more
    fake = ["--objective.fake_updates_per_student", "1"]
    return run_latent(out, pipe_folder, "--prompts", str(prompt_file), *fake)


def test_distilled_student_exports_as_a_diffusers_pipeline(latent_run, pipe_folder):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LCMScheduler

    files = ("metrics.json", "report.html", "teacher_samples.png", "student_samples.png")
    for name in (*files, "teacher_x0_trajectory.png", "prompts.txt"):
        assert (latent_run / name).exists(), name
    cfg = json.loads((latent_run / "config.json").read_text())
    assert cfg["config"]["train"]["betas"] == [0.0, 0.99]  # the recipe's DMD2 setting
    m = json.loads((latent_run / "metrics.json").read_text())
    assert m["student_nfe"] == 1 and m["teacher_nfe"] == 2
    assert P.pipeline_kwargs(latent_run / PIPELINE_DIR) == {"num_inference_steps": 1}

    folder = latent_run / PIPELINE_DIR
    # stock diffusers loading (the tiny SD3 has no T5 encoder: diffusers wants it named None)
    pipe = DiffusionPipeline.from_pretrained(str(folder), **P.absent_components(folder))
    name = P.network_name(pipe)
    few_step = LCMScheduler if name == "unet" else FlowMatchEulerDiscreteScheduler
    assert isinstance(pipe.scheduler, few_step)
    teacher = P.load_pipeline(pipe_folder)
    moved = [
        float((a - b).abs().max().detach())
        for a, b in zip(
            getattr(pipe, name).parameters(), getattr(teacher, name).parameters(), strict=True
        )
    ]
    assert max(moved) > 0  # the student's weights, not the teacher's

    def one_step(p):
        g = torch.Generator().manual_seed(3)
        return p(PROMPTS[:2], num_inference_steps=1, guidance_scale=1.0, generator=g,
                 output_type="latent").images  # fmt: skip

    # a second load samples identically; the one step is the student's x0 prediction at
    # t_max from the pipeline's unit noise (LCM's c_skip at t = 999 is ~1e-9; the flow
    # scheduler's Euler jump from sigma 1 to 0 is exactly x - v)
    again = DiffusionPipeline.from_pretrained(str(folder), **P.absent_components(folder))
    torch.testing.assert_close(one_step(pipe), one_step(again))
    noise = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    student = P.teacher_denoiser(pipe)
    t_max = torch.full((2,), student.path.t_max)
    with torch.no_grad():
        want = student.predict(noise, t_max, P.encode_prompts(pipe, PROMPTS[:2]))
    torch.testing.assert_close(one_step(pipe), want, rtol=1e-4, atol=1e-4)


def test_sample_eval_report_commands_on_a_latent_run(latent_run):
    out = latent_run / "s.png"
    assert cli.main(["sample", str(latent_run), "--n", "3", "--out", str(out)]) == 0
    assert out.exists()
    assert cli.main(["eval", str(latent_run)]) == 0
    assert cli.main(["report", str(latent_run)]) == 0
    assert "Student samples" in (latent_run / "report.html").read_text()


def test_latent_recipe_bad_input_is_a_clear_error(capsys, pipe_folder, prompt_file, tmp_path):
    assert cli.main(["distill", "image-latent", "--train.steps", "1"]) == 2
    assert "--teacher PATH" in capsys.readouterr().err
    args = ["distill", "image-latent", "--teacher", str(pipe_folder), "--out", str(tmp_path)]
    assert cli.main([*args, "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "prompt file" in capsys.readouterr().err
    gan = ["--prompts", str(prompt_file), "--objective.gan_weight", "0.1"]
    assert cli.main([*args, *gan]) == 2
    assert "needs real images" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lora_run(pipe_folder, prompt_file, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run") / "lora"
    args = ["--prompts", str(prompt_file), "--objective.fake_updates_per_student", "1"]
    args += ["--lora-rank", "4", "--objective.fake_lora_rank", "4"]  # a LoRA fake score too
    args += ["--train.lr", "1e-3", "--guidance-scale", "1.5", "--guidance-max", "3"]
    return run_latent(out, pipe_folder, *args)


def test_lora_student_trains_adapters_only_and_exports_merged_and_adapter_only(
    lora_run, pipe_folder
):
    from diffusers import DiffusionPipeline

    folder = lora_run / PIPELINE_DIR
    merged = DiffusionPipeline.from_pretrained(str(folder), **P.absent_components(folder))
    teacher = P.load_pipeline(pipe_folder)
    name = P.network_name(teacher)
    net, base = getattr(merged, name), getattr(teacher, name)
    assert not P.has_lora(net)  # a plain network: the adapters are folded in
    changed = {
        k
        for (k, a), b in zip(net.state_dict().items(), base.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    }
    targets = tuple(f"{t}.weight" for t in P.LORA_TARGETS)
    assert changed and all(k.endswith(targets) for k in changed), sorted(changed)[:5]

    # the adapters alone, loaded onto the teacher's pipeline the diffusers way, give the
    # merged network's predictions
    teacher.load_lora_weights(str(lora_run / LORA_DIR))
    x = torch.randn(2, *P.latent_shape(teacher), generator=torch.Generator().manual_seed(5))
    cond = P.encode_prompts(teacher, PROMPTS[:2])
    t = torch.full((2,), 0.5 * P.teacher_denoiser(teacher).path.t_max)
    with torch.no_grad():
        via_adapter = P.teacher_denoiser(teacher)(x, t, cond)
        via_merged = P.teacher_denoiser(merged)(x, t, cond)
    torch.testing.assert_close(via_adapter, via_merged, rtol=1e-4, atol=1e-5)
    run_cfg = json.loads((lora_run / "config.json").read_text())
    cfg, obj_cfg = run_cfg["config"], run_cfg["objective_config"]
    assert cfg["lora_rank"] == 4 and cfg["guidance_max"] == 3.0
    assert obj_cfg["fake_lora_rank"] == 4 and obj_cfg["fake_lora_targets"] == list(P.LORA_TARGETS)
    assert json.loads((lora_run / "metrics.json").read_text())["teacher_nfe"] == 4  # CFG: 2/step


def test_multi_step_export_samples_on_the_training_grid(pipe_folder, tmp_path):
    """A 2-step student's exported pipeline runs the steps fewstep trains: LCM's own
    timesteps (999, 499) on the DDPM path; on flow matching the recorded sigmas (1, 0.5),
    where the stochastic flow-Euler scheduler reproduces fewstep's few-step sampler (x0,
    then re-noise with fresh noise) given the same noise draws."""
    from fewstep.core.samplers import FewStepSampler

    pipe = P.load_pipeline(pipe_folder)
    name = P.network_name(pipe)
    times = P.student_times(pipe, 2)
    folder = P.export_student(pipe, getattr(pipe, name), tmp_path / "two-step", times)
    student = P.load_pipeline(folder)
    call = P.pipeline_kwargs(folder)
    cond = P.encode_prompts(pipe, PROMPTS[:2])
    if name == "unet":
        assert times == (1.0, 499 / 999) and call == {"num_inference_steps": 2}
        student.scheduler.set_timesteps(2)
        assert student.scheduler.timesteps.tolist() == [999, 499]
        return
    assert times == (1.0, 0.5) and call == {"num_inference_steps": 2, "sigmas": [1.0, 0.5]}
    embeds = {
        "prompt_embeds": cond["encoder_hidden_states"],
        "pooled_prompt_embeds": cond["pooled_projections"],
    }
    # the pipeline draws its initial latents from `generator` and the scheduler's step noise
    # from the global RNG
    torch.manual_seed(11)
    got = student(
        **embeds, guidance_scale=1.0, generator=torch.Generator().manual_seed(4),
        output_type="latent", **call,
    ).images  # fmt: skip
    noise = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)
    want = FewStepSampler(times).sample(P.teacher_denoiser(student), noise, cond)
    torch.testing.assert_close(got, want.x, rtol=1e-4, atol=1e-5)


def test_lora_needs_a_positive_rank(pipe_folder):
    pipe = P.load_pipeline(pipe_folder)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        P.add_lora(getattr(pipe, P.network_name(pipe)), 0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six captioned 20x24 PNGs, a broken one and one without a caption."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(PROMPTS[i % len(PROMPTS)])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a broken file")
    Image.fromarray(arr).save(folder / "uncaptioned.png")
    return folder


def test_image_folder_reads_captioned_images_and_names_what_it_skips(image_dir, caplog):
    from fewstep.image.images import read_image_folder

    data = read_image_folder(image_dir, 16)
    assert data.images.shape == (6, 3, 16, 16) and data.captions[:2] == PROMPTS[:2]
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert len(data.skipped) == 2 and "broken.png" in data.skipped[0]
    assert "uncaptioned.png (no uncaptioned.txt)" in data.skipped
    assert "skipped 2 of 8 images" in caplog.text
    with pytest.raises(ValueError, match="no usable images"):
        read_image_folder(image_dir / "..", 16)


def test_webdataset_shards_read_like_the_folder(image_dir, tmp_path, caplog):
    """The same captioned images packed as two tar shards (webdataset layout: ``key.png`` +
    ``key.txt`` per sample) read back identically, skipping what the folder skips."""
    import tarfile

    from fewstep.image.images import read_image_folder

    keys = sorted({p.name.split(".")[0] for p in image_dir.iterdir()})
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate((keys[:4], keys[4:])):  # a sample's files stay in one shard
        with tarfile.open(shards / f"train-{i:03d}.tar", "w") as tar:
            for path in sorted(p for p in image_dir.iterdir() if p.name.split(".")[0] in part):
                tar.add(path, arcname=path.name)
    folder, packed = read_image_folder(image_dir, 16), read_image_folder(shards, 16)
    torch.testing.assert_close(packed.images, folder.images)
    assert packed.captions == folder.captions and len(packed.skipped) == 2
    assert any("broken.png" in s for s in packed.skipped)
    one = read_image_folder(shards / "train-000.tar", 16)  # a single shard
    assert 0 < len(one.captions) < len(folder.captions)
    (shards / "train-002.tar").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="train-002.tar is not a readable tar shard"):
        read_image_folder(shards, 16)


def test_data_based_distillation_with_the_gan_term(pipe_folder, image_dir, tmp_path, cache_dir):
    """Objectives that need real data (DMD2's GAN term) run on VAE latents of the images;
    the GAN head sits on the UNet's mid block or the transformer's middle block."""
    from fewstep.image.images import cached_latents, encode_images, read_image_folder

    pipe = P.load_pipeline(pipe_folder)
    latents, captions = cached_latents(pipe, image_dir, 16, str(pipe_folder))
    assert latents.shape == (6, *P.latent_shape(pipe)) and captions[0] == PROMPTS[0]
    images = read_image_folder(image_dir, 16).images
    torch.testing.assert_close(latents, encode_images(pipe, images))
    with torch.no_grad():  # decode undoes the shift and scale: the VAE's own round trip
        direct = pipe.vae.decode(pipe.vae.encode(images[:2]).latent_dist.mean).sample
    torch.testing.assert_close(P.decode(pipe, latents[:2]), direct.clamp(-1, 1), atol=1e-4, rtol=0)
    out = run_latent(
        tmp_path / "run", pipe_folder, "--images", str(image_dir), "--objective.gan_weight", "0.1"
    )
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("gan_critic" in r for r in log)
    assert (out / "prompts.txt").read_text().splitlines()[0] == PROMPTS[0]
