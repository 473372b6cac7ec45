"""BLADE's pieces: the ASA student (the mask each layer reports is the one its attention
applied), density and FLOPs accounting, the sparsity schedule, and sparsity-aware TDM (the
student's training step runs, and is differentiated through, its sparse attention)."""

from __future__ import annotations

import copy

import pytest
import torch

from fewstep.core.batch import Batch, StepRNG
from fewstep.core.kernels import asa_block_mask
from fewstep.core.kernels.reference import math_attention, token_mask
from fewstep.core.models import ModuleDenoiser
from fewstep.core.objectives.tdm import TDM, TDMConfig
from fewstep.core.paths import make_path
from fewstep.video.blade import (
    ASAConfig,
    SparseTDM,
    attention_flops,
    check_asa,
    dit_flops,
    layer_densities,
    max_retain_at,
    sparse_student,
    sparsify,
)
from fewstep.video.dit import VideoDiT, VideoDiTConfig

CFG = VideoDiTConfig(frames=8, size=16, patch=(2, 4, 4), dim=32, depth=2, heads=2, num_classes=10)
# grid 4 x 4 x 4 = 64 tokens; tiles of one latent frame (1, 4, 4) = 16 tokens: 4 blocks


def _teacher(seed: int = 0) -> ModuleDenoiser:
    torch.manual_seed(seed)
    net = VideoDiT(CFG)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every layer an effect
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ModuleDenoiser(net, make_path("rectified_flow"), "velocity").eval()


def _inputs(b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CFG.frames, 3, CFG.size, CFG.size, generator=g)
    return x, torch.rand(b, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (b,), generator=g)


def test_fixed_retain_gives_known_density():
    # threshold 1 with min = max = 0.5: exactly 2 of the 4 key blocks per query block
    asa = ASAConfig(block_size=16, tile=(1, 4, 4), threshold=1.0, min_retain=0.5, max_retain=0.5)
    student, _ = sparse_student(_teacher(), asa)
    assert layer_densities(student, *_inputs()) == [0.5, 0.5]


