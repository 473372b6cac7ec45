"""The image-latent recipe's additions: gradient checkpointing, SNOOPI NASA samples,
teacher-first diversity evaluation and FID / KID / CLIP hooks reported absent without weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fewstep.core import cli
from fewstep.image.recipes.latent import enable_gradient_checkpointing


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip


def test_gradient_checkpointing_recomputes_and_keeps_the_gradients():
    from fewstep.core.models import DiffusersUNetDenoiser
    from fewstep.core.paths import VPDiscrete

    plain = _unet().train()
    ckpt = copy.deepcopy(plain)
    fake = DiffusersUNetDenoiser(_unet(), VPDiscrete(), "eps")
    roles = {
        "student": DiffusersUNetDenoiser(ckpt, VPDiscrete(), "eps"),
        "fake_score": torch.nn.ModuleDict({"score": fake}),
    }
    assert enable_gradient_checkpointing(roles) == ["fake_score", "student"]
    assert (
        ckpt.is_gradient_checkpointing
        and roles["fake_score"]["score"].unet.is_gradient_checkpointing
    )
    assert not plain.is_gradient_checkpointing
    g = torch.Generator().manual_seed(1)
    x, t, c = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 16, 32, generator=g),
    )
    calls = {}
    grads = {}
    for name, net in (("plain", plain), ("ckpt", ckpt)):
        calls[name] = 0
        block = net.down_blocks[0].resnets[0]
        hook = block.register_forward_pre_hook(
            lambda *a, n=name: calls.__setitem__(n, calls[n] + 1)
        )
        net.zero_grad()
        net(x, t, c).sample.square().mean().backward()
        hook.remove()
        grads[name] = [p.grad for p in net.parameters()]
    assert calls == {"plain": 1, "ckpt": 2}  # recomputed in backward (until done)
    for a, b in zip(grads["plain"], grads["ckpt"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def options_run(tmp_path_factory, cache_dir):
    from fewstep.image.tiny import sd_pipeline

    root = tmp_path_factory.mktemp("options")
    sd_pipeline(root / "sd")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = root / "run"
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(root / "sd")]
    args += ["--prompts", str(prompts), "--train.steps", "2", "--train.batch_size", "2"]
    args += ["--teacher-steps", "4", "--sample-prompts", "2", "--train.progress", "false"]
    args += ["--objective.fake_updates_per_student", "1", "--gradient-checkpointing", "true"]
    args += ["--nasa-negative-prompt", "blurry", "--nasa-alpha", "0.5"]
    args += ["--diversity-teacher-steps", "2", "--diversity-seeds", "2"]
    args += ["--eval.inception_weights", str(root / "pt_inception.pth")]
    assert cli.main(args) == 0
    return out


def test_recipe_options_reach_the_run(options_run):
    from fewstep.image.eval_hooks import INCEPTION_FILE

    m = json.loads((options_run / "metrics.json").read_text())
    assert m["gradient_checkpointing_roles"] == ["fake_score", "student"]
    assert (options_run / "student_nasa_samples.png").exists()
    # teacher's first 2 of 4 Euler steps reach t = 0.5; the one-step student finishes
    assert (m["hybrid_teacher_nfe"], m["hybrid_student_nfe"], m["hybrid_nfe"]) == (2, 1, 3)
    for k in ("diversity_student", "diversity_hybrid", "diversity_teacher"):
        assert m[k] > 0
    assert m["fid_student_vs_teacher"] is None and m["clip_score_student"] is None
    assert INCEPTION_FILE in m["fid_note"] and "pt_inception.pth" in m["fid_note"]
    assert "clip_folder" in m["clip_note"]
    html = (options_run / "report.html").read_text()
    assert "NASA" in html and "diversity_hybrid" in html
    cfg = json.loads((options_run / "config.json").read_text())["config"]
    assert cfg["eval"]["inception_weights"].endswith("pt_inception.pth")
    out = options_run / "nasa.png"
    assert cli.main(["sample", str(options_run), "--n", "2", "--out", str(out)]) == 0
    assert out.exists()
