"""The conventions of docs/conventions.md ("Conventions"), as executable checks."""
import numpy as np
import pytest
import torch

from regedu import metrics, spatial
from regedu.spatial import (affine_to_displacement, compose, identity_grid, integrate_velocity,
                            resize_field, warp, warp_points)

from conftest import smooth_field

SHAPES = [(17, 23), (9, 12, 14)]


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_warp_is_exact(shape):
    img = torch.rand(2, 3, *shape)
    assert torch.equal(warp(img, torch.zeros(2, len(shape), *shape)), img)
    labels = torch.randint(0, 40, (1, 1, *shape))
    out = warp(labels, torch.zeros(1, len(shape), *shape))
    assert out.dtype == labels.dtype and torch.equal(out, labels)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [3, -2])
def test_integer_translation_moves_image_exactly(axis, shift):
    shape = (9, 12, 14)
    img = torch.rand(1, 1, *shape)
    u = torch.zeros(1, 3, *shape)
    u[:, axis] = shift
    out = warp(img, u)
    # out[x] = img[x + shift]: content moves by -shift along `axis`, zeros enter.
    n = shape[axis]
    kept = slice(0, n - shift) if shift > 0 else slice(-shift, n)
    source = slice(shift, n) if shift > 0 else slice(0, n + shift)
    entered = slice(n - shift, n) if shift > 0 else slice(0, -shift)
    sel = lambda s: (slice(None), slice(None)) + tuple(s if k == axis else slice(None) for k in range(3))
    assert torch.equal(out[sel(kept)], img[sel(source)])
    assert torch.equal(out[sel(entered)], torch.zeros_like(out[sel(entered)]))


def test_convention_single_pixel_moves_opposite_to_displacement():
    img = torch.zeros(1, 1, 8, 10)
    img[0, 0, 5, 7] = 1.0
    u = torch.zeros(1, 2, 8, 10)
    u[:, 0] = 2.0   # rows
    u[:, 1] = -1.0  # columns
    out = warp(img, u)
    # warped(x) = img(x + u): the bright pixel is found where x + u = (5, 7).
    assert out[0, 0, 3, 8] == 1.0 and out.sum() == 1.0


def test_subpixel_translation_interpolates_linearly():
    img = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 4, 10).contiguous()
    u = torch.zeros(1, 2, 4, 10)
    u[:, 1] = 0.25
    out = warp(img, u, padding="border")
    assert torch.allclose(out[..., :-1], img[..., :-1] + 0.25, atol=1e-5)


def test_border_padding_repeats_edge():
    img = torch.rand(1, 1, 6, 7)
    u = torch.zeros(1, 2, 6, 7)
    u[:, 1] = 100
    out = warp(img, u, padding="border")
    assert torch.equal(out, img[..., -1:].expand_as(img))


def test_nearest_keeps_label_values_under_subpixel_motion():
    labels = torch.randint(0, 5, (1, 1, 16, 18)).to(torch.int32)
    u = smooth_field((16, 18), 2.5)
    out = warp(labels, u)
    assert out.dtype == torch.int32
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())
    float_out = warp(labels.float(), u, mode="nearest")
    assert torch.equal(float_out.to(torch.int32), out)


