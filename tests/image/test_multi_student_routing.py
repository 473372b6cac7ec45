"""Multi-student distillation of a text-to-image pipeline: prompt partitions (group column or
k-means), prompt-index conditioning for core's label-routed students, export as K diffusers
folders plus routing files, and the router that samples each prompt with its student."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core import cli
from fewstep.image import multi_student as MS
from fewstep.image import pipelines as P
from fewstep.image.recipes.latent import PIPELINE_DIR
from fewstep.image.tiny import sd_pipeline

GROUPED = {"shapes": ["a red circle", "a blue square"], "animals": ["a cat on a mat", "a dog"]}


def _grouped_lines() -> str:
    return "".join(f"{g}\t{p}\n" for g, ps in GROUPED.items() for p in ps)


def test_grouped_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# group<TAB>prompt\n" + _grouped_lines())
    prompts, groups = MS.read_grouped_prompts(f)
    assert prompts[0] == "a red circle" and groups == ["shapes"] * 2 + ["animals"] * 2
    f.write_text("a red circle\na blue square\n")
    assert MS.read_grouped_prompts(f) == (["a red circle", "a blue square"], None)
    f.write_text("shapes\ta red circle\na blue square\n")
    with pytest.raises(ValueError, match="'a blue square' has no group"):
        MS.read_grouped_prompts(f)


def test_prompt_features_ignore_masked_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    feats = MS.prompt_features({"encoder_hidden_states": tokens, "encoder_attention_mask": mask})
    torch.testing.assert_close(feats[0], tokens[0, :2].mean(0))
    torch.testing.assert_close(feats[1], tokens[1, :4].mean(0))
    pooled = torch.randn(2, 7, generator=g)
    got = MS.prompt_features({"encoder_hidden_states": tokens, "pooled_projections": pooled})
    torch.testing.assert_close(got, pooled)
    torch.testing.assert_close(MS.prompt_features(tokens), tokens.mean(1))  # SD: plain tokens


def test_kmeans_partition_recovers_separated_prompt_clusters():
    g = torch.Generator().manual_seed(1)
    truth = [0, 1, 1, 0, 2, 1, 2, 0]
    centers = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    feats = centers[truth] + 0.1 * torch.randn(len(truth), 2, generator=g)
    assert MS.kmeans_partition(feats, 3) == truth  # numbered by first appearance
    with pytest.raises(ValueError, match="at least 3 prompts"):
        MS.kmeans_partition(feats[:2], 3)


def test_routing_known_prompts_then_nearest_centroid():
    r = MS.Routing(["a", "b"], [1, 0], ["x", "y"], torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    feats = {"new near 0": [0.5, -0.2], "new near 1": [4.0, 6.0]}

    def features_of(prompts):
        return torch.tensor([feats[p] for p in prompts])

    assert r.route(["a", "new near 1", "b", "new near 0"], features_of) == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="not in the routing"):
        r.route(["new near 0"])


def test_prompt_table_denoiser_looks_conditions_up_by_index():
    from fewstep.core.models import ModuleDenoiser
    from fewstep.core.paths import RectifiedFlow

    class Net(torch.nn.Module):
        def forward(self, x, t, cond):
            return x * cond["scale"].reshape(-1, 1)

    table = {"scale": torch.tensor([1.0, 2.0, 3.0])}
    den = MS.PromptTableDenoiser(ModuleDenoiser(Net(), RectifiedFlow(), "velocity"), table)
    x = torch.ones(3, 2)
    out = den(x, torch.full((3,), 0.5), torch.tensor([2, 0, 1]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]]))
    import copy

    assert copy.deepcopy(den)._table is den._table  # students share one table
    with pytest.raises(ValueError, match="integer prompt indices"):
        den(x, torch.full((3,), 0.5), torch.tensor([0.0, 1.0, 2.0]))


@pytest.fixture(scope="module")
def two_pipes(tmp_path_factory):
    """Two different tiny SD pipelines (same text encoder seed, different UNets)."""
    root = tmp_path_factory.mktemp("router")
    a = sd_pipeline(root / "a", seed=0)
    b = sd_pipeline(root / "b", seed=0)
    torch.manual_seed(1)
    for p in b.unet.parameters():  # another student: same text side, other weights
        p.data.add_(0.05 * torch.randn_like(p))
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    return a, b


def _latents(pipe, prompts, gens):
    out = pipe(prompts, generator=gens, num_inference_steps=1, guidance_scale=1.0,
               output_type="latent")  # fmt: skip
    return out.images


def test_router_samples_each_prompt_with_its_student(two_pipes):
    """Each prompt's latents are those its own student draws alone with that prompt's
    generator, and differ from the other student's: routing is what decides."""
    a, b = two_pipes
    prompts = ["a red circle", "a cat", "a blue square", "a dog"]
    routing = MS.Routing(prompts, [0, 1, 0, 1], ["shapes", "animals"], torch.zeros(2, 32))
    router = MS.MultiStudentPipeline([a, b], routing)

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(len(prompts))]

    out = router(prompts, generator=gens(), num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent")  # fmt: skip
    assert out.students == [0, 1, 0, 1]
    for i, p in enumerate(prompts):
        own, other = (a, b) if routing.parts[i] == 0 else (b, a)
        g = gens()[i]
        want = _latents(own, [p], [g])
        torch.testing.assert_close(out.images[i : i + 1], want, rtol=1e-4, atol=1e-4)
        g = gens()[i]
        assert not torch.allclose(out.images[i : i + 1], _latents(other, [p], [g]), atol=1e-4)
    # a single generator gives one seed per prompt, drawn from it in prompt order
    seeds = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)).tolist()
    one = router(prompts[:1], generator=torch.Generator().manual_seed(0), num_inference_steps=1,
                 guidance_scale=1.0, output_type="latent").images  # fmt: skip
    want = _latents(a, prompts[:1], [torch.Generator().manual_seed(seeds[0])])
    torch.testing.assert_close(one, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for 4 prompts"):
        router(prompts, generator=gens()[:2], num_inference_steps=1)


def test_plain_prompt_file_is_partitioned_by_kmeans(two_pipes, tmp_path, cache_dir):
    from fewstep.core.objectives.multi_student import MultiStudentConfig

    f = tmp_path / "plain.txt"
    f.write_text("\n".join(p for ps in GROUPED.values() for p in ps) + "\n")
    pipe = two_pipes[0]
    s = MS.setup(str(f), pipe, "two-pipes-a", MultiStudentConfig(num_students=2))
    feats = MS.prompt_features(P.encode_prompts(pipe, s.prompts))
    assert s.routing.parts == MS.kmeans_partition(feats, 2)
    assert s.obj_cfg.num_students == 2 and s.obj_cfg.partition == (*s.routing.parts, 0)
    assert s.routing.names == ["kmeans-0", "kmeans-1"]
    torch.testing.assert_close(s.routing.centroids, MS.centroids(feats, s.routing.parts, 2))
    # labels index the table: prompt i, then the null prompt
    torch.testing.assert_close(
        s.table.cond[: len(s.prompts)], P.encode_prompts(pipe, s.prompts), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(s.table.cond[int(s.null)], P.encode_prompts(pipe, [""])[0])


@pytest.fixture(scope="module")
def msd_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("msd")
    sd_pipeline(root / "sd")
    prompts = root / "grouped.txt"
    prompts.write_text(_grouped_lines())
    out = root / "run"
    args = ["distill", "image-latent", "--out", str(out), "--teacher", str(root / "sd")]
    args += ["--objective", "multi_student", "--prompts", str(prompts)]
    args += ["--train.steps", "2", "--train.batch_size", "4", "--train.lr", "1e-3"]
    args += ["--teacher-steps", "2", "--sample-prompts", "1", "--train.progress", "false"]
    args += ["--objective.fake_updates_per_student", "1"]
    assert cli.main(args) == 0
    return out, root / "sd"


def test_multi_student_run_exports_k_pipelines_and_routes(msd_run):
    from diffusers import DiffusionPipeline

    run, teacher_folder = msd_run
    folder = run / PIPELINE_DIR
    info = json.loads((folder / MS.ROUTING_FILE).read_text())
    assert info["names"] == ["animals", "shapes"]  # sorted group names -> students 0, 1
    prompts = [p for ps in GROUPED.values() for p in ps]
    assert info["prompts"] == prompts and info["parts"] == [1, 1, 0, 0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["objective_config"]["num_students"] == 2

    students = [DiffusionPipeline.from_pretrained(str(folder / d)) for d in info["students"]]
    teacher = P.load_pipeline(teacher_folder)
    flat = [torch.cat([p.detach().flatten() for p in s.unet.parameters()]) for s in students]
    base = torch.cat([p.flatten() for p in teacher.unet.parameters()])
    assert not torch.equal(flat[0], flat[1])  # two students, each trained on its prompts
    assert not torch.equal(flat[0], base) and not torch.equal(flat[1], base)

    router = P.load_pipeline(folder)
    assert isinstance(router, MS.MultiStudentPipeline)
    router.set_progress_bar_config(disable=True)
    call = {**P.pipeline_kwargs(folder), "guidance_scale": 1.0, "output_type": "latent"}
    gens = [torch.Generator().manual_seed(20 + i) for i in range(len(prompts))]
    out = router(prompts, generator=gens, **call)
    assert out.students == [1, 1, 0, 0]
    for i, p in enumerate(prompts):
        own = students[info["parts"][i]]
        own.set_progress_bar_config(disable=True)
        want = own([p], generator=[torch.Generator().manual_seed(20 + i)], **call).images
        # batched with its group-mate vs alone: equal up to batched-matmul rounding
        torch.testing.assert_close(out.images[i : i + 1], want, rtol=1e-4, atol=1e-4)
    # an unseen prompt goes to the student of the nearest centroid
    feats = router.features(["a green triangle"])
    nearest = int(torch.cdist(feats, router.routing.centroids).argmin())
    assert router.route(["a green triangle"]) == [nearest]
    out_png = run / "s.png"
    assert cli.main(["sample", str(run), "--n", "2", "--out", str(out_png)]) == 0
    assert out_png.exists()


def test_multi_student_needs_a_prompt_file(tmp_path, capsys):
    folder = tmp_path / "sd"
    sd_pipeline(folder)
    args = ["distill", "image-latent", "--teacher", str(folder), "--out", str(tmp_path / "r")]
    args += ["--objective", "multi_student", "--images", str(tmp_path)]
    assert cli.main(args) == 2
    assert "needs --prompts FILE" in capsys.readouterr().err
