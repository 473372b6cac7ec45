"""AccVideo pieces: SynVid is the teacher's Euler trajectory (parity with a plain eq. 5 loop
and with core's sampler), its cache round-trips, key indices, the trajectory guidance loss
(eq. 6) targets the next key point with the right step sign, the discriminator's real side is
the stored point at the landing key time, the GAN's signs, the m-step sampler, clear errors."""

import pytest
import torch

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import Denoiser, GuidedDenoiser, trainable_copy
from fewstep.core.objectives.common import gan_discriminator_loss, gan_generator_loss, ode_step
from fewstep.core.paths import make_path
from fewstep.core.samplers import EulerSampler
from fewstep.video import accvideo as A
from fewstep.video.accvideo import (
    AccVideo,
    AccVideoLossConfig,
    euler_landing,
    guide_point,
    guide_velocity,
    key_indices,
    key_sampler,
    load_synvid,
    read_synvid,
    synthesize_trajectories,
    teacher_grid,
)
from fewstep.video.teacher import VideoDataConfig, VideoTeacherConfig, build_teacher, null_labels

T, C, S = 4, 3, 8  # frames, channels, size of the tiny clips


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def teacher():
    """A tiny class-conditional video DiT (2 blocks); random weights with the adaLN-Zero
    gates opened, so the velocity depends on input, time and label (no test needs a trained
    teacher: every check is a parity or an identity)."""
    cfg = VideoTeacherConfig(
        data=VideoDataConfig(videos=8, frames=T, size=S), patch=(2, 4, 4), dim=16, depth=2,
        heads=2,
    )  # fmt: skip
    model = build_teacher(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ada" in name or "head" in name:
                p.normal_(0.0, 0.05)
    return model.eval().requires_grad_(False)


def _batch(x, cond=None, seed=0):
    rng = StepRNG(seed, 0, 0, global_size=len(x), offset=0, local_size=len(x))
    return Batch(x=x, cond=cond, rng=rng)


def _key_times(m=3, steps=6):
    times = teacher_grid(make_path("rectified_flow"), steps)
    return [float(times[k]) for k in key_indices(steps, m)]


# ------------------------------------------------------------------------------- SynVid


def test_trajectories_are_the_teachers_guided_euler_path(teacher):
    n, steps, w = 3, 6, 2.0
    labels = torch.tensor([1, 4, 7])
    traj, times, lab = synthesize_trajectories(teacher, n, labels, steps, w, seed=5, batch=2)
    assert traj.shape == (n, steps + 1, T, C, S, S)
    assert torch.equal(lab, labels)
    assert torch.allclose(times, torch.linspace(1, 0, steps + 1))
    noise = torch.randn(n, T, C, S, S, generator=torch.Generator().manual_seed(5))
    guided = GuidedDenoiser(teacher, w, null_labels)
    # a plain eq. 5 loop: x_{j+1} = x_j + (t_{j+1} - t_j) v(x_j, t_j, c)
    x = noise.clone()
    assert torch.equal(traj[:, 0], x)
    for j in range(steps):
        v = guided.predict(x, times[j], labels, kind="velocity")
        x = x + (times[j + 1] - times[j]) * v
        assert torch.allclose(traj[:, j + 1], x, atol=1e-5), j
    # the end point is core's Euler sampler with the same steps
    ref = EulerSampler(steps).sample(guided, noise, labels).x
    assert torch.allclose(traj[:, -1], ref, atol=1e-5)
    # the trajectory does not depend on the batch it was made in
    again, _, _ = synthesize_trajectories(teacher, n, labels, steps, w, seed=5, batch=3)
    assert torch.allclose(again, traj, atol=1e-5)


def test_synvid_cache_round_trips(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path))
    full, times, labels, info = load_synvid(teacher, 4, steps=5, guidance=1.5, seed=3, batch=3)
    assert not info["cached"] and full.shape == (4, 6, T, C, S, S)
    idx = [0, 2, 5]
    sub, times2, labels2, info2 = load_synvid(teacher, 4, steps=5, guidance=1.5, seed=3,
                                              batch=4, indices=idx)  # fmt: skip
    assert info2["cached"] and info2["file"] == info["file"]
    assert torch.equal(sub, full[:, idx])
    assert torch.equal(times2, times) and torch.equal(labels2, labels)
    # what the file holds is what synthesis makes
    fresh, _, _ = synthesize_trajectories(teacher, 4, None, 5, 1.5, seed=3, batch=4)
    assert torch.allclose(fresh, full, atol=1e-5)
    # another seed is another entry
    _, _, _, info3 = load_synvid(teacher, 4, steps=5, guidance=1.5, seed=4)
    assert not info3["cached"] and info3["file"] != info["file"]
    with pytest.raises(ValueError, match="outside the 6 stored"):
        read_synvid(info["file"], [0, 6])


