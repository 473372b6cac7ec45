"""Per-objective budgets for the 2-D suite: the settings core's learning tests use and
``benchmarks/objectives.py`` runs for its table.

Each entry is the objective's 1-step rectified-flow budget (a few seconds on one CPU core,
checked over training seeds 0-2 in the tests), with overrides for other NFEs and for
eps-predicting (VP) teachers: an eps student's x0 = (x - sigma eps) / alpha multiplies its
output by sigma / alpha = 15 at t_max, so those take a smaller student learning rate.
"""

from __future__ import annotations

import torch

from fewstep.core.models import ModuleDenoiser
from fewstep.core.suite2d import Budget
from fewstep.core.toy import ToyMLP, toy_feature_fn

FAST_FAKE = {"fake_score": 3e-3}  # fake scores that keep up with a fast student
EPS_STUDENT = {"train": {"role_lr": {"student": 1e-4}}}  # see the module docstring
EPS_SCM = {"train": {"lr": 1e-4, "steps": 400}}  # TrigFlow views of eps networks: slower
_T = dict(batch_size=128, ema_decay=0.95)  # what almost every budget shares


def _train(steps: int, lr: float, **kw) -> dict:
    return {**_T, "steps": steps, "lr": lr, **kw}


# --- shared sub-budgets ------------------------------------------------------------------
DMD2_2STEP = {  # also PSO's starting student
    "objective": {"fake_updates_per_student": 2},
    "train": _train(400, 1e-3, batch_size=256, role_lr={"fake_score": 2e-3}, ema_decay=0.98),
}
CD = {"num_intervals": 10, "metric": "l2"}  # LCM-style consistency distillation
CD_TRAIN = _train(250, 1e-3)
SCM_CFG = {
    "sigma_data": 1.0,  # the ring's per-coordinate std is 1.4
    "tangent_warmup": 50,
    "time_sampling": "path",  # uniform rectified-flow times: the one-step end gets trained
    "jvp_mode": "finite_difference",  # ToyMLP's 100-cycle time features: see test_flow_maps
    "fd_eps": 1e-2,
}
SCM_TRAIN = _train(200, 5e-4)
HYPER_SD_CFG = {"num_intervals": 8, "metric": "l2", "segments": (4, 2, 1), "stage_steps": 80}
MF_CFG = {
    "t_density": "uniform",
    "r_neq_t": 0.75,
    "r_zero": 0.5,  # r = t_min for half the r != t draws: the one-step jump is trained
    "x_ode_steps": 4,
    "jvp_mode": "finite_difference",
    "fd_eps": 1e-2,
}
PAIRS = {"num_pairs": 2048, "pair_steps": 8, "solver": "euler"}  # teacher couplings


def small_student(teacher, hidden: int = 64, seed: int = 0) -> ModuleDenoiser:
    """A randomly initialised ToyMLP of ``hidden`` width (the teacher's is 128), conditional
    when the teacher is: the student for SlimFlow, KD and label-partitioned runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyMLP(hidden=hidden, num_classes=teacher.net.num_classes)
    return ModuleDenoiser(net, teacher.path, teacher.prediction, feature_fn=toy_feature_fn)


def fresh_student(teacher, seed: int = 0) -> ModuleDenoiser:
    """A randomly initialised student of the teacher's own architecture."""
    return small_student(teacher, hidden=teacher.net.inp.out_features, seed=100 + seed)


STUDENTS = {"small": small_student, "fresh": fresh_student}

