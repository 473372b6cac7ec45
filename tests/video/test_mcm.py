"""MCM pieces: motion representations (registry, shapes, invariances, parity with plain
references), the consistency distance acting on the motion representation inside the
objective, the frame discriminator's loss signs and gradient penalty, TSN frame sampling,
mixed trajectories, and clear errors."""

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives.consistency import (
    ConsistencyConfig,
    ConsistencyDistillation,
    ConsistencyFunction,
)
from fewstep.core.paths import make_path
from fewstep.core.pretrain import train_denoiser
from fewstep.core.training import TensorData
from fewstep.video.mcm import (
    GAN_LOSSES,
    MOTIONS,
    FrameDiscriminator,
    MCMLossConfig,
    MCMObjective,
    TeacherFeatureDiscriminator,
    butterworth_lowpass,
    get_motion,
    gradient_penalty,
    motion_corr_global,
    motion_corr_local,
    motion_distance,
    segment_frames,
)
from fewstep.video.moving_digits import moving_digits_array
from fewstep.video.teacher import VideoDataConfig, VideoTeacherConfig, build_teacher

B, T, C, H, W = 2, 4, 3, 8, 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_teacher():
    """A tiny video DiT trained a few steps on in-memory low-quality moving digits."""
    cfg = VideoTeacherConfig(
        data=VideoDataConfig(videos=8, frames=4, size=8, quality="low"),
        patch=(2, 4, 4), dim=16, depth=1, heads=2, steps=5, batch_size=4,
    )  # fmt: skip
    clips = moving_digits_array(8, 4, 8, seed=0, quality="low").as_tensor()
    model = build_teacher(cfg)
    ema, _ = train_denoiser(model, TensorData(clips), steps=5, batch_size=4, lr=1e-3,
                            progress=False)  # fmt: skip
    model.load_state_dict(ema.state_dict())
    return model.eval().requires_grad_(False), clips


def _batch(x, cond=None, seed=0):
    rng = StepRNG(seed, 0, 0, global_size=len(x), offset=0, local_size=len(x))
    return Batch(x=x, cond=cond, rng=rng)


# ------------------------------------------------------------------ motion representations


def test_diff_of_a_static_clip_is_zero_and_raw_is_not():
    frame = torch.randn(B, 1, C, H, W)
    static = frame.expand(B, T, C, H, W)
    assert torch.equal(get_motion("diff")(static), torch.zeros(B, T - 1, C, H, W))
    assert get_motion("raw")(static).abs().sum() > 0


@pytest.mark.parametrize(
    "name, shape",
    [("raw", (B, T, C, H, W)), ("diff", (B, T - 1, C, H, W)),
     ("freq_low", (B, T, C, H, W)), ("freq_high", (B, T, C, H, W)),
     ("corr_local", (B, T - 1, 49, H, W)), ("corr_global", (B, T - 1, H * W, H * W))],
)  # fmt: skip
def test_motion_shapes(name, shape):
    assert tuple(get_motion(name)(torch.randn(B, T, C, H, W)).shape) == shape


def test_registry_covers_the_tested_names_and_errors_list_choices():
    assert set(MOTIONS) == {"raw", "diff", "freq_low", "freq_high", "corr_local", "corr_global"}
    with pytest.raises(KeyError, match="diff.*raw|corr_global"):
        get_motion("optical_flow")
    with pytest.raises(ValueError, match=r"\(B, T >= 2"):
        get_motion("diff")(torch.randn(B, 1, C, H, W))
    with pytest.raises(ValueError, match="expected videos"):
        get_motion("raw")(torch.randn(C, H, W))


def test_butterworth_mask_matches_freeinit_loop():
    """Parity with FreeInit's / MCM's loop over the fftshift-ed grid (index k -> 2k/n - 1),
    brought back to unshifted order."""
    t, h, w, s, order = 4, 6, 8, 0.25, 4
    ref = torch.zeros(t, h, w)
    for i, j, k in itertools.product(range(t), range(h), range(w)):
        d2 = (2 * i / t - 1) ** 2 + (2 * j / h - 1) ** 2 + (2 * k / w - 1) ** 2
        ref[i, j, k] = 1 / (1 + (d2 / s**2) ** order)
    ref = torch.fft.ifftshift(ref, dim=(0, 1, 2))
    torch.testing.assert_close(butterworth_lowpass(t, h, w), ref)


def test_frequency_components_split_the_video():
    x = torch.randn(B, T, C, H, W)
    low, high = get_motion("freq_low")(x), get_motion("freq_high")(x)
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)
    const = torch.full((1, T, C, H, W), 0.3)  # only the DC term, which the low-pass keeps
    torch.testing.assert_close(get_motion("freq_low")(const), const, atol=1e-6, rtol=0)
    assert high.abs().mean() > 0.1 and low.abs().mean() > 0.01