def test_reported_mask_is_the_one_applied():
    """Per layer: the density equals the recorded mask's kept fraction, that mask is ASA of
    the layer's own q, k, and the layer's attention output is attention under that mask
    (not dense attention)."""
    asa = ASAConfig(block_size=16, tile=(1, 4, 4), threshold=0.5, max_retain=0.75)
    student, mask = sparse_student(_teacher(), asa)
    qkv, attn_in = [], []
    hooks = []
    for blk in student.net.blocks:
        hooks.append(blk.attn.qkv.register_forward_hook(lambda m, i, o: qkv.append(o)))
        hooks.append(blk.attn.out.register_forward_pre_hook(lambda m, i: attn_in.append(i[0])))
    stats = mask.reset(record_masks=True)
    x, t, y = _inputs()
    with torch.no_grad():
        student(x, t, y)
    for h in hooks:
        h.remove()
    dens = stats.kept
    assert len(dens) == CFG.depth and all(0 < d < 1 for d in dens)
    b, n, heads = x.shape[0], 64, CFG.heads
    for layer in range(CFG.depth):
        m = stats.masks[layer]
        assert dens[layer] == pytest.approx(m.float().mean().item())
        q, k, v = qkv[layer].view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        assert torch.equal(m, asa_block_mask(q, k, 16, 0.5, 0.05, 0.75))
        ref = math_attention(q, k, v, m, 16, False, q.shape[-1] ** -0.5)
        got = attn_in[layer].view(b, n, heads, -1).transpose(1, 2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        dense = math_attention(q, k, v, torch.ones_like(m), 16, False, q.shape[-1] ** -0.5)
        assert (got - dense).abs().max() > 1e-3


def test_attention_flops_counts_kept_token_pairs():
    g = torch.Generator().manual_seed(0)
    n, bs, d = 40, 16, 8  # a partial last block (8 tokens)
    mask = torch.rand(2, 3, 3, 3, generator=g) < 0.5
    mask[..., 0] = True
    pairs = token_mask(mask, n, n, bs, False).sum((-3, -2, -1)).double()
    assert torch.equal(attention_flops(mask, n, n, bs, d), 4 * d * pairs)


def test_dit_flops_attention_scales_with_density():
    dense = dit_flops(CFG)
    n = 64
    ones = torch.ones(1, CFG.heads, 4, 4, dtype=torch.bool)
    per_layer = attention_flops(ones, n, n, 16, CFG.dim // CFG.heads).item()
    assert dense["attention"] == dense["dense_attention"] == CFG.depth * per_layer
    half = dit_flops(CFG, [0.5, 0.25])
    assert half["attention"] == pytest.approx(0.375 * dense["attention"])
    assert dense["total"] - half["total"] == pytest.approx(0.625 * dense["attention"])
    with pytest.raises(ValueError, match="depth"):
        dit_flops(CFG, [0.5])


def test_schedule_and_config_errors():
    asa = ASAConfig(max_retain=0.25, warmup_steps=4)
    assert [max_retain_at(asa, s) for s in (0, 2, 4, 9)] == [1.0, 0.625, 0.25, 0.25]
    assert max_retain_at(ASAConfig(max_retain=0.3), 0) == 0.3
    with pytest.raises(ValueError, match="product"):
        check_asa(ASAConfig(block_size=32, tile=(1, 4, 4)), (4, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        check_asa(ASAConfig(block_size=16, tile=(1, 2, 8)), (4, 4, 4))
    with pytest.raises(ValueError, match="multiple of 16"):
        check_asa(ASAConfig(block_size=8, tile=(1, 2, 4)), (4, 4, 4))
    with pytest.raises(TypeError, match="VideoDiT"):
        sparsify(ModuleDenoiser(torch.nn.Linear(2, 2), make_path("rectified_flow"), "x0"), asa)


def _batch(step: int = 0, b: int = 2) -> Batch:
    _, _, y = _inputs(b)
    rng = StepRNG(0, step, 0, b, 0, b)
    shape = (CFG.frames, 3, CFG.size, CFG.size)
    return Batch(x=None, cond=y, rng=rng, extras={"sample_shape": shape})


def _student_grads(objective, student) -> list[torch.Tensor]:
    roles = objective.build_roles(student, _batch())
    torch.manual_seed(5)  # fake = real at initialisation (a zero DMD gradient): move it
    with torch.no_grad():
        for p in roles["fake_score"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    losses, logs = objective.losses(roles, _batch(), ["student"], 0)
    losses["student"].backward()
    return [p.grad.clone() for p in student.parameters() if p.grad is not None], logs


def test_sparse_tdm_differentiates_the_sparse_student():
    teacher = _teacher()
    asa = ASAConfig(block_size=16, tile=(1, 4, 4), threshold=0.5, max_retain=0.5)
    tdm_cfg = TDMConfig(student_steps=2)
    student, mask = sparse_student(teacher, asa)
    dense_student = copy.deepcopy(student)
    dense_student.net.use_sparse_attention(0)
    g_sparse, logs = _student_grads(SparseTDM(teacher, asa, tdm_cfg), student)
    g_dense, _ = _student_grads(TDM(teacher, tdm_cfg), dense_student)
    assert 0 < logs["attn_density"] <= 0.5 and mask.stats.calls > 0
    # the same weights, batch and draws: only the attention masks differ
    assert max((a - b).abs().max().item() for a, b in zip(g_sparse, g_dense)) > 1e-6
    # a student that claims to be BLADE's but runs dense attention is refused
    with pytest.raises(RuntimeError, match="dense attention"):
        _student_grads(SparseTDM(teacher, asa, tdm_cfg), copy.deepcopy(dense_student))


def test_sparse_tdm_follows_the_schedule():
    teacher = _teacher()
    asa = ASAConfig(block_size=16, tile=(1, 4, 4), threshold=1.0, min_retain=0.25,
                    max_retain=0.25, warmup_steps=2)  # fmt: skip
    student, mask = sparse_student(teacher, asa)
    obj = SparseTDM(teacher, asa, TDMConfig(student_steps=2))
    roles = obj.build_roles(student, _batch())
    _, logs0 = obj.losses(roles, _batch(0), ["fake_score"], 0)
    _, logs2 = obj.losses(roles, _batch(2), ["fake_score"], 2)
    assert logs0["max_retain"] == 1.0 and logs0["attn_density"] == 1.0  # threshold 1: all
    assert logs2["max_retain"] == 0.25 and logs2["attn_density"] == 0.25
