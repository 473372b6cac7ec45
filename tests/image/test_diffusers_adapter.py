"""Core's diffusers adapter, tested here because diffusers is an image dependency (core's
own environment does not install it)."""

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from fewstep.core.models import DiffusersUNetDenoiser
from fewstep.core.paths import make_path

# --- diffusers adapters ------------------------------------------------------------------


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=11,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _tiny_cond_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def test_unet2d_adapter_matches_direct_call_with_class_labels():
    unet = _tiny_unet()
    path = make_path("rectified_flow")
    den = DiffusersUNetDenoiser(unet, path, "velocity")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    labels = torch.tensor([4, 10])
    with torch.no_grad():
        got = den(x, t, labels)
        want = unet(x, timestep=path.network_time(t), class_labels=labels).sample
        other = den(x, t, torch.tensor([0, 1]))
        later = den(x, torch.tensor([0.9, 0.1]), labels)
        scalar = den(x, 0.3, labels)
        direct_scalar = unet(x, timestep=torch.full((2,), 300.0), class_labels=labels).sample
    assert got.shape == x.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(scalar, direct_scalar)
    # labels and time actually reach the network
    assert float((got - other).abs().max()) > 1e-6
    assert float((got - later).abs().max()) > 1e-6
    # dict conditions are passed as keyword arguments
    with torch.no_grad():
        torch.testing.assert_close(den(x, t, {"class_labels": labels}), want)


def test_unet2d_features_are_mid_block_output():
    unet = _tiny_unet()
    den = DiffusersUNetDenoiser(unet, make_path("vp_discrete"), "eps")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t, labels = torch.tensor([100.0, 900.0]), torch.tensor([1, 2])
    full: list[torch.Tensor] = []
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: full.append(o))
    with torch.no_grad():
        den(x, t, labels)
    handle.remove()
    ran_up: list[bool] = []
    unet.up_blocks[0].register_forward_hook(lambda m, i, o: ran_up.append(True))
    with torch.no_grad():
        f = den.features(x, t, labels)
        f2 = den.features(x, torch.tensor([500.0, 500.0]), labels)
    # one downsampling (8 -> 4); the bottleneck has the last block's channel count
    assert f.shape == (2, 16, 4, 4)
    torch.testing.assert_close(f, full[0])  # the mid block's output of a full forward
    assert not ran_up  # and the decoder never ran
    assert float((f - f2).abs().max()) > 1e-6
    assert len(unet.mid_block._forward_hooks) == 0  # the hook is removed


def test_unet2d_condition_model_tensor_and_dict_conditions():
    unet = _tiny_cond_unet()
    path = make_path("vp_discrete", schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    den = DiffusersUNetDenoiser(unet, path, "eps")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 8, 8, generator=g)
    ehs = torch.randn(2, 5, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=ehs).sample
        as_tensor = den(x, t, ehs)
        as_dict = den(x, t, {"encoder_hidden_states": ehs})
        other = den(x, t, torch.zeros_like(ehs))
        f = den.features(x, t, ehs)
    torch.testing.assert_close(as_tensor, want)
    torch.testing.assert_close(as_dict, want)
    assert float((as_tensor - other).abs().max()) > 1e-6  # the condition matters
    assert f.shape == (2, 16, 4, 4)
    # predict converts the eps output like any other denoiser
    torch.testing.assert_close(
        den.predict(x, t, ehs, kind="x0"), path.convert(want, "eps", "x0", x, t)
    )