def test_local_correlation_is_the_global_one_on_the_window():
    """corr_local[k, d, p] == corr_global[k, p, p + d] wherever p + d is inside the frame,
    and 0 where it is not."""
    r = 1
    x = torch.randn(1, 3, C, 5, 5)
    loc = motion_corr_local(x, radius=r)  # (1, 2, 9, 5, 5)
    glob = motion_corr_global(x)  # (1, 2, 25, 25)
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    for k in range(2):
        for n, (dy, dx) in enumerate(offsets):
            for y, xx in itertools.product(range(5), range(5)):
                qy, qx = y + dy, xx + dx
                want = glob[0, k, y * 5 + xx, qy * 5 + qx] if 0 <= qy < 5 and 0 <= qx < 5 else 0
                torch.testing.assert_close(loc[0, k, n, y, xx], torch.as_tensor(want).float())
    # a hand value: channel dot product over sqrt(C)
    p, q = x[0, 0, :, 2, 2], x[0, 1, :, 3, 1]
    torch.testing.assert_close(glob[0, 0, 12, 16], (p * q).sum() / C**0.5)


def test_same_motion_different_static_appearance_gives_zero_diff_loss():
    moving = torch.randn(B, T, C, H, W)
    appearance = torch.randn(B, 1, C, H, W)  # a static background / colour change
    a, b = moving, moving + appearance
    for metric in ("huber", "l2"):
        assert motion_distance(a, b, "diff", metric).item() == pytest.approx(0.0, abs=1e-6)
        assert motion_distance(a, b, "raw", metric).item() > 1e-2
    # and a motion change is seen
    assert motion_distance(a, a.roll(1, dims=1), "diff").item() > 1e-2


# ------------------------------------------------------------------------------- objective


