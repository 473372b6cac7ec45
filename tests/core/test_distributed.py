"""Data parallelism is exact: two CPU processes (gloo) with batch B end with the same weights
as one process with batch 2B.

This holds because every draw goes through ``batch.rng`` (a ``StepRNG`` that draws for the
global batch and keeps this rank's slice), losses are means over the local batch and the
trainer averages each role's gradients over ranks before clipping and stepping.

The workers are forked rather than spawned: they inherit the imported modules, so the test
does not pay two fresh ``import torch`` (seconds each on a cold machine).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import get_objective
from fewstep.core.paths import make_path
from fewstep.core.testing import run_ranks
from fewstep.core.toy import ToyData, ToyMLP, toy_feature_fn
from fewstep.core.training import TrainConfig, Trainer

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    pytest.mark.skipif(
        "fork" not in mp.get_all_start_methods(), reason="needs the fork start method"
    ),
    pytest.mark.usefixtures("single_thread"),
]

WORLD = 2
BATCH = 8  # per process; the single process gets WORLD * BATCH
STEPS = 4
CASES = {  # label: (objective, objective config)
    # two roles on a schedule, backward simulation (a draw shared by the global batch)
    "dmd2": ("dmd2", {"fake_updates_per_student": 2, "student_steps": 2}),
    # a GAN head on the fake score's features, trained on real data
    "dmd2_gan": ("dmd2", {"fake_updates_per_student": 2, "gan_weight": 0.1}),
    # real data, an EMA target updated in after_update
    "consistency": ("consistency", {}),
    # one expert per phase (phase 0 at step 0, phase 1 after): the idle expert has no gradient
    # on any rank and must not be stepped (Adam would move it on its momentum)
    "phased_dmd": (
        "phased_dmd",
        {"fake_updates_per_student": 1, "student_steps": 2, "phase_steps": 1},
    ),
}


def _run(label: str, out_dir: Path, batch_size: int) -> dict[str, torch.Tensor]:
    name, objective_cfg = CASES[label]
    torch.manual_seed(0)
    net = ToyMLP(hidden=16, time_dim=8, depth=2)
    teacher = ModuleDenoiser(
        net, make_path("rectified_flow"), "velocity", feature_fn=toy_feature_fn
    )
    teacher.requires_grad_(False).eval()
    cls = get_objective(name)
    objective = cls(teacher, cls.config_cls(**objective_cfg))
    config = TrainConfig(
        steps=STEPS,
        batch_size=batch_size,
        lr=1e-2,
        grad_clip=0.5,
        log_every=1,
        checkpoint_every=2,
        progress=False,
        seed=5,
    )
    trainer = Trainer(objective, trainable_copy(teacher), ToyData(), config, out_dir)
    start = [p.detach().clone() for p in trainer.roles["student"].parameters()]
    trainer.fit()
    end = trainer.roles["student"].parameters()
    if all(torch.equal(a, b) for a, b in zip(start, end, strict=True)):
        raise AssertionError(f"{label}: the student never moved; the comparison proves nothing")
    return {
        f"{role}.{k}": v.detach().clone()
        for role, module in trainer.checkpoint_modules().items()
        for k, v in module.state_dict().items()
    }


def _rank(rank: int, root: str) -> None:
    for label in CASES:
        state = _run(label, Path(root) / f"{label}_ddp", BATCH)
        save_file(state, os.path.join(root, f"{label}_rank{rank}.safetensors"))


def test_two_processes_match_one_process_with_the_global_batch(tmp_path, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    run_ranks(_rank, WORLD, str(tmp_path), timeout=120)

    # rank 0 wrote the checkpoints (and the other rank waited for them at the barriers)
    for label in CASES:
        assert (tmp_path / f"{label}_ddp" / "checkpoints" / "step_00000004").is_dir()

    for label in CASES:
        single = _run(label, tmp_path / f"{label}_single", WORLD * BATCH)
        ranks = [load_file(str(tmp_path / f"{label}_rank{r}.safetensors")) for r in range(WORLD)]
        for key, value in single.items():
            torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
            torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=1e-5, msg=key)


def test_setup_gives_a_bare_cuda_device_the_local_rank(monkeypatch):
    """``device="cuda"`` (what recipes' "auto" resolves to) must reach set_device with an index:
    torch >= 2.10 refuses a bare "cuda" there, which stopped every recipe on a GPU."""
    from fewstep.core import distributed

    seen = []
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(torch.device(d)))
    info = distributed.setup("cuda")
    assert seen == [torch.device("cuda", 0)] and info.device == torch.device("cuda", 0)
