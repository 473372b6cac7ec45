"""Sharded data parallelism (``TrainConfig.parallel = "fsdp"``, FSDP2) on two CPU processes
(gloo) trains the same weights as one process with the global batch, within float
summation order (the tolerance of test_distributed.py), and its checkpoints are the full
single-process checkpoints: same keys and shapes, loadable into unwrapped modules, and
resumable in either mode.

Cases: DMD2 (a student and a fake score in a ``ModuleDict`` critic, updated on different
schedules, the fake score called with and without gradients, backward simulation), DMD2
with a GAN head (the critic's ``features`` method, called outside ``forward``) and
consistency distillation (a frozen EMA target role updated from the sharded student) with
two micro-batches per step.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from fewstep.core import checkpoint as ckpt
from fewstep.core import distributed as D
from fewstep.core import fsdp as F
from fewstep.core.models import ModuleDenoiser, trainable_copy
from fewstep.core.objectives import get_objective
from fewstep.core.paths import make_path
from fewstep.core.testing import run_ranks
from fewstep.core.toy import ToyData, ToyMLP, toy_feature_fn
from fewstep.core.training import EvalResult, TrainConfig, Trainer, check_train_config

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)
needs_fork = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods(), reason="needs the fork start method"
)

WORLD = 2
BATCH = 8  # per process; the single process gets WORLD * BATCH
STEPS = 4
# ToyMLP(hidden=16, time_dim=8): with 200, each 16x16 block (272 parameters) is a shard group,
# then the net (144 + 48 + 34 left) is one, so the critic's features go through a block's own
# registered method (ToyMLP.features); with 250 the net's 226 stay in the role's root group,
# which objectives also call under no_grad
WRAP = {"blocks_and_net": {"fsdp_min_params": 200}, "blocks": {"fsdp_min_params": 250}}
CASES = {  # label: (objective, objective config, TrainConfig overrides)
    "dmd2": ("dmd2", {"fake_updates_per_student": 2, "student_steps": 2}, WRAP["blocks"]),
    "dmd2_gan": (
        "dmd2",
        {"fake_updates_per_student": 2, "gan_weight": 0.1},
        WRAP["blocks_and_net"],
    ),
    # micro-batches: FSDP accumulates reduce-scattered gradients over two backward passes
    "consistency": ("consistency", {}, {"grad_accum": 2, **WRAP["blocks"]}),
}
NOISE = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))


def _evaluator(trainer: Trainer) -> EvalResult:
    """Runs on rank 0 alone: fails (or hangs) unless the student it sees is unsharded."""
    den = trainer.sampling_denoiser()
    assert not any(F.is_sharded(p) for p in den.parameters())
    with torch.no_grad():
        x0 = den.predict(NOISE, den.path.t_max)
    return EvalResult(metrics={"x0_mean": float(x0.mean()), "x0_std": float(x0.std())})


def _trainer(label, out_dir, batch_size, parallel="ddp", steps=STEPS, resume=True):
    name, objective_cfg, overrides = CASES[label]
    torch.manual_seed(0)
    net = ToyMLP(hidden=16, time_dim=8, depth=3)
    teacher = ModuleDenoiser(
        net, make_path("rectified_flow"), "velocity", feature_fn=toy_feature_fn
    )
    teacher.requires_grad_(False).eval()
    cls = get_objective(name)
    objective = cls(teacher, cls.config_cls(**objective_cfg))
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        grad_clip=0.5,
        ema_decay=0.5,  # an EMA that moves visibly in four steps
        log_every=1,
        eval_every=2,
        checkpoint_every=2,
        progress=False,
        seed=5,
        resume=resume,
        parallel=parallel,
        **overrides,
    )
    student = trainable_copy(teacher)
    return Trainer(objective, student, ToyData(), config, out_dir, evaluator=_evaluator)


def _files(run: Path, step: int = STEPS) -> tuple[dict, dict]:
    folder = run / "checkpoints" / f"step_{step:08d}"
    return (
        load_file(str(folder / "weights.safetensors")),
        load_file(str(folder / "optimizer.safetensors")),
    )


def _evals(history: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k.startswith("eval/")}
        for h in history
        if "eval/x0_mean" in h
    ]


def _check_sharded(trainer: Trainer) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Shard

    assert trainer.sharded
    teacher = trainer.objective.teacher
    assert not any(isinstance(m, FSDPModule) for m in teacher.modules()), "teacher wrapped"
    assert not any(F.is_sharded(p) for p in teacher.parameters())
    for name, module in trainer.checkpoint_modules().items():
        params = list(module.parameters())
        assert params and all(F.is_sharded(p) for p in params), name
        assert all(p.placements == (Shard(0),) for p in params), name
        local = torch.tensor(float(sum(p.to_local().numel() for p in params)))
        total = sum(p.numel() for p in params)
        assert local < 0.6 * total, (name, float(local), total)  # about half each
        dist.all_reduce(local)
        assert local.item() == total, name  # the two slices tile every parameter
    # the size policy made groups of the blocks (and the net), not only of each role's root
    net = trainer.roles["student"].net
    assert all(isinstance(m, FSDPModule) for m in net.blocks)
    assert isinstance(net, FSDPModule) == (trainer.cfg.fsdp_min_params == 200)
    assert not isinstance(net.time_mlp[0], FSDPModule)


def _check_mixed_clip() -> None:
    """Clipping over sharded and replicated parameters together uses the global norm."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    lin, extra = nn.Linear(3, 4), nn.Parameter(torch.randn(5))
    grads = [torch.randn(4, 3), torch.randn(4), torch.randn(5)]  # the same on both ranks
    want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    fully_shard(lin, mesh=F.make_mesh(D.setup()))
    params = [lin.weight, lin.bias, extra]
    for p, g in zip(params, grads, strict=True):
        p.grad = F.shard_like(g, p) if F.is_sharded(p) else g.clone()
    norm = F.clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(norm, want)
    clipped = [p.grad.full_tensor() if F.is_sharded(p) else p.grad for p in params]
    for c, g in zip(clipped, grads, strict=True):
        torch.testing.assert_close(c, g / (float(want) + 1e-6))


