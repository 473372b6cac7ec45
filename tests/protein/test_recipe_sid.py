"""``fewstep distill protein-sid`` end to end on CPU with tiny settings, and the pieces the
recipe adds to core's SiD: the alpha term reaches core's loss, the paper's generator-loss
times, the training and inference samplers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fewstep.core import cli
from fewstep.core.batch import Batch, StepRNG
from fewstep.core.objectives import sid as core_sid
from fewstep.core.objectives.sid import SiDConfig
from fewstep.protein.model import BackboneTransformerConfig, build_denoiser
from fewstep.protein.recipes.sid import SID, SiDProteinConfig
from fewstep.protein.sampling import NoiseModulatedSampler, paper_times
from fewstep.protein.teacher import TeacherConfig

TINY = [
    "--teacher.length", "16", "--teacher.stride", "16", "--teacher.steps", "20",
    "--teacher.batch-size", "16", "--teacher.sample-steps", "8",
    "--teacher.model.dim", "16", "--teacher.model.pair-dim", "8", "--teacher.model.heads", "2",
    "--teacher.model.layers", "1", "--teacher.model.cond-dim", "16",
    "--teacher.model.rbf-bins", "8",
    "--student-steps", "2", "--sample-steps", "0", "--train.steps", "3", "--train.batch-size", "4",
    "--objective.fake-warmup-steps", "1",  # SiDA (the default): the generator trains too
    "--eval.samples", "4", "--eval.batch", "4", "--eval.export", "2",
    "--train.progress", "false",
    "--refine.samples", "4", "--refine.sample-steps", "2", "--refine.steps", "2",
    "--refine.batch-size", "4", "--refine.max-bond-outliers", "1", "--refine.clash-distance", "0",
]  # fmt: skip
NET = BackboneTransformerConfig(dim=16, pair_dim=8, heads=2, layers=1, cond_dim=16, rbf_bins=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def test_distill_writes_student_metrics_and_pdb_files(tmp_path, cache, capsys):
    from fewstep.protein.export import read_back

    out = tmp_path / "run"
    assert cli.main(["distill", "protein-sid", "--out", str(out), *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for who, nfe in (("student", 2), ("teacher", 8)):
        s = m[who]
        assert s["nfe"] == nfe and s["samples_per_second"] > 0
        for key in ("ca_ca_mad", "clash_rate", "rg_ratio", "sse_tv", "novelty_rmsd"):
            assert key in s, key
    assert m["speedup"] > 0
    # SiD distilled the refined teacher: the filter (relaxed for an untrained tiny teacher)
    # kept all 4 of its samples, and no real fragments were mixed in (the default)
    assert m["refine_info"]["kept"] == 4 and m["refine_info"]["real"] == 0
    meta = json.loads((out / "student.json").read_text())
    assert meta["times"] == pytest.approx(paper_times(2)) and meta["noise_scale"] == 0.45
    assert (out / "student.safetensors").exists() and (out / "report.html").exists()
    files = sorted((out / "samples").glob("*.pdb"))
    assert len(files) == 4  # 2 student + 2 teacher
    for f in files:
        atoms = read_back(f)
        assert (atoms.atom_name == "CA").sum() == 16 and len(set(atoms.res_id)) == 16
    # the saved student reloads and runs through the CLI commands
    capsys.readouterr()
    assert cli.main(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s")]) == 0
    written = sorted((tmp_path / "s").glob("*.pdb"))
    assert len(written) == 3 and (read_back(written[0]).atom_name == "CA").sum() == 16
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["nfe"] == 2


def test_other_objectives_and_student_times_are_refused(tmp_path, cache, capsys):
    assert cli.main(["distill", "protein-sid", "--out", str(tmp_path), "--objective", "dmd"]) == 2
    assert "supported: sid, sida" in capsys.readouterr().err
    args = ["distill", "protein-sid", "--out", str(tmp_path / "b"), *TINY,
            "--objective.student-times", "1.0,0.5"]  # fmt: skip
    assert cli.main(args) == 2
    assert "student_steps" in capsys.readouterr().err


# --------------------------------------------------------------------------- objective


def _objective(alpha: float = 1.2, steps: int = 2):
    cfg = SiDProteinConfig(teacher=TeacherConfig(length=10, model=NET), student_steps=steps)
    obj_cfg = dataclasses.replace(SiDConfig(), **{**SID.objective_defaults("sid"), "alpha": alpha})
    teacher = build_denoiser(NET, seed=0).requires_grad_(False).eval()
    return cfg, SID.build_objective(cfg, obj_cfg, teacher), teacher


def _batch(step: int = 0, size: int = 6) -> Batch:
    return Batch(None, None, StepRNG(7, step, 0, size, 0, size), {"sample_shape": (10, 3)})


def _roles(objective, teacher):
    from fewstep.core.models import trainable_copy

    roles = objective.build_roles(trainable_copy(teacher), _batch())
    with torch.no_grad():  # a fake score unlike the teacher, so y_real != y_fake
        for p in roles["fake_score"].parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    return roles


def test_alpha_reaches_core_sid_loss(monkeypatch):
    """The recipe's objective computes core's ``sid_generator_loss`` with the configured
    alpha; the alpha term changes the loss (removing it would fail this test)."""
    torch.manual_seed(0)
    seen = []
    real = core_sid.sid_generator_loss

    def spy(x, y_real, y_fake, alpha):
        seen.append((x.detach(), y_real.detach(), y_fake.detach(), alpha))
        return real(x, y_real, y_fake, alpha)

    monkeypatch.setattr(core_sid, "sid_generator_loss", spy)
    _, objective, teacher = _objective(alpha=1.2)
    roles = _roles(objective, teacher)
    losses, _ = objective.losses(roles, _batch(), ["student"], 0)
    (x, y_real, y_fake, alpha), = seen  # fmt: skip
    assert alpha == 1.2
    torch.testing.assert_close(losses["student"].detach(), real(x, y_real, y_fake, 1.2))
    gap = (real(x, y_real, y_fake, 1.2) - real(x, y_real, y_fake, 0.0)).abs().item()
    assert gap > 1e-6
    # the alpha term is -alpha * |y_real - y_fake|^2 / w, exactly
    w = (x - y_real).abs().mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(
        real(x, y_real, y_fake, 1.2) - real(x, y_real, y_fake, 0.0),
        (-1.2 * (y_real - y_fake) ** 2 / w).mean(),
    )


def test_alpha_changes_the_student_gradient():
    grads = {}
    for alpha in (1.2, 0.0):
        torch.manual_seed(0)
        _, objective, teacher = _objective(alpha=alpha)
        roles = _roles(objective, teacher)
        losses, _ = objective.losses(roles, _batch(), ["student"], 0)
        losses["student"].backward()
        grads[alpha] = torch.cat(
            [p.grad.flatten() for p in roles["student"].parameters() if p.grad is not None]
        )
    assert not torch.allclose(grads[1.2], grads[0.0], atol=1e-8)


def test_generator_loss_times_follow_the_paper():
    """t = 10^(-2 s / 400), s uniform on 0..400, clamped to [0.02, 0.98]: 61 of the 401
    levels fall below 0.02 and are clamped there."""
    _, objective, _ = _objective()
    t = objective.generator_times(_batch(size=40_000))
    assert t.min() == pytest.approx(0.02) and t.max() == pytest.approx(0.98)
    assert (t == t.min()).float().mean().item() == pytest.approx(61 / 401, abs=0.01)
    s = torch.round(-400 / 2 * torch.log10(t[(t > 0.02) & (t < 0.98)].double()))
    torch.testing.assert_close(10 ** (-2 * s / 400), t[(t > 0.02) & (t < 0.98)].double(),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # only the time draw changes: noising is the teacher's rectified flow
    assert objective.path is objective.teacher.path


def test_training_and_inference_samplers():
    cfg, objective, _ = _objective(steps=4)
    train = objective.student_sampler()
    assert isinstance(train, NoiseModulatedSampler)
    assert train.times == pytest.approx(paper_times(4)) and train.noise_scale == 1.0
    assert objective.config.student_steps == 4 and objective.config.alpha == 1.2
    infer = SID.eval_sampler(cfg, paper_times(4))
    assert infer.noise_scale == 0.45
    assert SID.eval_sampler(cfg, paper_times(1)).noise_scale == 1.0  # paper: one step plain


def test_fake_score_times_are_clamped_like_the_paper():
    """The fake score trains on Proteina's time density clamped to [0.02, 0.98] (paper:
    ``SID_ProteinaLoss.__call__`` with tmin 0.02, tmax 0.98); the teacher keeps its own."""
    from fewstep.core.models import trainable_copy

    _, objective, teacher = _objective()
    roles = objective.build_roles(trainable_copy(teacher), _batch())
    u = torch.linspace(0, 1, 10_001)
    t_fake = roles["fake_score"].path.sample_t(len(u), u)
    assert t_fake.min() == pytest.approx(0.02) and t_fake.max() == pytest.approx(0.98)
    inside = (t_fake > 0.02) & (t_fake < 0.98)
    torch.testing.assert_close(t_fake[inside], teacher.path.sample_t(len(u), u)[inside])
    assert teacher.path.sample_t(len(u), u).min() < 0.02  # the teacher's path is untouched
    with pytest.raises(ValueError, match="fake_t_range"):
        cfg = SiDProteinConfig(teacher=TeacherConfig(length=10, model=NET), fake_t_range=(0.5, 0.1))
        SID.build_objective(cfg, objective.config, teacher)


# ------------------------------------------------------------------------------- SiDA


def test_sida_uses_real_fragments_and_the_fake_score_features():
    """``--objective sida`` builds core's SiDA on the protein sampler; its discriminator reads
    the fake score's first-half tokens (one logit per residue) and the batch's real
    fragments: other real fragments change the fake score's loss, not the student's SiD
    part."""
    from fewstep.core.objectives.sida import SiDAConfig
    from fewstep.protein.recipes.sid import ProteinSiDA

    cfg = SiDProteinConfig(teacher=TeacherConfig(length=10, model=NET), student_steps=2)
    obj_cfg = dataclasses.replace(SiDAConfig(), **SID.objective_defaults("sida"))
    teacher = build_denoiser(NET, seed=0).requires_grad_(False).eval()
    objective = SID.build_objective(cfg, obj_cfg, teacher)
    assert isinstance(objective, ProteinSiDA) and objective.needs_data
    assert objective.student_sampler().times == pytest.approx(paper_times(2))
    roles = _roles(objective, teacher)
    feats = roles["fake_score"].features(torch.randn(3, 10, 3), torch.full((3,), 0.5))
    assert feats.shape == (3, NET.dim, 10)
    g = torch.Generator().manual_seed(0)
    out = []
    for scale in (0.3, 3.0):  # two different "real" sets
        real = scale * torch.randn(6, 10, 3, generator=g)
        batch = Batch(real, None, StepRNG(7, 0, 0, 6, 0, 6), {"sample_shape": (10, 3)})
        losses, logs = objective.losses(roles, batch, ["student", "fake_score"], 0)
        out.append((logs["sid_loss"], logs["disc_loss"], logs["fake_score_loss"]))
    (sid_a, disc_a, fs_a), (sid_b, disc_b, fs_b) = out
    assert sid_a == pytest.approx(sid_b) and fs_a == pytest.approx(fs_b)
    assert abs(disc_a - disc_b) > 1e-4


def test_distill_sida_end_to_end(tmp_path, cache, capsys):
    """``--objective sida`` trains through the CLI with the real fragments and the recipe's
    SiDA defaults (warm-up shortened to fit the tiny run)."""
    out = tmp_path / "sida"
    args = ["distill", "protein-sid", "--out", str(out), *TINY, "--objective", "sida",
            "--objective.fake-warmup-steps", "1", "--eval.teacher", "false",
            "--student-steps", "3", "--sample-steps", "2"]  # fmt: skip
    assert cli.main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective_config"]["disc_head"] == "pooled"
    # trained on 3 times, sampled on the first and the last (sampling.thin_times)
    meta = json.loads((out / "student.json").read_text())
    assert meta["times"] == pytest.approx(paper_times(3))
    assert meta["sample_times"] == pytest.approx([paper_times(3)[0], paper_times(3)[2]])
    assert json.loads((out / "metrics.json").read_text())["student"]["nfe"] == 2
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["nfe"] == 2
    assert cli.main(["sample", str(out), "--n", "1", "--steps", "3"]) == 0  # all 3 times
    with pytest.raises(ValueError, match="inference steps must be in 2..3"):
        SID.sample(out, 1, None, steps=4)


def test_sample_steps_beyond_the_trained_times_are_refused(tmp_path, capsys):
    """Checked before any teacher trains: the message names the flag and the range."""
    args = ["distill", "protein-sid", "--out", str(tmp_path / "r"), *TINY, "--sample-steps", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--sample_steps 3 with --student_steps 2" in err and "must be in 2..2" in err
    assert not (tmp_path / "r" / "student.safetensors").exists()


def test_sida_brings_its_recipe_settings_and_the_user_still_wins(capsys):
    """SiDA (the default objective) sets K = 20 sampled on 18 of its times, EMA 0.99 and
    lambda_adv 5e-5 (the configuration that met the teacher); plain SiD keeps K = 16 on all
    its times / EMA 0.95; explicit flags override both."""

    def shown(*flags):
        capsys.readouterr()
        assert cli.main(["distill", "protein-sid", "--show-config", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    sida = shown()
    assert (
        sida["config"]["objective"] == "sida"
        and sida["config"]["student_steps"] == 20
        and sida["config"]["sample_steps"] == 18
        and sida["config"]["train"]["ema_decay"] == 0.99
    )
    assert sida["objective_config"]["adv_weight"] == 5e-5
    sid = shown("--objective", "sid")
    assert sid["config"]["student_steps"] == 16 and sid["config"]["train"]["ema_decay"] == 0.95
    assert sid["config"]["sample_steps"] == 0
    mine = shown("--objective", "sida", "--student-steps", "16", "--train.ema-decay", "0.9")
    assert mine["config"]["student_steps"] == 16 and mine["config"]["train"]["ema_decay"] == 0.9