# --------------------------------------------------------------------------- key points


def test_key_indices_run_from_noise_to_data():
    assert key_indices(50, 5) == [0, 10, 20, 30, 40, 50]  # the paper's 5 of 50
    for steps, m in [(50, 5), (7, 3), (10, 10), (5, 1), (9, 4)]:
        idx = key_indices(steps, m)
        assert len(idx) == m + 1 and idx[0] == 0 and idx[-1] == steps
        assert all(b > a for a, b in zip(idx, idx[1:], strict=False))
        times = teacher_grid(make_path("rectified_flow"), steps)[idx]
        assert times[0] == 1.0 and times[-1] == 0.0
        assert (times[1:] < times[:-1]).all()
    assert key_indices(10, 3, (0, 2, 7, 10)) == [0, 2, 7, 10]


@pytest.mark.parametrize(
    ("steps", "m", "idx", "match"),
    [
        (5, 6, (), r"in \[1, N = 5\]"),
        (5, 0, (), r"in \[1, N = 5\]"),
        (10, 3, (1, 4, 7, 10), "start at 0"),
        (10, 3, (0, 4, 7, 9), "end at N = 10"),
        (10, 3, (0, 7, 4, 10), "strictly"),
        (10, 3, (0, 5, 10), "need 4 key indices"),
    ],
)
def test_key_indices_clear_errors(steps, m, idx, match):
    with pytest.raises(ValueError, match=match):
        key_indices(steps, m, idx)


def test_key_sampler_is_euler_on_the_key_times(teacher):
    kt = _key_times()
    noise = torch.randn(2, T, C, S, S, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 3])
    out = key_sampler(kt).sample(teacher, noise, labels)
    x = noise
    for a, b in zip(kt, kt[1:], strict=False):
        v = teacher.predict(x, a, labels, kind="velocity")
        step = euler_landing(x, v, a, b)
        # eq. 5 as written is core's DDIM / Euler step on rectified flow
        core = ode_step(teacher, x, torch.full((2,), a), torch.full((2,), b), labels)
        assert torch.allclose(step, core, atol=1e-5)
        x = step
    assert out.nfe == len(kt) - 1
    assert torch.allclose(out.x, x, atol=1e-5)
    with pytest.raises(ValueError, match="strictly decrease to 0"):
        key_sampler([1.0, 0.5, 0.1])


# ------------------------------------------------------------------------ guidance loss


class ChordStudent(Denoiser):
    """Outputs, at key time i, the velocity whose Euler step lands on ``targets[i]``: the
    next stored key point (a perfect student) or any other target. Looks the batch up by
    the key time it is called at."""

    def __init__(self, key_times, targets, offset=0.0):
        super().__init__(make_path("rectified_flow"), "velocity")
        self.key_times, self.targets, self.offset = key_times, targets, offset

    def forward(self, x_t, t, cond=None):
        i = min(range(len(self.key_times) - 1), key=lambda k: abs(self.key_times[k] - float(t[0])))
        dt = self.key_times[i + 1] - self.key_times[i]
        return (self.targets[i] - x_t) / dt + self.offset


