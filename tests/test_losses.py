import pytest
import torch

from regedu import losses
from regedu.spatial import affine_to_displacement, warp

from conftest import smooth_field


def _textured(shape, seed=0):
    """Smooth random texture in (0, 1) of shape (B, C, *spatial)."""
    B, C, *spatial = shape
    n = B * C
    fields = [smooth_field(spatial, 6.0, seed=seed + i, sigma_frac=0.05)[:, :1] for i in range(n)]
    return torch.sigmoid(torch.cat(fields).reshape(shape))


@pytest.mark.parametrize("shape", [(2, 1, 23, 31), (1, 2, 11, 14, 17)])
def test_local_ncc_agrees_with_voxelmorph(shape):
    ne = pytest.importorskip("neurite")  # voxelmorph 0.3.4 delegates NCC to neurite 0.3.4
    a = torch.rand(shape)
    b = 0.5 * a + 0.5 * torch.rand(shape)
    ours = losses.ncc_local(a, b, window=9)
    theirs = -ne.nn.functional.ncc(a, b, window_size=9).squeeze()
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 7, 8), (1, 1, 5, 6, 4)])
def test_local_ncc_gradcheck(shape):
    a = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    b = (0.3 * a.detach() + torch.rand(shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: losses.ncc_local(x, y, window=3), (a, b), fast_mode=True)


def test_mi_gradcheck():
    a = torch.rand(1, 1, 6, 7, dtype=torch.float64)
    b = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: losses.mutual_information(a, y, bins=8), (b,))


def test_ncc_invariant_to_positive_affine_intensity_change_mse_not():
    fixed = _textured((1, 1, 40, 44))
    moving = warp(fixed, smooth_field((40, 44), 2.0, seed=1))
    changed = 2.5 * moving + 0.3
    # Local NCC pads with zeros (as VoxelMorph), so an offset shows in windows that
    # overlap the border; a scale does not, and inside the image neither does.
    assert torch.allclose(losses.ncc_local(fixed, moving), losses.ncc_local(fixed, 2.5 * moving), atol=1e-4)
    per_voxel_gap = losses.ncc_local(fixed, moving) - losses.ncc_local(fixed, changed)
    assert per_voxel_gap.abs() < 0.02
    assert torch.allclose(losses.ncc_global(fixed, moving), losses.ncc_global(fixed, changed), atol=1e-5)
    assert losses.mse(fixed, changed) > 5 * losses.mse(fixed, moving)


def test_similarity_optimum_under_intensity_change():
    # Shift a textured image and score candidate shifts: NCC (squared) and MI keep
    # the true optimum under an inverted contrast (as between T1 and T2); MSE,
    # which compares raw intensities, prefers a wrong shift.
    fixed = _textured((1, 1, 48, 48), seed=2)
    moving = 1.0 - fixed
    scores = {name: [] for name in ("mse", "ncc", "mi")}
    for s in range(-3, 4):
        u = torch.zeros(1, 2, 48, 48)
        u[:, 1] = s
        w = warp(moving, u, padding="border")
        scores["mse"].append(float(losses.mse(fixed, w)))
        scores["ncc"].append(float(losses.ncc_local(fixed, w)))
        scores["mi"].append(float(losses.mutual_information(fixed, w)))
    best = {k: min(range(7), key=v.__getitem__) - 3 for k, v in scores.items()}
    assert best["ncc"] == 0 and best["mi"] == 0
    assert best["mse"] != 0


def test_perfect_match_values():
    x = _textured((2, 1, 20, 21))
    assert losses.mse(x, x) == 0
    assert torch.allclose(losses.ncc_global(x, x), torch.tensor(-1.0), atol=1e-5)
    assert losses.ncc_local(x, x) < -0.95
    assert losses.mutual_information(x, x) < losses.mutual_information(x, torch.rand_like(x))


def test_regularisers_zero_on_translation_and_affine():
    t = torch.ones(1, 3, 6, 7, 8) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    assert losses.diffusion(t) == 0 and losses.diffusion(t, penalty="l1") == 0
    m = torch.tensor([[[1.1, 0.2, 3.0], [-0.1, 0.9, 1.0]]])
    aff = affine_to_displacement(m, (12, 13))
    assert losses.bending_energy(aff) < 1e-9
    assert losses.diffusion(aff) > 0
    rough = smooth_field((12, 13), 2.0, sigma_frac=0.02)
    assert losses.bending_energy(rough) > losses.bending_energy(smooth_field((12, 13), 2.0, sigma_frac=0.3))


