"""image-latent with HiPA (one-step LoRA adaptation, Zhang & Hooi 2023), and the recipe's
refusal of objectives it cannot feed (a reward model)."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli
from fewstep.image import pipelines as P
from fewstep.image.recipes.latent import HIPA_LORA_RANK, LORA_DIR, PIPELINE_DIR

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny diffusers models run far faster on one intra-op thread (and -n 2 runs two
    workers on two cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from fewstep.image.tiny import sd_pipeline

    root = tmp_path_factory.mktemp("hipa")
    sd_pipeline(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _args(root, out, *extra: str) -> list[str]:
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(root / "sd")]
    args += ["--prompts", str(root / "prompts.txt"), "--train.batch_size", "2"]
    args += ["--teacher-steps", "2", "--sample-prompts", "2", "--train.progress", "false"]
    return [*args, *extra]


@pytest.fixture(scope="module")
def hipa_run(teacher_folder, cache_dir):
    out = teacher_folder / "run"
    extra = ["--objective", "hipa", "--objective.teacher_steps", "3", "--train.steps", "3"]
    extra += ["--train.lr", "1e-3"]
    assert cli.main(_args(teacher_folder, out, *extra)) == 0
    return out


def test_hipa_defaults_to_a_lora_student_and_exports_a_one_step_pipeline(hipa_run, teacher_folder):
    from diffusers import DiffusionPipeline, LCMScheduler

    run_cfg = json.loads((hipa_run / "config.json").read_text())
    assert run_cfg["config"]["lora_rank"] == HIPA_LORA_RANK  # the recipe's HiPA default
    assert run_cfg["objective_config"]["teacher_steps"] == 3
    m = json.loads((hipa_run / "metrics.json").read_text())
    assert m["student_nfe"] == 1
    assert P.pipeline_kwargs(hipa_run / PIPELINE_DIR) == {"num_inference_steps": 1}
    assert (hipa_run / LORA_DIR).exists()
    logs = [json.loads(line) for line in (hipa_run / "log.jsonl").read_text().splitlines()]
    logged = [r for r in logs if "hipa_hf" in r]
    assert logged and all(r["hipa_hf"] > 0 and r["hipa_spatial"] > 0 for r in logged)

    folder = hipa_run / PIPELINE_DIR
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe.scheduler, LCMScheduler)
    teacher = P.load_pipeline(teacher_folder / "sd")
    # only the adapted attention projections moved (merged LoRA): the base stayed frozen
    net, base = pipe.unet, teacher.unet
    changed = {
        k
        for (k, a), b in zip(net.state_dict().items(), base.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    }
    targets = tuple(f"{t}.weight" for t in P.LORA_TARGETS)
    assert changed and all(k.endswith(targets) for k in changed), sorted(changed)[:5]
    # the reloaded pipeline samples in one step, and that step is the student's x0 at t_max
    g = torch.Generator().manual_seed(3)
    images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, generator=g,
                  output_type="latent").images  # fmt: skip
    assert images.shape == (2, *P.latent_shape(pipe)) and torch.isfinite(images).all()
    noise = torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(3))
    student = P.teacher_denoiser(pipe)
    with torch.no_grad():
        want = student.predict(
            noise, torch.full((2,), student.path.t_max), P.encode_prompts(pipe, PROMPTS)
        )
    torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)


def test_hipa_loss_acts_on_decoded_images_through_the_vae(teacher_folder):
    from fewstep.core.models import GuidedDenoiser
    from fewstep.core.objectives.hipa import HiPAConfig
    from fewstep.image.recipes.latent import LatentConfig, make_objective, setup_hipa

    pipe = P.load_pipeline(teacher_folder / "sd")
    null = P.encode_prompts(pipe, [""])
    teacher = GuidedDenoiser(P.teacher_denoiser(pipe), 1.0, lambda c: null.expand_as(c))
    obj = make_objective("hipa", teacher, HiPAConfig(teacher_steps=2))
    setup_hipa(LatentConfig(lora_rank=4), pipe, obj)
    assert obj.decode_fn is not None
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    lat = 0.1 * torch.randn(2, *P.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    lat.requires_grad_(True)
    img = obj.decode_fn(lat)
    torch.testing.assert_close(img.clamp(-1, 1), P.decode(pipe, lat.detach()))
    img.square().mean().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    # pixel_space off: no decoder, the loss stays on the latents
    off = make_objective("hipa", teacher, HiPAConfig(pixel_space=False))
    setup_hipa(LatentConfig(lora_rank=4), pipe, off)
    assert off.decode_fn is None


def test_hipa_refuses_full_weight_training(teacher_folder, cache_dir, capsys):
    out = teacher_folder / "full"
    args = _args(teacher_folder, out, "--objective", "hipa", "--lora-rank", "0")
    assert cli.main([*args, "--train.steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "'hipa' trains low-rank adapters only" in err and "--lora-rank" in err
    args = _args(teacher_folder, out, "--objective", "hipa", "--objective.lora_rank", "4")
    assert cli.main([*args, "--train.steps", "1"]) == 2
    assert "use --lora-rank, not --objective.lora_rank" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["pso", "flash_dmd", "distillation_dpo"])
def test_objectives_that_need_a_reward_are_refused(name, teacher_folder, cache_dir, capsys):
    out = teacher_folder / f"refused-{name}"
    assert cli.main(_args(teacher_folder, out, "--objective", name, "--train.steps", "1")) == 2
    err = capsys.readouterr().err
    assert f"image-latent cannot run objective {name!r}" in err
    assert "reward function" in err and "no reward model" in err
    assert not (out / "checkpoints").exists() and not (out / PIPELINE_DIR).exists()


def test_pso_without_a_reward_but_offline_pairs_asks_for_images(teacher_folder, cache_dir, capsys):
    """Offline PSO needs no reward (data beats the student's own sample), so it is not
    refused for one; it needs images, which prompts alone do not give."""
    out = teacher_folder / "pso-offline"
    args = _args(teacher_folder, out, "--objective", "pso", "--objective.pairs", "offline")
    assert cli.main([*args, "--train.steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs real images" in err and "reward" not in err