@pytest.mark.parametrize("form", ["velocity", "point"])
def test_guidance_loss_is_zero_only_for_a_student_landing_on_the_next_key_point(teacher, form):
    kt = _key_times(m=3)
    x = torch.randn(2, 4, T, C, S, S, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 5])
    obj = AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=0.0, guide_form=form))
    nxt = [x[:, i + 1] for i in range(3)]
    to_data = [x[:, -1]] * 3  # a student that jumps straight to the video (x0) instead
    seen = set()
    for seed in range(12):
        batch = _batch(x, labels, seed)
        i = StepRNG(seed, 0, 0, 2, 0, 2).shared_randint(0, 3)  # the interval the step draws
        seen.add(i)
        perfect = obj.losses({"student": ChordStudent(kt, nxt), "discriminator": None}, batch,
                             ["student"], 0)[0]["student"]  # fmt: skip
        assert perfect.item() < 1e-10, (seed, i)
        off = ChordStudent(kt, nxt, offset=0.1)
        assert (
            obj.losses({"student": off}, _batch(x, labels, seed), ["student"], 0)[0][
                "student"
            ].item()
            > 1e-4
        )
        jump = ChordStudent(kt, to_data)
        loss = obj.losses({"student": jump}, _batch(x, labels, seed), ["student"], 0)[0]
        assert (loss["student"].item() > 1e-3) == (i < 2), (seed, i)
    assert seen == {0, 1, 2}


def test_guidance_forms_match_eq6_and_differ_by_dt_squared():
    g = torch.Generator().manual_seed(0)
    x_i, x_j, v = (torch.randn(3, 5, generator=g) for _ in range(3))
    t_i, t_j = 0.8, 0.6
    chord = (x_j - x_i) / (t_j - t_i)
    assert torch.allclose(guide_velocity(v, x_i, x_j, t_i, t_j), (v - chord).pow(2).mean())
    land = x_i + (t_j - t_i) * v
    assert torch.allclose(guide_point(v, x_i, x_j, t_i, t_j), (land - x_j).pow(2).mean())
    assert torch.allclose(guide_point(v, x_i, x_j, t_i, t_j),
                          (t_j - t_i) ** 2 * guide_velocity(v, x_i, x_j, t_i, t_j))  # fmt: skip
    # a flipped step sign x_i - dt v misses the next point the exact velocity lands on
    assert guide_point(chord, x_i, x_j, t_i, t_j).item() < 1e-10
    assert (x_i - (t_j - t_i) * chord - x_j).abs().max() > 0.1


# ---------------------------------------------------------------------------- adversarial


def _roles(obj, teacher, batch):
    return obj.build_roles(trainable_copy(teacher), batch)


@pytest.mark.parametrize("fake_from", ["student", "synthetic"])
def test_discriminator_real_side_is_the_stored_point_at_the_landing_time(
    teacher, monkeypatch, fake_from
):
    kt = _key_times(m=3)
    x = torch.randn(2, 4, T, C, S, S, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 9])
    obj = AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=0.5, fake_from=fake_from))
    calls = []
    real_fn = A.teacher_tokens

    def spy(model, xx, t, cond, block):
        calls.append((xx.detach().clone(), float(t[0]), block))
        return real_fn(model, xx, t, cond, block)

    monkeypatch.setattr(A, "teacher_tokens", spy)
    roles = _roles(obj, teacher, _batch(x, labels))
    landings = set()
    for seed in range(10):
        calls.clear()
        losses, logs = obj.losses(roles, _batch(x, labels, seed), ["discriminator"], 0)
        j = int(logs["key_interval"]) + 1
        landings.add(j)
        assert len(calls) == 2  # one fake, one real, both at the landing time
        assert all(t == kt[j] for _, t, _ in calls)
        real = [c for c in calls if torch.equal(c[0], x[:, j])]
        assert len(real) == 1, (seed, j)
        # eq. 8's layer choice: the last block when noisy, a shallower one for clean data
        assert real[0][2] == (0 if j == 3 else 1)
        if j < 3:  # the clean video is not what the discriminator sees as real here
            assert not any(torch.equal(c[0], x[:, -1]) for c in calls)
        assert losses["discriminator"].item() == pytest.approx(0.5 * logs["disc_loss"])
    assert landings == {1, 2, 3}


