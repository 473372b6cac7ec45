"""Image dataset distillation: the math of DC, DM, MTT, FTD and herding, against plain
references, and checks that the synthetic images really are optimised."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fewstep.dataset_distill.images.augment import DSAConfig
from fewstep.dataset_distill.images.baselines import herding, herding_subset, random_subset
from fewstep.dataset_distill.images.data import DataConfig, init_synthetic, load_image_data
from fewstep.dataset_distill.images.dc import (
    DCSettings,
    distill_dc,
    gradient_match_loss,
    layer_distance,
    loops,
)
from fewstep.dataset_distill.images.dm import DMSettings, distill_dm, mean_embedding_distance
from fewstep.dataset_distill.images.ftd import gsam_direction, gsam_gradient
from fewstep.dataset_distill.images.mtt import (
    ExpertSettings,
    MTTSettings,
    check_windows,
    expert_buffer,
    match_trajectories,
    param_distance_loss,
    train_expert,
    unroll_student,
)
from fewstep.dataset_distill.images.nets import NetConfig, flat_params, make_net

NET = NetConfig(width=8)
NO_AUG = DSAConfig(strategy="none")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per test worker: tiny networks gain nothing from more, and with
    ``-n 2`` on two cores more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_image_data(DataConfig())


@pytest.fixture(scope="module")
def small(digits):
    """200 training digits (20 per class), for fast experts."""
    from fewstep.dataset_distill.images.data import ImageData

    idx = torch.cat([torch.nonzero(digits.y_train == c).flatten()[:20] for c in range(10)])
    return ImageData(
        digits.x_train[idx], digits.y_train[idx], digits.x_test, digits.y_test,
        digits.classes, digits.transform, "digits-200",
    )  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("fewstep-cache")
    mp.setenv("FEWSTEP_CACHE", str(path))
    yield path
    mp.undo()


# ----------------------------------------------------------------------------- DC


def _reference_distance(ga, gb):
    total = 0.0
    for a, b in zip(ga, gb, strict=True):
        if a.ndim == 1:
            continue
        for i in range(a.shape[0]):
            cos = F.cosine_similarity(a[i].flatten(), b[i].flatten(), dim=0, eps=0.0)
            total += 1.0 - float(cos)
    return total


def test_dc_layer_distance_matches_reference_and_signs():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 16)]
    ga = [torch.randn(s, generator=g) for s in shapes]
    gb = [torch.randn(s, generator=g) for s in shapes]
    assert float(layer_distance(ga, gb)) == pytest.approx(_reference_distance(ga, gb), rel=1e-4)
    assert float(layer_distance(ga, ga)) == pytest.approx(0.0, abs=1e-4)
    # opposite gradients: 2 per output node of every matrix (4 conv rows + 10 linear rows)
    assert float(layer_distance(ga, [-t for t in ga])) == pytest.approx(28.0, rel=1e-4)
    # biases / norms are left out: changing them changes nothing
    gc = [ga[0], torch.randn(4, generator=g), ga[2]]
    assert float(layer_distance(ga, gc)) == pytest.approx(0.0, abs=1e-4)
    # scale-invariant per row (a cosine)
    assert float(layer_distance(ga, [3 * t for t in ga])) == pytest.approx(0.0, abs=1e-4)


def test_dc_loops_follow_the_paper_table():
    assert loops(1) == (1, 1) and loops(10) == (10, 50) and loops(50) == (50, 10)
    assert loops(12) == (10, 50) and loops(10, outer=3, inner=2) == (3, 2)


def test_dc_gradient_match_reaches_synthetic_pixels(digits):
    torch.manual_seed(0)
    net = make_net(NET, 1, 10, 8)
    xr, yr = digits.x_train[:32], digits.y_train[:32]
    xs = xr[:4].clone().requires_grad_(True)
    loss = gradient_match_loss(net, xr, yr, xs, yr[:4])
    (g,) = torch.autograd.grad(loss, xs)
    assert float(loss.detach()) > 0 and float(g.abs().sum()) > 0
    # the same data on both sides: the gradients coincide, the distance vanishes (up to the
    # 1e-6 in the cosine's denominator)
    same = gradient_match_loss(net, xr, yr, xr.clone().requires_grad_(True), yr)
    assert float(same.detach()) < 1e-2 * float(loss.detach())


def _fixed_net_loss(loss_fn, seeds=range(3)):
    total = 0.0
    for s in seeds:
        torch.manual_seed(100 + s)
        total += float(loss_fn(make_net(NET, 1, 10, 8)))
    return total


def test_dc_optimises_the_synthetic_images(small):
    cfg = DCSettings(iterations=6, outer_loop=2, inner_loop=1, lr_img=0.1, init="noise", dsa=False)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = distill_dc(small, 1, cfg, NET, NO_AUG, g)
    start, _ = init_synthetic(small, 1, "noise", torch.Generator().manual_seed(0))
    assert not torch.allclose(out.images, start)

    def match(images):
        def fn(net):
            loss = 0.0
            for c in range(10):
                xr = small.x_train[small.y_train == c]
                loss = loss + gradient_match_loss(
                    net, xr, small.y_train[small.y_train == c], images[c : c + 1],
                    out.labels[c : c + 1],
                )  # fmt: skip
            return loss.detach()

        return fn

    assert _fixed_net_loss(match(out.images)) < _fixed_net_loss(match(start))


# ----------------------------------------------------------------------------- DM


def test_dm_distance_matches_reference_and_batched_embedding():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(2, 5, generator=g)
    ref = sum((a[:, j].mean() - b[:, j].mean()) ** 2 for j in range(5))
    assert float(mean_embedding_distance(a, b)) == pytest.approx(float(ref), rel=1e-5)
    assert float(mean_embedding_distance(a, a[torch.randperm(6)])) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="embedding widths"):
        mean_embedding_distance(a, torch.randn(2, 4))
    # DM embeds all classes in one pass: per-image networks make that exact
    torch.manual_seed(0)
    net = make_net(NET, 1, 10, 8)
    x = torch.randn(9, 1, 8, 8)
    assert torch.allclose(net.embed(x)[4:], net.embed(x[4:]), atol=1e-5)


def test_dm_optimises_the_synthetic_images(small):
    cfg = DMSettings(iterations=15, lr_img=1.0, init="noise", dsa=True)
    out = distill_dm(small, 2, cfg, NET, DSAConfig(), torch.Generator().manual_seed(0))
    start, labels = init_synthetic(small, 2, "noise", torch.Generator().manual_seed(0))

    def dm_loss(images):
        def fn(net):
            with torch.no_grad():
                return sum(
                    mean_embedding_distance(
                        net.embed(small.x_train[small.y_train == c]),
                        net.embed(images[labels == c]),
                    )
                    for c in range(10)
                )

        return fn

    assert _fixed_net_loss(dm_loss(out.images)) < 0.7 * _fixed_net_loss(dm_loss(start))


# ----------------------------------------------------------------------------- MTT


def test_param_distance_loss_is_normalised():
    s, t = torch.zeros(10), torch.ones(10)
    assert float(param_distance_loss(s, s, t)) == pytest.approx(1.0)
    assert float(param_distance_loss(t, s, t)) == pytest.approx(0.0)
    assert float(param_distance_loss(0.5 * t, s, t)) == pytest.approx(0.25)
    assert float(param_distance_loss(2 * t, s, t)) == pytest.approx(1.0)  # overshoot counts
    with pytest.raises(ValueError, match="coincide"):
        param_distance_loss(s, t, t)


def test_unrolled_student_equals_plain_sgd(digits):
    torch.manual_seed(0)
    net = make_net(NET, 1, 10, 8)
    x, y = digits.x_train[:20], digits.y_train[:20]
    lr = 0.05
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for _ in range(4):  # full batch: the order of the images does not matter
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    end = unroll_student(
        net, flat_params(net), x, y, torch.tensor(lr), 4, 20, None, torch.Generator()
    )
    assert torch.allclose(end, flat_params(ref), atol=1e-5)


def test_trajectory_loss_reaches_pixels_and_step_size(digits):
    torch.manual_seed(0)
    net = make_net(NET, 1, 10, 8)
    start = flat_params(net)
    target = start + 0.01 * torch.randn_like(start)
    x = digits.x_train[:10].clone().requires_grad_(True)
    lr = torch.tensor(0.01, requires_grad=True)
    end = unroll_student(
        net, start, x, digits.y_train[:10], lr, 3, 5, DSAConfig(), torch.Generator()
    )
    gx, glr = torch.autograd.grad(param_distance_loss(end, start, target), [x, lr])
    assert float(gx.abs().sum()) > 0 and float(glr.abs()) > 0
    assert torch.isfinite(gx).all()


def test_windows_must_fit_in_the_buffer():
    check_windows(MTTSettings(max_start_epoch=3, expert_epochs=2, experts=ExpertSettings(epochs=4)))
    with pytest.raises(ValueError, match="must be <= experts.epochs"):
        check_windows(
            MTTSettings(max_start_epoch=4, expert_epochs=2, experts=ExpertSettings(epochs=4))
        )


EXPERTS = ExpertSettings(num_experts=2, epochs=3, lr=0.05, batch_size=50)
MTT_TINY = MTTSettings(
    iterations=12, syn_steps=4, expert_epochs=1, max_start_epoch=1, lr_img=300.0, lr_lr=1e-4,
    init="real", dsa=False, experts=EXPERTS,
)  # fmt: skip


def test_expert_buffer_is_cached_as_safetensors(small, cache):
    buf, info = expert_buffer(small, NET, EXPERTS, NO_AUG)
    assert len(buf) == 2 and buf[0].shape[0] == 4  # initial + 3 epochs
    assert not torch.equal(buf[0][0], buf[1][0])  # experts start from different inits
    assert info["expert_train_seconds"] > 0
    files = sorted(p.name for p in (cache / "dataset_distill" / "experts").rglob("*.safetensors"))
    assert files == ["expert_000.safetensors", "expert_001.safetensors"]
    again, info2 = expert_buffer(small, NET, EXPERTS, NO_AUG)
    assert info2["expert_train_seconds"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(buf, again, strict=True))


def test_mtt_optimises_the_synthetic_images(small, cache):
    buf, _ = expert_buffer(small, NET, EXPERTS, NO_AUG)
    out = match_trajectories(
        small, 2, MTT_TINY, NET, NO_AUG, torch.Generator().manual_seed(0), buf[:1]
    )
    first = [v for _, v in out.curve[:3]]
    last = [v for _, v in out.curve[-3:]]
    assert sum(last) < sum(first)  # one expert, one window: the same target every iteration
    assert out.lr is not None and out.lr != pytest.approx(EXPERTS.lr)


# ----------------------------------------------------------------------------- FTD


def test_gsam_direction():
    g, gp = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    assert torch.equal(gsam_direction(g, gp, 0.0), gp)  # alpha 0: SAM
    d = gsam_direction(g, gp, 0.5)
    # g's component orthogonal to g_p is (0, 1): GSAM subtracts alpha times it
    assert torch.allclose(d, torch.tensor([2.0, -0.5]))
    assert float(((d - gp) * gp).sum()) == pytest.approx(0.0)


def test_gsam_gradient_on_a_quadratic():
    # L(w) = 0.5 w^T A w: g = A w, g_p = A (w + rho g / |g|)
    a = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    rho, alpha = 0.1, 0.3
    fn = gsam_gradient(rho, alpha)
    (d,) = fn(lambda: 0.5 * w @ a @ w, [w])
    g = a @ w.detach()
    gp = a @ (w.detach() + rho * g / g.norm())
    assert torch.allclose(d, gsam_direction(g, gp, alpha), atol=1e-6)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))  # weights restored
    assert not torch.allclose(d, g)


def test_sam_expert_differs_from_sgd_expert(small):
    cfg = ExpertSettings(epochs=1, lr=0.05, batch_size=50)
    trajs = []
    for fn in (None, gsam_gradient(0.05, 0.3)):
        torch.manual_seed(0)
        net = make_net(NET, 1, 10, 8)
        kw = {} if fn is None else {"grad_fn": fn}
        trajs.append(train_expert(net, small, cfg, None, torch.Generator().manual_seed(0), **kw))
    assert torch.equal(trajs[0][0], trajs[1][0]) and not torch.allclose(trajs[0][1], trajs[1][1])


def test_ftd_ema_of_images(small, cache):
    buf, _ = expert_buffer(small, NET, EXPERTS, NO_AUG)

    def run(decay):
        return match_trajectories(
            small, 1, MTT_TINY, NET, NO_AUG, torch.Generator().manual_seed(0), buf, ema_decay=decay
        )

    plain = match_trajectories(
        small, 1, MTT_TINY, NET, NO_AUG, torch.Generator().manual_seed(0), buf
    )
    assert torch.allclose(run(0.0).images, plain.images)  # decay 0: the last iterate
    slow = run(0.999999).images  # an average dominated by the start
    start, _ = init_synthetic(small, 1, "real", torch.Generator().manual_seed(0))
    assert (slow - start).abs().max() < 1e-3 < (plain.images - start).abs().max()
    mid = run(0.5).images
    assert 0 < float((mid - plain.images).abs().max()) < float((start - plain.images).abs().max())


# ----------------------------------------------------------------------------- herding


def _reference_herding(phi, m):
    phi = F.normalize(phi.double(), dim=1)
    mu, chosen = phi.mean(0), []
    for k in range(1, m + 1):
        best, best_d = None, None
        for i in range(len(phi)):
            if i in chosen:
                continue
            d = float(((mu - (phi[chosen].sum(0) + phi[i]) / k) ** 2).sum())
            if best_d is None or d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force_and_beats_random():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 6, generator=g)
    order = herding(feats, 10)
    assert order.tolist() == _reference_herding(feats, 10)
    phi = F.normalize(feats, dim=1)
    err_h = float((phi[order].mean(0) - phi.mean(0)).norm())
    err_r = [
        float((phi[torch.randperm(40, generator=g)[:10]].mean(0) - phi.mean(0)).norm())
        for _ in range(50)
    ]
    assert err_h < min(err_r)
    y = torch.arange(4).repeat_interleave(10)
    idx = herding_subset(feats, y, 4, 3)
    assert y[idx].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    ridx = random_subset(y, 4, 3, g)
    assert y[ridx].tolist() == y[idx].tolist() and len(set(ridx.tolist())) == 12
    with pytest.raises(ValueError, match="ipc=11"):
        random_subset(y, 4, 11, g)
