"""regedu.classic: the ANTs conversion and instance optimisation recover known answers."""
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from regedu import classic, losses
from regedu.spatial import affine_to_displacement, warp

from conftest import smooth_field

ants = pytest.importorskip("ants")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(shape, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    f = gaussian_filter(rng.random(shape), sigma)
    return ((f - f.min()) / (f.max() - f.min())).astype(np.float32)


def _smooth_field(shape, amplitude, seed=1, sigma=4.0):
    u = smooth_field(shape, amplitude, seed=seed, sigma_frac=sigma / shape[0], dtype=torch.float64)
    return u[0].numpy()


def _pull(image, disp):
    """Reference warp with scipy: image(x + disp(x)), linear, edge values outside."""
    return map_coordinates(image, np.indices(image.shape) + disp, order=1,
                           mode="nearest").astype(np.float32)


def _inside(u):
    """Voxels whose sample point x + u(x) lies inside the image (padding plays no part)."""
    shape = u.shape[2:]
    pts = np.indices(shape) + u[0].numpy()
    return np.all([(p >= 0) & (p <= n - 1) for p, n in zip(pts, shape)], axis=0)


# ------------------------------------------------------------------ ANTs

# ANTs' default affine schedule shrinks by 6 first: on a 48x52 test image that
# leaves 8x9 pixels and the optimiser sometimes lands in a local minimum (and
# ITK's threads make runs differ). A gentler, dense-sampled schedule is stable.
SMALL = dict(aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1, 0), aff_iterations=(200, 100),
             aff_random_sampling_rate=1.0)

def test_missing_antspyx_says_where_it_has_wheels(monkeypatch):
    monkeypatch.setitem(sys.modules, "ants", None)
    classic.ants_missing.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"antspyx is not installed here .*wheel"):
            classic.ants_syn(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32))
        note = classic.ants_missing()
        assert note.startswith("ANTs rows skipped: antspyx is not installed here") and "\n" not in note
    finally:
        monkeypatch.undo()
        classic.ants_missing.cache_clear()
    assert classic.ants_missing() is None  # installed in the test environment


def _write(tx, tmp_path, name="tx.mat"):
    path = str(tmp_path / name)
    ants.write_transform(tx, path)
    return [path]