def test_generator_loss_falls_as_fakes_move_toward_reals(teacher):
    kt = _key_times(m=3)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(8, T, C, S, S, generator=g) * 0.3
    fake = real + 1.5 * torch.randn(8, T, C, S, S, generator=g)
    labels = torch.arange(8) % 10
    obj = AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=1.0))
    heads = _roles(obj, teacher, _batch(torch.zeros(8, 4, T, C, S, S), labels))["discriminator"]
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(40):
        d = gan_discriminator_loss(
            obj.logits(heads, real, 1, labels), obj.logits(heads, fake, 1, labels)
        )
        opt.zero_grad()
        d.backward()
        opt.step()
    with torch.no_grad():
        gen = [gan_generator_loss(obj.logits(heads, (1 - a) * fake + a * real, 1, labels)).item()
               for a in (0.0, 0.5, 1.0)]  # fmt: skip
    assert gen[0] > gen[1] > gen[2], gen


def test_gan_gradient_reaches_the_student_through_the_frozen_teacher(teacher):
    kt = _key_times(m=3)
    x = torch.randn(2, 4, T, C, S, S, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([1, 2])

    def grads(adv):
        obj = AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=adv, fake_from="synthetic"))
        torch.manual_seed(0)
        roles = _roles(obj, teacher, _batch(x, labels))
        loss = obj.losses(roles, _batch(x, labels, 1), ["student"], 0)[0]["student"]
        loss.backward()
        assert not any(p.grad is not None for p in teacher.parameters())  # stays frozen
        return torch.cat([p.grad.flatten() for p in roles["student"].parameters()])

    assert not torch.allclose(grads(0.0), grads(10.0))


def test_timestep_aware_heads_one_per_landing_key(teacher):
    kt = _key_times(m=3)
    b = _batch(torch.zeros(1, 4, T, C, S, S), torch.tensor([0]))
    aware = AccVideo(teacher, kt, AccVideoLossConfig())
    shared = AccVideo(teacher, kt, AccVideoLossConfig(timestep_heads=False))
    assert len(_roles(aware, teacher, b)["discriminator"].heads) == 3
    assert len(_roles(shared, teacher, b)["discriminator"].heads) == 1
    assert [aware.head_for(j) for j in (1, 2, 3)] == [0, 1, 2]
    assert [shared.head_for(j) for j in (1, 2, 3)] == [0, 0, 0]
    assert aware.schedule(0) == ["student", "discriminator"]
    assert AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=0)).schedule(0) == ["student"]


# ------------------------------------------------------------------------------- errors


def test_clear_errors(teacher):
    kt = _key_times(m=3)
    with pytest.raises(ValueError, match="guide_form"):
        AccVideo(teacher, kt, AccVideoLossConfig(guide_form="x0"))
    with pytest.raises(ValueError, match="fake_from"):
        AccVideo(teacher, kt, AccVideoLossConfig(fake_from="data"))
    with pytest.raises(ValueError, match="adv_weight"):
        AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=-1))
    with pytest.raises(ValueError, match="depth fraction"):
        AccVideo(teacher, kt, AccVideoLossConfig(clean_feature_depth=0.0))
    with pytest.raises(ValueError, match="strictly decrease to 0"):
        AccVideo(teacher, [1.0, 0.5])
    obj = AccVideo(teacher, kt, AccVideoLossConfig(adv_weight=0))
    wrong = _batch(torch.zeros(2, 3, T, C, S, S), torch.tensor([0, 1]))  # 3 points for m = 3
    with pytest.raises(ValueError, match=r"x \(B, 4, T, C, H, W\)"):
        obj.losses({"student": teacher}, wrong, ["student"], 0)
    vp = build_teacher(VideoTeacherConfig(data=VideoDataConfig(frames=T, size=S),
                                          patch=(2, 4, 4), dim=16, depth=1, heads=2))  # fmt: skip
    vp.path = make_path("vp")
    with pytest.raises(ValueError, match="rectified_flow"):
        AccVideo(vp, kt)
    with pytest.raises(ValueError, match="labels has 2 entries for 3"):
        synthesize_trajectories(teacher, 3, torch.tensor([0, 1]), steps=2)