def test_diffusion_matches_hand_computation():
    u = torch.zeros(1, 2, 3, 3)
    u[0, 0, 1, 1] = 1.0
    # dx along rows: two unit jumps out of 2*3 differences; same along columns; channel 1 all zero.
    expected = ((2 / 12) + (2 / 12)) / 2
    assert torch.allclose(losses.diffusion(u), torch.tensor(expected))


def test_edge_aware_smoothness_down_weights_edges():
    image = torch.zeros(1, 1, 10, 10)
    image[..., 5:] = 1.0
    u = torch.zeros(1, 2, 10, 10)
    u[:, 1, :, 5:] = 1.0        # jump exactly at the image edge
    v = torch.zeros(1, 2, 10, 10)
    v[:, 1, :, 3:] = 1.0        # same jump in a flat region
    e_at_edge = losses.edge_aware_smoothness(u, image, alpha=5.0)
    e_flat = losses.edge_aware_smoothness(v, image, alpha=5.0)
    assert e_at_edge < 0.01 * e_flat
    assert torch.allclose(e_flat, losses.diffusion(v))


def test_soft_dice_and_one_hot():
    a = torch.tensor([[[[0, 1, 1, 2]]]])
    b = torch.tensor([[[[0, 1, 2, 2]]]])
    oa, ob = losses.one_hot(a, [1, 2]), losses.one_hot(b, [1, 2])
    assert oa.shape == (1, 2, 1, 4)
    assert torch.allclose(losses.soft_dice(oa, ob), torch.tensor(1 - 2 / 3), atol=1e-4)
    assert losses.soft_dice(oa, oa) < 1e-4


def test_modules_match_functions():
    f, w = _textured((1, 1, 16, 17)), _textured((1, 1, 16, 17), seed=3)
    u = smooth_field((16, 17), 1.0)
    assert losses.MSE()(f, w) == losses.mse(f, w)
    assert losses.NCC(window=5)(f, w) == losses.ncc_local(f, w, window=5)
    assert losses.NCC(kind="global")(f, w) == losses.ncc_global(f, w)
    assert losses.MI(bins=16)(f, w) == losses.mutual_information(f, w, bins=16)
    assert losses.Diffusion()(u) == losses.diffusion(u)
    assert losses.BendingEnergy()(u) == losses.bending_energy(u)
    assert losses.EdgeAwareSmoothness()(u, f) == losses.edge_aware_smoothness(u, f)


def test_reduction_none_gives_one_value_per_item():
    f, w = torch.rand(3, 1, 12, 13), torch.rand(3, 1, 12, 13)
    for fn in (losses.mse, losses.ncc_local, losses.ncc_global, losses.mutual_information):
        per = fn(f, w, reduction="none")
        assert per.shape == (3,)
        assert torch.allclose(per.mean(), fn(f, w), atol=1e-6)


def test_mse_mask_restricts_region():
    f = torch.zeros(1, 1, 4, 4)
    w = torch.zeros(1, 1, 4, 4)
    w[..., :2] = 1.0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1
    assert losses.mse(f, w, mask=mask) == 0
    assert losses.mse(f, w) == 0.5


def test_an_objective_needs_a_data_term_unless_the_caller_supplies_its_own():
    from regedu import nets
    model = nets.create("unet", spatial_dims=2, encoder=(4, 4), decoder=(4, 4))
    moving, fixed = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    output = model(moving, fixed)
    with pytest.raises(ValueError, match="losses: no similarity term in \\['diffusion'\\]"):
        losses.loss_terms(output, moving, fixed, losses={"diffusion": 1.0})
    terms = losses.loss_terms(output, moving, fixed, losses={"diffusion": 1.0}, require_data=False)
    assert sorted(terms) == ["diffusion", "loss"]
    assert torch.allclose(terms["loss"], losses.diffusion(output.disp))