BUDGETS: dict[str, Budget] = {
    # ---- distribution matching (issue 3)
    "dmd2": Budget(
        {"fake_updates_per_student": 3},
        _train(450, 2e-3),
        by_nfe={2: DMD2_2STEP, 4: DMD2_2STEP},
        eps={
            "objective": {"fake_updates_per_student": 2},
            "train": {"steps": 300, "role_lr": {"student": 1e-4}},
        },
    ),
    "dmd": Budget(
        {}, _train(120, 1e-3, role_lr=FAST_FAKE), eps={"train": {"lr": 1e-4, "steps": 150}}
    ),
    "vsd": Budget({}, _train(200, 1e-3, role_lr={"fake_score": 5e-3}), eps=EPS_STUDENT),
    "sid": Budget(
        {},
        _train(200, 5e-4, role_lr=FAST_FAKE),
        by_nfe={
            k: {
                "objective": {"alpha": 1.0},
                "train": {"batch_size": 256, "role_lr": {"fake_score": 5e-3}},
            }
            for k in (2, 4)
        },
        eps=EPS_STUDENT,
    ),
    "f_distill": Budget({"fake_updates_per_student": 2}, _train(300, 2e-3), eps=EPS_STUDENT),
    "uni_instruct": Budget({}, _train(200, 5e-4, role_lr=FAST_FAKE), eps=EPS_STUDENT),
    "decoupled_dmd": Budget(
        {
            "fake_updates_per_student": 3,
            "guidance_scale": 2.0,
            "null_label": 8,
            # CFG augmentation only at low noise: at high noise x0_c - x0_u points from the
            # ring's centre to the mode and pushes the student off the ring
            "ca_t_range": (0.02, 0.5),
        },
        _train(300, 2e-3),
        conditional=True,
        student="fresh",
    ),
    "phased_dmd": Budget(
        {"fake_updates_per_student": 2},
        _train(300, 1e-3, role_lr={"fake_score": 2e-3}, ema_decay=0.98),
        nfe=(2, 4),  # one expert per phase: at least two phases
        eps={"train": {"lr": 2e-3, "role_lr": {"student": 1e-4}, "ema_decay": 0.95}},
    ),
    "tdm": Budget(
        {"fake_updates_per_student": 3},
        _train(300, 2e-3),
        by_nfe={
            2: {
                "objective": {"fake_updates_per_student": 2},
                "train": {
                    "steps": 400,
                    "lr": 1e-3,
                    "role_lr": {"fake_score": 4e-3},
                    "ema_decay": 0.98,
                },
            },
            # four steps on a shifted grid: on a uniform 4-step grid the teacher's own jumps
            # are already within sampling noise of the reference
            4: {
                "objective": {
                    "fake_updates_per_student": 2,
                    "student_times": (1.0, 0.9, 0.75, 0.5),
                },
                "train": {
                    "steps": 400,
                    "lr": 1e-3,
                    "role_lr": {"fake_score": 4e-3},
                    "ema_decay": 0.98,
                },
            },
        },
        eps=EPS_STUDENT,
    ),
    "multi_student": Budget(
        {"fake_updates_per_student": 3, "num_students": 2},
        _train(300, 2e-3),
        conditional=True,
        student="fresh",
    ),
    "disback": Budget(  # 60 recording steps, then 30 steps towards each of 2 checkpoints
        {
            "fake_updates_per_student": 2,
            "record_steps": 60,
            "num_checkpoints": 2,
            "backtrack_steps": (30,),
        },
        _train(300, 2e-3),
        eps=EPS_STUDENT,
    ),
    "vdot": Budget(  # the OT term alone (no KL term): learning is the OT signal's doing
        {"fake_updates_per_student": 3, "dm_weight": 0.0}, _train(300, 2e-3), eps=EPS_STUDENT
    ),
    "twinflow": Budget(
        {}, _train(300, 2e-3, ema_decay=0.98), nfe=(1,), eps=EPS_STUDENT
    ),  # one-step generator
    # ---- guidance and preference (issue 3)
    "guidance_distill": Budget(
        {"scale_range": (1.0, 6.0)}, _train(300, 2e-3), nfe=(50,), vary_steps=False, guided=True
    ),
    "agd": Budget(  # trained on the CFG teacher's 10-step Euler trajectories
        {"scale_range": (1.0, 6.0), "student_steps": 10, "adapter_rank": 2},
        _train(150, 3e-3),
        nfe=(10,),
        vary_steps=False,
        guided=True,
    ),
    "pso": Budget(
        {"beta": 100.0},
        _train(200, 1e-3, ema_decay=0.9),
        nfe=(2,),
        reward="upper_half",
        init="dmd2",
    ),
    "flash_dmd": Budget(
        {"fake_updates_per_student": 3, "reward_weight": 0.15},
        _train(300, 2e-3),
        by_nfe={
            k: {
                "objective": {
                    "fake_updates_per_student": 2,
                    "reward_weight": 0.0,
                    "gan_weight": 0.1,
                },
                "train": DMD2_2STEP["train"],
            }
            for k in (2, 4)
        },
        reward="upper_half",
        eps=EPS_STUDENT,
    ),
    "distillation_dpo": Budget(
        {"fake_updates_per_student": 2, "beta": 1.0},
        _train(300, 2e-3),
        reward="upper_half",
        eps={"train": {"steps": 200, "role_lr": {"student": 1e-4}}},
    ),
    # ---- consistency (issue 4)
    "consistency": Budget(CD, _train(400, 1e-3)),
    "hyper_sd": Budget(
        HYPER_SD_CFG,
        CD_TRAIN,
        nfe=(1, 2),  # one segment per sampling step
        by_nfe={2: {"objective": {"segments": (4, 2), "stage_steps": 120}}},
    ),
    "slam": Budget(CD, CD_TRAIN),
    "scm": Budget(
        SCM_CFG,
        SCM_TRAIN,
        # sCM's intermediate angle 1.1 (sec. 6) is fraction 0.7 of [0, pi/2]
        by_nfe={2: {"objective": {"jvp_mode": "exact", "student_times": (1.0, 0.7)}}},
        eps=EPS_SCM,
    ),
    "rcm": Budget(
        {**SCM_CFG, "dmd_weight": 1.0, "fake_updates_per_student": 2},
        {**SCM_TRAIN, "steps": 150},
        eps=EPS_SCM,
    ),
    "tbcm": Budget({**SCM_CFG, "route_steps": 5}, {**SCM_TRAIN, "batch_size": 32}, eps=EPS_SCM),
    # ---- flow maps (issue 4)
    "meanflow": Budget(
        MF_CFG,
        _train(200, 2e-3),
        by_nfe={k: {"train": {"steps": 300, "lr": 1e-3}} for k in (2, 4)},
        eps={"train": {"lr": 2e-4, "steps": 400}},  # flow-map view of an eps network
    ),
    "flow_map": Budget(
        {"jvp_mode": "finite_difference", "fd_eps": 1e-2, "prior_start": 1.0},
        _train(200, 2e-3),
        eps=EPS_STUDENT,
    ),
    "boot": Budget(
        {"num_intervals": 8},
        _train(150, 2e-3),
        nfe=(1,),  # a flow map out of the prior: one jump
        eps={"train": {"steps": 400, "lr": 5e-4}},
    ),
    # ---- reflow and progressive (issue 4)
    "reflow": Budget(PAIRS, _train(150, 2e-3)),
    "instaflow": Budget(  # reflow, then a one-step student
        {**PAIRS, "reflow_steps": 100, "target_steps": 4}, _train(200, 2e-3), nfe=(1,)
    ),
    "slimflow": Budget(
        {**PAIRS, "reflow_steps": 200, "anneal_steps": 100, "target_steps": 4},
        _train(300, 3e-3),
        nfe=(1,),  # a one-step student
        student="small",
    ),
    "progressive": Budget(
        {"teacher_steps": 8, "round_steps": 60},  # rounds 8 -> 4 -> 2 (-> 1)
        _train(180, 2e-3),
        by_nfe={2: {"train": {"steps": 120}}, 4: {"train": {"steps": 60}}},
    ),
    # ---- compression (issue 4): sampled with the teacher's 10-step sampler
    "quantized": Budget(
        {"bits": 2, "sampler_steps": 10}, _train(150, 3e-3), nfe=(10,), vary_steps=False
    ),
    "dense2moe": Budget(
        {"targets": ("net.blocks.*",), "sampler_steps": 10},
        _train(150, 2e-3),
        nfe=(10,),
        vary_steps=False,
    ),
    "kd_mi": Budget(
        {"sampler_steps": 10}, _train(150, 3e-3), nfe=(10,), vary_steps=False, student="small"
    ),
}
