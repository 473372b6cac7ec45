"""Radiance fields: the shared interface, encodings against hand-computed values, and every
field type fitting renders of a voxel scene."""

import pytest
import torch

from fewstep.threed.cameras import orbit_cameras, rays
from fewstep.threed.fields import (
    FIELDS,
    HASH_PRIMES,
    HashGridEncoding,
    HashGridFieldConfig,
    TensoRFField,
    TensoRFFieldConfig,
    VoxelField,
    make_field,
    toy_voxel_scene,
)
from fewstep.threed.volume import VolumeRenderConfig, render_field, render_rays

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_field_honours_the_interface():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g) * 2.4 - 1.2  # some outside the box
    dirs = torch.nn.functional.normalize(torch.randn(300, 3, generator=g), dim=-1)
    for name in FIELDS:
        torch.manual_seed(0)
        field = make_field(name)
        sigma, rgb = field(pts, dirs)
        assert sigma.shape == (300,) and rgb.shape == (300, 3), name
        assert (sigma >= 0).all() and (rgb >= 0).all() and (rgb <= 1).all(), name
        torch.testing.assert_close(field.density(pts), sigma, msg=name)
        groups = field.parameter_groups()
        assert sum(p.numel() for ps in groups.values() for p in ps) == sum(
            p.numel() for p in field.parameters()
        )
        if name != "mlp":  # grid fields are empty outside their box
            assert (sigma[~field.inside(pts)] == 0).all(), name


def test_registry_errors_name_the_choices():
    with pytest.raises(KeyError, match="hashgrid"):
        make_field("nerfacto")
    with pytest.raises(TypeError, match="resolution"):
        make_field("voxel", n_levels=3)


def test_hash_encoding_at_vertices_matches_scalar_hash():
    """At a level's grid vertices the encoding returns that vertex's table entry, indexed
    densely on coarse levels and by Instant-NGP's uint32 spatial hash (eq. 4) on fine ones."""
    cfg = HashGridFieldConfig(n_levels=3, base_resolution=4, max_resolution=32, log2_table_size=8)
    enc = HashGridEncoding(cfg)
    with torch.no_grad():
        enc.table.copy_(torch.randn(enc.table.shape, generator=torch.Generator().manual_seed(0)))
    T = 2**8
    res = enc.resolutions.tolist()
    assert res == [4, 11, 32]
    g = torch.Generator().manual_seed(1)
    for level, r in enumerate(res):
        verts = torch.randint(0, r, (20, 3), generator=g)  # not the upper boundary
        feats = enc(verts.double() / r).reshape(20, 3, 2)[:, level]
        for v, f in zip(verts.tolist(), feats):
            if (r + 1) ** 3 <= T:
                i = v[0] + (r + 1) * (v[1] + (r + 1) * v[2])
            else:
                h = 0
                for c, prime in zip(v, HASH_PRIMES):
                    h ^= (c * prime) & 0xFFFFFFFF
                i = h % T
            torch.testing.assert_close(f, enc.table[enc.offsets[level] + i].to(f.dtype))


def test_hash_encoding_is_trilinear_within_a_cell():
    enc = HashGridEncoding(HashGridFieldConfig(n_levels=1, base_resolution=8, max_resolution=8))
    with torch.no_grad():
        enc.table.normal_()
    a = torch.tensor([[2.0, 5.0, 1.0]]) / 8
    b = torch.tensor([[3.0, 6.0, 2.0]]) / 8
    corners = [
        enc(torch.tensor([[x, y, z]]) / 8)
        for x in (2.0, 3.0)
        for y in (5.0, 6.0)
        for z in (1.0, 2.0)
    ]
    u = torch.tensor([[0.3, 0.6, 0.2]])
    x = a + (b - a) * u
    w = [
        (u[0, 0] if i else 1 - u[0, 0])
        * (u[0, 1] if j else 1 - u[0, 1])
        * (u[0, 2] if k else 1 - u[0, 2])
        for i in (0, 1)
        for j in (0, 1)
        for k in (0, 1)
    ]
    torch.testing.assert_close(enc(x), sum(wi * c for wi, c in zip(w, corners)))


