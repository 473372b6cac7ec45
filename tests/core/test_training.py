"""The Trainer's contracts: exact resume, atomic checkpoints, non-finite losses, the update
schedule between roles, role isolation, EMA, gradient clipping and evaluation.

Everything runs a tiny untrained toy teacher for a handful of steps on CPU.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fewstep.core import checkpoint as ckpt
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import get_objective
from fewstep.core.objectives.dmd2 import DMD2
from fewstep.core.paths import make_path
from fewstep.core.toy import ToyData, ToyMLP, toy_feature_fn
from fewstep.core.training import EvalResult, NonFiniteLossError, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_teacher(seed: int = 0) -> ModuleDenoiser:
    torch.manual_seed(seed)
    net = ToyMLP(hidden=16, time_dim=8, depth=2)
    teacher = ModuleDenoiser(
        net, make_path("rectified_flow"), "velocity", feature_fn=toy_feature_fn
    )
    return teacher.requires_grad_(False).eval()


def make_trainer(
    out_dir, name="dmd2", objective_cfg=None, objective_cls=None, evaluator=None, **cfg
):
    cls = objective_cls or get_objective(name)
    teacher = tiny_teacher()
    objective = cls(teacher, cls.config_cls(**(objective_cfg or {})))
    base = dict(steps=6, batch_size=16, lr=1e-2, log_every=1, progress=False, seed=3)
    config = TrainConfig(**{**base, **cfg})
    return Trainer(objective, trainable_copy(teacher), ToyData(), config, out_dir, evaluator)


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move a role off its teacher initialisation (a fake score equal to the teacher gives
    the DMD student an exactly zero gradient, so its parameters would not move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def losses_only(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in history]


# ------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("name", "objective_cfg"),
    [("dmd2", {"fake_updates_per_student": 2, "student_steps": 2}), ("consistency", {})],
)
def test_resume_is_exact(tmp_path, name, objective_cfg):
    full = make_trainer(tmp_path / "full", name, objective_cfg, steps=8)
    full.fit()

    half = make_trainer(tmp_path / "split", name, objective_cfg, steps=4)
    half.fit()
    resumed = make_trainer(tmp_path / "split", name, objective_cfg, steps=8)
    assert resumed.step == 4
    resumed.fit()

    assert losses_only(resumed.history) == losses_only(full.history)
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    for role, module in full.checkpoint_modules().items():
        other = resumed.checkpoint_modules()[role]
        for (k, a), b in zip(module.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{role}.{k} differs after resume"


def test_resume_false_starts_over(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    assert make_trainer(tmp_path, steps=4, resume=False).step == 0
    assert make_trainer(tmp_path, steps=4).step == 2


# -------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_complete_and_pruned(tmp_path):
    trainer = make_trainer(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=2)
    trainer.fit()
    root = tmp_path / "checkpoints"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["step_00000005", "step_00000006"]  # no .tmp_* left behind
    latest = json.loads((root / "latest.json").read_text())
    assert latest == {"step": 6, "path": "step_00000006"}
    for folder in folders:
        names = {p.name for p in (root / folder).iterdir()}
        assert names == {"weights.safetensors", "optimizer.safetensors", "state.json"}
    state = ckpt.load_checkpoint(root / "step_00000006", trainer.checkpoint_modules())
    assert state["step"] == 6 and state["objective"] == "dmd2"
    assert state["config"]["keep_checkpoints"] == 2


def test_crash_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=6, checkpoint_every=2)
    calls = {"n": 0}
    real_save_file = ckpt.save_file

    def dying_save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # weights of the step-4 checkpoint written, optimizer not yet
            raise KeyboardInterrupt("killed mid-write")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.setattr(ckpt, "save_file", real_save_file)

    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_00000004" / "weights.safetensors").exists()
    assert not (root / "step_00000004").exists()
    assert json.loads((root / "latest.json").read_text())["path"] == "step_00000002"

    resumed = make_trainer(tmp_path, steps=6, checkpoint_every=2)
    assert resumed.step == 2
    resumed.fit()
    reference = make_trainer(tmp_path / "reference", steps=6)
    reference.fit()
    assert losses_only(resumed.history) == losses_only(reference.history)
    assert not (root / ".tmp_step_00000004").exists()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]


def test_stray_tmp_folder_is_ignored(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    stray = tmp_path / "checkpoints" / ".tmp_step_00000003"
    stray.mkdir()
    (stray / "weights.safetensors").write_bytes(b"half a file")
    resumed = make_trainer(tmp_path, steps=3)
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 3


def test_latest_pointing_at_a_missing_folder_falls_back_to_newest_complete(tmp_path):
    # A crash while a checkpoint of the same step is being replaced leaves latest.json
    # pointing at a folder that is gone; resume must not silently start from scratch.
    make_trainer(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=3).fit()
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    assert make_trainer(tmp_path, steps=4).step == 2
    (tmp_path / "checkpoints" / "latest.json").unlink()
    assert make_trainer(tmp_path, steps=4).step == 2


# --------------------------------------------------------------------- non-finite losses


def test_non_finite_loss_names_role_and_step_and_keeps_last_checkpoint(tmp_path):
    class NaNAtStep3(DMD2):
        def losses(self, roles, batch, update, step):
            losses, logs = super().losses(roles, batch, update, step)
            if step == 3:
                losses["fake_score"] = losses["fake_score"] * float("nan")
            return losses, logs

    trainer = make_trainer(
        tmp_path,
        objective_cls=NaNAtStep3,
        objective_cfg={"fake_updates_per_student": 2},
        steps=6,
        checkpoint_every=2,
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "fake_score" in message and "step 3" in message
    assert "step_00000002" in message  # points at the last good checkpoint
    assert trainer.step == 3  # the failing step did not complete

    root = tmp_path / "checkpoints"
    path = ckpt.latest_checkpoint(root)
    assert path is not None and path.name == "step_00000002"
    fresh = make_trainer(tmp_path / "fresh", steps=6, resume=False)
    state = ckpt.load_checkpoint(path, fresh.checkpoint_modules(), fresh.optimizers)
    assert state["step"] == 2
    for module in fresh.checkpoint_modules().values():
        assert all(torch.isfinite(p).all() for p in module.state_dict().values())


# ------------------------------------------------------------------------------ schedule


def test_dmd2_schedule_updates_student_every_third_step(tmp_path):
    trainer = make_trainer(tmp_path, objective_cfg={"fake_updates_per_student": 3}, steps=8)
    student, fake = trainer.roles["student"], trainer.roles["fake_score"]
    perturb_(fake)
    teacher = params(trainer.objective.teacher)
    for step in range(8):
        s0, f0 = params(student), params(fake)
        record = trainer.train_step()
        assert changed(s0, student) == (step % 3 == 0), step
        assert changed(f0, fake), step
        assert ("loss/student" in record) == (step % 3 == 0)
    assert not changed(teacher, trainer.objective.teacher)


def test_objective_lr_scales_give_a_head_its_own_rate(tmp_path):
    """DMD2's GAN head trains at gan_head_lr_scale x the fake score's rate: Adam's first
    step moves every parameter by about its own lr."""
    cfg = {"fake_updates_per_student": 1, "gan_weight": 0.1, "gan_head_lr_scale": 10.0}
    trainer = make_trainer(tmp_path, objective_cfg=cfg, lr=1e-3, grad_clip=0.0)
    fake = trainer.roles["fake_score"]
    groups = trainer.optimizers["fake_score"].param_groups
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2)]
    head, score = params(fake["head"]), params(fake["score"])
    trainer.train_step()

    def step_size(before, module):
        return max((a - b).abs().max().item() for a, b in zip(before, module.parameters()))

    assert step_size(head, fake["head"]) == pytest.approx(1e-2, rel=0.05)
    assert step_size(score, fake["score"]) == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(ValueError, match="gan_head_lr_scale must be > 0"):
        make_trainer(tmp_path / "bad", objective_cfg={**cfg, "gan_head_lr_scale": 0.0})


@pytest.mark.parametrize(
    ("decay", "factors"),
    [
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        (
            "cosine",
            [
                0.5,
                1.0,
                1.0,
                0.5 + 0.5 * math.cos(math.pi / 4),
                0.5,
                0.5 - 0.5 * math.cos(math.pi / 4),
            ],
        ),
        ("none", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_warmup_and_decay_scale_every_group(tmp_path, decay, factors):
    cfg = {"fake_updates_per_student": 1, "gan_weight": 0.1, "gan_head_lr_scale": 10.0}
    trainer = make_trainer(tmp_path, objective_cfg=cfg, lr=1e-3, warmup_steps=2, lr_decay=decay)
    for f in factors:
        trainer.train_step()
        for opt in trainer.optimizers.values():
            assert [g["lr"] for g in opt.param_groups] == pytest.approx(
                [g["base_lr"] * f for g in opt.param_groups]
            )
    assert [g["base_lr"] for g in trainer.optimizers["fake_score"].param_groups] == pytest.approx(
        [1e-3, 1e-2]
    )
    with pytest.raises(ValueError, match="lr_decay must be"):
        make_trainer(tmp_path / "bad", lr_decay="exp")


class AlternatingDMD2(DMD2):
    """Student alone on even steps, fake score alone on odd steps."""

    def schedule(self, step):
        return ["student"] if step % 2 == 0 else ["fake_score"]


def test_roles_are_isolated(tmp_path):
    trainer = make_trainer(tmp_path, objective_cls=AlternatingDMD2, steps=6)
    student, fake, ema = trainer.roles["student"], trainer.roles["fake_score"], trainer.ema
    perturb_(fake)
    for step in range(6):
        s0, f0, e0 = params(student), params(fake), params(ema)
        trainer.train_step()
        assert changed(s0, student) == (step % 2 == 0), step
        assert changed(f0, fake) == (step % 2 == 1), step
        assert changed(e0, ema) == (step % 2 == 0), step  # EMA follows student updates only


def test_schedule_naming_an_unknown_role_is_rejected(tmp_path):
    class Bad(DMD2):
        def schedule(self, step):
            return ["student", "critic"]

    trainer = make_trainer(tmp_path, objective_cls=Bad)
    with pytest.raises(ValueError, match="critic"):
        trainer.train_step()


def test_missing_loss_for_a_scheduled_role_is_rejected(tmp_path):
    class ForgetsFakeScore(DMD2):
        def losses(self, roles, batch, update, step):
            losses, logs = super().losses(roles, batch, update, step)
            losses.pop("fake_score")
            return losses, logs

    trainer = make_trainer(tmp_path, objective_cls=ForgetsFakeScore)
    with pytest.raises(ValueError, match=r"fake_score.*step 0|step 0.*fake_score"):
        trainer.train_step()


# ---------------------------------------------------------------------- EMA and clipping


def test_student_ema_is_a_lerp(tmp_path):
    decay = 0.9
    trainer = make_trainer(
        tmp_path, "consistency", ema_decay=decay, objective_cfg={"ema_decay": 0.5}
    )
    student, ema, target = trainer.roles["student"], trainer.ema, trainer.roles["target"]
    for _ in range(3):
        e0, t0 = params(ema), params(target)
        trainer.train_step()
        for prev, cur, s in zip(e0, ema.parameters(), student.parameters(), strict=True):
            torch.testing.assert_close(cur, prev + (1 - decay) * (s - prev), rtol=0, atol=1e-7)
        # the consistency target is the objective's own EMA, with its own rate
        for prev, cur, s in zip(t0, target.parameters(), student.parameters(), strict=True):
            torch.testing.assert_close(cur, prev + 0.5 * (s - prev), rtol=0, atol=1e-7)


def _first_step(tmp_path, grad_clip):
    trainer = make_trainer(tmp_path, "consistency", grad_clip=grad_clip, lr=1e-2, steps=1)
    student = trainer.roles["student"]
    seen = {}
    opt = trainer.optimizers["student"]
    real_step = opt.step

    def step_and_record(*args, **kwargs):
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        return real_step(*args, **kwargs)

    opt.step = step_and_record
    before = params(student)
    record = trainer.train_step()
    delta = max(float((a - b.detach()).abs().max()) for a, b in zip(before, student.parameters()))
    return record, seen["norm"], delta


def test_grad_clip_bounds_the_update_and_logs_the_norm_before_clipping(tmp_path):
    free, free_norm, free_delta = _first_step(tmp_path / "free", grad_clip=1e6)
    clipped, clipped_norm, clipped_delta = _first_step(tmp_path / "clipped", grad_clip=1e-12)
    # the logged norm is the one before clipping: the same in both runs (same seed)
    assert free["grad_norm/student"] == pytest.approx(free_norm, rel=1e-5)
    assert clipped["grad_norm/student"] == pytest.approx(free_norm, rel=1e-5)
    assert free_norm > 1e-6
    # the optimizer saw the clipped gradient ...
    assert clipped_norm <= 1e-12 * (1 + 1e-4)
    # ... so Adam's first step (lr * g / (|g| + 1e-8)) is ~lr unclipped and ~0 clipped
    assert free_delta > 0.5 * 1e-2
    assert clipped_delta < 1e-3 * 1e-2


def test_grad_clip_zero_disables_clipping_and_its_log(tmp_path):
    record = make_trainer(tmp_path, "consistency", grad_clip=0).train_step()
    assert "grad_norm/student" not in record and math.isfinite(record["loss/student"])


# ---------------------------------------------------------------------------- evaluation


def test_evaluator_runs_at_eval_every_and_its_outputs_land(tmp_path):
    calls = []

    def evaluator(trainer):
        calls.append(trainer.step)
        assert not trainer.roles["student"].training
        x = trainer.sampling_denoiser()(torch.zeros(4, 2), torch.ones(4)).detach()
        grid = x.mean().clamp(-1, 1).expand(4, 3, 8, 8)
        return EvalResult(
            metrics={"score": float(trainer.step)},
            warnings=["student collapsed"],
            images={"grid": grid},
        )

    trainer = make_trainer(tmp_path, evaluator=evaluator, steps=5, eval_every=2)
    history = trainer.fit()
    assert calls == [2, 4, 5]  # every eval_every steps, and once at the end
    assert trainer.roles["student"].training  # train mode restored
    assert trainer.warnings == [f"step {s}: student collapsed" for s in (2, 4, 5)]
    assert [r["eval/score"] for r in history if "eval/score" in r] == [2.0, 4.0, 5.0]
    pngs = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert pngs == [f"step_{s:08d}_grid.png" for s in (2, 4, 5)]
    assert trainer.sampling_denoiser() is not trainer.roles["student"]  # the EMA student


# ---------------------------------------------------------------- mixed precision, accumulation


def test_bf16_autocast_runs_the_objective_in_bf16(tmp_path, monkeypatch):
    seen = []
    real = DMD2.losses

    def spy(self, roles, batch, update, step):
        with torch.no_grad():
            seen.append(roles["student"].net(torch.zeros(2, 2), torch.zeros(2), None).dtype)
        return real(self, roles, batch, update, step)

    monkeypatch.setattr(DMD2, "losses", spy)
    tr = make_trainer(tmp_path, mixed_precision="bf16", steps=2)
    tr.fit()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(p.dtype == torch.float32 for p in tr.roles["student"].parameters())
    assert all(math.isfinite(v) for r in tr.history for k, v in r.items() if k.startswith("loss/"))


def test_gradient_accumulation_draws_one_batch_per_micro_step(tmp_path):
    tr = make_trainer(tmp_path, "consistency", grad_accum=3, steps=1)
    seen = []
    real = tr.make_batch

    def spy(step, micro):
        seen.append(micro)
        return real(step, micro)

    tr.make_batch = spy
    tr.fit()
    assert seen == [0, 1, 2]
