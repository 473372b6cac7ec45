"""`fewstep distill image-latent` under two CPU processes (gloo, the environment variables
that torchrun and `accelerate launch` set), replicated (ddp) or sharded (fsdp), trains what one
process does with the global batch, and only rank 0 writes the exported pipeline.

The workers are forked (they inherit the imported modules), as in tests/core/test_distributed.py.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fewstep.core import cli
from fewstep.core.testing import run_ranks

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
    pytest.mark.skipif(
        "fork" not in mp.get_all_start_methods(), reason="needs the fork start method"
    ),
]

WORLD, BATCH, STEPS = 2, 2, 2


def _args(root: Path, out: Path, batch: int) -> list[str]:
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(root / "sd")]
    args += ["--prompts", str(root / "prompts.txt"), "--train.steps", str(STEPS)]
    args += ["--train.batch_size", str(batch), "--train.progress", "false"]
    args += ["--teacher-steps", "2", "--sample-prompts", "1", "--device", "cpu"]
    return args + ["--objective.fake_updates_per_student", "1", "--train.lr", "1e-3"]


def _rank(parallel: str, rank: int, root: str) -> None:
    # fsdp: blocks of 1,000+ parameters get their own shard groups (the tiny UNet has no
    # block near the 1 M default)
    extra = ["--train.parallel", parallel, "--train.fsdp_min_params", "1000"]
    assert cli.main(_args(Path(root), Path(root) / parallel, BATCH) + extra) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Every role's weights (and the student EMA) at the last checkpoint."""
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "weights.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    """(folder with the tiny SD pipeline and prompts, weights of the one-process run at the
    global batch): the reference both parallel modes are compared with."""
    from fewstep.image.tiny import sd_pipeline

    root = tmp_path_factory.mktemp("latent-distributed")
    sd_pipeline(root / "sd")
    (root / "prompts.txt").write_text("a red circle\na blue square\na green cross\n")
    assert cli.main(_args(root, root / "single", WORLD * BATCH)) == 0
    return root, _weights(root / "single")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains_with_the_global_batch(
    parallel, single, monkeypatch
):
    root, single = single
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    run_ranks(functools.partial(_rank, parallel), WORLD, str(root))
    assert (root / parallel / "pipeline" / "model_index.json").exists()  # rank 0 exported

    # Summation order differs (two local means averaged vs one global mean), and Adam's first
    # steps turn float32 noise in near-zero gradients into full-size updates, so exact
    # equality is not expected: the runs must agree to 1 % of how far training moved them.
    # A rank that trained on the wrong slice, or unaveraged gradients, moves by O(100 %).
    multi = _weights(root / parallel)
    teacher = load_file(str(next((root / "sd" / "unet").glob("*.safetensors"))))
    for prefix in ("student.unet.", "fake_score.score.unet."):
        keys = [k for k in single if k.startswith(prefix)]
        assert {k[len(prefix) :] for k in keys} == teacher.keys()
        moved = torch.cat([(single[k] - teacher[k[len(prefix) :]]).flatten() for k in keys])
        gap = torch.cat([(multi[k] - single[k]).flatten() for k in keys])
        assert moved.norm() > 0, f"{prefix} never moved; the comparison proves nothing"
        assert gap.norm() < 0.01 * moved.norm(), (prefix, gap.norm(), moved.norm())