def _check_kept_teacher() -> None:
    """A role that holds the teacher module itself shards only its own parameters."""
    teacher, own = nn.Linear(2, 4).requires_grad_(False), nn.Linear(4, 2)
    role = nn.Sequential(teacher, own)
    F.shard_module_(role, F.make_mesh(D.setup()), 1, keep=teacher.parameters())
    assert not any(F.is_sharded(p) for p in teacher.parameters())
    assert all(F.is_sharded(p) for p in own.parameters())
    assert role(torch.ones(3, 2)).shape == (3, 2)


def _rank(rank: int, root: str) -> None:
    root = Path(root)
    _check_mixed_clip()
    _check_kept_teacher()
    for label in CASES:
        trainer = _trainer(label, root / f"{label}_fsdp", BATCH, "fsdp")
        _check_sharded(trainer)
        trainer.fit()
        if rank == 0:  # full copies stay on rank 0 for export; other roles stand aside
            assert not any(F.is_sharded(p) for p in trainer.roles["student"].parameters())
            assert not any(F.is_sharded(p) for p in trainer.ema.parameters())
            with pytest.raises(RuntimeError, match="sharded across processes"):
                trainer.roles["fake_score" if "dmd2" in label else "target"](NOISE, 1.0)
            (root / f"{label}_history.json").write_text(json.dumps(trainer.history))
    # resume within fsdp: two steps, then a new trainer continues to four
    _trainer("dmd2", root / "resume_fsdp", BATCH, "fsdp", steps=2).fit()
    resumed = _trainer("dmd2", root / "resume_fsdp", BATCH, "fsdp")
    assert resumed.step == 2
    resumed.fit()
    # resume a single-process checkpoint (written before the workers started) under fsdp
    _trainer("dmd2", root / "from_single", BATCH, "fsdp").fit()


