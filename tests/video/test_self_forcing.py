"""Self Forcing pieces: the exit-step gradient of the rollout, the cache holding the clean
chunks, ODE-pair initialisation, the DMD objective, and streaming (FFE, window, first
chunk)."""

import pytest
import torch

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.core.samplers import EulerSampler
from fewstep.core.training import TensorData, TrainConfig, Trainer
from fewstep.video.causal import causal_student
from fewstep.video.dit import VideoDiT, VideoDiTConfig
from fewstep.video.self_forcing import (
    ODEInit,
    ODEInitConfig,
    SelfForcingConfig,
    SelfForcingDMD,
    StreamStats,
    chunk_fractions,
    ode_trajectories,
    regression_inputs,
    self_forcing_rollout,
    stream,
)

TOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = VideoDiTConfig(frames=4, size=8, patch=(1, 2, 2), dim=32, depth=2, heads=2)
    net = VideoDiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return ModuleDenoiser(net, make_path("rectified_flow"), "velocity").eval().requires_grad_(False)


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return TensorData(
        torch.randn(n, 4, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _fresh(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g).to(like)


def test_only_the_exit_step_carries_gradient(teacher):
    student = causal_student(teacher, 1)
    fr = chunk_fractions(4, 3)
    exits = [2, 0, 1, 2]
    trace: list = []
    noise, labels = torch.randn(2, 4, 3, 8, 8), torch.tensor([1, 4])
    video = self_forcing_rollout(student, noise, labels, fr, exits, _fresh(), trace=trace)
    assert video.shape == noise.shape and video.requires_grad
    for k, steps in enumerate(trace):
        assert len(steps) == exits[k] + 1  # the exit step ends the chunk
        for i, (x_in, pred) in enumerate(steps):
            assert not x_in.requires_grad  # inputs come from no-grad steps
            assert pred.requires_grad == (i == exits[k])
        assert torch.equal(steps[-1][1], video[:, k : k + 1])
    video.square().mean().backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():  # no gradient anywhere under no_grad
        v = self_forcing_rollout(student, noise, labels, fr, exits, _fresh())
    assert not v.requires_grad


@torch.no_grad()
def test_cache_holds_the_clean_chunks(teacher):
    """One step per chunk, context at t = 0: chunk k's output is the full block-causal
    prediction with the generated chunks < k as clean context (t = 0) and chunk k at noise."""
    student = causal_student(teacher, 1)
    noise, labels = torch.randn(2, 4, 3, 8, 8), torch.tensor([2, 9])
    video = self_forcing_rollout(student, noise, labels, chunk_fractions(4, 1), None, _fresh())
    for k in range(4):
        x = torch.cat([video[:, :k], noise[:, k:]], 1)
        t = torch.zeros(2, 4)
        t[:, k:] = 1.0
        pred = student.predict(x, t, labels, kind="x0")
        torch.testing.assert_close(pred[:, k], video[:, k], atol=TOL, rtol=0)
    # ... and not with the noisy input as context (the cache must hold the outputs)
    t = torch.zeros(2, 4)
    t[:, 3] = 1.0
    wrong = student.predict(torch.cat([noise[:, :3], noise[:, 3:]], 1), t, labels, kind="x0")
    assert (wrong[:, 3] - video[:, 3]).abs().max() > 1e-3


@torch.no_grad()
def test_stream_matches_rollout_and_counts_nfe(teacher):
    student = causal_student(teacher, 1).eval()
    labels = torch.tensor([3, 5])
    gen = torch.Generator().manual_seed(7)
    chunks = list(stream(student, 4, 1, cond=labels, generator=gen))
    gen = torch.Generator().manual_seed(7)
    noise = torch.cat([torch.randn(2, 1, 3, 8, 8, generator=gen) for _ in range(4)], 1)
    ref = self_forcing_rollout(student, noise, labels, chunk_fractions(4, 1), None, _fresh())
    torch.testing.assert_close(torch.cat(chunks, 1), ref, atol=TOL, rtol=0)

    # FFE and a stream past the training length (4 chunks) with a rolling window
    stats = StreamStats()
    chunks = list(stream(student, 6, 2, first_chunk_steps=4, window=2, cond=labels, stats=stats))
    assert len(chunks) == 6 and all(c.shape == (2, 1, 3, 8, 8) for c in chunks)
    assert stats.denoise_nfe == 4 + 2 * 5 and stats.context_nfe == 5
    assert len(stats.chunk_seconds) == 6 and all(torch.isfinite(c).all() for c in chunks)

    # LiveTalk-style image conditioning: a given clean first chunk is emitted and cached
    first = torch.randn(2, 1, 3, 8, 8)
    stats = StreamStats()
    out = list(stream(student, 3, 2, cond=labels, first_chunk=first, stats=stats))
    assert torch.equal(out[0], first) and stats.denoise_nfe == 4 and stats.context_nfe == 2
    other = list(stream(student, 3, 2, cond=labels, first_chunk=first + 1,
                        generator=torch.Generator().manual_seed(0)))  # fmt: skip
    again = list(stream(student, 3, 2, cond=labels, first_chunk=first,
                        generator=torch.Generator().manual_seed(0)))  # fmt: skip
    assert (other[1] - again[1]).abs().max() > 1e-4  # chunk 1 depends on the first chunk


@torch.no_grad()
def test_ode_trajectories_match_core_euler(teacher):
    noise, labels = torch.randn(3, 4, 3, 8, 8), torch.tensor([0, 1, 2])
    states, ends = ode_trajectories(teacher, noise, labels, [1.0, 0.5], steps=8, batch_size=2)
    ref = EulerSampler(8).sample(teacher, noise, labels).x
    torch.testing.assert_close(ends, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(states[:, 0], noise)  # rectified flow: x_1 = noise
    assert (states[:, 1] - noise).abs().max() > 1e-3


def test_ode_init_reduces_its_regression_loss(teacher):
    student = causal_student(teacher, 1)
    obj = ODEInit(teacher, ODEInitConfig(student_steps=2, num_pairs=16, teacher_steps=8))
    tcfg = TrainConfig(steps=40, batch_size=8, lr=2e-3, ema_decay=0, progress=False, resume=False)
    trainer = Trainer(obj, student, _data(), tcfg, "/nonexistent-unused")
    pairs = trainer.roles["pairs"]

    @torch.no_grad()
    def held_loss():
        rng = StepRNG(123, 0, 0, len(pairs), 0, len(pairs))
        batch = Batch(None, None, rng)
        x, t = regression_inputs(student, pairs.noise, pairs.fractions, obj.fractions(student),
                                 batch)  # fmt: skip
        pred = trainer.roles["student"].predict(x, t, pairs.cond, kind="x0")
        return torch.nn.functional.mse_loss(pred, pairs.target).item()

    before = held_loss()
    for _ in range(40):
        trainer.train_step()
    assert held_loss() < 0.7 * before


def test_self_forcing_dmd_trains_student_and_fake_score(teacher, tmp_path):
    student = causal_student(teacher, 1)
    cfg = SelfForcingConfig(student_steps=2, first_chunk_steps=3, fake_updates_per_student=1)
    obj = SelfForcingDMD(teacher, cfg)
    trainer = Trainer(obj, student, _data(), TrainConfig(steps=2, batch_size=2, lr=1e-3,
                      progress=False), tmp_path)  # fmt: skip
    before = {r: [p.clone() for p in trainer.roles[r].parameters()] for r in trainer.roles}
    logs = trainer.train_step()
    assert {"dm_loss", "fake_score_loss"} <= set(logs)
    # step 0: the fake score is still the teacher, so the DM gradient is exactly zero
    assert all(torch.equal(a, b) for a, b in zip(before["student"], student.parameters()))
    trainer.train_step()
    for role in ("student", "fake_score"):
        moved = [
            not torch.equal(a, b) for a, b in zip(before[role], trainer.roles[role].parameters())
        ]
        assert any(moved), role
    assert all(not p.requires_grad for p in teacher.parameters())

    # adversarial self-distillation: the GAN head sees (K+1)-step student videos as real
    cfg = SelfForcingConfig(student_steps=1, fake_updates_per_student=1, adversarial="self",
                            gan_weight=0.1)  # fmt: skip
    tcfg = TrainConfig(steps=1, batch_size=2, progress=False)
    trainer = Trainer(
        SelfForcingDMD(teacher, cfg), causal_student(teacher, 1), _data(), tcfg, tmp_path / "a"
    )
    logs = trainer.train_step()
    assert {"gan_student", "gan_critic", "dm_loss"} <= set(logs)


def test_exit_draws(teacher):
    student = causal_student(teacher, 1)
    obj = SelfForcingDMD(teacher, SelfForcingConfig(student_steps=3))
    fr = obj.fractions(student)
    seen = set()
    for step in range(40):
        exits = obj.exits(fr, Batch(None, None, StepRNG(0, step, 0, 2, 0, 2)))
        assert all(0 <= e < 3 for e in exits)
        seen.update(exits)
    assert seen == {0, 1, 2}
    shared = SelfForcingDMD(teacher, SelfForcingConfig(student_steps=3, shared_exit=True))
    for step in range(10):
        exits = shared.exits(fr, Batch(None, None, StepRNG(0, step, 0, 2, 0, 2)))
        assert len(set(exits)) == 1
    last = SelfForcingDMD(teacher, SelfForcingConfig(student_steps=3, backward_simulation=False))
    assert last.exits(fr, Batch(None, None, StepRNG(0, 0, 0, 2, 0, 2))) == [2, 2, 2, 2]


def test_bad_configs_raise(teacher):
    with pytest.raises(ValueError, match="gan_weight"):
        SelfForcingDMD(teacher, SelfForcingConfig(adversarial="self"))
    with pytest.raises(ValueError, match="adversarial must be one of"):
        SelfForcingDMD(teacher, SelfForcingConfig(adversarial="both", gan_weight=0.1))
    with pytest.raises(ValueError, match="context_frac"):
        SelfForcingDMD(teacher, SelfForcingConfig(context_frac=1.0))
    obj = SelfForcingDMD(teacher, SelfForcingConfig())
    with pytest.raises(TypeError, match="CausalDenoiser"):
        Trainer(obj, teacher, _data(), TrainConfig(steps=1, progress=False), "/nonexistent-unused")
    with pytest.raises(ValueError, match="exit step"):
        self_forcing_rollout(causal_student(teacher, 1), torch.randn(1, 4, 3, 8, 8), None,
                             chunk_fractions(4, 2), [0, 0, 0, 2], _fresh())  # fmt: skip


def test_first_chunk_condition_in_the_rollout_and_objective(teacher, tmp_path):
    """LiveTalk's image condition: the given chunk 0 is kept (no gradient) and cached."""
    student = causal_student(teacher, 1)
    noise, labels, first = (
        torch.randn(2, 4, 3, 8, 8),
        torch.tensor([1, 2]),
        torch.randn(2, 1, 3, 8, 8),
    )
    fr = chunk_fractions(4, 2)
    video = self_forcing_rollout(
        student, noise, labels, fr, [1, 1, 0, 1], _fresh(), first_chunk=first
    )
    assert torch.equal(video[:, :1], first) and video.requires_grad
    other = self_forcing_rollout(student, noise, labels, fr, [1, 1, 0, 1], _fresh(),
                                 first_chunk=first + 1)  # fmt: skip
    assert (other[:, 1] - video[:, 1]).abs().max() > 1e-4
    cfg = SelfForcingConfig(student_steps=2, fake_updates_per_student=1, first_chunk_from_data=True)
    obj = SelfForcingDMD(teacher, cfg)
    assert obj.needs_data
    tcfg = TrainConfig(steps=1, batch_size=2, progress=False)
    trainer = Trainer(obj, student, _data(), tcfg, tmp_path)
    assert "dm_loss" in trainer.train_step()
