"""SiDA (``objectives/sida.py``): the adversarial terms against plain references written as
the official code writes them (``nn.BCEWithLogitsLoss``, per-sample weight factor), and a
discriminator trained through the objective that must call real data real and push student
samples towards it; swapping the real / fake labels breaks both (sabotage)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import ModuleDenoiser
from fewstep.core.objectives import get_objective
from fewstep.core.objectives import sida as sida_mod
from fewstep.core.objectives.sida import (
    SiDA,
    SiDAConfig,
    sida_discriminator_loss,
    sida_generator_adv_loss,
    sida_logits,
)
from fewstep.core.paths import RectifiedFlow


def test_generator_adv_loss_matches_the_official_code():
    g = torch.Generator().manual_seed(0)
    b, n = 4, 6
    x = torch.randn(b, n, 3, generator=g)
    y_real = torch.randn(b, n, 3, generator=g)
    logits = (8 * torch.randn(b, n, generator=g)).requires_grad_(True)  # some beyond the clamp
    loss = sida_generator_adv_loss(x, y_real, logits, clamp=10.0)
    (grad,) = torch.autograd.grad(loss, logits)

    # reference: generator_share_encoder_loss, then the loop's .mean(dims) * numel, sum / B
    ref_logits = logits.detach().clone().requires_grad_(True)
    bce = nn.BCEWithLogitsLoss()(ref_logits.clamp(-10, 10), torch.ones(b, n))
    per_sample = [bce / (x[i] - y_real[i]).abs().mean() for i in range(b)]
    ref = sum(per_sample) / b
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-7)
    assert (grad[logits.detach().abs() > 10] == 0).all()  # clamped logits get no gradient


def test_discriminator_loss_and_logits_match_reference():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    bce = nn.BCEWithLogitsLoss()
    ref = (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))) / 2
    assert sida_discriminator_loss(real, fake).item() == pytest.approx(ref.item(), rel=1e-6)
    feats = torch.randn(2, 5, 7, generator=g)  # (B, C, L): one logit per position
    assert torch.allclose(sida_logits(feats), feats.mean(dim=1))
    assert get_objective("sida") is SiDA


# ------------------------------------------------------- discriminator through the objective


class _Net(nn.Module):
    """A small MLP on (x, t); its hidden layer is the "encoder" the discriminator reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 16))
        self.dec = nn.Linear(16, 2)

    def encode(self, x, time):
        return self.enc(torch.cat([x, time.view(-1, 1).expand(len(x), 1)], dim=1))

    def forward(self, x, time, cond=None):
        return self.dec(torch.nn.functional.silu(self.encode(x, time)))


def _denoiser() -> ModuleDenoiser:
    feats = lambda net, x, time, cond: net.encode(x, time)  # noqa: E731 - (B, C)
    return ModuleDenoiser(_Net(), RectifiedFlow(), "velocity", feature_fn=feats)


def _batch(step: int, x: torch.Tensor) -> Batch:
    n = len(x)
    rng = StepRNG(0, step, 0, global_size=n, offset=0, local_size=n)
    return Batch(x=x, cond=None, rng=rng, extras={"sample_shape": tuple(x.shape[1:])})