@needs_gloo
@needs_fork
@pytest.mark.usefixtures("single_thread")
def test_fsdp_two_processes_match_one_process_and_checkpoints_are_full(tmp_path, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    # a single-process checkpoint at step 2 for the workers to resume under fsdp
    _trainer("dmd2", tmp_path / "from_single", WORLD * BATCH, steps=2).fit()

    run_ranks(_rank, WORLD, str(tmp_path), timeout=150)

    for label in CASES:
        single = _trainer(label, tmp_path / f"{label}_single", WORLD * BATCH, "fsdp")
        assert not single.sharded  # one process: "fsdp" runs unsharded
        assert not any(F.is_sharded(p) for p in single.roles["student"].parameters())
        single.fit()
        want = ckpt.module_tensors(single.checkpoint_modules())
        _, want_opt = _files(tmp_path / f"{label}_single")
        got, got_opt = _files(tmp_path / f"{label}_fsdp")
        # the fsdp checkpoint is the full single-process one: keys, shapes, values
        assert set(got) == set(want) and set(got_opt) == set(want_opt)
        for key, value in want.items():
            assert got[key].shape == value.shape, key
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)
        for key, value in want_opt.items():
            assert got_opt[key].shape == value.shape, key
            torch.testing.assert_close(got_opt[key], value, rtol=1e-4, atol=1e-6, msg=key)
        history = json.loads((tmp_path / f"{label}_history.json").read_text())
        # gradients were clipped by the norm of the full (global) gradient
        norms = [{k: v for k, v in h.items() if k.startswith("grad_norm/")} for h in history]
        want_norms = [
            {k: v for k, v in h.items() if k.startswith("grad_norm/")} for h in single.history
        ]
        assert any(norms) and len(norms) == len(want_norms)
        for a, b in zip(norms, want_norms, strict=True):
            assert a == pytest.approx(b, rel=1e-4)
        # rank 0's evaluator saw the gathered EMA student (mid-run and at the end)
        evals = _evals(history)
        want_evals = _evals(single.history)
        assert len(evals) == len(want_evals) == 2
        for a, b in zip(evals, want_evals, strict=True):
            assert a == pytest.approx(b, abs=1e-5)

    # resumed fsdp run == uninterrupted fsdp run, exactly
    whole, whole_opt = _files(tmp_path / "dmd2_fsdp")
    resumed, resumed_opt = _files(tmp_path / "resume_fsdp")
    for a, b in ((whole, resumed), (whole_opt, resumed_opt)):
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)

    # ddp -> fsdp: the workers resumed the single-process step-2 checkpoint
    single, _ = _files(tmp_path / "dmd2_single")
    from_single, _ = _files(tmp_path / "from_single")
    for key, value in single.items():
        torch.testing.assert_close(from_single[key], value, rtol=0, atol=1e-5, msg=key)

    # fsdp -> one process: the step-2 fsdp checkpoint loads into unwrapped modules and resumes
    back = tmp_path / "fsdp_to_single"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "resume_fsdp" / "checkpoints" / "step_00000002",
        back / "checkpoints" / "step_00000002",
    )
    trainer = _trainer("dmd2", back, WORLD * BATCH)
    assert trainer.step == 2
    trainer.fit()
    done, _ = _files(back)
    for key, value in single.items():
        torch.testing.assert_close(done[key], value, rtol=0, atol=1e-5, msg=key)


def test_unknown_parallel_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"parallel must be one of \['ddp', 'fsdp'\], got 'zero'"):
        check_train_config(TrainConfig(parallel="zero"))


def test_size_policy_wraps_blocks_bottom_up_and_class_names_override_it():
    net = ToyMLP(hidden=16, time_dim=8, depth=3)
    # post-order: the time Linear (144 params), then each 16x16 block (272); the ModuleList
    # and the Sequential hold nothing unclaimed afterwards; inp (48) and out (34) stay in
    # the root
    assert F.wrap_targets(net, 140) == [net.time_mlp[0], net.blocks[0], net.blocks[1]]
    assert F.wrap_targets(net, 200) == [net.blocks[0], net.blocks[1]]  # the root is no target
    assert F.wrap_targets(net, 10_000) == []
    # a block counts what is not yet claimed below it: 2 * 272 + 48 + 34 + 144 = 770
    outer = nn.Sequential(net)
    assert F.wrap_targets(outer, 700) == [net]
    by_class = F.wrap_targets(net, 1, class_names=("Linear",))
    assert by_class == [net.time_mlp[0], net.inp, net.blocks[0], net.blocks[1], net.out]


def test_size_policy_never_targets_a_container_without_forward():
    # diffusers keeps blocks in ModuleLists: fully_shard refuses those, so their unclaimed
    # parameters go to the module that runs them
    net = ToyMLP(hidden=16, time_dim=8, depth=3)
    # no block reaches 400 parameters (272 each); their ModuleList (544) would, but is no target
    assert F.wrap_targets(net, 400) == []


def test_misspelt_wrap_class_is_an_error_naming_the_classes():
    net = ToyMLP(hidden=4, time_dim=2, depth=2)
    F.check_wrap_classes([net], ("Linear",))
    with pytest.raises(ValueError, match=r"\['Linaer'\] match no module.*'Linear'"):
        F.check_wrap_classes([net], ("Linear", "Linaer"))


def test_containers_are_sharded_child_by_child():
    critic = nn.ModuleDict({"score": nn.Linear(2, 2), "head": nn.Sequential(nn.Linear(2, 1))})
    assert F.shard_roots(critic) == [critic["score"], critic["head"]]
    net = ToyMLP(hidden=4, time_dim=2, depth=1)
    assert F.shard_roots(net) == [net]
