"""FID / KID / CLIP score hooks: closed forms, a plain O(n^2) KID, the FID Inception's
pytorch-fid layout, and clear messages when the weights are not there."""

from __future__ import annotations

import pytest
import torch

from fewstep.image import eval_hooks as E


def _exact(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose empirical mean and (n - 1)-covariance are exactly ``mean``, ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T  # identity covariance
    return mean + z @ torch.linalg.cholesky(cov).T


def test_fid_is_zero_for_identical_sets_and_the_closed_form_for_two_gaussians():
    import numpy as np
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    assert E.fid(a, a.clone()) == pytest.approx(0.0, abs=1e-8)
    m1, m2 = torch.tensor([0.0, 1, 2, 0]), torch.tensor([1.0, -1, 0, 3])
    r1, r2 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    c1, c2 = (r1 @ r1.T + 0.5 * torch.eye(4)).double(), (r2 @ r2.T + 0.1 * torch.eye(4)).double()
    x, y = _exact(200, m1.double(), c1, 1), _exact(300, m2.double(), c2, 2)
    s1, s2 = c1.numpy(), c2.numpy()
    want = float(((m1 - m2) ** 2).sum()) + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert E.fid(x, y) == pytest.approx(want, rel=1e-6)


def _plain_mmd2(x, y):
    """Binkowski et al. 2018 eq. 3 with k(a, b) = (a.b / d + 1)^3, as explicit loops."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return xx + yy - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)


def test_kid_matches_a_plain_double_loop():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(7, 3, generator=g), torch.randn(9, 3, generator=g) + 0.5
    want = _plain_mmd2(x.double(), y.double())
    assert float(E.mmd2_unbiased(x.double(), y.double())) == pytest.approx(want, rel=1e-9)
    # one subset holding every sample of two equal-size sets is the full-set estimate (MMD
    # does not depend on the order)
    mean, std = E.kid(x, y[:7], subsets=1, subset_size=100)
    assert mean == pytest.approx(_plain_mmd2(x.double(), y[:7].double()), rel=1e-9)
    assert std == 0.0
    mean, std = E.kid(x, y, subsets=5, subset_size=4)  # random subsets: a spread
    assert std > 0
    with pytest.raises(ValueError, match="at least 2 samples"):
        E.kid(x[:1], y)


def test_fid_inception_has_the_pytorch_fid_layout_and_loads_from_a_file(tmp_path):
    from safetensors.torch import save_file

    net = E.InceptionFeatures()
    # torchvision's inception_v3 has 27,161,264 parameters; without its aux head (3,326,696)
    # and with FID's 1008-way fc (+16,392): 23,850,960
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    keys = net.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_5b.branch_pool.bn.running_var",
                "Mixed_6e.branch7x7dbl_5.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.bias",
                "fc.weight"):  # fmt: skip
        assert key in keys, key
    assert keys["Mixed_7a.branch7x7x3_4.conv.weight"].shape == (192, 192, 3, 3)
    torch.manual_seed(0)
    for m in net.modules():  # non-trivial batch-norm statistics, as trained weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "fid.safetensors"))
    loaded = E.InceptionFeatures.from_file(tmp_path / "fid.safetensors")
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = loaded.features(images)
    assert feats.shape == (1, 2048) and (feats >= 0).all()  # after ReLU and average pooling
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    del state["Mixed_6a.branch3x3.conv.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="not an FID Inception v3 state dict"):
        E.InceptionFeatures.from_file(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match=E.INCEPTION_FILE):
        E.InceptionFeatures.from_file(tmp_path / "none.pth")


def test_clip_score_of_embeddings():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]])
    want = torch.tensor([100.0, 0.0, 100 / 2**0.5, 0.0])  # same, opposite (clamped), 45 deg, 90 deg
    torch.testing.assert_close(E.clip_score_from_embeddings(e, t), want)


def test_clip_score_with_a_local_tiny_clip(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from fewstep.image.tiny import clip_tokenizer

    tok = clip_tokenizer(tmp_path / "tok")
    text = CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        image_size=16, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    model = CLIPModel(cfg)
    size = {"shortest_edge": 16}
    proc = CLIPProcessor(CLIPImageProcessor(size=size, crop_size=16), tok)
    folder = tmp_path / "clip"
    model.save_pretrained(str(folder))
    proc.save_pretrained(str(folder))
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "seven", "a cat"]
    score = E.clip_score(images, prompts, folder)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=list(images), return_tensors="pt",
                                              do_rescale=False))  # fmt: skip
        txt = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True))
    assert score == pytest.approx(
        float(E.clip_score_from_embeddings(E.projected(img), E.projected(txt)).mean()), rel=1e-5
    )
    assert 0 <= score <= 100
    with pytest.raises(FileNotFoundError, match="clip_folder"):
        E.clip_score(images, prompts, tmp_path / "missing")
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        E.clip_score(images, prompts[:2], folder)


def test_missing_weights_are_reported_absent_with_the_file_to_get(tmp_path):
    images = {"teacher": torch.rand(2, 3, 8, 8), "student": torch.rand(2, 3, 8, 8)}
    out = E.image_metrics(images, ["a", "b"], "", "")
    assert out["fid_student_vs_teacher"] is None and out["kid_student_vs_teacher"] is None
    assert out["clip_score_student"] is None and "clip_folder" in out["clip_note"]
    assert E.INCEPTION_FILE in out["fid_note"] and "inception_weights" in out["fid_note"]
    out = E.image_metrics(images, ["a", "b"], str(tmp_path / "nope.pth"), "")
    assert str(tmp_path / "nope.pth") in out["fid_note"]