def _train_discriminator(head: str = "channel_mean", steps: int = 150):
    """Real samples near (+1.5, +1.5), student samples near (-1.5, -1.5): train only L_D
    (through ``SiDA.discriminator_loss``), then return D's accuracy on both at low noise
    and the generator term's gradient at the student samples."""
    g = torch.Generator().manual_seed(2)
    real = 1.5 + 0.2 * torch.randn(256, 2, generator=g)
    fake = -1.5 + 0.2 * torch.randn(256, 2, generator=g)
    obj = SiDA(_denoiser(), SiDAConfig(disc_head=head))
    example = _batch(0, real[:4])
    critic = obj.build_roles(_denoiser(), example)["fake_score"]
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, 256, (64,), generator=g)
        loss, _ = obj.discriminator_loss(critic, fake[idx], _batch(step, real[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.full((256,), 0.2)
    with torch.no_grad():
        real_acc = (obj.discriminator_logits(critic, 0.8 * real, t, None) > 0).float().mean()
        fake_acc = (obj.discriminator_logits(critic, 0.8 * fake, t, None) < 0).float().mean()
    x = fake[:64].clone().requires_grad_(True)
    x_t = 0.8 * x + 0.2 * torch.randn(64, 2, generator=g)
    logits = obj.discriminator_logits(critic, x_t, t[:64], None)
    adv = sida_generator_adv_loss(x, torch.zeros_like(x), logits)
    (grad,) = torch.autograd.grad(adv, x)
    towards_real = (-grad * (real.mean(0) - x.detach())).sum(1)  # descent direction . (real - x)
    return real_acc.item(), fake_acc.item(), (towards_real > 0).float().mean().item()


@pytest.mark.parametrize("head", ["channel_mean", "pooled"])
def test_discriminator_learns_real_vs_student_and_pulls_students_to_data(head):
    real_acc, fake_acc, pulled = _train_discriminator(head)
    assert real_acc > 0.9 and fake_acc > 0.9
    assert pulled > 0.9  # the generator term moves student samples towards the real data


@pytest.mark.parametrize("head", ["channel_mean", "pooled"])
def test_sabotage_swapped_labels_fail(monkeypatch, head):
    honest = sida_mod.sida_discriminator_loss
    monkeypatch.setattr(sida_mod, "sida_discriminator_loss", lambda r, f: honest(f, r))
    real_acc, fake_acc, pulled = _train_discriminator(head)
    assert real_acc < 0.5 and fake_acc < 0.5 and pulled < 0.5


def test_losses_add_the_weighted_terms_to_sid():
    """The student's loss is SiD's + adv_weight L_adv; the fake score's is the denoising loss
    + disc_weight L_D; real data is required."""
    teacher = _denoiser()
    obj = SiDA(teacher, SiDAConfig(adv_weight=0.3, disc_weight=2.0))
    roles = obj.build_roles(_denoiser(), _batch(0, torch.zeros(8, 2)))
    batch = _batch(0, torch.randn(8, 2))
    losses, logs = obj.losses(roles, batch, ["student", "fake_score"], 0)
    assert losses["student"].item() == pytest.approx(
        logs["sid_loss"] + 0.3 * logs["adv_loss"], rel=1e-5
    )
    want = logs["fake_score_loss"] + 2.0 * logs["disc_loss"]
    assert losses["fake_score"].item() == pytest.approx(want, rel=1e-5)
    no_data = Batch(x=None, cond=None, rng=batch.rng, extras=batch.extras)
    with pytest.raises(ValueError, match="real data"):
        obj.losses(roles, no_data, ["fake_score"], 0)


@pytest.mark.parametrize("head, shape", [("linear", (3, 5)), ("pooled", (3,))])
def test_trained_heads_start_at_chance_and_train_at_their_rate(head, shape):
    """A trained head is a zero-initialised submodule of the fake score (logit 0 = chance),
    with its own lr scale; "linear" gives one logit per position, "pooled" one per sample."""

    class _Seq(nn.Module):  # features (B, C, L) like a transformer's tokens
        def forward(self, x, time, cond=None):
            return x

    feats = lambda net, x, time, cond: torch.stack([x, -x, x * x], 1)  # noqa: E731
    den = lambda: ModuleDenoiser(_Seq(), RectifiedFlow(), "velocity", feature_fn=feats)  # noqa: E731
    obj = SiDA(den(), SiDAConfig(disc_head=head, head_lr_scale=7.0))
    fake = obj.build_roles(den(), _batch(0, torch.zeros(2, 5)))["fake_score"]
    assert isinstance(fake.sida_head, sida_mod.SiDAHead)
    assert obj.lr_scales("fake_score", fake) == {"sida_head": 7.0}
    logits = obj.discriminator_logits(fake, torch.randn(3, 5), torch.full((3,), 0.5), None)
    assert logits.shape == shape and (logits == 0).all()
    with pytest.raises(ValueError, match="disc_head"):
        SiDA(den(), SiDAConfig(disc_head="mlp"))


def test_schedule_warm_up_then_two_time_scales():
    obj = SiDA(_denoiser(), SiDAConfig(fake_warmup_steps=3, fake_updates_per_student=2))
    got = [obj.schedule(s) for s in range(8)]
    both = ["student", "fake_score"]
    assert got == [["fake_score"]] * 3 + [both, ["fake_score"], both, ["fake_score"], both]
    assert SiDA(_denoiser(), SiDAConfig()).schedule(0) == both  # SiD's 1:1 by default