@pytest.mark.parametrize("shape", [(21, 26), (11, 13, 17)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_agrees_with_voxelmorph(shape, mode):
    vxm = pytest.importorskip("voxelmorph")
    img = torch.rand(2, 2, *shape)
    u = torch.cat([smooth_field(shape, 4.0, seed=1), smooth_field(shape, 4.0, seed=2)])
    ours = warp(img, u, mode=mode)
    theirs = vxm.nn.functional.spatial_transform(img, u, method="linear" if mode == "bilinear" else "nearest")
    if mode == "bilinear":
        assert torch.allclose(ours, theirs, atol=1e-5)
    else:  # nearest may round a point on a half-voxel boundary either way
        assert (ours != theirs).float().mean() < 1e-3


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_warp_gradcheck(shape):
    img = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    u = (smooth_field(shape, 1.5, dtype=torch.float64) + 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, d: warp(i, d, padding="border"), (img, u))


def test_gradient_flows_through_zero_field():
    img = torch.rand(1, 1, 10, 12)
    u = torch.zeros(1, 2, 10, 12, requires_grad=True)
    warp(img, u).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_identity_grid_order():
    g = identity_grid((3, 4, 5))
    assert g.shape == (1, 3, 3, 4, 5)
    assert g[0, 0, 2, 0, 0] == 2 and g[0, 1, 0, 3, 0] == 3 and g[0, 2, 0, 0, 4] == 4


def test_affine_translation_and_rotation_about_centre():
    m = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -3.0]]])
    u = affine_to_displacement(m, (5, 6))
    assert torch.equal(u[0, 0], torch.full((5, 6), 2.0)) and torch.equal(u[0, 1], torch.full((5, 6), -3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    rot = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float32)
    u = affine_to_displacement(rot, (9, 9), center="image")
    assert u[0, :, 4, 4].abs().max() < 1e-6
    assert not torch.allclose(affine_to_displacement(rot, (9, 9)), u)


@pytest.mark.parametrize("nd", [2, 3])
def test_jacobian_of_affine_field_is_matrix_determinant(nd):
    A = torch.eye(nd) + 0.2 * torch.randn(nd, nd)
    m = torch.cat([A, torch.randn(nd, 1)], 1)[None]
    shape = (12, 13, 14)[:nd]
    det = metrics.jacobian_determinant(affine_to_displacement(m, shape))
    interior = (slice(None),) + (slice(1, -1),) * nd
    assert torch.allclose(det[interior], torch.linalg.det(A).expand_as(det[interior]), atol=1e-4)


def test_compose_matches_sequential_warping():
    shape = (32, 36)
    img = torch.from_numpy(np.outer(np.sin(np.linspace(0, 3, 32)), np.cos(np.linspace(0, 4, 36)))).float()[None, None]
    u1, u2 = smooth_field(shape, 2.0, seed=3), smooth_field(shape, 2.0, seed=4)
    two_steps = warp(warp(img, u1, padding="border"), u2, padding="border")
    one_step = warp(img, compose(u1, u2), padding="border")
    inner = (..., slice(4, -4), slice(4, -4))
    assert (two_steps - one_step)[inner].abs().max() < 0.02


def test_compose_with_numerical_inverse_is_near_zero():
    shape = (40, 44)
    u = smooth_field(shape, 3.0, seed=5)
    v = -u.clone()
    for _ in range(30):  # fixed point of v = -u o (id + v)
        v = -warp(u, v, padding="border")
    residual = compose(u, v)
    assert residual.abs().max() < 0.05
    assert u.abs().max() > 2.9


def test_integration_avoids_folding_where_displacement_folds():
    shape = (48, 48)
    v = smooth_field(shape, 12.0, seed=6, sigma_frac=0.08)
    folded = metrics.folding_stats(v)["percent_folding"]
    smooth = metrics.folding_stats(integrate_velocity(v, steps=7))["percent_folding"]
    assert folded > 1.0, "the test field must fold when used directly"
    assert smooth < 0.05


def test_integrate_zero_steps_is_identity_map_on_field():
    v = smooth_field((10, 11), 1.0)
    assert torch.equal(integrate_velocity(v, steps=0), v)


def test_resize_field_rescales_values():
    u = torch.zeros(1, 2, 33, 17)
    u[:, 0], u[:, 1] = 1.0, -2.0
    big = resize_field(u, (65, 33))
    assert big.shape == (1, 2, 65, 33)
    assert torch.allclose(big[:, 0], torch.full_like(big[:, 0], 2.0))
    assert torch.allclose(big[:, 1], torch.full_like(big[:, 1], -4.0))


def test_warp_points_follows_field():
    shape = (20, 24)
    u = smooth_field(shape, 3.0, seed=7)
    pts = torch.tensor([[3.0, 4.0], [10.0, 17.0], [19.0, 0.0]])
    out = warp_points(pts, u)
    expected = pts + torch.stack([u[0, :, int(p[0]), int(p[1])] for p in pts])
    assert torch.allclose(out, expected, atol=1e-5)
    half = warp_points(torch.tensor([[3.5, 4.0]]), u)
    assert torch.allclose(half[0, 0] - 3.5, (u[0, 0, 3, 4] + u[0, 0, 4, 4]) / 2, atol=1e-5)


def test_warp_points_agrees_with_image_warp():
    # A bright pixel at p in the moving image is seen at the fixed point q with q + u(q) = p.
    shape = (30, 30)
    u = torch.zeros(1, 2, *shape)
    u[:, 0], u[:, 1] = 2.0, -3.0
    q = torch.tensor([[10.0, 12.0]])
    p = warp_points(q, u)
    moving = torch.zeros(1, 1, *shape)
    moving[0, 0, int(p[0, 0]), int(p[0, 1])] = 1
    fixed_view = warp(moving, u)
    assert fixed_view[0, 0, 10, 12] == 1


def test_spatial_transformer_module_matches_function():
    img, u = torch.rand(1, 1, 8, 9), smooth_field((8, 9), 1.2)
    assert torch.equal(spatial.SpatialTransformer()(img, u), warp(img, u))
    assert torch.equal(spatial.IntegrateVelocity(4)(u), integrate_velocity(u, 4))


def test_batch_broadcast():
    atlas = torch.rand(1, 1, 10, 12)
    fields = torch.cat([smooth_field((10, 12), 2.0, seed=s) for s in range(3)])
    out = warp(atlas, fields)
    assert out.shape == (3, 1, 10, 12)
    assert torch.allclose(out[1:2], warp(atlas, fields[1:2]))