class PatternNet(nn.Module):
    """x0-predicting net that ignores its input: a learnable moving pattern (T, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.pattern = nn.Parameter(torch.randn(T, C, H, W))

    def forward(self, x, t, cond=None):
        return self.pattern.expand_as(x)


def _pattern_objective(motion: str):
    path = make_path("rectified_flow")
    teacher = ModuleDenoiser(PatternNet(), path, "x0").requires_grad_(False)
    # a huge boundary scale makes c_skip ~ 0 away from t_min: f(x, t) is the net's pattern;
    # a fine grid keeps the target off t_min (where f(x, t_min) = x), fixed by the seed
    cfg = MCMLossConfig(motion=motion, adv_weight=0.0, mix_ratio=0.0, boundary_scale=1e8,
                        num_intervals=10**6)  # fmt: skip
    obj = MCMObjective(teacher, cfg)
    x = torch.randn(B, T, C, H, W)
    roles = obj.build_roles(ModuleDenoiser(PatternNet(), path, "x0"), _batch(x))
    with torch.no_grad():  # the student differs from its EMA target by a static image only
        roles["student"].net.pattern.add_(torch.randn(1, C, H, W))
    return obj, roles, x


def test_objective_distance_acts_on_the_motion_representation():
    """The objective's consistency loss is blind to a static appearance difference between
    student and target under "diff" and sees it under "raw": fails if the objective stops
    computing the distance on the motion representation."""
    for motion, expect_zero in (("diff", True), ("raw", False)):
        obj, roles, x = _pattern_objective(motion)
        losses, logs = obj.losses(roles, _batch(x), ["student"], 0)
        assert set(losses) == {"student"} and logs["hq_share"] == 0.0
        if expect_zero:
            assert losses["student"].item() < 1e-6, motion
        else:
            assert losses["student"].item() > 1e-2, motion


def test_raw_without_gan_or_mixing_is_core_consistency_distillation(tiny_teacher):
    """Parity with core's plain consistency distillation: same loss, same gradients."""
    teacher, clips = tiny_teacher
    x, labels = clips[:3], torch.tensor([0, 5, 9])
    kw = dict(num_intervals=8, metric="huber", huber_c=1e-3)
    ours = MCMObjective(teacher, MCMLossConfig(motion="raw", adv_weight=0.0, mix_ratio=0.0, **kw))
    core = ConsistencyDistillation(teacher, ConsistencyConfig(**kw))
    student = trainable_copy(teacher)
    roles = ours.build_roles(student, _batch(x))
    with torch.no_grad():  # a target apart from the student, as after some EMA updates
        for p in roles["target"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    a, _ = ours.losses(roles, _batch(x, labels, seed=7), ["student"], 0)
    b, _ = core.losses(roles, _batch(x, labels, seed=7), ["student"], 0)
    torch.testing.assert_close(a["student"], b["student"])
    params = list(student.parameters())
    for ga, gb in zip(torch.autograd.grad(a["student"], params),
                      torch.autograd.grad(b["student"], params), strict=True):  # fmt: skip
        torch.testing.assert_close(ga, gb)
    # the diff representation changes the loss on the same draws
    diff = MCMObjective(teacher, MCMLossConfig(motion="diff", adv_weight=0.0, mix_ratio=0.0, **kw))
    c, _ = diff.losses(roles, _batch(x, labels, seed=7), ["student"], 0)
    assert abs(c["student"].item() - a["student"].item()) > 1e-6


def test_student_loss_adds_the_weighted_generator_loss(tiny_teacher):
    teacher, clips = tiny_teacher
    real = torch.rand(16, C, H, W) * 2 - 1
    obj = MCMObjective(teacher, MCMLossConfig(adv_weight=0.5, gp_weight=0.1), real_frames=real)
    x = clips[:B]
    roles = obj.build_roles(trainable_copy(teacher), _batch(x))
    assert obj.schedule(0) == ["student", "discriminator"]
    losses, logs = obj.losses(roles, _batch(x), obj.schedule(0), 0)
    assert set(losses) == {"student", "discriminator"}
    want = logs["motion_loss"] + 0.5 * logs["adv_generator_loss"]
    assert losses["student"].item() == pytest.approx(want, rel=1e-5)
    assert logs["gradient_penalty"] >= 0
    # the discriminator loss reaches only the discriminator through detached fakes
    grads = torch.autograd.grad(losses["discriminator"], list(roles["student"].parameters()),
                                allow_unused=True)  # fmt: skip
    assert all(g is None for g in grads)
    # before disc_start_step only the student trains, with the motion loss alone
    late = MCMObjective(teacher, MCMLossConfig(disc_start_step=5), real_frames=real)
    assert late.schedule(4) == ["student"] and late.schedule(5) == ["student", "discriminator"]


# ---------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("gan", sorted(GAN_LOSSES))
def test_generator_loss_falls_as_fakes_move_toward_real(gan):
    """Train D with the objective's discriminator loss on real = bright frames vs fake = dark
    frames; the generator loss must then fall as fakes move toward the real frames (a wrong
    sign in either loss makes it rise)."""
    torch.manual_seed(0)
    gen_loss, disc_loss = GAN_LOSSES[gan]
    d = FrameDiscriminator(C, width=8)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    real = 0.6 + 0.2 * torch.rand(16, C, H, W)
    fake = -0.6 + 0.2 * torch.rand(16, C, H, W)
    for _ in range(25):
        loss = disc_loss(d(real), d(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses = [gen_loss(d(fake + a * (real - fake))).item() for a in (0.0, 0.5, 1.0)]
    assert losses[0] > losses[1] > losses[2], losses


def test_gradient_penalty_of_a_linear_critic():
    """For D(x) = <w, x> the gradient is w everywhere: penalty (||w|| - 1)^2."""

    class Linear(nn.Module):
        def __init__(self, scale):
            super().__init__()
            w = torch.randn(C * H * W)
            self.w = nn.Parameter(scale * w / w.norm())

        def forward(self, x):
            return (x.flatten(1) * self.w).sum(1, keepdim=True)

    real, fake, alpha = torch.randn(6, C, H, W), torch.randn(6, C, H, W), torch.rand(6)
    assert gradient_penalty(Linear(1.0), real, fake, alpha).item() == pytest.approx(0, abs=1e-8)
    assert gradient_penalty(Linear(2.5), real, fake, alpha).item() == pytest.approx(2.25, 1e-5)


def test_segment_frames_picks_one_frame_per_segment():
    v = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1).expand(2, 4, C, H, W)
    first = segment_frames(v, 2, torch.zeros(2, 2))[:, 0, 0, 0]
    last = segment_frames(v, 2, torch.full((2, 2), 0.999))[:, 0, 0, 0]
    assert first.tolist() == [0, 2, 4, 6] and last.tolist() == [1, 3, 5, 7]
    assert segment_frames(v, 4, torch.rand(2, 4))[:, 0, 0, 0].tolist() == list(range(8))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        segment_frames(v, 5, torch.rand(2, 5))


def test_discriminator_rejects_videos():
    with pytest.raises(ValueError, match=r"frames \(N, C, H, W\)"):
        FrameDiscriminator(C)(torch.randn(B, T, C, H, W))


def test_teacher_feature_discriminator_trains_only_its_head(tiny_teacher):
    """disc_backbone "teacher": a head on the frozen teacher's DiT tokens. Only the head is
    trained (the trainer's optimisers take parameters with gradient), the teacher's copy does
    not move, and the generator loss reaches the student through the frozen features."""
    teacher, clips = tiny_teacher
    real = torch.rand(16, C, H, W) * 2 - 1
    cfg = MCMLossConfig(adv_weight=0.5, gp_weight=0.0, disc_backbone="teacher")  # depth 0: 1
    obj = MCMObjective(teacher, cfg, real_frames=real)
    roles = obj.build_roles(trainable_copy(teacher), _batch(clips[:B]))
    disc = roles["discriminator"]
    assert isinstance(disc, TeacherFeatureDiscriminator) and disc.depth == 1
    trained = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trained == {"head.weight", "head.bias"}
    tokens = teacher.net.grid[0] * teacher.net.grid[1] * teacher.net.grid[2]
    assert disc(real[:3]).shape == (3, tokens)
    frames = real[:2].clone().requires_grad_(True)  # the generator's signal: d logits / d frames
    (g,) = torch.autograd.grad(disc(frames).sum(), frames)
    assert g.abs().sum() > 0
    losses, _ = obj.losses(roles, _batch(clips[:B]), obj.schedule(0), 0)
    assert set(losses) == {"student", "discriminator"}
    for a, b in zip(disc.backbone.parameters(), teacher.net.parameters(), strict=True):
        assert a is not b and torch.equal(a, b)  # a copy, equal to the teacher
    with pytest.raises(ValueError, match="disc_depth"):
        MCMObjective(teacher, dataclasses.replace(cfg, disc_depth=5), real_frames=real
                     ).build_roles(trainable_copy(teacher), _batch(clips[:B]))  # fmt: skip
    with pytest.raises(ValueError, match="disc_backbone"):
        MCMObjective(teacher, dataclasses.replace(cfg, disc_backbone="dino"), real_frames=real)


# ------------------------------------------------------------------------ mixed trajectories


def test_mixing_ratio_picks_the_trajectory_start(tiny_teacher):
    teacher, clips = tiny_teacher
    x = clips[:4]
    labels = torch.tensor([1, 2, 3, 4])

    def start(ratio):
        obj = MCMObjective(teacher, MCMLossConfig(adv_weight=0.0, mix_ratio=ratio))
        roles = obj.build_roles(ModuleDenoiser(teacher.net, teacher.path, "velocity"),
                                _batch(x))  # fmt: skip
        return obj, roles, obj.trajectory_start(roles, _batch(x, labels, seed=3))

    _, _, (x0, hq0) = start(0.0)
    assert torch.equal(x0, x) and not hq0.any()

    obj, roles, (x1, hq1) = start(1.0)
    assert hq1.all()
    rng = _batch(x, labels, seed=3).rng  # replay the draws: the mask, then the noise
    rng.rand()
    z = rng.randn_like(x)
    t_max = torch.full((4,), obj.path.t_max)
    f = ConsistencyFunction(roles["target"], obj.config.boundary_scale, obj.config.sigma_data)
    with torch.no_grad():
        want = f(obj.path.noise(torch.zeros_like(z), t_max, z), t_max, labels)
    torch.testing.assert_close(x1, want)
    assert (x1 - x).abs().mean() > 0.05  # the generation, not the low-quality clip

    _, _, (xm, hqm) = start(0.5)
    assert torch.equal(xm[~hqm], x[~hqm])
    torch.testing.assert_close(xm[hqm], want[hqm])


def test_objective_config_errors(tiny_teacher):
    teacher, _ = tiny_teacher
    with pytest.raises(ValueError, match="real_frames"):
        MCMObjective(teacher, MCMLossConfig(adv_weight=1.0))
    with pytest.raises(ValueError, match="gan_loss must be one of"):
        MCMObjective(teacher, MCMLossConfig(adv_weight=0.0, gan_loss="lsgan"))
    with pytest.raises(KeyError, match="choose from"):
        MCMObjective(teacher, MCMLossConfig(adv_weight=0.0, motion="flow"))
    with pytest.raises(ValueError, match="mix_ratio"):
        MCMObjective(teacher, MCMLossConfig(adv_weight=0.0, mix_ratio=1.5))
    obj = MCMObjective(teacher, MCMLossConfig(adv_weight=0.0))
    with pytest.raises(ValueError, match="low-quality training clips"):
        obj.losses({}, Batch(x=None, cond=None, rng=StepRNG(0, 0, 0, 1, 0, 1)), ["student"], 0)