def test_voxel_grid_axes_follow_xyz_indexing():
    g = torch.Generator().manual_seed(0)
    r = 5
    dens = torch.rand(r, r, r, generator=g) * 10 + 0.5
    rgb = torch.rand(r, r, r, 3, generator=g) * 0.8 + 0.1
    field = VoxelField.from_grids(dens, rgb)
    idx = torch.randint(0, r, (30, 3), generator=g)
    pts = -1 + 2 * idx.float() / (r - 1)  # vertex positions in [-1, 1]^3
    sigma, col = field(pts, torch.zeros_like(pts) + torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(sigma, dens[idx[:, 0], idx[:, 1], idx[:, 2]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(col, rgb[idx[:, 0], idx[:, 1], idx[:, 2]], rtol=1e-4, atol=1e-4)


def test_tensorf_vm_factors_follow_their_axes():
    """With only the XY-plane x Z-line pair nonzero, the density feature at a vertex is
    M[y, x] * v[z] (TensoRF's VM decomposition, one mode, one component)."""
    cfg = TensoRFFieldConfig(resolution=6, density_components=1, density_shift=0.0)
    field = TensoRFField(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*field.density_planes, *field.density_lines]:
            p.zero_()
        field.density_planes[0].copy_(torch.rand(1, 1, 6, 6, generator=g))
        field.density_lines[0].copy_(torch.rand(1, 1, 6, 1, generator=g))
    idx = torch.randint(0, 6, (25, 3), generator=g)
    pts = -1 + 2 * idx.float() / 5
    plane, line = field.density_planes[0][0, 0], field.density_lines[0][0, 0, :, 0]
    feat = plane[idx[:, 1], idx[:, 0]] * line[idx[:, 2]]
    torch.testing.assert_close(field.density(pts), torch.nn.functional.softplus(feat))


# ---------------------------------------------------------------------------------------------
# Fitting: every field must be able to represent the scene
# ---------------------------------------------------------------------------------------------

RENDER = VolumeRenderConfig(n_samples=16)


@pytest.fixture(scope="session")
def voxel_target():
    """Two 16x16 views of the toy voxel scene, their rays and the rendered colours."""
    cams = orbit_cameras(2, radius=3.0, elevation=25.0, fov=40.0, size=16, azimuth_start=20.0)
    with torch.no_grad():
        image = render_field(toy_voxel_scene(), cams, RENDER)["image"]
    o, d = rays(cams)
    return cams, image, o.reshape(-1, 3), d.reshape(-1, 3), image.reshape(-1, 3)


# Per field: config for a CPU-sized model, and (grid lr, network lr) as in each paper's
# split (TensoRF: 0.02 / 1e-3; Instant-NGP: 1e-2 for both). The MLP's positional encoding
# drops to 4 octaves: NeRF's 10 serve 800-px images, a 16-px view needs about log2(800/16)
# fewer.
FIT = {
    "voxel": ({}, (0.1, 0.1)),
    "mlp": ({"n_freqs_pos": 4}, (5e-3, 5e-3)),
    "hashgrid": ({"n_levels": 4, "max_resolution": 64, "log2_table_size": 12}, (2e-2, 1e-2)),
    "tensorf": ({"resolution": 32, "app_dim": 12, "hidden": 32}, (5e-2, 2e-3)),
}


@pytest.mark.parametrize("name", sorted(FIT))
def test_field_fits_voxel_scene(name, voxel_target):
    """150 Adam steps on random 128-ray batches. The fitted renders must explain >= 90 % of
    the target's pixel variance (MSE <= 0.1 x variance) and cut the initial MSE tenfold; a
    field that cannot represent the scene (broken encoding, wrong axes) stays near 1."""
    cams, target, o, d, colors = voxel_target
    torch.manual_seed(0)
    kwargs, (lr_grid, lr_net) = FIT[name]
    field = make_field(name, **kwargs)
    groups = field.parameter_groups()
    opt = torch.optim.Adam(
        [{"params": groups["grid"], "lr": lr_grid}, {"params": groups["network"], "lr": lr_net}]
    )
    train = VolumeRenderConfig(n_samples=16, stratified=True)
    g = torch.Generator().manual_seed(0)

    def full_mse():
        with torch.no_grad():
            return (render_field(field, cams, RENDER)["image"] - target).square().mean().item()

    before = full_mse()
    for _ in range(150):
        idx = torch.randint(0, o.shape[0], (128,), generator=g)
        out = render_rays(field, o[idx], d[idx], train, generator=g)
        loss = (out["rgb"] - colors[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full_mse()
    variance = (target - target.mean((0, 1, 2))).square().mean().item()
    assert after <= 0.1 * variance, f"{name}: MSE {after:.5f} vs target variance {variance:.5f}"
    assert after <= 0.1 * before, f"{name}: MSE {before:.5f} -> {after:.5f}"
