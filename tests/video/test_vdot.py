"""VDOT's multi-condition path: the two-condition model (digit + motion direction through the
DiT's label input), its null condition, bad input, and core's VDOT objective on it (the
student's loss depends on the second condition)."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.models import GuidedDenoiser, ModuleDenoiser
from fewstep.core.objectives.vdot import VDOT, VDOTConfig
from fewstep.core.paths import make_path
from fewstep.video.dit import VideoDiT, VideoDiTConfig
from fewstep.video.multicond import joint_index, null_pair, two_condition_model

CFG = VideoDiTConfig(frames=4, size=16, patch=(2, 4, 4), dim=32, depth=1, heads=2, num_classes=10)


def _class_teacher() -> ModuleDenoiser:
    torch.manual_seed(0)
    net = VideoDiT(CFG)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every layer an effect
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ModuleDenoiser(net, make_path("rectified_flow"), "velocity").eval()


def _with_direction(model: ModuleDenoiser) -> ModuleDenoiser:
    torch.manual_seed(1)
    with torch.no_grad():
        model.net.dit.label.direction.weight.normal_(0.0, 0.5)
    return model


def _x(b: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, CFG.frames, 3, CFG.size, CFG.size, generator=g), torch.full((b,), 0.6)


def test_starts_as_the_class_teacher_and_reads_both_conditions():
    teacher = _class_teacher()
    model = two_condition_model(teacher)
    x, t = _x()
    digits = torch.tensor([0, 3, 7, 9])
    cond = torch.stack([digits, torch.tensor([0, 1, 2, 3])], 1)
    with torch.no_grad():
        # zero direction embeddings: exactly the class teacher
        torch.testing.assert_close(model(x, t, cond), teacher(x, t, digits))
        _with_direction(model)
        a = model(x, t, cond)
        b = model(x, t, torch.stack([digits, torch.tensor([1, 2, 3, 0])], 1))
        c = model(x, t, torch.stack([torch.tensor([1, 4, 8, 0]), cond[:, 1]], 1))
    assert (a - b).abs().amax((1, 2, 3, 4)).min() > 1e-4  # the direction changes every video
    assert (a - c).abs().amax((1, 2, 3, 4)).min() > 1e-4  # and so does the digit
    with torch.no_grad():  # None is the null pair (10, 4)
        torch.testing.assert_close(model(x, t, None), model(x, t, null_pair(cond)))


def test_joint_index_and_bad_input():
    cond = torch.tensor([[0, 0], [3, 2], [10, 4]])
    assert joint_index(cond).tolist() == [0, 17, 54]
    assert null_pair(cond).tolist() == [[10, 4]] * 3
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        joint_index(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="directions in 0..4"):
        joint_index(torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="class-conditional"):
        two_condition_model(ModuleDenoiser(VideoDiT(VideoDiTConfig(
            frames=4, size=16, dim=32, depth=1, heads=2, num_classes=0)),
            make_path("rectified_flow"), "velocity"))  # fmt: skip


def _student_loss(objective, roles, cond) -> float:
    b = len(cond)
    batch = Batch(x=None, cond=cond, rng=StepRNG(0, 0, 0, b, 0, b),
                  extras={"sample_shape": (CFG.frames, 3, CFG.size, CFG.size)})  # fmt: skip
    losses, logs = objective.losses(roles, batch, ["student"], 0)
    return losses["student"].item(), logs


def test_vdot_student_loss_depends_on_the_direction():
    teacher = _with_direction(two_condition_model(_class_teacher())).requires_grad_(False)
    objective = VDOT(GuidedDenoiser(teacher, 2.0, null_pair), VDOTConfig(student_steps=1))
    student = two_condition_model(_class_teacher())  # its own (zero) direction table
    digits = torch.tensor([2, 5, 7, 1])
    cond = torch.stack([digits, torch.tensor([0, 1, 2, 3])], 1)
    batch = Batch(None, cond, StepRNG(0, 0, 0, 4, 0, 4), {"sample_shape": (4, 3, 16, 16)})
    roles = objective.build_roles(student, batch)
    loss_a, logs = _student_loss(objective, roles, cond)
    loss_b, _ = _student_loss(objective, roles, torch.stack([digits, cond[:, 1].flip(0)], 1))
    assert logs["ot_loss"] > 0 and logs["dm_loss"] > 0
    # same noise, digits and draws: only the direction differs, which the real score sees
    assert abs(loss_a - loss_b) > 1e-6 * max(abs(loss_a), 1e-12)


def test_direction_table_steps_at_the_gain():
    """Adam moves a table entry by about lr per step; the direction's contribution to the
    label embedding must move DIRECTION_GAIN times that, or a zero-initialised table never
    reaches the unit scale of the digit table it is summed with."""
    from fewstep.video.multicond import DIRECTION_GAIN

    label = two_condition_model(_class_teacher()).net.dit.label
    joint = joint_index(torch.tensor([[3, 1], [5, 2]]))
    before = label(joint).detach()
    opt = torch.optim.Adam(label.direction.parameters(), lr=1e-3)
    label(joint).sum().backward()
    opt.step()
    moved = (label(joint).detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, DIRECTION_GAIN * 1e-3))
