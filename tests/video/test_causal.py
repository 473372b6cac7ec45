"""The block-causal video DiT: KV-cache streaming equals the full block-causal pass, chunk
causality, the rolling window, teacher equivalence on one chunk, and clear errors."""

import pytest
import torch

from fewstep.video import causal
from fewstep.video.causal import CausalVideoDiT, block_causal_mask
from fewstep.video.dit import VideoDiT, VideoDiTConfig

TOL = 2e-5  # fp32


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(depth=2, frames=4) -> VideoDiT:
    """A tiny DiT with every weight random (adaLN-Zero's zeros would make outputs trivial)."""
    torch.manual_seed(0)
    cfg = VideoDiTConfig(frames=frames, size=8, patch=(1, 2, 2), dim=32, depth=depth, heads=2)
    net = VideoDiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.15)
    return net.eval()


def _stream(net: CausalVideoDiT, x, times, cond=None, window=None):
    """Chunk by chunk with the cache: each chunk attends to the cache, then writes itself."""
    cache, cf, out = net.new_cache(window), net.chunk_frames, []
    for k in range(x.shape[1] // cf):
        xk = x[:, k * cf : (k + 1) * cf]
        y = net.forward_chunk(xk, times[:, k], cache, cond)
        y2 = net.forward_chunk(xk, times[:, k], cache, cond, write=True)
        assert torch.equal(y, y2)  # writing does not change what the chunk sees
        out.append(y)
    return torch.cat(out, 1)


@torch.no_grad()
def test_kv_cache_streaming_equals_full_block_causal_forward(monkeypatch):
    net = CausalVideoDiT.from_teacher(_teacher(), chunk_frames=1)
    x, times, labels = torch.randn(2, 4, 3, 8, 8), torch.rand(2, 4) * 1000, torch.tensor([3, 7])
    full = net(x, times, labels)
    streamed = _stream(net, x, times, labels)
    torch.testing.assert_close(streamed, full, atol=TOL, rtol=0)
    assert full.abs().mean() > 0.1  # a non-trivial output
    # the mask is what makes them equal: remove it (full attention) and they differ
    monkeypatch.setattr(causal, "block_causal_mask", lambda n, tpc, w=None: torch.ones(
        n * tpc // 16, n * tpc // 16, dtype=torch.bool))  # fmt: skip
    unmasked = net(x, times, labels)
    assert (unmasked - streamed).abs().max() > 1e-3


@torch.no_grad()
def test_two_frame_chunks_and_per_chunk_times():
    net = CausalVideoDiT.from_teacher(_teacher(), chunk_frames=2)
    x, times = torch.randn(2, 4, 3, 8, 8), torch.rand(2, 2) * 1000
    torch.testing.assert_close(_stream(net, x, times), net(x, times), atol=TOL, rtol=0)
    # per-frame times (constant inside a chunk) read the same as per-chunk ones
    torch.testing.assert_close(net(x, times.repeat_interleave(2, 1)), net(x, times))
    # one time for every chunk = the scalar-time call; a chunk's own time moves only it
    same = net(x, times[:, :1].expand(2, 2))
    torch.testing.assert_close(same, net(x, times[:, 0]))
    moved = net(x, torch.stack([times[:, 0], times[:, 0] + 300], 1))
    torch.testing.assert_close(moved[:, :2], same[:, :2])
    assert (moved[:, 2:] - same[:, 2:]).abs().max() > 1e-3


@torch.no_grad()
def test_chunk_outputs_ignore_later_chunks():
    net = CausalVideoDiT.from_teacher(_teacher(), chunk_frames=1)
    x, times = torch.randn(2, 4, 3, 8, 8), torch.rand(2, 4) * 1000
    base = net(x, times)
    for k in range(3):
        y = x.clone()
        y[:, k + 1 :] += torch.randn_like(y[:, k + 1 :])
        out = net(y, times)
        torch.testing.assert_close(out[:, : k + 1], base[:, : k + 1], atol=TOL, rtol=0)
        assert (out[:, k + 1 :] - base[:, k + 1 :]).abs().max() > 1e-3
    # a later chunk's time is a later chunk's business too
    t2 = times.clone()
    t2[:, 3] = 17.0
    torch.testing.assert_close(net(x, t2)[:, :3], base[:, :3], atol=TOL, rtol=0)


@torch.no_grad()
def test_teacher_initialised_student_equals_teacher_on_one_chunk():
    teacher = _teacher()
    net = CausalVideoDiT.from_teacher(teacher, chunk_frames=4)
    x, t, labels = torch.randn(3, 4, 3, 8, 8), torch.rand(3) * 1000, torch.tensor([0, 5, 10])
    torch.testing.assert_close(net(x, t, labels), teacher(x, t, labels), atol=TOL, rtol=0)
    # with several chunks the student is causal, so it differs from the teacher
    net2 = CausalVideoDiT.from_teacher(teacher, chunk_frames=1)
    assert (net2(x, t, labels) - teacher(x, t, labels)).abs().max() > 1e-3


@torch.no_grad()
def test_rolling_window_ignores_chunks_before_it():
    """One layer: chunk k sees exactly chunks k - W .. k; streaming with the rolled cache
    equals the banded full forward, also past the training length."""
    net = CausalVideoDiT.from_teacher(_teacher(depth=1), chunk_frames=1)
    w, n = 2, 7  # 7 chunks > the 4 of training
    x, times = torch.randn(2, n, 3, 8, 8), torch.rand(2, n) * 1000
    banded = net(x, times, window=w)
    torch.testing.assert_close(_stream(net, x, times, window=w), banded, atol=TOL, rtol=0)
    cache = net.new_cache(w)
    _stream_into = [net.forward_chunk(x[:, j : j + 1], times[:, j], cache, write=True)
                    for j in range(n)]  # fmt: skip
    assert cache.cached_chunks() == w and cache.chunks == n and len(_stream_into) == n
    k = 5
    y = x.clone()
    y[:, : k - w] += 3 * torch.randn_like(y[:, : k - w])  # chunks before the window
    torch.testing.assert_close(net(y, times, window=w)[:, k], banded[:, k], atol=TOL, rtol=0)
    y = x.clone()
    y[:, k - w] += 3 * torch.randn_like(y[:, k - w])  # the oldest chunk inside it
    assert (net(y, times, window=w)[:, k] - banded[:, k]).abs().max() > 1e-3
    # two layers: the rolled cache still equals the banded pass
    net2 = CausalVideoDiT.from_teacher(_teacher(depth=2), chunk_frames=1)
    torch.testing.assert_close(
        _stream(net2, x, times, window=w), net2(x, times, window=w), atol=TOL, rtol=0
    )


def test_block_causal_mask_layout():
    m = block_causal_mask(3, 32, window=1)  # 2 blocks per chunk
    expect = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]]).bool()
    assert torch.equal(m, expect.repeat_interleave(2, 0).repeat_interleave(2, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        block_causal_mask(2, 8)


@torch.no_grad()
def test_control_signal_is_zero_initialised_and_per_chunk():
    teacher = _teacher()
    net = CausalVideoDiT.from_teacher(teacher, chunk_frames=1, control=True)
    x, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2, 4) * 1000
    ctrl = torch.randn(2, 4)
    plain = net(x, t, torch.tensor([1, 2]))
    cond = {"labels": torch.tensor([1, 2]), "control": ctrl}
    torch.testing.assert_close(net(x, t, cond), plain)  # zero-init: the teacher's function
    net.control.weight.data.normal_()
    out = net(x, t, cond)
    ctrl2 = ctrl.clone()
    ctrl2[:, 2] += 1.0  # frame 2's signal: chunks 0, 1 unchanged, chunk 2 moves
    out2 = net(x, t, {**cond, "control": ctrl2})
    torch.testing.assert_close(out2[:, :2], out[:, :2], atol=TOL, rtol=0)
    assert (out2[:, 2] - out[:, 2]).abs().max() > 1e-3


def test_bad_inputs_raise_clear_errors():
    teacher = _teacher()
    with pytest.raises(ValueError, match="chunk_frames 3"):
        CausalVideoDiT(teacher.cfg, chunk_frames=3)
    cfg = VideoDiTConfig(frames=4, size=8, patch=(1, 4, 4), dim=32, depth=1, heads=2)
    net = CausalVideoDiT(cfg, chunk_frames=1)  # 4 tokens per chunk: no 16-token block fits
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(1, 4, 3, 8, 8), torch.rand(1))
    net = CausalVideoDiT.from_teacher(teacher, chunk_frames=2)
    with pytest.raises(ValueError, match="expected clips"):
        net(torch.randn(1, 3, 3, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="time must be"):
        net(torch.randn(1, 4, 3, 8, 8), torch.rand(1, 3))
    with pytest.raises(ValueError, match="one chunk of 2"):
        net.forward_chunk(torch.randn(1, 4, 3, 8, 8), torch.rand(1), net.new_cache())
    with pytest.raises(ValueError, match="control=False"):
        net(torch.randn(1, 4, 3, 8, 8), torch.rand(1), {"control": torch.randn(1, 4)})
    with pytest.raises(ValueError, match="attention='full'"):
        CausalVideoDiT(VideoDiTConfig(frames=4, size=8, patch=(1, 2, 2), dim=32, depth=1,
                                      heads=2, attention="factorised"), 1)  # fmt: skip
