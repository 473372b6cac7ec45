"""Image dataset distillation: data, ZCA, networks, DSA (pure pieces, CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.dataset_distill.images import augment as A
from fewstep.dataset_distill.images.data import (
    ZCA,
    DataConfig,
    Standardise,
    check_ipc,
    dataset_tensors,
    init_synthetic,
    load_image_data,
    stratified_split,
)
from fewstep.dataset_distill.images.nets import (
    NETS,
    NetConfig,
    flat_params,
    functional_forward,
    make_net,
    unflatten,
)

CFG = A.DSAConfig()


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


# ----------------------------------------------------------------------------- data


def test_digits_split_is_fixed_stratified_and_standardised(digits):
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.num_classes == 10
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20 % of every class
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3
    again = load_image_data(DataConfig())
    assert torch.equal(again.x_test, digits.x_test)
    other = load_image_data(DataConfig(split_seed=1))
    assert not torch.equal(other.y_test, digits.y_test)


def test_stratified_split_partitions_every_class():
    y = torch.arange(5).repeat_interleave(torch.tensor([10, 20, 3, 2, 50]))
    tr, te = stratified_split(y, 0.25, seed=3)
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(len(y)))
    for c, n in enumerate([10, 20, 3, 2, 50]):
        n_te = int((y[te] == c).sum())
        assert 1 <= n_te < n and abs(n_te - n * 0.25) <= 1
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, 1.5, 0)


def test_standardise_and_zca_invert_and_zca_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g)
    x = (torch.randn(4000, 16, generator=g) @ mix).view(4000, 1, 4, 4)
    s = Standardise.fit(x)
    assert torch.allclose(s.inverse(s.forward(x)), x, atol=1e-5)
    zca = ZCA.fit(x, eps=1e-6)
    z = zca.forward(x).reshape(len(x), -1)
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(16), atol=2e-2)  # white
    assert torch.allclose(zca.inverse(zca.forward(x)), x, atol=1e-3)
    # with a regulariser, the variance along an eigenvector is s / (s + eps) < 1
    big = ZCA.fit(x, eps=10.0)
    assert float(torch.cov(big.forward(x).reshape(len(x), -1).T).diagonal().max()) < 1.0
    with pytest.raises(ValueError, match="zca_eps"):
        ZCA.fit(x, eps=0.0)


def test_digits_with_zca(digits):
    d = load_image_data(DataConfig(zca=True))
    assert d.transform.name == "zca"
    back = d.to_pixels(d.x_train[:5])
    raw = digits.to_pixels(digits.x_train[:5])
    assert torch.allclose(back, raw, atol=1e-4)  # same images, other space


def _write_folder(root, classes=("cat", "dog", "eel"), n=4, size=12):
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = Image.new("RGB", (size, size), (40 * k + i, 100, 200 - 30 * k))
            img.save(root / c / f"{i}.png")


def test_image_folder_reader(tmp_path):
    _write_folder(tmp_path / "imgs")
    d = load_image_data(
        DataConfig(dataset=str(tmp_path / "imgs"), image_size=8, channels=3, test_fraction=0.25)
    )
    assert d.classes == ("cat", "dog", "eel")
    assert d.x_train.shape == (9, 3, 8, 8) and d.x_test.shape == (3, 3, 8, 8)
    assert sorted(d.y_test.tolist()) == [0, 1, 2]
    # pixels survive the round trip through the standardisation
    px = d.to_pixels(d.x_train[d.y_train == 2][:1])
    assert abs(float(px[0, 2].mean()) - (200 - 60) / 255) < 0.02


def test_image_folder_with_given_split(tmp_path):
    _write_folder(tmp_path / "d" / "train", n=3)
    _write_folder(tmp_path / "d" / "test", n=1)
    d = load_image_data(DataConfig(dataset=str(tmp_path / "d"), image_size=6))
    assert d.x_train.shape == (9, 1, 6, 6) and d.y_test.tolist() == [0, 1, 2]


def test_bad_data_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_image_data(DataConfig(dataset=str(tmp_path / "nothing")))
    _write_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_data(DataConfig(dataset=str(tmp_path / "one")))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        load_image_data(DataConfig(dataset=str(tmp_path / "empty")))


def test_torchvision_style_dataset_objects():
    from PIL import Image

    class DS:
        classes = ["zero", "one", "two"]

        def __init__(self, labels):
            self.labels = labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            if i % 2:  # mixed image types, as datasets with transforms produce
                return torch.full((1, 5, 5), float(self.labels[i]) / 2), self.labels[i]
            return Image.new("L", (5, 5), 100 * self.labels[i]), self.labels[i]

    cfg = DataConfig(image_size=5)
    d = load_image_data(cfg, train=DS([0, 1, 2] * 4), test=DS([2, 1]))
    assert d.classes == ("zero", "one", "two") and d.y_test.tolist() == [2, 1]
    x, y, _, _ = dataset_tensors(DS([1, 2]), 5, 1)
    assert y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="do not occur in the training data"):
        load_image_data(cfg, train=DS([0, 1] * 4), test=DS([2]))
    with pytest.raises(TypeError, match="__getitem__"):
        dataset_tensors(42, 5, 1)


def test_ipc_checks_and_synthetic_init(digits):
    check_ipc(digits, 50)
    with pytest.raises(ValueError, match="at least 500 training images in every class"):
        check_ipc(digits, 500)
    g = torch.Generator().manual_seed(0)
    x, y = init_synthetic(digits, 3, "real", g)
    assert x.shape == (30, 1, 8, 8) and y.tolist() == [c for c in range(10) for _ in range(3)]
    for img, lab in zip(
        x, y, strict=True
    ):  # real init: each image is a training image of its class
        hits = (digits.x_train == img).flatten(1).all(1)
        assert bool(hits.any()) and int(digits.y_train[hits][0]) == int(lab)
    with pytest.raises(ValueError, match="'real', 'noise'"):
        init_synthetic(digits, 1, "zeros", g)


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("arch", sorted(NETS))
def test_functional_forward_matches_module(arch):
    torch.manual_seed(0)
    net = make_net(NetConfig(), 1, 10, 8, arch)
    x = torch.randn(5, 1, 8, 8)
    flat = flat_params(net)
    assert torch.allclose(functional_forward(net, flat, x), net(x), atol=1e-6)
    assert net.embed(x).shape[0] == 5
    # a different vector gives a different function, and gradients reach the vector
    flat2 = (flat + 0.1 * torch.randn_like(flat)).requires_grad_(True)
    out = functional_forward(net, flat2, x)
    assert not torch.allclose(out, net(x))
    out.sum().backward()
    assert flat2.grad is not None and flat2.grad.abs().sum() > 0


def test_net_errors():
    with pytest.raises(KeyError, match="available: convnet, mlp, resnet"):
        make_net(NetConfig(arch="vit"), 1, 10, 8)
    with pytest.raises(ValueError, match="depth"):
        make_net(NetConfig(depth=4), 1, 10, 8)
    net = make_net(NetConfig(), 1, 10, 8)
    with pytest.raises(ValueError, match="flat parameter vector"):
        unflatten(net, torch.zeros(3))


# ----------------------------------------------------------------------------- DSA


def _aug(op, **params):
    return A.Aug(op, {k: torch.as_tensor(v) for k, v in params.items()})


def test_rotation_by_quarter_turn_is_rot90():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    out = A.apply_aug(x, _aug("rotate", angle=[math.pi / 2]), CFG)
    assert torch.allclose(out, torch.rot90(x, -1, dims=(2, 3)), atol=1e-4)


def test_scale_one_is_identity_and_scale_two_zooms_out():
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(A.apply_aug(x, _aug("scale", factors=[[1.0, 1.0]]), CFG), x, atol=1e-5)
    # factor 2 samples the input at twice the coordinates: the centre of the output
    # shows the whole input shrunk
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 8] = 1.0  # right edge, middle row
    out = A.apply_aug(img, _aug("scale", factors=[[2.0, 2.0]]), CFG)
    assert out[0, 0, 4, 6] == pytest.approx(1.0, abs=1e-5)


def test_translation_shifts_with_zero_fill():
    x = torch.randn(2, 3, 8, 8)
    out = A.translate(x, torch.tensor([[1, 0], [0, -2]]))
    assert torch.equal(out[0, :, :7], x[0, :, 1:]) and out[0, :, 7].abs().sum() == 0
    assert torch.equal(out[1, :, :, 2:], x[1, :, :, :6]) and out[1, :, :, :2].abs().sum() == 0
    # laid out like its input even with one channel (a channels-last-like layout there made
    # a small ResNet's conv backward crash on CPU)
    grey = torch.randn(3, 1, 8, 8)
    assert A.translate(grey, torch.tensor([[1, 1]] * 3)).stride() == grey.stride()


def test_cutout_zeroes_one_square():
    x = torch.ones(1, 1, 8, 8)
    out = A.apply_aug(x, _aug("cutout", centre=[[4, 5]]), CFG)  # side round(0.5*8) = 4
    assert int((out == 0).sum()) == 16
    assert out[0, 0, 2:6, 3:7].abs().sum() == 0


def test_flip_and_neutral_colour():
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(A.apply_aug(x, _aug("flip", flip=[[[[True]]]]), CFG), x.flip(3))
    # b = 0.5 (no shift), s = 0.5 (factor 2 * 0.5 = 1), c = 0.5 (factor 0.5 + 0.5 = 1)
    half = [[[[0.5]]]]
    neutral = _aug("color", brightness=half, saturation=half, contrast=half)
    assert torch.allclose(A.apply_aug(x, neutral, CFG), x, atol=1e-6)
    bright = _aug("color", brightness=[[[[1.0]]]], saturation=half, contrast=half)
    assert torch.allclose(A.apply_aug(x, bright, CFG), x + 0.5, atol=1e-6)


def test_siamese_parameters_are_shared_and_every_family_is_differentiable():
    g = torch.Generator().manual_seed(0)
    real, syn = torch.randn(7, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for op in A.FAMILIES:
        cfg = A.DSAConfig(strategy=op)
        aug = A.sample_aug(cfg, 7, 8, g, siamese=True)
        assert aug.op == op and all(len(v) == 1 for v in aug.params.values())
        both = A.apply_aug(torch.cat([real, syn]), aug, cfg)
        assert torch.allclose(both[:7], A.apply_aug(real, aug, cfg))
        assert torch.allclose(both[7:], A.apply_aug(syn, aug, cfg))
        s = syn.clone().requires_grad_(True)
        (A.apply_aug(s, aug, cfg) ** 2).sum().backward()
        assert s.grad is not None and float(s.grad.abs().sum()) > 0, op
    per_image = A.sample_aug(A.DSAConfig(strategy="rotate"), 7, 8, g, siamese=False)
    assert per_image.params["angle"].shape == (7,)
    angles = per_image.params["angle"].abs().max()
    assert 0 < float(angles) <= math.radians(15)


def test_strategy_errors_list_families():
    with pytest.raises(ValueError, match="available: color, crop, cutout, flip, scale, rotate"):
        A.parse_strategy("color_blur")
    assert A.sample_aug(A.DSAConfig(strategy="none"), 4, 8, torch.Generator(), True) is None
