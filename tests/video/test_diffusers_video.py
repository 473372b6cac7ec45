"""Wan- and CogVideoX-style diffusers transformers, built tiny from configs, saved with
save_pretrained beside their scheduler, reloaded as core Denoisers on fewstep's
(B, T, C, H, W) layout, and distilled for a step by a core objective."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.paths import RectifiedFlow, VPDiscrete
from fewstep.video.diffusers_video import DiffusersVideoDenoiser, load_video_denoiser

diffusers = pytest.importorskip("diffusers")

B, T, C, H, W, L, D = 2, 3, 4, 8, 8, 5, 16  # batch, latent frames, channels, size, text


def _wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=C,
        out_channels=C, text_dim=D, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip


def _cogvideox(rotary: bool):
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
        time_embed_dim=16, text_embed_dim=D, num_layers=2, sample_width=W, sample_height=H,
        sample_frames=(T - 1) * 4 + 1, patch_size=2, max_text_seq_length=L,
        use_rotary_positional_embeddings=rotary,
    )  # fmt: skip


def _save(folder, transformer, scheduler):
    transformer.save_pretrained(folder / "transformer")
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def _schedulers():
    return {
        "wan": diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        "cogvideox": diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        ),  # fmt: skip
    }


BUILDERS = {
    "wan": _wan,
    "cogvideox": lambda: _cogvideox(False),
    "cogvideox-rope": lambda: _cogvideox(True),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_saved_video_transformer_reloads_as_the_same_denoiser(kind, tmp_path):
    net = BUILDERS[kind]()
    sched = _schedulers()["wan" if kind == "wan" else "cogvideox"]
    den = load_video_denoiser(_save(tmp_path, net, sched))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(B, T, C, H, W, generator=g), torch.randn(B, L, D, generator=g)
    if kind == "wan":
        assert isinstance(den.path, RectifiedFlow) and den.prediction == "velocity"
        t = torch.tensor([0.3, 0.9])
        ref = net(x.transpose(1, 2), t * 1000, text, return_dict=False)[0].transpose(1, 2)
    else:
        assert isinstance(den.path, VPDiscrete) and den.path.zero_snr and den.prediction == "v"
        t = torch.tensor([100.0, 900.0])
        kw = {}
        if kind == "cogvideox-rope":
            from fewstep.video.diffusers_video import cogvideox_rotary

            kw["image_rotary_emb"] = cogvideox_rotary(net, T, H, W, "cpu")
        ref = net(x, text, t, return_dict=False, **kw)[0]
    with torch.no_grad():
        out = den(x, t, text)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_wan_layout_is_permuted_not_reshaped():
    den = DiffusersVideoDenoiser(_wan(), RectifiedFlow(time_scale=1000.0), "velocity")
    x = torch.randn(1, T, C, H, W)
    seen = {}
    hook = den.transformer.patch_embedding.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0])
    )
    with torch.no_grad():
        den(x, torch.tensor([0.5]), torch.randn(1, L, D))
    hook.remove()
    torch.testing.assert_close(seen["x"], x.transpose(1, 2))


def test_video_denoiser_distils_a_step_with_a_core_objective(tmp_path):
    from fewstep.core.models import trainable_copy
    from fewstep.core.objectives import get_objective
    from fewstep.core.training import TensorData, TrainConfig, Trainer

    teacher = load_video_denoiser(_save(tmp_path / "wan", _wan(), _schedulers()["wan"]))
    cls = get_objective("dmd2")
    objective = cls(teacher, cls.config_cls(fake_updates_per_student=1))
    text = torch.randn(4, L, D)
    data = TensorData(torch.randn(4, T, C, H, W), text)
    student = trainable_copy(teacher)
    before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, progress=False, log_every=1)
    trainer = Trainer(objective, student, data, cfg, tmp_path / "run")
    trainer.fit()
    after = list(trainer.roles["student"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_unsupported_folder_and_class_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer/ and scheduler/"):
        load_video_denoiser(tmp_path)
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        DiffusersVideoDenoiser(torch.nn.Linear(2, 2), RectifiedFlow(), "velocity")
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        DiffusersVideoDenoiser(_wan(), RectifiedFlow(), "velocity")(
            torch.randn(2, C, H, W), torch.tensor([0.5, 0.5])
        )
