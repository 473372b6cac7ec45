"""VSD (ProlificDreamer eqs. 9-10): gradient parity, the critic learns, camera conditioning."""

from __future__ import annotations

import pytest
import torch

from fewstep.threed.prior import PriorAdapter, TimeSchedule
from fewstep.threed.score import VSD, VSDConfig
from fewstep.threed.score.vsd import camera_features

pytestmark = pytest.mark.usefixtures("single_thread")


def _cameras(n: int) -> torch.Tensor:
    from fewstep.threed.cameras import orbit_cameras

    return orbit_cameras(n, 2.5, 10.0, 40.0, 16).camera_to_world


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter (LoRA B starts at zero, so the critic equals the prior)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def test_vsd_gradient_is_w_times_prior_minus_critic_eps(score_target_prior):
    ad = PriorAdapter(score_target_prior)
    cfg = VSDConfig(guidance_scale=2.0, schedule=TimeSchedule("uniform"))
    vsd = VSD(ad, cfg)
    _perturb(vsd.critic)
    g0 = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g0).requires_grad_(True)
    cond, cams = torch.tensor([0, 1, 0]), _cameras(3)
    losses, logs = vsd.loss(x, cond, 0, 10, camera=cams, generator=torch.Generator().manual_seed(4))
    losses["scene"].backward()

    g = torch.Generator().manual_seed(4)  # replay: fractions (B,), then eps
    frac = 0.02 + 0.96 * torch.rand(3, generator=g)
    eps = torch.randn(3, 1, 8, 8, generator=g)
    a, s = (1 - frac).reshape(-1, 1, 1, 1), frac.reshape(-1, 1, 1, 1)
    x_t = a * x.detach() + s * eps
    tg = score_target_prior.denoiser.net.targets
    eps_prior = (x_t - a * (tg[2] + 2.0 * (tg[cond] - tg[2]))) / s  # CFG 2 on the target prior
    with torch.no_grad():  # the critic's x0 through its own network, converted by hand
        x0_c = vsd.critic(x_t, frac, {"cond": cond, "camera": camera_features(cams)})
    eps_critic = (x_t - a * x0_c) / s
    w = s * s / (a * a + s * s)
    torch.testing.assert_close(x.grad * 3, w * (eps_prior - eps_critic))
    assert not torch.allclose(eps_critic, (x_t - a * tg[cond]) / s)  # the critic is not the prior
    assert losses["critic"].requires_grad and logs["critic_loss"] > 0


def test_critic_starts_as_the_prior_and_reads_the_camera(score_target_prior):
    ad = PriorAdapter(score_target_prior)
    vsd = VSD(ad, VSDConfig())
    assert vsd.critic.mode == "input"  # the target prior has no time embedding
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([0, 1])
    cams = camera_features(_cameras(2))
    out = vsd.critic.predict(x, t, {"cond": cond, "camera": cams}, kind="x0")
    torch.testing.assert_close(out, score_target_prior.denoiser.predict(x, t, cond, kind="x0"))
    _perturb(vsd.critic, 1)
    a = vsd.critic(x, t, {"cond": cond, "camera": cams})
    b = vsd.critic(x, t, {"cond": cond, "camera": cams.flip(0)})
    assert not torch.allclose(a, b)
    trainable = vsd.role_parameters()["critic"]
    assert trainable and all(p.requires_grad for p in trainable)
    assert not any(p.requires_grad for p in score_target_prior.denoiser.parameters())


def test_critic_learns_its_denoising_loss(score_target_prior):
    """Eq. 10 on fixed detached renders: the critic's loss on one fixed draw falls."""
    ad = PriorAdapter(score_target_prior)
    vsd = VSD(ad, VSDConfig(camera_dropout=0.0))
    opt = torch.optim.Adam(vsd.role_parameters()["critic"], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g).clamp(-1, 1)
    cond, cams = torch.tensor([0, 1, 0, 1]), _cameras(4)

    def critic_loss(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return vsd.loss(x, cond, 0, 10, camera=cams, generator=gen)[0]["critic"]

    with torch.no_grad():
        probe = [critic_loss(1000 + i).item() for i in range(4)]
    for step in range(60):
        loss = critic_loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = [critic_loss(1000 + i).item() for i in range(4)]
    assert sum(after) < 0.7 * sum(probe)


def test_camera_embedding_goes_through_a_diffusers_time_embedding():
    """A diffusers UNet prior: the camera MLP is added to the time embedding by a hook."""
    UNet2DModel = pytest.importorskip("diffusers").UNet2DModel  # noqa: N806 - a class

    from fewstep.core.models import DiffusersUNetDenoiser
    from fewstep.core.paths import RectifiedFlow
    from fewstep.core.priors import Prior2D

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, num_class_embeds=3,
    )  # fmt: skip
    den = DiffusersUNetDenoiser(unet, RectifiedFlow(), "velocity").eval().requires_grad_(False)
    prior = Prior2D(den, 1, 8, null_cond=lambda c: torch.full_like(c, 2))
    vsd = VSD(PriorAdapter(prior), VSDConfig(lora_rank=2))
    assert vsd.critic.mode == "time_embedding"
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([0, 1])
    cams = camera_features(_cameras(2))
    with torch.no_grad():
        torch.testing.assert_close(
            vsd.critic(x, t, {"cond": cond, "camera": cams}), den(x, t, cond)
        )
        torch.nn.init.normal_(vsd.critic.camera_mlp[-1].weight)
        a = vsd.critic(x, t, {"cond": cond, "camera": cams})
        b = vsd.critic(x, t, {"cond": cond, "camera": cams.flip(0)})
    assert not torch.allclose(a, b)


def test_bad_inputs_are_named(score_target_prior):
    ad = PriorAdapter(score_target_prior)
    with pytest.raises(ValueError, match="lora_rank"):
        VSD(ad, VSDConfig(lora_rank=0))
    with pytest.raises(ValueError, match="camera-to-world"):
        camera_features(torch.zeros(2, 3, 4))
    vsd = VSD(ad, VSDConfig())
    with pytest.raises(ValueError, match="camera"):
        vsd.critic(torch.zeros(1, 1, 8, 8), torch.tensor([0.5]), torch.tensor([0]))