def test_known_translation_file_converts_to_voxels_in_axis_order(tmp_path):
    # A translation of (6, -1) mm along the physical axes of an image with
    # spacing (2, 0.5): the fixed point x lands at x + (3, -2) voxels.
    fixed = ants.from_numpy(np.zeros((10, 12), np.float32), spacing=(2.0, 0.5))
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=2,
                                    translation=(6.0, -1.0))
    u = classic.ants_to_displacement(_write(tx, tmp_path), fixed)
    assert u.shape == (1, 2, 10, 12) and u.dtype == torch.float32
    torch.testing.assert_close(u[0, 0], torch.full((10, 12), 3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(u[0, 1], torch.full((10, 12), -2.0), atol=1e-5, rtol=0)


def test_affine_with_lps_header_matches_ants_apply_transforms_3d(tmp_path):
    # A rotation about an off-centre point plus translation, on an image with
    # anisotropic spacing, an origin and a flipped (LPS-like) direction: our
    # field must pull the moving image exactly where ANTs does.
    shape = (14, 16, 18)
    moving = _blobs(shape, seed=3, sigma=2.0)
    direction = np.diag([-1.0, -1.0, 1.0])
    kw = dict(origin=(10.0, -4.0, 2.0), spacing=(1.2, 0.9, 1.5), direction=direction)
    fixed_img, moving_img = ants.from_numpy(np.zeros(shape, np.float32), **kw), ants.from_numpy(moving, **kw)
    c, s = np.cos(0.15), np.sin(0.15)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]),
                                    center=(3.0, -9.0, 12.0), translation=(1.0, -2.0, 0.5))
    transforms = _write(tx, tmp_path)
    u = classic.ants_to_displacement(transforms, fixed_img)
    ref = ants.apply_transforms(fixed_img, moving_img, transforms).numpy()
    ours = warp(torch.from_numpy(moving)[None, None], u)[0, 0].numpy()
    inside = _inside(u)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-4)
    # The field is affine in voxel space: check it against regedu's own affine.
    A = np.linalg.lstsq(np.c_[np.indices(shape).reshape(3, -1).T, np.ones(np.prod(shape))],
                        (np.indices(shape) + u[0].numpy()).reshape(3, -1).T, rcond=None)[0].T
    again = affine_to_displacement(torch.tensor(A, dtype=torch.float32)[None], shape)
    torch.testing.assert_close(again, u, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shape", [(48, 56), (20, 24, 28)])
def test_syn_field_warps_like_ants_apply_transforms(shape, tmp_path):
    fixed = _blobs(shape)
    moving = _pull(fixed, _smooth_field(shape, 3.0))
    F = ants.from_numpy(fixed, spacing=(1.5,) * len(shape))
    M = ants.from_numpy(moving, spacing=(1.5,) * len(shape))
    reg = ants.registration(F, M, "SyN", reg_iterations=(20, 10, 0),
                            outprefix=str(tmp_path / "reg_"), **SMALL)
    u = classic.ants_to_displacement(reg["fwdtransforms"], F)
    ref = ants.apply_transforms(F, M, reg["fwdtransforms"]).numpy()
    ours = warp(torch.from_numpy(moving)[None, None], u)[0, 0].numpy()
    inside = _inside(u)
    assert inside.mean() > 0.8 and u.abs().max() > 0.5  # a real, non-trivial field
    np.testing.assert_allclose(ours[inside], ref[inside], atol=1e-4)


@pytest.mark.parametrize("shape, shift", [((40, 48), (3.0, 0.0)), ((40, 48), (0.0, -2.0)),
                                          ((24, 28, 32), (0.0, 0.0, 2.5))])
def test_known_translation_has_the_right_sign_and_axis(shape, shift):
    fixed = _blobs(shape)
    # moving(x) = fixed(x - t): the content moved by +t, so the fixed point x
    # lies at x + t in the moving image and u = +t.
    t = np.array(shift).reshape(-1, *([1] * len(shape))) * np.ones((len(shape),) + shape)
    moving = _pull(fixed, -t)
    u = classic.ants_register(moving, fixed, "Translation", **SMALL)
    assert u.shape == (1, len(shape)) + shape
    median = u[0].reshape(len(shape), -1).median(dim=1).values
    torch.testing.assert_close(median, torch.tensor(shift, dtype=torch.float32), atol=0.15, rtol=0)


def test_ants_affine_recovers_a_known_affine():
    shape = (48, 52)
    fixed = _blobs(shape, seed=5)
    A = torch.tensor([[[1.05, 0.08, 1.5], [-0.06, 0.97, -1.0]]])
    truth = affine_to_displacement(A, shape, center="image")
    moving = _pull(fixed, -truth[0].numpy())  # content moved by ~+truth
    u = classic.ants_affine(torch.from_numpy(moving)[None, None],
                            torch.from_numpy(fixed)[None, None], spacing=2.0, **SMALL)
    # moving(x) = fixed(x - truth(x)): the answer is truth's inverse, equal to
    # truth up to second-order terms of this mild affine.
    assert (u - truth)[..., 8:-8, 8:-8].norm(dim=1).mean() < 0.25
    # Pulling the moving back must undo the motion: compare in the interior.
    warped = warp(torch.from_numpy(moving)[None, None], u)[0, 0]
    inner = (slice(8, -8), slice(8, -8))
    before = np.abs(moving - fixed)[inner].mean()
    after = (warped - torch.from_numpy(fixed)).abs()[inner].mean().item()
    assert after < 0.25 * before


def test_ants_affine_is_reproducible_with_its_default_seed():
    # ANTs reads --random-seed 0 as "seed from the clock": regedu's default
    # seed 0 must still give the same field twice, and another seed another one
    # (the metric samples 20% of the voxels at random, so the seed matters).
    shape = (20, 24, 28)
    fixed = _blobs(shape, seed=2, sigma=2.0)
    A = torch.tensor([[[1.04, 0.05, 0.0, 1.0], [-0.03, 0.97, 0.02, -0.5], [0.0, 0.04, 1.02, 0.7]]])
    moving = _pull(fixed, -affine_to_displacement(A, shape, center="image")[0].numpy())
    runs = [classic.ants_affine(moving, fixed, spacing=2.0) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    other = classic.ants_affine(moving, fixed, spacing=2.0, seed=7)
    assert (other - runs[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="seed: expected a non-negative integer"):
        classic.ants_affine(moving, fixed, seed=-1)


def _known_3d_affine(shape, spacing):
    # Rotation about an off-centre point, anisotropic scale, a shift of 6-10 mm:
    # the fixed voxel x lies at M x in the moving image.
    from scipy.spatial.transform import Rotation
    A = Rotation.from_euler("xyz", (8, -6, 10), degrees=True).as_matrix() @ np.diag((1.06, 0.95, 1.02))
    c = np.array(shape) * (0.3, 0.6, 0.45)
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = c + np.array((6.0, -8.0, 10.0)) / np.array(spacing) - A @ c
    return M


@pytest.mark.parametrize("spacing", [(4.0, 4.0, 4.0), (4.0, 4.0, 2.0)])
def test_ants_affine_recovers_a_known_3d_affine_on_a_brain(spacing):
    # The template brain at 4 mm (or 4 x 4 x 2 mm), moved by a known affine
    # with regedu's own warp: ANTs must return that affine's field (not its
    # inverse), in voxels, to well under a voxel.
    from regedu.datasets import mni_brain
    img = torch.from_numpy(mni_brain(4).image)[None]
    shape = tuple(int(round(n * 4 / s)) for n, s in zip(img.shape[2:], spacing))
    img = torch.nn.functional.interpolate(img, size=shape, mode="trilinear", align_corners=True)
    M = _known_3d_affine(shape, spacing)
    field = lambda m: affine_to_displacement(torch.tensor(m[:3], dtype=torch.float32)[None], shape)  # noqa: E731
    truth = field(M)
    moving = warp(img, field(np.linalg.inv(M)))  # moving(y) = fixed(M^-1 y)
    u = classic.ants_affine(moving, img, spacing=spacing)
    brain = (img[0, 0] > 0.05)
    error = (u - truth).norm(dim=1)[0][brain]
    assert truth.norm(dim=1)[0][brain].mean() > 4   # a motion of several voxels
    assert error.mean() < 0.25 and error.max() < 0.5
    np.testing.assert_allclose(classic.displacement_to_affine(u)[:3, :3], M[:3, :3], atol=0.02)


def test_affine_register_recovers_a_known_3d_affine():
    # regedu's own affine on the same known answer as ANTs' (it is less exact:
    # ~0.13 voxel against ANTs' ~0.08 here, both well under a voxel).
    from regedu.datasets import mni_brain
    fixed = torch.from_numpy(mni_brain(4).image)[None]
    shape = tuple(fixed.shape[2:])
    M = _known_3d_affine(shape, (4.0, 4.0, 4.0))
    field = lambda m: affine_to_displacement(torch.tensor(m[:3], dtype=torch.float32)[None], shape)  # noqa: E731
    moving = warp(fixed, field(np.linalg.inv(M)))
    u = classic.affine_register(moving, fixed)
    brain = fixed[0, 0] > 0.05
    error = (u - field(M)).norm(dim=1)[0][brain]
    assert error.mean() < 0.25, error.mean()
    start = classic.affine_register(moving, fixed, iterations=0)  # the centre-of-mass start alone
    assert (start - field(M)).norm(dim=1)[0][brain].mean() > 4 * error.mean()
    with pytest.raises(ValueError, match="moving: expected one single-channel image"):
        classic.affine_register(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="iterations: expected one number or one per level"):
        classic.affine_register(moving, fixed, levels=(2, 1), iterations=(5, 5, 5))


def test_displacement_to_affine_inverts_affine_to_displacement():
    M = torch.tensor([[[1.02, 0.1, -0.03, 2.0], [-0.05, 0.97, 0.02, -1.5], [0.01, 0.04, 1.1, 0.5]]])
    u = affine_to_displacement(M, (9, 10, 11))
    np.testing.assert_allclose(classic.displacement_to_affine(u)[:3], M[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="disp: expected one field"):
        classic.displacement_to_affine(u.expand(2, -1, -1, -1, -1))


def test_ants_syn_with_cc_gets_a_small_window(monkeypatch):
    # antspyx's syn_sampling default (32) is a bin count for MI but a radius for
    # CC: a 65^3 window that made CC SyN take minutes on a 4 mm brain.
    seen = []
    monkeypatch.setattr(classic, "ants_register", lambda m, f, t, **kw: seen.append((t, kw)))
    classic.ants_syn(None, None, syn_metric="CC")
    classic.ants_syn(None, None, syn_metric="CC", syn_sampling=4)
    classic.ants_syn(None, None)
    assert seen == [("SyN", {"syn_metric": "CC", "syn_sampling": 2}),
                    ("SyN", {"syn_metric": "CC", "syn_sampling": 4}), ("SyN", {})]


def test_ants_syn_batches_and_improves_the_match():
    shape = (40, 44)
    fixed = np.stack([_blobs(shape, seed=s) for s in (0, 1)])[:, None]
    moving = np.stack([_pull(f[0], _smooth_field(shape, 2.5, seed=9)) for f in fixed])[:, None]
    u = classic.ants_syn(moving, fixed, reg_iterations=(20, 10, 0), **SMALL)
    assert u.shape == (2, 2) + shape
    warped = warp(torch.from_numpy(moving), u)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    before = np.abs(moving - fixed)[inner].mean()
    after = (warped - torch.from_numpy(fixed)).abs()[inner].mean().item()
    assert after < 0.5 * before


def test_ants_rejects_multichannel_images():
    with pytest.raises(ValueError, match="moving: expected a single-channel image"):
        classic.ants_syn(np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 3, 8, 8), np.float32))


# --------------------------------------------------------- instance optimisation

def test_bspline_upsample_reproduces_constants_and_linear_ramps():
    spacing, shape = 4, (13, 10)
    grid = classic._control_shape(shape, spacing)
    ones = torch.ones(1, 1, *grid, dtype=torch.float64)
    torch.testing.assert_close(classic.bspline_upsample(ones, shape, spacing),
                               torch.ones(1, 1, *shape, dtype=torch.float64))
    # Cubic B-splines reproduce linear functions: control values taken at the
    # control positions (j - 1) * spacing give the same ramp densely.
    pos = (torch.arange(grid[1], dtype=torch.float64) - 1) * spacing
    control = (0.5 * pos - 2).expand(1, 1, grid[0], grid[1])
    dense = classic.bspline_upsample(control, shape, spacing)
    ramp = 0.5 * torch.arange(shape[1], dtype=torch.float64) - 2
    torch.testing.assert_close(dense[0, 0], ramp.expand(shape))


def test_bspline_upsample_checks_the_grid_size():
    with pytest.raises(ValueError, match=r"needs spatial shape \(6, 6, 6\)"):
        classic.bspline_upsample(torch.zeros(1, 3, 5, 5, 5), (9, 9, 9), 4)


def _pair(shape, amplitude=2.0):
    moving = _blobs(shape, sigma=2.5)
    truth = _smooth_field(shape, amplitude, sigma=6.0)
    fixed = _pull(moving, truth)  # warp(moving, truth) == fixed: truth is the answer
    return (torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None],
            torch.from_numpy(truth).float()[None])


@pytest.mark.parametrize("transform, levels, iterations", [("dense", (1,), 100),
                                                          ("dense", (4, 2, 1), (40, 40, 40)),
                                                          ("bspline", (2, 1), 80)])
def test_instance_optimisation_recovers_a_smooth_field(transform, levels, iterations):
    moving, fixed, truth = _pair((40, 40))
    res = classic.instance_optimisation(moving, fixed, transform=transform, levels=levels,
                                        iterations=iterations, lr=0.1, weight=0.05,
                                        progress=False)
    assert res.disp.shape == truth.shape and not res.disp.requires_grad
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    error = (res.disp - truth)[inner].norm(dim=1).mean()
    assert error < 0.35 * truth[inner].norm(dim=1).mean()
    assert len(res.history["loss"]) == sum(np.broadcast_to(iterations, len(levels)))
    assert res.history["similarity"][-1] < 0.3 * res.history["similarity"][0]
    torch.testing.assert_close(res.warped, warp(moving, res.disp))


def test_instance_optimisation_3d_with_ncc_and_bending_energy():
    moving, fixed, truth = _pair((20, 24, 28), amplitude=1.5)
    res = classic.instance_optimisation(moving, fixed, transform="bspline", control_spacing=3,
                                        similarity=losses.NCC(window=5),
                                        regulariser=losses.BendingEnergy(), weight=0.1,
                                        iterations=40, lr=0.1, progress=False)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    error = (res.disp - truth)[inner].norm(dim=1).mean()
    assert error < 0.3 * truth[inner].norm(dim=1).mean()


def test_instance_optimisation_starts_from_init():
    moving, fixed, truth = _pair((32, 32))
    res = classic.instance_optimisation(moving, fixed, init=truth, iterations=0, progress=False)
    torch.testing.assert_close(res.disp, truth)
    # Refining a good start keeps it good.
    res = classic.instance_optimisation(moving, fixed, init=truth, iterations=30, lr=0.05,
                                        weight=0.05, progress=False)
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
    assert (res.disp - truth)[inner].norm(dim=1).mean() < 0.3


def test_instance_optimisation_checks_its_arguments():
    moving, fixed, _ = _pair((16, 16))
    with pytest.raises(ValueError, match="transform: expected one of 'dense', 'bspline'"):
        classic.instance_optimisation(moving, fixed, transform="spline")
    with pytest.raises(ValueError, match=r"iterations: expected one number or one per level \(2\)"):
        classic.instance_optimisation(moving, fixed, levels=(2, 1), iterations=(5, 5, 5))
    with pytest.raises(ValueError, match="moving and fixed must have the same shape"):
        classic.instance_optimisation(moving[..., :8], fixed)
